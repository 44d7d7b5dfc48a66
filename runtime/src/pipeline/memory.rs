//! The memory plan: which models stay resident and which are loaded per batch, so the run fits
//! `budget_mib` ([`super::scheduler`] decides; this opens the models the way it decided).

use burn::tensor::Device;
use divergen_models::checkpoint::Checkpoint;
use divergen_models::clip::Clip;
use divergen_models::diffusion::mix::GeneratorMix;
use divergen_models::diffusion::pipeline::{Residency, StableDiffusion, quantized_share};
use divergen_models::layers::Quantization;
use divergen_models::sam::Sam;

use super::config::RunConfig;
use super::scheduler::{self, ModelPlan};
use crate::Result;

/// A model loaded on first use and, unless resident, dropped after each stage.
pub struct Slot<'a, T> {
    resident: bool,
    model: Option<T>,
    load: Box<dyn Fn() -> Result<T> + 'a>,
}

impl<'a, T> Slot<'a, T> {
    fn new(resident: bool, load: impl Fn() -> Result<T> + 'a) -> Self {
        Slot {
            resident,
            model: None,
            load: Box::new(load),
        }
    }

    pub fn get(&mut self) -> Result<&T> {
        if self.model.is_none() {
            self.model = Some((self.load)()?);
        }
        Ok(self.model.as_ref().expect("loaded above"))
    }

    /// Drops the model after a stage unless the plan keeps it resident.
    pub fn release(&mut self, device: &Device) {
        if !self.resident && self.model.take().is_some() {
            device.memory_cleanup();
        }
    }

    pub fn unload(&mut self) {
        self.model = None;
    }
}

/// The largest device pool reservation seen, in MiB (`None` where the device does not say).
#[derive(Default)]
pub struct PeakMemory(pub Option<f64>);

impl PeakMemory {
    pub fn sample(&mut self, device: &Device) {
        if let Some(u) = device.memory_pool_usage() {
            let now = u.bytes_reserved as f64 / (1 << 20) as f64;
            self.0 = Some(self.0.map_or(now, |p| p.max(now)));
        }
    }
}

/// Every model of the run, opened as the plan says.
pub struct Models<'a> {
    /// One per generator of the mix, in its order.
    pub diffusion: Vec<StableDiffusion>,
    pub sam: Slot<'a, Sam>,
    pub clip: Slot<'a, Clip>,
    /// Per generator its text encoder, UNet and decoder, then SAM, then CLIP.
    pub plan: Vec<ModelPlan>,
}

impl<'a> Models<'a> {
    /// Estimates each model's bytes from its checkpoint (at its quantisation), plans them under
    /// the budget and opens the generators; SAM and CLIP load on first use.
    pub fn plan(config: &'a RunConfig, mix: &GeneratorMix, device: &'a Device) -> Result<Self> {
        let gen_quant: Quantization = config.generation.quant.into();
        let mut diffusion: Vec<StableDiffusion> = (0..mix.generators.len())
            .map(|i| mix.open(i, gen_quant, device))
            .collect::<Result<_, _>>()?;
        let mut estimates: Vec<(String, u64)> = Vec::new();
        for (g, sd) in mix.generators.iter().zip(&diffusion) {
            let b = sd.model_bytes()?;
            estimates.push((format!("{} text encoder", g.id), b.text_encoder));
            estimates.push((format!("{} unet", g.id), b.unet));
            estimates.push((format!("{} decoder", g.id), b.decoder));
        }
        let sam_quant: Quantization = config.annotation.quant.into();
        let clip_quant: Quantization = config.filter.quant.into();
        let sam_bytes = Checkpoint::open(&config.annotation.sam)?.f32_bytes();
        let clip_weights = config.filter.clip.join("model.safetensors");
        let clip_bytes = Checkpoint::open(&clip_weights)?.f32_bytes();
        estimates.push(("sam".into(), (sam_bytes as f64 * quantized_share(sam_quant)) as u64));
        estimates.push(("clip".into(), (clip_bytes as f64 * quantized_share(clip_quant)) as u64));
        let plan = scheduler::plan(&estimates, config.budget_mib.map(|m| m << 20))?;
        for p in &plan {
            log::info!(
                "memory plan: {} ≈ {:.0} MiB, {}",
                p.name,
                p.estimated_mib,
                if p.resident { "resident" } else { "loaded per batch" }
            );
        }
        for (i, sd) in diffusion.iter_mut().enumerate() {
            sd.set_residency(Residency {
                text_encoder: plan[3 * i].resident,
                unet: plan[3 * i + 1].resident,
                decoder: plan[3 * i + 2].resident,
            });
        }
        let n = plan.len();
        let sam = Slot::new(plan[n - 2].resident, move || {
            Ok(Sam::load(&config.annotation.sam, sam_quant, device)?)
        });
        let clip = Slot::new(plan[n - 1].resident, move || {
            Ok(Clip::load(&config.filter.clip, clip_quant, device)?)
        });
        Ok(Models {
            diffusion,
            sam,
            clip,
            plan,
        })
    }

    /// Frees every model (before stage 4, which needs none).
    pub fn unload_all(&mut self, device: &Device) {
        for sd in &mut self.diffusion {
            sd.unload();
        }
        self.sam.unload();
        self.clip.unload();
        device.memory_cleanup();
    }
}

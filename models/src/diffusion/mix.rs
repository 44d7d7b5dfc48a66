//! DiverGen's generator diversity: several generators (a pipeline folder with its scheduler,
//! steps, guidance and size) mixed by ratio over a run, each image recording which generator,
//! prompt and seed made it.

use std::path::{Path, PathBuf};

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use super::pipeline::{GenerateOptions, Generated, StableDiffusion, generate};
use super::scheduler::SchedulerKind;
use crate::error::ModelError;
use crate::layers::Quantization;

/// One generator of the mix.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSpec {
    pub id: String,
    /// A diffusers Stable Diffusion folder.
    pub folder: PathBuf,
    /// ddim, euler, euler-a, dpm++2m or lcm; the folder's own when absent.
    #[serde(default)]
    pub scheduler: Option<String>,
    pub steps: usize,
    pub guidance: f32,
    pub width: usize,
    pub height: usize,
    /// Share of the images (relative to the other generators').
    #[serde(default = "one")]
    pub ratio: f64,
    #[serde(default)]
    pub clip_skip: usize,
    /// Decode with this TAESD folder instead of the VAE.
    #[serde(default)]
    pub taesd: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}

/// What made one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub generator_id: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
}

pub struct GeneratorMix {
    pub generators: Vec<GeneratorSpec>,
}

/// Classifier-free guidance scales are finite and not negative (0 or 1 run the prompt alone):
/// NaN would turn every image into NaN, a negative scale would push away from the prompt.
pub fn check_guidance(guidance: f32) -> Result<(), String> {
    if guidance.is_finite() && guidance >= 0.0 {
        Ok(())
    } else {
        Err(format!(
            "guidance {guidance} must be a finite number ≥ 0 (0 or 1 turn it off)"
        ))
    }
}

impl GeneratorMix {
    /// Checks every generator's settings; errors name the generator and the field.
    pub fn new(generators: Vec<GeneratorSpec>) -> Result<Self, ModelError> {
        if generators.is_empty() {
            return Err(ModelError("the generator mix is empty".into()));
        }
        for (i, g) in generators.iter().enumerate() {
            let bad = |what: String| ModelError(format!("generator {:?}: {what}", g.id));
            if generators[..i].iter().any(|o| o.id == g.id) {
                return Err(bad("id used twice".into()));
            }
            if !(g.ratio.is_finite() && g.ratio > 0.0) {
                return Err(bad(format!("ratio {} must be a positive number", g.ratio)));
            }
            if g.steps == 0 {
                return Err(bad("steps must be at least 1".into()));
            }
            check_guidance(g.guidance).map_err(bad)?;
            if g.width == 0 || g.height == 0 || !g.width.is_multiple_of(8) || !g.height.is_multiple_of(8) {
                return Err(bad(format!(
                    "size {}x{} must be positive multiples of 8",
                    g.width, g.height
                )));
            }
            if let Some(s) = &g.scheduler
                && SchedulerKind::parse(s).is_none()
            {
                return Err(bad(format!(
                    "scheduler {s:?} is not one of ddim, euler, euler-a, dpm++2m, lcm"
                )));
            }
        }
        Ok(GeneratorMix { generators })
    }

    /// Reads a JSON list of generators.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::at(path, e))?;
        let specs: Vec<GeneratorSpec> = serde_json::from_str(&text).map_err(|e| ModelError::at(path, e))?;
        Self::new(specs).map_err(|e| ModelError::at(path, e))
    }

    /// The generator of each of `count` images: counts in proportion to the ratios (largest
    /// remainder, so 3:1 over 8 images is exactly 6 and 2), order shuffled by `seed`.
    pub fn assign(&self, count: usize, seed: u64) -> Vec<usize> {
        let total: f64 = self.generators.iter().map(|g| g.ratio).sum();
        let exact: Vec<f64> = self.generators.iter().map(|g| g.ratio / total * count as f64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
        let mut order: Vec<usize> = (0..exact.len()).collect();
        order.sort_by(|&a, &b| {
            (exact[b] - exact[b].floor())
                .total_cmp(&(exact[a] - exact[a].floor()))
                .then(a.cmp(&b))
        });
        let short = count - counts.iter().sum::<usize>();
        for &i in order.iter().take(short) {
            counts[i] += 1;
        }
        let mut picks: Vec<usize> = counts
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i, n))
            .collect();
        picks.shuffle(&mut StdRng::seed_from_u64(seed));
        picks
    }

    /// Generator `index` as a batch generator with its settings, loading nothing yet.
    pub fn open(
        &self,
        index: usize,
        quant: Quantization,
        device: &burn::tensor::Device,
    ) -> Result<StableDiffusion, ModelError> {
        let g = self.get(index)?;
        StableDiffusion::open(&g.folder, &self.options(index, "", "", 0, quant)?, device)
            .map_err(|e| ModelError(format!("generator {:?}: {e}", g.id)))
    }

    fn get(&self, index: usize) -> Result<&GeneratorSpec, ModelError> {
        self.generators
            .get(index)
            .ok_or_else(|| ModelError(format!("no generator {index} in a mix of {}", self.generators.len())))
    }

    fn options(
        &self,
        index: usize,
        prompt: &str,
        negative_prompt: &str,
        seed: u64,
        quant: Quantization,
    ) -> Result<GenerateOptions, ModelError> {
        let g = self.get(index)?;
        Ok(GenerateOptions {
            prompt: prompt.into(),
            negative_prompt: negative_prompt.into(),
            steps: g.steps,
            guidance: g.guidance,
            scheduler: g.scheduler.as_deref().and_then(SchedulerKind::parse),
            seed,
            latents: None,
            width: g.width,
            height: g.height,
            quant,
            clip_skip: g.clip_skip,
            taesd: g.taesd.clone(),
        })
    }

    /// Runs generator `index` on one prompt and returns the image with its record.
    pub fn generate(
        &self,
        index: usize,
        prompt: &str,
        negative_prompt: &str,
        seed: u64,
        quant: Quantization,
        device: &burn::tensor::Device,
    ) -> Result<(Generated, GenerationRecord), ModelError> {
        let options = self.options(index, prompt, negative_prompt, seed, quant)?;
        let g = self.get(index)?;
        let out = generate(&g.folder, &options, device)?;
        let record = GenerationRecord {
            generator_id: g.id.clone(),
            prompt: prompt.into(),
            negative_prompt: negative_prompt.into(),
            seed,
        };
        Ok((out, record))
    }
}

//! Text to image from a diffusers Stable Diffusion folder as published (`model_index.json`,
//! `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`), step for step as diffusers'
//! `StableDiffusionPipeline`: tokenize, encode (negative prompt first when guidance > 1), scale
//! the initial latents, denoise with classifier-free guidance, decode, round to 8 bits.
//!
//! Memory plan: each model is loaded when its stage starts and dropped when it ends, so the
//! text encoder, UNet and VAE never sit in memory together.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::scheduler::{Scheduler, SchedulerKind};
use super::taesd::{AutoencoderTinyConfig, TinyDecoder};
use super::tiling::{HostImage, Tiling, decode_tiled};
use super::unet::{UNet, UNetConfig};
use super::vae::{AutoencoderKlConfig, VaeDecoder};
use crate::checkpoint::Checkpoint;
use crate::clip::ClipTextModel;
use crate::clip::tokenizer::ClipTokenizer;
use crate::error::ModelError;
use crate::layers::Quantization;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs the prompt alone (SD-Turbo uses 0).
    pub guidance: f32,
    /// Override the folder's scheduler.
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// Initial latents `[1, 4, h/f, w/f]` (f: the VAE's scale factor, 8 for SD) instead of
    /// seeded noise (to reproduce a diffusers run).
    pub latents: Option<Vec<f32>>,
    pub width: usize,
    pub height: usize,
    /// UNet and text encoder weights; the VAE stays f32.
    pub quant: Quantization,
    /// Layers of the text encoder to skip from the end (SD 2.x's "penultimate layer" is 1).
    pub clip_skip: usize,
    /// Decode with this `AutoencoderTiny` (TAESD) folder instead of the pipeline's VAE.
    pub taesd: Option<PathBuf>,
}

/// What one run produced, with each stage's wall time.
pub struct Generated {
    pub image: RgbImage,
    pub timesteps: Vec<f32>,
    pub encode_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    /// The device pool's high-water mark after each stage, if the backend reports it.
    pub peak_mib: Vec<(String, f64)>,
}

/// Reads a `.npy` of f32 latents, checking its shape.
pub fn read_latents(path: &Path, shape: [usize; 4]) -> Result<Vec<f32>, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::at(path, e))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file)).map_err(|e| ModelError::at(path, e))?;
    let found: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    if found != shape {
        return Err(ModelError::at(
            path,
            format!("latents have shape {found:?}, this run needs {shape:?}"),
        ));
    }
    let values: Vec<f32> = npy
        .into_vec::<f32>()
        .map_err(|e| ModelError::at(path, format!("{e} (f32 latents expected)")))?;
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(ModelError::at(path, format!("latents hold a non-finite value ({bad})")));
    }
    Ok(values)
}

fn sync(device: &Device) -> Result<(), ModelError> {
    device.sync().map_err(|e| ModelError(format!("device failed: {e:?}")))
}

fn peak(device: &Device) -> Option<f64> {
    device
        .memory_pool_usage()
        .map(|u| u.bytes_reserved as f64 / (1 << 20) as f64)
}

/// Standard normal values (Box–Muller over a seeded generator).
fn seeded_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// What `generate` leaves resident between calls. `false` everywhere is the memory plan of a
/// single image: each model loaded for its stage and dropped after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Residency {
    pub text_encoder: bool,
    pub unet: bool,
    pub decoder: bool,
}

/// One image of a batch.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    /// Initial latents `[1, 4, h/f, w/f]` instead of seeded noise.
    pub latents: Option<Vec<f32>>,
}

/// A batch's images and each stage's wall time over the batch.
pub struct BatchOutput {
    pub images: Vec<RgbImage>,
    pub timesteps: Vec<f32>,
    pub encode_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    pub peak_mib: Vec<(String, f64)>,
}

/// Estimated device bytes of each model once loaded (f32 tensors from the checkpoint headers,
/// scaled by what quantization keeps).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ModelBytes {
    pub text_encoder: u64,
    pub unet: u64,
    pub decoder: u64,
}

enum Decoder {
    Vae(Box<VaeDecoder>),
    Tiny(TinyDecoder),
}

impl Decoder {
    fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        match self {
            Decoder::Vae(d) => d.decode(latents),
            Decoder::Tiny(d) => d.decode(latents),
        }
    }

    fn limits(&self) -> DecoderLimits {
        match self {
            Decoder::Vae(d) => DecoderLimits::Vae(d.config.clone()),
            Decoder::Tiny(d) => DecoderLimits::Tiny(d.config.clone()),
        }
    }

    /// Latents `[1, C, h, w]` → 8-bit RGB: decoded whole where the device holds that, in tiles
    /// where it does not.
    fn decode_rgb8(&self, latents: Tensor<4>, factor: usize, device: &Device) -> Result<RgbImage, ModelError> {
        let [b, _, h, w] = latents.dims();
        match self.limits().tiling(b, h, w, factor, device)? {
            None => to_rgb8(self.decode(latents)),
            Some(tiling) => {
                log::info!(
                    "decoding {}x{} in tiles of {} latent cells: the whole decode would hold a larger tensor than this device binds",
                    w * factor,
                    h * factor,
                    tiling.latent_tile
                );
                host_to_rgb8(&decode_tiled(latents, tiling, |t| self.decode(t))?)
            }
        }
    }
}

/// What bounds a decoder's work on a device, known from its config alone.
enum DecoderLimits {
    Vae(AutoencoderKlConfig),
    Tiny(AutoencoderTinyConfig),
}

impl DecoderLimits {
    fn of(dir: &Path, taesd: Option<&Path>) -> Result<Self, ModelError> {
        Ok(match taesd {
            Some(tiny) => DecoderLimits::Tiny(AutoencoderTinyConfig::from_file(&tiny.join("config.json"))?),
            None => DecoderLimits::Vae(AutoencoderKlConfig::from_file(&dir.join("vae").join("config.json"))?),
        })
    }

    fn largest_tensor_bytes(&self, batch: usize, h: usize, w: usize) -> u64 {
        match self {
            DecoderLimits::Vae(c) => c.largest_tensor_bytes(batch, h, w),
            DecoderLimits::Tiny(c) => c.largest_tensor_bytes(batch, h, w),
        }
    }

    /// `None` when latents of `h × w` decode whole on `device`: every tensor within its binding
    /// limit and every convolution within one dispatch; else the largest tiling that fits.
    fn tiling(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        factor: usize,
        device: &Device,
    ) -> Result<Option<Tiling>, ModelError> {
        let max_bytes = divergen_kernels::device::max_tensor_bytes(device);
        let max_pixels = divergen_kernels::conv::max_output_pixels(device);
        let fits = |lh: usize, lw: usize| {
            max_bytes.is_none_or(|m| self.largest_tensor_bytes(batch, lh, lw) <= m)
                && max_pixels.is_none_or(|m| lh * lw * factor * factor <= m)
        };
        if fits(h, w) {
            return Ok(None);
        }
        Tiling::largest_fitting(factor, h.max(w), |side| fits(side, side))
            .map(Some)
            .ok_or_else(|| {
                ModelError(format!(
                    "the decoder cannot run on this device even in tiles of 8 latent cells: one tile holds {} MiB, more than the {} MiB it holds per tensor",
                    mib(self.largest_tensor_bytes(batch, 8, 8)),
                    max_bytes.map_or(0, mib)
                ))
            })
    }
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// A Stable Diffusion folder with fixed settings, generating batches: the text encoder runs
/// over the whole batch, then the UNet denoises each image, then the decoder decodes them, so a
/// model that is not resident is loaded once per batch.
pub struct StableDiffusion {
    dir: PathBuf,
    settings: GenerateOptions,
    tokenizer: ClipTokenizer,
    device: Device,
    residency: Residency,
    text_encoder: Option<ClipTextModel>,
    unet: Option<UNet>,
    decoder: Option<Decoder>,
    /// Image pixels per latent cell (diffusers' `vae_scale_factor`).
    latent_factor: usize,
}

/// diffusers' `vae_scale_factor`: `2^(levels - 1)` of the folder's `AutoencoderKL`; TAESD's
/// latents are always 8× smaller.
pub fn latent_factor(dir: &Path, taesd: Option<&Path>) -> Result<usize, ModelError> {
    if taesd.is_some() {
        return Ok(8);
    }
    let config = super::vae::AutoencoderKlConfig::from_file(&dir.join("vae").join("config.json"))?;
    Ok(1 << (config.block_out_channels.len() - 1))
}

fn checkpoint_f32_bytes(path: &Path) -> Result<u64, ModelError> {
    Ok(Checkpoint::open(path)?.f32_bytes())
}

/// Share of f32 bytes a quantized model keeps on the device (measured on the UNet: int8 889 of
/// 3,302 MiB, int4 826).
pub fn quantized_share(quant: Quantization) -> f64 {
    match quant {
        Quantization::None => 1.0,
        Quantization::Int8 => 0.27,
        Quantization::Int4 => 0.25,
    }
}

impl StableDiffusion {
    /// Checks the folder and the settings; loads nothing yet but the tokenizer. `settings`'
    /// prompt, seed and latents are unused (they come with each request).
    pub fn open(dir: &Path, settings: &GenerateOptions, device: &Device) -> Result<Self, ModelError> {
        let index = dir.join("model_index.json");
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::at(&index, e))?;
        let model_index: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::at(&index, e))?;
        let class = model_index["_class_name"].as_str().unwrap_or("");
        if !matches!(class, "StableDiffusionPipeline" | "StableDiffusionImg2ImgPipeline") {
            return Err(ModelError::at(
                &index,
                format!("_class_name {class:?}: a StableDiffusionPipeline folder is expected"),
            ));
        }
        super::mix::check_guidance(settings.guidance).map_err(ModelError)?;
        let (w, h) = (settings.width, settings.height);
        let factor = latent_factor(dir, settings.taesd.as_deref())?;
        if !w.is_multiple_of(factor) || !h.is_multiple_of(factor) || w == 0 || h == 0 {
            return Err(ModelError(format!(
                "size {w}x{h} must be positive multiples of {factor} (the VAE's scale factor)"
            )));
        }
        check_fits(dir, settings, factor, device)?;
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer")).map_err(|e| ModelError(e.to_string()))?;
        Ok(StableDiffusion {
            dir: dir.to_path_buf(),
            settings: settings.clone(),
            tokenizer,
            device: device.clone(),
            residency: Residency::default(),
            text_encoder: None,
            unet: None,
            decoder: None,
            latent_factor: factor,
        })
    }

    pub fn set_residency(&mut self, residency: Residency) {
        self.residency = residency;
        if !residency.text_encoder {
            self.text_encoder = None;
        }
        if !residency.unet {
            self.unet = None;
        }
        if !residency.decoder {
            self.decoder = None;
        }
    }

    /// Drops every resident model.
    pub fn unload(&mut self) {
        self.text_encoder = None;
        self.unet = None;
        self.decoder = None;
    }

    pub fn model_bytes(&self) -> Result<ModelBytes, ModelError> {
        let share = quantized_share(self.settings.quant);
        let decoder = match &self.settings.taesd {
            Some(tiny) => checkpoint_f32_bytes(&super::component_weights(tiny)?)?,
            None => checkpoint_f32_bytes(&super::component_weights(&self.dir.join("vae"))?)?,
        };
        // The token table stays in host memory.
        let text = checkpoint_f32_bytes(&self.dir.join("text_encoder/model.safetensors"))?;
        Ok(ModelBytes {
            text_encoder: (text as f64 * share) as u64,
            unet: (checkpoint_f32_bytes(&super::component_weights(&self.dir.join("unet"))?)? as f64 * share) as u64,
            decoder,
        })
    }

    pub fn generate(&mut self, requests: &[Request]) -> Result<BatchOutput, ModelError> {
        self.generate_observed(requests, None)
    }

    /// [`Self::generate`], calling `on_step(done, total)` after each UNet pass (`total` passes for
    /// the whole batch). Each pass is waited for before the call, so the counts follow the
    /// device's work rather than how far ahead the queue runs.
    pub fn generate_observed(
        &mut self,
        requests: &[Request],
        mut on_step: Option<&mut dyn FnMut(usize, usize)>,
    ) -> Result<BatchOutput, ModelError> {
        let opts = &self.settings;
        let device = self.device.clone();
        let cfg = opts.guidance > 1.0;
        let f = self.latent_factor;
        let shape = [1, 4, opts.height / f, opts.width / f];
        let n: usize = shape.iter().product();
        let mut peak_mib = Vec::new();

        // Stage 1: every prompt of the batch (negative first under guidance).
        let start = std::time::Instant::now();
        let pad = self.tokenizer.end_id();
        let mut contexts = Vec::with_capacity(requests.len());
        {
            if self.text_encoder.is_none() {
                self.text_encoder = Some(ClipTextModel::load_text_encoder(
                    &self.dir.join("text_encoder"),
                    opts.quant,
                    &device,
                )?);
            }
            let encoder = self.text_encoder.as_ref().expect("loaded above");
            for r in requests {
                let mut rows = Vec::new();
                if cfg {
                    rows.push(self.tokenizer.encode_padded(&r.negative_prompt, pad).0);
                }
                rows.push(self.tokenizer.encode_padded(&r.prompt, pad).0);
                contexts.push(encoder.hidden_states(&rows, opts.clip_skip)?);
            }
            sync(&device)?;
        }
        if !self.residency.text_encoder {
            self.text_encoder = None;
        }
        let encode_ms = start.elapsed().as_secs_f64() * 1e3;
        peak_mib.extend(peak(&device).map(|m| ("text encoder".to_string(), m)));

        // Stage 2: denoise. Images go through the UNet together, as many per pass as fit the
        // latent volume of one 512² SD image (on a small model a pass is dominated by kernel
        // launches, so this is where batching pays; at SD sizes it stays one image at a time).
        let start = std::time::Instant::now();
        let mut timesteps = Vec::new();
        let mut all_latents = Vec::with_capacity(requests.len());
        if self.unet.is_none() {
            self.unet = Some(UNet::load(&self.dir.join("unet"), opts.quant, &device)?);
        }
        let unet = self.unet.as_ref().expect("loaded above");
        let per_pass = (4 * 64 * 64 / n).max(1).min(unet_batch_limit(
            &unet.config,
            cfg,
            &shape,
            divergen_kernels::device::max_tensor_bytes(&device),
        ));
        let mut contexts = contexts.into_iter();
        let mut passes = (0, 0);
        for chunk in requests.chunks(per_pass) {
            let k = chunk.len();
            let mut scheduler =
                Scheduler::from_file(&self.dir.join("scheduler/scheduler_config.json"), opts.scheduler)?;
            scheduler.set_timesteps(opts.steps)?;
            let mut initial = Vec::with_capacity(k * n);
            for r in chunk {
                match &r.latents {
                    Some(l) if l.len() != n => {
                        return Err(ModelError(format!(
                            "latents hold {} values, {shape:?} needs {n}",
                            l.len()
                        )));
                    }
                    Some(l) => initial.extend_from_slice(l),
                    None => initial.extend(seeded_noise(r.seed, n)),
                }
            }
            let batch_shape = [k, shape[1], shape[2], shape[3]];
            // Under guidance each context is [negative, prompt]: the UNet takes all negatives,
            // then all prompts.
            let ctx: Vec<Tensor<3>> = contexts.by_ref().take(k).collect();
            let context = if cfg {
                let [_, s, d] = ctx[0].dims();
                let part = |i: usize| {
                    ctx.iter()
                        .map(|c| c.clone().slice([i..i + 1, 0..s, 0..d]))
                        .collect::<Vec<_>>()
                };
                Tensor::cat([part(0), part(1)].concat(), 0)
            } else {
                Tensor::cat(ctx, 0)
            };
            let mut latents =
                Tensor::<4>::from_data(TensorData::new(initial, batch_shape), &device) * scheduler.init_noise_sigma();
            let mut draws = 0u64;
            timesteps = scheduler.timesteps().to_vec();
            passes.1 = requests.len().div_ceil(per_pass) * timesteps.len();
            for &t in &timesteps {
                let x = scheduler.scale_model_input(latents.clone());
                let (input, ts) = if cfg {
                    (Tensor::cat(vec![x.clone(), x], 0), vec![t; 2 * k])
                } else {
                    (x, vec![t; k])
                };
                let out = unet.forward(input, &ts, context.clone())?;
                let noise_pred = if cfg {
                    let [_, c, h, w] = out.dims();
                    let uncond = out.clone().slice([0..k, 0..c, 0..h, 0..w]);
                    let text = out.slice([k..2 * k, 0..c, 0..h, 0..w]);
                    uncond.clone() + (text - uncond) * opts.guidance
                } else {
                    out
                };
                // Each image draws its own seeded noise, so an image does not depend on its
                // batch.
                let mut noise = || {
                    draws += 1;
                    let values: Vec<f32> = chunk
                        .iter()
                        .flat_map(|r| {
                            let seed = r.seed.wrapping_add(draws.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                            seeded_noise(seed, n)
                        })
                        .collect();
                    Tensor::<4>::from_data(TensorData::new(values, batch_shape), &device)
                };
                latents = scheduler.step(noise_pred, latents, &mut noise)?;
                if let Some(report) = on_step.as_mut() {
                    sync(&device)?;
                    passes.0 += 1;
                    report(passes.0, passes.1);
                }
            }
            let [_, c, h, w] = latents.dims();
            for i in 0..k {
                all_latents.push(latents.clone().slice([i..i + 1, 0..c, 0..h, 0..w]));
            }
        }
        sync(&device)?;
        if !self.residency.unet {
            self.unet = None;
        }
        let denoise_ms = start.elapsed().as_secs_f64() * 1e3;
        peak_mib.extend(peak(&device).map(|m| ("unet".to_string(), m)));

        // Stage 3: decode to 8-bit RGB as diffusers' image processor does.
        let start = std::time::Instant::now();
        if self.decoder.is_none() {
            self.decoder = Some(match &opts.taesd {
                Some(tiny) => Decoder::Tiny(TinyDecoder::load(tiny, &device)?),
                None => Decoder::Vae(Box::new(VaeDecoder::load(&self.dir.join("vae"), &device)?)),
            });
        }
        let decoder = self.decoder.as_ref().expect("loaded above");
        let mut images = Vec::with_capacity(all_latents.len());
        for latents in all_latents {
            images.push(decoder.decode_rgb8(latents, self.latent_factor, &device)?);
        }
        if !self.residency.decoder {
            self.decoder = None;
        }
        let decode_ms = start.elapsed().as_secs_f64() * 1e3;
        peak_mib.extend(peak(&device).map(|m| ("decoder".to_string(), m)));
        Ok(BatchOutput {
            images,
            timesteps,
            encode_ms,
            denoise_ms,
            decode_ms,
            peak_mib,
        })
    }
}

/// The most images one UNet pass takes without a tensor past the device's limit.
fn unet_batch_limit(config: &UNetConfig, cfg: bool, latent: &[usize; 4], max_bytes: Option<u64>) -> usize {
    let per_image = config.largest_tensor_bytes(if cfg { 2 } else { 1 }, latent[2], latent[3]);
    max_bytes.map_or(usize::MAX, |m| ((m / per_image.max(1)) as usize).max(1))
}

/// Refuses up front a size this device cannot generate: the UNet's largest activation must fit
/// one binding (its feed-forward is chunked, the rest is not split) and its convolutions one
/// dispatch, and the decoder must fit at least in tiles. Names the limit and the largest square
/// size that works.
fn check_fits(dir: &Path, settings: &GenerateOptions, factor: usize, device: &Device) -> Result<(), ModelError> {
    let max_bytes = divergen_kernels::device::max_tensor_bytes(device);
    let max_pixels = divergen_kernels::conv::max_output_pixels(device);
    if max_bytes.is_none() && max_pixels.is_none() {
        return Ok(());
    }
    let unet = UNetConfig::from_file(&dir.join("unet").join("config.json"))?;
    let batch = if settings.guidance > 1.0 { 2 } else { 1 };
    let need = |w: usize, h: usize| unet.largest_tensor_bytes(batch, h / factor, w / factor);
    let fits = |w: usize, h: usize| {
        max_bytes.is_none_or(|m| need(w, h) <= m) && max_pixels.is_none_or(|m| (w / factor) * (h / factor) <= m)
    };
    let (w, h) = (settings.width, settings.height);
    if !fits(w, h) {
        let unit = factor << (unet.block_out_channels.len() - 1);
        let side = (1..=w.max(h) / unit).rev().map(|k| k * unit).find(|&s| fits(s, s));
        let largest = side.map_or("no size".to_string(), |s| format!("at most {s}x{s}"));
        let why = match max_bytes {
            Some(m) if need(w, h) > m => format!(
                "the UNet's largest activation would take {} MiB, more than the {} MiB this device holds per tensor",
                mib(need(w, h)),
                mib(m)
            ),
            _ => "the UNet's convolutions would need more than one dispatch's 65,535 workgroups".to_string(),
        };
        return Err(ModelError(format!("size {w}x{h}: {why}; {largest} here")));
    }
    DecoderLimits::of(dir, settings.taesd.as_deref())?.tiling(1, h / factor, w / factor, factor, device)?;
    Ok(())
}

/// A host image in [-1, 1] → 8-bit RGB, with the same arithmetic as [`to_rgb8`].
fn host_to_rgb8(image: &HostImage) -> Result<RgbImage, ModelError> {
    let [_, _, h, w] = image.shape;
    let plane = h * w;
    let rgb: Vec<u8> = (0..plane)
        .flat_map(|i| (0..3).map(move |c| (i, c)))
        .map(|(i, c)| ((image.data[c * plane + i] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| ModelError("image size mismatch".into()))
}

fn to_rgb8(image: Tensor<4>) -> Result<RgbImage, ModelError> {
    let [_, _, h, w] = image.dims();
    let pixels = (image / 2.0 + 0.5).clamp(0.0, 1.0).into_data();
    let pixels: Vec<f32> = pixels
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError(format!("reading the image back: {e:?}")))?;
    let plane = h * w;
    let rgb: Vec<u8> = (0..plane)
        .flat_map(|i| (0..3).map(move |c| (i, c)))
        .map(|(i, c)| (pixels[c * plane + i] * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| ModelError("image size mismatch".into()))
}

/// One image with the single-image memory plan: each model loaded for its stage, then freed.
pub fn generate(dir: &Path, opts: &GenerateOptions, device: &Device) -> Result<Generated, ModelError> {
    generate_observed(dir, opts, device, None)
}

/// [`generate`], reporting each denoising step as [`StableDiffusion::generate_observed`] does.
pub fn generate_observed(
    dir: &Path,
    opts: &GenerateOptions,
    device: &Device,
    on_step: Option<&mut dyn FnMut(usize, usize)>,
) -> Result<Generated, ModelError> {
    let mut sd = StableDiffusion::open(dir, opts, device)?;
    let mut out = sd.generate_observed(
        &[Request {
            prompt: opts.prompt.clone(),
            negative_prompt: opts.negative_prompt.clone(),
            seed: opts.seed,
            latents: opts.latents.clone(),
        }],
        on_step,
    )?;
    let image = out
        .images
        .pop()
        .ok_or_else(|| ModelError("no image generated".into()))?;
    Ok(Generated {
        image,
        timesteps: out.timesteps,
        encode_ms: out.encode_ms,
        denoise_ms: out.denoise_ms,
        decode_ms: out.decode_ms,
        peak_mib: out.peak_mib,
    })
}

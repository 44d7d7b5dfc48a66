//! `divergen bench models`: the real models at full size (random weights from the recipe) on a
//! device, in f32, int8 and int4: CLIP ViT-B/32 image embeddings per second, SAM ViT-B and
//! MobileSAM encoder and decoder milliseconds, SD-Turbo's UNet step and the VAE/TAESD decodes,
//! weights and peak device memory.

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::clip::{Clip, ClipConfig};
use crate::diffusion::taesd::{AutoencoderTinyConfig, TinyDecoder};
use crate::diffusion::tiling::{Tiling, decode_tiled};
use crate::diffusion::unet::{PerBlock, UNet, UNetConfig};
use crate::diffusion::vae::{AutoencoderKlConfig, VaeDecoder};
use crate::error::ModelError;
use crate::layers::Quantization;
use crate::sam::{Point, PointLabel, Prompt, Sam, SamConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchModel {
    ClipVitB32,
    SamVitB,
    MobileSam,
    /// SD-Turbo's UNet (SD 2.1-base shapes), one step without guidance.
    SdTurboUnet,
    /// Stable Diffusion's VAE decoder (f32 only).
    SdVae,
    /// TAESD, the fast decoder (f32 only).
    Taesd,
}

impl BenchModel {
    pub const ALL: [BenchModel; 6] = [
        BenchModel::ClipVitB32,
        BenchModel::SamVitB,
        BenchModel::MobileSam,
        BenchModel::SdTurboUnet,
        BenchModel::SdVae,
        BenchModel::Taesd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BenchModel::ClipVitB32 => "clip-vit-b-32",
            BenchModel::SamVitB => "sam-vit-b",
            BenchModel::MobileSam => "mobile-sam",
            BenchModel::SdTurboUnet => "sd-turbo-unet",
            BenchModel::SdVae => "sd-vae",
            BenchModel::Taesd => "taesd",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelBenchCase {
    pub model: &'static str,
    pub quant: String,
    /// What one timed call does.
    pub stage: String,
    /// The first call (kernel compilation and autotuning included).
    pub first_ms: f64,
    /// Median of the timed calls.
    pub median_ms: f64,
    /// Items per second at the median (images for CLIP, prompts or images for SAM).
    pub per_second: f64,
    /// Linear-layer weights as loaded (after quantization).
    pub weights_mib: f64,
    /// Device memory the pool reserved by the end of the run (its high-water mark: pages are
    /// kept for reuse, not returned).
    pub peak_mib: Option<f64>,
}

pub struct ModelBenchOptions {
    pub models: Vec<BenchModel>,
    pub quants: Vec<Quantization>,
    /// Timed calls after the first.
    pub runs: usize,
    /// CLIP images per batch.
    pub clip_batch: usize,
    /// Image sides for the diffusion models (the latents are 1/8 of them).
    pub sd_sizes: Vec<usize>,
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn sync(device: &Device) -> Result<(), ModelError> {
    device
        .sync()
        .map_err(|e| ModelError(format!("device failed during the benchmark: {e:?}")))
}

/// First-call and median times (ms) of `op`, which must queue its work.
fn time<T>(device: &Device, runs: usize, mut op: impl FnMut() -> T) -> Result<(f64, f64), ModelError> {
    let start = Instant::now();
    drop(op());
    sync(device)?;
    let first = start.elapsed().as_secs_f64() * 1e3;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let out = op();
        sync(device)?;
        drop(out);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((first, times[times.len() / 2]))
}

/// The pool's high-water mark on a GPU; on the CPU engine, whose tensors live in the process's
/// own memory, the process's peak resident set since the case began.
fn peak_mib(device: &Device) -> Option<f64> {
    if *device == Device::flex() {
        return peak_resident_mib();
    }
    device
        .memory_pool_usage()
        .map(|u| u.bytes_reserved as f64 / (1 << 20) as f64)
}

fn peak_resident_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Starts a new peak for the next case ("5" to `clear_refs` resets `VmHWM`, Linux ≥ 4.0).
fn reset_peak_resident() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        log::debug!("could not reset the peak resident set: {e}");
    }
}

pub fn run(
    device: &Device,
    options: &ModelBenchOptions,
    mut on_case: impl FnMut(&ModelBenchCase),
) -> Result<Vec<ModelBenchCase>, ModelError> {
    let ckpt = Checkpoint::recipe();
    let mut cases = Vec::new();
    for &model in &options.models {
        for &quant in &options.quants {
            device.memory_cleanup();
            reset_peak_resident();
            // One timed stage: `items` per call, weights as loaded.
            let mut record = |stage: String, (first, median): (f64, f64), items: usize, weights: usize| {
                let case = ModelBenchCase {
                    model: model.name(),
                    quant: format!("{quant:?}").to_lowercase(),
                    stage,
                    first_ms: first,
                    median_ms: median,
                    per_second: items as f64 * 1e3 / median,
                    weights_mib: mib(weights),
                    peak_mib: peak_mib(device),
                };
                on_case(&case);
                cases.push(case);
            };
            match model {
                BenchModel::ClipVitB32 => {
                    let clip = Clip::from_checkpoint(ClipConfig::vit_b_32(), &ckpt, quant, device)?;
                    let n = options.clip_batch;
                    let size = clip.config.vision_config.image_size;
                    let pixels = bench_pixels([n, 3, size, size], device);
                    let timing = time(device, options.runs, || clip.vision.forward(pixels.clone()))?;
                    let stage = format!("vision tower, batch of {n} at {size}²");
                    record(stage, timing, n, clip.linear_bytes().0);
                }
                BenchModel::SdTurboUnet => {
                    let config = UNetConfig {
                        block_out_channels: vec![320, 640, 1280, 1280],
                        attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
                        cross_attention_dim: 1024,
                        use_linear_projection: true,
                        ..UNetConfig::default()
                    };
                    let unet = UNet::from_checkpoint(config, &ckpt, quant, device)?;
                    let context = bench_tensor::<3>([1, 77, 1024], device);
                    for &side in &options.sd_sizes {
                        let latents = bench_tensor::<4>([1, 4, side / 8, side / 8], device);
                        let timing = time(device, options.runs, || {
                            unet.forward(latents.clone(), &[999.0], context.clone())
                        })?;
                        record(
                            format!("one step at {side}² (latents {0}²)", side / 8),
                            timing,
                            1,
                            unet.weight_bytes().0,
                        );
                    }
                }
                BenchModel::SdVae | BenchModel::Taesd => {
                    if quant != Quantization::None {
                        continue; // the decoders stay f32
                    }
                    for &side in &options.sd_sizes {
                        let latents = bench_tensor::<4>([1, 4, side / 8, side / 8], device);
                        let (vae, taesd) = if model == BenchModel::SdVae {
                            (Some(VaeDecoder::from_checkpoint(sd_vae_config(), &ckpt, device)?), None)
                        } else {
                            let config = AutoencoderTinyConfig::default();
                            (None, Some(TinyDecoder::from_checkpoint(config, &ckpt, device)?))
                        };
                        let decode = |z: Tensor<4>| match (&vae, &taesd) {
                            (Some(v), _) => v.decode(z),
                            (_, Some(t)) => t.decode(z),
                            _ => unreachable!("one decoder is built above"),
                        };
                        let largest = |cells: usize| match (&vae, &taesd) {
                            (Some(v), _) => v.config.largest_tensor_bytes(1, cells, cells),
                            (_, Some(t)) => t.config.largest_tensor_bytes(1, cells, cells),
                            _ => unreachable!("one decoder is built above"),
                        };
                        // What the pipeline does: whole where every tensor fits one binding,
                        // else in the largest tiles that fit (a whole decode past the limit
                        // would time dispatches the driver refuses).
                        let limit = divergen_kernels::device::max_tensor_bytes(device);
                        let tiling = limit
                            .filter(|&m| largest(side / 8) > m)
                            .map(|m| Tiling::largest_fitting(8, side / 8, |cells| largest(cells) <= m));
                        let (stage, timing) = match tiling {
                            None => (
                                format!("decode to {side}²"),
                                time(device, options.runs, || decode(latents.clone()))?,
                            ),
                            Some(None) => continue,
                            Some(Some(tiling)) => (
                                format!("decode to {side}² in tiles of {} cells", tiling.latent_tile),
                                time(device, options.runs, || decode_tiled(latents.clone(), tiling, decode))?,
                            ),
                        };
                        record(stage, timing, 1, 0);
                    }
                }
                BenchModel::SamVitB | BenchModel::MobileSam => {
                    let config = if model == BenchModel::SamVitB {
                        SamConfig::vit_b()
                    } else {
                        SamConfig::mobile_sam()
                    };
                    let sam = Sam::from_checkpoint(config, &ckpt, quant, device)?;
                    let size = sam.config.encoder.img_size();
                    let pixels = bench_pixels([1, 3, size, size], device);
                    let weights = sam.linear_bytes().0;
                    let timing = time(device, options.runs, || {
                        sam.embed_pixels(pixels.clone(), (size, size), (size, size)).embedding
                    })?;
                    record(format!("image encoder at {size}²"), timing, 1, weights);
                    let embedded = sam.embed_pixels(pixels.clone(), (size, size), (size, size));
                    // DiverGen's prompt: the four corners, three masks. Mask logits come back to
                    // the host (the pipeline reads them), full-size post-processing excluded.
                    let corner = (size - 1) as f32;
                    let prompt = Prompt {
                        points: [(0.0, 0.0), (corner, 0.0), (0.0, corner), (corner, corner)]
                            .iter()
                            .map(|&(x, y)| Point {
                                x,
                                y,
                                label: PointLabel::Foreground,
                            })
                            .collect(),
                        ..Default::default()
                    };
                    let timing = time(device, options.runs.max(3), || sam.decode(&embedded, &prompt, true))?;
                    record("mask decoder, 4 points, 3 masks".into(), timing, 1, weights);
                }
            }
        }
    }
    Ok(cases)
}

fn bench_pixels(shape: [usize; 4], device: &Device) -> Tensor<4> {
    bench_tensor(shape, device)
}

fn bench_tensor<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    let values = crate::recipe::values("bench_pixels", shape.iter().product(), 2.0, 0.0);
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Stable Diffusion 1.x/2.x's VAE (`vae/config.json` of the published pipelines).
fn sd_vae_config() -> AutoencoderKlConfig {
    AutoencoderKlConfig {
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        ..AutoencoderKlConfig::default()
    }
}

pub fn markdown(cases: &[ModelBenchCase]) -> String {
    let mut s = String::from(
        "| model | weights | stage | first call ms | median ms | per second | linear weights MiB | peak reserved MiB |\n|---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for c in cases {
        s += &format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.1} | {} |\n",
            c.model,
            c.quant,
            c.stage,
            c.first_ms,
            c.median_ms,
            c.per_second,
            c.weights_mib,
            c.peak_mib.map_or("–".into(), |m| format!("{m:.0}"))
        );
    }
    s
}

//! `divergen-train generator`: the embedded default's tiny Stable Diffusion. Phase 1 trains an
//! `AutoencoderKL` on fresh white-background renders; phase 2 trains a `UNet2DConditionModel`
//! on their latents, conditioned on the tiny CLIP's text tower exactly as the pipeline will
//! condition it (the folder's own `text_encoder/` and `tokenizer/`, through our loader).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use clap::Args;
use divergen_kernels::device::{DeviceRequest, open};
use divergen_models::clip::ClipTextModel;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::layers::Quantization;
use divergen_runtime::domain::shapes::SHAPES;
use divergen_runtime::pipeline::mix_seed;
use divergen_runtime::{Error, Result};
use divergen_train::corpus::{caption_variants, fresh_render};
use divergen_train::diffusion::{
    TinyUnet, TinyUnetConfig, TinyVae, TinyVaeConfig, alphas_cumprod, write_pipeline_files,
};
use divergen_train::eval;
use divergen_train::{StateDict, by_tenth, learning_rate, scalar};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Args, Debug)]
pub struct TrainGeneratorArgs {
    /// A folder written by `divergen domain` (category names and definitions).
    #[arg(long, default_value = "divergen-domain")]
    pub domain: PathBuf,
    /// The CLIP folder whose text tower and tokenizer condition the UNet.
    #[arg(long, default_value = "runtime/default/tiny-clip")]
    pub clip: PathBuf,
    /// Output: a diffusers StableDiffusionPipeline folder.
    #[arg(long, default_value = "tiny-sd")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1500)]
    pub vae_steps: usize,
    #[arg(long, default_value_t = 16)]
    pub vae_batch: usize,
    #[arg(long, default_value_t = 3000)]
    pub unet_steps: usize,
    #[arg(long, default_value_t = 32)]
    pub unet_batch: usize,
    /// Renders encoded once after the VAE phase, that the UNet's batches are drawn from.
    #[arg(long, default_value_t = 4096)]
    pub latent_set: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Min-SNR-γ loss weighting for the UNet; 0 trains on plain ε MSE.
    #[arg(long, default_value_t = 0.0)]
    pub min_snr_gamma: f64,
    /// Decay of an exponential moving average of the UNet's weights; `unet/` then holds the
    /// average and `unet-raw/` the last step's weights. 0 keeps no average.
    #[arg(long, default_value_t = 0.0)]
    pub ema_decay: f32,
    /// A folder an earlier `divergen-train generator` wrote: its VAE is kept (phase 1 is skipped) and its
    /// UNet trains `--unet-steps` further. May be `--out` itself.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// Images per side: the domain's renders.
const SIDE: u32 = 64;

pub fn vae_config() -> TinyVaeConfig {
    TinyVaeConfig {
        block_out_channels: vec![16, 32, 32],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        sample_size: SIDE as usize,
    }
}

pub fn unet_config(cross_attention_dim: usize) -> TinyUnetConfig {
    TinyUnetConfig {
        block_out_channels: vec![32, 64],
        layers_per_block: 1,
        norm_num_groups: 8,
        heads: 4,
        cross_attention_dim,
        in_channels: 4,
        sample_size: SIDE as usize / 4,
    }
}

/// `[3, S, S]` in [-1, 1], diffusers' image convention.
fn to_unit(img: &image::RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// A training render and the captions it may be paired with: the bank-style caption, shorter
/// variants that keep the name, and DiverGen's template with the definition.
fn draw(seed: u64, step: usize, item: usize, categories: &[eval::CatInfo]) -> (Vec<f32>, Vec<String>) {
    let mut rng = StdRng::seed_from_u64(mix_seed(seed ^ 0x6765_6e00, step as u64, item as u64));
    let (k, img, record) = fresh_render(&mut rng, SIDE);
    let c = &categories[k];
    let mut captions = caption_variants(&record, &c.name);
    captions.push(format!(
        "a photo of a single {}, {}, in a white background",
        c.name.replace('_', " "),
        c.def
    ));
    (to_unit(&img), captions)
}

fn batch_tensor(images: Vec<Vec<f32>>, device: &Device) -> Tensor<4> {
    let n = images.len();
    let s = SIDE as usize;
    Tensor::from_data(
        TensorData::new(images.into_iter().flatten().collect::<Vec<_>>(), [n, 3, s, s]),
        device,
    )
}

/// The `text_config` of a `CLIPModel` folder.
fn text_config(clip: &Path) -> Result<serde_json::Value> {
    let config_path = clip.join("config.json");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).map_err(|e| format!("{}: {e}", config_path.display()))?)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
    config.get("text_config").cloned().ok_or_else(|| {
        format!(
            "{}: no text_config (a CLIPModel folder is expected)",
            config_path.display()
        )
        .into()
    })
}

/// The text tower's width: the UNet's `cross_attention_dim`.
fn text_hidden_size(clip: &Path) -> Result<usize> {
    hidden_size(&text_config(clip)?, clip)
}

fn hidden_size(text_config: &serde_json::Value, clip: &Path) -> Result<usize> {
    text_config["hidden_size"].as_u64().map(|h| h as usize).ok_or_else(|| {
        format!(
            "{}: text_config.hidden_size missing",
            clip.join("config.json").display()
        )
        .into()
    })
}

/// The CLIP folder's text tower as a `CLIPTextModel` folder, and its tokenizer.
fn write_text_encoder(clip: &Path, out: &Path) -> Result<usize> {
    let mut text = text_config(clip)?;
    text["architectures"] = serde_json::json!(["CLIPTextModel"]);
    text["model_type"] = serde_json::json!("clip_text_model");
    let hidden = hidden_size(&text, clip)?;
    let dir = out.join("text_encoder");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&text)?)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let weights = clip.join("model.safetensors");
    let bytes = std::fs::read(&weights).map_err(|e| format!("{}: {e}", weights.display()))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e:?}", weights.display()))?;
    let kept: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.starts_with("text_model."))
        .collect();
    let target = dir.join("model.safetensors");
    divergen_models::checkpoint::write_safetensors(kept, &target)?;
    let tokenizer = ClipTokenizer::from_dir(clip).map_err(|e| format!("{}: {e}", clip.display()))?;
    let tokenizer_dir = out.join("tokenizer");
    std::fs::create_dir_all(&tokenizer_dir).map_err(|e| format!("{}: {e}", tokenizer_dir.display()))?;
    tokenizer
        .save_hf(&tokenizer_dir)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(hidden)
}

/// `request` is the CLI's (`--adapter`, `--backend`, `--limits`): the pipeline's text encoder
/// runs there, as it will at generation time. It is opened first, so a wrong flag fails before
/// any training.
pub fn train_generator(request: &DeviceRequest, args: &TrainGeneratorArgs) -> Result<()> {
    use burn::optim::{AdamConfig, GradientsParams};
    let text_device = open(request)?;
    let device = Device::flex().autodiff();
    device.seed(args.seed);
    let vcfg = vae_config();
    if !(0.0..1.0).contains(&args.ema_decay) {
        return Err(format!("--ema-decay {} is outside [0, 1)", args.ema_decay).into());
    }
    // Read before anything is written, so a bad --resume folder leaves --out untouched.
    let earlier = match &args.resume {
        Some(dir) => Some(Resumed::read(dir, &vcfg, &args.clip, &device)?),
        None => None,
    };
    let categories = eval::read_categories(&args.domain)?;
    if categories.len() != SHAPES.len() {
        return Err(format!(
            "{}: {} categories, the procedural domain has {}",
            args.domain.display(),
            categories.len(),
            SHAPES.len()
        )
        .into());
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let hidden = write_text_encoder(&args.clip, &args.out)?;
    write_pipeline_files(&args.out)?;

    // Phase 1: the autoencoder, or the one a resumed run trained.
    let vae_dir = args.out.join("vae");
    let (vae, scaling, vae_record) = match &earlier {
        Some(r) => (r.vae.clone(), r.scaling, r.record["vae"].clone()),
        None => train_vae(args, &vcfg, &categories, &device)?,
    };
    vae.save(&vae_dir, scaling)?;
    // From here the VAE is frozen: its encoder runs on the plain device (on the autodiff one,
    // every encode would keep a graph alive: 4,096 renders filled 24 GB).
    let plain = Device::flex();
    let encoder = vae.valid();

    // Phase 2: the UNet, conditioned through the pipeline's own text encoder.
    let text_encoder =
        ClipTextModel::load_text_encoder(&args.out.join("text_encoder"), Quantization::None, &text_device.device)?;
    let tokenizer = ClipTokenizer::from_dir(&args.out.join("tokenizer"))?;
    let ucfg = unet_config(hidden);
    let (prior_steps, prior_seconds) = earlier.as_ref().map_or((0, 0.0), Resumed::unet_totals);
    let mut unet = match &earlier {
        Some(r) => {
            log::info!("resuming the UNet after {prior_steps} steps");
            r.unet.clone()
        }
        None => TinyUnet::new(&ucfg, &device),
    };
    // A resumed run draws other renders, noise and batches than the run it continues; a fresh
    // run keeps the seeds the shipped weights were trained with.
    let unet_seed = if earlier.is_some() {
        let seed = mix_seed(args.seed, prior_steps as u64, 0x756e);
        device.seed(seed);
        seed
    } else {
        args.seed
    };
    let mut rng = StdRng::seed_from_u64(unet_seed);
    let alphas = alphas_cumprod();
    let start = std::time::Instant::now();
    let mut unet_losses = Vec::new();
    let bar = indicatif::ProgressBar::new(args.unet_steps as u64);
    let mut optimizer = AdamConfig::new().init();
    // The average starts from the weights training starts from: a resumed run's are already good.
    let mut ema = if args.ema_decay > 0.0 {
        Some(unet.state_dict()?)
    } else {
        None
    };
    let save = |unet: &TinyUnet, ema: &Option<StateDict>| -> Result<()> {
        match ema {
            Some(average) => {
                unet.save_weights(&args.out.join("unet"), average)?;
                Ok(unet.save(&args.out.join("unet-raw"))?)
            }
            None => Ok(unet.save(&args.out.join("unet"))?),
        }
    };
    // Encode a fixed set of fresh renders once (the encoder costs as much per image as a UNet
    // step), then draw batches from it.
    let encode_start = std::time::Instant::now();
    let mut set: Vec<(Vec<f32>, Vec<String>)> = Vec::with_capacity(args.latent_set);
    for chunk in 0..args.latent_set.div_ceil(64) {
        let drawn: Vec<(Vec<f32>, Vec<String>)> = (0..64.min(args.latent_set - chunk * 64))
            .map(|i| draw(unet_seed ^ 2, chunk, i, &categories))
            .collect();
        let n = drawn.len();
        let (images, captions): (Vec<_>, Vec<_>) = drawn.into_iter().unzip();
        let (mean, _) = encoder.encode(batch_tensor(images, &plain));
        let [_, c, h, w] = mean.dims();
        let values: Vec<f32> = (mean * scaling as f64)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        let per = c * h * w;
        for (i, captions) in captions.into_iter().enumerate().take(n) {
            set.push((values[i * per..(i + 1) * per].to_vec(), captions));
        }
    }
    log::info!(
        "encoded {} renders to latents in {:.0} s",
        set.len(),
        encode_start.elapsed().as_secs_f64()
    );
    let latent_side = SIDE as usize / vcfg.scale_factor();
    for step in 0..args.unet_steps {
        let picked: Vec<&(Vec<f32>, Vec<String>)> = (0..args.unet_batch)
            .map(|_| &set[rng.random_range(0..set.len())])
            .collect();
        // 10 % empty captions: the unconditional branch of classifier-free guidance.
        let texts: Vec<String> = picked
            .iter()
            .map(|(_, c)| {
                if rng.random_bool(0.1) {
                    String::new()
                } else {
                    c[rng.random_range(0..c.len())].clone()
                }
            })
            .collect();
        let pad = tokenizer.end_id();
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode_padded(t, pad).0).collect();
        let context = text_encoder.hidden_states(&ids, 0)?;
        let dims = context.dims();
        let context: Vec<f32> = context
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        let context = Tensor::<3>::from_data(TensorData::new(context, dims), &device);
        let latents: Vec<f32> = picked.iter().flat_map(|(l, _)| l.iter().copied()).collect();
        let z = Tensor::<4>::from_data(
            TensorData::new(latents, [picked.len(), vcfg.latent_channels, latent_side, latent_side]),
            &device,
        );
        let n = args.unet_batch;
        let t: Vec<usize> = (0..n).map(|_| rng.random_range(0..alphas.len())).collect();
        let [_, c, h, w] = z.dims();
        let coef = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = t.iter().map(|&t| f(alphas[t]) as f32).collect();
            Tensor::<4>::from_data(TensorData::new(v, [n, 1, 1, 1]), &device)
        };
        let noise = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &device);
        let noisy = z * coef(&|a| a.sqrt()) + noise.clone() * coef(&|a| (1.0 - a).sqrt());
        let steps: Vec<f32> = t.iter().map(|&t| t as f32).collect();
        let pred = unet.forward(noisy, &steps, context);
        let squared = (pred - noise).powf_scalar(2.0);
        // Logged unweighted, so runs with and without min-SNR compare.
        let value = scalar(&squared.clone().mean());
        let loss = if args.min_snr_gamma > 0.0 {
            // Min-SNR-γ (Hang et al. 2023): nearly clean steps, whose ε is easy and whose
            // gradients otherwise dominate, weigh min(SNR, γ) / SNR.
            let gamma = args.min_snr_gamma;
            let per_image = squared.mean_dim(1).mean_dim(2).mean_dim(3);
            (per_image
                * coef(&|a| {
                    let snr = a / (1.0 - a);
                    snr.min(gamma) / snr
                }))
            .mean()
        } else {
            squared.mean()
        };
        unet_losses.push(value);
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("UNet loss {value:.4}"));
        if step % 50 == 0 {
            log::info!("UNet step {step}: loss {value:.5}");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &unet);
        unet = optimizer.step(learning_rate(args.lr, step, args.unet_steps), unet, grads);
        if let Some(average) = ema.as_mut() {
            let now = unet.state_dict()?;
            average.blend_toward(&now, args.ema_decay)?;
        }
        if (step + 1) % 500 == 0 {
            save(&unet, &ema)?;
        }
    }
    bar.finish_and_clear();
    let unet_seconds = start.elapsed().as_secs_f64();
    save(&unet, &ema)?;
    let record = serde_json::json!({
        "vae": vae_record,
        "unet": {"config": ucfg, "steps": args.unet_steps, "batch": args.unet_batch, "seconds": unet_seconds,
                 "loss_by_tenth": by_tenth(&unet_losses), "lr": args.lr, "min_snr_gamma": args.min_snr_gamma, "ema_decay": args.ema_decay,
                 "total_steps": prior_steps + args.unet_steps, "total_seconds": prior_seconds + unet_seconds,
                 "resumed_from": earlier.as_ref().map(|r| r.record["unet"].clone())},
        "lr": args.lr, "seed": args.seed, "clip": args.clip,
    });
    let path = args.out.join("training.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&record)?).map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "UNet → {} in {unet_seconds:.0} s; loss by tenth {:?}",
        args.out.display(),
        by_tenth(&unet_losses)
            .iter()
            .map(|l| (l * 1e4).round() / 1e4)
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// Phase 1: the VAE on fresh renders (MSE + a small KL term), and diffusers' scaling factor
/// (1 / std of its latents).
fn train_vae(
    args: &TrainGeneratorArgs,
    vcfg: &TinyVaeConfig,
    categories: &[eval::CatInfo],
    device: &Device,
) -> Result<(TinyVae, f32, serde_json::Value)> {
    use burn::optim::{AdamConfig, GradientsParams};
    let start = std::time::Instant::now();
    let mut vae = TinyVae::new(vcfg, device);
    let mut vae_losses = Vec::new();
    let bar = indicatif::ProgressBar::new(args.vae_steps as u64);
    let mut optimizer = AdamConfig::new().init();
    for step in 0..args.vae_steps {
        let images: Vec<Vec<f32>> = (0..args.vae_batch)
            .map(|i| draw(args.seed, step, i, categories).0)
            .collect();
        let x = batch_tensor(images, device);
        let (mean, logvar) = vae.encode(x.clone());
        let std = (logvar.clone() * 0.5).exp();
        let z = mean.clone() + std.clone() * Tensor::random(mean.dims(), Distribution::Normal(0.0, 1.0), device);
        let recon = vae.decode(z);
        let mse = (recon - x).powf_scalar(2.0).mean();
        let kl = ((mean.powf_scalar(2.0) + logvar.clone().exp() - logvar - 1.0) * 0.5).mean();
        let loss = mse.clone() + kl * 1e-4;
        let value = scalar(&mse);
        vae_losses.push(value);
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("VAE mse {value:.4}"));
        if step % 50 == 0 {
            log::info!("VAE step {step}: mse {value:.5}");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &vae);
        vae = optimizer.step(learning_rate(args.lr, step, args.vae_steps), vae, grads);
    }
    bar.finish_and_clear();
    let vae_seconds = start.elapsed().as_secs_f64();
    let plain = Device::flex();
    let encoder = vae.valid();
    // diffusers' scaling factor: 1 / std of the latents, measured on fresh renders.
    let probe: Vec<Vec<f32>> = (0..64)
        .map(|i| draw(args.seed ^ 1, usize::MAX / 2, i, categories).0)
        .collect();
    let (mean, _) = encoder.encode(batch_tensor(probe, &plain));
    let latents: Vec<f32> = mean
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    let mu = latents.iter().map(|&v| v as f64).sum::<f64>() / latents.len() as f64;
    let var = latents.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / latents.len() as f64;
    let scaling = (1.0 / var.sqrt()) as f32;
    println!(
        "VAE trained in {vae_seconds:.0} s; MSE by tenth {:?}; scaling factor {scaling:.4}",
        by_tenth(&vae_losses)
            .iter()
            .map(|l| (l * 1e4).round() / 1e4)
            .collect::<Vec<_>>()
    );
    let record = serde_json::json!({"config": vcfg, "steps": args.vae_steps, "batch": args.vae_batch,
        "seconds": vae_seconds, "mse_by_tenth": by_tenth(&vae_losses), "scaling_factor": scaling});
    Ok((vae, scaling, record))
}

/// What `--resume` continues from: the earlier folder's VAE, its scaling factor, its UNet and
/// its training record.
struct Resumed {
    vae: TinyVae,
    scaling: f32,
    unet: TinyUnet,
    record: serde_json::Value,
}

impl Resumed {
    fn read(dir: &Path, vcfg: &TinyVaeConfig, clip: &Path, device: &Device) -> Result<Self> {
        let read_json = |path: &Path| -> Result<serde_json::Value> {
            let bytes = std::fs::read(path).map_err(Error::io(path))?;
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()).into())
        };
        let record = read_json(&dir.join("training.json"))?;
        let config_path = dir.join("vae/config.json");
        let scaling = read_json(&config_path)?["scaling_factor"]
            .as_f64()
            .ok_or_else(|| format!("{}: no scaling_factor", config_path.display()))? as f32;
        let vae = TinyVae::new(vcfg, device).load(&dir.join("vae"))?;
        let unet = TinyUnet::new(&unet_config(text_hidden_size(clip)?), device).load(&dir.join("unet"))?;
        Ok(Resumed {
            vae,
            scaling,
            unet,
            record,
        })
    }

    /// UNet steps and seconds spent before this run, over every earlier resume.
    fn unet_totals(&self) -> (usize, f64) {
        let unet = &self.record["unet"];
        let steps = unet["total_steps"].as_u64().or(unet["steps"].as_u64()).unwrap_or(0) as usize;
        let seconds = unet["total_seconds"]
            .as_f64()
            .or(unet["seconds"].as_f64())
            .unwrap_or(0.0);
        (steps, seconds)
    }
}

//! `divergen generate`: one image from a diffusers Stable Diffusion folder.

use std::path::PathBuf;

use clap::Args;
use divergen_kernels::device::{DeviceRequest, open};
use divergen_models::diffusion::pipeline::{GenerateOptions, generate_observed, latent_factor, read_latents};
use divergen_models::diffusion::scheduler::SchedulerKind;
use divergen_models::layers::Quantization;
use divergen_runtime::Result;

use divergen_runtime::cli::QuantArg;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers Stable Diffusion folder (model_index.json, tokenizer/, text_encoder/, unet/,
    /// vae/, scheduler/), e.g. a local copy of stabilityai/sd-turbo.
    #[arg(long)]
    pub diffusion: PathBuf,
    /// What to draw, e.g. "a photo of a single mug, in a white background".
    #[arg(long)]
    pub prompt: String,
    /// The negative prompt (used when --guidance > 1).
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Denoising steps (1 for SD-Turbo; at most the schedule's training timesteps).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale, finite and ≥ 0; 0 or 1 turns it off (SD-Turbo: --steps 1
    /// --guidance 0).
    #[arg(long, default_value_t = 7.5, value_parser = parse_guidance, allow_negative_numbers = true)]
    pub guidance: f32,
    /// ddim, euler, euler-a, dpm++2m or lcm (default: the folder's scheduler).
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Seed of the initial noise (ignored with --latents).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial latents (.npy, f32, [1, 4, H/8, W/8]) instead of seeded noise, e.g. the ones a
    /// diffusers run started from.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// WxH, multiples of 8.
    #[arg(long, default_value = "512x512", value_parser = parse_size)]
    pub size: (usize, usize),
    /// Weight-only quantization of the UNet and text encoder (the VAE stays f32).
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    /// Text-encoder layers to skip from the end (1 = the penultimate layer).
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// Decode with this AutoencoderTiny (TAESD) folder instead of the pipeline's VAE.
    #[arg(long)]
    pub taesd: Option<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Print timings, timesteps and memory as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    SchedulerKind::parse(s).ok_or_else(|| format!("unknown scheduler {s:?} (ddim, euler, euler-a, dpm++2m, lcm)"))
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("size {s:?}: expected WxH"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("size {s:?}: {v:?} is not a number"))
    };
    let (w, h) = (parse(w)?, parse(h)?);
    if w == 0 || h == 0 || !w.is_multiple_of(8) || !h.is_multiple_of(8) {
        return Err(format!("size {s:?}: width and height must be positive multiples of 8").into());
    }
    Ok((w, h))
}

fn parse_guidance(s: &str) -> Result<f32> {
    let g: f32 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    divergen_models::diffusion::mix::check_guidance(g)?;
    Ok(g)
}

pub fn run(request: &DeviceRequest, args: &GenerateArgs) -> Result<()> {
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let (width, height) = args.size;
    let latents = match &args.latents {
        Some(path) => {
            let f = latent_factor(&args.diffusion, args.taesd.as_deref())?;
            Some(read_latents(path, [1, 4, height / f, width / f])?)
        }
        None => None,
    };
    let device = open(request)?;
    log::info!("generating on {}", device.describe());
    let options = GenerateOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler,
        seed: args.seed,
        latents,
        width,
        height,
        quant: Quantization::from(args.quant),
        clip_skip: args.clip_skip,
        taesd: args.taesd.clone(),
    };
    let progress = divergen_runtime::progress::Progress::new("denoise", args.steps as u64);
    let out = generate_observed(
        &args.diffusion,
        &options,
        &device.device,
        Some(&mut |done, total| {
            progress.set_message(format!("{width}x{height}"));
            progress.set_position(done as u64 * args.steps as u64 / total.max(1) as u64);
        }),
    )?;
    progress.finish();
    crate::png::write_atomically(&image::DynamicImage::ImageRgb8(out.image), &args.out)?;
    if args.json {
        let peaks: serde_json::Map<String, serde_json::Value> =
            out.peak_mib.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
        let json = serde_json::json!({
            "out": args.out,
            "width": width,
            "height": height,
            "timesteps": out.timesteps,
            "encode_ms": out.encode_ms,
            "denoise_ms": out.denoise_ms,
            "decode_ms": out.decode_ms,
            "peak_mib": peaks,
        });
        println!("{}", serde_json::to_string(&json)?);
    } else {
        println!(
            "{}: {width}x{height}, {} steps; text {:.0} ms, denoise {:.0} ms, decode {:.0} ms",
            args.out.display(),
            out.timesteps.len(),
            out.encode_ms,
            out.denoise_ms,
            out.decode_ms
        );
    }
    Ok(())
}

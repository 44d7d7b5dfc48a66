//! `divergen-train eval …`: the embedded default's tiny models measured on the procedural domain's
//! held-out data, through the pipeline's own loaders.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use divergen_kernels::device::{DeviceRequest, open};
use divergen_runtime::Result;
use divergen_train::eval;

use divergen_runtime::cli::QuantArg;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Zero-shot accuracy of a CLIP folder on the domain's held-out renders.
    Clip(EvalClipArgs),
    /// Mask IoU of a SAM checkpoint on the held-out renders (4-corner background prompt) and
    /// scene instances (box prompt).
    Sam(EvalSamArgs),
    /// Generated instances recognised as their prompted category by the CLIP, and their
    /// within-category diversity next to the real renders'.
    Generator(EvalGeneratorArgs),
}

#[derive(Args, Debug)]
pub struct EvalGeneratorArgs {
    #[arg(long, default_value = "divergen-domain")]
    pub domain: PathBuf,
    /// A diffusers StableDiffusionPipeline folder.
    #[arg(long, default_value = "tiny-sd")]
    pub generator: PathBuf,
    #[arg(long, default_value = "runtime/default/tiny-clip")]
    pub clip: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub per_category: usize,
    /// Defaults: the embedded default's first generator (`runtime/default/run.toml`).
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Write the generated images here.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// The UNet's and text encoder's weights (the VAE stays f32).
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalSamArgs {
    #[arg(long, default_value = "divergen-domain")]
    pub domain: PathBuf,
    #[arg(long, default_value = "tiny-sam/model.safetensors")]
    pub sam: PathBuf,
    /// Evaluate every n-th render and scene only.
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalClipArgs {
    #[arg(long, default_value = "divergen-domain")]
    pub domain: PathBuf,
    #[arg(long, default_value = "tiny-clip")]
    pub clip: PathBuf,
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    #[arg(long)]
    pub json: bool,
}

pub fn run(request: &DeviceRequest, command: &EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Generator(args) => {
            use divergen_models::diffusion::pipeline::GenerateOptions;
            use divergen_models::diffusion::scheduler::SchedulerKind;
            let device = open(request)?;
            let scheduler = SchedulerKind::parse(&args.scheduler).ok_or_else(|| {
                format!(
                    "--scheduler {:?}: not one of ddim, euler, euler-a, dpm++2m, lcm",
                    args.scheduler
                )
            })?;
            let options = GenerateOptions {
                prompt: String::new(),
                negative_prompt: String::new(),
                steps: args.steps,
                guidance: args.guidance,
                scheduler: Some(scheduler),
                seed: 0,
                latents: None,
                width: args.size,
                height: args.size,
                quant: args.quant.into(),
                clip_skip: 0,
                taesd: None,
            };
            let report = eval::generator_quality(
                &eval::GeneratorEval {
                    generator: &args.generator,
                    clip: &args.clip,
                    domain: &args.domain,
                    per_category: args.per_category,
                    options,
                    save: args.save.as_deref(),
                },
                &device.device,
            )?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "{} generated images in {:.0} s: {:.1} % recognised as their category; diversity {:.3} (real renders {:.3})",
                    report.images,
                    report.seconds,
                    100.0 * report.recognised,
                    report.diversity_generated,
                    report.diversity_real
                );
                for c in &report.per_category {
                    println!(
                        "  {:<16} {:>5.1} %  diversity {:.3} (real {:.3})",
                        c.name,
                        100.0 * c.recognised,
                        c.diversity_generated,
                        c.diversity_real
                    );
                }
            }
            Ok(())
        }
        EvalCommand::Sam(args) => {
            let device = open(request)?;
            let report = eval::sam_quality(&args.sam, &args.domain, args.stride, args.quant.into(), &device.device)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "SAM-background mask IoU {:.3} on {} held-out renders ({} dropped); box-prompt IoU {:.3} on {} held-out scene instances",
                    report.render_iou, report.renders, report.render_drops, report.box_iou, report.scene_instances
                );
                for c in &report.per_category {
                    let boxes = if c.instances == 0 {
                        "no scene instances".to_string()
                    } else {
                        format!("box {:.3} ({} instances)", c.box_iou, c.instances)
                    };
                    println!("  {:<16} render {:.3}  {boxes}", c.name, c.render_iou);
                }
            }
            Ok(())
        }
        EvalCommand::Clip(args) => {
            let device = open(request)?;
            let report = eval::clip_zero_shot(&args.clip, &args.domain, args.quant.into(), &device.device)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "zero-shot accuracy {:.1} % on {} held-out renders ({} categories)",
                    100.0 * report.accuracy,
                    report.images,
                    report.per_category.len()
                );
                for c in &report.per_category {
                    println!("  {:<16} {:>5.1} %", c.name, 100.0 * c.accuracy);
                }
            }
            Ok(())
        }
    }
}

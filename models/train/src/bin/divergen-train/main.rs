//! `divergen-train`: the embedded default's tiny models, trained on the procedural domain
//! (`divergen domain`) with burn's autodiff on the CPU, and measured on its held-out data.

mod clip;
mod eval;
mod generator;
mod sam;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use divergen_runtime::cli::{GlobalArgs, skip_mesa_device_select};

#[derive(Parser)]
#[command(
    name = "divergen-train",
    version,
    about = "Train and measure the embedded default's tiny CLIP, SAM and Stable Diffusion"
)]
struct Cli {
    // The device is for the pipeline's own loaders (evaluation, the generator's text tower);
    // training itself runs on the CPU.
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A tiny CLIP (ViT image tower + text transformer), contrastive on the renders' captions.
    Clip(clip::TrainClipArgs),
    /// A tiny SAM (ViT encoder, prompt encoder, two-way mask decoder) on point, box and
    /// 4-corner background prompts.
    Sam(sam::TrainSamArgs),
    /// A tiny Stable Diffusion: an AutoencoderKL, then a UNet2DConditionModel conditioned on
    /// the tiny CLIP's text tower; written as a diffusers pipeline folder.
    Generator(generator::TrainGeneratorArgs),
    /// Measure the tiny models on the procedural domain's held-out data.
    Eval {
        #[command(subcommand)]
        what: eval::EvalCommand,
    },
}

fn main() -> ExitCode {
    // SAFETY: no other thread exists yet.
    unsafe { skip_mesa_device_select() };
    let cli = Cli::parse();
    cli.global.init_logging();
    let result = cli.global.device.request().and_then(|request| match cli.command {
        Command::Clip(args) => clip::train_clip(&args),
        Command::Sam(args) => sam::train_sam(&args),
        Command::Generator(args) => generator::train_generator(&request, &args),
        Command::Eval { what } => eval::run(&request, &what),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("divergen-train: {e}");
            ExitCode::FAILURE
        }
    }
}

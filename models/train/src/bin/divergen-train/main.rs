//! `divergen-train`: the embedded default's tiny models, trained on the procedural domain
//! (`divergen domain`) with burn's autodiff on the CPU, and measured on its held-out data.

mod clip;
mod eval;
mod generator;
mod sam;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use divergen_runtime::cli::{DeviceArgs, log_filter};

#[derive(Parser)]
#[command(
    name = "divergen-train",
    version,
    about = "Train and measure the embedded default's tiny CLIP, SAM and Stable Diffusion"
)]
struct Cli {
    /// More log output: -v shows our debug lines and dependencies' info, -vv everything.
    /// `RUST_LOG` overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// The device for the pipeline's own loaders (evaluation, the generator's text tower);
    /// training itself runs on the CPU.
    #[command(flatten)]
    device: DeviceArgs,
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
    // As in `divergen`: Mesa's device-selection layer would print "XDG_RUNTIME_DIR is invalid"
    // on headless machines, and divergen ranks adapters itself.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(log_filter(cli.verbose))).init();
    let result = cli.device.request().and_then(|request| match cli.command {
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

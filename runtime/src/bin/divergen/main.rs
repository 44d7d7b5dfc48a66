//! `divergen`: the device-side command line.

mod bench;
mod devices;
mod domain;
mod embed;
mod generate;
mod png;
mod report;
mod run;
mod segment;
mod stream_bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use divergen_runtime::cli::{GlobalArgs, skip_mesa_device_select};

#[derive(Parser)]
#[command(
    name = "divergen",
    version,
    about = "DiverGen's data-generation pipeline, on the device"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the GPU adapters found and the one that would be used.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// L2-normalised CLIP embeddings of images and texts.
    Embed(embed::EmbedArgs),
    /// One image from a diffusers Stable Diffusion folder.
    Generate(generate::GenerateArgs),
    /// DiverGen's four stages end to end: generate, annotate (SAM-background), filter (CLIP),
    /// paste onto real images; writes the dataset, the instance pool and a manifest.
    Run(run::RunArgs),
    /// PNGs of a finished run: contact sheets, CLIP score histogram, outlined samples.
    Report(report::ReportArgs),
    /// Write the procedural domain: LVIS-style scenes, white-background renders with captions,
    /// size statistics and prompt banks.
    Domain(domain::DomainArgs),
    /// SAM masks for point and box prompts on one image.
    Segment(segment::SegmentArgs),
    /// The sample stream to a host.
    Stream {
        #[command(subcommand)]
        what: StreamCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum StreamCommand {
    /// Send synthetic samples (512x512, about 10 instances) to a host as fast as it acknowledges them.
    Bench(stream_bench::StreamBenchArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Our WGSL kernels at realistic sizes against burn's default path on the same device.
    Kernels(bench::KernelBenchArgs),
    /// CLIP ViT-B/32, SAM ViT-B and MobileSAM at full size (random weights) in f32, int8 and int4.
    Models(bench::ModelBenchArgs),
}

/// Options whose values are comma-separated numbers that may start with a minus sign.
const COORDINATE_OPTIONS: [&str; 2] = ["--point", "--box"];

/// Rewrites `--point 0,0,1 -5,-5,1` as `--point=0,0,1 --point=-5,-5,1` (and `--box` likewise):
/// clap would read a value starting with a minus sign as a cluster of short flags, and no
/// divergen flag is a digit, so such values are unambiguous.
fn negative_values_attached(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out: Vec<std::ffi::OsString> = Vec::new();
    let mut option: Option<&str> = None;
    for arg in args {
        let text = arg.to_string_lossy().into_owned();
        let negative = text.starts_with('-') && text[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.');
        if text.starts_with('-') && !negative {
            option = COORDINATE_OPTIONS.iter().copied().find(|o| *o == text);
            if option.is_some() {
                // Each of its values becomes `option=value` below.
                continue;
            }
        } else if let Some(o) = option {
            out.push(format!("{o}={text}").into());
            continue;
        }
        out.push(arg);
    }
    out
}

fn main() -> ExitCode {
    // SAFETY: no other thread exists yet.
    unsafe { skip_mesa_device_select() };
    let cli = Cli::parse_from(negative_values_attached(std::env::args_os()));
    cli.global.init_logging();
    let result = cli.global.device.request().and_then(|request| match cli.command {
        Command::Devices { json } => devices::run(&request, json),
        Command::Bench {
            what: BenchCommand::Kernels(args),
        } => bench::run_kernels(&request, &args),
        Command::Bench {
            what: BenchCommand::Models(args),
        } => bench::run_models(&request, &args),
        Command::Embed(args) => embed::run(&request, &args),
        Command::Segment(args) => segment::run(&request, &args),
        Command::Generate(args) => generate::run(&request, &args),
        Command::Run(args) => run::run(&request, &args),
        Command::Report(args) => report::run(&args),
        Command::Domain(args) => domain::run(&args),
        Command::Stream {
            what: StreamCommand::Bench(args),
        } => stream_bench::run(&args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("divergen: {e}");
            ExitCode::FAILURE
        }
    }
}

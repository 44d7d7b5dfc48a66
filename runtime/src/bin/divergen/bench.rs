//! `divergen bench kernels`.

use std::path::PathBuf;

use clap::Args;
use divergen_kernels::bench::{BenchOptions, markdown, run};
use divergen_kernels::device::{DeviceRequest, open};
use divergen_runtime::Result;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct KernelBenchArgs {
    /// One JSON object per case on stdout (JSON lines) instead of a table.
    #[arg(long)]
    json: bool,
    /// Fewer sizes and shorter timing: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Skip burn's side of each comparison (its first matmul per shape autotunes for seconds).
    #[arg(long)]
    ours_only: bool,
    /// Run only the cases whose kernel name contains this (e.g. `gemm`, `attention`).
    #[arg(long)]
    filter: Option<String>,
    /// Also write the Markdown table, with device and date, to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

pub fn run_kernels(request: &DeviceRequest, args: &KernelBenchArgs) -> Result<()> {
    let device = open(request)?;
    let f16 = device.adapter.as_ref().is_some_and(|a| a.shader_f16);
    log::info!("benchmarking kernels on {}", device.describe());
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").map_err(|e| e.to_string())?);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar.set_message("gemm_f32 (burn's first matmul per shape autotunes)");
    let cases = run(
        &device.device,
        f16,
        &BenchOptions {
            quick: args.quick,
            ours_only: args.ours_only,
            filter: args.filter.clone(),
        },
        |c| {
            if args.json {
                bar.suspend(|| println!("{}", serde_json::to_string(c).unwrap_or_default()));
            } else {
                say(
                    &bar,
                    format!(
                        "{:<16} {:<34} ours {:>9.3} ms  burn {:>9}  x{}",
                        c.kernel,
                        c.shape,
                        c.ours_ms,
                        c.burn_ms.map_or("–".into(), |b| format!("{b:.3} ms")),
                        c.speedup.map_or("–".into(), |s| format!("{s:.2}"))
                    ),
                );
            }
            bar.set_message(format!("after {} {}", c.kernel, c.shape));
        },
    );
    bar.finish_and_clear();
    let table = format!(
        "Device: {}. Date: {}. Command: `divergen bench kernels{}`.\n\n{}",
        device.describe(),
        today(),
        if args.quick { " --quick" } else { "" },
        markdown(&cases)
    );
    report(&table, args.json, args.markdown.as_deref())
}

/// Prints the table (unless the output is JSON lines) and writes it to `markdown`, atomically.
fn report(table: &str, json: bool, markdown: Option<&std::path::Path>) -> Result<()> {
    if !json {
        println!("\n{table}");
    }
    if let Some(path) = markdown {
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, table)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A result line above the spinner, or on stdout when there is no terminal to draw one on (so
/// a redirected run still shows each case as it finishes).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

fn today() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10].to_string()
}

#[derive(Args)]
pub struct ModelBenchArgs {
    /// Models to run: clip-vit-b-32, sam-vit-b, mobile-sam, sd-turbo-unet, sd-vae, taesd
    /// (default: all).
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// Weight formats: none, int8, int4 (default: all three).
    #[arg(long, value_delimiter = ',')]
    quant: Vec<String>,
    /// Timed calls after the first (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// CLIP images per batch.
    #[arg(long, default_value_t = 8)]
    clip_batch: usize,
    /// Image sides for the diffusion models (UNet step, VAE and TAESD decodes).
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    sd_size: Vec<usize>,
    /// One JSON object per case on stdout (JSON lines) instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the Markdown table, with device and date, to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

pub fn run_models(request: &DeviceRequest, args: &ModelBenchArgs) -> Result<()> {
    use divergen_models::bench::{BenchModel, ModelBenchOptions, markdown, run};
    use divergen_models::layers::Quantization;
    let models = if args.model.is_empty() {
        BenchModel::ALL.to_vec()
    } else {
        args.model
            .iter()
            .map(|m| {
                BenchModel::ALL.into_iter().find(|b| b.name() == m).ok_or_else(|| {
                    format!(
                        "--model {m:?}: unknown (clip-vit-b-32, sam-vit-b, mobile-sam, sd-turbo-unet, sd-vae or taesd)"
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    let quants = if args.quant.is_empty() {
        vec![Quantization::None, Quantization::Int8, Quantization::Int4]
    } else {
        args.quant
            .iter()
            .map(|q| match q.as_str() {
                "none" => Ok(Quantization::None),
                "int8" => Ok(Quantization::Int8),
                "int4" => Ok(Quantization::Int4),
                other => Err(format!("--quant {other:?}: unknown (none, int8 or int4)")),
            })
            .collect::<Result<_, String>>()?
    };
    if args.runs == 0 || args.clip_batch == 0 {
        return Err("--runs and --clip-batch must be at least 1".into());
    }
    if args.sd_size.iter().any(|&s| s == 0 || !s.is_multiple_of(64)) {
        return Err(
            "--sd-size: sides must be positive multiples of 64 (the UNet halves the latents three times)".into(),
        );
    }
    let device = open(request)?;
    log::info!("benchmarking models on {}", device.describe());
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").map_err(|e| e.to_string())?);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar.set_message(format!("{} ({:?})", models[0].name(), quants[0]));
    let options = ModelBenchOptions {
        models,
        quants,
        runs: args.runs,
        clip_batch: args.clip_batch,
        sd_sizes: args.sd_size.clone(),
    };
    let cases = run(&device.device, &options, |c| {
        if args.json {
            bar.suspend(|| println!("{}", serde_json::to_string(c).unwrap_or_default()));
        } else {
            say(
                &bar,
                format!(
                    "{:<14} {:<5} {:<36} first {:>9.0} ms  median {:>9.1} ms  {:>8.2}/s  weights {:>6.1} MiB  peak {}",
                    c.model,
                    c.quant,
                    c.stage,
                    c.first_ms,
                    c.median_ms,
                    c.per_second,
                    c.weights_mib,
                    c.peak_mib.map_or("–".into(), |m| format!("{m:.0} MiB"))
                ),
            );
        }
        bar.set_message(format!("after {} {} {}", c.model, c.quant, c.stage));
    })?;
    bar.finish_and_clear();
    let table = format!(
        "Device: {}. Date: {}. Command: `divergen bench models --runs {}`.\n\n{}",
        device.describe(),
        today(),
        args.runs,
        markdown(&cases)
    );
    report(&table, args.json, args.markdown.as_deref())
}

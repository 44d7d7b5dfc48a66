//! `divergen bench kernels`.

use std::path::PathBuf;

use clap::Args;
use divergen_kernels::bench::{BenchOptions, markdown, run};
use divergen_kernels::device::{DeviceRequest, open};
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

pub fn run_kernels(request: &DeviceRequest, args: &KernelBenchArgs) -> Result<(), String> {
    let device = open(request).map_err(|e| e.to_string())?;
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
                bar.println(format!(
                    "{:<16} {:<34} ours {:>9.3} ms  burn {:>9}  x{}",
                    c.kernel,
                    c.shape,
                    c.ours_ms,
                    c.burn_ms.map_or("–".into(), |b| format!("{b:.3} ms")),
                    c.speedup.map_or("–".into(), |s| format!("{s:.2}"))
                ));
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
    if !args.json {
        println!("\n{table}");
    }
    if let Some(path) = &args.markdown {
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, &table)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn today() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10].to_string()
}

//! `divergen run`.

use std::path::PathBuf;

use clap::Args;
use divergen_kernels::device::{DeviceRequest, open};
use divergen_runtime::Result;
use divergen_runtime::pipeline::config::RunConfig;
use divergen_runtime::pipeline::{self, Destination};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The run's TOML config (categories, generators, SAM, CLIP, real dataset, paste, budget).
    /// Without it, the embedded default runs: the procedural domain and the project's tiny
    /// models, written under `<out>/embedded/`, and the report is drawn at the end.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run folder: instance pool, records, report inputs, and the dataset unless --host is given.
    #[arg(long, default_value = "divergen-out")]
    pub out: PathBuf,
    /// Stream the samples to `divergen-host serve` at this address (host:port, serial:PATH, stdio)
    /// instead of writing `<out>/dataset`.
    #[arg(long)]
    pub host: Option<String>,
    /// Device memory budget in MiB (overrides the config's `budget_mib`).
    #[arg(long)]
    pub budget_mib: Option<u64>,
    /// Run seed (overrides the config's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the run manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(request: &DeviceRequest, args: &RunArgs) -> Result<()> {
    let config_path = match &args.config {
        Some(path) => path.clone(),
        None => divergen_runtime::embedded::prepare(&args.out.join("embedded"))?,
    };
    let mut config = RunConfig::from_file(&config_path)?;
    if let Some(b) = args.budget_mib {
        config.budget_mib = Some(b);
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    config.validate()?;
    let destination = match &args.host {
        Some(h) => Destination::Host(h.clone()),
        None => Destination::Local,
    };
    let device = open(request)?;
    let manifest = pipeline::run(&config, &args.out, &destination, &device.device, &device.describe())?;
    let report = if args.config.is_none() && args.host.is_none() {
        Some(pipeline::report::render(&args.out, 4)?)
    } else {
        None
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
        return Ok(());
    }
    let s = &manifest.stages;
    println!(
        "run {} on {}: {} generated, {} kept ({:.0} %), {} samples → {}",
        manifest.run_id,
        manifest.device,
        manifest.generated,
        manifest.kept,
        100.0 * manifest.kept as f64 / manifest.generated.max(1) as f64,
        manifest.output.samples,
        manifest.output.target
    );
    for (name, st) in [
        ("real bank", &s.real_bank),
        ("generation", &s.generation),
        ("annotation", &s.annotation),
        ("filtering", &s.filtering),
        ("augmentation", &s.augmentation),
    ] {
        println!(
            "  {name:<12} {:>8.1} s  {:>6} items  {:>8.3}/s",
            st.seconds, st.items, st.per_second
        );
    }
    if let Some(p) = manifest.peak_device_mib {
        println!(
            "  peak device memory {p:.0} MiB{}",
            match manifest.budget_mib {
                Some(b) => format!(" (budget {b} MiB)"),
                None => String::new(),
            }
        );
    }
    for (reason, n) in &manifest.drops {
        println!("  dropped {n} ({reason})");
    }
    println!(
        "  pasted {} instances onto {} images ({:.1} per image); {} real instances removed by occlusion",
        manifest.paste.instances_pasted,
        manifest.paste.images,
        manifest.paste.instances_per_image,
        manifest.paste.dropped_by_occlusion
    );
    println!("  manifest {}", args.out.join(pipeline::MANIFEST).display());
    if let Some(report) = report {
        println!(
            "  report: {} PNGs in {}",
            report.files.len(),
            args.out.join("report").display()
        );
    }
    Ok(())
}

//! `divergen-host`: receive samples from devices into an LVIS/COCO dataset, and verify it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use divergen_host::{Server, ServerConfig, StoreConfig, verify};
use divergen_protocol::CategoryTable;

#[derive(Parser)]
#[command(
    name = "divergen-host",
    version,
    about = "Receives DiverGen samples from devices and writes LVIS/COCO shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept devices and store their samples exactly once. Stops cleanly on SIGINT/SIGTERM.
    Serve {
        /// host:port for TCP (many devices), `stdio` or `serial:PATH` for one byte-stream link.
        #[arg(long)]
        listen: String,
        /// Output folder; an existing one is resumed.
        #[arg(long)]
        out: PathBuf,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// Also write each shard as a WebDataset .tar.
        #[arg(long)]
        tar: bool,
        /// Pin the category table up front: a JSON file with a `categories` list (an LVIS
        /// annotation file works). Otherwise the first device's table is pinned.
        #[arg(long)]
        categories: Option<PathBuf>,
        /// Drop a device connection silent for this many milliseconds.
        #[arg(long, default_value_t = 10_000)]
        peer_timeout_ms: u64,
    },
    /// Check every annotation and image in an output folder; print counts per category.
    Verify {
        /// A `divergen-host serve --out` folder, or a run's `dataset/` folder.
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // The host's own lines (connections, shards) at info; dependencies only warnings.
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("warn,divergen_host=info,divergen_dataset=info,divergen_protocol=info"),
    )
    .init();
    let result = match Cli::parse().command {
        Command::Serve {
            listen,
            out,
            shard_size,
            tar,
            categories,
            peer_timeout_ms,
        } => {
            let config = ServerConfig {
                store: StoreConfig { out, shard_size, tar },
                peer_timeout: Duration::from_millis(peer_timeout_ms),
            };
            serve(&listen, config, categories)
        }
        Command::Verify { dir, json } => run_verify(&dir, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("divergen-host: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(listen: &str, config: ServerConfig, categories: Option<PathBuf>) -> Result<ExitCode, String> {
    let server = Server::open(config).map_err(|e| e.to_string())?;
    if let Some(path) = categories {
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let table: CategoryTable = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        table.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        server.pin_categories(table).map_err(|e| e.to_string())?;
    }
    let flag = server.shutdown_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag.clone())
            .map_err(|e| format!("cannot install a signal handler: {e}"))?;
    }
    let result = if listen == "stdio" || listen.starts_with("serial:") {
        let (reader, writer): (Box<dyn std::io::Read + Send>, Box<dyn std::io::Write>) = if listen == "stdio" {
            (Box::new(std::io::stdin()), Box::new(std::io::stdout()))
        } else {
            let path = &listen["serial:".len()..];
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))?;
            (
                Box::new(file.try_clone().map_err(|e| format!("{path}: {e}"))?),
                Box::new(file),
            )
        };
        log::info!("serving one device on {listen}");
        let link = server.serve_link(reader, writer, listen);
        server.close().and(link)
    } else {
        let listener = TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        log::info!("listening on {addr}");
        server.serve_tcp(listener)
    };
    let stats = server.stats();
    log::info!(
        "{} samples stored ({} duplicates dropped, {} bad frames, {} connections); {} commits: write {:.2?}, fsync {:.2?}; {} shards sealed in {:.2?}",
        stats.store.committed,
        stats.store.duplicates,
        stats.bad_frames,
        stats.connections,
        stats.store.commits,
        stats.store.journal_write,
        stats.store.journal_fsync,
        stats.store.shards_sealed,
        stats.store.seal
    );
    result.map_err(|e| e.to_string())?;
    if flag.load(Ordering::SeqCst) {
        log::info!("stopped by signal; everything acknowledged is in the output folder");
    }
    Ok(ExitCode::SUCCESS)
}

fn run_verify(dir: &std::path::Path, json: bool) -> Result<ExitCode, String> {
    let bar = indicatif::ProgressBar::new(0);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let report = verify::verify(dir, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        println!(
            "{}: {} shards ({} as .tar), {} images, {} annotations",
            dir.display(),
            report.shards,
            report.tar_shards,
            report.images,
            report.annotations
        );
        println!(
            "{:>6}  {:<32} {:>4} {:>8} {:>10} {:>10} {:>8}",
            "id", "category", "freq", "images", "instances", "generated", "real"
        );
        for c in &report.categories {
            println!(
                "{:>6}  {:<32} {:>4} {:>8} {:>10} {:>10} {:>8}",
                c.id, c.name, c.frequency, c.images, c.instances, c.generated, c.real
            );
        }
        for note in &report.notes {
            println!("note: {note}");
        }
        for problem in report.problems.iter().take(50) {
            eprintln!("problem: {problem}");
        }
        if report.problems.len() > 50 {
            eprintln!("… and {} more", report.problems.len() - 50);
        }
    }
    if report.problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        if !json {
            let n = report.problems.len();
            eprintln!(
                "divergen-host: {n} problem{} in {}",
                if n == 1 { "" } else { "s" },
                dir.display()
            );
        }
        Ok(ExitCode::FAILURE)
    }
}

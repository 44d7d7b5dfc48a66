//! `divergen stream bench`: a load generator that sends synthetic samples to a host and reports
//! throughput, plus the CPU cost of each encode/decode step on one core.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use divergen_protocol::{DeviceMessage, ImageData, Sample, decode_message, encode_message};
use divergen_runtime::Result;
use serde::Serialize;

use divergen_runtime::stream::synthetic::{self, ImageEncoding, SampleSpec};
use divergen_runtime::stream::{Outbox, OutboxConfig, StreamConfig, StreamStats, Streamer, transport};

#[derive(Args, Debug)]
pub struct StreamBenchArgs {
    /// Samples to send.
    #[arg(long, default_value_t = 1000)]
    pub samples: u64,
    /// Host address: host:port, serial:PATH or stdio.
    #[arg(long)]
    pub to: String,
    /// Outbox folder (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    pub outbox: Option<PathBuf>,
    /// Outbox size bound in MiB.
    #[arg(long, default_value_t = 256)]
    pub outbox_mib: u64,
    /// Skip the outbox's fsyncs (measures the link without the device's disk).
    #[arg(long)]
    pub no_sync: bool,
    /// Image encoding on the wire.
    #[arg(long, value_parser = ["png", "rgb8"], default_value = "png")]
    pub encoding: String,
    /// Image side in pixels.
    #[arg(long, default_value_t = 512)]
    pub size: u32,
    /// Mean instances per image.
    #[arg(long, default_value_t = 10)]
    pub instances: u32,
    /// The device id the samples carry; the host keys its dedup on (device, run, seq).
    #[arg(long, default_value = "bench-device")]
    pub device_id: String,
    /// Run id (default: one made from the current time, so repeated runs do not collide).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
pub struct StreamBenchReport {
    pub samples: u64,
    pub image: String,
    pub mean_instances: f64,
    pub mean_frame_bytes: f64,
    pub seconds: f64,
    pub samples_per_second: f64,
    pub megabytes_per_second: f64,
    pub outbox_sync: bool,
    pub producer_blocked_pushes: u64,
    /// Per sample, one core: what a device and a host spend besides the link.
    pub cpu_ms: CpuCosts,
    pub link: StreamStats,
}

#[derive(Serialize)]
pub struct CpuCosts {
    pub png_encode: f64,
    pub frame_encode: f64,
    pub frame_decode: f64,
    pub validate: f64,
    pub png_decode: f64,
}

fn mean_ms(samples: &[Sample], mut f: impl FnMut(&Sample)) -> f64 {
    let start = Instant::now();
    for s in samples {
        f(s);
    }
    start.elapsed().as_secs_f64() * 1e3 / samples.len() as f64
}

pub fn run(args: &StreamBenchArgs) -> Result<()> {
    let run_id = args.run_id.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("bench-{}", now.as_millis())
    });
    let spec = SampleSpec {
        width: args.size,
        height: args.size,
        instances: args.instances,
        encoding: if args.encoding == "png" {
            ImageEncoding::Png
        } else {
            ImageEncoding::Rgb8
        },
        ..SampleSpec::realistic(&args.device_id, &run_id)
    };
    let table = synthetic::categories(spec.categories);
    // A pool of distinct samples, cycled: generating the picture is not what is measured.
    let pool: Vec<Sample> = (0..32).map(|i| synthetic::sample(&spec, i)).collect();
    let raw: Vec<Sample> = (0..8)
        .map(|i| {
            synthetic::sample(
                &SampleSpec {
                    encoding: ImageEncoding::Rgb8,
                    ..spec.clone()
                },
                i,
            )
        })
        .collect();
    let frames: Vec<Vec<u8>> = pool
        .iter()
        .map(|s| encode_message(&DeviceMessage::Sample(s.clone())))
        .collect();
    let cpu = CpuCosts {
        png_encode: mean_ms(&raw, |s| {
            if let ImageData::Rgb8(rgb) = &s.image {
                std::hint::black_box(divergen_dataset::files::encode_png(s.width, s.height, rgb));
            }
        }),
        frame_encode: mean_ms(&pool, |s| {
            std::hint::black_box(encode_message(&DeviceMessage::Sample(s.clone())));
        }),
        frame_decode: {
            let start = Instant::now();
            for f in &frames {
                std::hint::black_box(decode_message::<DeviceMessage>(&f[..f.len() - 1]).map_err(|e| e.to_string())?);
            }
            start.elapsed().as_secs_f64() * 1e3 / frames.len() as f64
        },
        validate: mean_ms(&pool, |s| {
            std::hint::black_box(s.validate(Some(&table)).is_ok());
        }),
        png_decode: mean_ms(&pool, |s| {
            if let ImageData::Png(png) = &s.image {
                std::hint::black_box(image::load_from_memory(png).map(|i| i.width()).ok());
            }
        }),
    };
    let mean_frame_bytes = frames.iter().map(|f| f.len()).sum::<usize>() as f64 / frames.len() as f64;
    let mean_instances = pool.iter().map(|s| s.instances.len()).sum::<usize>() as f64 / pool.len() as f64;

    let temp = match &args.outbox {
        Some(_) => None,
        None => Some(tempfile::tempdir().map_err(|e| format!("cannot create a temporary outbox: {e}"))?),
    };
    let dir = args
        .outbox
        .clone()
        .unwrap_or_else(|| temp.as_ref().expect("made above").path().to_path_buf());
    let config = OutboxConfig {
        sync: !args.no_sync,
        ..OutboxConfig::with_max_bytes(args.outbox_mib << 20)
    };
    let outbox = Arc::new(Outbox::open(&dir, config).map_err(|e| e.to_string())?);
    let transport = transport::parse(&args.to)?;
    let streamer = Streamer::start(
        outbox.clone(),
        transport,
        StreamConfig::new(&args.device_id, &run_id, table),
    )
    .map_err(|e| e.to_string())?;

    let progress = indicatif::ProgressBar::new(args.samples);
    if args.json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let start = Instant::now();
    let first = outbox.next_seq();
    for i in 0..args.samples {
        outbox
            .push(pool[i as usize % pool.len()].clone())
            .map_err(|e| e.to_string())?;
        progress.set_position(outbox.acked().saturating_sub(first));
    }
    let link = streamer.finish(Duration::from_secs(600)).map_err(|e| e.to_string())?;
    let seconds = start.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let report = StreamBenchReport {
        samples: args.samples,
        image: format!("{}x{} {}", args.size, args.size, args.encoding),
        mean_instances,
        mean_frame_bytes,
        seconds,
        samples_per_second: args.samples as f64 / seconds,
        megabytes_per_second: args.samples as f64 * mean_frame_bytes / seconds / 1e6,
        outbox_sync: !args.no_sync,
        producer_blocked_pushes: outbox.stats().blocked_pushes,
        cpu_ms: cpu,
        link,
    };
    // On a stdio link stdout carries the frames, so the report goes to stderr.
    let print = |line: String| {
        if args.to == "stdio" {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    if args.json {
        print(serde_json::to_string_pretty(&report)?);
    } else {
        print(format!(
            "{} samples ({}, {:.1} instances, {:.0} KB a frame) in {:.2} s: {:.1} samples/s, {:.1} MB/s",
            report.samples,
            report.image,
            report.mean_instances,
            report.mean_frame_bytes / 1e3,
            report.seconds,
            report.samples_per_second,
            report.megabytes_per_second
        ));
        let c = &report.cpu_ms;
        print(format!(
            "CPU per sample (ms, one core): PNG encode {:.2}, frame encode {:.2}, frame decode {:.2}, validate {:.3}, PNG decode {:.2}",
            c.png_encode, c.frame_encode, c.frame_decode, c.validate, c.png_decode
        ));
        print(format!(
            "link: {} connection(s), {} frames sent, {} rewinds; producer blocked {} times (outbox sync: {})",
            link.connections, link.frames_sent, link.rewinds, report.producer_blocked_pushes, report.outbox_sync
        ));
    }
    Ok(())
}

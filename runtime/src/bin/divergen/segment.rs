//! `divergen segment`: SAM masks for point and box prompts on one image, written at the image's
//! full size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use divergen_kernels::device::{DeviceRequest, open};
use divergen_models::sam::{Point, PointLabel, Prompt, Quantization, Sam};
use divergen_runtime::Result;
use image::GrayImage;

use divergen_runtime::cli::QuantArg;

use crate::embed::size_line;

#[derive(Args, Debug)]
pub struct SegmentArgs {
    /// SAM checkpoint: the official `.pth` (e.g. sam_vit_b_01ec64.pth) or safetensors with the
    /// same keys.
    #[arg(long)]
    pub sam: PathBuf,
    /// The image to segment.
    #[arg(long)]
    pub image: PathBuf,
    /// A point prompt `X,Y,LABEL` in image pixels; LABEL 1 = object, 0 = background. Repeatable.
    #[arg(long = "point", num_args = 1.., value_parser = parse_point)]
    pub points: Vec<Point>,
    /// A box prompt `X0,Y0,X1,Y1` in image pixels.
    #[arg(long = "box", value_parser = parse_box)]
    pub bbox: Option<[f32; 4]>,
    /// Write SAM's three disambiguating masks (OUT-0/1/2.png) instead of the single-mask output.
    #[arg(long)]
    pub multimask: bool,
    /// Weight-only quantization of the linear layers, applied at load.
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    /// Mask PNG to write (0 / 255 at the image's size).
    #[arg(long)]
    pub out: PathBuf,
    /// Print the masks, their predicted IoU and area as JSON.
    #[arg(long)]
    pub json: bool,
}

fn numbers<const N: usize>(s: &str, what: &str) -> Result<[f32; N]> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != N {
        return Err(format!("{what} {s:?}: expected {N} comma-separated numbers").into());
    }
    let mut out = [0f32; N];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{what} {s:?}: {p:?} is not a number"))?;
    }
    Ok(out)
}

fn parse_point(s: &str) -> Result<Point> {
    let [x, y, label] = numbers::<3>(s, "point")?;
    let label = match label {
        1.0 => PointLabel::Foreground,
        0.0 => PointLabel::Background,
        _ => return Err(format!("point {s:?}: label must be 1 (object) or 0 (background)").into()),
    };
    Ok(Point { x, y, label })
}

fn parse_box(s: &str) -> Result<[f32; 4]> {
    let b = numbers::<4>(s, "box")?;
    if b[2] <= b[0] || b[3] <= b[1] {
        return Err(format!("box {s:?}: needs X0 < X1 and Y0 < Y1").into());
    }
    Ok(b)
}

/// `dir/mask.png` → `dir/mask-2.png`.
fn numbered(out: &Path, i: usize) -> PathBuf {
    let stem = out
        .file_stem()
        .map_or("mask".into(), |s| s.to_string_lossy().into_owned());
    let ext = out
        .extension()
        .map_or("png".into(), |e| e.to_string_lossy().into_owned());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

pub fn run(request: &DeviceRequest, args: &SegmentArgs) -> Result<()> {
    if args.points.is_empty() && args.bbox.is_none() {
        return Err("nothing to segment: give --point X,Y,LABEL and/or --box X0,Y0,X1,Y1".into());
    }
    let image = divergen_runtime::images::open(&args.image)?.into_rgb8();
    let (w, h) = (image.width(), image.height());
    for p in &args.points {
        if p.x < 0.0 || p.y < 0.0 || p.x >= w as f32 || p.y >= h as f32 {
            log::warn!("point ({}, {}) lies outside the {w}x{h} image", p.x, p.y);
        }
    }
    let quant = Quantization::from(args.quant);
    let device = open(request)?;
    let sam = Sam::load(&args.sam, quant, &device.device)?;
    log::info!(
        "SAM {} from {} on {}: {}",
        sam.config.encoder.describe(),
        args.sam.display(),
        device.describe(),
        size_line(sam.linear_bytes(), quant)
    );
    let start = Instant::now();
    let embedding = sam.embed_image(&image)?;
    // Reading the embedding back waits for the encoder, so the two timings separate.
    let _ = embedding.embedding.clone().into_data();
    let encoder_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let prompt = Prompt {
        points: args.points.clone(),
        bbox: args.bbox,
        mask: None,
    };
    let prediction = sam.predict(&embedding, &prompt, args.multimask)?;
    let decoder_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut written = Vec::new();
    for (i, (logits, iou)) in prediction.masks.iter().zip(&prediction.iou).enumerate() {
        let path = if args.multimask {
            numbered(&args.out, i)
        } else {
            args.out.clone()
        };
        let pixels: Vec<u8> = logits.iter().map(|&v| if v > 0.0 { 255 } else { 0 }).collect();
        let area = pixels.iter().filter(|&&p| p != 0).count();
        let mask = GrayImage::from_raw(w, h, pixels).ok_or("mask size does not match the image")?;
        crate::png::write_atomically(&image::DynamicImage::ImageLuma8(mask), &path)?;
        written.push(serde_json::json!({ "file": path, "iou": iou, "area": area }));
    }
    if args.json {
        let out = serde_json::json!({
            "image": { "path": args.image, "width": w, "height": h },
            "masks": written,
            "encoder_ms": encoder_ms,
            "decoder_ms": decoder_ms,
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for m in &written {
            println!(
                "{}: predicted IoU {:.3}, {} pixels",
                m["file"].as_str().unwrap_or("?"),
                m["iou"],
                m["area"]
            );
        }
        println!("encoder {encoder_ms:.0} ms, decoder {decoder_ms:.0} ms");
    }
    Ok(())
}

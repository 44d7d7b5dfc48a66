//! `divergen report DIR`: pictures of a finished run — per category a contact sheet of kept vs
//! rejected instances, a histogram of CLIP scores with the threshold, and pasted samples with
//! their mask outlines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage, RgbaImage, imageops};

use super::{InstanceRecord, MANIFEST, read_records};
use crate::{Error, Result};

const CELL: u32 = 96;
const COLUMNS: u32 = 6;
const GREEN: Rgb<u8> = Rgb([40, 170, 60]);
const RED: Rgb<u8> = Rgb([210, 50, 40]);
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const PAPER: Rgb<u8> = Rgb([250, 250, 247]);

/// What `report` wrote.
#[derive(Debug, serde::Serialize)]
pub struct ReportFiles {
    pub files: Vec<PathBuf>,
}

pub fn render(dir: &Path, samples: usize) -> Result<ReportFiles> {
    let manifest_path = dir.join(MANIFEST);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .map_err(|e| format!("{}: {e} (not a finished run folder)", manifest_path.display()))?,
    )
    .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    let threshold = manifest["config"]["filter"]["threshold"].as_f64().unwrap_or(0.6) as f32;
    let names: BTreeMap<u64, String> = manifest["categories"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| Some((c["id"].as_u64()?, c["name"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let records = read_records(dir)?;
    let out = dir.join("report");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut files = Vec::new();

    let mut by_category: BTreeMap<u32, Vec<&InstanceRecord>> = BTreeMap::new();
    for r in &records {
        by_category.entry(r.category_id).or_default().push(r);
    }
    for (c, list) in &by_category {
        let name = names.get(&(*c as u64)).cloned().unwrap_or_else(|| c.to_string());
        let sheet = contact_sheet(dir, &name, list)?;
        let path = out.join(format!("instances-{c:05}.png"));
        save(&sheet, &path)?;
        files.push(path);
    }

    let path = out.join("clip-scores.png");
    save(&histogram(&records, threshold), &path)?;
    files.push(path);

    let dataset = dir.join("dataset");
    if dataset.exists() {
        use burn_dataset::Dataset;
        let shards = divergen_dataset::ShardDataset::open(&dataset).map_err(|e| e.to_string())?;
        for i in 0..shards.len().min(samples) {
            let sample = shards.get(i).map_err(|e| e.to_string())?;
            let path = out.join(format!("sample-{i:03}.png"));
            let drawn = outlined(&sample)?;
            // Small images are blown up (nearest neighbour, so outlines stay crisp).
            let zoom = (512 / drawn.width().max(1)).max(1);
            let drawn = imageops::resize(
                &drawn,
                drawn.width() * zoom,
                drawn.height() * zoom,
                imageops::FilterType::Nearest,
            );
            save(&drawn, &path)?;
            files.push(path);
        }
    }
    Ok(ReportFiles { files })
}

fn save(image: &RgbImage, path: &Path) -> Result<()> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    divergen_dataset::files::write_atomically(path, &png).map_err(Error::io(path))
}

/// Kept instances on the left (green frames), rejected on the right (red), best score first;
/// each cell shows the crop over a checkerboard (so transparency shows) and its score.
fn contact_sheet(dir: &Path, name: &str, list: &[&InstanceRecord]) -> Result<RgbImage> {
    let mut kept: Vec<&InstanceRecord> = list.iter().copied().filter(|r| r.kept).collect();
    let mut rejected: Vec<&InstanceRecord> = list.iter().copied().filter(|r| !r.kept && r.crop.is_some()).collect();
    let by_score = |a: &&InstanceRecord, b: &&InstanceRecord| {
        b.clip_score
            .unwrap_or(f32::MIN)
            .total_cmp(&a.clip_score.unwrap_or(f32::MIN))
    };
    kept.sort_by(by_score);
    rejected.sort_by(by_score);
    let others = list.len() - kept.len() - rejected.len();
    let rows = kept.len().max(rejected.len()).div_ceil(COLUMNS as usize).max(1) as u32;
    let header = 40;
    let panel = COLUMNS * (CELL + 4);
    let mut sheet = RgbImage::from_pixel(2 * panel + 24, header + rows * (CELL + 16) + 8, PAPER);
    text(
        &mut sheet,
        8,
        6,
        &format!(
            "{name}: {} kept, {} rejected by CLIP, {others} dropped by SAM",
            kept.len(),
            rejected.len()
        ),
        INK,
        2,
    );
    text(&mut sheet, 8, 26, "kept", GREEN, 1);
    text(&mut sheet, panel + 16, 26, "rejected", RED, 1);
    for (side, records, colour) in [(0, &kept, GREEN), (1, &rejected, RED)] {
        for (i, r) in records.iter().enumerate() {
            let (col, row) = (i as u32 % COLUMNS, i as u32 / COLUMNS);
            let x = 8 + side * (panel + 8) + col * (CELL + 4);
            let y = header + row * (CELL + 16);
            let Some(crop) = &r.crop else { continue };
            let path = dir.join(crop);
            let rgba = image::open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .into_rgba8();
            cell(&mut sheet, x, y, &rgba, colour);
            if let Some(s) = r.clip_score {
                text(&mut sheet, x + 2, y + CELL + 4, &format!("{s:.3}"), INK, 1);
            }
        }
    }
    Ok(sheet)
}

fn cell(sheet: &mut RgbImage, x: u32, y: u32, rgba: &RgbaImage, frame: Rgb<u8>) {
    let inner = CELL - 6;
    let scale = inner as f32 / rgba.width().max(rgba.height()) as f32;
    let (w, h) = (
        ((rgba.width() as f32 * scale).round() as u32).max(1),
        ((rgba.height() as f32 * scale).round() as u32).max(1),
    );
    let thumb = imageops::resize(rgba, w, h, imageops::FilterType::Triangle);
    fill(sheet, x, y, CELL, CELL, frame);
    for cy in 0..inner {
        for cx in 0..inner {
            let checker = if (cx / 8 + cy / 8) % 2 == 0 { 235 } else { 205 };
            sheet.put_pixel(x + 3 + cx, y + 3 + cy, Rgb([checker; 3]));
        }
    }
    let (ox, oy) = (x + 3 + (inner - w) / 2, y + 3 + (inner - h) / 2);
    for (px, py, p) in thumb.enumerate_pixels() {
        let a = p[3] as f32 / 255.0;
        let dst = sheet.get_pixel_mut(ox + px, oy + py);
        for c in 0..3 {
            dst[c] = (dst[c] as f32 * (1.0 - a) + p[c] as f32 * a).round() as u8;
        }
    }
}

fn fill(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, colour: Rgb<u8>) {
    for py in y..(y + h).min(img.height()) {
        for px in x..(x + w).min(img.width()) {
            img.put_pixel(px, py, colour);
        }
    }
}

/// CLIP scores in 40 bins, kept in green and rejected in red, the threshold as a dark line.
fn histogram(records: &[InstanceRecord], threshold: f32) -> RgbImage {
    let (w, h, margin) = (640u32, 320u32, 40u32);
    let mut img = RgbImage::from_pixel(w, h, PAPER);
    // Only scores against a real bank share this threshold (text scores have their own).
    let scores: Vec<(f32, bool)> = records
        .iter()
        .filter(|r| r.score_kind == "real-bank")
        .filter_map(|r| r.clip_score.map(|s| (s, r.kept)))
        .collect();
    text(
        &mut img,
        8,
        8,
        &format!(
            "CLIP inter-similarity of {} instances; kept green, rejected red; threshold {threshold}",
            scores.len()
        ),
        INK,
        1,
    );
    let lo = scores
        .iter()
        .map(|s| s.0)
        .fold(threshold, f32::min)
        .min(threshold - 0.05);
    let hi = scores
        .iter()
        .map(|s| s.0)
        .fold(threshold, f32::max)
        .max(threshold + 0.05);
    let bins = 40usize;
    let mut kept = vec![0u32; bins];
    let mut rejected = vec![0u32; bins];
    for &(s, k) in &scores {
        let b = (((s - lo) / (hi - lo)) * bins as f32)
            .floor()
            .clamp(0.0, bins as f32 - 1.0) as usize;
        if k {
            kept[b] += 1;
        } else {
            rejected[b] += 1;
        }
    }
    let top = kept.iter().zip(&rejected).map(|(a, b)| a + b).max().unwrap_or(0).max(1);
    let (plot_w, plot_h) = (w - 2 * margin, h - 2 * margin);
    let bar_w = plot_w / bins as u32;
    for b in 0..bins {
        let x = margin + b as u32 * bar_w;
        let hk = kept[b] * plot_h / top;
        let hr = rejected[b] * plot_h / top;
        fill(&mut img, x, h - margin - hr, bar_w.saturating_sub(1), hr, RED);
        fill(&mut img, x, h - margin - hr - hk, bar_w.saturating_sub(1), hk, GREEN);
    }
    fill(&mut img, margin, h - margin, plot_w, 1, INK);
    let tx = margin + ((threshold - lo) / (hi - lo) * plot_w as f32) as u32;
    fill(&mut img, tx, margin, 2, plot_h, INK);
    text(&mut img, margin, h - margin + 6, &format!("{lo:.2}"), INK, 1);
    text(&mut img, w - margin - 32, h - margin + 6, &format!("{hi:.2}"), INK, 1);
    text(&mut img, tx + 4, margin, &format!("{threshold}"), INK, 1);
    text(&mut img, margin, h - 14, &format!("max bin {top}"), INK, 1);
    img
}

/// The pasted sample with every instance's mask outline: real instances in white, generated
/// ones each in its own colour.
fn outlined(sample: &divergen_protocol::Sample) -> Result<RgbImage> {
    let divergen_protocol::ImageData::Rgb8(rgb) = &sample.image else {
        return Err("dataset image not decoded".into());
    };
    let mut img = RgbImage::from_raw(sample.width, sample.height, rgb.clone()).ok_or("image size mismatch")?;
    let (w, h) = (sample.width as usize, sample.height as usize);
    for (k, inst) in sample.instances.iter().enumerate() {
        let mask = inst.mask.to_row_major();
        let colour = match inst.origin {
            divergen_protocol::Origin::Real => Rgb([255, 255, 255]),
            _ => hue(k),
        };
        for y in 0..h {
            for x in 0..w {
                if mask[y * w + x] == 0 {
                    continue;
                }
                let edge = x == 0
                    || y == 0
                    || x + 1 == w
                    || y + 1 == h
                    || mask[y * w + x - 1] == 0
                    || mask[y * w + x + 1] == 0
                    || mask[(y - 1) * w + x] == 0
                    || mask[(y + 1) * w + x] == 0;
                if edge {
                    img.put_pixel(x as u32, y as u32, colour);
                }
            }
        }
    }
    Ok(img)
}

fn hue(k: usize) -> Rgb<u8> {
    let h = (k as f32 * 0.618_034).fract() * 6.0;
    let x = (1.0 - (h % 2.0 - 1.0).abs()) * 255.0;
    let (r, g, b) = match h as u32 {
        0 => (255.0, x, 0.0),
        1 => (x, 255.0, 0.0),
        2 => (0.0, 255.0, x),
        3 => (0.0, x, 255.0),
        4 => (x, 0.0, 255.0),
        _ => (255.0, 0.0, x),
    };
    Rgb([r as u8, g as u8, b as u8])
}

/// 8×8 bitmap text (the public-domain font8x8 basic set), scaled by `scale`.
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, colour: Rgb<u8>, scale: u32) {
    use font8x8::UnicodeFonts;
    let mut cx = x;
    for ch in s.chars() {
        let glyph = font8x8::BASIC_FONTS.get(ch).or_else(|| font8x8::BASIC_FONTS.get('?'));
        if let Some(rows) = glyph {
            for (gy, row) in rows.iter().enumerate() {
                for gx in 0..8u32 {
                    if row & (1 << gx) != 0 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                let (px, py) = (cx + gx * scale + sx, y + gy as u32 * scale + sy);
                                if px < img.width() && py < img.height() {
                                    img.put_pixel(px, py, colour);
                                }
                            }
                        }
                    }
                }
            }
        }
        cx += 8 * scale;
    }
}

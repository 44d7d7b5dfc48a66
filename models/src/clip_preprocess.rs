//! CLIP's image preprocessing, pixel for pixel the same as transformers' `CLIPImageProcessor`:
//! resize so the shorter side is 224 with Pillow's bicubic filter (its exact fixed-point
//! arithmetic), centre crop 224×224, scale to [0, 1], normalise with CLIP's mean and std.

use image::RgbImage;

pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// transformers' [0.26862954, 0.26130258, 0.27577711], written to f32 precision.
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Pillow's fixed point for 8-bit resampling: 32 bits minus 8 for the value, 2 for the sign and
/// overshoot of negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output position: first input index and fixed-point weights (Pillow's `precompute_coeffs`
/// and `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filter_scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut w: Vec<f64> = (0..xmax)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let fixed = w
                .iter()
                .map(|&v| {
                    let scaled = v * (1u32 << PRECISION_BITS) as f64;
                    (if v < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize(.., BICUBIC)` for RGB8: a horizontal pass over the rows the vertical
/// pass needs, then a vertical pass, rounding to 8 bits in between as Pillow does.
pub fn resize_bicubic(src: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let horizontal = coefficients(in_w, out_w);
    let vertical = coefficients(in_h, out_h);
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let src = src.as_raw();
    // Horizontal pass, only over the source rows the vertical pass reads.
    let (first_row, rows, mut buffer, width) = if need_horizontal {
        let first = vertical.first().map_or(0, |v| v.0);
        let last = vertical.last().map_or(in_h, |v| v.0 + v.1.len());
        let rows = last - first;
        let mut out = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let row = &src[(first + y) * in_w * 3..(first + y + 1) * in_w * 3];
            for (x, (xmin, k)) in horizontal.iter().enumerate() {
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += row[(xmin + i) * 3 + c] as i32 * w;
                    }
                    out[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        (first, rows, out, out_w)
    } else {
        (0, in_h, src.to_vec(), in_w)
    };
    if need_vertical {
        let mut out = vec![0u8; out_h * width * 3];
        for (y, (ymin, k)) in vertical.iter().enumerate() {
            let ymin = ymin - first_row;
            for x in 0..width {
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += buffer[((ymin + i) * width + x) * 3 + c] as i32 * w;
                    }
                    out[(y * width + x) * 3 + c] = clip8(acc);
                }
            }
        }
        buffer = out;
    } else {
        debug_assert_eq!(rows, out_h);
    }
    RgbImage::from_raw(width as u32, out_h as u32, buffer).expect("buffer sized width * height * 3")
}

/// Shorter side to `size` (the longer scaled and truncated, as transformers computes it), then
/// the centred `crop`×`crop` window.
pub fn resize_and_crop(src: &RgbImage, size: u32, crop: u32) -> RgbImage {
    let (w, h) = (src.width(), src.height());
    let (new_w, new_h) = if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as u32)
    } else {
        ((size as f64 * w as f64 / h as f64) as u32, size)
    };
    let resized = resize_bicubic(src, new_w, new_h);
    let (top, left) = (new_h.saturating_sub(crop) / 2, new_w.saturating_sub(crop) / 2);
    image::imageops::crop_imm(&resized, left, top, crop.min(new_w), crop.min(new_h)).to_image()
}

/// `[3, 224, 224]` CHW values ready for the vision tower.
pub fn pixel_values(src: &RgbImage) -> Vec<f32> {
    let crop = resize_and_crop(src, 224, 224);
    let (w, h) = (crop.width() as usize, crop.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, p) in crop.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn crops_equal_transformers_byte_for_byte_and_values_to_float_rounding() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip/preprocess");
        let samples: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("samples.json")).unwrap()).unwrap();
        let images = samples["images"].as_array().unwrap();
        assert!(images.len() >= 7);
        for (i, sample) in images.iter().enumerate() {
            let input = image::open(dir.join(format!("input-{i}.png"))).unwrap().into_rgb8();
            let want = image::open(dir.join(format!("crop-{i}.png"))).unwrap().into_rgb8();
            let got = resize_and_crop(&input, 224, 224);
            let differing = got.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
            assert_eq!(
                differing,
                0,
                "input-{i} ({}x{}): {differing} bytes differ",
                input.width(),
                input.height()
            );
            let values = pixel_values(&input);
            for v in sample["values"].as_array().unwrap() {
                let v: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                let (c, y, x, want) = (v[0] as usize, v[1] as usize, v[2] as usize, v[3] as f32);
                let got = values[c * 224 * 224 + y * 224 + x];
                assert!((got - want).abs() <= 1e-5, "input-{i} [{c},{y},{x}]: {got} vs {want}");
            }
        }
    }
}

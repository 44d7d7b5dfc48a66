//! CLIP's image preprocessing, pixel for pixel the same as transformers' `CLIPImageProcessor`:
//! resize so the shorter side is 224 with Pillow's bicubic filter (its exact fixed-point
//! arithmetic), centre crop 224×224, scale to [0, 1], normalise with CLIP's mean and std.

use image::RgbImage;

use crate::resize::{Filter, resize};

pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// transformers' [0.26862954, 0.26130258, 0.27577711], written to f32 precision.
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Shorter side to `size` (the longer scaled and truncated, as transformers computes it), then
/// the centred `crop`×`crop` window.
pub fn resize_and_crop(src: &RgbImage, size: u32, crop: u32) -> RgbImage {
    let (w, h) = (src.width(), src.height());
    let (new_w, new_h) = if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as u32)
    } else {
        ((size as f64 * w as f64 / h as f64) as u32, size)
    };
    let resized = resize(src, new_w, new_h, Filter::Bicubic);
    let (top, left) = (new_h.saturating_sub(crop) / 2, new_w.saturating_sub(crop) / 2);
    image::imageops::crop_imm(&resized, left, top, crop.min(new_w), crop.min(new_h)).to_image()
}

/// `[3, 224, 224]` CHW values ready for the vision tower.
pub fn pixel_values(src: &RgbImage) -> Vec<f32> {
    pixel_values_sized(src, 224)
}

/// The same for a tower whose `image_size` is `size` (the processor's `size` and `crop_size`).
pub fn pixel_values_sized(src: &RgbImage, size: u32) -> Vec<f32> {
    let crop = resize_and_crop(src, size, size);
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

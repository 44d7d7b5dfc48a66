//! SAM's input and output transforms, matching `ResizeLongestSide` + `Sam.preprocess` and
//! `Sam.postprocess_masks`: the longest side to the encoder size with Pillow's bilinear filter
//! (torchvision resizes PIL images with it), normalisation with ImageNet mean/std in 0–255
//! units, zero padding to a square; masks back up with PyTorch's bilinear interpolation
//! (`align_corners=False`), cropped to the unpadded area, then to the original size.

use image::RgbImage;

use crate::error::ModelError;
use crate::resize::{Filter, resize};

pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// `ResizeLongestSide.get_preprocess_shape`: `(height, width)` with the longest side `target`.
pub fn preprocess_shape(h: usize, w: usize, target: usize) -> (usize, usize) {
    let scale = target as f64 / h.max(w) as f64;
    ((h as f64 * scale + 0.5) as usize, (w as f64 * scale + 0.5) as usize)
}

pub struct Prepared {
    /// `[3, S, S]` CHW.
    pub pixels: Vec<f32>,
    pub original_size: (usize, usize),
    pub input_size: (usize, usize),
}

pub fn prepare(image: &RgbImage, size: usize) -> Result<Prepared, ModelError> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w == 0 || h == 0 {
        return Err(ModelError("the image is empty".into()));
    }
    let (nh, nw) = preprocess_shape(h, w, size);
    let resized = resize(image, nw as u32, nh as u32, Filter::Bilinear);
    let mut pixels = vec![0f32; 3 * size * size];
    for (i, p) in resized.pixels().enumerate() {
        let (y, x) = (i / nw, i % nw);
        for c in 0..3 {
            pixels[c * size * size + y * size + x] = (p.0[c] as f32 - PIXEL_MEAN[c]) / PIXEL_STD[c];
        }
    }
    Ok(Prepared {
        pixels,
        original_size: (h, w),
        input_size: (nh, nw),
    })
}

/// Source index pair and weight along one axis of PyTorch's bilinear `align_corners=False`
/// (no antialias): `src = (dst + 0.5)·in/out - 0.5`, clamped at 0.
fn taps(in_size: usize, out_size: usize) -> Vec<(usize, usize, f32)> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|o| {
            let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(in_size - 1);
            let i1 = (i0 + 1).min(in_size - 1);
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// `F.interpolate(mode="bilinear", align_corners=False)` of one `ih × iw` plane.
fn bilinear(src: &[f32], ih: usize, iw: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (ty, tx) = (taps(ih, oh), taps(iw, ow));
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, ly) in &ty {
        for &(x0, x1, lx) in &tx {
            let top = src[y0 * iw + x0] * (1.0 - lx) + src[y0 * iw + x1] * lx;
            let bottom = src[y1 * iw + x0] * (1.0 - lx) + src[y1 * iw + x1] * lx;
            out.push(top * (1.0 - ly) + bottom * ly);
        }
    }
    out
}

/// Low-resolution logits (`side × side`) → logits at the original image size.
pub fn postprocess(
    low: &[f32],
    side: usize,
    encoder_size: usize,
    input_size: (usize, usize),
    original_size: (usize, usize),
) -> Vec<f32> {
    let full = bilinear(low, side, side, encoder_size, encoder_size);
    let (ih, iw) = input_size;
    let mut crop = Vec::with_capacity(ih * iw);
    for y in 0..ih {
        crop.extend_from_slice(&full[y * encoder_size..y * encoder_size + iw]);
    }
    bilinear(&crop, ih, iw, original_size.0, original_size.1)
}

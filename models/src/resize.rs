//! Pillow's convolution resampling (`Image.resize`) for RGB8, bit for bit: its coefficient
//! computation, its fixed-point arithmetic and its two passes. Reference preprocessors (CLIP's
//! in transformers, SAM's through torchvision) resize with Pillow, so matching their inputs
//! exactly means matching Pillow.

use image::RgbImage;

/// Pillow's fixed point for 8-bit resampling: 32 bits minus 8 for the value, 2 for the sign and
/// overshoot of negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling filters, with the support radius each has at scale 1.
#[derive(Clone, Copy, Debug)]
pub enum Filter {
    /// `Image.BILINEAR` (a triangle; torchvision's default for PIL images).
    Bilinear,
    /// `Image.BICUBIC` (Keys, a = -0.5).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Bicubic => bicubic(x),
        }
    }
}

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
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filter_scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut w: Vec<f64> = (0..xmax)
                .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss))
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

/// Pillow's `Image.resize(.., filter)` for RGB8: a horizontal pass over the rows the vertical
/// pass needs, then a vertical pass, rounding to 8 bits in between as Pillow does.
pub fn resize(src: &RgbImage, out_w: u32, out_h: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let horizontal = coefficients(in_w, out_w, filter);
    let vertical = coefficients(in_h, out_h, filter);
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

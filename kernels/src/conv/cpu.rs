//! The CPU engine's convolutions. A dense convolution is a GEMM of the weight `[CO, CI·KH·KW]`
//! with im2col columns, gathered for one tile of output pixels at a time so the columns stay in
//! cache (never the whole `CI·KH·KW × OH·OW` matrix: 2.4 GB for SD's VAE at 512²); tiles run on
//! rayon's threads, each writing its own output columns. 1×1 stride-1 convolutions read the
//! input as the columns directly. Depthwise convolutions and upsampling run per channel plane.

use rayon::prelude::*;

use super::ConvShape;
use crate::gemm::cpu::{SharedOut, gemm_into};

/// Bytes of im2col columns per tile: about half of a core's L2.
const COLUMN_TILE_BYTES: usize = 512 * 1024;

pub fn conv2d(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
    let (k_len, pixels) = (s.ci * s.kh * s.kw, s.oh * s.ow);
    let mut out = vec![0f32; s.n * s.co * pixels];
    if out.is_empty() {
        return out;
    }
    for (plane, value) in out.chunks_mut(pixels).zip(bias.iter().cycle()) {
        plane.fill(*value);
    }
    let pointwise = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == 0;
    let tile = if pointwise {
        pixels
    } else {
        (COLUMN_TILE_BYTES / 4 / k_len.max(1)).clamp(16, pixels.max(16)) / 16 * 16
    };
    let tiles_per_image = pixels.div_ceil(tile);
    let tiles = s.n * tiles_per_image;
    let dst = SharedOut(out.as_mut_ptr());
    let one = |t: usize, threads: bool| {
        let (image, p0) = (t / tiles_per_image, (t % tiles_per_image) * tile);
        let width = tile.min(pixels - p0);
        let image_x = &x[image * s.ci * s.h * s.w..][..s.ci * s.h * s.w];
        // SAFETY: tile `t` writes columns p0..p0+width of image `image`'s output rows only.
        let at = unsafe { dst.ptr().add(image * s.co * pixels + p0) };
        if pointwise {
            unsafe { gemm_into(at, pixels, weight, image_x, (s.co, width, k_len), false, true, threads) };
            return;
        }
        let columns = im2col(image_x, s, p0, width);
        unsafe { gemm_into(at, pixels, weight, &columns, (s.co, width, k_len), false, true, threads) };
    };
    if tiles == 1 {
        one(0, true);
    } else {
        (0..tiles).into_par_iter().for_each(|t| one(t, false));
    }
    out
}

/// Columns `[CI·KH·KW, width]` for output pixels `p0..p0 + width` of one image.
fn im2col(x: &[f32], s: &ConvShape, p0: usize, width: usize) -> Vec<f32> {
    let mut columns = vec![0f32; s.ci * s.kh * s.kw * width];
    let mut row = 0;
    for ci in 0..s.ci {
        let plane = &x[ci * s.h * s.w..][..s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let dst = &mut columns[row * width..][..width];
                for (j, value) in dst.iter_mut().enumerate() {
                    let p = p0 + j;
                    let iy = (p / s.ow * s.stride + ky) as isize - s.pad as isize;
                    let ix = (p % s.ow * s.stride + kx) as isize - s.pad as isize;
                    if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                        *value = plane[iy as usize * s.w + ix as usize];
                    }
                }
                row += 1;
            }
        }
    }
    columns
}

/// Depthwise (`groups = C`): `s` from [`super::depthwise_shape`].
pub fn depthwise(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
    let pixels = s.oh * s.ow;
    let mut out = vec![0f32; s.n * s.co * pixels];
    out.par_chunks_mut(pixels.max(1)).enumerate().for_each(|(nc, plane)| {
        let c = nc % s.co;
        let input = &x[nc * s.h * s.w..][..s.h * s.w];
        let taps = &weight[c * s.kh * s.kw..][..s.kh * s.kw];
        plane.fill(bias[c]);
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let tap = taps[ky * s.kw + kx];
                for oy in 0..s.oh {
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    if iy < 0 || iy as usize >= s.h {
                        continue;
                    }
                    let row = &input[iy as usize * s.w..][..s.w];
                    let dst = &mut plane[oy * s.ow..][..s.ow];
                    for (ox, value) in dst.iter_mut().enumerate() {
                        let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                        if ix >= 0 && (ix as usize) < s.w {
                            *value += tap * row[ix as usize];
                        }
                    }
                }
            }
        }
    });
    out
}

pub fn upsample(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; planes * 4 * h * w];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(4 * h * w).enumerate().for_each(|(p, plane)| {
        let input = &x[p * h * w..][..h * w];
        for (oy, row) in plane.chunks_mut(2 * w).enumerate() {
            let src = &input[oy / 2 * w..][..w];
            for (pair, &v) in row.chunks_mut(2).zip(src) {
                pair.fill(v);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};

    #[test]
    fn convolutions_match_the_reference() {
        // 3×3 padded, strided, 1×1 pointwise, SAM's 16×16 patch embedding, many tiles.
        for (x_dims, w_dims, stride, pad) in [
            ([2, 5, 9, 11], [7, 5, 3, 3], 1, 1),
            ([1, 4, 17, 13], [6, 4, 3, 3], 2, 1),
            ([2, 8, 6, 7], [5, 8, 1, 1], 1, 0),
            ([1, 3, 32, 32], [8, 3, 16, 16], 16, 0),
            ([1, 32, 40, 40], [16, 32, 3, 3], 1, 1),
        ] {
            let s = ConvShape::of(&x_dims, &w_dims, stride, pad);
            let x = random_vec(x_dims.iter().product(), 1, 1.0);
            let w = random_vec(w_dims.iter().product(), 2, 0.3);
            let b = random_vec(w_dims[0], 3, 1.0);
            assert_close(
                &conv2d(&x, &w, &b, &s),
                &super::super::reference_conv2d(&x, &w, &b, &s),
                1e-5,
                &format!("cpu conv2d {x_dims:?} * {w_dims:?} stride {stride} pad {pad}"),
            );
        }
        for (x_dims, k, stride, pad) in [
            ([2, 6, 9, 11], 3, 1, 1),
            ([1, 4, 16, 15], 3, 2, 1),
            ([1, 3, 8, 8], 7, 1, 3),
        ] {
            let w_dims = [x_dims[1], 1, k, k];
            let s = super::super::depthwise_shape(&x_dims, &w_dims, stride, pad);
            let x = random_vec(x_dims.iter().product(), 4, 1.0);
            let w = random_vec(w_dims.iter().product(), 5, 0.3);
            let b = random_vec(x_dims[1], 6, 1.0);
            assert_close(
                &depthwise(&x, &w, &b, &s),
                &super::super::reference_depthwise(&x, &w, &b, &s),
                1e-5,
                &format!("cpu depthwise {x_dims:?} k{k} stride {stride}"),
            );
        }
        let x = random_vec(3 * 5 * 7, 7, 1.0);
        assert_eq!(upsample(&x, 3, 5, 7), super::super::reference_upsample(&x, 3, 5, 7));
    }
}

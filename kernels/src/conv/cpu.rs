//! The CPU engine's convolutions. On AVX-512 and on AVX2 + FMA a dense convolution is direct:
//! register tiles of output channels × pixels over small gathered panels (see [`direct`]).
//! Otherwise (NEON, portable, 1×1 kernels) it is a GEMM of the weight `[CO, CI·KH·KW]` with im2col columns, gathered for one tile of output
//! pixels at a time so the columns stay in cache (never the whole `CI·KH·KW × OH·OW` matrix:
//! 2.4 GB for SD's VAE at 512²); tiles run on rayon's threads, each writing its own output
//! columns. 1×1 stride-1 convolutions read the input as the columns directly. Depthwise
//! convolutions and upsampling run per channel plane.

use rayon::prelude::*;

use super::ConvShape;
use crate::cpu_math::dispatch_simd;
use crate::gemm::cpu::{SharedOut, gemm_into};

/// Bytes of im2col columns per tile: about half of a core's L2.
const COLUMN_TILE_BYTES: usize = 512 * 1024;

pub fn conv2d(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if direct::applies(s) && s.ci > 0 {
        let mut out = vec![0f32; s.n * s.co * s.oh * s.ow];
        direct::conv2d(x, weight, bias, s, &mut out);
        return out;
    }
    conv2d_im2col(x, weight, bias, s)
}

/// Without AVX-512 or AVX2 + FMA (and for 1×1 kernels, which are plain products): im2col tiles
/// into the `gemm` crate, whose micro-kernels cover NEON and the portable case.
fn conv2d_im2col(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
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
    im2col_into(x, s, p0, width, &mut columns, width);
    columns
}

/// Writes the columns of [`im2col`] into `dst` at row stride `stride` (≥ `width`), zeros
/// included. Each column row is gathered one output row at a time: the in-bounds taps of a row
/// are one contiguous run of the input row (a copy at stride 1).
fn im2col_into(x: &[f32], s: &ConvShape, p0: usize, width: usize, dst: &mut [f32], stride: usize) {
    let mut dst_rows = dst.chunks_exact_mut(stride.max(1));
    for ci in 0..s.ci {
        let plane = &x[ci * s.h * s.w..][..s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let Some(dst) = dst_rows.next() else { return };
                dst.fill(0.0);
                // Output columns whose tap `kx` lands inside the row: ox·stride + kx − pad ∈ [0, w).
                let ox_lo = s.pad.saturating_sub(kx).div_ceil(s.stride).min(s.ow);
                let ox_hi = (s.w + s.pad).saturating_sub(kx).div_ceil(s.stride).min(s.ow);
                let mut p = p0;
                while p < p0 + width {
                    let (oy, ox0) = (p / s.ow, p % s.ow);
                    let ox1 = s.ow.min(ox0 + p0 + width - p);
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    let (lo, hi) = (ox_lo.max(ox0), ox_hi.min(ox1));
                    if iy >= 0 && (iy as usize) < s.h && lo < hi {
                        let row = &plane[iy as usize * s.w..][..s.w];
                        let out = &mut dst[p - p0 + (lo - ox0)..][..hi - lo];
                        let first = lo * s.stride + kx - s.pad;
                        if s.stride == 1 {
                            out.copy_from_slice(&row[first..][..hi - lo]);
                        } else {
                            for (o, v) in out.iter_mut().zip(row[first..].iter().step_by(s.stride)) {
                                *o = *v;
                            }
                        }
                    }
                    p += ox1 - ox0;
                }
            }
        }
    }
}

/// Direct convolution on AVX-512 (or AVX2 + FMA, [`tile_avx2`]), any stride. The output is cut into segments of 64 pixels,
/// and the input a segment reads is gathered into one small panel that stays in L1/L2:
/// - rows at least 64 wide, stride 1: a segment is 64 pixels of one output row, and its panel
///   the `CI·KH` input rows it reads, 64 + KW − 1 wide (the KW taps are shifted loads of it);
/// - otherwise: a segment is 64 consecutive pixels of the plane, across rows (at 8×8 the whole
///   plane, not an eighth-full row), and its panel their im2col columns, `CI·KH·KW × 64`.
///
/// A micro-tile is 6 output channels × 64 pixels, 24 zmm accumulators; each step loads 64 panel
/// values once and multiplies them by 6 weights broadcast straight from the weight's own rows:
/// six sequential streams, so no per-call repacking (59 MB for a 1280-channel UNet conv, more
/// than its product at 8²). Small planes split their output channels over tasks too.
#[cfg(target_arch = "x86_64")]
mod direct {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{ConvShape, im2col_into};
    use crate::gemm::cpu::SharedOut;

    const CO_TILE: usize = 6;
    const VECS: usize = 4;
    const SEGMENT: usize = 16 * VECS;

    pub(super) fn applies(s: &ConvShape) -> bool {
        s.kh * s.kw > 1 && (crate::cpu_math::has_avx512() || crate::cpu_math::has_avx2_fma())
    }

    /// How a segment's panel is laid out: `rows` panel rows of `width` values, each read at
    /// `taps` shifts (panel row `r`, shift `kx` meets weight column `r·taps + kx`).
    #[derive(Clone, Copy)]
    struct Panel {
        rows: usize,
        width: usize,
        taps: usize,
    }

    pub(super) fn conv2d(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape, out: &mut [f32]) {
        let (pixels, k_len) = (s.oh * s.ow, s.ci * s.kh * s.kw);
        let by_rows = s.stride == 1 && s.ow >= SEGMENT;
        let (panel, segments) = if by_rows {
            let panel = Panel {
                rows: s.ci * s.kh,
                width: SEGMENT + s.kw - 1,
                taps: s.kw,
            };
            (panel, s.oh * s.ow.div_ceil(SEGMENT))
        } else {
            (
                Panel {
                    rows: k_len,
                    width: SEGMENT,
                    taps: 1,
                },
                pixels.div_ceil(SEGMENT),
            )
        };
        // The first pixel of a segment and how many it holds.
        let segment = |i: usize| {
            if by_rows {
                let per_row = s.ow.div_ceil(SEGMENT);
                let ox0 = i % per_row * SEGMENT;
                (i / per_row * s.ow + ox0, SEGMENT.min(s.ow - ox0))
            } else {
                (i * SEGMENT, SEGMENT.min(pixels - i * SEGMENT))
            }
        };
        let blocks = s.co.div_ceil(CO_TILE);
        // Enough tasks for every thread several times over, each still a few co blocks.
        let wanted = 4 * rayon::current_num_threads();
        let groups = wanted.div_ceil(s.n * segments).clamp(1, blocks);
        let per_group = blocks.div_ceil(groups);
        let dst = SharedOut(out.as_mut_ptr());
        let wide = crate::cpu_math::has_avx512();
        (0..s.n * segments * groups).into_par_iter().for_each_init(
            || vec![0f32; panel.rows * panel.width],
            |values, task| {
                let (image, i, group) = (task / (segments * groups), task / groups % segments, task % groups);
                let (p0, valid) = segment(i);
                let input = &x[image * s.ci * s.h * s.w..][..s.ci * s.h * s.w];
                if by_rows {
                    gather_rows(input, s, p0 / s.ow, p0 % s.ow, panel.width, values);
                } else {
                    im2col_into(input, s, p0, valid, values, SEGMENT);
                }
                for block in group * per_group..blocks.min((group + 1) * per_group) {
                    let co0 = block * CO_TILE;
                    let rows = s.co.min(co0 + CO_TILE) - co0;
                    // SAFETY: AVX-512, or else AVX2 + FMA, is present (`applies`); this task alone
                    // writes pixels p0..p0 + valid of channels co0..co0 + rows of image `image`.
                    unsafe {
                        let at = dst.ptr().add((image * s.co + co0) * pixels + p0);
                        let weights = &weight[co0 * k_len..][..rows * k_len];
                        let bias = &bias[co0..co0 + rows];
                        if wide {
                            tile(values, panel, weights, bias, valid, at, pixels);
                        } else {
                            tile_avx2(values, panel, weights, bias, valid, at, pixels);
                        }
                    }
                }
            },
        );
    }

    /// Panel row `ci·KH + ky`, column `c`: input pixel (`oy + ky − pad`, `ox0 + c − pad`) of
    /// channel `ci`, zero where that falls in the padding.
    fn gather_rows(input: &[f32], s: &ConvShape, oy: usize, ox0: usize, width: usize, panel: &mut [f32]) {
        let c_lo = s.pad.saturating_sub(ox0).min(width);
        let c_hi = (s.w + s.pad).saturating_sub(ox0).min(width).max(c_lo);
        for ci in 0..s.ci {
            for ky in 0..s.kh {
                let dst = &mut panel[(ci * s.kh + ky) * width..][..width];
                let iy = (oy + ky) as isize - s.pad as isize;
                if iy < 0 || iy as usize >= s.h || c_lo == c_hi {
                    dst.fill(0.0);
                    continue;
                }
                let row = &input[(ci * s.h + iy as usize) * s.w..][..s.w];
                dst[..c_lo].fill(0.0);
                dst[c_lo..c_hi].copy_from_slice(&row[ox0 + c_lo - s.pad..ox0 + c_hi - s.pad]);
                dst[c_hi..].fill(0.0);
            }
        }
    }

    /// One micro-tile: `bias.len()` (≤ 6) output channels, whose weight rows `weights` holds
    /// back to back, × the segment's `valid` pixels, from the gathered panel.
    ///
    /// # Safety
    /// AVX-512F must be present; `out` must be valid for the tile's writes at channel stride
    /// `pixels`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        values: &[f32],
        panel: Panel,
        weights: &[f32],
        bias: &[f32],
        valid: usize,
        out: *mut f32,
        pixels: usize,
    ) {
        let k_len = panel.rows * panel.taps;
        let mut acc = [[_mm512_setzero_ps(); VECS]; CO_TILE];
        for (r, b) in bias.iter().enumerate() {
            acc[r] = [_mm512_set1_ps(*b); VECS];
        }
        // A missing channel of the last block reads the block's first row again; its sums are
        // never stored.
        let rows: [&[f32]; CO_TILE] = std::array::from_fn(|r| {
            let r = if r < bias.len() { r } else { 0 };
            &weights[r * k_len..][..k_len]
        });
        for (r, row) in values.chunks_exact(panel.width).take(panel.rows).enumerate() {
            for kx in 0..panel.taps {
                let column = &row[kx..][..SEGMENT];
                let t = r * panel.taps + kx;
                let mut xv = [_mm512_setzero_ps(); VECS];
                for (v, x) in xv.iter_mut().enumerate() {
                    // SAFETY: `column` holds 16·VECS floats.
                    *x = unsafe { _mm512_loadu_ps(column.as_ptr().add(16 * v)) };
                }
                for (r, weight_row) in rows.iter().enumerate() {
                    // SAFETY: t < k_len, the length of every row.
                    let wv = _mm512_set1_ps(unsafe { *weight_row.get_unchecked(t) });
                    for v in 0..VECS {
                        acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(bias.len()) {
            for (v, value) in row.iter().enumerate() {
                let lanes = valid.saturating_sub(16 * v).min(16);
                if lanes == 0 {
                    break;
                }
                let mask = ((1u32 << lanes) - 1) as u16;
                // SAFETY: the caller's tile holds `valid` pixels of `bias.len()` channel rows.
                unsafe { _mm512_mask_storeu_ps(out.add(r * pixels + 16 * v), mask, *value) };
            }
        }
    }

    /// [`tile`] for AVX2 + FMA: the segment as four runs of 16 pixels, each 6 channels × 2 ymm
    /// (12 accumulators of the 16 registers); the weights are broadcast again per run, from L1.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `out` as for [`tile`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(
        values: &[f32],
        panel: Panel,
        weights: &[f32],
        bias: &[f32],
        valid: usize,
        out: *mut f32,
        pixels: usize,
    ) {
        const RUN: usize = 16;
        let k_len = panel.rows * panel.taps;
        let rows: [&[f32]; CO_TILE] = std::array::from_fn(|r| {
            let r = if r < bias.len() { r } else { 0 };
            &weights[r * k_len..][..k_len]
        });
        for run in 0..valid.div_ceil(RUN) {
            let mut acc = [[_mm256_setzero_ps(); 2]; CO_TILE];
            for (r, b) in bias.iter().enumerate() {
                acc[r] = [_mm256_set1_ps(*b); 2];
            }
            for (r, row) in values.chunks_exact(panel.width).take(panel.rows).enumerate() {
                for kx in 0..panel.taps {
                    let column = &row[kx + run * RUN..][..RUN];
                    let t = r * panel.taps + kx;
                    // SAFETY: `column` holds 16 floats.
                    let (x0, x1) = unsafe {
                        (
                            _mm256_loadu_ps(column.as_ptr()),
                            _mm256_loadu_ps(column.as_ptr().add(8)),
                        )
                    };
                    for (r, weight_row) in rows.iter().enumerate() {
                        // SAFETY: t < k_len, the length of every row.
                        let wv = _mm256_set1_ps(unsafe { *weight_row.get_unchecked(t) });
                        acc[r][0] = _mm256_fmadd_ps(wv, x0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(wv, x1, acc[r][1]);
                    }
                }
            }
            let lanes = (valid - run * RUN).min(RUN);
            for (r, sums) in acc.iter().enumerate().take(bias.len()) {
                // SAFETY: the caller's tile holds `valid` pixels of `bias.len()` channel rows.
                unsafe { crate::cpu_math::store_ymm_pair(out.add(r * pixels + run * RUN), *sums, lanes) };
            }
        }
    }
}

/// Depthwise (`groups = C`): `s` from [`super::depthwise_shape`]. Each tap adds one run of an
/// input row to one output row: the in-bounds columns are computed up front, so the inner loop
/// is a branch-free multiply-add that vectorizes (at stride 1 a contiguous run).
pub fn depthwise(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
    let pixels = s.oh * s.ow;
    let mut out = vec![0f32; s.n * s.co * pixels];
    out.par_chunks_mut(pixels.max(1)).enumerate().for_each(|(nc, plane)| {
        let c = nc % s.co;
        let input = &x[nc * s.h * s.w..][..s.h * s.w];
        depthwise_plane(plane, input, &weight[c * s.kh * s.kw..][..s.kh * s.kw], bias[c], s);
    });
    out
}

dispatch_simd!(depthwise_plane, fn(plane: &mut [f32], input: &[f32], taps: &[f32], bias: f32, s: &ConvShape) {
    plane.fill(bias);
    for ky in 0..s.kh {
        for kx in 0..s.kw {
            let tap = taps[ky * s.kw + kx];
            // Output columns whose input column ox·stride + kx − pad lies in [0, w).
            let lo = s.pad.saturating_sub(kx).div_ceil(s.stride).min(s.ow);
            let hi = (s.w + s.pad).saturating_sub(kx).div_ceil(s.stride).clamp(lo, s.ow);
            if lo == hi {
                continue;
            }
            for oy in 0..s.oh {
                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                if iy < 0 || iy as usize >= s.h {
                    continue;
                }
                let row = &input[iy as usize * s.w..][..s.w];
                let dst = &mut plane[oy * s.ow + lo..oy * s.ow + hi];
                let first = lo * s.stride + kx - s.pad;
                if s.stride == 1 {
                    for (o, &v) in dst.iter_mut().zip(&row[first..]) {
                        *o = tap.mul_add(v, *o);
                    }
                } else {
                    for (o, &v) in dst.iter_mut().zip(row[first..].iter().step_by(s.stride)) {
                        *o = tap.mul_add(v, *o);
                    }
                }
            }
        }
    }
});

/// [`depthwise`] on channels-last memory: `x` is `[N, H, W, C]` and so is the result (`[N, OH,
/// OW, C]`). Each output pixel adds its taps' input pixels, whole channel runs at a time, with
/// the weights repacked tap-major so each tap's channels are contiguous too.
pub fn depthwise_channels_last(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
    let c = s.co;
    let mut taps = vec![0f32; s.kh * s.kw * c];
    for (ch, kernel) in weight.chunks_exact(s.kh * s.kw).enumerate().take(c) {
        for (t, &v) in kernel.iter().enumerate() {
            taps[t * c + ch] = v;
        }
    }
    let mut out = vec![0f32; s.n * s.oh * s.ow * c];
    out.par_chunks_mut((s.ow * c).max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            let (image, oy) = (row / s.oh.max(1), row % s.oh.max(1));
            let input = &x[image * s.h * s.w * c..][..s.h * s.w * c];
            depthwise_row_channels_last(dst, input, &taps, bias, s, oy);
        });
    out
}

dispatch_simd!(depthwise_row_channels_last, fn(dst: &mut [f32], input: &[f32], taps: &[f32], bias: &[f32], s: &ConvShape, oy: usize) {
    let c = s.co;
    for (ox, pixel) in dst.chunks_exact_mut(c).enumerate() {
        pixel.copy_from_slice(bias);
        for ky in 0..s.kh {
            let iy = (oy * s.stride + ky) as isize - s.pad as isize;
            if iy < 0 || iy as usize >= s.h {
                continue;
            }
            for kx in 0..s.kw {
                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                if ix < 0 || ix as usize >= s.w {
                    continue;
                }
                let src = &input[(iy as usize * s.w + ix as usize) * c..][..c];
                let tap = &taps[(ky * s.kw + kx) * c..][..c];
                for ((o, &v), &t) in pixel.iter_mut().zip(src).zip(tap) {
                    *o = t.mul_add(v, *o);
                }
            }
        }
    }
});

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
            // Segments across rows, a partial last segment, 5×5 with pad 2,
            // an unpadded 3×3 and a 7×7 wider than its input row, on several images.
            ([2, 3, 5, 150], [13, 3, 3, 3], 1, 1),
            ([1, 9, 21, 70], [8, 9, 5, 5], 1, 2),
            ([1, 4, 12, 66], [7, 4, 3, 3], 1, 0),
            ([3, 2, 6, 5], [6, 2, 7, 7], 1, 3),
            // A plane smaller than one segment, its channels split over tasks.
            ([1, 16, 8, 8], [40, 16, 3, 3], 1, 1),
        ] {
            let s = ConvShape::of(&x_dims, &w_dims, stride, pad);
            let x = random_vec(x_dims.iter().product(), 1, 1.0);
            let w = random_vec(w_dims.iter().product(), 2, 0.3);
            let b = random_vec(w_dims[0], 3, 1.0);
            let want = super::super::reference_conv2d(&x, &w, &b, &s);
            let context = format!("{x_dims:?} * {w_dims:?} stride {stride} pad {pad}");
            assert_close(&conv2d(&x, &w, &b, &s), &want, 1e-5, &format!("cpu conv2d {context}"));
            assert_close(
                &conv2d_im2col(&x, &w, &b, &s),
                &want,
                1e-5,
                &format!("im2col {context}"),
            );
        }
        // Depthwise, on NCHW memory and on channels-last `[N, H, W, C]` memory.
        let to_nhwc = |v: &[f32], [_, c, h, w]: [usize; 4]| -> Vec<f32> {
            let mut out = vec![0f32; v.len()];
            for (i, &value) in v.iter().enumerate() {
                let (b, ch, y, x) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
                out[((b * h + y) * w + x) * c + ch] = value;
            }
            out
        };
        for (x_dims, k, stride, pad) in [
            ([2, 6, 9, 11], 3, 1, 1),
            ([1, 4, 16, 15], 3, 2, 1),
            ([1, 3, 8, 8], 7, 1, 3),
            ([1, 20, 16, 15], 3, 2, 1),
            ([1, 3, 8, 8], 5, 1, 2),
        ] {
            let w_dims = [x_dims[1], 1, k, k];
            let s = super::super::depthwise_shape(&x_dims, &w_dims, stride, pad);
            let x = random_vec(x_dims.iter().product(), 4, 1.0);
            let w = random_vec(w_dims.iter().product(), 5, 0.3);
            let b = random_vec(x_dims[1], 6, 1.0);
            let want = super::super::reference_depthwise(&x, &w, &b, &s);
            let context = format!("{x_dims:?} k{k} stride {stride}");
            assert_close(
                &depthwise(&x, &w, &b, &s),
                &want,
                1e-5,
                &format!("cpu depthwise {context}"),
            );
            assert_close(
                &depthwise_channels_last(&to_nhwc(&x, x_dims), &w, &b, &s),
                &to_nhwc(&want, [s.n, s.co, s.oh, s.ow]),
                1e-5,
                &format!("cpu channels-last depthwise {context}"),
            );
        }
        let x = random_vec(3 * 5 * 7, 7, 1.0);
        assert_eq!(upsample(&x, 3, 5, 7), super::super::reference_upsample(&x, 3, 5, 7));
    }
}

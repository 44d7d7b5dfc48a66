//! The CPU engine's norms and softmax: one row (or group) per rayon task, two passes in f32 with
//! the mean subtracted before squaring (so large offsets do not cancel), written in slices the
//! compiler vectorises.

use rayon::prelude::*;

use super::GroupNormShape;
use crate::cpu_math::{self, dispatch_simd, lane_sum};

dispatch_simd!(mean_and_rstd, fn(v: &[f32], eps: f32) -> (f32, f32) {
    let len = v.len() as f32;
    let mean = lane_sum(v, |x| x) / len;
    let var = lane_sum(v, |x| (x - mean) * (x - mean)) / len;
    (mean, 1.0 / (var + eps).sqrt())
});

dispatch_simd!(scale_shift, fn(dst: &mut [f32], src: &[f32], g: f32, b: f32, fuse_silu: bool) {
    if fuse_silu {
        for (o, &v) in dst.iter_mut().zip(src) {
            let y = v * g + b;
            *o = y / (1.0 + cpu_math::exp(-y));
        }
    } else {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = v * g + b;
        }
    }
});

dispatch_simd!(softmax_row, fn(dst: &mut [f32], src: &[f32]) {
    let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = cpu_math::exp(v - max);
    }
    let inv = 1.0 / lane_sum(dst, |x| x);
    for o in dst.iter_mut() {
        *o *= inv;
    }
});

pub fn group_norm(
    x: &[f32],
    shape: GroupNormShape,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    fuse_silu: bool,
) -> Vec<f32> {
    let GroupNormShape { c, spatial, groups, .. } = shape;
    let per = c / groups * spatial;
    let mut out = vec![0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(ng, (dst, src))| {
            let (mean, rstd) = mean_and_rstd(src, eps);
            let first = (ng % groups) * (c / groups);
            for (ch, (d, s)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate() {
                let (g, b) = (
                    gamma[first + ch] * rstd,
                    beta[first + ch] - mean * rstd * gamma[first + ch],
                );
                scale_shift(d, s, g, b, fuse_silu);
            }
        });
    out
}

pub fn layer_norm(x: &[f32], d: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(dst, src)| {
        let (mean, rstd) = mean_and_rstd(src, eps);
        for ((o, &v), (&g, &b)) in dst.iter_mut().zip(src).zip(gamma.iter().zip(beta)) {
            *o = (v - mean) * rstd * g + b;
        }
    });
    out
}

pub fn softmax(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(dst, src)| softmax_row(dst, src));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};

    #[test]
    fn norms_and_softmax_match_the_reference() {
        let shape = GroupNormShape {
            n: 2,
            c: 64,
            spatial: 37,
            groups: 8,
        };
        let x: Vec<f32> = random_vec(2 * 64 * 37, 1, 3.0).iter().map(|v| v + 5.0).collect();
        let (g, b) = (random_vec(64, 2, 1.0), random_vec(64, 3, 1.0));
        for silu in [false, true] {
            assert_close(
                &group_norm(&x, shape, &g, &b, 1e-6, silu),
                &super::super::reference_group_norm(&x, shape, &g, &b, 1e-6, silu),
                1e-5,
                "cpu group norm",
            );
        }
        let x = random_vec(7 * 768, 4, 2.0);
        let (g, b) = (random_vec(768, 5, 1.0), random_vec(768, 6, 1.0));
        assert_close(
            &layer_norm(&x, 768, &g, &b, 1e-5),
            &super::super::reference_layer_norm(&x, 768, &g, &b, 1e-5),
            1e-5,
            "cpu layer norm",
        );
        let x = random_vec(9 * 77, 7, 8.0);
        assert_close(
            &softmax(&x, 77),
            &super::super::reference_softmax(&x, 77),
            1e-6,
            "cpu softmax",
        );
    }
}

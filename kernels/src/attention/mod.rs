//! Fused multi-head attention `softmax(Q·Kᵀ·scale)·V` with an online softmax.
//!
//! Shapes: `Q [B, H, Sq, D]`, `K` and `V [B, H, Skv, D]` → `[B, H, Sq, D]`. Self-attention has
//! `Skv = Sq`; Stable Diffusion's cross-attention has `Skv = 77` text tokens. `D` must be a
//! multiple of 4 (vec4 loads) and at most 256 (the query and accumulator live in registers).

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::tensor::DType;

use crate::launch::{WgslKernel, as_u32, binding, dims, empty_like_device, params};
use crate::tuning::Tile;

const TEMPLATE: &str = include_str!("attention.wgsl");
pub const MAX_HEAD_DIM: usize = 256;

pub(crate) fn launch(q: CubeTensor, k: CubeTensor, v: CubeTensor, scale: f32) -> CubeTensor {
    for t in [&q, &k, &v] {
        assert_eq!(t.dtype, DType::F32, "attention: f32 only, got {:?}", t.dtype);
    }
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let (qd, kd, vd) = (dims(&q), dims(&k), dims(&v));
    assert!(
        qd.len() == 4 && kd.len() == 4 && vd.len() == 4,
        "attention: Q, K, V must be [B, H, S, D], got {qd:?} {kd:?} {vd:?}"
    );
    assert!(
        qd[..2] == kd[..2] && kd == vd && qd[3] == kd[3],
        "attention: shapes disagree: Q {qd:?}, K {kd:?}, V {vd:?}"
    );
    let (bh, sq, skv, d) = (qd[0] * qd[1], qd[2], kd[2], qd[3]);
    assert!(
        d % 4 == 0 && d <= MAX_HEAD_DIM,
        "attention: head dim {d} must be a multiple of 4 and ≤ {MAX_HEAD_DIM}"
    );
    let out = empty_like_device(&q, q.meta.shape().clone(), DType::F32);
    if bh == 0 || sq == 0 {
        return out;
    }
    assert!(skv > 0, "attention: no keys");
    let tile = Tile::attention();
    let p = params(&q.client, &[as_u32(sq, "Sq"), as_u32(skv, "Skv"), scale.to_bits(), 0]);
    let groups = (
        as_u32(sq.div_ceil(tile.wg_x as usize), "query groups"),
        as_u32(bh, "batch·heads"),
        1,
    );
    assert!(
        groups.1 <= crate::launch::MAX_GROUPS_PER_DIM,
        "attention: batch·heads = {bh} exceeds one dispatch"
    );
    WgslKernel::new("attention", TEMPLATE)
        .var("d4", d / 4)
        .var("kb", tile.tm)
        .launch(
            &q.client,
            (tile.wg_x, 1, 1),
            groups,
            vec![binding(&q), binding(&k), binding(&v), binding(&out), p],
        );
    out
}

/// CPU reference: the textbook formula with the full score row, f64 throughout.
pub fn reference(q: &[f32], k: &[f32], v: &[f32], bh: usize, sq: usize, skv: usize, d: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; bh * sq * d];
    let mut scores = vec![0f64; skv];
    for h in 0..bh {
        for i in 0..sq {
            let qi = &q[(h * sq + i) * d..][..d];
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &k[(h * skv + j) * d..][..d];
                *s = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64;
            }
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let denom: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..d {
                let acc: f64 = (0..skv)
                    .map(|j| (scores[j] - max).exp() * v[(h * skv + j) * d + c] as f64)
                    .sum();
                out[(h * sq + i) * d + c] = (acc / denom) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, for_each_device, random_vec, to_vec, upload};
    use burn::tensor::Tensor;

    fn check(b: usize, h: usize, sq: usize, skv: usize, d: usize, seed: u64) {
        let q = random_vec(b * h * sq * d, seed, 1.0);
        let k = random_vec(b * h * skv * d, seed + 1, 1.0);
        let v = random_vec(b * h * skv * d, seed + 2, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let want = reference(&q, &k, &v, b * h, sq, skv, d, scale);
        for_each_device(|dev, label| {
            let got = crate::attention(
                upload::<4>(&q, &[b, h, sq, d], dev),
                upload::<4>(&k, &[b, h, skv, d], dev),
                upload::<4>(&v, &[b, h, skv, d], dev),
                scale,
            );
            assert_eq!(got.dims(), [b, h, sq, d]);
            assert_close(
                &to_vec(got),
                &want,
                1e-5,
                &format!("{label} attention b{b} h{h} sq{sq} skv{skv} d{d}"),
            );
        });
    }

    #[test]
    fn self_attention_matches_reference() {
        check(2, 3, 67, 67, 64, 60); // 67 keys: blocks do not divide it
    }

    #[test]
    fn cross_attention_with_77_text_tokens() {
        check(1, 8, 50, 77, 40, 61); // SD 1.5 head dim 40
    }

    #[test]
    fn single_key_and_single_query() {
        check(1, 1, 1, 1, 8, 62);
        check(1, 2, 3, 1, 4, 63);
    }

    #[test]
    fn large_scores_do_not_overflow() {
        let (sq, d) = (9, 16);
        let q = random_vec(sq * d, 64, 30.0);
        let k = random_vec(sq * d, 65, 30.0);
        let v = random_vec(sq * d, 66, 1.0);
        let want = reference(&q, &k, &v, 1, sq, sq, d, 1.0);
        for_each_device(|dev, label| {
            let t = |x: &[f32]| upload::<4>(x, &[1, 1, sq, d], dev);
            let got = to_vec(crate::attention(t(&q), t(&k), t(&v), 1.0));
            assert!(got.iter().all(|x| x.is_finite()), "{label}: non-finite output");
            assert_close(&got, &want, 1e-4, &format!("{label} attention with scores ~1e4"));
        });
    }
}

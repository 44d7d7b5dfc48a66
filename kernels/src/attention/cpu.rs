//! The CPU engine's fused attention: for each head and block of queries, scores against one block
//! of keys at a time (a small GEMM), an online softmax (running maximum and sum per query, the
//! accumulator rescaled when the maximum moves), and `P·V` added into the output block — the
//! `Sq×Skv` score matrix never exists. SAM's decomposed relative-position bias is added to each
//! score block as it is made. Blocks of queries run on rayon's threads.

use rayon::prelude::*;

use super::AttentionShape;
use crate::cpu_math::{self, dispatch_simd};
use crate::gemm::cpu::gemm_into;

/// Queries per job: the key block is packed once per job, so taller blocks pack it less often
/// (at 32, SAM's 4096-token global attention re-packed every key block 128 times a head).
const QUERY_BLOCK: usize = 128;
const KEY_BLOCK: usize = 256;

/// `(bias_h [bh·sq·kh], bias_w [bh·sq·kw], kw)`, as [`super::reference_with_bias`] takes it.
pub type RelPos<'a> = (&'a [f32], &'a [f32], usize);

pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, scale: f32, bias: Option<RelPos>) -> Vec<f32> {
    let AttentionShape { bh, sq, skv, d } = shape;
    let mut out = vec![0f32; bh * sq * d];
    if out.is_empty() || skv == 0 {
        return out;
    }
    let blocks = sq.div_ceil(QUERY_BLOCK);
    // Query blocks never straddle heads: walk (head, block) pairs and their output rows.
    let mut jobs: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(bh * blocks);
    let mut rest = out.as_mut_slice();
    for h in 0..bh {
        for b in 0..blocks {
            let rows = QUERY_BLOCK.min(sq - b * QUERY_BLOCK);
            let (mine, tail) = rest.split_at_mut(rows * d);
            jobs.push((h, b * QUERY_BLOCK, mine));
            rest = tail;
        }
    }
    jobs.into_par_iter().for_each(|(h, q0, o)| {
        let rows = o.len() / d;
        let qb = &q[(h * sq + q0) * d..][..rows * d];
        let (kh, vh) = (&k[h * skv * d..][..skv * d], &v[h * skv * d..][..skv * d]);
        let mut scores = vec![0f32; rows * KEY_BLOCK.min(skv)];
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        for k0 in (0..skv).step_by(KEY_BLOCK) {
            let kb = KEY_BLOCK.min(skv - k0);
            let s = &mut scores[..rows * kb];
            // SAFETY: `s` is this job's own [rows, kb] buffer.
            unsafe {
                gemm_into(s.as_mut_ptr(), kb, qb, &kh[k0 * d..], (rows, kb, d), true, false, false);
            }
            for i in 0..rows {
                let row = &mut s[i * kb..][..kb];
                let biases = bias.map(|(bias_h, bias_w, kw)| {
                    let (r, n_kh) = (h * sq + q0 + i, skv / kw);
                    (&bias_h[r * n_kh..][..n_kh], &bias_w[r * kw..][..kw])
                });
                let rescale = softmax_block(row, scale, biases, k0, &mut max[i], &mut sum[i]);
                if rescale != 1.0 {
                    for x in &mut o[i * d..][..d] {
                        *x *= rescale;
                    }
                }
            }
            // SAFETY: `o` is this job's own [rows, d] output block.
            unsafe {
                gemm_into(o.as_mut_ptr(), d, s, &vh[k0 * d..], (rows, d, kb), false, true, false);
            }
        }
        for (i, row) in o.chunks_mut(d).enumerate() {
            let inv = 1.0 / sum[i];
            for x in row {
                *x *= inv;
            }
        }
    });
    out
}

dispatch_simd!(softmax_block, fn(row: &mut [f32], scale: f32, bias: Option<(&[f32], &[f32])>, k0: usize, max: &mut f32, sum: &mut f32) -> f32 {
    // One block of scores for one query: scale, add the relative-position bias, then the online
    // softmax's step. Returns the factor the running output must be rescaled by.
    for x in row.iter_mut() {
        *x *= scale;
    }
    if let Some((bias_h, bias_w)) = bias {
        // Keys are a grid `kh × kw`, row-major: walk its rows instead of dividing per key.
        let kw = bias_w.len();
        let (mut j, mut key) = (0, k0);
        while j < row.len() {
            let (kr, kc) = (key / kw, key % kw);
            let run = (kw - kc).min(row.len() - j);
            let bh = bias_h[kr];
            for (x, bw) in row[j..j + run].iter_mut().zip(&bias_w[kc..kc + run]) {
                *x += bh + bw;
            }
            j += run;
            key += run;
        }
    }
    let block_max = cpu_math::lane_max(row, f32::NEG_INFINITY, |x| x);
    let new_max = max.max(block_max);
    let rescale = cpu_math::exp(*max - new_max);
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = cpu_math::exp(*x - new_max);
            *s += *x;
        }
    }
    let mut block_sum = 0f32;
    for x in chunks.into_remainder() {
        *x = cpu_math::exp(*x - new_max);
        block_sum += *x;
    }
    block_sum += sums.iter().sum::<f32>();
    *sum = *sum * rescale + block_sum;
    *max = new_max;
    // On the first block the old maximum is −∞ and the factor ~1e-38: it scales zeros.
    rescale
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};

    #[test]
    fn matches_the_reference_with_and_without_relative_positions() {
        for (bh, sq, skv, d) in [(6, 67, 67, 64), (8, 50, 77, 40), (1, 1, 1, 8), (2, 40, 600, 16)] {
            let q = random_vec(bh * sq * d, 1, 1.0);
            let k = random_vec(bh * skv * d, 2, 1.0);
            let v = random_vec(bh * skv * d, 3, 1.0);
            let shape = AttentionShape { bh, sq, skv, d };
            let scale = 1.0 / (d as f32).sqrt();
            assert_close(
                &attention(&q, &k, &v, shape, scale, None),
                &super::super::reference(&q, &k, &v, shape, scale),
                1e-5,
                &format!("cpu attention {shape:?}"),
            );
        }
        let (bh, grid, d) = (3, (7, 9), 16);
        let s = grid.0 * grid.1;
        let (q, k, v) = (
            random_vec(bh * s * d, 4, 1.0),
            random_vec(bh * s * d, 5, 1.0),
            random_vec(bh * s * d, 6, 1.0),
        );
        let (bias_h, bias_w) = (random_vec(bh * s * grid.0, 7, 1.0), random_vec(bh * s * grid.1, 8, 1.0));
        let shape = AttentionShape { bh, sq: s, skv: s, d };
        let bias = Some((&bias_h[..], &bias_w[..], grid.1));
        assert_close(
            &attention(&q, &k, &v, shape, 0.25, bias),
            &super::super::reference_with_bias(&q, &k, &v, shape, 0.25, bias),
            1e-5,
            "cpu attention with relative positions",
        );
    }
}

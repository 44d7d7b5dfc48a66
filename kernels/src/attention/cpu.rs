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
    *sum = *sum * rescale + exp_and_sum(row, new_max);
    *max = new_max;
    // On the first block the old maximum is −∞ and the factor ~1e-38: it scales zeros.
    rescale
});

/// `row[j] = exp(row[j] − max)`, returning their sum, in 16 independent lanes so the loop
/// vectorizes (a single running sum would chain every addition). Inlined into each ISA's build
/// of its callers.
#[inline(always)]
fn exp_and_sum(row: &mut [f32], max: f32) -> f32 {
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (sum, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = cpu_math::exp(*x - max);
            *sum += *x;
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = cpu_math::exp(*x - max);
        tail += *x;
    }
    tail + sums.iter().sum::<f32>()
}

/// Attention straight from a QKV projection's output, with a full additive bias per head, as
/// TinyViT's windows use it: `qkv [windows, s, heads, 3·d]` (each head's `[q | k | v]` side by
/// side, the layout the projection writes) and `bias [heads, s, s]` → `[windows, s, heads·d]`,
/// the layout the output projection reads. Nothing is permuted or copied out first: each
/// window's heads gather their keys transposed into a small panel, and every query's scores,
/// softmax and `P·V` happen in registers-sized rows. Windows run on rayon's threads.
pub fn packed_qkv_with_bias(
    qkv: &[f32],
    (windows, s, heads, d): (usize, usize, usize, usize),
    scale: f32,
    bias: &[f32],
) -> Vec<f32> {
    let c = heads * d;
    assert_eq!(
        qkv.len(),
        windows * s * 3 * c,
        "packed attention: qkv holds {} values",
        qkv.len()
    );
    assert_eq!(
        bias.len(),
        heads * s * s,
        "packed attention: bias holds {} values",
        bias.len()
    );
    let mut out = vec![0f32; windows * s * c];
    if out.is_empty() {
        return out;
    }
    let padded = s.div_ceil(KEY_RUN) * KEY_RUN;
    out.par_chunks_mut(s * c).enumerate().for_each_init(
        || (vec![0f32; d * padded], vec![0f32; padded]),
        |(keys_t, scores), (w, dst)| {
            let window = &qkv[w * s * 3 * c..][..s * 3 * c];
            for h in 0..heads {
                // Keys transposed, `[d][padded]`: a query's scores are then `d` multiply-adds of
                // whole key runs. The padding columns stay zero and are never read back.
                for (j, token) in window.chunks_exact(3 * c).enumerate() {
                    for (t, &value) in token[h * 3 * d + d..][..d].iter().enumerate() {
                        keys_t[t * padded + j] = value;
                    }
                }
                window_head(
                    window,
                    dst,
                    keys_t,
                    scores,
                    &bias[h * s * s..][..s * s],
                    (s, c, h, d),
                    scale,
                );
            }
        },
    );
    out
}

/// Keys whose scores one pass keeps in registers (8 ymm, 4 zmm).
const KEY_RUN: usize = 64;
/// Output features one `P·V` pass keeps in registers.
const VALUE_RUN: usize = 32;

dispatch_simd!(window_head, fn(window: &[f32], dst: &mut [f32], keys_t: &[f32], scores: &mut [f32], bias: &[f32], shape: (usize, usize, usize, usize), scale: f32) {
    let (s, c, h, d) = shape;
    let padded = scores.len();
    for i in 0..s {
        let q = &window[i * 3 * c + h * 3 * d..][..d];
        for k0 in (0..padded).step_by(KEY_RUN) {
            let mut run = [0f32; KEY_RUN];
            let live = KEY_RUN.min(s - k0);
            run[..live].copy_from_slice(&bias[i * s + k0..][..live]);
            for (t, &qv) in q.iter().enumerate() {
                let qv = qv * scale;
                let keys = &keys_t[t * padded + k0..][..KEY_RUN];
                for (score, &kv) in run.iter_mut().zip(keys) {
                    *score = qv.mul_add(kv, *score);
                }
            }
            scores[k0..k0 + KEY_RUN].copy_from_slice(&run);
        }
        let live = &mut scores[..s];
        let max = cpu_math::lane_max(live, f32::NEG_INFINITY, |x| x);
        let inv = 1.0 / exp_and_sum(live, max);
        let o = &mut dst[i * c + h * d..][..d];
        let mut t0 = 0;
        while t0 + VALUE_RUN <= d {
            let mut acc = [0f32; VALUE_RUN];
            for (j, &p) in live.iter().enumerate() {
                let v = &window[j * 3 * c + h * 3 * d + 2 * d + t0..][..VALUE_RUN];
                for (a, &vv) in acc.iter_mut().zip(v) {
                    *a = p.mul_add(vv, *a);
                }
            }
            for (ov, a) in o[t0..t0 + VALUE_RUN].iter_mut().zip(acc) {
                *ov = a * inv;
            }
            t0 += VALUE_RUN;
        }
        if t0 < d {
            let rest = &mut o[t0..];
            rest.fill(0.0);
            for (j, &p) in live.iter().enumerate() {
                let v = &window[j * 3 * c + h * 3 * d + 2 * d + t0..][..d - t0];
                for (ov, &vv) in rest.iter_mut().zip(v) {
                    *ov = p.mul_add(vv, *ov);
                }
            }
            for ov in rest.iter_mut() {
                *ov *= inv;
            }
        }
    }
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

    #[test]
    fn packed_qkv_with_bias_matches_a_direct_evaluation() {
        for (windows, s, heads, d) in [
            (3, 49, 4, 32),
            (2, 9, 2, 8),
            (1, 1, 1, 4),
            (1, 20, 3, 12),
            (1, 130, 2, 40),
        ] {
            let c = heads * d;
            let qkv = random_vec(windows * s * 3 * c, 11, 1.0);
            let bias = random_vec(heads * s * s, 12, 1.0);
            let scale = 1.0 / (d as f32).sqrt();
            let mut want = vec![0f32; windows * s * c];
            for w in 0..windows {
                let at = |i: usize, h: usize, part: usize, t: usize| {
                    qkv[((w * s + i) * heads + h) * 3 * d + part * d + t] as f64
                };
                for h in 0..heads {
                    for i in 0..s {
                        let scores: Vec<f64> = (0..s)
                            .map(|j| {
                                let dot: f64 = (0..d).map(|t| at(i, h, 0, t) * at(j, h, 1, t)).sum();
                                dot * scale as f64 + bias[(h * s + i) * s + j] as f64
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        for t in 0..d {
                            let v: f64 = (0..s).map(|j| e[j] * at(j, h, 2, t)).sum();
                            want[(w * s + i) * c + h * d + t] = (v / sum) as f32;
                        }
                    }
                }
            }
            assert_close(
                &packed_qkv_with_bias(&qkv, (windows, s, heads, d), scale, &bias),
                &want,
                1e-5,
                &format!("packed qkv attention {windows}×{s}, {heads} heads of {d}"),
            );
        }
    }
}

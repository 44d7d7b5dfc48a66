//! Fused multi-head attention `softmax(Q·Kᵀ·scale)·V` with an online softmax.
//!
//! Shapes: `Q [B, H, Sq, D]`, `K` and `V [B, H, Skv, D]` → `[B, H, Sq, D]`. Self-attention has
//! `Skv = Sq`; Stable Diffusion's cross-attention has `Skv = 77` text tokens. `D` must be a
//! multiple of 4 (vec4 loads) and at most 256 (the query and accumulator live in registers).
//!
//! With a [`RelPosBias`] the keys are a `KH×KW` grid and each score gains
//! `bias_h[.., i, j / KW] + bias_w[.., i, j % KW]`: SAM's decomposed relative positions, added
//! inside the kernel so the `Sq×Skv` bias never exists (64 MiB per head for a 64×64 image grid).

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::tensor::DType;

use crate::launch::{WgslKernel, as_u32, binding, dims, empty_like_device, params};
use crate::tuning::Tile;
use crate::variants::Attention;

pub mod cpu;

const TEMPLATE: &str = include_str!("attention.wgsl");
const SHARED: &str = include_str!("attention_shared.wgsl");
pub const MAX_HEAD_DIM: usize = 256;

/// Decomposed relative-position bias: `h [B, H, Sq, KH]` and `w [B, H, Sq, KW]`, `KH·KW = Skv`.
pub(crate) struct RelPosBias {
    pub h: CubeTensor,
    pub w: CubeTensor,
}

pub(crate) fn launch(q: CubeTensor, k: CubeTensor, v: CubeTensor, scale: f32, bias: Option<RelPosBias>) -> CubeTensor {
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
    let bias = bias.map(|b| {
        let (h, w) = (into_contiguous(b.h), into_contiguous(b.w));
        let (hd, wd) = (dims(&h), dims(&w));
        assert!(
            hd.len() == 4 && wd.len() == 4 && hd[..3] == qd[..3] && wd[..3] == qd[..3] && hd[3] * wd[3] == skv,
            "attention: relative-position bias {hd:?} + {wd:?} does not fit Q {qd:?} with {skv} keys"
        );
        (h, w, wd[3])
    });
    let out = empty_like_device(&q, q.meta.shape().clone(), DType::F32);
    if bh == 0 || sq == 0 {
        return out;
    }
    assert!(skv > 0, "attention: no keys");
    let tile = Tile::attention(crate::tuning::on_cpu(&q.client));
    // Registers hold 2·TQ·D/4 vec4s: keep that near 128 for wide heads.
    let tq = tile.tnv.min((512 / d as u32).max(1));
    let kw = bias.as_ref().map_or(0, |b| b.2);
    let p = params(
        &q.client,
        &[as_u32(sq, "Sq"), as_u32(skv, "Skv"), scale.to_bits(), as_u32(kw, "KW")],
    );
    let groups = (
        as_u32(sq.div_ceil(tile.wg_x as usize), "query groups"),
        as_u32(bh, "batch·heads"),
        1,
    );
    assert!(
        groups.1 <= crate::launch::MAX_GROUPS_PER_DIM,
        "attention: batch·heads = {bh} exceeds one dispatch"
    );
    let has_bias = bias.is_some();
    let mut buffers = vec![binding(&q), binding(&k), binding(&v), binding(&out), p];
    if let Some((h, w, _)) = &bias {
        buffers.extend([binding(h), binding(w)]);
    }
    let plan = crate::variants::plan_for(&q);
    let d4 = d as u32 / 4;
    let kernel = if plan.attention == Attention::Shared {
        // The tile is a whole number of unrolled key blocks, and a block fits the tile.
        let fit = plan.attention_keys_per_tile(d);
        let kb = tile.tm.min(fit);
        let kt = fit / kb * kb;
        WgslKernel::new("attention_shared", SHARED)
            .var("kt", kt)
            .var("tile_len", kt * d4)
            .var("kb", kb)
            .generated("body", move || body_code(tq, kb, d4, has_bias, true))
    } else {
        WgslKernel::new("attention", TEMPLATE)
            .var("kb", tile.tm)
            .generated("body", move || body_code(tq, tile.tm, d4, has_bias, false))
    };
    kernel
        .var("d4", d4)
        .var("tq", tq)
        .var("bias", has_bias)
        .generated("bias_bindings", move || bias_bindings_code(has_bias))
        .generated("decls", move || decls_code(tq, d4))
        .generated("store", move || store_code(tq, d4))
        .launch(&q.client, (tile.wg_x, 1, 1), groups, buffers);
    out
}

fn bias_bindings_code(bias: bool) -> String {
    if bias {
        "@group(0) @binding(5) var<storage, read_write> bias_h: array<f32>;\n\
         @group(0) @binding(6) var<storage, read_write> bias_w: array<f32>;\n"
            .into()
    } else {
        String::new()
    }
}

/// Per query t: its row index (clamped; results of rows past Sq are not stored), the scaled
/// query q{t}_{d}, accumulators a{t}_{d}, running max m{t} and denominator l{t}.
fn decls_code(tq: u32, d4: u32) -> String {
    let mut s = String::new();
    for t in 0..tq {
        s += &format!(
            "    let qr{t} = head * p.sq + min(row0 + {t}u, p.sq - 1u);\n    let qb{t} = qr{t} * D4;\n    var m{t} = NEG;\n    var l{t} = 0.0;\n"
        );
        for d in 0..d4 {
            s += &format!("    let q{t}_{d} = q[qb{t} + {d}u] * scale;\n    var a{t}_{d} = vec4<f32>(0.0);\n");
        }
    }
    s
}

/// One block of `kb` keys: scores, one rescale per query, then the weighted values. `shared`:
/// K and V come from the staged tile (`ks`, `vs`, starting at key `t0`), not device memory.
fn body_code(tq: u32, kb: u32, d4: u32, bias: bool, shared: bool) -> String {
    let (ka, va) = if shared { ("ks", "vs") } else { ("k", "v") };
    let mut s = String::new();
    for u in 0..kb {
        if shared {
            s += &format!("        let kr{u} = (j0 - t0 + {u}u) * D4;\n");
        } else {
            s += &format!("        let kr{u} = kv_base + min(j0 + {u}u, p.skv - 1u) * D4;\n");
        }
        for d in 0..d4 {
            s += &format!("        let k{u}_{d} = {ka}[kr{u} + {d}u];\n");
        }
        if bias {
            s += &format!(
                "        let kh{u} = min(j0 + {u}u, p.skv - 1u) / p.kw;\n        let kw{u} = min(j0 + {u}u, p.skv - 1u) % p.kw;\n"
            );
        }
        for t in 0..tq {
            let terms: Vec<String> = (0..d4).map(|d| format!("q{t}_{d} * k{u}_{d}")).collect();
            s += &format!("        let dv{t}_{u} = {};\n", terms.join(" + "));
            let extra = if bias {
                format!(" + bias_h[qr{t} * (p.skv / p.kw) + kh{u}] + bias_w[qr{t} * p.kw + kw{u}]")
            } else {
                String::new()
            };
            s += &format!(
                "        let s{t}_{u} = select(NEG, dv{t}_{u}.x + dv{t}_{u}.y + dv{t}_{u}.z + dv{t}_{u}.w{extra}, j0 + {u}u < p.skv);\n"
            );
        }
    }
    for t in 0..tq {
        let maxes = (0..kb).fold(format!("m{t}"), |acc, u| format!("max({acc}, s{t}_{u})"));
        s += &format!(
            "        let bm{t} = {maxes};\n        let corr{t} = exp(m{t} - bm{t});\n        l{t} *= corr{t};\n        m{t} = bm{t};\n"
        );
        for d in 0..d4 {
            s += &format!("        a{t}_{d} *= corr{t};\n");
        }
    }
    for u in 0..kb {
        for d in 0..d4 {
            s += &format!("        let v{u}_{d} = {va}[kr{u} + {d}u];\n");
        }
        for t in 0..tq {
            s += &format!("        let p{t}_{u} = exp(s{t}_{u} - m{t});\n        l{t} += p{t}_{u};\n");
            for d in 0..d4 {
                s += &format!("        a{t}_{d} = fma(vec4<f32>(p{t}_{u}), v{u}_{d}, a{t}_{d});\n");
            }
        }
    }
    s
}

fn store_code(tq: u32, d4: u32) -> String {
    let mut s = String::new();
    for t in 0..tq {
        s += &format!("    if (row0 + {t}u < p.sq) {{\n        let inv{t} = 1.0 / l{t};\n");
        for d in 0..d4 {
            s += &format!("        o[qb{t} + {d}u] = a{t}_{d} * inv{t};\n");
        }
        s += "    }\n";
    }
    s
}

/// CPU reference: the textbook formula with the full score row, f64 throughout.
/// Attention problem size: `bh` = batch·heads, `sq` queries and `skv` keys of width `d`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub bh: usize,
    pub sq: usize,
    pub skv: usize,
    pub d: usize,
}

pub fn reference(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, scale: f32) -> Vec<f32> {
    reference_with_bias(q, k, v, shape, scale, None)
}

/// The reference with a decomposed relative-position bias: `(bias_h [bh·sq·kh], bias_w
/// [bh·sq·kw], kw)`.
pub fn reference_with_bias(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    bias: Option<(&[f32], &[f32], usize)>,
) -> Vec<f32> {
    let AttentionShape { bh, sq, skv, d } = shape;
    let mut out = vec![0f32; bh * sq * d];
    let mut scores = vec![0f64; skv];
    for h in 0..bh {
        for i in 0..sq {
            let qi = &q[(h * sq + i) * d..][..d];
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &k[(h * skv + j) * d..][..d];
                *s = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64;
                if let Some((bias_h, bias_w, kw)) = bias {
                    let (row, kh) = (h * sq + i, skv / kw);
                    *s += bias_h[row * kh + j / kw] as f64 + bias_w[row * kw + j % kw] as f64;
                }
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
    use crate::testing::{assert_close, for_each_kernel_device, random_vec, relative_error, to_vec, upload};

    fn check(b: usize, h: usize, sq: usize, skv: usize, d: usize, seed: u64) {
        let q = random_vec(b * h * sq * d, seed, 1.0);
        let k = random_vec(b * h * skv * d, seed + 1, 1.0);
        let v = random_vec(b * h * skv * d, seed + 2, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let want = reference(&q, &k, &v, AttentionShape { bh: b * h, sq, skv, d }, scale);
        for_each_kernel_device(|dev, label| {
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

    fn check_rel_pos(bh: usize, grid: (usize, usize), d: usize, seed: u64) {
        let (kh, kw) = grid;
        let s = kh * kw;
        let q = random_vec(bh * s * d, seed, 1.0);
        let k = random_vec(bh * s * d, seed + 1, 1.0);
        let v = random_vec(bh * s * d, seed + 2, 1.0);
        let bias_h = random_vec(bh * s * kh, seed + 3, 2.0);
        let bias_w = random_vec(bh * s * kw, seed + 4, 2.0);
        let scale = 1.0 / (d as f32).sqrt();
        let shape = AttentionShape { bh, sq: s, skv: s, d };
        let want = reference_with_bias(&q, &k, &v, shape, scale, Some((&bias_h, &bias_w, kw)));
        let plain = reference(&q, &k, &v, shape, scale);
        assert!(
            relative_error(&plain, &want) > 1e-2,
            "the bias must matter in this test"
        );
        for_each_kernel_device(|dev, label| {
            let got = crate::attention_rel_pos(
                upload::<4>(&q, &[1, bh, s, d], dev),
                upload::<4>(&k, &[1, bh, s, d], dev),
                upload::<4>(&v, &[1, bh, s, d], dev),
                upload::<4>(&bias_h, &[1, bh, s, kh], dev),
                upload::<4>(&bias_w, &[1, bh, s, kw], dev),
                scale,
            );
            assert_close(
                &to_vec(got),
                &want,
                1e-5,
                &format!("{label} attention with rel-pos bias, {bh} heads, {kh}x{kw} grid, d{d}"),
            );
        });
    }

    #[test]
    fn relative_position_bias_on_sam_window() {
        check_rel_pos(3, (14, 14), 64, 70); // SAM ViT-B's 14×14 windows, head dim 64
    }

    #[test]
    fn relative_position_bias_on_a_non_square_grid() {
        check_rel_pos(2, (5, 9), 16, 71);
    }

    #[test]
    fn large_scores_do_not_overflow() {
        let (sq, d) = (9, 16);
        let q = random_vec(sq * d, 64, 30.0);
        let k = random_vec(sq * d, 65, 30.0);
        let v = random_vec(sq * d, 66, 1.0);
        let want = reference(&q, &k, &v, AttentionShape { bh: 1, sq, skv: sq, d }, 1.0);
        for_each_kernel_device(|dev, label| {
            let t = |x: &[f32]| upload::<4>(x, &[1, 1, sq, d], dev);
            let got = to_vec(crate::attention(t(&q), t(&k), t(&v), 1.0));
            assert!(got.iter().all(|x| x.is_finite()), "{label}: non-finite output");
            assert_close(&got, &want, 1e-4, &format!("{label} attention with scores ~1e4"));
        });
    }
}

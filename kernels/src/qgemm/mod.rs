//! Weight-only quantized GEMM/GEMV: `Y [.., N] = X [.., K] · Wᵀ` with `W [N, K]` in the int8 or
//! int4 layout of [`crate::quant`], dequantized inside the kernel with f32 accumulation.

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::tensor::{DType, Shape};

use crate::codegen::{LANES, vec4_of};
use crate::gemm::load_rows_fragment;
use crate::launch::{WgslKernel, as_u32, binding, dims, empty_like_device, params};
use crate::quant::{INT4_BLOCK, Int4Weights, Int8Weights};
use crate::tuning::Tile;

pub mod cpu;
pub mod dot;

const TEMPLATE: &str = include_str!("qgemm.wgsl");
const DOT4: &str = include_str!("qgemm_dot4.wgsl");
const QUANTIZE_ROWS: &str = include_str!("quantize_rows.wgsl");

/// Rows × channels per invocation of the packed-dot product, and its workgroup.
const DOT4_TILE: (u32, u32) = (4, 4);
const DOT4_WORKGROUP: (u32, u32) = (16, 4);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    Int8,
    Int4,
}

pub fn out_shape(x: &Shape, out_features: &usize) -> Shape {
    let mut d: Vec<usize> = x.iter().copied().collect();
    if let Some(last) = d.last_mut() {
        *last = *out_features;
    }
    Shape::from(d)
}

/// Rows and accumulators as in the GEMM, plus each channel's clamped index and the offset of its
/// weight row in units of `w`'s element (a u32, or a vec4<u32> when `vec_words`).
fn qgemm_decls(tm: u32, tn: u32, vec_words: bool) -> String {
    let mut s = crate::gemm::tile_code(tm, tn / 4, true, "").decls;
    let row = if vec_words {
        "(p.words_per_row >> 2u)"
    } else {
        "p.words_per_row"
    };
    for j in 0..tn {
        s += &format!("    let c{j} = min(col0 + {j}u, p.n - 1u);\n    let w{j} = c{j} * {row};\n");
    }
    s
}

/// Unrolled int8 body. `vec_words` (K % 16 == 0): one vec4<u32> (16 values) per channel per
/// step of 16; otherwise one word (4 values) per step of 4.
fn int8_body(tm: u32, tn: u32, vec_words: bool) -> String {
    let (step, words) = if vec_words { (16, 4) } else { (4, 1) };
    let mut s = format!("    for (var k = 0u; k < p.k; k += {step}u) {{\n        let wk = k / {step}u;\n");
    for j in 0..tn {
        if vec_words {
            s += &format!("        let qv{j} = w[w{j} + wk];\n");
            for (e, lane) in LANES.iter().enumerate() {
                s += &format!("        let q{j}_{e} = unpack_i8(qv{j}.{lane});\n");
            }
        } else {
            s += &format!("        let q{j}_0 = unpack_i8(w[w{j} + wk]);\n");
        }
    }
    for i in 0..tm {
        for e in 0..words {
            s += &format!("        let a{i}_{e} = load_a(0u, r{i}, k + {}u);\n", 4 * e);
        }
        for g in 0..tn / 4 {
            let col = |j: u32| {
                (0..words)
                    .map(|e| format!("dot(a{i}_{e}, q{j}_{e})"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            };
            s += &format!("        acc{i}_{g} += {};\n", vec4_of(4 * g, col));
        }
    }
    s += "    }\n    // One scale per output channel: applied once, after the sum.\n";
    for g in 0..tn / 4 {
        s += &format!("    let s{g} = {};\n", vec4_of(4 * g, |j| format!("scales[c{j}]")));
        for i in 0..tm {
            s += &format!("    acc{i}_{g} *= s{g};\n");
        }
    }
    s
}

/// Unrolled int4 body: one vec4<u32> (a whole 32-value block) per channel per block, partial
/// sums scaled once by the block's f16 scale. Values past K are zero in the layout and X reads
/// zero there, so partial blocks need no special case.
fn int4_body(tm: u32, tn: u32) -> String {
    let mut s = String::from(
        "    let blocks = (p.k + 31u) / 32u;\n    for (var blk = 0u; blk < blocks; blk++) {\n        let k = blk * 32u;\n",
    );
    for j in 0..tn {
        s += &format!("        let v{j} = w[w{j} + blk];\n");
        for (e, lane) in LANES.iter().enumerate() {
            s += &format!(
                "        let lo{j}_{e} = unpack_i4_lo(v{j}.{lane});\n        let hi{j}_{e} = unpack_i4_hi(v{j}.{lane});\n"
            );
        }
    }
    for g in 0..tn / 4 {
        let scales = vec4_of(4 * g, |j| format!("block_scale(c{j}, blocks, blk)"));
        s += &format!("        let s{g} = {scales};\n");
    }
    for i in 0..tm {
        for e in 0..4 {
            s += &format!(
                "        let al{i}_{e} = load_a(0u, r{i}, k + {}u);\n        let ah{i}_{e} = load_a(0u, r{i}, k + {}u);\n",
                8 * e,
                8 * e + 4
            );
        }
        for g in 0..tn / 4 {
            let col = |j: u32| {
                (0..4)
                    .map(|e| format!("dot(al{i}_{e}, lo{j}_{e}) + dot(ah{i}_{e}, hi{j}_{e})"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            };
            s += &format!("        acc{i}_{g} = fma({}, s{g}, acc{i}_{g});\n", vec4_of(4 * g, col));
        }
    }
    s += "    }\n";
    s
}

const INT4_SCALE_FN: &str = "// f16 scales, two a word, row-major [N, blocks].
fn block_scale(channel: u32, blocks: u32, blk: u32) -> f32 {
    let s = channel * blocks + blk;
    return unpack2x16float(scales[s >> 1u])[s & 1u];
}";

/// Launches the quantized product. `scales` is f32 `[N]` (int8) or packed f16 pairs (int4).
pub(crate) fn launch(
    x: CubeTensor,
    words: CubeTensor,
    scales: CubeTensor,
    out_features: usize,
    format: QuantFormat,
) -> CubeTensor {
    assert_eq!(x.dtype, DType::F32, "qgemm: activations must be f32, got {:?}", x.dtype);
    {
        let (t, what) = (&words, "packed weights");
        assert!(
            matches!(t.dtype, DType::I32 | DType::U32),
            "qgemm: {what} must be 32-bit integers, got {:?}",
            t.dtype
        );
    }
    let x = into_contiguous(x);
    let (words, scales) = (into_contiguous(words), into_contiguous(scales));
    let xd = dims(&x);
    let k = *xd.last().expect("qgemm: activations need at least one dimension");
    let m: usize = xd[..xd.len() - 1].iter().product();
    let n = out_features;
    let tile = Tile::qgemm(m, crate::tuning::on_cpu(&x.client));
    let tn = 4 * tile.tnv;
    // Int4 rows are whole 16-byte blocks; int8 rows are when K is a multiple of 16.
    let vec_words = format == QuantFormat::Int4 || k.is_multiple_of(16);
    let (words_per_row, scale_elem, scale_fn, expected_scales) = match format {
        QuantFormat::Int8 => {
            assert_eq!(scales.dtype, DType::F32, "qgemm int8: scales must be f32");
            (Int8Weights::words_per_row(k), "f32", "", n)
        }
        QuantFormat::Int4 => {
            assert!(
                matches!(scales.dtype, DType::I32 | DType::U32),
                "qgemm int4: scales must be packed f16 pairs in 32-bit integers"
            );
            (
                Int4Weights::blocks_per_row(k) * 4,
                "u32",
                INT4_SCALE_FN,
                (n * Int4Weights::blocks_per_row(k)).div_ceil(2),
            )
        }
    };
    let nw: usize = dims(&words).iter().product();
    assert_eq!(
        nw,
        n * words_per_row,
        "qgemm {format:?}: {nw} weight words for N = {n}, K = {k} (expected {})",
        n * words_per_row
    );
    let ns: usize = dims(&scales).iter().product();
    assert_eq!(
        ns, expected_scales,
        "qgemm {format:?}: {ns} scale entries, expected {expected_scales}"
    );

    let out = empty_like_device(&x, out_shape(x.meta.shape(), &n), DType::F32);
    if m == 0 || n == 0 {
        return out;
    }
    if crate::variants::plan_for(&x).qgemm == crate::variants::Qgemm::Dot4 {
        let x_words_per_row = match format {
            QuantFormat::Int8 => words_per_row,
            QuantFormat::Int4 => Int4Weights::blocks_per_row(k) * 8,
        };
        let (xq, xs) = quantize_rows(&x, m, k, x_words_per_row);
        let (tm, tn) = DOT4_TILE;
        let (wg_x, wg_y) = DOT4_WORKGROUP;
        let p = params(
            &x.client,
            &[
                as_u32(m, "M"),
                as_u32(n, "N"),
                as_u32(k, "K"),
                as_u32(words_per_row, "words per row"),
                as_u32(x_words_per_row, "activation words per row"),
                0,
                0,
                0,
            ],
        );
        let groups = (
            as_u32(n.div_ceil(tn as usize).div_ceil(wg_x as usize), "N groups"),
            as_u32(m.div_ceil(tm as usize).div_ceil(wg_y as usize), "M groups"),
            1,
        );
        assert!(
            groups.0 <= crate::launch::MAX_GROUPS_PER_DIM && groups.1 <= crate::launch::MAX_GROUPS_PER_DIM,
            "qgemm: {m}×{n} exceeds one dispatch"
        );
        WgslKernel::new(
            if format == QuantFormat::Int8 {
                "qgemm_dot4_int8"
            } else {
                "qgemm_dot4_int4"
            },
            DOT4,
        )
        .var("scale_elem", scale_elem)
        .var("scale_fn", scale_fn)
        .var("tm", tm)
        .var("tn", tn)
        .generated("body", move || dot4_body(tm, tn, format))
        .launch(
            &x.client,
            (wg_x, wg_y, 1),
            groups,
            vec![xq, xs, binding(&words), binding(&scales), binding(&out), p],
        );
        return out;
    }
    // Aligned rows let X be read as vec4 without guards: K % 4 for int8, whole blocks for int4.
    let aligned = match format {
        QuantFormat::Int8 => k.is_multiple_of(4),
        QuantFormat::Int4 => k.is_multiple_of(INT4_BLOCK),
    };
    let p = params(
        &x.client,
        &[
            as_u32(m, "M"),
            as_u32(n, "N"),
            as_u32(k, "K"),
            as_u32(words_per_row, "words per row"),
        ],
    );
    let groups = (
        as_u32(n.div_ceil(tn as usize).div_ceil(tile.wg_x as usize), "N groups"),
        as_u32(m.div_ceil(tile.tm as usize).div_ceil(tile.wg_y as usize), "M groups"),
        1,
    );
    assert!(
        groups.1 <= crate::launch::MAX_GROUPS_PER_DIM,
        "qgemm: M = {m} exceeds one dispatch"
    );
    WgslKernel::new(
        if format == QuantFormat::Int8 {
            "qgemm_int8"
        } else {
            "qgemm_int4"
        },
        TEMPLATE,
    )
    .var("a_elem", if aligned { "vec4<f32>" } else { "f32" })
    .var("scale_elem", scale_elem)
    .var("tm", tile.tm)
    .var("tn", tn)
    .var("load_a", load_rows_fragment("x", aligned))
    .var("scale_fn", scale_fn)
    .var("w_elem", if vec_words { "vec4<u32>" } else { "u32" })
    .generated("decls", move || qgemm_decls(tile.tm, tn, vec_words))
    .generated("body", move || match format {
        QuantFormat::Int8 => int8_body(tile.tm, tn, vec_words),
        QuantFormat::Int4 => int4_body(tile.tm, tn),
    })
    .generated("store", move || {
        crate::gemm::tile_code(tile.tm, tile.tnv, true, "").store
    })
    .launch(
        &x.client,
        (tile.wg_x, tile.wg_y, 1),
        groups,
        vec![binding(&x), binding(&words), binding(&scales), binding(&out), p],
    );
    out
}

/// Quantizes each row of `x [m, k]` to int8 words (`x_words_per_row` a row, zero-padded) and
/// one f32 scale a row, on the device: the packed-dot product's left operand.
fn quantize_rows(
    x: &CubeTensor,
    m: usize,
    k: usize,
    x_words_per_row: usize,
) -> (burn::cubecl::server::BufferBinding, burn::cubecl::server::BufferBinding) {
    let xq = x.client.empty((m * x_words_per_row * 4).max(4));
    let xs = x.client.empty((m * 4).max(4));
    let p = params(
        &x.client,
        &[
            as_u32(m, "M"),
            as_u32(k, "K"),
            as_u32(x_words_per_row, "activation words per row"),
            0,
        ],
    );
    let (gx, gy) = crate::launch::fold_groups(as_u32(m, "rows"));
    crate::norm::with_reduction(WgslKernel::new("quantize_rows", QUANTIZE_ROWS), x).launch(
        &x.client,
        (64, 1, 1),
        (gx, gy, 1),
        vec![binding(x), xq.clone().binding(), xs.clone().binding(), p],
    );
    (xq.binding(), xs.binding())
}

/// Unrolled body of `qgemm_dot4.wgsl` for `tm` rows × `tn` channels.
fn dot4_body(tm: u32, tn: u32, format: QuantFormat) -> String {
    let mut s = String::new();
    for i in 0..tm {
        s += &format!("    let r{i} = min(row0 + {i}u, p.m - 1u);\n");
    }
    for j in 0..tn {
        s += &format!("    let c{j} = min(col0 + {j}u, p.n - 1u);\n");
    }
    let zero = if format == QuantFormat::Int8 { "0i" } else { "0.0" };
    for i in 0..tm {
        for j in 0..tn {
            s += &format!("    var acc{i}_{j} = {zero};\n");
        }
    }
    match format {
        QuantFormat::Int8 => {
            s += "    for (var wk = 0u; wk < p.words_per_row; wk++) {\n";
            for i in 0..tm {
                s += &format!("        let x{i} = xq[r{i} * p.x_words_per_row + wk];\n");
            }
            for j in 0..tn {
                s += &format!("        let w{j} = w[c{j} * p.words_per_row + wk];\n");
            }
            for i in 0..tm {
                for j in 0..tn {
                    s += &format!("        acc{i}_{j} += dot4I8Packed(x{i}, w{j});\n");
                }
            }
            s += "    }\n";
        }
        QuantFormat::Int4 => {
            s += "    let blocks = p.words_per_row / 4u;\n    for (var blk = 0u; blk < blocks; blk++) {\n";
            for j in 0..tn {
                for e in 0..4 {
                    s += &format!(
                        "        let wv{j}_{e} = w[c{j} * p.words_per_row + blk * 4u + {e}u];\n        let lo{j}_{e} = widen_i4_lo(wv{j}_{e});\n        let hi{j}_{e} = widen_i4_hi(wv{j}_{e});\n"
                    );
                }
                s += &format!("        let s{j} = block_scale(c{j}, blocks, blk);\n");
            }
            for i in 0..tm {
                for e in 0..4 {
                    s += &format!(
                        "        let xl{i}_{e} = xq[r{i} * p.x_words_per_row + blk * 8u + {}u];\n        let xh{i}_{e} = xq[r{i} * p.x_words_per_row + blk * 8u + {}u];\n",
                        2 * e,
                        2 * e + 1
                    );
                }
            }
            for i in 0..tm {
                for j in 0..tn {
                    let terms: Vec<String> = (0..4)
                        .map(|e| format!("dot4I8Packed(xl{i}_{e}, lo{j}_{e}) + dot4I8Packed(xh{i}_{e}, hi{j}_{e})"))
                        .collect();
                    s += &format!(
                        "        acc{i}_{j} = fma(f32({}), s{j}, acc{i}_{j});\n",
                        terms.join(" + ")
                    );
                }
            }
            s += "    }\n";
        }
    }
    for i in 0..tm {
        for j in 0..tn {
            let value = match format {
                QuantFormat::Int8 => format!("f32(acc{i}_{j}) * xs[r{i}] * scales[c{j}]"),
                QuantFormat::Int4 => format!("acc{i}_{j} * xs[r{i}]"),
            };
            s += &format!(
                "    if (row0 + {i}u < p.m && col0 + {j}u < p.n) {{ c[(row0 + {i}u) * p.n + col0 + {j}u] = {value}; }}\n"
            );
        }
    }
    s
}

/// Row-wise int8 quantization as `quantize_rows.wgsl` does it: `(scale, values)` per row, with
/// scale = max|x| / 127 (1 for a zero row) and values round-half-even of `x / scale`.
pub fn quantize_rows_reference(x: &[f32], m: usize, k: usize) -> Vec<(f32, Vec<i8>)> {
    (0..m)
        .map(|r| {
            let row = &x[r * k..][..k];
            let mx = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = if mx == 0.0 { 1.0 } else { mx / 127.0 };
            let q = row
                .iter()
                .map(|v| (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8)
                .collect();
            (scale, q)
        })
        .collect()
}

/// CPU reference of the packed-dot product with int8 weights: exact integer sums, then
/// `sum · x_scale · w_scale` in f32 as the kernel does.
pub fn reference_int8_dot4(x: &[f32], m: usize, w: &Int8Weights) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let xq = quantize_rows_reference(x, m, k);
    let mut out = vec![0f32; m * n];
    for (r, (xs, xv)) in xq.iter().enumerate() {
        for c in 0..n {
            let sum: i32 = (0..k).map(|kk| xv[kk] as i32 * w.value(c, kk) as i32).sum();
            out[r * n + c] = sum as f32 * xs * w.scales[c];
        }
    }
    out
}

/// CPU reference of the packed-dot product with int4 weights: exact integer sums per 32-value
/// block, each scaled by its block's scale into an f32 sum, then by the row's scale.
pub fn reference_int4_dot4(x: &[f32], m: usize, w: &Int4Weights) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let xq = quantize_rows_reference(x, m, k);
    let blocks = Int4Weights::blocks_per_row(k);
    let mut out = vec![0f32; m * n];
    for (r, (xs, xv)) in xq.iter().enumerate() {
        for c in 0..n {
            let mut acc = 0f32;
            for blk in 0..blocks {
                let sum: i32 = (blk * INT4_BLOCK..((blk + 1) * INT4_BLOCK).min(k))
                    .map(|kk| xv[kk] as i32 * w.value(c, kk) as i32)
                    .sum();
                acc = (sum as f32).mul_add(w.scale(c, blk), acc);
            }
            out[r * n + c] = acc * xs;
        }
    }
    out
}

/// CPU reference: dequantize, then the f32 product `X·Wᵀ` with f64 accumulation.
pub fn reference(x: &[f32], m: usize, w_dequantized: &[f32], n: usize, k: usize) -> Vec<f32> {
    let s = crate::gemm::GemmShape {
        batch: 1,
        m,
        n,
        k,
        a_batched: true,
        b_batched: true,
        transpose_b: true,
    };
    crate::gemm::reference(x, w_dequantized, &s)
}

pub fn reference_int8(x: &[f32], m: usize, w: &Int8Weights) -> Vec<f32> {
    reference(x, m, &w.dequantize(), w.n, w.k)
}

pub fn reference_int4(x: &[f32], m: usize, w: &Int4Weights) -> Vec<f32> {
    reference(x, m, &w.dequantize(), w.n, w.k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantizedWeight;
    use crate::testing::{assert_close, for_each_kernel_device, quantizes_activations, random_vec, to_vec, upload};
    use burn::tensor::Tensor;

    fn check(m: usize, n: usize, k: usize, seed: u64) {
        let w = random_vec(n * k, seed, 0.2);
        let x = random_vec(m * k, seed + 1, 1.0);
        let q8 = Int8Weights::quantize(&w, n, k);
        let q4 = Int4Weights::quantize(&w, n, k);
        let want8 = reference_int8(&x, m, &q8);
        let want4 = reference_int4(&x, m, &q4);
        let (dot8, dot4) = (reference_int8_dot4(&x, m, &q8), reference_int4_dot4(&x, m, &q4));
        for_each_kernel_device(|dev, label| {
            let xt: Tensor<2> = upload(&x, &[m, k], dev);
            let got8 = to_vec(crate::qgemm(xt.clone(), &QuantizedWeight::int8(&q8, dev)));
            let got4 = to_vec(crate::qgemm(xt, &QuantizedWeight::int4(&q4, dev)));
            assert_eq!(got8.len(), m * n);
            if quantizes_activations(dev) {
                // Integer sums are exact; an activation on a rounding boundary may quantize one
                // step apart where the device's division differs from Rust's by an ulp.
                assert_close(&got8, &dot8, 1e-3, &format!("{label} int8 dot4 {m}x{n}x{k}"));
                assert_close(&got4, &dot4, 1e-3, &format!("{label} int4 dot4 {m}x{n}x{k}"));
                // Against weight-only: activation rounding (≤ 1/254 of each row's max) adds up.
                assert_close(&got8, &want8, 2e-2, &format!("{label} int8 dot4 vs weight-only"));
                assert_close(&got4, &want4, 2e-2, &format!("{label} int4 dot4 vs weight-only"));
            } else {
                // Same math as dequantize-then-GEMM; only f32 summation order differs.
                assert_close(&got8, &want8, 1e-5, &format!("{label} int8 {m}x{n}x{k}"));
                assert_close(&got4, &want4, 1e-5, &format!("{label} int4 {m}x{n}x{k}"));
            }
        });
    }

    #[test]
    fn gemm_matches_dequantized_reference() {
        check(16, 64, 128, 40);
        check(37, 45, 96, 41); // ragged M and N, aligned K
    }

    #[test]
    fn ragged_k_matches_dequantized_reference() {
        check(9, 13, 70, 42); // K not a multiple of 4 nor of the int4 block
        check(5, 7, 33, 43);
    }

    #[test]
    fn gemv_matches_dequantized_reference() {
        check(1, 100, 256, 44);
        check(1, 31, 77, 45);
    }

    #[test]
    fn error_versus_full_precision_stays_within_the_quantization_bound() {
        // |x·(W − deq W)| ≤ Σ|x_k|·bound_k: the analytic bound carried through the product.
        let (m, n, k) = (3, 24, 64);
        let w = random_vec(n * k, 50, 0.3);
        let x = random_vec(m * k, 51, 1.0);
        let q8 = Int8Weights::quantize(&w, n, k);
        let exact = reference(&x, m, &w, n, k);
        for_each_kernel_device(|dev, label| {
            let got = to_vec(crate::qgemm(
                upload::<2>(&x, &[m, k], dev),
                &QuantizedWeight::int8(&q8, dev),
            ));
            // With packed dots the activations are rounded too: each by at most half its row's
            // step, times the weight it meets.
            let dot4 = quantizes_activations(dev);
            let rows = quantize_rows_reference(&x, m, k);
            let deq = q8.dequantize();
            for r in 0..m {
                for c in 0..n {
                    let mut bound: f32 = (0..k).map(|kk| x[r * k + kk].abs() * q8.error_bound(c)).sum();
                    if dot4 {
                        bound += (0..k).map(|kk| deq[c * k + kk].abs() * rows[r].0 / 2.0).sum::<f32>();
                    }
                    let err = (got[r * n + c] - exact[r * n + c]).abs();
                    assert!(
                        err <= bound * 1.001 + 1e-5,
                        "{label}: ({r},{c}) error {err} > bound {bound}"
                    );
                }
            }
        });
    }
}

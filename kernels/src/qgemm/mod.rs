//! Weight-only quantized GEMM/GEMV: `Y [.., N] = X [.., K] · Wᵀ` with `W [N, K]` in the int8 or
//! int4 layout of [`crate::quant`], dequantized inside the kernel with f32 accumulation.

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::tensor::{DType, Shape};

use crate::gemm::load_rows_fragment;
use crate::launch::{WgslKernel, as_u32, binding, dims, empty_like_device, params};
use crate::quant::{INT4_BLOCK, Int4Weights, Int8Weights};
use crate::tuning::Tile;

const TEMPLATE: &str = include_str!("qgemm.wgsl");

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

const INT8_BODY: &str = "    for (var k = 0u; k < p.k; k += 4u) {
        let wk = k >> 2u;
        let q0 = unpack_i8(w[w0 + wk]);
        let q1 = unpack_i8(w[w1 + wk]);
        let q2 = unpack_i8(w[w2 + wk]);
        let q3 = unpack_i8(w[w3 + wk]);
        for (var i = 0u; i < TM; i++) {
            let av = load_a(0u, rows[i], k);
            acc[i] += vec4<f32>(dot(av, q0), dot(av, q1), dot(av, q2), dot(av, q3));
        }
    }
    // One scale per output channel: applied once, after the sum.
    let s = vec4<f32>(scales[c0], scales[c1], scales[c2], scales[c3]);
    for (var i = 0u; i < TM; i++) {
        acc[i] *= s;
    }";

const INT4_BODY: &str = "    let blocks = (p.k + 31u) / 32u;
    for (var blk = 0u; blk < blocks; blk++) {
        var part: array<vec4<f32>, TM>;
        for (var i = 0u; i < TM; i++) {
            part[i] = vec4<f32>(0.0);
        }
        for (var wi = 0u; wi < 4u; wi++) {
            let k = blk * 32u + wi * 8u;
            if (k >= p.k) {
                break;
            }
            let o = blk * 4u + wi;
            let v0 = w[w0 + o];
            let v1 = w[w1 + o];
            let v2 = w[w2 + o];
            let v3 = w[w3 + o];
            let l0 = unpack_i4_lo(v0);
            let h0 = unpack_i4_hi(v0);
            let l1 = unpack_i4_lo(v1);
            let h1 = unpack_i4_hi(v1);
            let l2 = unpack_i4_lo(v2);
            let h2 = unpack_i4_hi(v2);
            let l3 = unpack_i4_lo(v3);
            let h3 = unpack_i4_hi(v3);
            for (var i = 0u; i < TM; i++) {
                let lo = load_a(0u, rows[i], k);
                let hi = load_a(0u, rows[i], k + 4u);
                part[i] += vec4<f32>(
                    dot(lo, l0) + dot(hi, h0),
                    dot(lo, l1) + dot(hi, h1),
                    dot(lo, l2) + dot(hi, h2),
                    dot(lo, l3) + dot(hi, h3),
                );
            }
        }
        let s = vec4<f32>(block_scale(c0, blocks, blk), block_scale(c1, blocks, blk), block_scale(c2, blocks, blk), block_scale(c3, blocks, blk));
        for (var i = 0u; i < TM; i++) {
            acc[i] = fma(part[i], s, acc[i]);
        }
    }";

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
    for (t, what) in [(&words, "packed weights")] {
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
    let (words_per_row, scale_elem, body, scale_fn, expected_scales) = match format {
        QuantFormat::Int8 => {
            assert_eq!(scales.dtype, DType::F32, "qgemm int8: scales must be f32");
            (Int8Weights::words_per_row(k), "f32", INT8_BODY, "", n)
        }
        QuantFormat::Int4 => {
            assert!(
                matches!(scales.dtype, DType::I32 | DType::U32),
                "qgemm int4: scales must be packed f16 pairs in 32-bit integers"
            );
            (
                Int4Weights::blocks_per_row(k) * 4,
                "u32",
                INT4_BODY,
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
    // Aligned rows let X be read as vec4 without guards: K % 4 for int8, whole blocks for int4.
    let aligned = match format {
        QuantFormat::Int8 => k % 4 == 0,
        QuantFormat::Int4 => k % INT4_BLOCK == 0,
    };
    let tile = Tile::qgemm(m);
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
        as_u32(n.div_ceil(4).div_ceil(tile.wg_x as usize), "N groups"),
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
    .var("load_a", load_rows_fragment("x", aligned))
    .var("scale_fn", scale_fn)
    .var("body", body)
    .launch(
        &x.client,
        (tile.wg_x, tile.wg_y, 1),
        groups,
        vec![binding(&x), binding(&words), binding(&scales), binding(&out), p],
    );
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
    use crate::testing::{assert_close, for_each_device, random_vec, to_vec, upload};
    use burn::tensor::Tensor;

    fn check(m: usize, n: usize, k: usize, seed: u64) {
        let w = random_vec(n * k, seed, 0.2);
        let x = random_vec(m * k, seed + 1, 1.0);
        let q8 = Int8Weights::quantize(&w, n, k);
        let q4 = Int4Weights::quantize(&w, n, k);
        let want8 = reference_int8(&x, m, &q8);
        let want4 = reference_int4(&x, m, &q4);
        for_each_device(|dev, label| {
            let xt: Tensor<2> = upload(&x, &[m, k], dev);
            let got8 = crate::qgemm(xt.clone(), &QuantizedWeight::int8(&q8, dev));
            let got4 = crate::qgemm(xt, &QuantizedWeight::int4(&q4, dev));
            assert_eq!(got8.dims(), [m, n]);
            // Same math as dequantize-then-GEMM; only f32 summation order differs.
            assert_close(&to_vec(got8), &want8, 1e-5, &format!("{label} int8 {m}x{n}x{k}"));
            assert_close(&to_vec(got4), &want4, 1e-5, &format!("{label} int4 {m}x{n}x{k}"));
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
        for_each_device(|dev, label| {
            let got = to_vec(crate::qgemm(
                upload::<2>(&x, &[m, k], dev),
                &QuantizedWeight::int8(&q8, dev),
            ));
            for r in 0..m {
                for c in 0..n {
                    let bound: f32 = (0..k).map(|kk| x[r * k + kk].abs() * q8.error_bound(c)).sum();
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

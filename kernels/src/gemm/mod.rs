//! Batched GEMM, `C = A·B` or `C = A·Bᵀ`, in f32 or with f16 storage (f32 accumulation).
//!
//! Shapes: `A [..batch, M, K]`, `B [..batch, K, N]` (or `[..batch, N, K]` transposed); either
//! side may have a batch of 1 and is then shared by every batch of the other (a weight matrix).

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::cubecl::ir::{ElemType, FloatKind};
use burn::tensor::{DType, Shape};

use crate::codegen::{LANES, vec4_of};
use crate::launch::{WgslKernel, as_u32, binding, dims, empty_like_device, params};
use crate::tuning::Tile;
use crate::variants::{F16Math, Matmul};

pub mod cpu;

const TEMPLATE: &str = include_str!("gemm.wgsl");
const TILED: &str = include_str!("tiled.wgsl");

/// The problem a pair of operand shapes describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `false` when A has a batch of 1 shared by every batch of B.
    pub a_batched: bool,
    pub b_batched: bool,
    pub transpose_b: bool,
}

impl GemmShape {
    /// # Panics
    /// When ranks differ, are below 2, or inner or batch dimensions disagree.
    pub fn of(a: &[usize], b: &[usize], transpose_b: bool) -> Self {
        assert!(
            a.len() >= 2 && a.len() == b.len(),
            "gemm: operands of rank {} and {} (need equal ranks ≥ 2)",
            a.len(),
            b.len()
        );
        let r = a.len();
        let (m, k) = (a[r - 2], a[r - 1]);
        let (kb, n) = if transpose_b {
            (b[r - 1], b[r - 2])
        } else {
            (b[r - 2], b[r - 1])
        };
        assert_eq!(
            k, kb,
            "gemm: inner dimensions differ ({a:?} · {b:?}, transpose_b = {transpose_b})"
        );
        let batch_a: usize = a[..r - 2].iter().product();
        let batch_b: usize = b[..r - 2].iter().product();
        assert!(
            batch_a == batch_b || batch_a == 1 || batch_b == 1,
            "gemm: batch dimensions {:?} and {:?} neither match nor broadcast",
            &a[..r - 2],
            &b[..r - 2]
        );
        Self {
            batch: batch_a.max(batch_b),
            m,
            n,
            k,
            a_batched: batch_a > 1 || batch_b == 1,
            b_batched: batch_b > 1 || batch_a == 1,
            transpose_b,
        }
    }

    pub fn out_dims(&self, a: &[usize], b: &[usize]) -> Vec<usize> {
        let r = a.len();
        let lead = if a[..r - 2].iter().product::<usize>() >= b[..r - 2].iter().product::<usize>() {
            &a[..r - 2]
        } else {
            &b[..r - 2]
        };
        let mut out = lead.to_vec();
        out.extend([self.m, self.n]);
        out
    }
}

/// Output shape, for fusion's lazy bookkeeping.
pub fn out_shape(a: &Shape, b: &Shape, transpose_b: &bool) -> Shape {
    let (a, b): (Vec<usize>, Vec<usize>) = (a.iter().copied().collect(), b.iter().copied().collect());
    Shape::from(GemmShape::of(&a, &b, *transpose_b).out_dims(&a, &b))
}

/// WGSL body of `load_a(base, row, k) -> vec4<f32>` reading a row-major `[rows, p.k]` matrix
/// `a`. `aligned` (K % 4 == 0) reads one vec4; otherwise four guarded scalars.
pub(crate) fn load_rows_fragment(array: &str, aligned: bool) -> String {
    if aligned {
        format!("    return vec4<f32>({array}[(base + row * p.k + k) >> 2u]);")
    } else {
        format!(
            "    let i = base + row * p.k + k;
    var v = vec4<f32>(0.0);
    if (k < p.k) {{ v.x = f32({array}[i]); }}
    if (k + 1u < p.k) {{ v.y = f32({array}[i + 1u]); }}
    if (k + 2u < p.k) {{ v.z = f32({array}[i + 2u]); }}
    if (k + 3u < p.k) {{ v.w = f32({array}[i + 3u]); }}
    return v;"
        )
    }
}

fn load_b_fragment(transpose_b: bool, aligned: bool) -> String {
    // NN: x = k (rows of length N), y = column. NT: x = column (rows of length K), y = k.
    let (rows, len, limit) = if transpose_b {
        ("p.n", "p.k", "p.k")
    } else {
        ("p.k", "p.n", "p.n")
    };
    if aligned {
        format!("    return vec4<f32>(b[(base + min(x, {rows} - 1u) * {len} + y) >> 2u]);")
    } else {
        format!(
            "    let i = base + min(x, {rows} - 1u) * {len} + y;
    var v = vec4<f32>(0.0);
    if (y < {limit}) {{ v.x = f32(b[i]); }}
    if (y + 1u < {limit}) {{ v.y = f32(b[i + 1u]); }}
    if (y + 2u < {limit}) {{ v.z = f32(b[i + 2u]); }}
    if (y + 3u < {limit}) {{ v.w = f32(b[i + 3u]); }}
    return v;"
        )
    }
}

/// Unrolled register-tile code for a `tm` × `4·tnv` tile: declarations, one K-step of four,
/// and the guarded stores. Generated rather than looped because lavapipe's compiler keeps
/// loop-indexed private arrays in memory, which costs more than the FMAs they feed.
pub(crate) struct TileCode {
    pub decls: String,
    pub step: String,
    pub store: String,
}

pub(crate) fn tile_code(tm: u32, tnv: u32, transpose_b: bool, out_cast: &str) -> TileCode {
    let mut decls = String::new();
    for i in 0..tm {
        decls += &format!("    let r{i} = min(row0 + {i}u, p.m - 1u);\n");
        for g in 0..tnv {
            decls += &format!("    var acc{i}_{g} = vec4<f32>(0.0);\n");
        }
    }
    let mut step = String::new();
    if transpose_b {
        // B rows are output columns: one vec4 along K per column, dotted with each row of A.
        for j in 0..4 * tnv {
            step += &format!("        let b{j} = load_b(base_b, col0 + {j}u, k);\n");
        }
        for i in 0..tm {
            step += &format!("        let a{i} = load_a(base_a, r{i}, k);\n");
            for g in 0..tnv {
                let sum = vec4_of(4 * g, |j| format!("dot(a{i}, b{j})"));
                step += &format!("        acc{i}_{g} += {sum};\n");
            }
        }
    } else {
        // Rows k..k+4 of B, tnv vec4s of columns each; every A value scales a whole vec4.
        for r in 0..4 {
            for g in 0..tnv {
                step += &format!("        let b{r}_{g} = load_b(base_b, k + {r}u, col0 + {}u);\n", 4 * g);
            }
        }
        for i in 0..tm {
            step += &format!("        let a{i} = load_a(base_a, r{i}, k);\n");
            for g in 0..tnv {
                for (r, lane) in LANES.iter().enumerate() {
                    step += &format!("        acc{i}_{g} = fma(vec4<f32>(a{i}.{lane}), b{r}_{g}, acc{i}_{g});\n");
                }
            }
        }
    }
    let mut store = String::new();
    for i in 0..tm {
        store += &format!("    if (row0 + {i}u < p.m) {{\n        let o{i} = base_c + (row0 + {i}u) * p.n + col0;\n");
        for g in 0..tnv {
            for (c, lane) in LANES.iter().enumerate() {
                let j = 4 * g + c as u32;
                store +=
                    &format!("        if (col0 + {j}u < p.n) {{ c[o{i} + {j}u] = {out_cast}(acc{i}_{g}.{lane}); }}\n");
            }
        }
        store += "    }\n";
    }
    TileCode { decls, step, store }
}

/// How a product through `tiled.wgsl` reads and writes. `code` returns the WGSL declarations of
/// its bindings and the hooks `dims() -> vec3<u32>` (M, N, K), `load_a(batch, row, k) -> f32`,
/// `load_b(batch, k, col) -> f32` and `store(batch, row, col, value: f32)`; it runs only when the
/// variant compiles, so it must be a pure function of `key`.
pub(crate) struct TiledOperands<F> {
    pub key: String,
    pub code: F,
    /// B is contiguous along K (staged k-fastest) rather than along N.
    pub b_contiguous_in_k: bool,
    /// Arithmetic in f16 (the hooks still speak f32; staged values are exact f16 inputs).
    pub f16_math: bool,
    /// The storage needs `enable f16;` even when the arithmetic is f32.
    pub f16_storage: bool,
}

/// Rows (i < 8) and columns (g < 2) of an invocation's 8×8 tile, as WGSL expressions.
fn tiled_row(i: u32) -> String {
    format!("row_base + {}u + 4u * lid.y", if i < 4 { i } else { 60 + i })
}

fn tiled_col(g: u32) -> String {
    format!("col_base + {}u + 4u * lid.x", 64 * g)
}

/// Unrolled declarations, FMA step, per-tile flush (f16 math) and guarded stores.
fn tiled_code(f16_math: bool) -> (String, String, String, String) {
    let (mut decls, mut step, mut flush, mut store) = (String::new(), String::new(), String::new(), String::new());
    for i in 0..8u32 {
        let (a, lane) = (if i < 4 { "a_lo" } else { "a_hi" }, LANES[i as usize % 4]);
        for g in 0..2u32 {
            let b = if g == 0 { "b_lo" } else { "b_hi" };
            decls += &format!("    var acc{i}_{g} = vec4<f32>(0.0);\n");
            if f16_math {
                // Partial sums of one K tile (8 products) in f16, then added into f32.
                decls += &format!("    var h{i}_{g} = vec4<f16>();\n");
                step += &format!("            h{i}_{g} = fma(vec4<f16>({a}.{lane}), {b}, h{i}_{g});\n");
                flush += &format!("        acc{i}_{g} += vec4<f32>(h{i}_{g});\n        h{i}_{g} = vec4<f16>();\n");
            } else {
                step += &format!("            acc{i}_{g} = fma(vec4<f32>({a}.{lane}), {b}, acc{i}_{g});\n");
            }
        }
    }
    for i in 0..8u32 {
        store += &format!("    {{\n        let r = {};\n        if (r < mnk.x) {{\n", tiled_row(i));
        for g in 0..2u32 {
            store += &format!("            let c{g} = {};\n", tiled_col(g));
            for (c, lane) in LANES.iter().enumerate() {
                store += &format!(
                    "            if (c{g} + {c}u < mnk.y) {{ store(batch, r, c{g} + {c}u, acc{i}_{g}.{lane}); }}\n"
                );
            }
        }
        store += "        }\n    }\n";
    }
    (decls, step, flush, store)
}

/// Queues a product through `tiled.wgsl`: a workgroup per 128×128 block of each batch entry.
pub(crate) fn launch_tiled<F>(
    client: &burn::cubecl::client::Client,
    name: &'static str,
    operands: TiledOperands<F>,
    (m, n, batch): (usize, usize, usize),
    buffers: Vec<burn::cubecl::server::BufferBinding>,
) where
    F: Fn() -> (String, String) + Clone + Send + Sync + 'static,
{
    let groups = (
        as_u32(n.div_ceil(128), "N blocks"),
        as_u32(m.div_ceil(128), "M blocks"),
        as_u32(batch, "batch"),
    );
    assert!(
        groups.0 <= crate::launch::MAX_GROUPS_PER_DIM
            && groups.1 <= crate::launch::MAX_GROUPS_PER_DIM
            && groups.2 <= crate::launch::MAX_GROUPS_PER_DIM,
        "{name}: {m}×{n} × batch {batch} exceeds one dispatch"
    );
    let f16_math = operands.f16_math;
    let stage_b = if operands.b_contiguous_in_k {
        "            let bn = idx / BK;\n            let bk = idx % BK;"
    } else {
        "            let bk = idx / BN;\n            let bn = idx % BN;"
    };
    WgslKernel::new(name, TILED)
        .var(
            "enable",
            if f16_math || operands.f16_storage {
                "enable f16;"
            } else {
                ""
            },
        )
        .var("t", if f16_math { "f16" } else { "f32" })
        .var("operands", operands.key)
        .var("stage_b", stage_b)
        .generated("bindings", {
            let code = operands.code.clone();
            move || code().0
        })
        .generated("hooks", move || (operands.code)().1)
        .generated("decls", move || tiled_code(f16_math).0)
        .generated("step", move || tiled_code(f16_math).1)
        .generated("flush", move || tiled_code(f16_math).2)
        .generated("store", move || tiled_code(f16_math).3)
        .launch(client, (16, 16, 1), groups, buffers);
}

/// The GEMM's operands for `tiled.wgsl`: matrices with batch strides in a parameter block.
fn gemm_operands(
    storage: &'static str,
    transpose_b: bool,
    f16_math: bool,
) -> TiledOperands<impl Fn() -> (String, String) + Clone + Send + Sync + 'static> {
    TiledOperands {
        key: format!("{storage} t={transpose_b}"),
        code: move || {
            let b_index = if transpose_b { "col * p.k + k" } else { "k * p.n + col" };
            let bindings = format!(
                "struct Params {{
    m: u32,
    n: u32,
    k: u32,
    _pad0: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    _pad1: u32,
}}
@group(0) @binding(0) var<storage, read_write> a: array<{storage}>;
@group(0) @binding(1) var<storage, read_write> b: array<{storage}>;
@group(0) @binding(2) var<storage, read_write> c: array<{storage}>;
@group(0) @binding(3) var<storage, read_write> p: Params;"
            );
            let hooks = format!(
                "fn dims() -> vec3<u32> {{
    return vec3<u32>(p.m, p.n, p.k);
}}
fn load_a(batch: u32, row: u32, k: u32) -> f32 {{
    if (row >= p.m || k >= p.k) {{ return 0.0; }}
    return f32(a[batch * p.stride_a + row * p.k + k]);
}}
fn load_b(batch: u32, k: u32, col: u32) -> f32 {{
    if (k >= p.k || col >= p.n) {{ return 0.0; }}
    return f32(b[batch * p.stride_b + {b_index}]);
}}
fn store(batch: u32, row: u32, col: u32, value: f32) {{
    c[batch * p.stride_c + row * p.n + col] = {storage}(value);
}}"
            );
            (bindings, hooks)
        },
        b_contiguous_in_k: transpose_b,
        f16_math,
        f16_storage: storage == "f16",
    }
}

/// Launches the GEMM on the operands' device.
pub(crate) fn launch(a: CubeTensor, b: CubeTensor, transpose_b: bool) -> CubeTensor {
    assert_eq!(
        a.dtype, b.dtype,
        "gemm: operand dtypes differ ({:?} vs {:?})",
        a.dtype, b.dtype
    );
    let storage = match a.dtype {
        DType::F32 => "f32",
        DType::F16 => {
            assert!(
                a.client.properties().supports_type(ElemType::Float(FloatKind::F16)),
                "gemm: f16 storage needs an adapter with shader-f16"
            );
            "f16"
        }
        other => panic!("gemm: unsupported dtype {other:?} (f32 or f16)"),
    };
    let (a, b) = (into_contiguous(a), into_contiguous(b));
    let (ad, bd) = (dims(&a), dims(&b));
    let s = GemmShape::of(&ad, &bd, transpose_b);
    let out = empty_like_device(&a, Shape::from(s.out_dims(&ad, &bd)), a.dtype);
    if s.m == 0 || s.n == 0 || s.batch == 0 {
        return out;
    }
    let aligned_a = s.k.is_multiple_of(4);
    let aligned_b = if transpose_b {
        s.k.is_multiple_of(4)
    } else {
        s.n.is_multiple_of(4)
    };
    let vec = |aligned: bool| {
        if aligned {
            format!("vec4<{storage}>")
        } else {
            storage.to_string()
        }
    };
    let plan = crate::variants::plan_for(&a);
    // A GEMV (M ≤ 2) is bound by reading B once: blocks would only idle 126 of 128 rows.
    let tiled = plan.matmul == Matmul::Shared && s.m > 2;
    let words = [
        as_u32(s.m, "M"),
        as_u32(s.n, "N"),
        as_u32(s.k, "K"),
        0,
        if s.a_batched { as_u32(s.m * s.k, "M·K") } else { 0 },
        if s.b_batched { as_u32(s.k * s.n, "K·N") } else { 0 },
        as_u32(s.m * s.n, "M·N"),
        0,
    ];
    let p = params(&a.client, &words);
    if tiled {
        let f16_math = storage == "f16" && plan.f16 == F16Math::Math;
        launch_tiled(
            &a.client,
            "gemm_tiled",
            gemm_operands(storage, transpose_b, f16_math),
            (s.m, s.n, s.batch),
            vec![binding(&a), binding(&b), binding(&out), p],
        );
        return out;
    }
    let tile = Tile::gemm(s.m, crate::tuning::on_cpu(&a.client));
    let groups = (
        as_u32(
            s.n.div_ceil(4 * tile.tnv as usize).div_ceil(tile.wg_x as usize),
            "N groups",
        ),
        as_u32(s.m.div_ceil(tile.tm as usize).div_ceil(tile.wg_y as usize), "M groups"),
        as_u32(s.batch, "batch"),
    );
    assert!(
        groups.2 <= crate::launch::MAX_GROUPS_PER_DIM,
        "gemm: batch {} exceeds one dispatch",
        s.batch
    );
    WgslKernel::new("gemm", TEMPLATE)
        .var("enable", if storage == "f16" { "enable f16;" } else { "" })
        .var("a_elem", vec(aligned_a))
        .var("b_elem", vec(aligned_b))
        .var("c_elem", storage)
        .var("tm", tile.tm)
        .var("tn", 4 * tile.tnv)
        .var("load_a", load_rows_fragment("a", aligned_a))
        .var("load_b", load_b_fragment(transpose_b, aligned_b))
        .var("transpose_b", transpose_b)
        .generated("decls", move || {
            tile_code(tile.tm, tile.tnv, transpose_b, storage).decls
        })
        .generated("step", move || tile_code(tile.tm, tile.tnv, transpose_b, storage).step)
        .generated("store", move || {
            tile_code(tile.tm, tile.tnv, transpose_b, storage).store
        })
        .launch(
            &a.client,
            (tile.wg_x, tile.wg_y, 1),
            groups,
            vec![binding(&a), binding(&b), binding(&out), p],
        );
    out
}

/// CPU reference: plain triple loop in f64 accumulation, so it is the more exact side.
pub fn reference(a: &[f32], b: &[f32], s: &GemmShape) -> Vec<f32> {
    let mut c = vec![0f32; s.batch * s.m * s.n];
    for bi in 0..s.batch {
        let a0 = if s.a_batched { bi * s.m * s.k } else { 0 };
        let b0 = if s.b_batched { bi * s.k * s.n } else { 0 };
        for i in 0..s.m {
            for j in 0..s.n {
                let mut acc = 0f64;
                for kk in 0..s.k {
                    let bv = if s.transpose_b {
                        b[b0 + j * s.k + kk]
                    } else {
                        b[b0 + kk * s.n + j]
                    };
                    acc += a[a0 + i * s.k + kk] as f64 * bv as f64;
                }
                c[(bi * s.m + i) * s.n + j] = acc as f32;
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, for_each_kernel_device, random_vec, to_vec, upload};
    use burn::tensor::Tensor;

    fn check(a_dims: &[usize], b_dims: &[usize], transpose_b: bool, seed: u64) {
        let s = GemmShape::of(a_dims, b_dims, transpose_b);
        let a = random_vec(a_dims.iter().product(), seed, 1.0);
        let b = random_vec(b_dims.iter().product(), seed + 1, 1.0);
        let want = reference(&a, &b, &s);
        for_each_kernel_device(|dev, label| {
            let ta: Tensor<3> = upload(&a, a_dims, dev);
            let tb: Tensor<3> = upload(&b, b_dims, dev);
            let got = if transpose_b {
                crate::gemm_bt(ta, tb)
            } else {
                crate::gemm(ta, tb)
            };
            assert_eq!(got.dims().to_vec(), s.out_dims(a_dims, b_dims));
            // f32 sums over K ≤ 300 terms of O(1) values: 1e-5 of the largest output.
            assert_close(
                &to_vec(got),
                &want,
                1e-5,
                &format!("{label} gemm {a_dims:?}·{b_dims:?} t={transpose_b}"),
            );
        });
    }

    #[test]
    fn matches_reference_on_tile_multiples() {
        check(&[2, 64, 32], &[2, 32, 64], false, 10);
        check(&[2, 64, 32], &[2, 64, 32], true, 11);
    }

    #[test]
    fn matches_reference_on_ragged_sizes() {
        // Nothing here is a multiple of 4 or of a tile: exercises every guarded path.
        check(&[3, 37, 29], &[3, 29, 41], false, 12);
        check(&[3, 37, 29], &[3, 41, 29], true, 13);
        check(&[1, 1, 7], &[1, 7, 5], false, 14);
        check(&[1, 5, 3], &[1, 2, 3], true, 15);
    }

    #[test]
    fn matches_reference_on_aligned_k_ragged_m_n() {
        check(&[2, 33, 64], &[2, 64, 20], false, 16);
        check(&[2, 33, 64], &[2, 19, 64], true, 17);
    }

    #[test]
    fn shares_a_weight_across_the_batch() {
        check(&[4, 9, 12], &[1, 12, 8], false, 18);
        check(&[1, 9, 12], &[4, 12, 8], false, 19);
    }

    #[test]
    fn matches_reference_across_several_blocks() {
        // Past one 128×128 block of the shared-tile variant in M and N, K not a multiple of 8.
        check(&[2, 130, 21], &[2, 21, 259], false, 22);
        check(&[1, 257, 36], &[1, 131, 36], true, 23);
    }

    #[test]
    fn gemv_shapes() {
        check(&[1, 1, 256], &[1, 96, 256], true, 20);
        check(&[1, 1, 255], &[1, 255, 97], false, 21);
    }

    #[test]
    fn f16_storage_matches_reference() {
        let (ad, bd) = ([2usize, 45, 36], [2usize, 36, 28]);
        let s = GemmShape::of(&ad, &bd, false);
        // Round inputs to f16 first so the reference sees exactly what the kernel reads.
        let round = |v: Vec<f32>| {
            v.into_iter()
                .map(|x| half::f16::from_f32(x).to_f32())
                .collect::<Vec<_>>()
        };
        let a = round(random_vec(ad.iter().product(), 30, 1.0));
        let b = round(random_vec(bd.iter().product(), 31, 1.0));
        let want = reference(&a, &b, &s);
        for_each_kernel_device(|dev, label| {
            if !crate::testing::supports_f16(dev) {
                eprintln!("{label}: no shader-f16, f16 GEMM skipped");
                return;
            }
            let ta: Tensor<3> = upload(&a, &ad, dev).cast(burn::tensor::DType::F16);
            let tb: Tensor<3> = upload(&b, &bd, dev).cast(burn::tensor::DType::F16);
            let got = to_vec(crate::gemm(ta, tb).cast(burn::tensor::DType::F32));
            let plan = crate::testing::plan_of(dev);
            if plan.is_some_and(|p| p.matmul == Matmul::Shared && p.f16 == F16Math::Math) {
                // f16 arithmetic: each product and each partial sum of one 8-deep K tile rounds
                // to 11 bits (≤ 8·2⁻¹¹ of the tile's magnitude), then the f16 output rounds again.
                assert_close(&got, &want, 4e-3, &format!("{label} f16-math gemm"));
            } else {
                // Output is stored as f16: 2⁻¹¹ relative rounding of each value.
                assert_close(&got, &want, 1e-3, &format!("{label} f16 gemm"));
            }
        });
    }
}

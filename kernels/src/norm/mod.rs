//! Group norm (optionally fused with SiLU), layer norm and softmax: one workgroup per group or row.

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::tensor::DType;

use crate::launch::{WgslKernel, as_u32, binding, dims, empty_like_device, fold_groups, params};
use crate::variants::Reduce;

pub mod cpu;

const REDUCE: &str = include_str!("reduce.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("reduce_subgroup.wgsl");
const GROUP_NORM: &str = include_str!("group_norm.wgsl");
const LAYER_NORM: &str = include_str!("layer_norm.wgsl");
const SOFTMAX: &str = include_str!("softmax.wgsl");

/// Group norm reduces tens of thousands of values per workgroup: use the largest size every
/// adapter allows. Rows (layer norm, softmax) are 64–4096 long: 64 lanes keep the tree short.
const GROUP_WG: u32 = 256;
const ROW_WG: u32 = 64;

/// A norm kernel with the workgroup reduction its device's plan chooses appended.
pub(crate) fn with_reduction(kernel: WgslKernel, on: &CubeTensor) -> WgslKernel {
    match crate::variants::plan_for(on).reduce {
        Reduce::Tree => kernel
            .with_part(REDUCE)
            .var("reduce_builtins", "")
            .var("reduce_init", ""),
        Reduce::Subgroup => kernel
            .with_part(REDUCE_SUBGROUP)
            .var(
                "reduce_builtins",
                "    @builtin(subgroup_invocation_id) sg_lane_in: u32,\n    @builtin(subgroup_id) sg_id_in: u32,\n    @builtin(num_subgroups) sg_count_in: u32,",
            )
            .var("reduce_init", "    reduce_init(sg_lane_in, sg_id_in, sg_count_in);"),
    }
}

fn check_f32(t: &CubeTensor, op: &str) {
    assert_eq!(t.dtype, DType::F32, "{op}: f32 only, got {:?}", t.dtype);
}

pub(crate) fn launch_group_norm(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> CubeTensor {
    for t in [&x, &gamma, &beta] {
        check_f32(t, "group_norm");
    }
    let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
    let xd = dims(&x);
    assert!(xd.len() >= 2, "group_norm: input must be [N, C, ...], got {xd:?}");
    let (n, c) = (xd[0], xd[1]);
    let spatial: usize = xd[2..].iter().product();
    assert!(
        groups > 0 && c % groups == 0,
        "group_norm: {c} channels do not split into {groups} groups"
    );
    for (t, name) in [(&gamma, "gamma"), (&beta, "beta")] {
        assert_eq!(
            dims(t).iter().product::<usize>(),
            c,
            "group_norm: {name} must have {c} values"
        );
    }
    let out = empty_like_device(&x, x.meta.shape().clone(), DType::F32);
    if n * c * spatial == 0 {
        return out;
    }
    let p = params(
        &x.client,
        &[
            as_u32(c, "C"),
            as_u32(spatial, "spatial"),
            as_u32(groups, "groups"),
            eps.to_bits(),
        ],
    );
    let wgs = as_u32(n * groups, "N·groups");
    assert!(
        wgs <= crate::launch::MAX_GROUPS_PER_DIM,
        "group_norm: N·groups = {wgs} exceeds one dispatch"
    );
    let (ty, width, hsum) = if spatial.is_multiple_of(4) {
        ("vec4<f32>", 4, "dot(v, vec4<f32>(1.0))")
    } else {
        ("f32", 1, "v")
    };
    with_reduction(WgslKernel::new("group_norm", GROUP_NORM), &x)
        .var("ty", ty)
        .var("width", width)
        .var("hsum", hsum)
        .var("activation", if silu { "        v = v / (1.0 + exp(-v));" } else { "" })
        .launch(
            &x.client,
            (GROUP_WG, 1, 1),
            (wgs, 1, 1),
            vec![binding(&x), binding(&gamma), binding(&beta), binding(&out), p],
        );
    out
}

fn rows_and_dim(x: &CubeTensor, op: &str) -> (usize, usize) {
    let xd = dims(x);
    let d = *xd.last().unwrap_or_else(|| panic!("{op}: scalar input"));
    (xd.iter().product::<usize>() / d.max(1), d)
}

pub(crate) fn launch_layer_norm(x: CubeTensor, gamma: CubeTensor, beta: CubeTensor, eps: f32) -> CubeTensor {
    for t in [&x, &gamma, &beta] {
        check_f32(t, "layer_norm");
    }
    let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
    let (rows, d) = rows_and_dim(&x, "layer_norm");
    for (t, name) in [(&gamma, "gamma"), (&beta, "beta")] {
        assert_eq!(
            dims(t).iter().product::<usize>(),
            d,
            "layer_norm: {name} must have {d} values"
        );
    }
    let out = empty_like_device(&x, x.meta.shape().clone(), DType::F32);
    if rows * d == 0 {
        return out;
    }
    let p = params(&x.client, &[as_u32(rows, "rows"), as_u32(d, "dim"), eps.to_bits(), 0]);
    let (gx, gy) = fold_groups(as_u32(rows, "rows"));
    with_reduction(WgslKernel::new("layer_norm", LAYER_NORM), &x).launch(
        &x.client,
        (ROW_WG, 1, 1),
        (gx, gy, 1),
        vec![binding(&x), binding(&gamma), binding(&beta), binding(&out), p],
    );
    out
}

pub(crate) fn launch_softmax(x: CubeTensor) -> CubeTensor {
    check_f32(&x, "softmax");
    let x = into_contiguous(x);
    let (rows, d) = rows_and_dim(&x, "softmax");
    let out = empty_like_device(&x, x.meta.shape().clone(), DType::F32);
    if rows * d == 0 {
        return out;
    }
    let p = params(&x.client, &[as_u32(rows, "rows"), as_u32(d, "dim"), 0, 0]);
    let (gx, gy) = fold_groups(as_u32(rows, "rows"));
    with_reduction(WgslKernel::new("softmax", SOFTMAX), &x).launch(
        &x.client,
        (ROW_WG, 1, 1),
        (gx, gy, 1),
        vec![binding(&x), binding(&out), p],
    );
    out
}

fn normalize(v: &[f32], eps: f32) -> impl Iterator<Item = f32> + '_ {
    let len = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / len;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / len;
    let rstd = 1.0 / (var + eps as f64).sqrt();
    v.iter().map(move |&x| ((x as f64 - mean) * rstd) as f32)
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// CPU reference for group norm over `x [n, c, spatial]`.
/// Group norm problem: `n` samples of `c` channels × `spatial` values, in `groups` groups.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormShape {
    pub n: usize,
    pub c: usize,
    pub spatial: usize,
    pub groups: usize,
}

pub fn reference_group_norm(
    x: &[f32],
    shape: GroupNormShape,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    fuse_silu: bool,
) -> Vec<f32> {
    let GroupNormShape { n, c, spatial, groups } = shape;
    let per = c / groups * spatial;
    let mut out = Vec::with_capacity(x.len());
    for ng in 0..n * groups {
        let g = ng % groups;
        for (i, v) in normalize(&x[ng * per..(ng + 1) * per], eps).enumerate() {
            let ch = g * (c / groups) + i / spatial;
            let y = v * gamma[ch] + beta[ch];
            out.push(if fuse_silu { silu(y) } else { y });
        }
    }
    out
}

pub fn reference_layer_norm(x: &[f32], d: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|row| {
            normalize(row, eps)
                .enumerate()
                .map(|(i, v)| v * gamma[i] + beta[i])
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn reference_softmax(x: &[f32], d: usize) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            row.iter()
                .map(move |&v| ((v as f64 - max).exp() / sum) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, for_each_kernel_device, random_vec, to_vec, upload};

    #[test]
    fn group_norm_matches_reference_with_and_without_silu() {
        let (n, c, h, w, groups) = (2, 12, 7, 9, 4);
        let x: Vec<f32> = random_vec(n * c * h * w, 70, 2.0).iter().map(|v| v + 3.0).collect(); // offset mean
        let gamma = random_vec(c, 71, 1.0);
        let beta = random_vec(c, 72, 1.0);
        for silu in [false, true] {
            let want = reference_group_norm(
                &x,
                GroupNormShape {
                    n,
                    c,
                    spatial: h * w,
                    groups,
                },
                &gamma,
                &beta,
                1e-5,
                silu,
            );
            for_each_kernel_device(|dev, label| {
                let got = crate::group_norm(
                    upload::<4>(&x, &[n, c, h, w], dev),
                    upload(&gamma, &[c], dev),
                    upload(&beta, &[c], dev),
                    groups,
                    1e-5,
                    silu,
                );
                assert_close(&to_vec(got), &want, 1e-5, &format!("{label} group_norm silu={silu}"));
            });
        }
    }

    #[test]
    fn group_norm_at_sd_width() {
        // 320 channels in 32 groups, as in every SD ResNet block; a small 12×11 map.
        let (c, s) = (320, 12 * 11);
        let x = random_vec(c * s, 73, 1.0);
        let gamma = random_vec(c, 74, 1.0);
        let beta = random_vec(c, 75, 1.0);
        let want = reference_group_norm(
            &x,
            GroupNormShape {
                n: 1,
                c,
                spatial: s,
                groups: 32,
            },
            &gamma,
            &beta,
            1e-6,
            true,
        );
        for_each_kernel_device(|dev, label| {
            let got = crate::group_norm(
                upload::<3>(&x, &[1, c, s], dev),
                upload(&gamma, &[c], dev),
                upload(&beta, &[c], dev),
                32,
                1e-6,
                true,
            );
            assert_close(&to_vec(got), &want, 1e-5, &format!("{label} group_norm 320/32"));
        });
    }

    #[test]
    fn layer_norm_matches_reference() {
        for (rows, d) in [(5, 768), (3, 37), (1, 1)] {
            let x = random_vec(rows * d, 76, 3.0);
            let gamma = random_vec(d, 77, 1.0);
            let beta = random_vec(d, 78, 1.0);
            let want = reference_layer_norm(&x, d, &gamma, &beta, 1e-5);
            for_each_kernel_device(|dev, label| {
                let got = crate::layer_norm(
                    upload::<2>(&x, &[rows, d], dev),
                    upload(&gamma, &[d], dev),
                    upload(&beta, &[d], dev),
                    1e-5,
                );
                assert_close(&to_vec(got), &want, 1e-5, &format!("{label} layer_norm {rows}x{d}"));
            });
        }
    }

    #[test]
    fn softmax_matches_reference() {
        for (rows, d) in [(7, 77), (2, 1000), (3, 1)] {
            let x = random_vec(rows * d, 79, 20.0);
            let want = reference_softmax(&x, d);
            for_each_kernel_device(|dev, label| {
                let got = crate::softmax(upload::<2>(&x, &[rows, d], dev));
                assert_close(&to_vec(got), &want, 1e-5, &format!("{label} softmax {rows}x{d}"));
            });
        }
    }
}

//! 2-D convolution as implicit GEMM (3×3 and 1×1, stride 1 or 2, any padding), depthwise
//! convolution (TinyViT's), and nearest 2× upsampling: the UNet's, VAE's and MobileSAM's hot
//! paths. NCHW layout, weights `[Co, Ci, KH, KW]` (`[C, 1, KH, KW]` depthwise).

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::tensor::{DType, Shape};

use crate::codegen::{LANES, vec4_of};
use crate::launch::{WgslKernel, as_u32, binding, dims, empty_like_device, fold_groups, params};
use crate::tuning::Tile;

pub mod cpu;

const CONV: &str = include_str!("conv2d.wgsl");
const CONV_TILED: &str = include_str!("conv2d_tiled.wgsl");
const UPSAMPLE: &str = include_str!("upsample.wgsl");
const DEPTHWISE: &str = include_str!("depthwise.wgsl");

/// Convolution geometry for an input `[N, Ci, H, W]` and weight `[Co, Ci, KH, KW]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvShape {
    pub fn of(x: &[usize], weight: &[usize], stride: usize, pad: usize) -> Self {
        assert!(
            x.len() == 4 && weight.len() == 4,
            "conv2d: input {x:?} and weight {weight:?} must both be 4-D"
        );
        assert_eq!(
            x[1], weight[1],
            "conv2d: input has {} channels, weight expects {}",
            x[1], weight[1]
        );
        assert!(stride > 0, "conv2d: stride must be positive");
        let (h, w, kh, kw) = (x[2], x[3], weight[2], weight[3]);
        assert!(
            h + 2 * pad >= kh && w + 2 * pad >= kw,
            "conv2d: {kh}×{kw} kernel larger than padded {h}×{w} input"
        );
        Self {
            n: x[0],
            ci: x[1],
            h,
            w,
            co: weight[0],
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        }
    }

    pub fn out_dims(&self) -> [usize; 4] {
        [self.n, self.co, self.oh, self.ow]
    }
}

/// Depthwise geometry: the weight `[C, 1, KH, KW]` read as `[Co = C, Ci = C]` for output sizes.
pub fn depthwise_shape(x: &[usize], weight: &[usize], stride: usize, pad: usize) -> ConvShape {
    assert!(
        weight.len() == 4 && weight[1] == 1 && x.len() == 4 && x[1] == weight[0],
        "depthwise conv2d: input {x:?} needs a weight [{}, 1, KH, KW], got {weight:?}",
        x.get(1).copied().unwrap_or(0)
    );
    ConvShape::of(x, &[weight[0], weight[0], weight[2], weight[3]], stride, pad)
}

pub fn depthwise_out_shape(x: &Shape, weight: &Shape, stride: &usize, padding: &usize) -> Shape {
    let (x, w): (Vec<usize>, Vec<usize>) = (x.iter().copied().collect(), weight.iter().copied().collect());
    Shape::from(depthwise_shape(&x, &w, *stride, *padding).out_dims().to_vec())
}

pub fn out_shape(x: &Shape, weight: &Shape, stride: &usize, padding: &usize) -> Shape {
    let (x, w): (Vec<usize>, Vec<usize>) = (x.iter().copied().collect(), weight.iter().copied().collect());
    Shape::from(ConvShape::of(&x, &w, *stride, *padding).out_dims().to_vec())
}

pub fn upsample_shape(x: &Shape) -> Shape {
    let mut d: Vec<usize> = x.iter().copied().collect();
    let r = d.len();
    assert!(r >= 2, "upsample: need at least [H, W]");
    d[r - 1] *= 2;
    d[r - 2] *= 2;
    Shape::from(d)
}

/// The most output pixels one convolution image may have on `device`: its pixel workgroups run
/// along one dispatch dimension, which WebGPU caps at 65,535 workgroups. Callers refuse larger
/// images up front (`None`: the CPU backend, no limit).
pub fn max_output_pixels(device: &burn::tensor::Device) -> Option<usize> {
    let plan = crate::variants::plan_of(device)?;
    let per_group = match plan.matmul {
        crate::variants::Matmul::Shared => 128,
        crate::variants::Matmul::Register => {
            let tile = Tile::conv(plan.cpu_adapter);
            4 * tile.tnv as usize * tile.wg_x as usize
        }
    };
    Some(crate::launch::MAX_GROUPS_PER_DIM as usize * per_group)
}

/// Unrolled tile code for `tm` output channels × `tp` (a multiple of 4) output pixels.
fn conv_code(tm: u32, tp: u32) -> (String, String, String) {
    let mut decls = String::new();
    for j in 0..tp {
        decls += &format!(
            "    let pj{j} = min(pix0 + {j}u, npix - 1u);\n    let iy{j} = i32((pj{j} / p.ow) * p.stride) - i32(p.pad);\n    let ix{j} = i32((pj{j} % p.ow) * p.stride) - i32(p.pad);\n"
        );
    }
    for i in 0..tm {
        decls += &format!("    let wr{i} = min(co0 + {i}u, p.co - 1u) * k_len;\n");
        for g in 0..tp / 4 {
            decls += &format!("    var acc{i}_{g} = vec4<f32>(0.0);\n");
        }
    }
    let mut step = String::new();
    for j in 0..tp {
        step += &format!(
            "                let yy{j} = iy{j} + i32(ky);\n                let xx{j} = ix{j} + i32(kx);\n                let ok{j} = yy{j} >= 0 && yy{j} < ih && xx{j} >= 0 && xx{j} < iw;\n                let x{j} = select(0.0, x[x_base + u32(select(0, yy{j} * iw + xx{j}, ok{j}))], ok{j});\n"
        );
    }
    for g in 0..tp / 4 {
        let xv = vec4_of(4 * g, |j| format!("x{j}"));
        step += &format!("                let xv{g} = {xv};\n");
    }
    for i in 0..tm {
        step += &format!("                let w{i} = vec4<f32>(wt[wr{i} + tap]);\n");
        for g in 0..tp / 4 {
            step += &format!("                acc{i}_{g} = fma(w{i}, xv{g}, acc{i}_{g});\n");
        }
    }
    let mut store = String::new();
    for i in 0..tm {
        store += &format!(
            "    if (co0 + {i}u < p.co) {{\n        let o{i} = (n * p.co + co0 + {i}u) * npix + pix0;\n        let b{i} = bias[co0 + {i}u];\n"
        );
        for g in 0..tp / 4 {
            for (c, lane) in LANES.iter().enumerate() {
                let j = 4 * g + c as u32;
                store += &format!("        if (pix0 + {j}u < npix) {{ y[o{i} + {j}u] = acc{i}_{g}.{lane} + b{i}; }}\n");
            }
        }
        store += "    }\n";
    }
    (decls, step, store)
}

/// A 1×1, stride-1, unpadded convolution is `W [Co, Ci] · X[n] [Ci, H·W]` for each sample: run
/// it through the GEMM kernel (vec4 loads, large register tiles), then add the bias with burn.
fn conv1x1_as_gemm(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, s: &ConvShape) -> CubeTensor {
    use burn::backend::ops::FloatTensorOps;
    let view = |t: &CubeTensor, dims: Vec<usize>| {
        CubeTensor::new_contiguous(
            t.client.clone(),
            t.device.clone(),
            Shape::from(dims),
            t.handle.clone(),
            t.dtype,
        )
    };
    let w = view(&weight, vec![1, s.co, s.ci]);
    let xs = view(&x, vec![s.n, s.ci, s.h * s.w]);
    let y = crate::gemm::launch(w, xs, false); // [N, Co, H·W]
    let y = burn::backend::wgpu::CubeBackend::float_add(y, view(&bias, vec![1, s.co, 1]));
    view(&into_contiguous(y), s.out_dims().to_vec())
}

/// The parameter block both convolution shaders read (`Params` in conv2d.wgsl and
/// depthwise.wgsl, same field order).
fn conv_params(client: &burn::cubecl::client::Client, s: &ConvShape) -> burn::cubecl::server::BufferBinding {
    let u = |v: usize, what| as_u32(v, what);
    params(
        client,
        &[
            u(s.ci, "Ci"),
            u(s.h, "H"),
            u(s.w, "W"),
            u(s.co, "Co"),
            u(s.oh, "OH"),
            u(s.ow, "OW"),
            u(s.kh, "KH"),
            u(s.kw, "KW"),
            u(s.stride, "stride"),
            u(s.pad, "pad"),
            u(s.n, "N"),
            0,
        ],
    )
}

/// The three operands, checked to be f32 and made contiguous for the shaders' flat indexing.
fn contiguous_f32(
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    op: &str,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    for t in [&x, &weight, &bias] {
        assert_eq!(t.dtype, DType::F32, "{op}: f32 only, got {:?}", t.dtype);
    }
    (into_contiguous(x), into_contiguous(weight), into_contiguous(bias))
}

pub(crate) fn launch_conv2d(
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    stride: usize,
    pad: usize,
) -> CubeTensor {
    let (x, weight, bias) = contiguous_f32(x, weight, bias, "conv2d");
    let s = ConvShape::of(&dims(&x), &dims(&weight), stride, pad);
    assert_eq!(
        dims(&bias).iter().product::<usize>(),
        s.co,
        "conv2d: bias must have {} values",
        s.co
    );
    let out = empty_like_device(&x, Shape::from(s.out_dims().to_vec()), DType::F32);
    if s.n * s.co * s.oh * s.ow == 0 {
        return out;
    }
    if s.kh == 1 && s.kw == 1 && stride == 1 && pad == 0 {
        return conv1x1_as_gemm(x, weight, bias, &s);
    }
    if crate::variants::plan_for(&x).matmul == crate::variants::Matmul::Shared {
        let p = conv_params(&x.client, &s);
        crate::gemm::launch_tiled(
            &x.client,
            "conv2d_tiled",
            crate::gemm::TiledOperands {
                key: String::new(),
                code: || (CONV_TILED.to_string(), String::new()),
                b_contiguous_in_k: false,
                f16_math: false,
                f16_storage: false,
            },
            (s.co, s.oh * s.ow, s.n),
            vec![binding(&x), binding(&weight), binding(&bias), binding(&out), p],
        );
        return out;
    }
    let tile = Tile::conv(crate::tuning::on_cpu(&x.client));
    let tp = 4 * tile.tnv;
    let u = |v: usize, what| as_u32(v, what);
    let p = conv_params(&x.client, &s);
    let groups = (
        u(
            (s.oh * s.ow).div_ceil(tp as usize).div_ceil(tile.wg_x as usize),
            "pixel groups",
        ),
        u(
            s.co.div_ceil(tile.tm as usize).div_ceil(tile.wg_y as usize),
            "channel groups",
        ),
        u(s.n, "batch"),
    );
    assert!(
        groups.0 <= crate::launch::MAX_GROUPS_PER_DIM && groups.2 <= crate::launch::MAX_GROUPS_PER_DIM,
        "conv2d: {s:?} exceeds one dispatch"
    );
    WgslKernel::new("conv2d", CONV)
        .var("tm", tile.tm)
        .var("tp", tp)
        .generated("decls", move || conv_code(tile.tm, tp).0)
        .generated("step", move || conv_code(tile.tm, tp).1)
        .generated("store", move || conv_code(tile.tm, tp).2)
        .launch(
            &x.client,
            (tile.wg_x, tile.wg_y, 1),
            groups,
            vec![binding(&x), binding(&weight), binding(&bias), binding(&out), p],
        );
    out
}

pub(crate) fn launch_depthwise(
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    stride: usize,
    pad: usize,
) -> CubeTensor {
    let (x, weight, bias) = contiguous_f32(x, weight, bias, "depthwise conv2d");
    let s = depthwise_shape(&dims(&x), &dims(&weight), stride, pad);
    assert_eq!(
        dims(&bias).iter().product::<usize>(),
        s.co,
        "depthwise conv2d: bias must have {} values",
        s.co
    );
    let out = empty_like_device(&x, Shape::from(s.out_dims().to_vec()), DType::F32);
    let len = s.n * s.co * s.oh * s.ow;
    if len == 0 {
        return out;
    }
    let p = conv_params(&x.client, &s);
    let (gx, gy) = fold_groups(as_u32(len.div_ceil(256), "groups"));
    WgslKernel::new("depthwise_conv2d", DEPTHWISE).launch(
        &x.client,
        (256, 1, 1),
        (gx, gy, 1),
        vec![binding(&x), binding(&weight), binding(&bias), binding(&out), p],
    );
    out
}

pub(crate) fn launch_upsample(x: CubeTensor) -> CubeTensor {
    assert_eq!(x.dtype, DType::F32, "upsample: f32 only, got {:?}", x.dtype);
    let x = into_contiguous(x);
    let d = dims(&x);
    let r = d.len();
    assert!(r >= 2, "upsample: need at least [H, W], got {d:?}");
    let (h, w) = (d[r - 2], d[r - 1]);
    let planes: usize = d[..r - 2].iter().product();
    let out = empty_like_device(&x, upsample_shape(x.meta.shape()), DType::F32);
    let len = planes * 4 * h * w;
    if len == 0 {
        return out;
    }
    let p = params(
        &x.client,
        &[as_u32(planes, "planes"), as_u32(h, "H"), as_u32(w, "W"), 0],
    );
    let (gx, gy) = fold_groups(as_u32(len.div_ceil(256), "groups"));
    WgslKernel::new("upsample_nearest2x", UPSAMPLE).launch(
        &x.client,
        (256, 1, 1),
        (gx, gy, 1),
        vec![binding(&x), binding(&out), p],
    );
    out
}

/// CPU reference: direct convolution, f64 accumulation.
pub fn reference_conv2d(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
    reference_direct(x, weight, bias, s, false)
}

/// CPU reference: depthwise convolution (`groups = C`), f64 accumulation. `s` from
/// [`depthwise_shape`].
pub fn reference_depthwise(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
    reference_direct(x, weight, bias, s, true)
}

/// Every output channel reads all input channels, or (depthwise) only its own.
fn reference_direct(x: &[f32], weight: &[f32], bias: &[f32], s: &ConvShape, depthwise: bool) -> Vec<f32> {
    let inputs = if depthwise { 1 } else { s.ci };
    let mut out = vec![0f32; s.n * s.co * s.oh * s.ow];
    for n in 0..s.n {
        for co in 0..s.co {
            for oy in 0..s.oh {
                for ox in 0..s.ow {
                    let mut acc = bias[co] as f64;
                    for j in 0..inputs {
                        let ci = if depthwise { co } else { j };
                        for ky in 0..s.kh {
                            for kx in 0..s.kw {
                                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                                    let xv = x[((n * s.ci + ci) * s.h + iy as usize) * s.w + ix as usize];
                                    acc += xv as f64 * weight[((co * inputs + j) * s.kh + ky) * s.kw + kx] as f64;
                                }
                            }
                        }
                    }
                    out[((n * s.co + co) * s.oh + oy) * s.ow + ox] = acc as f32;
                }
            }
        }
    }
    out
}

pub fn reference_upsample(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(planes * 4 * h * w);
    for pl in 0..planes {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                out.push(x[(pl * h + oy / 2) * w + ox / 2]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, for_each_kernel_device, random_vec, to_vec, upload};

    fn check(xd: [usize; 4], co: usize, k: usize, stride: usize, pad: usize, seed: u64) {
        check_conv(xd, co, k, stride, pad, seed, false);
    }

    /// Against the reference on every device; `depthwise` takes `co = C` and a `[C, 1, k, k]`
    /// weight.
    fn check_conv(xd: [usize; 4], co: usize, k: usize, stride: usize, pad: usize, seed: u64, depthwise: bool) {
        let wd = [co, if depthwise { 1 } else { xd[1] }, k, k];
        let s = if depthwise {
            depthwise_shape(&xd, &wd, stride, pad)
        } else {
            ConvShape::of(&xd, &wd, stride, pad)
        };
        let x = random_vec(xd.iter().product(), seed, 1.0);
        let w = random_vec(wd.iter().product(), seed + 1, 0.3);
        let b = random_vec(co, seed + 2, 1.0);
        let want = reference_direct(&x, &w, &b, &s, depthwise);
        for_each_kernel_device(|dev, label| {
            let (x, w, b) = (upload(&x, &xd, dev), upload(&w, &wd, dev), upload(&b, &[co], dev));
            let got = if depthwise {
                crate::depthwise_conv2d(x, w, b, stride, pad)
            } else {
                crate::conv2d(x, w, b, stride, pad)
            };
            assert_eq!(got.dims(), s.out_dims());
            assert_close(
                &to_vec(got),
                &want,
                1e-5,
                &format!("{label} conv {xd:?} co{co} k{k} s{stride} p{pad} depthwise {depthwise}"),
            );
        });
    }

    #[test]
    fn conv3x3_stride1_pad1() {
        check([2, 5, 11, 13], 7, 3, 1, 1, 90);
    }

    #[test]
    fn conv3x3_stride2_pad1() {
        // Odd and even sizes: the VAE/UNet downsamplers.
        check([1, 8, 16, 16], 12, 3, 2, 1, 91);
        check([2, 3, 9, 7], 5, 3, 2, 1, 92);
    }

    #[test]
    fn conv3x3_across_several_blocks() {
        // More than one 128-pixel and 128-channel block of the shared-tile variant.
        check([1, 6, 13, 12], 130, 3, 1, 1, 96);
    }

    #[test]
    fn conv1x1_stride1_and_2() {
        check([2, 16, 6, 5], 9, 1, 1, 0, 93);
        check([1, 4, 7, 7], 3, 1, 2, 0, 94);
        check([1, 4, 5, 6], 6, 1, 1, 1, 95); // padding 1 on a 1×1 kernel: a zero border
    }

    #[test]
    fn depthwise_3x3_as_in_tinyvit() {
        check_conv([2, 12, 9, 11], 12, 3, 1, 1, 97, true); // MBConv / local conv
        check_conv([1, 10, 16, 15], 10, 3, 2, 1, 98, true); // patch merging, stride 2
        check_conv([1, 3, 5, 5], 3, 5, 1, 0, 99, true);
    }

    #[test]
    fn upsample_matches_reference() {
        let x = random_vec(2 * 3 * 5 * 7, 96, 1.0);
        let want = reference_upsample(&x, 6, 5, 7);
        for_each_kernel_device(|dev, label| {
            let got = crate::upsample_nearest2x(upload::<4>(&x, &[2, 3, 5, 7], dev));
            assert_eq!(got.dims(), [2, 3, 10, 14]);
            assert_close(&to_vec(got), &want, 0.0, &format!("{label} upsample"));
        });
    }
}

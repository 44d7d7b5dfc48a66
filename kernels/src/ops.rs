//! The one tensor-level API models call: a burn backend extension.
//!
//! `#[backend_extension]` routes each call by the tensors' device: wgpu devices (through burn's
//! fusion layer, which treats our kernels as opaque custom ops) reach the WGSL launchers; the CPU
//! backend (Flex) runs the CPU engine's kernels (`<op>/cpu.rs`: threaded, SIMD), so the product
//! also runs, and fast, with no GPU. The f64 references stay the test oracle only.

use burn::backend::TensorMetadata;
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::{Device as BackendDevice, FloatTensor, IntTensor};
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorData};

use crate::activation::Activation;
use crate::conv::ConvShape;
use crate::gemm::GemmShape;
use crate::qgemm::QuantFormat;
use crate::quant::{Int4Weights, Int8Weights};

#[backend_extension(Cube, Fusion, Flex)]
pub trait DivergenKernels: Backend {
    #[fusion(dtype = lhs, shape = crate::gemm::out_shape(lhs, rhs, transpose_rhs))]
    fn gemm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, transpose_rhs: bool) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = crate::qgemm::out_shape(x, out_features))]
    fn qgemm_int8(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: FloatTensor<Self>,
        out_features: usize,
    ) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = crate::qgemm::out_shape(x, out_features))]
    fn qgemm_int4(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: IntTensor<Self>,
        out_features: usize,
    ) -> FloatTensor<Self>;

    #[fusion(dtype = q, shape = q)]
    fn attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;

    #[fusion(dtype = q, shape = q)]
    fn attention_rel_pos(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias_h: FloatTensor<Self>,
        bias_w: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = x)]
    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = x)]
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = x)]
    fn softmax(x: FloatTensor<Self>) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = x)]
    fn activation(x: FloatTensor<Self>, kind: Activation) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = crate::conv::out_shape(x, weight, stride, padding))]
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = crate::conv::depthwise_out_shape(x, weight, stride, padding))]
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = crate::conv::upsample_shape(x))]
    fn upsample_nearest2x(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl DivergenKernels for CubeBackend {
    fn gemm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, transpose_rhs: bool) -> FloatTensor<Self> {
        crate::gemm::launch(lhs, rhs, transpose_rhs)
    }
    fn qgemm_int8(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: FloatTensor<Self>,
        out_features: usize,
    ) -> FloatTensor<Self> {
        crate::qgemm::launch(x, words, scales, out_features, QuantFormat::Int8)
    }
    fn qgemm_int4(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: IntTensor<Self>,
        out_features: usize,
    ) -> FloatTensor<Self> {
        crate::qgemm::launch(x, words, scales, out_features, QuantFormat::Int4)
    }
    fn attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        crate::attention::launch(q, k, v, scale, None)
    }
    fn attention_rel_pos(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias_h: FloatTensor<Self>,
        bias_w: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let bias = crate::attention::RelPosBias { h: bias_h, w: bias_w };
        crate::attention::launch(q, k, v, scale, Some(bias))
    }
    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self> {
        crate::norm::launch_group_norm(x, gamma, beta, groups, eps, silu)
    }
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        crate::norm::launch_layer_norm(x, gamma, beta, eps)
    }
    fn softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::norm::launch_softmax(x)
    }
    fn activation(x: FloatTensor<Self>, kind: Activation) -> FloatTensor<Self> {
        crate::activation::launch(x, kind)
    }
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        crate::conv::launch_conv2d(x, weight, bias, stride, padding)
    }
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        crate::conv::launch_depthwise(x, weight, bias, stride, padding)
    }
    fn upsample_nearest2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::conv::launch_upsample(x)
    }
}

// ---- CPU backend: the CPU engine's kernels -----------------------------------------------

type FlexDevice = BackendDevice<Flex>;

fn read_float(t: FloatTensor<Flex>) -> (Vec<f32>, Vec<usize>, DType) {
    let data =
        pollster::block_on(Flex::float_into_data(t)).unwrap_or_else(|e| panic!("reading a CPU tensor failed: {e:?}"));
    let (dims, dtype) = (data.shape().iter().copied().collect(), data.dtype());
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_else(|e| panic!("CPU tensor is not float: {e:?}"));
    (values, dims, dtype)
}

/// A float CPU tensor's values without a copy where it already is contiguous f32 (weights
/// always are): copying a 64 MB weight on every call cost more than the product itself.
fn float_view(t: &FloatTensor<Flex>) -> (std::borrow::Cow<'_, [f32]>, Vec<usize>, DType) {
    let dims: Vec<usize> = t.shape().iter().copied().collect();
    match t.as_slice::<f32>() {
        Some(values) => (std::borrow::Cow::Borrowed(values), dims, DType::F32),
        None => {
            let (values, dims, dtype) = read_float(t.clone());
            (std::borrow::Cow::Owned(values), dims, dtype)
        }
    }
}

/// An f32 `[N, C, H, W]` tensor whose memory is `[N, H, W, C]` (a permuted view of channels-last
/// data): its values in that order, and its NCHW dims.
fn channels_last_view(t: &FloatTensor<Flex>) -> Option<(&[f32], Vec<usize>)> {
    let layout = t.layout();
    let dims: Vec<usize> = layout.shape().iter().copied().collect();
    let &[n, c, h, w] = dims.as_slice() else { return None };
    let want = [h * w * c, 1, w * c, c].map(|v| v as isize);
    let strides = layout.strides();
    // A dimension of one may carry any stride.
    let matches = (0..4).all(|i| dims[i] == 1 || strides[i] == want[i]);
    if t.dtype() != DType::F32 || layout.is_contiguous() || !matches {
        return None;
    }
    let values = t.storage::<f32>().get(layout.start_offset()..)?.get(..n * c * h * w)?;
    Some((values, dims))
}

/// Packed words without a copy where the tensor holds contiguous 32-bit integers (the
/// quantized weights do: they are uploaded as i32).
fn words_view(t: &IntTensor<Flex>) -> std::borrow::Cow<'_, [u32]> {
    match (t.as_slice::<i32>(), t.as_slice::<u32>()) {
        (Some(signed), _) => std::borrow::Cow::Borrowed(bytemuck::cast_slice(signed)),
        (_, Some(words)) => std::borrow::Cow::Borrowed(words),
        _ => std::borrow::Cow::Owned(read_words(t.clone())),
    }
}

fn qgemm_dims(x: &[usize], out_features: usize) -> Vec<usize> {
    crate::qgemm::out_shape(&Shape::from(x.to_vec()), &out_features)
        .iter()
        .copied()
        .collect()
}

fn read_words(t: IntTensor<Flex>) -> Vec<u32> {
    let data =
        pollster::block_on(Flex::int_into_data(t)).unwrap_or_else(|e| panic!("reading a CPU tensor failed: {e:?}"));
    match data.dtype() {
        DType::U32 => data.try_into_vec::<u32>().unwrap_or_default(),
        _ => data
            .convert::<i32>()
            .try_into_vec::<i32>()
            .unwrap_or_default()
            .into_iter()
            .map(|v| v as u32)
            .collect(),
    }
}

fn write_float(values: Vec<f32>, dims: Vec<usize>, dtype: DType, device: &FlexDevice) -> FloatTensor<Flex> {
    Flex::float_from_data(TensorData::new(values, dims).convert_dtype(dtype), device)
}

fn flex_attention(
    q: FloatTensor<Flex>,
    k: FloatTensor<Flex>,
    v: FloatTensor<Flex>,
    scale: f32,
    bias: Option<(FloatTensor<Flex>, FloatTensor<Flex>)>,
) -> FloatTensor<Flex> {
    let device = q.device();
    let ((qv, qd, dtype), (kv, kd, _), (vv, _, _)) = (float_view(&q), float_view(&k), float_view(&v));
    let bias = bias.as_ref().map(|(h, w)| {
        let ((hv, hd, _), (wv, wd, _)) = (float_view(h), float_view(w));
        assert!(
            hd.len() == 4 && wd.len() == 4 && hd[3] * wd[3] == kd[2],
            "attention: relative-position bias {hd:?} + {wd:?} does not fit {} keys",
            kd[2]
        );
        (hv, wv, wd[3])
    });
    let out = crate::attention::cpu::attention(
        &qv,
        &kv,
        &vv,
        crate::attention::AttentionShape {
            bh: qd[0] * qd[1],
            sq: qd[2],
            skv: kd[2],
            d: qd[3],
        },
        scale,
        bias.as_ref().map(|(h, w, kw)| (&h[..], &w[..], *kw)),
    );
    write_float(out, qd, dtype, &device)
}

impl DivergenKernels for Flex {
    fn gemm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, transpose_rhs: bool) -> FloatTensor<Self> {
        let device = lhs.device();
        let ((a, ad, dtype), (b, bd, _)) = (float_view(&lhs), float_view(&rhs));
        let s = GemmShape::of(&ad, &bd, transpose_rhs);
        write_float(crate::gemm::cpu::gemm(&a, &b, &s), s.out_dims(&ad, &bd), dtype, &device)
    }
    fn qgemm_int8(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: FloatTensor<Self>,
        out_features: usize,
    ) -> FloatTensor<Self> {
        let device = x.device();
        let (xv, xd, dtype) = float_view(&x);
        let k = *xd.last().expect("qgemm: activations need a dimension");
        let m = xv.len() / k.max(1);
        let out = crate::qgemm::cpu::int8(&xv, m, (out_features, k), &words_view(&words), &float_view(&scales).0);
        write_float(out, qgemm_dims(&xd, out_features), dtype, &device)
    }
    fn qgemm_int4(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        scales: IntTensor<Self>,
        out_features: usize,
    ) -> FloatTensor<Self> {
        let device = x.device();
        let (xv, xd, dtype) = float_view(&x);
        let k = *xd.last().expect("qgemm: activations need a dimension");
        let m = xv.len() / k.max(1);
        let out = crate::qgemm::cpu::int4(&xv, m, (out_features, k), &words_view(&words), &words_view(&scales));
        write_float(out, qgemm_dims(&xd, out_features), dtype, &device)
    }
    fn attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        flex_attention(q, k, v, scale, None)
    }
    fn attention_rel_pos(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias_h: FloatTensor<Self>,
        bias_w: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        flex_attention(q, k, v, scale, Some((bias_h, bias_w)))
    }
    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self> {
        let device = x.device();
        let (xv, xd, dtype) = float_view(&x);
        let spatial = xd[2..].iter().product();
        let shape = crate::norm::GroupNormShape {
            n: xd[0],
            c: xd[1],
            spatial,
            groups,
        };
        let out = crate::norm::cpu::group_norm(&xv, shape, &float_view(&gamma).0, &float_view(&beta).0, eps, silu);
        write_float(out, xd, dtype, &device)
    }
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        let device = x.device();
        let (xv, xd, dtype) = float_view(&x);
        let d = *xd.last().expect("layer_norm: scalar input");
        let out = crate::norm::cpu::layer_norm(&xv, d, &float_view(&gamma).0, &float_view(&beta).0, eps);
        write_float(out, xd, dtype, &device)
    }
    fn softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let device = x.device();
        let (xv, xd, dtype) = float_view(&x);
        let d = *xd.last().expect("softmax: scalar input");
        write_float(crate::norm::cpu::softmax(&xv, d), xd, dtype, &device)
    }
    fn activation(x: FloatTensor<Self>, kind: Activation) -> FloatTensor<Self> {
        let device = x.device();
        let (xv, xd, dtype) = float_view(&x);
        write_float(crate::activation::cpu::activation(&xv, kind), xd, dtype, &device)
    }
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let device = x.device();
        let ((xv, xd, dtype), (wv, wd, _)) = (float_view(&x), float_view(&weight));
        let s = ConvShape::of(&xd, &wd, stride, padding);
        write_float(
            crate::conv::cpu::conv2d(&xv, &wv, &float_view(&bias).0, &s),
            s.out_dims().to_vec(),
            dtype,
            &device,
        )
    }
    fn depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let device = x.device();
        if let Some((values, xd)) = channels_last_view(&x) {
            // Token models (TinyViT) hold `[B, H, W, C]` and view it as NCHW through a permute:
            // convolving that memory in place, and answering with the same kind of view, spares
            // the two transposing copies that had cost more than the convolution.
            let (wv, wd, _) = float_view(&weight);
            let s = crate::conv::depthwise_shape(&xd, &wd, stride, padding);
            let out = crate::conv::cpu::depthwise_channels_last(values, &wv, &float_view(&bias).0, &s);
            let nhwc = write_float(out, vec![s.n, s.oh, s.ow, s.co], DType::F32, &device);
            return Flex::float_permute(nhwc, &[0, 3, 1, 2]);
        }
        let ((xv, xd, dtype), (wv, wd, _)) = (float_view(&x), float_view(&weight));
        let s = crate::conv::depthwise_shape(&xd, &wd, stride, padding);
        write_float(
            crate::conv::cpu::depthwise(&xv, &wv, &float_view(&bias).0, &s),
            s.out_dims().to_vec(),
            dtype,
            &device,
        )
    }
    fn upsample_nearest2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let device = x.device();
        let (xv, xd, dtype) = float_view(&x);
        let r = xd.len();
        let out = crate::conv::cpu::upsample(&xv, xd[..r - 2].iter().product(), xd[r - 2], xd[r - 1]);
        let out_dims = crate::conv::upsample_shape(&Shape::from(xd)).iter().copied().collect();
        write_float(out, out_dims, dtype, &device)
    }
}

// ---- Tensor-level API ----------------------------------------------------------------------------

/// `a · b` over the last two dimensions (batched; a batch of 1 broadcasts).
pub fn gemm<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::gemm(
        a.into_dispatch(),
        b.into_dispatch(),
        false,
    ))
}

/// `a · bᵀ` over the last two dimensions: `b` is `[.., N, K]`, the `nn.Linear` weight layout.
pub fn gemm_bt<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::gemm(
        a.into_dispatch(),
        b.into_dispatch(),
        true,
    ))
}

/// An f32 linear-layer weight `W [N, K]` (PyTorch's `[out, in]`) resident on a device, ready for
/// [`linear`]: on a GPU a `[1, N, K]` tensor for the GEMM kernel; on the CPU engine packed once,
/// here, into its micro-kernel's panels (`gemm/cpu.rs`), the row layout not kept beside them.
#[derive(Clone, Debug)]
pub struct DenseWeight {
    pub out_features: usize,
    pub in_features: usize,
    storage: DenseStorage,
}

// One per layer, never in a hot collection: boxing would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum DenseStorage {
    Device(Tensor<3>),
    Cpu(std::sync::Arc<crate::gemm::cpu::PackedF32>),
}

impl DenseWeight {
    /// `w` is `[out_features, in_features]` row-major.
    pub fn new(w: Vec<f32>, out_features: usize, in_features: usize, device: &Device) -> Self {
        let storage = if on_cpu_engine(device) {
            DenseStorage::Cpu(std::sync::Arc::new(crate::gemm::cpu::PackedF32::pack(
                &w,
                out_features,
                in_features,
            )))
        } else {
            DenseStorage::Device(Tensor::from_data(
                TensorData::new(w, [1, out_features, in_features]),
                device,
            ))
        };
        Self {
            out_features,
            in_features,
            storage,
        }
    }

    /// Bytes the weight occupies in f32.
    pub fn bytes(&self) -> usize {
        self.out_features * self.in_features * 4
    }
}

/// `act(x · Wᵀ + bias)` over the last dimension: `x [B, S, K]` → `[B, S, N]`. On the CPU engine
/// the bias and activation are applied by the micro-kernel as it stores (one pass over the
/// output, not three).
pub fn linear(x: Tensor<3>, w: &DenseWeight, bias: Option<&Tensor<1>>, act: Option<Activation>) -> Tensor<3> {
    let k = x.dims()[2];
    assert_eq!(
        k, w.in_features,
        "linear: input has {k} features, weight expects {}",
        w.in_features
    );
    match &w.storage {
        DenseStorage::Cpu(packed) => cpu_linear(x, packed, bias, act),
        DenseStorage::Device(weight) => {
            let y = gemm_bt(x, weight.clone());
            let y = match bias {
                Some(b) => y + b.clone().unsqueeze::<3>(),
                None => y,
            };
            match act {
                Some(kind) => activation(y, kind),
                None => y,
            }
        }
    }
}

fn cpu_linear(
    x: Tensor<3>,
    packed: &crate::gemm::cpu::PackedF32,
    bias: Option<&Tensor<1>>,
    act: Option<Activation>,
) -> Tensor<3> {
    let x = x
        .try_into_primitive::<Flex>()
        .unwrap_or_else(|e| panic!("linear: the weight is packed for the CPU engine, the input is not on it ({e:?})"));
    let bias = bias.map(|b| {
        b.clone().try_into_primitive::<Flex>().unwrap_or_else(|e| {
            panic!("linear: the weight is packed for the CPU engine, the bias is not on it ({e:?})")
        })
    });
    let device = x.device();
    let (xv, xd, dtype) = float_view(&x);
    let k = *xd.last().expect("linear: activations need a dimension");
    let m = xv.len() / k.max(1);
    let bias_values = bias.as_ref().map(|b| float_view(b).0);
    let out = packed.matmul(&xv, m, bias_values.as_deref(), act);
    Tensor::from_primitive::<Flex>(write_float(out, qgemm_dims(&xd, packed.out_features()), dtype, &device))
}

/// A quantized `[N, K]` weight resident on a device, ready for [`qgemm`].
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    pub out_features: usize,
    pub in_features: usize,
    storage: Storage,
    bytes: usize,
}

// One per quantized layer, never in a hot collection: boxing would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum Storage {
    /// The byte layouts of [`crate::quant`], read by the WGSL kernels.
    Device { words: Tensor<1, Int>, scales: Scales },
    /// On the CPU engine: packed once, here, into the integer-dot micro-kernels' panels
    /// (`qgemm/cpu.rs`); the row layout is not kept beside them.
    Cpu(std::sync::Arc<CpuPacked>),
}

#[derive(Debug)]
enum CpuPacked {
    Int8(crate::qgemm::cpu::PackedInt8),
    Int4(crate::qgemm::cpu::PackedInt4),
}

/// Per-format scales: f32 per channel (int8) or f16 pairs packed in 32-bit words (int4).
#[derive(Clone, Debug)]
enum Scales {
    Int8(Tensor<1>),
    Int4(Tensor<1, Int>),
}

fn words_tensor(words: &[u32], device: &Device) -> Tensor<1, Int> {
    // Stored as i32 (every backend has it); the kernels reinterpret the bits.
    let signed: Vec<i32> = words.iter().map(|&w| w as i32).collect();
    Tensor::from_data(TensorData::new(signed, [words.len()]), device)
}

fn on_cpu_engine(device: &Device) -> bool {
    *device == Device::flex()
}

impl QuantizedWeight {
    /// Int8 weights for [`qgemm`]: on the CPU engine packed for integer dots on int8
    /// activations; on a GPU in the byte layout its kernel plan reads (`dequant` or `dot4`).
    pub fn int8(w: &Int8Weights, device: &Device) -> Self {
        if on_cpu_engine(device) {
            let packed = crate::qgemm::cpu::PackedInt8::pack(w);
            return Self::cpu(w.n, w.k, packed.bytes(), CpuPacked::Int8(packed));
        }
        Self::int8_weight_only(w, device)
    }

    /// Int8 weights whose products keep f32 activations on the CPU engine (tiles widened to
    /// f32): for a layer whose activations must not be rounded. On a GPU the same as
    /// [`Self::int8`]: the device's kernel plan decides there.
    pub fn int8_weight_only(w: &Int8Weights, device: &Device) -> Self {
        let scales = Tensor::from_data(TensorData::new(w.scales.clone(), [w.scales.len()]), device);
        Self {
            out_features: w.n,
            in_features: w.k,
            storage: Storage::Device {
                words: words_tensor(&w.words, device),
                scales: Scales::Int8(scales),
            },
            bytes: w.bytes(),
        }
    }

    /// Int4 weights for [`qgemm`], as [`Self::int8`].
    pub fn int4(w: &Int4Weights, device: &Device) -> Self {
        if on_cpu_engine(device) {
            let packed = crate::qgemm::cpu::PackedInt4::pack(w);
            return Self::cpu(w.n, w.k, packed.bytes(), CpuPacked::Int4(packed));
        }
        Self::int4_weight_only(w, device)
    }

    /// Int4 weights with f32 activations on the CPU engine, as [`Self::int8_weight_only`].
    pub fn int4_weight_only(w: &Int4Weights, device: &Device) -> Self {
        Self {
            out_features: w.n,
            in_features: w.k,
            storage: Storage::Device {
                words: words_tensor(&w.words, device),
                scales: Scales::Int4(words_tensor(&w.scales, device)),
            },
            bytes: w.bytes(),
        }
    }

    fn cpu(out_features: usize, in_features: usize, bytes: usize, packed: CpuPacked) -> Self {
        Self {
            out_features,
            in_features,
            storage: Storage::Cpu(std::sync::Arc::new(packed)),
            bytes,
        }
    }

    pub fn format(&self) -> QuantFormat {
        match &self.storage {
            Storage::Device {
                scales: Scales::Int8(_),
                ..
            } => QuantFormat::Int8,
            Storage::Cpu(packed) if matches!(**packed, CpuPacked::Int8(_)) => QuantFormat::Int8,
            _ => QuantFormat::Int4,
        }
    }

    /// Bytes the weight occupies on the device (packed values plus scales).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// `x · Wᵀ` for a quantized `W [N, K]`; `x` is `[.., K]`, the result `[.., N]`.
pub fn qgemm<const D: usize>(x: Tensor<D>, w: &QuantizedWeight) -> Tensor<D> {
    let k = x.dims()[D - 1];
    assert_eq!(
        k, w.in_features,
        "qgemm: input has {k} features, weight expects {}",
        w.in_features
    );
    let (words, scales) = match &w.storage {
        Storage::Cpu(packed) => return cpu_qgemm(x, packed, w.out_features),
        Storage::Device { words, scales } => (words, scales),
    };
    let (x, words) = (x.into_dispatch(), words.clone().into_dispatch());
    Tensor::from_dispatch(match scales {
        Scales::Int8(scales) => {
            <Dispatch as DivergenKernels>::qgemm_int8(x, words, scales.clone().into_dispatch(), w.out_features)
        }
        Scales::Int4(scales) => {
            <Dispatch as DivergenKernels>::qgemm_int4(x, words, scales.clone().into_dispatch(), w.out_features)
        }
    })
}

/// The CPU engine's quantized product: straight to the packed panels, past burn's dispatch,
/// which has no way to carry them.
fn cpu_qgemm<const D: usize>(x: Tensor<D>, packed: &CpuPacked, out_features: usize) -> Tensor<D> {
    let x = x
        .try_into_primitive::<Flex>()
        .unwrap_or_else(|e| panic!("qgemm: the weight is packed for the CPU engine, the input is not on it ({e:?})"));
    let device = x.device();
    let (xv, xd, dtype) = float_view(&x);
    let k = *xd.last().expect("qgemm: activations need a dimension");
    let m = xv.len() / k.max(1);
    let out = match packed {
        CpuPacked::Int8(p) => p.matmul(&xv, m),
        CpuPacked::Int4(p) => p.matmul(&xv, m),
    };
    Tensor::from_primitive::<Flex>(write_float(out, qgemm_dims(&xd, out_features), dtype, &device))
}

/// `softmax(q·kᵀ·scale)·v` for `[B, H, S, D]` tensors, never materialising the score matrix.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f32) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
    ))
}

/// [`attention`] over keys laid out as a `KH×KW` grid, each score plus the decomposed
/// relative-position bias `bias_h [B, H, Sq, KH]` (indexed by the key's row) and `bias_w
/// [B, H, Sq, KW]` (by its column), as SAM's image encoder adds it after scaling.
pub fn attention_rel_pos(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias_h: Tensor<4>,
    bias_w: Tensor<4>,
    scale: f32,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::attention_rel_pos(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias_h.into_dispatch(),
        bias_w.into_dispatch(),
        scale,
    ))
}

/// Attention straight from a QKV projection's output `[N, S, H·3·D]` (each head's `[q | k | v]`
/// side by side, as TinyViT's projection writes it), with a full bias `bias [H, S, S]` added to
/// the scaled scores: `softmax(q·kᵀ·scale + bias)·v` → `[N, S, H·D]`, ready for the output
/// projection. On the CPU engine one fused pass (`attention/cpu.rs`) with no permuted copies;
/// on a GPU composed from the GEMM and softmax kernels.
pub fn attention_packed_qkv(qkv: Tensor<3>, heads: usize, scale: f32, bias: &Tensor<3>) -> Tensor<3> {
    let [n, s, width] = qkv.dims();
    assert!(
        heads > 0 && width % (3 * heads) == 0,
        "attention_packed_qkv: {width} features are not {heads} heads of [q | k | v]"
    );
    let d = width / (3 * heads);
    assert_eq!(
        bias.dims(),
        [heads, s, s],
        "attention_packed_qkv: bias must be [heads, S, S] for {heads} heads of {s} tokens"
    );
    if on_cpu_engine(&qkv.device()) {
        let to_flex = |t: Tensor<3>| {
            t.try_into_primitive::<Flex>()
                .unwrap_or_else(|e| panic!("attention_packed_qkv: a tensor is not on the CPU engine ({e:?})"))
        };
        let (qkv, bias) = (to_flex(qkv), to_flex(bias.clone()));
        let device = qkv.device();
        let ((qv, _, dtype), (bv, _, _)) = (float_view(&qkv), float_view(&bias));
        let out = crate::attention::cpu::packed_qkv_with_bias(&qv, (n, s, heads, d), scale, &bv);
        return Tensor::from_primitive::<Flex>(write_float(out, vec![n, s, heads * d], dtype, &device));
    }
    let qkv = qkv.reshape([n, s, heads, 3 * d]);
    let part = |i: usize| {
        qkv.clone()
            .slice([0..n, 0..s, 0..heads, i * d..(i + 1) * d])
            .swap_dims(1, 2)
    };
    let scores = gemm_bt(part(0), part(1)) * scale + bias.clone().unsqueeze::<4>();
    gemm(softmax(scores), part(2))
        .swap_dims(1, 2)
        .reshape([n, s, heads * d])
}

/// Group norm of `[N, C, ...]` with per-channel affine, optionally followed by SiLU.
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::group_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        eps,
        silu,
    ))
}

/// Layer norm over the last dimension.
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f32) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// Softmax over the last dimension.
pub fn softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::softmax(x.into_dispatch()))
}

pub fn activation<const D: usize>(x: Tensor<D>, kind: Activation) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::activation(x.into_dispatch(), kind))
}

pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation(x, Activation::Silu)
}

/// GELU, exact (`erf`) or with the tanh approximation.
pub fn gelu<const D: usize>(x: Tensor<D>, tanh_approximation: bool) -> Tensor<D> {
    activation(
        x,
        if tanh_approximation {
            Activation::GeluTanh
        } else {
            Activation::GeluErf
        },
    )
}

/// 2-D convolution, NCHW, weight `[Co, Ci, KH, KW]`, bias `[Co]`.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, stride: usize, padding: usize) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        stride,
        padding,
    ))
}

/// Depthwise 2-D convolution (`groups = C`), NCHW, weight `[C, 1, KH, KW]`, bias `[C]`.
pub fn depthwise_conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, stride: usize, padding: usize) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::depthwise_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        stride,
        padding,
    ))
}

/// Nearest-neighbour 2× upsampling of the last two dimensions.
pub fn upsample_nearest2x<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as DivergenKernels>::upsample_nearest2x(x.into_dispatch()))
}

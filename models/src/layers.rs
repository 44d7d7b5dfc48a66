//! The layers every model here is built from: linear layers whose weights are quantized (or not)
//! at load, and layer norms, both through our kernels.

use burn::tensor::{Device, Tensor, TensorData};
use divergen_kernels::quant::{Int4Weights, Int8Weights};
use divergen_kernels::{
    Activation, DenseWeight, QuantizedWeight, activation, conv2d, group_norm, layer_norm, linear, qgemm,
};

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;

/// Quantization applied to linear layers at load. Embeddings, norms, positional tables and
/// first convolutions stay f32; each model decides per layer which format its layers take (see
/// [`Quantization::sensitive`]). How activations meet the weights is the device's: weight-only
/// on the `cpu` kernel family, int8 activations with integer dots on the `gpu` family's `dot4`
/// and on the CPU engine (`divergen_kernels::qgemm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    None,
    Int8,
    Int4,
}

impl Quantization {
    /// The format for layers most sensitive to rounding (attention, projections): int4 requests
    /// fall back to int8 there.
    pub fn sensitive(self) -> Quantization {
        match self {
            Quantization::Int4 => Quantization::Int8,
            other => other,
        }
    }
}

// A few of these per layer, never in a hot collection: boxing would only add indirection.
#[allow(clippy::large_enum_variant)]
enum Weight {
    Dense(DenseWeight),
    Quantized(QuantizedWeight),
}

/// `y = x·Wᵀ + b` over the last dimension, `W` in PyTorch's `[out, in]` layout.
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor<1>>,
}

impl Linear {
    pub(crate) fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let w = ckpt.values(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(ckpt.values(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self::from_values(w, bias, out, inp, quant, device))
    }

    /// A layer from weights already in hand (`[out, in]` row-major), e.g. a 1×1 or patch
    /// convolution flattened to a matrix.
    pub(crate) fn from_values(
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        out: usize,
        inp: usize,
        quant: Quantization,
        device: &Device,
    ) -> Self {
        let weight = match quant {
            Quantization::None => Weight::Dense(DenseWeight::new(w, out, inp, device)),
            // The per-layer choice between int8 activations and f32 ones (`*_weight_only`): every
            // quantized layer of CLIP, SAM, MobileSAM and the UNet keeps its parity bound with int8
            // activations on the CPU engine (int8 cosine ≥ 0.999, int4 ≥ 0.99 in the parity
            // tests), so none is kept weight-only.
            Quantization::Int8 => {
                Weight::Quantized(QuantizedWeight::int8(&Int8Weights::quantize(&w, out, inp), device))
            }
            Quantization::Int4 => {
                Weight::Quantized(QuantizedWeight::int4(&Int4Weights::quantize(&w, out, inp), device))
            }
        };
        let bias = bias.map(|b| Tensor::from_data(TensorData::new(b, [out]), device));
        Linear { weight, bias }
    }

    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_then(x, None)
    }

    /// `act(x·Wᵀ + b)`: on the CPU engine an f32 layer applies the activation as it stores its
    /// output, in place of a separate pass.
    pub(crate) fn forward_then(&self, x: Tensor<3>, act: Option<Activation>) -> Tensor<3> {
        match &self.weight {
            Weight::Dense(w) => linear(x, w, self.bias.as_ref(), act),
            Weight::Quantized(q) => {
                let y = qgemm(x, q);
                let y = match &self.bias {
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

    pub(crate) fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.out_features,
            Weight::Quantized(q) => q.out_features,
        }
    }

    /// Bytes the layer would hold in f32: the size before quantization.
    pub(crate) fn f32_bytes(&self) -> usize {
        let (out, inp) = match &self.weight {
            Weight::Dense(w) => (w.out_features, w.in_features),
            Weight::Quantized(q) => (q.out_features, q.in_features),
        };
        (out * inp + self.bias.as_ref().map_or(0, |_| out)) * 4
    }

    /// Bytes the layer holds on the device.
    pub(crate) fn bytes(&self) -> usize {
        let weight = match &self.weight {
            Weight::Dense(w) => w.bytes(),
            Weight::Quantized(q) => q.bytes(),
        };
        weight + self.bias.as_ref().map_or(0, |b| b.shape().num_elements() * 4)
    }
}

pub(crate) struct LayerNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(LayerNorm {
            gamma: ckpt.tensor(&format!("{prefix}.weight"), [dim], device)?,
            beta: ckpt.tensor(&format!("{prefix}.bias"), [dim], device)?,
            eps: eps as f32,
        })
    }

    /// Normalises the last dimension.
    pub(crate) fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.gamma.clone(), self.beta.clone(), self.eps)
    }

    /// Normalises the channels of an NCHW map (SAM's `LayerNorm2d`).
    pub(crate) fn forward_channels(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward(x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
    }
}

/// A square-kernel convolution, padding `k / 2` ("same" at stride 1): f32 through our conv
/// kernel, or with quantized weights as an im2col GEMM through `qgemm`.
pub(crate) struct Conv2d {
    kernel: ConvKernel,
    stride: usize,
    k: usize,
}

// One per layer, built once.
#[allow(clippy::large_enum_variant)]
enum ConvKernel {
    Dense {
        weight: Tensor<4>,
        bias: Tensor<1>,
    },
    /// `[out, inp·k·k]` with the bias: the convolution over unfolded patches.
    Quantized(Linear),
}

impl Conv2d {
    /// `prefix.weight` `[out, inp, k, k]` and `prefix.bias` (zeros when `bias` is false), f32.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        out: usize,
        inp: usize,
        k: usize,
        stride: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_quantized(ckpt, prefix, out, inp, k, stride, bias, Quantization::None, device)
    }

    /// As [`Conv2d::load`], with the weights quantized when `quant` asks for it; the
    /// convolution then runs as an im2col GEMM through `qgemm`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_quantized(
        ckpt: &Checkpoint,
        prefix: &str,
        out: usize,
        inp: usize,
        k: usize,
        stride: usize,
        bias: bool,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let bias_values = if bias {
            ckpt.values(&format!("{prefix}.bias"), &[out])?
        } else {
            vec![0.0; out]
        };
        let weight = ckpt.values(&format!("{prefix}.weight"), &[out, inp, k, k])?;
        let kernel = if quant == Quantization::None {
            ConvKernel::Dense {
                weight: Tensor::from_data(TensorData::new(weight, [out, inp, k, k]), device),
                bias: Tensor::from_data(TensorData::new(bias_values, [out]), device),
            }
        } else {
            ConvKernel::Quantized(Linear::from_values(
                weight,
                Some(bias_values),
                out,
                inp * k * k,
                quant,
                device,
            ))
        };
        Ok(Conv2d { kernel, stride, k })
    }

    pub(crate) fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let pad = self.k / 2;
        match &self.kernel {
            ConvKernel::Dense { weight, bias } => conv2d(x, weight.clone(), bias.clone(), self.stride, pad),
            ConvKernel::Quantized(linear) => {
                let [b, c, h, w] = x.dims();
                let (k, s) = (self.k, self.stride);
                let (ho, wo) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
                // Each tap reads `s·ho` rows from its offset, then keeps every `s`-th: pad the
                // bottom/right far enough for the last tap's window.
                let (extra_h, extra_w) = (
                    (k - 1 + s * ho).saturating_sub(h + 2 * pad),
                    (k - 1 + s * wo).saturating_sub(w + 2 * pad),
                );
                let device = x.device();
                let mut padded = x;
                if pad + extra_h > 0 {
                    let top = Tensor::zeros([b, c, pad, w], &device);
                    let bottom = Tensor::zeros([b, c, pad + extra_h, w], &device);
                    padded = Tensor::cat(vec![top, padded, bottom], 2);
                }
                let hp = h + 2 * pad + extra_h;
                if pad + extra_w > 0 {
                    let left = Tensor::zeros([b, c, hp, pad], &device);
                    let right = Tensor::zeros([b, c, hp, pad + extra_w], &device);
                    padded = Tensor::cat(vec![left, padded, right], 3);
                }
                // Patches in the weight's (channel, row, column) order.
                let taps: Vec<Tensor<4>> = (0..k * k)
                    .map(|t| {
                        let (r, q) = (t / k, t % k);
                        let window = padded.clone().slice([0..b, 0..c, r..r + s * ho, q..q + s * wo]);
                        if s == 1 {
                            window
                        } else {
                            window
                                .reshape([b, c, ho, s, wo * s])
                                .slice([0..b, 0..c, 0..ho, 0..1, 0..wo * s])
                                .reshape([b, c, ho, wo, s])
                                .slice([0..b, 0..c, 0..ho, 0..wo, 0..1])
                                .reshape([b, c, ho, wo])
                        }
                    })
                    .collect();
                let patches = Tensor::stack::<5>(taps, 2)
                    .reshape([b, c * k * k, ho * wo])
                    .swap_dims(1, 2);
                let y = linear.forward(patches);
                let out = y.dims()[2];
                y.swap_dims(1, 2).reshape([b, out, ho, wo])
            }
        }
    }

    /// Bytes the weights hold on the device, and what they would hold in f32.
    pub(crate) fn weight_bytes(&self) -> (usize, usize) {
        match &self.kernel {
            ConvKernel::Dense { weight, bias } => {
                let n = (weight.shape().num_elements() + bias.shape().num_elements()) * 4;
                (n, n)
            }
            ConvKernel::Quantized(l) => (l.bytes(), l.f32_bytes()),
        }
    }
}

/// Group norm over NCHW maps, optionally fused with SiLU.
pub(crate) struct GroupNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub(crate) fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        channels: usize,
        groups: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(GroupNorm {
            gamma: ckpt.tensor(&format!("{prefix}.weight"), [channels], device)?,
            beta: ckpt.tensor(&format!("{prefix}.bias"), [channels], device)?,
            groups,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        group_norm(x, self.gamma.clone(), self.beta.clone(), self.groups, self.eps, silu)
    }
}

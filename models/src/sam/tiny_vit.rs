//! MobileSAM's image encoder, TinyViT-5M (Wu et al., 2022) as `mobile_sam` builds it: a
//! two-convolution stem to 1/4 resolution, a stage of MBConv blocks, then three stages of
//! windowed attention blocks (each with a depthwise "local" convolution and an MLP), joined by
//! patch-merging layers, then SAM's neck.
//!
//! Every convolution is followed by batch norm in the checkpoint; the norms are folded into the
//! convolutions at load (inference statistics), so the GPU sees plain convolutions. 1×1
//! convolutions run as linear layers on token-major activations (and are quantized like them);
//! depthwise 3×3 convolutions run through our depthwise kernel.

use burn::tensor::{Device, Tensor, TensorData};
use divergen_kernels::{Activation, attention_packed_qkv, conv2d, depthwise_conv2d, gelu};

use super::image_encoder::{Neck, in_windows};
use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::{LayerNorm, Linear, Quantization};

/// `TinyViT`'s constructor arguments as MobileSAM's `build_sam_vit_t` passes them.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyVitConfig {
    pub img_size: usize,
    pub embed_dims: Vec<usize>,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_sizes: Vec<usize>,
    pub mlp_ratio: usize,
    pub mbconv_expand_ratio: usize,
    pub out_chans: usize,
}

impl TinyVitConfig {
    /// MobileSAM (TinyViT-5M at 1024²).
    pub fn mobile_sam() -> Self {
        TinyVitConfig {
            img_size: 1024,
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            mlp_ratio: 4,
            mbconv_expand_ratio: 4,
            out_chans: 256,
        }
    }

    /// The configuration a checkpoint was trained with, from its shapes: stage widths from the
    /// first block of each stage, depths from block counts, heads and windows from the attention
    /// bias tables (`heads × window²` distinct offsets).
    pub fn infer(ckpt: &Checkpoint) -> Result<Self, ModelError> {
        let keys = ckpt.keys();
        let shape = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, s)| s.clone());
        let need = |key: &str| shape(key).ok_or_else(|| ModelError::at(ckpt.path(), format!("missing tensor {key}")));
        let stages = (0..)
            .take_while(|i| {
                keys.iter()
                    .any(|(k, _)| k.starts_with(&format!("image_encoder.layers.{i}.")))
            })
            .count();
        if stages < 2 {
            return Err(ModelError::at(ckpt.path(), "TinyViT checkpoint without its stages"));
        }
        let mut c = TinyVitConfig {
            img_size: 1024,
            embed_dims: Vec::new(),
            depths: Vec::new(),
            num_heads: vec![0],
            window_sizes: vec![0],
            mlp_ratio: 4,
            mbconv_expand_ratio: 4,
            out_chans: need("image_encoder.neck.0.weight")?[0],
        };
        for i in 0..stages {
            let pre = format!("image_encoder.layers.{i}.blocks");
            let depth = (0..)
                .take_while(|j| keys.iter().any(|(k, _)| k.starts_with(&format!("{pre}.{j}."))))
                .count();
            c.depths.push(depth);
            if i == 0 {
                let conv1 = need(&format!("{pre}.0.conv1.c.weight"))?;
                c.embed_dims.push(conv1[1]);
                c.mbconv_expand_ratio = conv1[0] / conv1[1].max(1);
            } else {
                c.embed_dims.push(need(&format!("{pre}.0.attn.norm.weight"))?[0]);
                let biases = need(&format!("{pre}.0.attn.attention_biases"))?;
                c.num_heads.push(biases[0]);
                let window = (biases[1] as f64).sqrt().round() as usize;
                if window * window != biases[1] {
                    return Err(ModelError::at(
                        ckpt.path(),
                        format!("{pre}.0.attn.attention_biases {biases:?} is not heads × window²"),
                    ));
                }
                c.window_sizes.push(window);
                c.mlp_ratio = need(&format!("{pre}.0.mlp.fc1.weight"))?[0] / c.embed_dims[i].max(1);
            }
        }
        Ok(c)
    }

    /// Token-grid side at the input of each stage: the stem quarters the image, each patch
    /// merging halves it, except into the last stage.
    fn resolutions(&self) -> Vec<usize> {
        let base = self.img_size / 4;
        let n = self.embed_dims.len();
        (0..n).map(|i| base >> if i == n - 1 { i - 1 } else { i }).collect()
    }
}

/// A convolution with its batch norm folded in: `[Co, Ci/groups, K, K]` + bias.
fn conv_bn(ckpt: &Checkpoint, prefix: &str, shape: [usize; 4]) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let co = shape[0];
    let w = ckpt.values(&format!("{prefix}.c.weight"), &shape)?;
    let gamma = ckpt.values(&format!("{prefix}.bn.weight"), &[co])?;
    let beta = ckpt.values(&format!("{prefix}.bn.bias"), &[co])?;
    let mean = ckpt.values(&format!("{prefix}.bn.running_mean"), &[co])?;
    let var = ckpt.values(&format!("{prefix}.bn.running_var"), &[co])?;
    const EPS: f64 = 1e-5;
    let per = w.len() / co;
    let mut weight = Vec::with_capacity(w.len());
    let mut bias = Vec::with_capacity(co);
    for o in 0..co {
        let scale = gamma[o] as f64 / (var[o] as f64 + EPS).sqrt();
        weight.extend(w[o * per..(o + 1) * per].iter().map(|&v| (v as f64 * scale) as f32));
        bias.push((beta[o] as f64 - mean[o] as f64 * scale) as f32);
    }
    Ok((weight, bias))
}

/// A 1×1 convolution + batch norm as a linear layer over channels.
fn pointwise(
    ckpt: &Checkpoint,
    prefix: &str,
    out: usize,
    inp: usize,
    quant: Quantization,
    device: &Device,
) -> Result<Linear, ModelError> {
    let (w, b) = conv_bn(ckpt, prefix, [out, inp, 1, 1])?;
    Ok(Linear::from_values(w, Some(b), out, inp, quant, device))
}

/// A depthwise K×K convolution + batch norm.
struct Depthwise {
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
    pad: usize,
}

impl Depthwise {
    fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        c: usize,
        k: usize,
        stride: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (w, b) = conv_bn(ckpt, prefix, [c, 1, k, k])?;
        Ok(Depthwise {
            weight: Tensor::from_data(TensorData::new(w, [c, 1, k, k]), device),
            bias: Tensor::from_data(TensorData::new(b, [c]), device),
            stride,
            pad: k / 2,
        })
    }

    /// Tokens `[B, side², C]` → tokens at the strided side.
    fn forward(&self, x: Tensor<3>, side: usize) -> (Tensor<3>, usize) {
        let [b, _, c] = x.dims();
        let x = x.reshape([b, side, side, c]).permute([0, 3, 1, 2]);
        let y = depthwise_conv2d(x, self.weight.clone(), self.bias.clone(), self.stride, self.pad);
        let [_, _, oh, ow] = y.dims();
        (y.permute([0, 2, 3, 1]).reshape([b, oh * ow, c]), oh)
    }
}

struct MbConv {
    conv1: Linear,
    conv2: Depthwise,
    conv3: Linear,
}

struct PatchMerging {
    conv1: Linear,
    conv2: Depthwise,
    conv3: Linear,
}

impl PatchMerging {
    fn forward(&self, x: Tensor<3>, side: usize) -> (Tensor<3>, usize) {
        let h = self.conv1.forward_then(x, Some(Activation::GeluErf));
        let (h, side) = self.conv2.forward(h, side);
        (self.conv3.forward(gelu(h, false)), side)
    }
}

struct Attention {
    norm: LayerNorm,
    qkv: Linear,
    proj: Linear,
    /// `[heads, N, N]`: the learned bias of each (|dy|, |dx|) offset, expanded at load.
    bias: Tensor<3>,
    heads: usize,
    key_dim: usize,
}

struct Block {
    attn: Attention,
    local_conv: Depthwise,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    window: usize,
}

struct Stage {
    mbconvs: Vec<MbConv>,
    blocks: Vec<Block>,
    downsample: Option<PatchMerging>,
    side: usize,
}

pub struct TinyVit {
    pub config: TinyVitConfig,
    stem1: (Tensor<4>, Tensor<1>),
    stem2: (Tensor<4>, Tensor<1>),
    stages: Vec<Stage>,
    neck: Neck,
}

/// TinyViT's attention offsets: for every pair of window cells, the index of their
/// (|dy|, |dx|) in first-seen order, as `Attention.__init__` numbers them.
fn offset_indices(window: usize) -> (Vec<usize>, usize) {
    let points: Vec<(usize, usize)> = (0..window).flat_map(|y| (0..window).map(move |x| (y, x))).collect();
    let mut seen = std::collections::HashMap::new();
    let mut idxs = Vec::with_capacity(points.len() * points.len());
    for p1 in &points {
        for p2 in &points {
            let offset = (p1.0.abs_diff(p2.0), p1.1.abs_diff(p2.1));
            let next = seen.len();
            idxs.push(*seen.entry(offset).or_insert(next));
        }
    }
    (idxs, seen.len())
}

impl TinyVit {
    pub fn load(
        ckpt: &Checkpoint,
        config: TinyVitConfig,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let e = &config.embed_dims;
        let tensor4 = |(w, b): (Vec<f32>, Vec<f32>), shape: [usize; 4]| {
            (
                Tensor::from_data(TensorData::new(w, shape), device),
                Tensor::from_data(TensorData::new(b, [shape[0]]), device),
            )
        };
        let half = e[0] / 2;
        let stem1 = tensor4(
            conv_bn(ckpt, "image_encoder.patch_embed.seq.0", [half, 3, 3, 3])?,
            [half, 3, 3, 3],
        );
        let stem2 = tensor4(
            conv_bn(ckpt, "image_encoder.patch_embed.seq.2", [e[0], half, 3, 3])?,
            [e[0], half, 3, 3],
        );
        let sides = config.resolutions();
        let n = e.len();
        let mut stages = Vec::with_capacity(n);
        for i in 0..n {
            let pre = format!("image_encoder.layers.{i}");
            let dim = e[i];
            let mut stage = Stage {
                mbconvs: Vec::new(),
                blocks: Vec::new(),
                downsample: None,
                side: sides[i],
            };
            for j in 0..config.depths[i] {
                let b = format!("{pre}.blocks.{j}");
                if i == 0 {
                    let hidden = dim * config.mbconv_expand_ratio;
                    stage.mbconvs.push(MbConv {
                        // The stem's MBConvs see every pixel: int8 at most.
                        conv1: pointwise(ckpt, &format!("{b}.conv1"), hidden, dim, quant.sensitive(), device)?,
                        conv2: Depthwise::load(ckpt, &format!("{b}.conv2"), hidden, 3, 1, device)?,
                        conv3: pointwise(ckpt, &format!("{b}.conv3"), dim, hidden, quant.sensitive(), device)?,
                    });
                } else {
                    let heads = config.num_heads[i];
                    let key_dim = dim / heads;
                    let window = config.window_sizes[i];
                    let (idxs, offsets) = offset_indices(window);
                    let table = ckpt.values(&format!("{b}.attn.attention_biases"), &[heads, offsets])?;
                    let cells = window * window;
                    let bias: Vec<f32> = (0..heads)
                        .flat_map(|h| idxs.iter().map(|&k| table[h * offsets + k]).collect::<Vec<_>>())
                        .collect();
                    let hidden = dim * config.mlp_ratio;
                    // Int4 only in the last stage's MLPs (45% of the encoder's linear weights);
                    // everything else int8. Measured on the parity fixture (embedding cosine to
                    // f32): int4 in every MLP and 1×1 conv gave 0.9876, last stage only 0.9944.
                    let mlp_quant = if i + 1 == n { quant } else { quant.sensitive() };
                    let linear =
                        |name: &str, out, inp, q| Linear::load(ckpt, &format!("{b}.{name}"), out, inp, true, q, device);
                    stage.blocks.push(Block {
                        attn: Attention {
                            norm: LayerNorm::load(ckpt, &format!("{b}.attn.norm"), dim, 1e-5, device)?,
                            qkv: linear("attn.qkv", 3 * dim, dim, quant.sensitive())?,
                            proj: linear("attn.proj", dim, dim, quant.sensitive())?,
                            bias: Tensor::from_data(TensorData::new(bias, [heads, cells, cells]), device),
                            heads,
                            key_dim,
                        },
                        local_conv: Depthwise::load(ckpt, &format!("{b}.local_conv"), dim, 3, 1, device)?,
                        mlp_norm: LayerNorm::load(ckpt, &format!("{b}.mlp.norm"), dim, 1e-5, device)?,
                        fc1: linear("mlp.fc1", hidden, dim, mlp_quant)?,
                        fc2: linear("mlp.fc2", dim, hidden, mlp_quant)?,
                        window,
                    });
                }
            }
            if i + 1 < n {
                let out = e[i + 1];
                // As in MobileSAM: merging into the widest stages keeps the resolution.
                let stride = if matches!(out, 320 | 448 | 576) { 1 } else { 2 };
                let d = format!("{pre}.downsample");
                stage.downsample = Some(PatchMerging {
                    conv1: pointwise(ckpt, &format!("{d}.conv1"), out, dim, quant.sensitive(), device)?,
                    conv2: Depthwise::load(ckpt, &format!("{d}.conv2"), out, 3, stride, device)?,
                    conv3: pointwise(ckpt, &format!("{d}.conv3"), out, out, quant.sensitive(), device)?,
                });
            }
            stages.push(stage);
        }
        let last = *e.last().expect("at least two stages");
        Ok(TinyVit {
            stem1,
            stem2,
            stages,
            neck: Neck::load(ckpt, last, config.out_chans, quant, device)?,
            config,
        })
    }

    /// Side of the embedding grid this encoder produces.
    pub fn grid(&self) -> usize {
        self.stages.last().map_or(0, |s| s.side)
    }

    /// `[B, 3, S, S]` preprocessed pixels → `[B, out_chans, g, g]`.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<4> {
        let b = pixels.dims()[0];
        let x = gelu(conv2d(pixels, self.stem1.0.clone(), self.stem1.1.clone(), 2, 1), false);
        let x = conv2d(x, self.stem2.0.clone(), self.stem2.1.clone(), 2, 1);
        let [_, c, side, _] = x.dims();
        let mut x = x.permute([0, 2, 3, 1]).reshape([b, side * side, c]);
        let mut side = side;
        for stage in &self.stages {
            for m in &stage.mbconvs {
                let h = m.conv1.forward_then(x.clone(), Some(Activation::GeluErf));
                let (h, _) = m.conv2.forward(h, side);
                x = gelu(m.conv3.forward(gelu(h, false)) + x, false);
            }
            for block in &stage.blocks {
                x = self.block(block, x, side);
            }
            if let Some(down) = &stage.downsample {
                (x, side) = down.forward(x, side);
            }
        }
        self.neck.forward(x, side)
    }

    fn block(&self, block: &Block, x: Tensor<3>, side: usize) -> Tensor<3> {
        let w = block.window;
        let a = if side == w {
            self.attention(&block.attn, x.clone())
        } else {
            // The attention's own norm sees the zero padding, as in TinyViT.
            in_windows(x.clone(), side, w, |windows| self.attention(&block.attn, windows))
        };
        let x = x + a;
        let (x, _) = block.local_conv.forward(x, side);
        let m = block.fc2.forward(
            block
                .fc1
                .forward_then(block.mlp_norm.forward(x.clone()), Some(Activation::GeluErf)),
        );
        x + m
    }

    /// Attention within `[N, w², C]` windows, per-head `[q | k | v]` projections and the
    /// learned offset bias.
    fn attention(&self, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        let qkv = attn.qkv.forward(attn.norm.forward(x));
        let o = attention_packed_qkv(qkv, attn.heads, (attn.key_dim as f32).powf(-0.5), &attn.bias);
        attn.proj.forward(o)
    }

    /// The linear layers, for size accounting.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut all = vec![self.neck.linear()];
        for stage in &self.stages {
            for m in &stage.mbconvs {
                all.extend([&m.conv1, &m.conv3]);
            }
            for b in &stage.blocks {
                all.extend([&b.attn.qkv, &b.attn.proj, &b.fc1, &b.fc2]);
            }
            if let Some(d) = &stage.downsample {
                all.extend([&d.conv1, &d.conv3]);
            }
        }
        all
    }
}

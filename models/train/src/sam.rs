//! Training a tiny Segment Anything with burn's autodiff, in burn's own modules, then exporting
//! it with `segment_anything`'s state-dict keys so [`divergen_models::sam::Sam::load`] reads it as it
//! reads `sam_vit_b_01ec64.pth`.
//!
//! The architecture is SAM's at a smaller size: a ViT encoder with windowed and global attention
//! and decomposed relative positions, the neck, the random-Fourier prompt encoder and the
//! two-way mask decoder with three multimask outputs and an IoU head. Supervision follows SAM's
//! recipe where it matters here: a prompt that names one thing is trained on one fixed output
//! (box → output 0, the 4-corner background prompt → outputs 0 and 3, the one DiverGen reads as
//! "multimask index 2"), a lone point on the best of the three multimask outputs; BCE + dice on
//! the low-resolution logits, MSE on the IoU head.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{gelu, log_sigmoid, relu, sigmoid, softmax};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use serde::Serialize;

use crate::{StateDict, by_tenth, learning_rate, scalar};
use divergen_models::error::ModelError;

/// The tiny model's shape, in `_build_sam`'s terms.
#[derive(Clone, Debug, Serialize)]
pub struct TinySamConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub encoder_dim: usize,
    pub encoder_depth: usize,
    pub encoder_heads: usize,
    pub window_size: usize,
    pub global_attn_indexes: Vec<usize>,
    /// The image embedding's and the decoder's width (SAM: 256).
    pub prompt_embed_dim: usize,
    pub mask_in_chans: usize,
    pub decoder_depth: usize,
    /// SAM's decoder always uses 8 heads.
    pub decoder_heads: usize,
    pub decoder_mlp_dim: usize,
    pub iou_head_hidden_dim: usize,
}

impl TinySamConfig {
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Side of the low-resolution masks the decoder predicts.
    pub fn low_res(&self) -> usize {
        4 * self.grid()
    }
}

const MASKS: usize = 4;

fn ln(d: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).with_epsilon(eps).init(device)
}

fn lin(i: usize, o: usize, device: &Device) -> Linear {
    LinearConfig::new(i, o).init(device)
}

fn uniform<const D: usize>(shape: [usize; D], fan_in: usize, device: &Device) -> Param<Tensor<D>> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Param::from_tensor(Tensor::random(shape, Distribution::Uniform(-bound, bound), device))
}

fn normal<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(Tensor::random(shape, Distribution::Normal(0.0, std), device))
}

#[derive(Module, Debug)]
struct VitBlock {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    /// `[2·size - 1, head_dim]`, as in the checkpoint.
    rel_pos_h: Param<Tensor<2>>,
    rel_pos_w: Param<Tensor<2>>,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    heads: usize,
    /// 0 for global attention.
    window: usize,
}

/// `table[i - j + size - 1]` for every (i, j): `get_rel_pos` when no interpolation is needed.
fn rel_index(size: usize, device: &Device) -> Tensor<1, Int> {
    let idx: Vec<i64> = (0..size)
        .flat_map(|i| (0..size).map(move |j| (i + size - 1 - j) as i64))
        .collect();
    Tensor::from_data(TensorData::new(idx, [size * size]), device)
}

impl VitBlock {
    fn forward(&self, x: Tensor<3>, grid: usize) -> Tensor<3> {
        let h = self.norm1.forward(x.clone());
        let h = if self.window == 0 {
            self.attention(h, grid)
        } else {
            let [b, _, d] = h.dims();
            let (w, n) = (self.window, grid / self.window);
            let windows = h
                .reshape([b, n, w, n, w, d])
                .permute([0, 1, 3, 2, 4, 5])
                .reshape([b * n * n, w * w, d]);
            self.attention(windows, w)
                .reshape([b, n, n, w, w, d])
                .permute([0, 1, 3, 2, 4, 5])
                .reshape([b, grid * grid, d])
        };
        let x = x + h;
        let m = self
            .lin2
            .forward(gelu(self.lin1.forward(self.norm2.forward(x.clone()))));
        x + m
    }

    /// `Attention.forward` with `use_rel_pos`: `[N, size², D]` tokens on a `size×size` grid.
    fn attention(&self, x: Tensor<3>, size: usize) -> Tensor<3> {
        let [n, s, d] = x.dims();
        let heads = self.heads;
        let hd = d / heads;
        let bh = n * heads;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([n, s, 3, heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let part = |i: usize| {
            qkv.clone()
                .slice([i..i + 1, 0..n, 0..heads, 0..s, 0..hd])
                .reshape([bh, s, hd])
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let device = q.device();
        let idx = rel_index(size, &device);
        let rh = self.rel_pos_h.val().select(0, idx.clone()).reshape([size, size, hd]);
        let rw = self.rel_pos_w.val().select(0, idx).reshape([size, size, hd]);
        let grid = q.clone().reshape([bh, size, size, hd]);
        // rel_h[b, y, x, ky] = Σ_c q[b, y, x, c]·Rh[y, ky, c]: one GEMM per query row y.
        let rel_h = grid
            .clone()
            .permute([1, 0, 2, 3])
            .reshape([size, bh * size, hd])
            .matmul(rh.swap_dims(1, 2))
            .reshape([size, bh, size, size])
            .permute([1, 0, 2, 3])
            .reshape([bh, s, size, 1]);
        let rel_w = grid
            .permute([2, 0, 1, 3])
            .reshape([size, bh * size, hd])
            .matmul(rw.swap_dims(1, 2))
            .reshape([size, bh, size, size])
            .permute([1, 2, 0, 3])
            .reshape([bh, s, 1, size]);
        let scores = (q * (hd as f64).powf(-0.5))
            .matmul(k.swap_dims(1, 2))
            .reshape([bh, s, size, size]);
        let scores = (scores + rel_h + rel_w).reshape([bh, s, s]);
        let o = softmax(scores, 2)
            .matmul(v)
            .reshape([n, heads, s, hd])
            .swap_dims(1, 2)
            .reshape([n, s, d]);
        self.proj.forward(o)
    }
}

/// `Attention` of the two-way transformer: projections to `dim / downsample`, 8 heads.
#[derive(Module, Debug)]
struct DecoderAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl DecoderAttention {
    fn new(dim: usize, heads: usize, downsample: usize, device: &Device) -> Self {
        let inner = dim / downsample;
        DecoderAttention {
            q_proj: lin(dim, inner, device),
            k_proj: lin(dim, inner, device),
            v_proj: lin(dim, inner, device),
            out_proj: lin(inner, dim, device),
            heads,
        }
    }

    fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let (q, k, v) = (self.q_proj.forward(q), self.k_proj.forward(k), self.v_proj.forward(v));
        let [b, sq, inner] = q.dims();
        let skv = k.dims()[1];
        let hd = inner / self.heads;
        let split = |t: Tensor<3>, s: usize| t.reshape([b, s, self.heads, hd]).swap_dims(1, 2);
        let scores = split(q, sq).matmul(split(k, skv).swap_dims(2, 3)) / (hd as f64).sqrt();
        let o = softmax(scores, 3).matmul(split(v, skv));
        self.out_proj.forward(o.swap_dims(1, 2).reshape([b, sq, inner]))
    }

    fn export(&self, out: &mut StateDict, key: &str) -> Result<(), ModelError> {
        out.linear(&format!("{key}.q_proj"), &self.q_proj)?;
        out.linear(&format!("{key}.k_proj"), &self.k_proj)?;
        out.linear(&format!("{key}.v_proj"), &self.v_proj)?;
        out.linear(&format!("{key}.out_proj"), &self.out_proj)
    }
}

#[derive(Module, Debug)]
struct TwoWayBlock {
    self_attn: DecoderAttention,
    norm1: LayerNorm,
    cross_token_to_image: DecoderAttention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    norm3: LayerNorm,
    norm4: LayerNorm,
    cross_image_to_token: DecoderAttention,
    skip_first_layer_pe: bool,
}

/// The decoder's `MLP`: linears with ReLU between.
#[derive(Module, Debug)]
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(input: usize, hidden: usize, output: usize, depth: usize, device: &Device) -> Self {
        Mlp {
            layers: (0..depth)
                .map(|i| {
                    let inp = if i == 0 { input } else { hidden };
                    let out = if i + 1 == depth { output } else { hidden };
                    lin(inp, out, device)
                })
                .collect(),
        }
    }

    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i + 1 < self.layers.len() {
                x = relu(x);
            }
        }
        x
    }

    fn export(&self, out: &mut StateDict, key: &str) -> Result<(), ModelError> {
        for (i, l) in self.layers.iter().enumerate() {
            out.linear(&format!("{key}.layers.{i}"), l)?;
        }
        Ok(())
    }
}

/// `ConvTranspose2d(inp, out, 2, stride=2)` on channels-last tokens: each cell becomes a 2×2
/// block, so it is one GEMM to `out·4` values per cell.
#[derive(Module, Debug)]
struct Upsample2x {
    /// `[inp, out, 2, 2]`, PyTorch's layout.
    weight: Param<Tensor<4>>,
    bias: Param<Tensor<1>>,
}

impl Upsample2x {
    fn new(inp: usize, out: usize, device: &Device) -> Self {
        Upsample2x {
            weight: uniform([inp, out, 2, 2], out * 4, device),
            bias: uniform([out], out * 4, device),
        }
    }

    /// `[B, g², inp]` → `[B, (2g)², out]`.
    fn forward(&self, x: Tensor<3>, g: usize) -> Tensor<3> {
        let [b, _, inp] = x.dims();
        let out = self.weight.dims()[1];
        let w = self.weight.val().reshape([inp, out * 4]);
        let y = x
            .reshape([b * g * g, inp])
            .matmul(w)
            .reshape([b, g, g, out, 2, 2])
            .permute([0, 1, 4, 2, 5, 3])
            .reshape([b, 4 * g * g, out]);
        y + self.bias.val().reshape([1, 1, out])
    }
}

#[derive(Module, Debug)]
pub struct TinySam {
    // Image encoder.
    patch_embed: Linear,
    pos_embed: Param<Tensor<3>>,
    blocks: Vec<VitBlock>,
    neck_conv1: Linear,
    neck_norm1: LayerNorm,
    neck_conv2: Conv2d,
    neck_norm2: LayerNorm,
    // Prompt encoder.
    /// `[5, dim]`: point_embeddings 0–3 (background, foreground, box corners) and not_a_point.
    point_embeddings: Param<Tensor<2>>,
    no_mask_embed: Param<Tensor<2>>,
    // The mask-prompt path (`mask_downscaling`), exported for completeness; the embedded default
    // never prompts with a mask, so it keeps its initialisation.
    mask_conv1: Param<Tensor<4>>,
    mask_conv1_bias: Param<Tensor<1>>,
    mask_norm1: LayerNorm,
    mask_conv2: Param<Tensor<4>>,
    mask_conv2_bias: Param<Tensor<1>>,
    mask_norm2: LayerNorm,
    mask_conv3: Param<Tensor<4>>,
    mask_conv3_bias: Param<Tensor<1>>,
    // Mask decoder.
    /// `[1 + masks, dim]`: the IoU token then the mask tokens.
    output_tokens: Param<Tensor<2>>,
    decoder_blocks: Vec<TwoWayBlock>,
    final_attn: DecoderAttention,
    norm_final: LayerNorm,
    upscale1: Upsample2x,
    upscale_norm: LayerNorm,
    upscale2: Upsample2x,
    hypernetworks: Vec<Mlp>,
    iou_head: Mlp,
    /// `[2, dim/2]`, a fixed buffer in SAM (`positional_encoding_gaussian_matrix`).
    #[module(skip)]
    gaussian: Vec<f32>,
    #[module(skip)]
    config: TinySamConfig,
}

/// A point prompt in the encoder's input frame (pixels of the resized image), SAM's labels:
/// 0 background, 1 foreground.
#[derive(Clone, Copy, Debug)]
pub struct TrainPoint {
    pub x: f32,
    pub y: f32,
    pub label: u8,
}

/// Which decoder outputs a prompt's loss reaches.
#[derive(Clone, Debug)]
pub enum Supervise {
    /// These outputs, each with the same target.
    Outputs(Vec<usize>),
    /// Whichever of these fits the target best (SAM's loss for ambiguous prompts).
    BestOf(Vec<usize>),
}

/// One prompt on an image, with its target at the decoder's low resolution.
#[derive(Clone, Debug)]
pub struct PromptTarget {
    pub points: Vec<TrainPoint>,
    /// `[x0, y0, x1, y1]` in the input frame.
    pub bbox: Option<[f32; 4]>,
    /// `low_res²` values in {0, 1}.
    pub target: Vec<f32>,
    /// `low_res²` values: 1 inside the resized image, 0 on the padding SAM crops away.
    pub weight: Vec<f32>,
    pub supervise: Supervise,
}

/// One training image: preprocessed pixels `[3, S, S]` (`divergen_models::sam::preprocess::prepare`) and
/// its prompts.
pub struct SamExample {
    pub pixels: Vec<f32>,
    pub prompts: Vec<PromptTarget>,
}

/// A mask (row-major, `width × height`, original frame) as the decoder's low-resolution target
/// and weight: each low-resolution cell takes the mask at its centre, mapped back through
/// `ResizeLongestSide`.
pub fn low_res_target(mask: &[bool], width: usize, height: usize, config: &TinySamConfig) -> (Vec<f32>, Vec<f32>) {
    let side = config.low_res();
    let (ih, iw) = divergen_models::sam::preprocess::preprocess_shape(height, width, config.img_size);
    let cell = config.img_size as f64 / side as f64;
    let (sx, sy) = (width as f64 / iw as f64, height as f64 / ih as f64);
    let mut target = vec![0f32; side * side];
    let mut weight = vec![0f32; side * side];
    for v in 0..side {
        for u in 0..side {
            let (cx, cy) = ((u as f64 + 0.5) * cell, (v as f64 + 0.5) * cell);
            if cx >= iw as f64 || cy >= ih as f64 {
                continue;
            }
            let (x, y) = (
                ((cx * sx) as usize).min(width - 1),
                ((cy * sy) as usize).min(height - 1),
            );
            weight[v * side + u] = 1.0;
            target[v * side + u] = mask[y * width + x] as u8 as f32;
        }
    }
    (target, weight)
}

impl TinySam {
    pub fn new(c: &TinySamConfig, device: &Device) -> Self {
        let (d, dim, p, g) = (c.encoder_dim, c.prompt_embed_dim, c.patch_size, c.grid());
        let hd = d / c.encoder_heads;
        let blocks = (0..c.encoder_depth)
            .map(|i| {
                let window = if c.global_attn_indexes.contains(&i) {
                    0
                } else {
                    c.window_size
                };
                let size = if window == 0 { g } else { window };
                VitBlock {
                    norm1: ln(d, 1e-6, device),
                    qkv: lin(d, 3 * d, device),
                    proj: lin(d, d, device),
                    rel_pos_h: normal([2 * size - 1, hd], 0.02, device),
                    rel_pos_w: normal([2 * size - 1, hd], 0.02, device),
                    norm2: ln(d, 1e-6, device),
                    lin1: lin(d, 4 * d, device),
                    lin2: lin(4 * d, d, device),
                    heads: c.encoder_heads,
                    window,
                }
            })
            .collect();
        let (heads, mlp) = (c.decoder_heads, c.decoder_mlp_dim);
        let decoder_blocks = (0..c.decoder_depth)
            .map(|i| TwoWayBlock {
                self_attn: DecoderAttention::new(dim, heads, 1, device),
                norm1: ln(dim, 1e-5, device),
                cross_token_to_image: DecoderAttention::new(dim, heads, 2, device),
                norm2: ln(dim, 1e-5, device),
                lin1: lin(dim, mlp, device),
                lin2: lin(mlp, dim, device),
                norm3: ln(dim, 1e-5, device),
                norm4: ln(dim, 1e-5, device),
                cross_image_to_token: DecoderAttention::new(dim, heads, 2, device),
                skip_first_layer_pe: i == 0,
            })
            .collect();
        let m = c.mask_in_chans;
        let gaussian = Tensor::<2>::random([2, dim / 2], Distribution::Normal(0.0, 1.0), device)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_else(|e| panic!("reading a fresh tensor: {e:?}"));
        TinySam {
            patch_embed: lin(3 * p * p, d, device),
            pos_embed: Param::from_tensor(Tensor::zeros([1, g * g, d], device)),
            blocks,
            neck_conv1: LinearConfig::new(d, dim).with_bias(false).init(device),
            neck_norm1: ln(dim, 1e-6, device),
            neck_conv2: Conv2dConfig::new([dim, dim], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device),
            neck_norm2: ln(dim, 1e-6, device),
            point_embeddings: normal([5, dim], 1.0, device),
            no_mask_embed: normal([1, dim], 1.0, device),
            mask_conv1: uniform([m / 4, 1, 2, 2], 4, device),
            mask_conv1_bias: uniform([m / 4], 4, device),
            mask_norm1: ln(m / 4, 1e-6, device),
            mask_conv2: uniform([m, m / 4, 2, 2], m, device),
            mask_conv2_bias: uniform([m], m, device),
            mask_norm2: ln(m, 1e-6, device),
            mask_conv3: uniform([dim, m, 1, 1], m, device),
            mask_conv3_bias: uniform([dim], m, device),
            output_tokens: normal([1 + MASKS, dim], 1.0, device),
            decoder_blocks,
            final_attn: DecoderAttention::new(dim, heads, 2, device),
            norm_final: ln(dim, 1e-5, device),
            upscale1: Upsample2x::new(dim, dim / 4, device),
            upscale_norm: ln(dim / 4, 1e-6, device),
            upscale2: Upsample2x::new(dim / 4, dim / 8, device),
            hypernetworks: (0..MASKS).map(|_| Mlp::new(dim, dim, dim / 8, 3, device)).collect(),
            iou_head: Mlp::new(dim, c.iou_head_hidden_dim, MASKS, 3, device),
            gaussian,
            config: c.clone(),
        }
    }

    pub fn config(&self) -> &TinySamConfig {
        &self.config
    }

    /// Preprocessed pixels `[B, 3, S, S]` → image embeddings `[B, g², dim]` (channels last).
    pub fn encode(&self, pixels: Tensor<4>) -> Tensor<3> {
        let [b, c, _, _] = pixels.dims();
        let (p, g) = (self.config.patch_size, self.config.grid());
        let patches = pixels
            .reshape([b, c, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, g * g, c * p * p]);
        let mut x = self.patch_embed.forward(patches) + self.pos_embed.val();
        for block in &self.blocks {
            x = block.forward(x, g);
        }
        let dim = self.config.prompt_embed_dim;
        let x = self.neck_norm1.forward(self.neck_conv1.forward(x));
        let x = x.reshape([b, g, g, dim]).permute([0, 3, 1, 2]);
        let x = self
            .neck_conv2
            .forward(x)
            .permute([0, 2, 3, 1])
            .reshape([b, g * g, dim]);
        self.neck_norm2.forward(x)
    }

    /// `_pe_encoding` of a point in [0, 1]².
    fn pe(&self, x: f64, y: f64) -> Vec<f32> {
        divergen_models::sam::prompt_encoder::random_fourier(&self.gaussian, [x, y])
    }

    /// `get_dense_pe`: `[1, g², dim]`.
    fn dense_pe(&self, device: &Device) -> Tensor<3> {
        let g = self.config.grid();
        let pe: Vec<f32> = (0..g * g)
            .flat_map(|i| self.pe(((i % g) as f64 + 0.5) / g as f64, ((i / g) as f64 + 0.5) / g as f64))
            .collect();
        Tensor::from_data(TensorData::new(pe, [1, g * g, self.config.prompt_embed_dim]), device)
    }

    /// Sparse tokens for prompts that all have the same token count: `[P, T, dim]`.
    fn sparse(&self, prompts: &[&PromptTarget], device: &Device) -> Tensor<3> {
        let dim = self.config.prompt_embed_dim;
        let size = self.config.img_size as f64;
        let mut pe = Vec::new();
        let mut kind = Vec::new();
        let mut tokens = 0;
        for p in prompts {
            let mut all: Vec<(f32, f32, usize)> = p
                .points
                .iter()
                .map(|q| (q.x + 0.5, q.y + 0.5, q.label as usize))
                .collect();
            match p.bbox {
                Some([x0, y0, x1, y1]) => {
                    all.push((x0 + 0.5, y0 + 0.5, 2));
                    all.push((x1 + 0.5, y1 + 0.5, 3));
                }
                None => all.push((0.0, 0.0, 4)),
            }
            tokens = all.len();
            for (x, y, k) in all {
                if k == 4 {
                    pe.extend(std::iter::repeat_n(0.0, dim));
                } else {
                    pe.extend(self.pe(x as f64 / size, y as f64 / size));
                }
                kind.extend((0..5).map(|j| (j == k) as u8 as f32));
            }
        }
        let n = prompts.len();
        let pe = Tensor::<3>::from_data(TensorData::new(pe, [n, tokens, dim]), device);
        let onehot = Tensor::<2>::from_data(TensorData::new(kind, [n * tokens, 5]), device);
        pe + onehot.matmul(self.point_embeddings.val()).reshape([n, tokens, dim])
    }

    /// The decoder on `P` prompts: `image` `[P, g², dim]` (each prompt's image embedding),
    /// `sparse` `[P, T, dim]` → logits `[P, 4, low_res²]` and IoU predictions `[P, 4]`.
    fn decode(&self, image: Tensor<3>, sparse: Tensor<3>) -> (Tensor<3>, Tensor<2>) {
        let device = image.device();
        let [n, cells, dim] = image.dims();
        let g = self.config.grid();
        let tokens = Tensor::cat(
            vec![self.output_tokens.val().unsqueeze_dim::<3>(0).repeat_dim(0, n), sparse],
            1,
        );
        let image_pe = self.dense_pe(&device);
        let mut queries = tokens.clone();
        let mut keys = image + self.no_mask_embed.val().reshape([1, 1, dim]);
        for b in &self.decoder_blocks {
            queries = if b.skip_first_layer_pe {
                b.self_attn.forward(queries.clone(), queries.clone(), queries)
            } else {
                let q = queries.clone() + tokens.clone();
                queries.clone() + b.self_attn.forward(q.clone(), q, queries)
            };
            queries = b.norm1.forward(queries);
            let q = queries.clone() + tokens.clone();
            let k = keys.clone() + image_pe.clone();
            queries = b
                .norm2
                .forward(queries + b.cross_token_to_image.forward(q, k, keys.clone()));
            let mlp = b.lin2.forward(relu(b.lin1.forward(queries.clone())));
            queries = b.norm3.forward(queries + mlp);
            let q = queries.clone() + tokens.clone();
            let k = keys.clone() + image_pe.clone();
            keys = b
                .norm4
                .forward(keys + b.cross_image_to_token.forward(k, q, queries.clone()));
        }
        let q = queries.clone() + tokens;
        let k = keys.clone() + image_pe;
        let queries = self
            .norm_final
            .forward(queries + self.final_attn.forward(q, k, keys.clone()));
        debug_assert_eq!(cells, g * g);
        let up = gelu(self.upscale_norm.forward(self.upscale1.forward(keys, g)));
        let up = gelu(self.upscale2.forward(up, 2 * g));
        let side = 4 * g;
        let hyper: Vec<Tensor<3>> = self
            .hypernetworks
            .iter()
            .enumerate()
            .map(|(i, mlp)| {
                mlp.forward(queries.clone().slice([0..n, 1 + i..2 + i, 0..dim]).reshape([n, dim]))
                    .unsqueeze_dim::<3>(1)
            })
            .collect();
        let logits = Tensor::cat(hyper, 1).matmul(up.swap_dims(1, 2));
        let iou = self
            .iou_head
            .forward(queries.slice([0..n, 0..1, 0..dim]).reshape([n, dim]));
        (logits.reshape([n, MASKS, side * side]), iou)
    }

    /// Low-resolution logits `[P, 4, low_res²]` and IoU predictions for each image's prompts
    /// (flattened in order), as the training loss sees them.
    pub fn forward(&self, examples: &[SamExample], device: &Device) -> (Tensor<3>, Tensor<2>) {
        let s = self.config.img_size;
        let pixels: Vec<f32> = examples.iter().flat_map(|e| e.pixels.iter().copied()).collect();
        let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [examples.len(), 3, s, s]), device);
        let embeddings = self.encode(pixels);
        let [_, cells, dim] = embeddings.dims();
        let mut image_index = Vec::new();
        let mut prompts = Vec::new();
        for (i, e) in examples.iter().enumerate() {
            for p in &e.prompts {
                image_index.push(i as i64);
                prompts.push(p);
            }
        }
        // Prompts of different token counts go through the decoder separately.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (j, p) in prompts.iter().enumerate() {
            let t = p.points.len() + if p.bbox.is_some() { 2 } else { 1 };
            match groups.iter_mut().find(|(tokens, _)| *tokens == t) {
                Some((_, members)) => members.push(j),
                None => groups.push((t, vec![j])),
            }
        }
        let mut logits = Vec::new();
        let mut ious = Vec::new();
        let mut order = Vec::new();
        for (_, members) in &groups {
            let idx: Vec<i64> = members.iter().map(|&j| image_index[j]).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [members.len()]), device);
            let image = embeddings.clone().select(0, idx).reshape([members.len(), cells, dim]);
            let group: Vec<&PromptTarget> = members.iter().map(|&j| prompts[j]).collect();
            let (l, iou) = self.decode(image, self.sparse(&group, device));
            logits.push(l);
            ious.push(iou);
            order.extend(members.iter().copied());
        }
        // Back to the prompts' own order.
        let mut inverse = vec![0i64; order.len()];
        for (pos, &j) in order.iter().enumerate() {
            inverse[j] = pos as i64;
        }
        let inverse = Tensor::<1, Int>::from_data(TensorData::new(inverse, [order.len()]), device);
        (
            Tensor::cat(logits, 0).select(0, inverse.clone()),
            Tensor::cat(ious, 0).select(0, inverse),
        )
    }

    /// SAM's state dict (`segment_anything`'s key names and layouts).
    pub fn state_dict(&self) -> Result<StateDict, ModelError> {
        let c = &self.config;
        let (d, dim, p, g) = (c.encoder_dim, c.prompt_embed_dim, c.patch_size, c.grid());
        let mut out = StateDict::default();
        let e = "image_encoder";
        out.tensor(
            format!("{e}.patch_embed.proj.weight"),
            self.patch_embed.weight.val().transpose().reshape([d, 3, p, p]),
        )?;
        if let Some(b) = &self.patch_embed.bias {
            out.tensor(format!("{e}.patch_embed.proj.bias"), b.val())?;
        }
        out.tensor(format!("{e}.pos_embed"), self.pos_embed.val().reshape([1, g, g, d]))?;
        for (i, b) in self.blocks.iter().enumerate() {
            let k = format!("{e}.blocks.{i}");
            out.norm(&format!("{k}.norm1"), &b.norm1)?;
            out.linear(&format!("{k}.attn.qkv"), &b.qkv)?;
            out.linear(&format!("{k}.attn.proj"), &b.proj)?;
            out.tensor(format!("{k}.attn.rel_pos_h"), b.rel_pos_h.val())?;
            out.tensor(format!("{k}.attn.rel_pos_w"), b.rel_pos_w.val())?;
            out.norm(&format!("{k}.norm2"), &b.norm2)?;
            out.linear(&format!("{k}.mlp.lin1"), &b.lin1)?;
            out.linear(&format!("{k}.mlp.lin2"), &b.lin2)?;
        }
        out.tensor(
            format!("{e}.neck.0.weight"),
            self.neck_conv1.weight.val().transpose().reshape([dim, d, 1, 1]),
        )?;
        out.norm(&format!("{e}.neck.1"), &self.neck_norm1)?;
        out.tensor(format!("{e}.neck.2.weight"), self.neck_conv2.weight.val())?;
        out.norm(&format!("{e}.neck.3"), &self.neck_norm2)?;

        let pe = "prompt_encoder";
        out.tensor(
            format!("{pe}.pe_layer.positional_encoding_gaussian_matrix"),
            Tensor::<2>::from_data(
                TensorData::new(self.gaussian.clone(), [2, dim / 2]),
                &self.no_mask_embed.device(),
            ),
        )?;
        for i in 0..4 {
            out.tensor(
                format!("{pe}.point_embeddings.{i}.weight"),
                self.point_embeddings.val().slice([i..i + 1, 0..dim]),
            )?;
        }
        out.tensor(
            format!("{pe}.not_a_point_embed.weight"),
            self.point_embeddings.val().slice([4..5, 0..dim]),
        )?;
        out.tensor(format!("{pe}.mask_downscaling.0.weight"), self.mask_conv1.val())?;
        out.tensor(format!("{pe}.mask_downscaling.0.bias"), self.mask_conv1_bias.val())?;
        out.norm(&format!("{pe}.mask_downscaling.1"), &self.mask_norm1)?;
        out.tensor(format!("{pe}.mask_downscaling.3.weight"), self.mask_conv2.val())?;
        out.tensor(format!("{pe}.mask_downscaling.3.bias"), self.mask_conv2_bias.val())?;
        out.norm(&format!("{pe}.mask_downscaling.4"), &self.mask_norm2)?;
        out.tensor(format!("{pe}.mask_downscaling.6.weight"), self.mask_conv3.val())?;
        out.tensor(format!("{pe}.mask_downscaling.6.bias"), self.mask_conv3_bias.val())?;
        out.tensor(format!("{pe}.no_mask_embed.weight"), self.no_mask_embed.val())?;

        let md = "mask_decoder";
        let t = format!("{md}.transformer");
        for (i, b) in self.decoder_blocks.iter().enumerate() {
            let k = format!("{t}.layers.{i}");
            b.self_attn.export(&mut out, &format!("{k}.self_attn"))?;
            out.norm(&format!("{k}.norm1"), &b.norm1)?;
            b.cross_token_to_image
                .export(&mut out, &format!("{k}.cross_attn_token_to_image"))?;
            out.norm(&format!("{k}.norm2"), &b.norm2)?;
            out.linear(&format!("{k}.mlp.lin1"), &b.lin1)?;
            out.linear(&format!("{k}.mlp.lin2"), &b.lin2)?;
            out.norm(&format!("{k}.norm3"), &b.norm3)?;
            out.norm(&format!("{k}.norm4"), &b.norm4)?;
            b.cross_image_to_token
                .export(&mut out, &format!("{k}.cross_attn_image_to_token"))?;
        }
        self.final_attn
            .export(&mut out, &format!("{t}.final_attn_token_to_image"))?;
        out.norm(&format!("{t}.norm_final_attn"), &self.norm_final)?;
        out.tensor(
            format!("{md}.iou_token.weight"),
            self.output_tokens.val().slice([0..1, 0..dim]),
        )?;
        out.tensor(
            format!("{md}.mask_tokens.weight"),
            self.output_tokens.val().slice([1..1 + MASKS, 0..dim]),
        )?;
        out.tensor(format!("{md}.output_upscaling.0.weight"), self.upscale1.weight.val())?;
        out.tensor(format!("{md}.output_upscaling.0.bias"), self.upscale1.bias.val())?;
        out.norm(&format!("{md}.output_upscaling.1"), &self.upscale_norm)?;
        out.tensor(format!("{md}.output_upscaling.3.weight"), self.upscale2.weight.val())?;
        out.tensor(format!("{md}.output_upscaling.3.bias"), self.upscale2.bias.val())?;
        for (i, h) in self.hypernetworks.iter().enumerate() {
            h.export(&mut out, &format!("{md}.output_hypernetworks_mlps.{i}"))?;
        }
        self.iou_head.export(&mut out, &format!("{md}.iou_prediction_head"))?;
        Ok(out)
    }

    /// The weights as a SAM safetensors checkpoint.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ModelError::at(dir, e))?;
        }
        self.state_dict()?.save(path)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SamTrainOptions {
    pub steps: usize,
    /// Images per step (each carries several prompts).
    pub batch: usize,
    pub learning_rate: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SamTrainLog {
    pub loss_by_tenth: Vec<f64>,
    /// Mean IoU (logit > 0 against the target, inside the image) of the supervised outputs,
    /// by tenth of the run.
    pub iou_by_tenth: Vec<f64>,
    pub seconds: f64,
}

fn iou(logits: &[f32], target: &[f32], weight: &[f32]) -> f32 {
    let (mut inter, mut union) = (0f32, 0f32);
    for ((&l, &t), &w) in logits.iter().zip(target).zip(weight) {
        if w == 0.0 {
            continue;
        }
        let p = l > 0.0;
        let t = t > 0.5;
        inter += (p && t) as u8 as f32;
        union += (p || t) as u8 as f32;
    }
    if union == 0.0 { 1.0 } else { inter / union }
}

/// The loss of one step: BCE + dice on the selected outputs, MSE of the IoU head against each
/// output's actual IoU. Returns the loss and the mean IoU of the selected outputs.
fn loss(logits: Tensor<3>, iou_pred: Tensor<2>, prompts: &[&PromptTarget], device: &Device) -> (Tensor<1>, f64) {
    let [n, masks, cells] = logits.dims();
    let values = logits
        .clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_else(|e| panic!("reading logits: {e:?}"));
    let mut select = vec![0f32; n * masks];
    let mut actual = vec![0f32; n * masks];
    let mut chosen_iou = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let ious: Vec<f32> = (0..masks)
            .map(|m| {
                let start = (i * masks + m) * cells;
                iou(&values[start..start + cells], &p.target, &p.weight)
            })
            .collect();
        actual[i * masks..(i + 1) * masks].copy_from_slice(&ious);
        let outputs = match &p.supervise {
            Supervise::Outputs(o) => o.clone(),
            Supervise::BestOf(o) => o
                .iter()
                .copied()
                .max_by(|&a, &b| ious[a].total_cmp(&ious[b]))
                .into_iter()
                .collect(),
        };
        for &o in &outputs {
            select[i * masks + o] = 1.0;
            chosen_iou.push(ious[o] as f64);
        }
    }
    let target: Vec<f32> = prompts.iter().flat_map(|p| p.target.iter().copied()).collect();
    let weight: Vec<f32> = prompts.iter().flat_map(|p| p.weight.iter().copied()).collect();
    let target = Tensor::<3>::from_data(TensorData::new(target, [n, 1, cells]), device);
    let weight = Tensor::<3>::from_data(TensorData::new(weight, [n, 1, cells]), device);
    let select = Tensor::<2>::from_data(TensorData::new(select, [n, masks]), device);
    let area = weight.clone().sum_dim(2).clamp_min(1.0);
    let bce = -(target.clone() * log_sigmoid(logits.clone())
        + (target.clone().neg() + 1.0) * log_sigmoid(logits.clone().neg()));
    let bce = (bce * weight.clone()).sum_dim(2) / area.clone();
    let prob = sigmoid(logits) * weight.clone();
    let t = target * weight;
    let inter = (prob.clone() * t.clone()).sum_dim(2);
    let dice = (inter * 2.0 + 1.0) / (prob.sum_dim(2) + t.sum_dim(2) + 1.0);
    let per_output = (bce + dice.neg() + 1.0).reshape([n, masks]);
    let chosen = select.clone().sum().clamp_min(1.0);
    let mask_loss = (per_output * select).sum() / chosen;
    let actual = Tensor::<2>::from_data(TensorData::new(actual, [n, masks]), device);
    let iou_loss = (iou_pred - actual).powf_scalar(2.0).mean();
    let mean_iou = chosen_iou.iter().sum::<f64>() / chosen_iou.len().max(1) as f64;
    (mask_loss + iou_loss, mean_iou)
}

/// Trains with Adam, warm-up and cosine decay, on batches from `draw(step, item)` (a fresh
/// example each call). `device` must have autodiff enabled.
pub fn train(
    model: TinySam,
    options: &SamTrainOptions,
    device: &Device,
    mut draw: impl FnMut(usize, usize) -> SamExample,
    mut progress: impl FnMut(usize, f64, f64),
) -> (TinySam, SamTrainLog) {
    use burn::optim::{AdamConfig, GradientsParams};
    let start = std::time::Instant::now();
    let mut optimizer = AdamConfig::new().init();
    let mut model = model;
    let (mut losses, mut ious) = (Vec::new(), Vec::new());
    for step in 0..options.steps {
        let batch: Vec<SamExample> = (0..options.batch).map(|i| draw(step, i)).collect();
        let prompts: Vec<&PromptTarget> = batch.iter().flat_map(|e| e.prompts.iter()).collect();
        let (logits, iou_pred) = model.forward(&batch, device);
        let (loss, mean_iou) = loss(logits, iou_pred, &prompts, device);
        let value = scalar(&loss);
        losses.push(value);
        ious.push(mean_iou);
        progress(step, value, mean_iou);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(learning_rate(options.learning_rate, step, options.steps), model, grads);
    }
    (
        model,
        SamTrainLog {
            loss_by_tenth: by_tenth(&losses),
            iou_by_tenth: by_tenth(&ious),
            seconds: start.elapsed().as_secs_f64(),
        },
    )
}

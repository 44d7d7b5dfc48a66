//! SAM's ViT image encoder (ViTDet style): 16×16 patches, absolute positions, blocks with
//! windowed (14×14) or global attention and decomposed relative-position biases, then the neck
//! (1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d) down to the 256-channel image embedding.
//!
//! Activations stay token-major `[B, H·W, C]` end to end; the relative-position bias is added
//! inside our fused attention kernel, so global attention over 4,096 tokens never holds a score
//! matrix.

use burn::tensor::{Device, Tensor, TensorData};
use divergen_kernels::{Activation, attention_rel_pos, conv2d, gemm_bt};

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::{LayerNorm, Linear, Quantization};

/// `ImageEncoderViT`'s constructor arguments as `build_sam` passes them.
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// Blocks with global attention; the others attend within `window_size`² windows.
    pub global_attn_indexes: Vec<usize>,
    pub window_size: usize,
    pub patch_size: usize,
    pub img_size: usize,
    pub mlp_ratio: usize,
    pub out_chans: usize,
}

impl VitConfig {
    pub fn vit_b() -> Self {
        VitConfig {
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            global_attn_indexes: vec![2, 5, 8, 11],
            window_size: 14,
            patch_size: 16,
            img_size: 1024,
            mlp_ratio: 4,
            out_chans: 256,
        }
    }

    pub fn vit_l() -> Self {
        VitConfig {
            embed_dim: 1024,
            depth: 24,
            num_heads: 16,
            global_attn_indexes: vec![5, 11, 17, 23],
            ..Self::vit_b()
        }
    }

    pub fn vit_h() -> Self {
        VitConfig {
            embed_dim: 1280,
            depth: 32,
            num_heads: 16,
            global_attn_indexes: vec![7, 15, 23, 31],
            ..Self::vit_b()
        }
    }

    /// The configuration a checkpoint was trained with, read off its tensor shapes: width from
    /// the patch embedding, depth from the block count, head width from the relative-position
    /// tables, and which blocks are global from the tables' lengths.
    pub fn infer(ckpt: &Checkpoint) -> Result<Self, ModelError> {
        let keys = ckpt.keys();
        let shape = |key: &str| -> Result<Vec<usize>, ModelError> {
            keys.iter()
                .find(|(k, _)| k == key)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| ModelError::at(ckpt.path(), format!("missing tensor {key}")))
        };
        let patch = shape("image_encoder.patch_embed.proj.weight")?;
        let pos = shape("image_encoder.pos_embed")?;
        if patch.len() != 4 || pos.len() != 4 || patch[2] == 0 {
            return Err(ModelError::at(
                ckpt.path(),
                format!("image_encoder.patch_embed.proj.weight {patch:?} / pos_embed {pos:?} are not SAM's ViT layout"),
            ));
        }
        let (embed_dim, patch_size, grid) = (patch[0], patch[2], pos[1]);
        let depth = (0..)
            .take_while(|i| {
                keys.iter()
                    .any(|(k, _)| k == &format!("image_encoder.blocks.{i}.norm1.weight"))
            })
            .count();
        let mut global_attn_indexes = Vec::new();
        let (mut window_size, mut head_dim) = (14, 0);
        for i in 0..depth {
            let rel = shape(&format!("image_encoder.blocks.{i}.attn.rel_pos_h"))?;
            head_dim = rel[1];
            if rel[0] == 2 * grid - 1 {
                global_attn_indexes.push(i);
            } else {
                window_size = rel[0].div_ceil(2);
            }
        }
        let out_chans = shape("image_encoder.neck.0.weight")?[0];
        let mlp = shape("image_encoder.blocks.0.mlp.lin1.weight")?[0];
        if head_dim == 0 || embed_dim % head_dim != 0 || mlp % embed_dim != 0 {
            return Err(ModelError::at(
                ckpt.path(),
                format!("inconsistent ViT shapes: width {embed_dim}, head width {head_dim}, MLP {mlp}"),
            ));
        }
        Ok(VitConfig {
            embed_dim,
            depth,
            num_heads: embed_dim / head_dim,
            global_attn_indexes,
            window_size,
            patch_size,
            img_size: grid * patch_size,
            mlp_ratio: mlp / embed_dim,
            out_chans,
        })
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    /// `[grid, grid, head_dim]`: the relative-position table gathered for every (query row,
    /// key row) pair of this block's attention grid, and the same for columns.
    rel_h: Tensor<3>,
    rel_w: Tensor<3>,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    /// 0 for global attention.
    window: usize,
}

/// SAM's neck, shared by the ViT and TinyViT encoders: 1×1 conv (no bias), LayerNorm2d, 3×3
/// conv (no bias), LayerNorm2d.
pub(crate) struct Neck {
    conv1: Linear,
    norm1: LayerNorm,
    conv2: Tensor<4>,
    conv2_bias: Tensor<1>,
    norm2: LayerNorm,
    out_chans: usize,
}

impl Neck {
    pub(crate) fn load(
        ckpt: &Checkpoint,
        inp: usize,
        out_chans: usize,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let c = out_chans;
        let conv1 = ckpt.values("image_encoder.neck.0.weight", &[c, inp, 1, 1])?;
        Ok(Neck {
            conv1: Linear::from_values(conv1, None, c, inp, quant.sensitive(), device),
            norm1: LayerNorm::load(ckpt, "image_encoder.neck.1", c, 1e-6, device)?,
            conv2: ckpt.tensor("image_encoder.neck.2.weight", [c, c, 3, 3], device)?,
            conv2_bias: Tensor::zeros([c], device),
            norm2: LayerNorm::load(ckpt, "image_encoder.neck.3", c, 1e-6, device)?,
            out_chans,
        })
    }

    /// Tokens `[B, g², C]` → `[B, out_chans, g, g]`.
    pub(crate) fn forward(&self, x: Tensor<3>, g: usize) -> Tensor<4> {
        let b = x.dims()[0];
        let x = self.norm1.forward(self.conv1.forward(x));
        let x = x.reshape([b, g, g, self.out_chans]).permute([0, 3, 1, 2]);
        let x = conv2d(x, self.conv2.clone(), self.conv2_bias.clone(), 1, 1);
        self.norm2.forward_channels(x)
    }

    pub(crate) fn linear(&self) -> &Linear {
        &self.conv1
    }
}

pub struct ImageEncoderVit {
    pub config: VitConfig,
    /// The patch convolution as a GEMM over flattened patches; stays f32 (the first layer).
    patch_embed: Linear,
    pos_embed: Tensor<3>,
    blocks: Vec<Block>,
    neck: Neck,
}

/// Runs `f` on each `w×w` window of a `side×side` token grid `[B, side², C]`: the grid is
/// zero-padded to whole windows, the windows batched as `[B·n², w², C]`, and the padding dropped
/// from the result (ViTDet's `window_partition` / `window_unpartition`).
pub(crate) fn in_windows(x: Tensor<3>, side: usize, w: usize, f: impl FnOnce(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
    let [b, l, c] = x.dims();
    let n = side.div_ceil(w);
    let padded = n * w;
    let mut h = x.reshape([b, side, side, c]);
    if padded > side {
        let device = h.device();
        h = Tensor::cat(vec![h, Tensor::zeros([b, padded - side, side, c], &device)], 1);
        h = Tensor::cat(vec![h, Tensor::zeros([b, padded, padded - side, c], &device)], 2);
    }
    let windows = h
        .reshape([b, n, w, n, w, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b * n * n, w * w, c]);
    f(windows)
        .reshape([b, n, n, w, w, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, padded, padded, c])
        .slice([0..b, 0..side, 0..side, 0..c])
        .reshape([b, l, c])
}

/// `table[i - j + size - 1]` for every query/key index pair `(i, j)` along one axis, as
/// `get_rel_pos` does when the table already has `2·size - 1` rows.
fn gather_rel_pos(table: &[f32], size: usize, dim: usize, device: &Device) -> Tensor<3> {
    let mut out = Vec::with_capacity(size * size * dim);
    for i in 0..size {
        for j in 0..size {
            let row = i + size - 1 - j;
            out.extend_from_slice(&table[row * dim..(row + 1) * dim]);
        }
    }
    Tensor::from_data(TensorData::new(out, [size, size, dim]), device)
}

impl ImageEncoderVit {
    pub fn load(
        ckpt: &Checkpoint,
        config: VitConfig,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (d, p) = (config.embed_dim, config.patch_size);
        let grid = config.img_size / p;
        let head_dim = d / config.num_heads;
        let hidden = d * config.mlp_ratio;
        const EPS: f64 = 1e-6;
        let patch = ckpt.values("image_encoder.patch_embed.proj.weight", &[d, 3, p, p])?;
        let patch_bias = ckpt.values("image_encoder.patch_embed.proj.bias", &[d])?;
        let blocks = (0..config.depth)
            .map(|i| {
                let pre = format!("image_encoder.blocks.{i}");
                let window = if config.global_attn_indexes.contains(&i) {
                    0
                } else {
                    config.window_size
                };
                let size = if window == 0 { grid } else { window };
                let table = |axis: &str| -> Result<Tensor<3>, ModelError> {
                    let values = ckpt.values(&format!("{pre}.attn.rel_pos_{axis}"), &[2 * size - 1, head_dim])?;
                    Ok(gather_rel_pos(&values, size, head_dim, device))
                };
                let linear =
                    |name: &str, out, inp, q| Linear::load(ckpt, &format!("{pre}.{name}"), out, inp, true, q, device);
                Ok(Block {
                    norm1: LayerNorm::load(ckpt, &format!("{pre}.norm1"), d, EPS, device)?,
                    qkv: linear("attn.qkv", 3 * d, d, quant.sensitive())?,
                    proj: linear("attn.proj", d, d, quant.sensitive())?,
                    rel_h: table("h")?,
                    rel_w: table("w")?,
                    norm2: LayerNorm::load(ckpt, &format!("{pre}.norm2"), d, EPS, device)?,
                    lin1: linear("mlp.lin1", hidden, d, quant)?,
                    lin2: linear("mlp.lin2", d, hidden, quant)?,
                    window,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(ImageEncoderVit {
            patch_embed: Linear::from_values(patch, Some(patch_bias), d, 3 * p * p, Quantization::None, device),
            pos_embed: ckpt
                .tensor::<4>("image_encoder.pos_embed", [1, grid, grid, d], device)?
                .reshape([1, grid * grid, d]),
            blocks,
            neck: Neck::load(ckpt, d, config.out_chans, quant, device)?,
            config,
        })
    }

    /// `[B, 3, S, S]` preprocessed pixels → `[B, out_chans, S/16, S/16]`.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<4> {
        let [b, c, _, _] = pixels.dims();
        let p = self.config.patch_size;
        let g = self.config.img_size / p;
        let patches = pixels
            .reshape([b, c, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, g * g, c * p * p]);
        let mut x = self.patch_embed.forward(patches) + self.pos_embed.clone();
        for block in &self.blocks {
            x = self.block(block, x, g);
        }
        self.neck.forward(x, g)
    }

    fn block(&self, block: &Block, x: Tensor<3>, g: usize) -> Tensor<3> {
        let h = block.norm1.forward(x.clone());
        let h = if block.window == 0 {
            self.attention(block, h, g)
        } else {
            // Padding tokens take part as keys, as in SAM.
            in_windows(h, g, block.window, |windows| {
                self.attention(block, windows, block.window)
            })
        };
        let x = x + h;
        let m = block.lin2.forward(
            block
                .lin1
                .forward_then(block.norm2.forward(x.clone()), Some(Activation::GeluErf)),
        );
        x + m
    }

    /// Multi-head attention over `[N, size², D]` tokens laid out as a `size×size` grid, with
    /// the decomposed relative-position bias of `add_decomposed_rel_pos`.
    fn attention(&self, block: &Block, x: Tensor<3>, size: usize) -> Tensor<3> {
        let [n, s, d] = x.dims();
        let heads = self.config.num_heads;
        let hd = d / heads;
        let qkv = block.qkv.forward(x).reshape([n, s, 3, heads, hd]);
        let part = |i: usize| {
            qkv.clone()
                .slice([0..n, 0..s, i..i + 1, 0..heads, 0..hd])
                .reshape([n, s, heads, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        // rel_h[n, head, (y, x), ky] = q[n, head, y, x] · table_h[y, ky]: one batched GEMM per
        // query row y (and per column x for rel_w), batched over rows.
        let grid = q.clone().reshape([n, heads, size, size, hd]);
        let rel_h = gemm_bt(
            grid.clone()
                .permute([2, 0, 1, 3, 4])
                .reshape([size, n * heads * size, hd]),
            block.rel_h.clone(),
        )
        .reshape([size, n, heads, size, size])
        .permute([1, 2, 0, 3, 4])
        .reshape([n, heads, s, size]);
        let rel_w = gemm_bt(
            grid.permute([3, 0, 1, 2, 4]).reshape([size, n * heads * size, hd]),
            block.rel_w.clone(),
        )
        .reshape([size, n, heads, size, size])
        .permute([1, 2, 3, 0, 4])
        .reshape([n, heads, s, size]);
        let o = attention_rel_pos(q, k, v, rel_h, rel_w, (hd as f32).powf(-0.5));
        block.proj.forward(o.swap_dims(1, 2).reshape([n, s, d]))
    }

    /// The linear layers, for size accounting.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut all = vec![&self.patch_embed, self.neck.linear()];
        for b in &self.blocks {
            all.extend([&b.qkv, &b.proj, &b.lin1, &b.lin2]);
        }
        all
    }
}

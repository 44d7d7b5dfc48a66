//! diffusers' `UNet2DConditionModel` built from its `config.json`, weights read from a diffusers
//! `unet/` folder unchanged. One implementation for SD 1.5, SD 2.x, SD-Turbo and BK-SDM (they
//! differ only in config): sinusoidal time embedding + MLP; down blocks of ResNets (with the
//! time embedding added), optional spatial transformers (self-attention, cross-attention to the
//! text, GEGLU feed-forward) and stride-2 downsampling; an optional cross-attention mid block;
//! up blocks that concatenate the skips; group norm, SiLU, `conv_out`.
//!
//! Linear layers go through `Linear` and are quantized at load: int8 everywhere with
//! `Quantization::Int8`; with `Int4` the GEGLU feed-forwards (the largest linear weights) take
//! int4 and attention and projections stay int8. The 3×3 convolutions of the
//! ResNets, upsamplers and stride-2 downsamplers (about three quarters of the UNet's weights)
//! take int8 under either, as an im2col GEMM through `qgemm`. `conv_in` and `conv_out` stay f32:
//! they map to and from the 4 latent channels, hold 0.003 % of the weights, and an error there
//! lands directly on the latents. The time embedding MLP (it scales every ResNet) and the
//! group norms stay f32.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use divergen_kernels::{attention, gelu, silu, upsample_nearest2x};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::{Conv2d as Conv, GroupNorm, LayerNorm, Linear, Quantization};

/// `attention_head_dim` / `num_attention_heads`: one value for all blocks or one per block.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).copied().unwrap_or(0),
        }
    }
}

/// The fields of a `UNet2DConditionModel` `config.json` this model reads, with diffusers'
/// defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub transformer_layers_per_block: usize,
    pub time_cond_proj_dim: Option<usize>,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub resnet_time_scale_shift: String,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            transformer_layers_per_block: 1,
            time_cond_proj_dim: None,
            class_embed_type: None,
            addition_embed_type: None,
            resnet_time_scale_shift: "default".into(),
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::at(path, e))?;
        let c: Self = serde_json::from_str(&text).map_err(|e| ModelError::at(path, e))?;
        c.validate().map_err(|e| ModelError::at(path, e))?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length".into(),
            );
        }
        for t in &self.down_block_types {
            if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D") {
                return Err(format!(
                    "down_block_types: {t:?} is not supported (CrossAttnDownBlock2D, DownBlock2D)"
                ));
            }
        }
        for t in &self.up_block_types {
            if !matches!(t.as_str(), "CrossAttnUpBlock2D" | "UpBlock2D") {
                return Err(format!(
                    "up_block_types: {t:?} is not supported (CrossAttnUpBlock2D, UpBlock2D)"
                ));
            }
        }
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return Err(format!(
                "mid_block_type: {m:?} is not supported (UNetMidBlock2DCrossAttn or null)"
            ));
        }
        for (key, unsupported) in [
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("resnet_time_scale_shift", self.resnet_time_scale_shift != "default"),
            ("transformer_layers_per_block", self.transformer_layers_per_block != 1),
            (
                "conv_in_kernel/conv_out_kernel",
                self.conv_in_kernel != 3 || self.conv_out_kernel != 3,
            ),
        ] {
            if unsupported {
                return Err(format!("{key}: this setting is not supported"));
            }
        }
        if self.block_out_channels.iter().any(|c| c % self.norm_num_groups != 0) {
            return Err("block_out_channels must be multiples of norm_num_groups".into());
        }
        Ok(())
    }

    /// The largest tensor one evaluation on `[batch, C, h, w]` latents holds, in bytes (f32),
    /// with the feed-forward chunked as [`SpatialTransformer`] does: the widest activation at
    /// each level, which in the up path is a ResNet's input (the previous output beside its skip).
    pub fn largest_tensor_bytes(&self, batch: usize, h: usize, w: usize) -> u64 {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let cells = |level: usize| ((h >> level) * (w >> level)) as u64;
        let mut largest = self.in_channels.max(ch[0]) as u64 * cells(0);
        let mut output = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            largest = largest.max(output.max(out) as u64 * cells(i));
            output = out;
        }
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let mut prev_output = reversed[0];
        for (i, &out) in reversed.iter().enumerate() {
            let level = n - 1 - i;
            let input = reversed[(i + 1).min(n - 1)];
            for j in 0..=self.layers_per_block {
                let skip = if j == self.layers_per_block { input } else { out };
                let resnet_in = if j == 0 { prev_output } else { out };
                largest = largest.max((resnet_in + skip) as u64 * cells(level));
            }
            if level > 0 {
                largest = largest.max(out as u64 * cells(level - 1));
            }
            prev_output = out;
        }
        4 * batch as u64 * largest
    }

    /// Heads of block `i`: diffusers' historical naming makes `attention_head_dim` the head
    /// count when `num_attention_heads` is absent.
    fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }
}

/// A 1×1 convolution or a linear layer (checkpoints store either), as a linear layer.
fn pointwise(
    ckpt: &Checkpoint,
    p: &str,
    out: usize,
    inp: usize,
    conv: bool,
    quant: Quantization,
    device: &Device,
) -> Result<Linear, ModelError> {
    if conv {
        let w = ckpt.values(&format!("{p}.weight"), &[out, inp, 1, 1])?;
        let b = ckpt.values(&format!("{p}.bias"), &[out])?;
        Ok(Linear::from_values(w, Some(b), out, inp, quant, device))
    } else {
        Linear::load(ckpt, p, out, inp, true, quant, device)
    }
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Linear>,
}

impl Resnet {
    #[allow(clippy::too_many_arguments)]
    fn load(
        ckpt: &Checkpoint,
        p: &str,
        inp: usize,
        out: usize,
        c: &UNetConfig,
        temb: usize,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (g, eps) = (c.norm_num_groups, c.norm_eps);
        Ok(Resnet {
            norm1: GroupNorm::load(ckpt, &format!("{p}.norm1"), inp, g, eps, device)?,
            conv1: Conv::load_quantized(
                ckpt,
                &format!("{p}.conv1"),
                out,
                inp,
                3,
                1,
                true,
                quant.sensitive(),
                device,
            )?,
            time_emb_proj: Linear::load(
                ckpt,
                &format!("{p}.time_emb_proj"),
                out,
                temb,
                true,
                quant.sensitive(),
                device,
            )?,
            norm2: GroupNorm::load(ckpt, &format!("{p}.norm2"), out, g, eps, device)?,
            conv2: Conv::load_quantized(
                ckpt,
                &format!("{p}.conv2"),
                out,
                out,
                3,
                1,
                true,
                quant.sensitive(),
                device,
            )?,
            shortcut: if inp != out {
                Some(pointwise(
                    ckpt,
                    &format!("{p}.conv_shortcut"),
                    out,
                    inp,
                    true,
                    quant.sensitive(),
                    device,
                )?)
            } else {
                None
            },
        })
    }

    /// `x [B, C, H, W]`, `temb [B, 1, T]` (already through SiLU).
    fn forward(&self, x: Tensor<4>, temb: &Tensor<3>) -> Tensor<4> {
        let h = self.conv1.forward(self.norm1.forward(x.clone(), true));
        let [b, c, _, _] = h.dims();
        let t = self.time_emb_proj.forward(temb.clone()).reshape([b, c, 1, 1]);
        let h = self.conv2.forward(self.norm2.forward(h + t, true));
        let skip = match &self.shortcut {
            Some(s) => {
                let [b, ci, hh, ww] = x.dims();
                let tokens = x.reshape([b, ci, hh * ww]).swap_dims(1, 2);
                s.forward(tokens).swap_dims(1, 2).reshape([b, c, hh, ww])
            }
            None => x,
        };
        skip + h
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(
        ckpt: &Checkpoint,
        p: &str,
        dim: usize,
        context: usize,
        heads: usize,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(Attention {
            q: Linear::load(ckpt, &format!("{p}.to_q"), dim, dim, false, quant, device)?,
            k: Linear::load(ckpt, &format!("{p}.to_k"), dim, context, false, quant, device)?,
            v: Linear::load(ckpt, &format!("{p}.to_v"), dim, context, false, quant, device)?,
            out: Linear::load(ckpt, &format!("{p}.to_out.0"), dim, dim, true, quant, device)?,
            heads,
        })
    }

    fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let (q, k, v) = (
            self.q.forward(x),
            self.k.forward(context.clone()),
            self.v.forward(context),
        );
        let [b, s, d] = q.dims();
        let skv = k.dims()[1];
        let hd = d / self.heads;
        let split = |t: Tensor<3>, n: usize| t.reshape([b, n, self.heads, hd]).swap_dims(1, 2);
        let o = attention(split(q, s), split(k, skv), split(v, skv), (hd as f32).powf(-0.5));
        self.out.forward(o.swap_dims(1, 2).reshape([b, s, d]))
    }
}

/// Rows of tokens per feed-forward pass: all of them unless the GEGLU projection (`8·dim` per
/// token) would exceed the largest tensor the device holds, as diffusers' forward chunking.
/// Each token's feed-forward is independent, so chunking changes nothing in the result.
fn feed_forward_chunk(batch: usize, tokens: usize, dim: usize, max_tensor_bytes: Option<u64>) -> usize {
    let per_token = (4 * batch * 8 * dim) as u64;
    match max_tensor_bytes {
        Some(limit) if per_token * tokens as u64 > limit => ((limit / per_token) as usize).max(1),
        _ => tokens,
    }
}

/// `Transformer2DModel` with one `BasicTransformerBlock`.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    proj_out: Linear,
}

impl SpatialTransformer {
    fn load(
        ckpt: &Checkpoint,
        p: &str,
        dim: usize,
        heads: usize,
        c: &UNetConfig,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let conv = !c.use_linear_projection;
        let b = format!("{p}.transformer_blocks.0");
        let ln = |name: &str| LayerNorm::load(ckpt, &format!("{b}.{name}"), dim, 1e-5, device);
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(ModelError::at(
                ckpt.path(),
                format!("{p}: {dim} channels do not split into {heads} heads"),
            ));
        }
        Ok(SpatialTransformer {
            norm: GroupNorm::load(ckpt, &format!("{p}.norm"), dim, c.norm_num_groups, 1e-6, device)?,
            proj_in: pointwise(ckpt, &format!("{p}.proj_in"), dim, dim, conv, quant.sensitive(), device)?,
            norm1: ln("norm1")?,
            attn1: Attention::load(ckpt, &format!("{b}.attn1"), dim, dim, heads, quant.sensitive(), device)?,
            norm2: ln("norm2")?,
            attn2: Attention::load(
                ckpt,
                &format!("{b}.attn2"),
                dim,
                c.cross_attention_dim,
                heads,
                quant.sensitive(),
                device,
            )?,
            norm3: ln("norm3")?,
            ff_in: Linear::load(ckpt, &format!("{b}.ff.net.0.proj"), 8 * dim, dim, true, quant, device)?,
            ff_out: Linear::load(ckpt, &format!("{b}.ff.net.2"), dim, 4 * dim, true, quant, device)?,
            proj_out: pointwise(
                ckpt,
                &format!("{p}.proj_out"),
                dim,
                dim,
                conv,
                quant.sensitive(),
                device,
            )?,
        })
    }

    /// GEGLU: the first half of the projection gated by GELU of the second, over `x [B, S, D]`.
    fn feed_forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let rows = feed_forward_chunk(b, s, d, divergen_kernels::device::max_tensor_bytes(&x.device()));
        let hidden = 4 * d;
        let chunk = |x: Tensor<3>| {
            let n = x.dims()[1];
            let g = self.ff_in.forward(x);
            let (value, gate) = (
                g.clone().slice([0..b, 0..n, 0..hidden]),
                g.slice([0..b, 0..n, hidden..2 * hidden]),
            );
            self.ff_out.forward(value * gelu(gate, false))
        };
        if rows >= s {
            return chunk(x);
        }
        let parts = (0..s)
            .step_by(rows)
            .map(|r| chunk(x.clone().slice([0..b, r..(r + rows).min(s), 0..d])))
            .collect();
        Tensor::cat(parts, 1)
    }

    fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .norm
            .forward(x.clone(), false)
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let mut t = self.proj_in.forward(tokens);
        let n = self.norm1.forward(t.clone());
        t = t + self.attn1.forward(n.clone(), n);
        let cross = self.attn2.forward(self.norm2.forward(t.clone()), context.clone());
        t = t + cross;
        let ff_input = self.norm3.forward(t.clone());
        t = t + self.feed_forward(ff_input);
        let out = self.proj_out.forward(t).swap_dims(1, 2).reshape([b, c, h, w]);
        out + x
    }
}

#[derive(Default)]
struct Block {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    /// Down blocks: a stride-2 conv; up blocks: nearest 2× then a conv.
    sampler: Option<Conv>,
}

pub struct UNet {
    pub config: UNetConfig,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv,
    down: Vec<Block>,
    mid: Option<(Resnet, SpatialTransformer, Resnet)>,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl UNet {
    /// Loads `dir/config.json` + `dir/diffusion_pytorch_model.safetensors` (or
    /// `model.safetensors`): a diffusers `unet/` folder.
    pub fn load(dir: &Path, quant: Quantization, device: &Device) -> Result<Self, ModelError> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let weights = super::component_weights(dir)?;
        Self::from_checkpoint(config, &Checkpoint::open(&weights)?.fitting(device)?, quant, device)
    }

    pub fn from_checkpoint(
        config: UNetConfig,
        ckpt: &Checkpoint,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate().map_err(|e| ModelError::at(ckpt.path(), e))?;
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let mut down = Vec::new();
        let mut skips = vec![ch[0]];
        for i in 0..n {
            let p = format!("down_blocks.{i}");
            let attn = c.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut block = Block::default();
            for j in 0..c.layers_per_block {
                let inp = if j == 0 {
                    if i == 0 { ch[0] } else { ch[i - 1] }
                } else {
                    ch[i]
                };
                block.resnets.push(Resnet::load(
                    ckpt,
                    &format!("{p}.resnets.{j}"),
                    inp,
                    ch[i],
                    c,
                    temb,
                    quant,
                    device,
                )?);
                if attn {
                    block.attentions.push(SpatialTransformer::load(
                        ckpt,
                        &format!("{p}.attentions.{j}"),
                        ch[i],
                        c.heads(i),
                        c,
                        quant,
                        device,
                    )?);
                }
                skips.push(ch[i]);
            }
            if i + 1 < n {
                let name = format!("{p}.downsamplers.0.conv");
                block.sampler = Some(Conv::load_quantized(
                    ckpt,
                    &name,
                    ch[i],
                    ch[i],
                    3,
                    2,
                    true,
                    quant.sensitive(),
                    device,
                )?);
                skips.push(ch[i]);
            }
            down.push(block);
        }
        let last = ch[n - 1];
        let mid = match c.mid_block_type {
            Some(_) => Some((
                Resnet::load(ckpt, "mid_block.resnets.0", last, last, c, temb, quant, device)?,
                SpatialTransformer::load(ckpt, "mid_block.attentions.0", last, c.heads(n - 1), c, quant, device)?,
                Resnet::load(ckpt, "mid_block.resnets.1", last, last, c, temb, quant, device)?,
            )),
            None => None,
        };
        let mut up = Vec::new();
        let mut prev = last;
        for i in 0..n {
            let rev = n - 1 - i;
            let out = ch[rev];
            let p = format!("up_blocks.{i}");
            let attn = c.up_block_types[i] == "CrossAttnUpBlock2D";
            let mut block = Block::default();
            for j in 0..c.layers_per_block + 1 {
                let skip = skips
                    .pop()
                    .ok_or_else(|| ModelError("UNet skip connections do not add up".into()))?;
                let inp = if j == 0 { prev } else { out } + skip;
                block.resnets.push(Resnet::load(
                    ckpt,
                    &format!("{p}.resnets.{j}"),
                    inp,
                    out,
                    c,
                    temb,
                    quant,
                    device,
                )?);
                if attn {
                    block.attentions.push(SpatialTransformer::load(
                        ckpt,
                        &format!("{p}.attentions.{j}"),
                        out,
                        c.heads(rev),
                        c,
                        quant,
                        device,
                    )?);
                }
            }
            if i + 1 < n {
                let name = format!("{p}.upsamplers.0.conv");
                block.sampler = Some(Conv::load_quantized(
                    ckpt,
                    &name,
                    out,
                    out,
                    3,
                    1,
                    true,
                    quant.sensitive(),
                    device,
                )?);
            }
            up.push(block);
            prev = out;
        }
        Ok(UNet {
            time_linear_1: Linear::load(
                ckpt,
                "time_embedding.linear_1",
                temb,
                ch[0],
                true,
                Quantization::None,
                device,
            )?,
            time_linear_2: Linear::load(
                ckpt,
                "time_embedding.linear_2",
                temb,
                temb,
                true,
                Quantization::None,
                device,
            )?,
            conv_in: Conv::load(ckpt, "conv_in", ch[0], c.in_channels, 3, 1, true, device)?,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(ckpt, "conv_norm_out", ch[0], c.norm_num_groups, c.norm_eps, device)?,
            conv_out: Conv::load(ckpt, "conv_out", c.out_channels, ch[0], 3, 1, true, device)?,
            config,
        })
    }

    /// Bytes held by the linear and convolution weights: `(now, in f32)`, i.e. after and
    /// before quantization.
    pub fn weight_bytes(&self) -> (usize, usize) {
        let lin = |l: &Linear| (l.bytes(), l.f32_bytes());
        let conv = |c: &Conv| c.weight_bytes();
        let mut parts = vec![lin(&self.time_linear_1), lin(&self.time_linear_2)];
        parts.extend([conv(&self.conv_in), conv(&self.conv_out)]);
        let resnet = |parts: &mut Vec<(usize, usize)>, r: &Resnet| {
            parts.extend([conv(&r.conv1), conv(&r.conv2), lin(&r.time_emb_proj)]);
            parts.extend(r.shortcut.iter().map(lin));
        };
        let transformer = |parts: &mut Vec<(usize, usize)>, t: &SpatialTransformer| {
            for l in [&t.proj_in, &t.ff_in, &t.ff_out, &t.proj_out] {
                parts.push(lin(l));
            }
            for a in [&t.attn1, &t.attn2] {
                parts.extend([&a.q, &a.k, &a.v, &a.out].map(lin));
            }
        };
        for b in self.down.iter().chain(&self.up) {
            b.resnets.iter().for_each(|r| resnet(&mut parts, r));
            b.attentions.iter().for_each(|t| transformer(&mut parts, t));
            parts.extend(b.sampler.iter().map(conv));
        }
        if let Some((r1, a, r2)) = &self.mid {
            resnet(&mut parts, r1);
            transformer(&mut parts, a);
            resnet(&mut parts, r2);
        }
        parts.iter().fold((0, 0), |(now, f32), (n, f)| (now + n, f32 + f))
    }

    /// `get_timestep_embedding` for one timestep per batch row: `[B, 1, block_out_channels[0]]`.
    fn timestep_embedding(&self, timesteps: &[f32], device: &Device) -> Tensor<3> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / (half as f32 - self.config.freq_shift as f32)).exp())
            .collect();
        let mut values = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
            let (sin, cos) = (args.iter().map(|a| a.sin()), args.iter().map(|a| a.cos()));
            if self.config.flip_sin_to_cos {
                values.extend(cos.chain(sin));
            } else {
                values.extend(sin.chain(cos));
            }
        }
        Tensor::from_data(TensorData::new(values, [timesteps.len(), 1, dim]), device)
    }

    /// One evaluation: `sample [B, C, h, w]`, one timestep per row, text states `[B, S, D]` →
    /// the predicted noise (or v) `[B, C, h, w]`.
    pub fn forward(&self, sample: Tensor<4>, timesteps: &[f32], context: Tensor<3>) -> Result<Tensor<4>, ModelError> {
        let [b, c, h, w] = sample.dims();
        let levels = self.config.block_out_channels.len();
        let factor = 1 << (levels - 1);
        if timesteps.len() != b || c != self.config.in_channels || h % factor != 0 || w % factor != 0 {
            return Err(ModelError(format!(
                "UNet input [{b}, {c}, {h}, {w}] with {} timesteps: needs one timestep per row, {} channels, sides divisible by {factor}",
                timesteps.len(),
                self.config.in_channels
            )));
        }
        let [cb, _, cd] = context.dims();
        if cb != b || cd != self.config.cross_attention_dim {
            return Err(ModelError(format!(
                "text states [{cb}, _, {cd}] do not fit a batch of {b} with cross_attention_dim {}",
                self.config.cross_attention_dim
            )));
        }
        let emb = self.timestep_embedding(timesteps, &sample.device());
        let emb = self.time_linear_2.forward(silu(self.time_linear_1.forward(emb)));
        // Every ResNet applies SiLU to the embedding before its projection: do it once.
        let temb = silu(emb);
        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, r) in block.resnets.iter().enumerate() {
                x = r.forward(x, &temb);
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(x, &context);
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.sampler {
                x = down.forward(x);
                skips.push(x.clone());
            }
        }
        if let Some((r1, a, r2)) = &self.mid {
            x = r2.forward(a.forward(r1.forward(x, &temb), &context), &temb);
        }
        for block in &self.up {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| ModelError("UNet skip connections do not add up".into()))?;
                x = r.forward(Tensor::cat(vec![x, skip], 1), &temb);
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(x, &context);
                }
            }
            if let Some(up) = &block.sampler {
                x = up.forward(upsample_nearest2x(x));
            }
        }
        Ok(self.conv_out.forward(self.norm_out.forward(x, true)))
    }
}

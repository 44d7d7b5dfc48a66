//! Training a tiny latent-diffusion generator with burn's autodiff: diffusers'
//! `AutoencoderKL` (encoder + decoder) and `UNet2DConditionModel` at small sizes, written in
//! burn's modules and exported with diffusers' keys and `config.json`s, so the same loaders that
//! read Stable Diffusion read them.
//!
//! The VAE is trained on reconstruction (MSE) with a small KL term; the UNet on the
//! ε-prediction objective over SD's scaled-linear DDPM schedule (1,000 steps), conditioned on a
//! CLIP text tower's last hidden states, with the caption dropped 10 % of the time so
//! classifier-free guidance works.

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{gelu, silu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::StateDict;
use divergen_models::error::ModelError;

fn conv(inp: usize, out: usize, k: usize, stride: usize, pad: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([inp, out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init(device)
}

fn group_norm(groups: usize, c: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, c).with_epsilon(eps).init(device)
}

fn export_conv(out: &mut StateDict, key: &str, c: &Conv2d) -> Result<(), ModelError> {
    out.tensor(format!("{key}.weight"), c.weight.val())?;
    if let Some(b) = &c.bias {
        out.tensor(format!("{key}.bias"), b.val())?;
    }
    Ok(())
}

fn export_gn(out: &mut StateDict, key: &str, n: &GroupNorm) -> Result<(), ModelError> {
    if let Some(g) = &n.gamma {
        out.tensor(format!("{key}.weight"), g.val())?;
    }
    if let Some(b) = &n.beta {
        out.tensor(format!("{key}.bias"), b.val())?;
    }
    Ok(())
}

/// Nearest-neighbour 2× upsampling `[B, C, H, W]` → `[B, C, 2H, 2W]`.
fn upsample2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .repeat_dim(3, 2)
        .repeat_dim(5, 2)
        .reshape([b, c, 2 * h, 2 * w])
}

/// `ResnetBlock2D`, with the time-embedding projection when it sits in a UNet.
#[derive(Module, Debug)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(inp: usize, out: usize, groups: usize, eps: f64, temb: Option<usize>, device: &Device) -> Self {
        Resnet {
            norm1: group_norm(groups, inp, eps, device),
            conv1: conv(inp, out, 3, 1, 1, device),
            time_emb_proj: temb.map(|t| LinearConfig::new(t, out).init(device)),
            norm2: group_norm(groups, out, eps, device),
            conv2: conv(out, out, 3, 1, 1, device),
            conv_shortcut: (inp != out).then(|| conv(inp, out, 1, 1, 0, device)),
        }
    }

    /// `temb`: the time embedding after SiLU, `[B, T]`.
    fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(p), Some(t)) = (&self.time_emb_proj, temb) {
            let [b, c, _, _] = h.dims();
            h = h + p.forward(t.clone()).reshape([b, c, 1, 1]);
        }
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let skip = match &self.conv_shortcut {
            Some(s) => s.forward(x),
            None => x,
        };
        skip + h
    }

    fn export(&self, out: &mut StateDict, key: &str) -> Result<(), ModelError> {
        export_gn(out, &format!("{key}.norm1"), &self.norm1)?;
        export_conv(out, &format!("{key}.conv1"), &self.conv1)?;
        if let Some(p) = &self.time_emb_proj {
            out.linear(&format!("{key}.time_emb_proj"), p)?;
        }
        export_gn(out, &format!("{key}.norm2"), &self.norm2)?;
        export_conv(out, &format!("{key}.conv2"), &self.conv2)?;
        if let Some(s) = &self.conv_shortcut {
            export_conv(out, &format!("{key}.conv_shortcut"), s)?;
        }
        Ok(())
    }
}

fn attend(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    let [b, s, d] = q.dims();
    let skv = k.dims()[1];
    let hd = d / heads;
    let split = |t: Tensor<3>, n: usize| t.reshape([b, n, heads, hd]).swap_dims(1, 2);
    let scores = split(q, s).matmul(split(k, skv).swap_dims(2, 3)) / (hd as f64).sqrt();
    softmax(scores, 3)
        .matmul(split(v, skv))
        .swap_dims(1, 2)
        .reshape([b, s, d])
}

/// The VAE's mid-block attention: group norm, one head over all channels, residual.
#[derive(Module, Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(c: usize, groups: usize, device: &Device) -> Self {
        let lin = || LinearConfig::new(c, c).init(device);
        VaeAttention {
            group_norm: group_norm(groups, c, 1e-6, device),
            to_q: lin(),
            to_k: lin(),
            to_v: lin(),
            to_out: lin(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let t = self
            .group_norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let o = attend(
            self.to_q.forward(t.clone()),
            self.to_k.forward(t.clone()),
            self.to_v.forward(t),
            1,
        );
        x + self.to_out.forward(o).swap_dims(1, 2).reshape([b, c, h, w])
    }

    fn export(&self, out: &mut StateDict, key: &str) -> Result<(), ModelError> {
        export_gn(out, &format!("{key}.group_norm"), &self.group_norm)?;
        out.linear(&format!("{key}.to_q"), &self.to_q)?;
        out.linear(&format!("{key}.to_k"), &self.to_k)?;
        out.linear(&format!("{key}.to_v"), &self.to_v)?;
        out.linear(&format!("{key}.to_out.0"), &self.to_out)
    }
}

/// The shape of the tiny `AutoencoderKL`; fields mirror its `config.json`.
#[derive(Clone, Debug, Serialize)]
pub struct TinyVaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
}

impl TinyVaeConfig {
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// diffusers' `config.json`, with the scaling factor measured on training latents.
    pub fn hf_config(&self, scaling_factor: f32) -> serde_json::Value {
        let n = self.block_out_channels.len();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": self.latent_channels,
            "block_out_channels": self.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": scaling_factor,
            "mid_block_add_attention": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true
        })
    }
}

#[derive(Module, Debug)]
struct MidBlock {
    resnet1: Resnet,
    attention: VaeAttention,
    resnet2: Resnet,
}

#[derive(Module, Debug)]
struct VaeLevel {
    resnets: Vec<Resnet>,
    sampler: Option<Conv2d>,
}

#[derive(Module, Debug)]
pub struct TinyVae {
    enc_conv_in: Conv2d,
    enc_down: Vec<VaeLevel>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_up: Vec<VaeLevel>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
    #[module(skip)]
    config: TinyVaeConfig,
}

impl TinyVae {
    pub fn new(c: &TinyVaeConfig, device: &Device) -> Self {
        let (g, lc, ch) = (c.norm_num_groups, c.latent_channels, &c.block_out_channels);
        let n = ch.len();
        let top = ch[n - 1];
        let mid = || MidBlock {
            resnet1: Resnet::new(top, top, g, 1e-6, None, device),
            attention: VaeAttention::new(top, g, device),
            resnet2: Resnet::new(top, top, g, 1e-6, None, device),
        };
        let mut prev = ch[0];
        let enc_down = (0..n)
            .map(|i| {
                let level = VaeLevel {
                    resnets: (0..c.layers_per_block)
                        .map(|j| Resnet::new(if j == 0 { prev } else { ch[i] }, ch[i], g, 1e-6, None, device))
                        .collect(),
                    // diffusers pads (0, 1, 0, 1) by hand, then a stride-2 conv without padding.
                    sampler: (i + 1 < n).then(|| conv(ch[i], ch[i], 3, 2, 0, device)),
                };
                prev = ch[i];
                level
            })
            .collect();
        let mut prev = top;
        let dec_up = (0..n)
            .map(|i| {
                let out = ch[n - 1 - i];
                let level = VaeLevel {
                    resnets: (0..c.layers_per_block + 1)
                        .map(|j| Resnet::new(if j == 0 { prev } else { out }, out, g, 1e-6, None, device))
                        .collect(),
                    sampler: (i + 1 < n).then(|| conv(out, out, 3, 1, 1, device)),
                };
                prev = out;
                level
            })
            .collect();
        TinyVae {
            enc_conv_in: conv(3, ch[0], 3, 1, 1, device),
            enc_down,
            enc_mid: mid(),
            enc_norm_out: group_norm(g, top, 1e-6, device),
            enc_conv_out: conv(top, 2 * lc, 3, 1, 1, device),
            quant_conv: conv(2 * lc, 2 * lc, 1, 1, 0, device),
            post_quant_conv: conv(lc, lc, 1, 1, 0, device),
            dec_conv_in: conv(lc, top, 3, 1, 1, device),
            dec_mid: mid(),
            dec_up,
            dec_norm_out: group_norm(g, ch[0], 1e-6, device),
            dec_conv_out: conv(ch[0], 3, 3, 1, 1, device),
            config: c.clone(),
        }
    }

    pub fn config(&self) -> &TinyVaeConfig {
        &self.config
    }

    /// Images in [-1, 1] `[B, 3, H, W]` → the posterior's mean and log-variance
    /// `[B, latent, H/f, W/f]` each (unscaled).
    pub fn encode(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let mut x = self.enc_conv_in.forward(x);
        for level in &self.enc_down {
            for r in &level.resnets {
                x = r.forward(x, None);
            }
            if let Some(s) = &level.sampler {
                let [b, c, h, w] = x.dims();
                let device = x.device();
                let x1 = Tensor::cat(vec![x, Tensor::zeros([b, c, h, 1], &device)], 3);
                let x2 = Tensor::cat(vec![x1, Tensor::zeros([b, c, 1, w + 1], &device)], 2);
                x = s.forward(x2);
            }
        }
        let m = &self.enc_mid;
        x = m.resnet2.forward(m.attention.forward(m.resnet1.forward(x, None)), None);
        let x = self
            .quant_conv
            .forward(self.enc_conv_out.forward(silu(self.enc_norm_out.forward(x))));
        let [b, c, h, w] = x.dims();
        let lc = c / 2;
        (
            x.clone().slice([0..b, 0..lc, 0..h, 0..w]),
            x.slice([0..b, lc..c, 0..h, 0..w]).clamp(-30.0, 20.0),
        )
    }

    /// Unscaled latents → images in [-1, 1].
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.dec_conv_in.forward(self.post_quant_conv.forward(z));
        let m = &self.dec_mid;
        x = m.resnet2.forward(m.attention.forward(m.resnet1.forward(x, None)), None);
        for level in &self.dec_up {
            for r in &level.resnets {
                x = r.forward(x, None);
            }
            if let Some(s) = &level.sampler {
                x = s.forward(upsample2x(x));
            }
        }
        self.dec_conv_out.forward(silu(self.dec_norm_out.forward(x)))
    }

    pub fn state_dict(&self) -> Result<StateDict, ModelError> {
        let mut out = StateDict::default();
        let mid = |out: &mut StateDict, key: &str, m: &MidBlock| -> Result<(), ModelError> {
            m.resnet1.export(out, &format!("{key}.resnets.0"))?;
            m.attention.export(out, &format!("{key}.attentions.0"))?;
            m.resnet2.export(out, &format!("{key}.resnets.1"))
        };
        export_conv(&mut out, "encoder.conv_in", &self.enc_conv_in)?;
        for (i, level) in self.enc_down.iter().enumerate() {
            for (j, r) in level.resnets.iter().enumerate() {
                r.export(&mut out, &format!("encoder.down_blocks.{i}.resnets.{j}"))?;
            }
            if let Some(s) = &level.sampler {
                export_conv(&mut out, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), s)?;
            }
        }
        mid(&mut out, "encoder.mid_block", &self.enc_mid)?;
        export_gn(&mut out, "encoder.conv_norm_out", &self.enc_norm_out)?;
        export_conv(&mut out, "encoder.conv_out", &self.enc_conv_out)?;
        export_conv(&mut out, "quant_conv", &self.quant_conv)?;
        export_conv(&mut out, "post_quant_conv", &self.post_quant_conv)?;
        export_conv(&mut out, "decoder.conv_in", &self.dec_conv_in)?;
        mid(&mut out, "decoder.mid_block", &self.dec_mid)?;
        for (i, level) in self.dec_up.iter().enumerate() {
            for (j, r) in level.resnets.iter().enumerate() {
                r.export(&mut out, &format!("decoder.up_blocks.{i}.resnets.{j}"))?;
            }
            if let Some(s) = &level.sampler {
                export_conv(&mut out, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), s)?;
            }
        }
        export_gn(&mut out, "decoder.conv_norm_out", &self.dec_norm_out)?;
        export_conv(&mut out, "decoder.conv_out", &self.dec_conv_out)?;
        Ok(out)
    }

    /// Weights from a `vae/` folder this model's `save` wrote, to resume training from.
    pub fn load(self, dir: &Path) -> Result<Self, ModelError> {
        crate::load_exported(self, Self::state_dict, &dir.join("diffusion_pytorch_model.safetensors"))
    }

    /// A diffusers `vae/` folder: `config.json` + `diffusion_pytorch_model.safetensors`.
    pub fn save(&self, dir: &Path, scaling_factor: f32) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::at(dir, e))?;
        self.state_dict()?
            .save(&dir.join("diffusion_pytorch_model.safetensors"))?;
        write_json(&dir.join("config.json"), &self.config.hf_config(scaling_factor))
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ModelError::at(path, e))?;
    std::fs::write(path, bytes).map_err(|e| ModelError::at(path, e))
}

/// `Transformer2DModel` with one `BasicTransformerBlock` and linear projections (SD 2.x's
/// `use_linear_projection`).
#[derive(Module, Debug)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    norm1: LayerNorm,
    attn1_q: Linear,
    attn1_k: Linear,
    attn1_v: Linear,
    attn1_out: Linear,
    norm2: LayerNorm,
    attn2_q: Linear,
    attn2_k: Linear,
    attn2_v: Linear,
    attn2_out: Linear,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SpatialTransformer {
    fn new(dim: usize, heads: usize, context: usize, groups: usize, device: &Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let bare = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let ln = || LayerNormConfig::new(dim).init(device);
        SpatialTransformer {
            norm: group_norm(groups, dim, 1e-6, device),
            proj_in: lin(dim, dim),
            norm1: ln(),
            attn1_q: bare(dim, dim),
            attn1_k: bare(dim, dim),
            attn1_v: bare(dim, dim),
            attn1_out: lin(dim, dim),
            norm2: ln(),
            attn2_q: bare(dim, dim),
            attn2_k: bare(context, dim),
            attn2_v: bare(context, dim),
            attn2_out: lin(dim, dim),
            norm3: ln(),
            ff_in: lin(dim, 8 * dim),
            ff_out: lin(4 * dim, dim),
            proj_out: lin(dim, dim),
            heads,
        }
    }

    fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self.norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let mut t = self.proj_in.forward(tokens);
        let n = self.norm1.forward(t.clone());
        let a = attend(
            self.attn1_q.forward(n.clone()),
            self.attn1_k.forward(n.clone()),
            self.attn1_v.forward(n),
            self.heads,
        );
        t = t + self.attn1_out.forward(a);
        let n = self.norm2.forward(t.clone());
        let a = attend(
            self.attn2_q.forward(n),
            self.attn2_k.forward(context.clone()),
            self.attn2_v.forward(context.clone()),
            self.heads,
        );
        t = t + self.attn2_out.forward(a);
        let g = self.ff_in.forward(self.norm3.forward(t.clone()));
        let hidden = 4 * c;
        let value = g.clone().slice([0..b, 0..h * w, 0..hidden]);
        let gate = g.slice([0..b, 0..h * w, hidden..2 * hidden]);
        t = t + self.ff_out.forward(value * gelu(gate));
        x + self.proj_out.forward(t).swap_dims(1, 2).reshape([b, c, h, w])
    }

    fn export(&self, out: &mut StateDict, key: &str) -> Result<(), ModelError> {
        let b = format!("{key}.transformer_blocks.0");
        export_gn(out, &format!("{key}.norm"), &self.norm)?;
        out.linear(&format!("{key}.proj_in"), &self.proj_in)?;
        out.norm(&format!("{b}.norm1"), &self.norm1)?;
        out.linear(&format!("{b}.attn1.to_q"), &self.attn1_q)?;
        out.linear(&format!("{b}.attn1.to_k"), &self.attn1_k)?;
        out.linear(&format!("{b}.attn1.to_v"), &self.attn1_v)?;
        out.linear(&format!("{b}.attn1.to_out.0"), &self.attn1_out)?;
        out.norm(&format!("{b}.norm2"), &self.norm2)?;
        out.linear(&format!("{b}.attn2.to_q"), &self.attn2_q)?;
        out.linear(&format!("{b}.attn2.to_k"), &self.attn2_k)?;
        out.linear(&format!("{b}.attn2.to_v"), &self.attn2_v)?;
        out.linear(&format!("{b}.attn2.to_out.0"), &self.attn2_out)?;
        out.norm(&format!("{b}.norm3"), &self.norm3)?;
        out.linear(&format!("{b}.ff.net.0.proj"), &self.ff_in)?;
        out.linear(&format!("{b}.ff.net.2"), &self.ff_out)?;
        out.linear(&format!("{key}.proj_out"), &self.proj_out)
    }
}

/// The shape of the tiny `UNet2DConditionModel`; every down and up block has cross-attention.
#[derive(Clone, Debug, Serialize)]
pub struct TinyUnetConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// Heads per block (diffusers' `attention_head_dim`, which counts heads).
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub in_channels: usize,
    pub sample_size: usize,
}

impl TinyUnetConfig {
    pub fn hf_config(&self) -> serde_json::Value {
        let n = self.block_out_channels.len();
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "sample_size": self.sample_size,
            "down_block_types": vec!["CrossAttnDownBlock2D"; n],
            "up_block_types": vec!["CrossAttnUpBlock2D"; n],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": 1e-5,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": self.heads,
            "use_linear_projection": true,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "act_fn": "silu"
        })
    }
}

#[derive(Module, Debug)]
struct UnetLevel {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    sampler: Option<Conv2d>,
}

#[derive(Module, Debug)]
pub struct TinyUnet {
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<UnetLevel>,
    mid_resnet1: Resnet,
    mid_attention: SpatialTransformer,
    mid_resnet2: Resnet,
    up: Vec<UnetLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    #[module(skip)]
    config: TinyUnetConfig,
}

impl TinyUnet {
    pub fn new(c: &TinyUnetConfig, device: &Device) -> Self {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let (g, eps, temb) = (c.norm_num_groups, 1e-5, 4 * ch[0]);
        let resnet = |i, o| Resnet::new(i, o, g, eps, Some(temb), device);
        let attn = |d| SpatialTransformer::new(d, c.heads, c.cross_attention_dim, g, device);
        let mut skips = vec![ch[0]];
        let down = (0..n)
            .map(|i| {
                let mut level = UnetLevel {
                    resnets: Vec::new(),
                    attentions: Vec::new(),
                    sampler: None,
                };
                for j in 0..c.layers_per_block {
                    let inp = if j == 0 {
                        if i == 0 { ch[0] } else { ch[i - 1] }
                    } else {
                        ch[i]
                    };
                    level.resnets.push(resnet(inp, ch[i]));
                    level.attentions.push(attn(ch[i]));
                    skips.push(ch[i]);
                }
                if i + 1 < n {
                    level.sampler = Some(conv(ch[i], ch[i], 3, 2, 1, device));
                    skips.push(ch[i]);
                }
                level
            })
            .collect();
        let last = ch[n - 1];
        let mut prev = last;
        let up = (0..n)
            .map(|i| {
                let out = ch[n - 1 - i];
                let mut level = UnetLevel {
                    resnets: Vec::new(),
                    attentions: Vec::new(),
                    sampler: None,
                };
                for j in 0..c.layers_per_block + 1 {
                    let skip = skips.pop().unwrap_or(out);
                    let inp = if j == 0 { prev } else { out } + skip;
                    level.resnets.push(resnet(inp, out));
                    level.attentions.push(attn(out));
                }
                if i + 1 < n {
                    level.sampler = Some(conv(out, out, 3, 1, 1, device));
                }
                prev = out;
                level
            })
            .collect();
        TinyUnet {
            time_linear_1: LinearConfig::new(ch[0], temb).init(device),
            time_linear_2: LinearConfig::new(temb, temb).init(device),
            conv_in: conv(c.in_channels, ch[0], 3, 1, 1, device),
            down,
            mid_resnet1: resnet(last, last),
            mid_attention: attn(last),
            mid_resnet2: resnet(last, last),
            up,
            norm_out: group_norm(g, ch[0], eps, device),
            conv_out: conv(ch[0], c.in_channels, 3, 1, 1, device),
            config: c.clone(),
        }
    }

    pub fn config(&self) -> &TinyUnetConfig {
        &self.config
    }

    /// diffusers' `Timesteps` with `flip_sin_to_cos` and no shift: `[cos, sin]`.
    fn timestep_embedding(&self, timesteps: &[f32], device: &Device) -> Tensor<2> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let mut values = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args: Vec<f32> = (0..half)
                .map(|i| t * (-(10000f32.ln()) * i as f32 / half as f32).exp())
                .collect();
            values.extend(args.iter().map(|a| a.cos()));
            values.extend(args.iter().map(|a| a.sin()));
        }
        Tensor::from_data(TensorData::new(values, [timesteps.len(), dim]), device)
    }

    /// ε prediction for noisy latents `[B, C, h, w]` at `timesteps`, conditioned on `context`
    /// `[B, S, cross_attention_dim]`.
    pub fn forward(&self, sample: Tensor<4>, timesteps: &[f32], context: Tensor<3>) -> Tensor<4> {
        let emb = self.timestep_embedding(timesteps, &sample.device());
        let temb = silu(self.time_linear_2.forward(silu(self.time_linear_1.forward(emb))));
        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (r, a) in level.resnets.iter().zip(&level.attentions) {
                x = a.forward(r.forward(x, Some(&temb)), &context);
                skips.push(x.clone());
            }
            if let Some(s) = &level.sampler {
                x = s.forward(x);
                skips.push(x.clone());
            }
        }
        x = self.mid_resnet2.forward(
            self.mid_attention
                .forward(self.mid_resnet1.forward(x, Some(&temb)), &context),
            Some(&temb),
        );
        for level in &self.up {
            for (r, a) in level.resnets.iter().zip(&level.attentions) {
                let skip = skips.pop().unwrap_or_else(|| x.clone());
                x = a.forward(r.forward(Tensor::cat(vec![x, skip], 1), Some(&temb)), &context);
            }
            if let Some(s) = &level.sampler {
                x = s.forward(upsample2x(x));
            }
        }
        self.conv_out.forward(silu(self.norm_out.forward(x)))
    }

    pub fn state_dict(&self) -> Result<StateDict, ModelError> {
        let mut out = StateDict::default();
        out.linear("time_embedding.linear_1", &self.time_linear_1)?;
        out.linear("time_embedding.linear_2", &self.time_linear_2)?;
        export_conv(&mut out, "conv_in", &self.conv_in)?;
        let level = |out: &mut StateDict, key: &str, l: &UnetLevel, sampler: &str| -> Result<(), ModelError> {
            for (j, (r, a)) in l.resnets.iter().zip(&l.attentions).enumerate() {
                r.export(out, &format!("{key}.resnets.{j}"))?;
                a.export(out, &format!("{key}.attentions.{j}"))?;
            }
            if let Some(s) = &l.sampler {
                export_conv(out, &format!("{key}.{sampler}.0.conv"), s)?;
            }
            Ok(())
        };
        for (i, l) in self.down.iter().enumerate() {
            level(&mut out, &format!("down_blocks.{i}"), l, "downsamplers")?;
        }
        self.mid_resnet1.export(&mut out, "mid_block.resnets.0")?;
        self.mid_attention.export(&mut out, "mid_block.attentions.0")?;
        self.mid_resnet2.export(&mut out, "mid_block.resnets.1")?;
        for (i, l) in self.up.iter().enumerate() {
            level(&mut out, &format!("up_blocks.{i}"), l, "upsamplers")?;
        }
        export_gn(&mut out, "conv_norm_out", &self.norm_out)?;
        export_conv(&mut out, "conv_out", &self.conv_out)?;
        Ok(out)
    }

    /// Weights from a `unet/` folder this model's `save` wrote, to resume training from.
    pub fn load(self, dir: &Path) -> Result<Self, ModelError> {
        crate::load_exported(self, Self::state_dict, &dir.join("diffusion_pytorch_model.safetensors"))
    }

    /// A diffusers `unet/` folder.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        self.save_weights(dir, &self.state_dict()?)
    }

    /// A diffusers `unet/` folder holding `weights`: this model's export or an average of its
    /// exports (EMA).
    pub fn save_weights(&self, dir: &Path, weights: &StateDict) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::at(dir, e))?;
        weights.save(&dir.join("diffusion_pytorch_model.safetensors"))?;
        write_json(&dir.join("config.json"), &self.config.hf_config())
    }
}

/// Stable Diffusion's training schedule (`scaled_linear`, β from 0.00085 to 0.012 over 1,000
/// steps): ᾱ_t for each t.
pub fn alphas_cumprod() -> Vec<f64> {
    let (start, end, n) = (0.00085f64.sqrt(), 0.012f64.sqrt(), 1000);
    let mut acc = 1.0;
    (0..n)
        .map(|i| {
            let beta = (start + (end - start) * i as f64 / (n - 1) as f64).powi(2);
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

/// diffusers' `scheduler_config.json` for that schedule.
pub fn scheduler_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading"
    })
}

/// Writes diffusers' `scheduler/` and `model_index.json` for a Stable Diffusion folder.
pub fn write_pipeline_files(dir: &Path) -> Result<(), ModelError> {
    let scheduler = dir.join("scheduler");
    std::fs::create_dir_all(&scheduler).map_err(|e| ModelError::at(&scheduler, e))?;
    write_json(&scheduler.join("scheduler_config.json"), &scheduler_config())?;
    write_json(
        &dir.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null],
            "safety_checker": [null, null],
            "requires_safety_checker": false,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )
}

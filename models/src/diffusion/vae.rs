//! diffusers' `AutoencoderKL` decoder (Stable Diffusion's VAE), read from a diffusers `vae/`
//! folder unchanged: `post_quant_conv`, `conv_in`, the mid block (ResNet, single-head
//! self-attention, ResNet), the up blocks (ResNets + nearest 2× upsampling and a 3×3 conv), then
//! group norm, SiLU and `conv_out`. It stays f32 (quantizing the VAE costs the most quality).
//!
//! Group norm (fused with SiLU), 3×3/1×1 convolutions and upsampling run through our kernels.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use divergen_kernels::{attention, gemm, gemm_bt, softmax, upsample_nearest2x};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::{Conv2d as Conv, GroupNorm, Linear, Quantization};

/// The fields of an `AutoencoderKL` `config.json` the decoder reads, with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AutoencoderKlConfig {
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub up_block_types: Vec<String>,
    pub scaling_factor: f32,
    pub shift_factor: Option<f32>,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKlConfig {
    fn default() -> Self {
        AutoencoderKlConfig {
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![64],
            layers_per_block: 1,
            norm_num_groups: 32,
            up_block_types: vec!["UpDecoderBlock2D".into()],
            scaling_factor: 0.18215,
            shift_factor: None,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKlConfig {
    /// The largest tensor one decode of `[batch, C, h, w]` latents holds, in bytes (f32): the
    /// widest activation at each resolution, the upsampled ones before their convolution, and
    /// the mid block's attention scores when they are materialised.
    pub fn largest_tensor_bytes(&self, batch: usize, h: usize, w: usize) -> u64 {
        let c = self;
        let channels: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = channels[0];
        let mut cells = (h * w) as u64;
        let mut largest = top as u64 * cells;
        if c.mid_block_add_attention && top > divergen_kernels::attention::MAX_HEAD_DIM {
            largest = largest.max(cells * cells);
        }
        let mut prev = top;
        for (i, &out) in channels.iter().enumerate() {
            largest = largest.max(prev.max(out) as u64 * cells);
            if i + 1 < channels.len() {
                cells *= 4;
                largest = largest.max(out as u64 * cells);
            }
            prev = out;
        }
        4 * batch as u64 * largest
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::at(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::at(path, e))?;
        if let Some(bad) = config.up_block_types.iter().find(|t| t.as_str() != "UpDecoderBlock2D") {
            return Err(ModelError::at(
                path,
                format!("up_block_types: {bad:?} is not supported (UpDecoderBlock2D)"),
            ));
        }
        if config.block_out_channels.is_empty()
            || config.up_block_types.len() != config.block_out_channels.len()
            || config
                .block_out_channels
                .iter()
                .any(|c| c % config.norm_num_groups != 0)
        {
            return Err(ModelError::at(
                path,
                "block_out_channels must be non-empty, one per up block, each a multiple of norm_num_groups",
            ));
        }
        Ok(config)
    }
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn load(
        ckpt: &Checkpoint,
        p: &str,
        inp: usize,
        out: usize,
        groups: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(ckpt, &format!("{p}.norm1"), inp, groups, 1e-6, device)?,
            conv1: Conv::load(ckpt, &format!("{p}.conv1"), out, inp, 3, 1, true, device)?,
            norm2: GroupNorm::load(ckpt, &format!("{p}.norm2"), out, groups, 1e-6, device)?,
            conv2: Conv::load(ckpt, &format!("{p}.conv2"), out, out, 3, 1, true, device)?,
            shortcut: if inp != out {
                Some(Conv::load(
                    ckpt,
                    &format!("{p}.conv_shortcut"),
                    out,
                    inp,
                    1,
                    1,
                    true,
                    device,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(self.norm1.forward(x.clone(), true));
        let h = self.conv2.forward(self.norm2.forward(h, true));
        match &self.shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head self-attention over all positions, with a residual.
struct SelfAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SelfAttention {
    fn load(ckpt: &Checkpoint, p: &str, c: usize, groups: usize, device: &Device) -> Result<Self, ModelError> {
        // diffusers' names, or the pre-0.14 ones older VAE checkpoints still carry.
        let (q, k, v, out) = if ckpt.contains(&format!("{p}.to_q.weight")) {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        let linear = |name: &str| Linear::load(ckpt, &format!("{p}.{name}"), c, c, true, Quantization::None, device);
        Ok(SelfAttention {
            norm: GroupNorm::load(ckpt, &format!("{p}.group_norm"), c, groups, 1e-6, device)?,
            q: linear(q)?,
            k: linear(k)?,
            v: linear(v)?,
            out: linear(out)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .norm
            .forward(x.clone(), false)
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let (q, k, v) = (
            self.q.forward(tokens.clone()),
            self.k.forward(tokens.clone()),
            self.v.forward(tokens),
        );
        let scale = (c as f32).powf(-0.5);
        let o = if c <= divergen_kernels::attention::MAX_HEAD_DIM {
            attention(q.unsqueeze_dim(1), k.unsqueeze_dim(1), v.unsqueeze_dim(1), scale).squeeze_dim::<3>(1)
        } else {
            // One head of 512 channels is wider than the fused kernel holds in registers; the
            // scores (h·w)² are at most 64 MiB at SD's 64×64 latents.
            gemm(softmax(gemm_bt(q, k) * scale), v)
        };
        x + self.out.forward(o).swap_dims(1, 2).reshape([b, c, h, w])
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv>,
}

pub struct VaeDecoder {
    pub config: AutoencoderKlConfig,
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid_resnet1: ResnetBlock,
    mid_attention: Option<SelfAttention>,
    mid_resnet2: ResnetBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// Loads `dir/config.json` + `dir/diffusion_pytorch_model.safetensors` (or
    /// `model.safetensors`): a diffusers `vae/` folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = AutoencoderKlConfig::from_file(&dir.join("config.json"))?;
        let weights = super::component_weights(dir)?;
        Self::from_checkpoint(config, &Checkpoint::open(&weights)?.fitting(device)?, device)
    }

    pub fn from_checkpoint(
        config: AutoencoderKlConfig,
        ckpt: &Checkpoint,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let g = config.norm_num_groups;
        let lc = config.latent_channels;
        let channels: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let top = channels[0];
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &out) in channels.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock::load(
                        ckpt,
                        &format!("{p}.resnets.{j}"),
                        if j == 0 { prev } else { out },
                        out,
                        g,
                        device,
                    )
                })
                .collect::<Result<_, _>>()?;
            let upsample = if i + 1 < channels.len() {
                let name = format!("{p}.upsamplers.0.conv");
                Some(Conv::load(ckpt, &name, out, out, 3, 1, true, device)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        Ok(VaeDecoder {
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv::load(ckpt, "post_quant_conv", lc, lc, 1, 1, true, device)?)
            } else {
                None
            },
            conv_in: Conv::load(ckpt, "decoder.conv_in", top, lc, 3, 1, true, device)?,
            mid_resnet1: ResnetBlock::load(ckpt, "decoder.mid_block.resnets.0", top, top, g, device)?,
            mid_attention: if config.mid_block_add_attention {
                Some(SelfAttention::load(
                    ckpt,
                    "decoder.mid_block.attentions.0",
                    top,
                    g,
                    device,
                )?)
            } else {
                None
            },
            mid_resnet2: ResnetBlock::load(ckpt, "decoder.mid_block.resnets.1", top, top, g, device)?,
            up_blocks,
            norm_out: GroupNorm::load(ckpt, "decoder.conv_norm_out", prev, g, 1e-6, device)?,
            conv_out: Conv::load(ckpt, "decoder.conv_out", config.out_channels, prev, 3, 1, true, device)?,
            config,
        })
    }

    /// Latents as the UNet leaves them `[B, 4, h, w]` → images `[B, 3, 8h, 8w]` in [-1, 1]
    /// (undoing the scaling factor first, as the pipelines do).
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let mut z = latents / self.config.scaling_factor;
        if let Some(shift) = self.config.shift_factor {
            z = z + shift;
        }
        if let Some(c) = &self.post_quant_conv {
            z = c.forward(z);
        }
        let mut x = self.conv_in.forward(z);
        x = self.mid_resnet1.forward(x);
        if let Some(a) = &self.mid_attention {
            x = a.forward(x);
        }
        x = self.mid_resnet2.forward(x);
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(x);
            }
            if let Some(conv) = &block.upsample {
                x = conv.forward(upsample_nearest2x(x));
            }
        }
        self.conv_out.forward(self.norm_out.forward(x, true))
    }
}

//! diffusers' `AutoencoderTiny` decoder (TAESD): a fast stand-in for the VAE decoder — 3×3
//! convolutions with ReLU in small residual blocks and nearest upsampling, no norms, no
//! attention. Read from a diffusers `AutoencoderTiny` folder unchanged.

use std::path::Path;

use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use divergen_kernels::upsample_nearest2x;
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::Conv2d as Conv;

/// The fields of an `AutoencoderTiny` `config.json` the decoder reads, with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub out_channels: usize,
    pub latent_channels: usize,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub upsampling_scaling_factor: usize,
    pub upsample_fn: String,
    pub act_fn: String,
    pub scaling_factor: f32,
    pub shift_factor: f32,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        AutoencoderTinyConfig {
            out_channels: 3,
            latent_channels: 4,
            decoder_block_out_channels: vec![64; 4],
            num_decoder_blocks: vec![3, 3, 3, 1],
            upsampling_scaling_factor: 2,
            upsample_fn: "nearest".into(),
            act_fn: "relu".into(),
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }
}

impl AutoencoderTinyConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::at(path, e))?;
        serde_json::from_str(&text).map_err(|e| ModelError::at(path, e))
    }

    /// The largest tensor one decode of `[batch, C, h, w]` latents holds, in bytes (f32): each
    /// stage's width at its resolution, upsampled once more after every stage but the last.
    pub fn largest_tensor_bytes(&self, batch: usize, h: usize, w: usize) -> u64 {
        let c = self;
        let stages = c.decoder_block_out_channels.len();
        let mut cells = (h * w) as u64;
        let mut largest = 0u64;
        for (i, &ch) in c.decoder_block_out_channels.iter().enumerate() {
            if i + 1 < stages {
                cells *= 4;
            }
            largest = largest.max(ch as u64 * cells);
        }
        4 * batch as u64 * largest.max(c.out_channels as u64 * cells)
    }
}

// Two dozen layers built once: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Layer {
    /// A convolution, followed by ReLU when `relu`.
    Conv(Conv, bool),
    /// `relu(conv(relu(conv(relu(conv(x))))) + x)` (the decoder's blocks keep their width, so
    /// the skip is the identity).
    Block([Conv; 3]),
    Upsample,
}

pub struct TinyDecoder {
    pub config: AutoencoderTinyConfig,
    layers: Vec<Layer>,
}

impl TinyDecoder {
    /// Loads `dir/config.json` + `dir/diffusion_pytorch_model.safetensors` (or
    /// `model.safetensors`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let config = AutoencoderTinyConfig::from_file(&path)?;
        let weights = super::component_weights(dir)?;
        Self::from_checkpoint(config, &Checkpoint::open(&weights)?.fitting(device)?, device).map_err(|e| {
            if e.0.contains(&weights.display().to_string()) {
                e
            } else {
                ModelError::at(&path, e)
            }
        })
    }

    pub fn from_checkpoint(
        config: AutoencoderTinyConfig,
        ckpt: &Checkpoint,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let c = &config;
        if c.act_fn != "relu" || c.upsample_fn != "nearest" || c.upsampling_scaling_factor != 2 {
            return Err(ModelError(format!(
                "act_fn {:?}, upsample_fn {:?}, upsampling_scaling_factor {}: only relu, nearest and 2 are supported",
                c.act_fn, c.upsample_fn, c.upsampling_scaling_factor
            )));
        }
        if c.decoder_block_out_channels.is_empty() || c.decoder_block_out_channels.len() != c.num_decoder_blocks.len() {
            return Err(ModelError(
                "decoder_block_out_channels and num_decoder_blocks must have the same, non-zero length".into(),
            ));
        }
        // Indices follow the decoder's nn.Sequential, where ReLU and Upsample hold a slot each.
        let mut index = 0;
        let mut next = || {
            index += 1;
            format!("decoder.layers.{}", index - 1)
        };
        let first = c.decoder_block_out_channels[0];
        let mut layers = vec![Layer::Conv(
            Conv::load(ckpt, &next(), first, c.latent_channels, 3, 1, true, device)?,
            true,
        )];
        next(); // ReLU
        let stages = c.num_decoder_blocks.len();
        for (i, (&blocks, &ch)) in c
            .num_decoder_blocks
            .iter()
            .zip(&c.decoder_block_out_channels)
            .enumerate()
        {
            for _ in 0..blocks {
                let p = next();
                let conv = |j: usize| Conv::load(ckpt, &format!("{p}.conv.{j}"), ch, ch, 3, 1, true, device);
                layers.push(Layer::Block([conv(0)?, conv(2)?, conv(4)?]));
            }
            let last = i + 1 == stages;
            if !last {
                next();
                layers.push(Layer::Upsample);
            }
            let out = if last { c.out_channels } else { ch };
            layers.push(Layer::Conv(
                Conv::load(ckpt, &next(), out, ch, 3, 1, last, device)?,
                false,
            ));
        }
        Ok(TinyDecoder { config, layers })
    }

    /// Latents `[B, 4, h, w]` → images `[B, 3, 8h, 8w]` in [-1, 1] (TAESD's latents are the
    /// UNet's, scaling factor 1).
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let z = latents / self.config.scaling_factor + self.config.shift_factor;
        // TAESD clamps its input softly to ±3.
        let mut x = (z / 3.0).tanh() * 3.0;
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(conv, then_relu) => {
                    let y = conv.forward(x);
                    if *then_relu { relu(y) } else { y }
                }
                Layer::Block([a, b, c]) => {
                    let h = c.forward(relu(b.forward(relu(a.forward(x.clone())))));
                    relu(h + x)
                }
                Layer::Upsample => upsample_nearest2x(x),
            };
        }
        x * 2.0 - 1.0
    }
}

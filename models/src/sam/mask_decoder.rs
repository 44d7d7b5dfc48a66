//! SAM's mask decoder: the two-way transformer (`transformer.rs`: prompt tokens attend to the
//! image and the image attends back), then the image embedding is upscaled 4× by two transposed convolutions and
//! each mask token's hypernetwork MLP turns it into one mask; an MLP on the IoU token scores
//! the masks.

use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use divergen_kernels::{gelu, gemm_bt};

use super::transformer::TwoWayTransformer;
use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::{LayerNorm, Linear, Quantization};

/// `MaskDecoder` + `TwoWayTransformer` constructor arguments as `build_sam` passes them.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskDecoderConfig {
    pub transformer_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_dim: usize,
    pub attention_downsample_rate: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
}

impl Default for MaskDecoderConfig {
    fn default() -> Self {
        MaskDecoderConfig {
            transformer_dim: 256,
            depth: 2,
            num_heads: 8,
            mlp_dim: 2048,
            attention_downsample_rate: 2,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
        }
    }
}

/// `nn.Linear` layers with ReLU between them (the decoder's `MLP`).
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    #[allow(clippy::too_many_arguments)]
    fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        input: usize,
        hidden: usize,
        output: usize,
        depth: usize,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let layers = (0..depth)
            .map(|i| {
                let inp = if i == 0 { input } else { hidden };
                let out = if i + 1 == depth { output } else { hidden };
                Linear::load(ckpt, &format!("{prefix}.layers.{i}"), out, inp, true, quant, device)
            })
            .collect::<Result<_, _>>()?;
        Ok(Mlp { layers })
    }

    fn forward(&self, mut x: Tensor<3>) -> Tensor<3> {
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i + 1 < self.layers.len() {
                x = relu(x);
            }
        }
        x
    }
}

pub struct MaskDecoder {
    pub config: MaskDecoderConfig,
    /// `[1, 1 + masks, dim]`: the IoU token then the mask tokens.
    output_tokens: Tensor<3>,
    transformer: TwoWayTransformer,
    /// The two stride-2 transposed convolutions as per-token linears to `out·2·2` values.
    upscale1: Linear,
    upscale_norm: LayerNorm,
    upscale2: Linear,
    hypernetworks: Vec<Mlp>,
    iou_head: Mlp,
}

/// A `ConvTranspose2d(inp, out, 2, stride 2)` weight `[inp, out, 2, 2]` as a linear layer
/// `[out·4, inp]` (rows ordered channel, then kernel row, then kernel column).
fn transposed_conv(
    ckpt: &Checkpoint,
    prefix: &str,
    inp: usize,
    out: usize,
    quant: Quantization,
    device: &Device,
) -> Result<Linear, ModelError> {
    let w = ckpt.values(&format!("{prefix}.weight"), &[inp, out, 2, 2])?;
    let b = ckpt.values(&format!("{prefix}.bias"), &[out])?;
    let mut rows = vec![0f32; out * 4 * inp];
    for i in 0..inp {
        for o in 0..out * 4 {
            rows[o * inp + i] = w[i * out * 4 + o];
        }
    }
    let bias = b.iter().flat_map(|&v| [v; 4]).collect();
    Ok(Linear::from_values(rows, Some(bias), out * 4, inp, quant, device))
}

impl MaskDecoder {
    pub fn load(
        ckpt: &Checkpoint,
        config: MaskDecoderConfig,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let d = config.transformer_dim;
        let q = quant.sensitive();
        let pre = "mask_decoder";
        let masks = config.num_multimask_outputs + 1;
        let iou = ckpt.tensor::<2>(&format!("{pre}.iou_token.weight"), [1, d], device)?;
        let mask_tokens = ckpt.tensor::<2>(&format!("{pre}.mask_tokens.weight"), [masks, d], device)?;
        let hypernetworks = (0..masks)
            .map(|i| {
                Mlp::load(
                    ckpt,
                    &format!("{pre}.output_hypernetworks_mlps.{i}"),
                    d,
                    d,
                    d / 8,
                    3,
                    q,
                    device,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(MaskDecoder {
            output_tokens: Tensor::cat(vec![iou, mask_tokens], 0).unsqueeze::<3>(),
            transformer: TwoWayTransformer::load(ckpt, &format!("{pre}.transformer"), &config, quant, device)?,
            upscale1: transposed_conv(ckpt, &format!("{pre}.output_upscaling.0"), d, d / 4, q, device)?,
            upscale_norm: LayerNorm::load(ckpt, &format!("{pre}.output_upscaling.1"), d / 4, 1e-6, device)?,
            upscale2: transposed_conv(ckpt, &format!("{pre}.output_upscaling.3"), d / 4, d / 8, q, device)?,
            hypernetworks,
            iou_head: Mlp::load(
                ckpt,
                &format!("{pre}.iou_prediction_head"),
                d,
                config.iou_head_hidden_dim,
                masks,
                config.iou_head_depth,
                q,
                device,
            )?,
            config,
        })
    }

    /// Mask logits `[1, 1 + multimask, 4g, 4g]` and IoU predictions `[1, 1 + multimask]` for
    /// one prompt: `image` and `image_pe` are `[1, g², dim]`, `sparse` `[1, N, dim]`, `dense`
    /// `[1, g², dim]` or `[1, 1, dim]` (broadcast).
    pub fn forward(
        &self,
        image: Tensor<3>,
        image_pe: Tensor<3>,
        sparse: Tensor<3>,
        dense: Tensor<3>,
        grid: usize,
    ) -> (Tensor<4>, Tensor<2>) {
        let tokens = if sparse.dims()[1] == 0 {
            self.output_tokens.clone()
        } else {
            Tensor::cat(vec![self.output_tokens.clone(), sparse], 1)
        };
        let (queries, keys) = self.transformer.forward(image + dense, image_pe, tokens);
        let d = self.config.transformer_dim;
        let masks = self.config.num_multimask_outputs + 1;
        let g = grid;
        // Transposed convolution 1: each cell becomes a 2×2 block of d/4 channels.
        let c1 = d / 4;
        let x = self
            .upscale1
            .forward(keys)
            .reshape([1, g, g, c1, 2, 2])
            .permute([0, 1, 4, 2, 5, 3])
            .reshape([1, 4 * g * g, c1]);
        let x = gelu(self.upscale_norm.forward(x), false);
        let c2 = d / 8;
        let g2 = 2 * g;
        let up = self
            .upscale2
            .forward(x)
            .reshape([1, g2, g2, c2, 2, 2])
            .permute([0, 1, 4, 2, 5, 3])
            .reshape([1, 4 * g2 * g2, c2]);
        let up = gelu(up, false);
        let hyper: Vec<Tensor<3>> = self
            .hypernetworks
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(queries.clone().slice([0..1, 1 + i..2 + i, 0..d])))
            .collect();
        let hyper = Tensor::cat(hyper, 1);
        let side = 2 * g2;
        let logits = gemm_bt(hyper, up).reshape([1, masks, side, side]);
        let iou = self
            .iou_head
            .forward(queries.slice([0..1, 0..1, 0..d]))
            .reshape([1, masks]);
        (logits, iou)
    }

    /// The linear layers, for size accounting.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut all = self.transformer.linears();
        all.extend([&self.upscale1, &self.upscale2]);
        for mlp in self.hypernetworks.iter().chain([&self.iou_head]) {
            all.extend(mlp.layers.iter());
        }
        all
    }
}

//! SAM's mask decoder: a two-way transformer (prompt tokens attend to the image and the image
//! attends back), then the image embedding is upscaled 4× by two transposed convolutions and
//! each mask token's hypernetwork MLP turns it into one mask; an MLP on the IoU token scores
//! the masks.

use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use divergen_kernels::{attention, gelu, gemm_bt};

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

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        dim: usize,
        heads: usize,
        downsample: usize,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let inner = dim / downsample;
        let linear =
            |name: &str, out, inp| Linear::load(ckpt, &format!("{prefix}.{name}"), out, inp, true, quant, device);
        Ok(Attention {
            q_proj: linear("q_proj", inner, dim)?,
            k_proj: linear("k_proj", inner, dim)?,
            v_proj: linear("v_proj", inner, dim)?,
            out_proj: linear("out_proj", dim, inner)?,
            heads,
        })
    }

    fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let (q, k, v) = (self.q_proj.forward(q), self.k_proj.forward(k), self.v_proj.forward(v));
        let [b, sq, inner] = q.dims();
        let skv = k.dims()[1];
        let hd = inner / self.heads;
        let split = |t: Tensor<3>, s: usize| t.reshape([b, s, self.heads, hd]).swap_dims(1, 2);
        let o = attention(split(q, sq), split(k, skv), split(v, skv), (hd as f32).powf(-0.5));
        self.out_proj.forward(o.swap_dims(1, 2).reshape([b, sq, inner]))
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
    }
}

struct TwoWayBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_token_to_image: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    norm3: LayerNorm,
    norm4: LayerNorm,
    cross_image_to_token: Attention,
    skip_first_layer_pe: bool,
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
    blocks: Vec<TwoWayBlock>,
    final_attn: Attention,
    norm_final: LayerNorm,
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
        let t = format!("{pre}.transformer");
        let heads = config.num_heads;
        let down = config.attention_downsample_rate;
        let norm = |name: &str| LayerNorm::load(ckpt, name, d, 1e-5, device);
        let blocks = (0..config.depth)
            .map(|i| {
                let p = format!("{t}.layers.{i}");
                Ok(TwoWayBlock {
                    self_attn: Attention::load(ckpt, &format!("{p}.self_attn"), d, heads, 1, q, device)?,
                    norm1: norm(&format!("{p}.norm1"))?,
                    cross_token_to_image: Attention::load(
                        ckpt,
                        &format!("{p}.cross_attn_token_to_image"),
                        d,
                        heads,
                        down,
                        q,
                        device,
                    )?,
                    norm2: norm(&format!("{p}.norm2"))?,
                    lin1: Linear::load(ckpt, &format!("{p}.mlp.lin1"), config.mlp_dim, d, true, quant, device)?,
                    lin2: Linear::load(ckpt, &format!("{p}.mlp.lin2"), d, config.mlp_dim, true, quant, device)?,
                    norm3: norm(&format!("{p}.norm3"))?,
                    norm4: norm(&format!("{p}.norm4"))?,
                    cross_image_to_token: Attention::load(
                        ckpt,
                        &format!("{p}.cross_attn_image_to_token"),
                        d,
                        heads,
                        down,
                        q,
                        device,
                    )?,
                    skip_first_layer_pe: i == 0,
                })
            })
            .collect::<Result<_, ModelError>>()?;
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
            blocks,
            final_attn: Attention::load(
                ckpt,
                &format!("{t}.final_attn_token_to_image"),
                d,
                heads,
                down,
                q,
                device,
            )?,
            norm_final: norm(&format!("{t}.norm_final_attn"))?,
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
        let (queries, keys) = self.transformer(image + dense, image_pe, tokens);
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

    fn transformer(&self, image: Tensor<3>, image_pe: Tensor<3>, point_pe: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let mut queries = point_pe.clone();
        let mut keys = image;
        for block in &self.blocks {
            queries = if block.skip_first_layer_pe {
                block.self_attn.forward(queries.clone(), queries.clone(), queries)
            } else {
                let q = queries.clone() + point_pe.clone();
                queries.clone() + block.self_attn.forward(q.clone(), q, queries)
            };
            queries = block.norm1.forward(queries);
            let q = queries.clone() + point_pe.clone();
            let k = keys.clone() + image_pe.clone();
            queries = block
                .norm2
                .forward(queries + block.cross_token_to_image.forward(q, k, keys.clone()));
            let mlp = block.lin2.forward(relu(block.lin1.forward(queries.clone())));
            queries = block.norm3.forward(queries + mlp);
            let q = queries.clone() + point_pe.clone();
            let k = keys.clone() + image_pe.clone();
            keys = block
                .norm4
                .forward(keys + block.cross_image_to_token.forward(k, q, queries.clone()));
        }
        let q = queries.clone() + point_pe;
        let k = keys.clone() + image_pe;
        let queries = self
            .norm_final
            .forward(queries + self.final_attn.forward(q, k, keys.clone()));
        (queries, keys)
    }

    /// The linear layers, for size accounting.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut all = Vec::new();
        for b in &self.blocks {
            all.extend(b.self_attn.linears());
            all.extend(b.cross_token_to_image.linears());
            all.extend(b.cross_image_to_token.linears());
            all.extend([&b.lin1, &b.lin2]);
        }
        all.extend(self.final_attn.linears());
        all.extend([&self.upscale1, &self.upscale2]);
        for mlp in self.hypernetworks.iter().chain([&self.iou_head]) {
            all.extend(mlp.layers.iter());
        }
        all
    }
}

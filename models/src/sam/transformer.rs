//! SAM's `TwoWayTransformer` (segment_anything's `modeling/transformer.py`): prompt tokens attend
//! to themselves and to the image, the image attends back to the tokens, and a final
//! token-to-image attention ends it. The mask decoder runs it before upscaling.

use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use divergen_kernels::attention;

use super::mask_decoder::MaskDecoderConfig;
use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::{LayerNorm, Linear, Quantization};

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

pub struct TwoWayTransformer {
    blocks: Vec<TwoWayBlock>,
    final_attn: Attention,
    norm_final: LayerNorm,
}

impl TwoWayTransformer {
    /// `prefix` is the checkpoint's `mask_decoder.transformer`. The attention projections take
    /// the sensitive format of `quant` (`Quantization::sensitive`), the MLPs `quant` itself.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        config: &MaskDecoderConfig,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let d = config.transformer_dim;
        let q = quant.sensitive();
        let heads = config.num_heads;
        let down = config.attention_downsample_rate;
        let norm = |name: &str| LayerNorm::load(ckpt, name, d, 1e-5, device);
        let blocks = (0..config.depth)
            .map(|i| {
                let p = format!("{prefix}.layers.{i}");
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
        Ok(TwoWayTransformer {
            blocks,
            final_attn: Attention::load(
                ckpt,
                &format!("{prefix}.final_attn_token_to_image"),
                d,
                heads,
                down,
                q,
                device,
            )?,
            norm_final: norm(&format!("{prefix}.norm_final_attn"))?,
        })
    }

    /// `(queries, keys)`: the prompt tokens `[1, N, dim]` and the image tokens `[1, g², dim]`
    /// after the blocks and the final token-to-image attention.
    pub fn forward(&self, image: Tensor<3>, image_pe: Tensor<3>, point_pe: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
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
        all
    }
}

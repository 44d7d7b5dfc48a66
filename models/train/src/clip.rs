//! Training a tiny CLIP with burn's autodiff, in burn's own `nn` modules (our inference kernels
//! have no backward pass), then exporting it in Hugging Face's `CLIPModel` layout so the same
//! loader that reads `openai/clip-vit-base-patch32` reads it.
//!
//! Contrastive training as in CLIP: a batch of (image, caption) pairs, the symmetric
//! cross-entropy over the scaled cosine matrix, a learnable temperature.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use serde::Serialize;

use crate::{StateDict, by_tenth, learning_rate, scalar};
use divergen_models::clip::tokenizer::{CONTEXT, ClipTokenizer};
use divergen_models::error::ModelError;

/// The tiny model's shape; the fields mirror `CLIPConfig`'s.
#[derive(Clone, Debug, Serialize)]
pub struct TinyClipConfig {
    pub vocab_size: usize,
    pub eos_token_id: u32,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub mlp_ratio: usize,
    pub projection_dim: usize,
}

impl TinyClipConfig {
    /// Hugging Face's `config.json` for this shape.
    pub fn hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": 2.6592,
            "text_config": {
                "vocab_size": self.vocab_size,
                "hidden_size": self.text_hidden,
                "intermediate_size": self.text_hidden * self.mlp_ratio,
                "num_hidden_layers": self.text_layers,
                "num_attention_heads": self.text_heads,
                "max_position_embeddings": CONTEXT,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "eos_token_id": self.eos_token_id,
                "projection_dim": self.projection_dim
            },
            "vision_config": {
                "hidden_size": self.vision_hidden,
                "intermediate_size": self.vision_hidden * self.mlp_ratio,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads,
                "num_channels": 3,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": self.projection_dim
            }
        })
    }
}

#[derive(Module, Debug)]
pub struct Block {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * activation::sigmoid(x * 1.702)
}

impl Block {
    fn new(d: usize, heads: usize, mlp: usize, device: &Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Block {
            norm1: LayerNormConfig::new(d).init(device),
            q: lin(d, d),
            k: lin(d, d),
            v: lin(d, d),
            out: lin(d, d),
            norm2: LayerNormConfig::new(d).init(device),
            fc1: lin(d, mlp),
            fc2: lin(mlp, d),
            heads,
        }
    }

    fn forward(&self, x: Tensor<3>, mask: Option<Tensor<4>>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let (h, dh) = (self.heads, d / self.heads);
        let y = self.norm1.forward(x.clone());
        let split = |t: Tensor<3>| t.reshape([b, s, h, dh]).swap_dims(1, 2);
        let (q, k, v) = (
            split(self.q.forward(y.clone())),
            split(self.k.forward(y.clone())),
            split(self.v.forward(y)),
        );
        let mut scores = q.matmul(k.swap_dims(2, 3)) / (dh as f64).sqrt();
        if let Some(m) = mask {
            scores = scores + m;
        }
        let attn = activation::softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, s, d]);
        let x = x + self.out.forward(attn);
        let y = self
            .fc2
            .forward(quick_gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + y
    }
}

#[derive(Module, Debug)]
pub struct TinyClip {
    token_embedding: Embedding,
    text_positions: Param<Tensor<2>>,
    text_blocks: Vec<Block>,
    final_norm: LayerNorm,
    text_projection: Linear,
    patch: Linear,
    class_embedding: Param<Tensor<1>>,
    vision_positions: Param<Tensor<2>>,
    pre_norm: LayerNorm,
    vision_blocks: Vec<Block>,
    post_norm: LayerNorm,
    visual_projection: Linear,
    logit_scale: Param<Tensor<1>>,
    patch_size: usize,
}

impl TinyClip {
    pub fn new(c: &TinyClipConfig, device: &Device) -> Self {
        let normal = |shape: [usize; 2], std: f64| {
            Param::from_tensor(Tensor::random(
                shape,
                burn::tensor::Distribution::Normal(0.0, std),
                device,
            ))
        };
        let grid = c.image_size / c.patch_size;
        let no_bias = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        TinyClip {
            token_embedding: EmbeddingConfig::new(c.vocab_size, c.text_hidden)
                .with_initializer(burn::nn::Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device),
            text_positions: normal([CONTEXT, c.text_hidden], 0.01),
            text_blocks: (0..c.text_layers)
                .map(|_| Block::new(c.text_hidden, c.text_heads, c.text_hidden * c.mlp_ratio, device))
                .collect(),
            final_norm: LayerNormConfig::new(c.text_hidden).init(device),
            text_projection: no_bias(c.text_hidden, c.projection_dim),
            patch: no_bias(3 * c.patch_size * c.patch_size, c.vision_hidden),
            class_embedding: Param::from_tensor(Tensor::random(
                [c.vision_hidden],
                burn::tensor::Distribution::Normal(0.0, 0.02),
                device,
            )),
            vision_positions: normal([grid * grid + 1, c.vision_hidden], 0.01),
            pre_norm: LayerNormConfig::new(c.vision_hidden).init(device),
            vision_blocks: (0..c.vision_layers)
                .map(|_| Block::new(c.vision_hidden, c.vision_heads, c.vision_hidden * c.mlp_ratio, device))
                .collect(),
            post_norm: LayerNormConfig::new(c.vision_hidden).init(device),
            visual_projection: no_bias(c.vision_hidden, c.projection_dim),
            logit_scale: Param::from_tensor(Tensor::from_data(TensorData::new(vec![2.6592f32], [1]), device)),
            patch_size: c.patch_size,
        }
    }

    /// Unnormalised text embeddings: the final-norm state at each row's end token, projected.
    pub fn encode_text(&self, ids: &[Vec<u32>], eos: &[usize], device: &Device) -> Tensor<2> {
        let (b, s) = (ids.len(), CONTEXT);
        let flat: Vec<i64> = ids.iter().flat_map(|r| r.iter().map(|&i| i as i64)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, s]), device);
        let d = self.text_positions.val().dims()[1];
        let mut x = self.token_embedding.forward(ids) + self.text_positions.val().unsqueeze_dim::<3>(0);
        let mut causal = vec![0f32; s * s];
        for i in 0..s {
            for j in i + 1..s {
                causal[i * s + j] = -1e9;
            }
        }
        let mask = Tensor::<2>::from_data(TensorData::new(causal, [s, s]), device).reshape([1, 1, s, s]);
        for block in &self.text_blocks {
            x = block.forward(x, Some(mask.clone()));
        }
        let x = self.final_norm.forward(x);
        let mut pick = vec![0f32; b * s];
        for (row, &p) in eos.iter().enumerate() {
            pick[row * s + p] = 1.0;
        }
        let pick = Tensor::<3>::from_data(TensorData::new(pick, [b, 1, s]), device);
        self.text_projection.forward(pick.matmul(x).reshape([b, d]))
    }

    /// Unnormalised image embeddings from CLIP-normalised pixels `[B, 3, S, S]`.
    pub fn encode_image(&self, pixels: Tensor<4>) -> Tensor<2> {
        let [b, c, h, w] = pixels.dims();
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        // Patches flattened in (channel, row, column) order, as a conv weight `[D, C, p, p]`.
        let patches = pixels
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let tokens = self.patch.forward(patches);
        let d = tokens.dims()[2];
        let cls = self.class_embedding.val().reshape([1, 1, d]).repeat_dim(0, b);
        let mut x = Tensor::cat(vec![cls, tokens], 1) + self.vision_positions.val().unsqueeze_dim::<3>(0);
        x = self.pre_norm.forward(x);
        for block in &self.vision_blocks {
            x = block.forward(x, None);
        }
        let pooled = self.post_norm.forward(x.slice([0..b, 0..1, 0..d]).reshape([b, d]));
        self.visual_projection.forward(pooled)
    }

    /// CLIP's symmetric contrastive loss over a batch of matching pairs.
    pub fn loss(&self, images: Tensor<2>, texts: Tensor<2>) -> Tensor<1> {
        let n = images.dims()[0];
        let unit = |x: Tensor<2>| x.clone() / (x.powf_scalar(2.0).sum_dim(1).sqrt() + 1e-6);
        let scale = self.logit_scale.val().clamp(0.0, 4.6052).exp().reshape([1, 1]);
        let logits = unit(images).matmul(unit(texts).transpose()) * scale;
        let eye = Tensor::<2>::eye(n, &logits.device());
        let per_image = activation::log_softmax(logits.clone(), 1) * eye.clone();
        let per_text = activation::log_softmax(logits, 0) * eye;
        (per_image.sum() + per_text.sum()) / (-2.0 * n as f64)
    }

    /// The weights in `CLIPModel`'s state-dict layout.
    pub fn state_dict(&self) -> Result<StateDict, ModelError> {
        let mut out = StateDict::default();
        let blocks = |out: &mut StateDict, prefix: &str, blocks: &[Block]| -> Result<(), ModelError> {
            for (i, b) in blocks.iter().enumerate() {
                let p = format!("{prefix}.encoder.layers.{i}");
                out.norm(&format!("{p}.layer_norm1"), &b.norm1)?;
                out.linear(&format!("{p}.self_attn.q_proj"), &b.q)?;
                out.linear(&format!("{p}.self_attn.k_proj"), &b.k)?;
                out.linear(&format!("{p}.self_attn.v_proj"), &b.v)?;
                out.linear(&format!("{p}.self_attn.out_proj"), &b.out)?;
                out.norm(&format!("{p}.layer_norm2"), &b.norm2)?;
                out.linear(&format!("{p}.mlp.fc1"), &b.fc1)?;
                out.linear(&format!("{p}.mlp.fc2"), &b.fc2)?;
            }
            Ok(())
        };
        out.tensor(
            "text_model.embeddings.token_embedding.weight",
            self.token_embedding.weight.val(),
        )?;
        out.tensor(
            "text_model.embeddings.position_embedding.weight",
            self.text_positions.val(),
        )?;
        blocks(&mut out, "text_model", &self.text_blocks)?;
        out.norm("text_model.final_layer_norm", &self.final_norm)?;
        out.linear("text_projection", &self.text_projection)?;
        let d = self.class_embedding.val().dims()[0];
        let p = self.patch_size;
        out.tensor(
            "vision_model.embeddings.patch_embedding.weight",
            self.patch.weight.val().transpose().reshape([d, 3, p, p]),
        )?;
        out.tensor("vision_model.embeddings.class_embedding", self.class_embedding.val())?;
        out.tensor(
            "vision_model.embeddings.position_embedding.weight",
            self.vision_positions.val(),
        )?;
        out.norm("vision_model.pre_layrnorm", &self.pre_norm)?;
        blocks(&mut out, "vision_model", &self.vision_blocks)?;
        out.norm("vision_model.post_layernorm", &self.post_norm)?;
        out.linear("visual_projection", &self.visual_projection)?;
        // A 0-d tensor in transformers' state dict.
        out.tensor("logit_scale", self.logit_scale.val())?;
        if let Some(last) = out.0.last_mut() {
            last.1.clear();
        }
        Ok(out)
    }
}

/// Writes `config.json`, `model.safetensors` and the tokenizer files: a `CLIPModel` folder.
pub fn save_hf(
    model: &TinyClip,
    config: &TinyClipConfig,
    tokenizer: &ClipTokenizer,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::at(dir, e))?;
    model.state_dict()?.save(&dir.join("model.safetensors"))?;
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::to_vec_pretty(&config.hf_config()).map_err(|e| ModelError(e.to_string()))?,
    )
    .map_err(|e| ModelError::at(&cfg, e))?;
    tokenizer.save_hf(dir).map_err(|e| ModelError(e.to_string()))
}

/// One training image with the captions it may be paired with (one drawn per use).
pub struct Pair {
    /// CLIP-normalised `[3, S, S]` pixels.
    pub pixels: Vec<f32>,
    pub captions: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainLog {
    /// Mean loss over each tenth of the run.
    pub loss_by_tenth: Vec<f64>,
    pub seconds: f64,
}

/// Tokens and end positions, padded to the context.
pub fn tokenize(tokenizer: &ClipTokenizer, texts: &[String]) -> (Vec<Vec<u32>>, Vec<usize>) {
    texts
        .iter()
        .map(|t| {
            let (ids, len) = tokenizer.encode_padded(t, tokenizer.end_id());
            (ids, len - 1)
        })
        .unzip()
}

/// Contrastive training with Adam and a cosine learning-rate decay on batches from `draw`
/// (called with the step and the item's place in the batch; a procedural domain draws a fresh
/// image each time, so nothing is seen twice). `device` must have autodiff enabled.
pub fn train(
    model: TinyClip,
    tokenizer: &ClipTokenizer,
    side: usize,
    options: &TrainOptions,
    device: &Device,
    mut draw: impl FnMut(usize, usize) -> Pair,
    mut progress: impl FnMut(usize, f64),
) -> (TinyClip, TrainLog) {
    use burn::optim::{AdamConfig, GradientsParams};
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let start = std::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut optimizer = AdamConfig::new().init();
    let mut model = model;
    let mut losses = Vec::with_capacity(options.steps);
    for step in 0..options.steps {
        let batch: Vec<Pair> = (0..options.batch).map(|i| draw(step, i)).collect();
        let pixels: Vec<f32> = batch.iter().flat_map(|p| p.pixels.iter().copied()).collect();
        let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [batch.len(), 3, side, side]), device);
        let texts: Vec<String> = batch
            .iter()
            .map(|p| p.captions[rng.random_range(0..p.captions.len())].clone())
            .collect();
        let (ids, eos) = tokenize(tokenizer, &texts);
        let loss = model.loss(model.encode_image(pixels), model.encode_text(&ids, &eos, device));
        let value = scalar(&loss);
        losses.push(value);
        progress(step, value);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(learning_rate(options.learning_rate, step, options.steps), model, grads);
    }
    let loss_by_tenth = by_tenth(&losses);
    (
        model,
        TrainLog {
            loss_by_tenth,
            seconds: start.elapsed().as_secs_f64(),
        },
    )
}

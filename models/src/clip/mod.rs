//! CLIP (Radford et al., 2021) in Hugging Face's `CLIPModel` layout: `config.json` +
//! `model.safetensors` with the checkpoint's keys unchanged. Vision tower: patch embedding,
//! class token, positions, pre-norm, pre-LN transformer, post-norm of the class token,
//! projection. Text tower: token + position embeddings, causal pre-LN transformer, final norm,
//! the end-of-text token's state, projection.
//!
//! Linear layers run through our GEMM (or int8/int4 weight-only GEMM when quantized at load);
//! vision attention through our fused attention kernel; norms through our layer norm. Beside
//! the model: `tokenizer.rs` (CLIP's byte-level BPE) and `preprocess.rs` (transformers'
//! resize, crop and normalisation).

pub mod preprocess;
pub mod tokenizer;

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use divergen_kernels::{attention, gemm, gemm_bt, softmax};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
/// Int4 puts the vision tower's MLPs (two thirds of its linear weights) in int4 and keeps
/// attention, projections and the whole text tower in int8. Measured on the parity fixture
/// (cosine to f32): everything in int4 gave 0.997 for images but 0.986 for texts; int4 MLPs in
/// both towers 0.9995 and 0.988. Text embeddings are computed once per category, images once per
/// generated instance, so int4 goes where the volume is.
pub use crate::layers::Quantization;
use crate::layers::{LayerNorm, Linear};

// ---- Config: the fields of transformers' CLIPConfig this model reads, with its defaults. ----

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// 2 in OpenAI's published configs, which transformers takes to mean "pool at the highest
    /// token id" (the end-of-text token is the last in the vocabulary).
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        ClipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
}

fn default_projection_dim() -> usize {
    512
}

impl ClipConfig {
    /// openai/clip-vit-base-patch32.
    pub fn vit_b_32() -> Self {
        ClipConfig {
            text_config: ClipTextConfig {
                eos_token_id: 2,
                ..Default::default()
            },
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
        }
    }

    /// openai/clip-vit-base-patch16.
    pub fn vit_b_16() -> Self {
        let mut c = Self::vit_b_32();
        c.vision_config.patch_size = 16;
        c
    }

    /// openai/clip-vit-large-patch14.
    pub fn vit_l_14() -> Self {
        ClipConfig {
            text_config: ClipTextConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_attention_heads: 12,
                eos_token_id: 2,
                ..Default::default()
            },
            vision_config: ClipVisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                patch_size: 14,
                ..Default::default()
            },
            projection_dim: 768,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::at(path, e))?;
        let config: ClipConfig = serde_json::from_str(&text).map_err(|e| ModelError::at(path, e))?;
        for (tower, act) in [
            ("text", &config.text_config.hidden_act),
            ("vision", &config.vision_config.hidden_act),
        ] {
            Activation::parse(act).map_err(|e| ModelError::at(path, format!("{tower}_config.hidden_act: {e}")))?;
        }
        let (t, v) = (&config.text_config, &config.vision_config);
        if t.hidden_size % t.num_attention_heads != 0 || v.hidden_size % v.num_attention_heads != 0 {
            return Err(ModelError::at(
                path,
                "hidden_size is not a multiple of num_attention_heads",
            ));
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(ModelError::at(
                path,
                "vision image_size is not a multiple of patch_size",
            ));
        }
        Ok(config)
    }
}

// ---- Building blocks ----

#[derive(Clone, Copy, Debug)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(format!("unsupported activation {other:?} (quick_gelu or gelu)")),
        }
    }

    /// The kernel's activation, applied by the layer before it as it stores its output.
    fn kernel(self) -> divergen_kernels::Activation {
        match self {
            // OpenAI's CLIP: x·σ(1.702x).
            Activation::QuickGelu => divergen_kernels::Activation::QuickGelu,
            Activation::Gelu => divergen_kernels::Activation::GeluErf,
        }
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

struct Encoder {
    layers: Vec<EncoderLayer>,
    heads: usize,
    activation: Activation,
}

impl Encoder {
    #[allow(clippy::too_many_arguments)]
    fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        depth: usize,
        dim: usize,
        hidden: usize,
        heads: usize,
        act: &str,
        eps: f64,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let activation = Activation::parse(act).map_err(|e| ModelError::at(ckpt.path(), e))?;
        let layers = (0..depth)
            .map(|i| {
                let p = format!("{prefix}.layers.{i}");
                let linear =
                    |name: &str, out, inp| Linear::load(ckpt, &format!("{p}.{name}"), out, inp, true, quant, device);
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(ckpt, &format!("{p}.layer_norm1"), dim, eps, device)?,
                    q_proj: linear("self_attn.q_proj", dim, dim)?,
                    k_proj: linear("self_attn.k_proj", dim, dim)?,
                    v_proj: linear("self_attn.v_proj", dim, dim)?,
                    out_proj: linear("self_attn.out_proj", dim, dim)?,
                    layer_norm2: LayerNorm::load(ckpt, &format!("{p}.layer_norm2"), dim, eps, device)?,
                    fc1: linear("mlp.fc1", hidden, dim)?,
                    fc2: linear("mlp.fc2", dim, hidden)?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Encoder {
            layers,
            heads,
            activation,
        })
    }

    fn forward(&self, x: Tensor<3>, causal: bool) -> Tensor<3> {
        self.forward_layers(x, causal, self.layers.len())
    }

    /// The first `count` layers only (the hidden state a "CLIP skip" reads).
    fn forward_layers(&self, mut x: Tensor<3>, causal: bool, count: usize) -> Tensor<3> {
        for layer in self.layers.iter().take(count) {
            let h = layer.layer_norm1.forward(x.clone());
            x = x + self.self_attention(layer, h, causal);
            let h = layer.layer_norm2.forward(x.clone());
            let h = layer
                .fc2
                .forward(layer.fc1.forward_then(h, Some(self.activation.kernel())));
            x = x + h;
        }
        x
    }

    fn self_attention(&self, layer: &EncoderLayer, x: Tensor<3>, causal: bool) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let (h, dh) = (self.heads, d / self.heads);
        let split = |t: Tensor<3>| t.reshape([b, s, h, dh]).swap_dims(1, 2);
        let q = split(layer.q_proj.forward(x.clone()));
        let k = split(layer.k_proj.forward(x.clone()));
        let v = split(layer.v_proj.forward(x));
        let scale = (dh as f32).powf(-0.5);
        let o = if causal {
            // The text tower's 77 tokens: scores are small, so a masked softmax is cheap.
            let scores = gemm_bt(q, k) * scale;
            let mask = causal_mask(s, &scores.device());
            gemm(softmax(scores + mask.unsqueeze::<4>()), v)
        } else {
            attention(q, k, v, scale)
        };
        layer.out_proj.forward(o.swap_dims(1, 2).reshape([b, s, d]))
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2])
    }
}

/// `-inf` above the diagonal: a position sees itself and earlier ones.
fn causal_mask(s: usize, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..s * s)
        .map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    Tensor::from_data(TensorData::new(values, [s, s]), device)
}

// ---- Towers ----

/// `ClipTextModel` from a transformers `CLIPTextConfig` file (flat: the text fields at the top
/// level), as diffusers pipelines keep it in `text_encoder/config.json`.
pub fn text_config_from_file(path: &Path) -> Result<ClipTextConfig, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::at(path, e))?;
    let config: ClipTextConfig = serde_json::from_str(&text).map_err(|e| ModelError::at(path, e))?;
    Activation::parse(&config.hidden_act).map_err(|e| ModelError::at(path, format!("hidden_act: {e}")))?;
    if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
        return Err(ModelError::at(
            path,
            "hidden_size is not a multiple of num_attention_heads",
        ));
    }
    Ok(config)
}

pub struct ClipTextModel {
    /// `[vocab, D]` in host memory: a prompt reads 77 of its rows, and the whole table (152 MiB
    /// for SD 1.5's encoder, 202 MiB for SD 2's) would not fit one storage binding on phones.
    token_embedding: Vec<f32>,
    vocab: usize,
    width: usize,
    position_embedding: Tensor<2>,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    /// Absent in a bare `CLIPTextModel` (Stable Diffusion's text encoder).
    projection: Option<Linear>,
    eos_token_id: u32,
    context: usize,
}

impl ClipTextModel {
    /// The text tower under `text_model.*`, with `text_projection` when `projection_dim` is given.
    pub fn from_checkpoint(
        t: &ClipTextConfig,
        projection_dim: Option<usize>,
        ckpt: &Checkpoint,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(ClipTextModel {
            token_embedding: ckpt.values(
                "text_model.embeddings.token_embedding.weight",
                &[t.vocab_size, t.hidden_size],
            )?,
            vocab: t.vocab_size,
            width: t.hidden_size,
            position_embedding: ckpt.tensor(
                "text_model.embeddings.position_embedding.weight",
                [t.max_position_embeddings, t.hidden_size],
                device,
            )?,
            encoder: Encoder::load(
                ckpt,
                "text_model.encoder",
                t.num_hidden_layers,
                t.hidden_size,
                t.intermediate_size,
                t.num_attention_heads,
                &t.hidden_act,
                t.layer_norm_eps,
                quant.sensitive(),
                device,
            )?,
            final_layer_norm: LayerNorm::load(
                ckpt,
                "text_model.final_layer_norm",
                t.hidden_size,
                t.layer_norm_eps,
                device,
            )?,
            projection: match projection_dim {
                Some(proj) => Some(Linear::load(
                    ckpt,
                    "text_projection",
                    proj,
                    t.hidden_size,
                    false,
                    quant.sensitive(),
                    device,
                )?),
                None => None,
            },
            eos_token_id: t.eos_token_id,
            context: t.max_position_embeddings,
        })
    }

    /// Loads a diffusers `text_encoder/` folder (transformers `CLIPTextModel`: `config.json` +
    /// `model.safetensors`).
    pub fn load_text_encoder(dir: &Path, quant: Quantization, device: &Device) -> Result<Self, ModelError> {
        let config = text_config_from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::at(
                dir,
                "no model.safetensors (transformers CLIPTextModel layout expected)",
            ));
        }
        Self::from_checkpoint(
            &config,
            None,
            &Checkpoint::open(&weights)?.fitting(device)?,
            quant,
            device,
        )
    }

    /// The per-token states Stable Diffusion conditions on: the output of all layers but the
    /// last `skip` ("CLIP skip"; 0 = the last layer), through the final layer norm. `[B, S, D]`.
    pub fn hidden_states(&self, ids: &[Vec<u32>], skip: usize) -> Result<Tensor<3>, ModelError> {
        let x = self.embed(ids)?;
        let layers = self.encoder.layers.len();
        if skip >= layers {
            return Err(ModelError(format!(
                "CLIP skip {skip} leaves none of the {layers} layers"
            )));
        }
        Ok(self
            .final_layer_norm
            .forward(self.encoder.forward_layers(x, true, layers - skip)))
    }

    /// Token + position embeddings `[B, S, D]` after checking the ids.
    fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>, ModelError> {
        let batch = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if batch == 0 || len == 0 || len > self.context || ids.iter().any(|r| r.len() != len) {
            return Err(ModelError(format!(
                "text input must be 1..={} token ids per row, all rows equally long",
                self.context
            )));
        }
        let vocab = self.vocab as u32;
        if let Some(bad) = ids.iter().flatten().find(|&&t| t >= vocab) {
            return Err(ModelError(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let device = self.position_embedding.device();
        let d = self.width;
        let rows: Vec<f32> = ids
            .iter()
            .flatten()
            .flat_map(|&t| {
                self.token_embedding[t as usize * d..(t as usize + 1) * d]
                    .iter()
                    .copied()
            })
            .collect();
        Ok(Tensor::<3>::from_data(TensorData::new(rows, [batch, len, d]), &device)
            + self.position_embedding.clone().slice([0..len, 0..d]).unsqueeze::<3>())
    }

    /// Embeddings (not normalised) of token-id rows, each as long as the context or shorter
    /// (all rows the same length).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<2>, ModelError> {
        let projection = self
            .projection
            .as_ref()
            .ok_or_else(|| ModelError("this text encoder has no text_projection (a bare CLIPTextModel)".into()))?;
        let x = self.embed(ids)?;
        let [batch, len, d] = x.dims();
        let device = x.device();
        let x = self.final_layer_norm.forward(self.encoder.forward(x, true));
        // transformers' rule: eos_token_id 2 (OpenAI's configs) pools at the highest id, which
        // is the end-of-text token; otherwise at the first end-of-text token.
        let pooled: Vec<i32> = ids
            .iter()
            .enumerate()
            .map(|(row, r)| {
                let pos = if self.eos_token_id == 2 {
                    r.iter()
                        .enumerate()
                        .fold(0, |best, (i, &t)| if t > r[best] { i } else { best })
                } else {
                    r.iter().position(|&t| t == self.eos_token_id).unwrap_or(len - 1)
                };
                (row * len + pos) as i32
            })
            .collect();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(pooled, [batch]), &device);
        let pooled = x.reshape([batch * len, d]).select(0, rows).unsqueeze::<3>();
        Ok(projection.forward(pooled).squeeze_dim::<2>(0))
    }
}

pub struct ClipVisionModel {
    /// `[1, hidden, channels·patch·patch]`: the patch convolution as a GEMM over flattened
    /// non-overlapping patches.
    patch_embedding: Tensor<3>,
    class_embedding: Tensor<1>,
    position_embedding: Tensor<2>,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    projection: Linear,
    patch: usize,
    image_size: usize,
    channels: usize,
}

impl ClipVisionModel {
    /// Embeddings (not normalised) of preprocessed images `[B, C, S, S]`.
    pub fn forward(&self, pixels: Tensor<4>) -> Result<Tensor<2>, ModelError> {
        let [b, c, hgt, wid] = pixels.dims();
        if c != self.channels || hgt != self.image_size || wid != self.image_size {
            return Err(ModelError(format!(
                "image input is [{b}, {c}, {hgt}, {wid}], the model takes [B, {}, {s}, {s}]",
                self.channels,
                s = self.image_size
            )));
        }
        let (p, g) = (self.patch, self.image_size / self.patch);
        let d = self.class_embedding.dims()[0];
        let patches = pixels
            .reshape([b, c, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, g * g, c * p * p]);
        let tokens = gemm_bt(patches, self.patch_embedding.clone());
        let class = self.class_embedding.clone().reshape([1, 1, d]).expand([b, 1, d]);
        let x = Tensor::cat(vec![class, tokens], 1) + self.position_embedding.clone().unsqueeze::<3>();
        let x = self.encoder.forward(self.pre_layrnorm.forward(x), false);
        let pooled = self.post_layernorm.forward(x.slice([0..b, 0..1, 0..d]));
        Ok(self.projection.forward(pooled).squeeze_dim::<2>(1))
    }
}

pub struct Clip {
    pub config: ClipConfig,
    pub text: ClipTextModel,
    pub vision: ClipVisionModel,
}

impl Clip {
    /// Loads `dir/config.json` + `dir/model.safetensors` (Hugging Face's `CLIPModel` layout).
    pub fn load(dir: &Path, quant: Quantization, device: &Device) -> Result<Self, ModelError> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::at(
                dir,
                "no model.safetensors (Hugging Face CLIPModel layout expected)",
            ));
        }
        let ckpt = Checkpoint::open(&weights)?.fitting(device)?;
        Self::from_checkpoint(config, &ckpt, quant, device)
    }

    pub fn from_checkpoint(
        config: ClipConfig,
        ckpt: &Checkpoint,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (t, v, proj) = (&config.text_config, &config.vision_config, config.projection_dim);
        let text = ClipTextModel::from_checkpoint(t, Some(proj), ckpt, quant, device)?;
        let (p, c) = (v.patch_size, v.num_channels);
        let positions = (v.image_size / p).pow(2) + 1;
        let patch = ckpt.values(
            "vision_model.embeddings.patch_embedding.weight",
            &[v.hidden_size, c, p, p],
        )?;
        let vision = ClipVisionModel {
            patch_embedding: Tensor::from_data(TensorData::new(patch, [1, v.hidden_size, c * p * p]), device),
            class_embedding: ckpt.tensor("vision_model.embeddings.class_embedding", [v.hidden_size], device)?,
            position_embedding: ckpt.tensor(
                "vision_model.embeddings.position_embedding.weight",
                [positions, v.hidden_size],
                device,
            )?,
            pre_layrnorm: LayerNorm::load(
                ckpt,
                "vision_model.pre_layrnorm",
                v.hidden_size,
                v.layer_norm_eps,
                device,
            )?,
            encoder: Encoder::load(
                ckpt,
                "vision_model.encoder",
                v.num_hidden_layers,
                v.hidden_size,
                v.intermediate_size,
                v.num_attention_heads,
                &v.hidden_act,
                v.layer_norm_eps,
                quant,
                device,
            )?,
            post_layernorm: LayerNorm::load(
                ckpt,
                "vision_model.post_layernorm",
                v.hidden_size,
                v.layer_norm_eps,
                device,
            )?,
            projection: Linear::load(
                ckpt,
                "visual_projection",
                proj,
                v.hidden_size,
                false,
                quant.sensitive(),
                device,
            )?,
            patch: p,
            image_size: v.image_size,
            channels: c,
        };
        Ok(Clip { config, text, vision })
    }

    /// Bytes held by the linear layers (what quantization shrinks): `(now, in f32)`, i.e. after
    /// and before quantization.
    pub fn linear_bytes(&self) -> (usize, usize) {
        let all = self
            .text
            .encoder
            .linears()
            .chain(self.vision.encoder.linears())
            .chain(self.text.projection.iter())
            .chain([&self.vision.projection]);
        all.fold((0, 0), |(now, f32), l| (now + l.bytes(), f32 + l.f32_bytes()))
    }
}

/// A `[n, d]` batch of embeddings read back as rows scaled to unit L2 norm.
///
/// The norm is taken here, on the host, in one fixed order. On the device it went through burn's
/// reduce, whose autotune picks a summation order by timing its candidates in each process: the
/// same image then scored 0.9545635 in one run and 0.95456344 in the next, and a resumed run did
/// not match an uninterrupted one.
pub fn unit_rows(x: Tensor<2>) -> Result<Vec<Vec<f32>>, ModelError> {
    let [n, d] = x.dims();
    let values = x
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError(format!("reading embeddings back: {e:?}")))?;
    Ok(values.chunks_exact(d.max(1)).take(n).map(unit).collect())
}

/// `v / ‖v‖₂`, the squares summed in f64 from the first element on.
fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    v.iter().map(|&x| (x as f64 / norm) as f32).collect()
}

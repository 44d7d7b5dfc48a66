//! Segment Anything (Kirillov et al., 2023) loading the official checkpoints as published:
//! `sam_vit_b_01ec64.pth` (and ViT-L/H), or a safetensors file with the same keys. The image
//! encoder runs once per image; prompts (points, a box, a low-resolution mask) are decoded
//! against the cached embedding, as `SamPredictor` does.
//!
//! - [`image_encoder`]: the ViT encoder with windowed/global attention and relative positions;
//! - [`tiny_vit`]: MobileSAM's TinyViT-5M encoder (`mobile_sam.pt` loads as published);
//! - [`prompt_encoder`]: points, boxes and mask inputs to sparse and dense embeddings;
//! - [`mask_decoder`]: the two-way transformer, upscaling, three multimask outputs + IoU head;
//! - [`preprocess`]: longest side to 1024 (Pillow bilinear, as torchvision), mean/std, padding,
//!   and the bilinear post-processing back to the original size.

pub mod image_encoder;
pub mod mask_decoder;
pub mod preprocess;
pub mod prompt_encoder;
pub mod tiny_vit;
pub mod transformer;

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
pub use crate::layers::Quantization;
use image_encoder::{ImageEncoderVit, VitConfig};
use mask_decoder::{MaskDecoder, MaskDecoderConfig};
use prompt_encoder::PromptEncoder;
use tiny_vit::{TinyVit, TinyVitConfig};

/// Which image encoder a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub enum EncoderConfig {
    /// SAM's ViT-B/L/H.
    Vit(VitConfig),
    /// MobileSAM's TinyViT.
    TinyVit(TinyVitConfig),
}

impl EncoderConfig {
    pub fn img_size(&self) -> usize {
        match self {
            EncoderConfig::Vit(c) => c.img_size,
            EncoderConfig::TinyVit(c) => c.img_size,
        }
    }

    /// "ViT (768 wide, 12 blocks)" or "TinyViT (64/128/160/320 wide, 2/2/6/2 blocks)".
    pub fn describe(&self) -> String {
        let join = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("/");
        match self {
            EncoderConfig::Vit(c) => format!("ViT ({} wide, {} blocks)", c.embed_dim, c.depth),
            EncoderConfig::TinyVit(c) => {
                format!("TinyViT ({} wide, {} blocks)", join(&c.embed_dims), join(&c.depths))
            }
        }
    }
}

pub enum ImageEncoder {
    Vit(ImageEncoderVit),
    TinyVit(TinyVit),
}

impl ImageEncoder {
    fn forward(&self, pixels: Tensor<4>) -> Tensor<4> {
        match self {
            ImageEncoder::Vit(e) => e.forward(pixels),
            ImageEncoder::TinyVit(e) => e.forward(pixels),
        }
    }

    fn linears(&self) -> Vec<&crate::layers::Linear> {
        match self {
            ImageEncoder::Vit(e) => e.linears(),
            ImageEncoder::TinyVit(e) => e.linears(),
        }
    }
}
pub use prompt_encoder::{Point, PointLabel};

/// `_build_sam`'s arguments: the encoder's, and the fixed prompt/decoder sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct SamConfig {
    pub encoder: EncoderConfig,
    pub prompt_embed_dim: usize,
    pub mask_in_chans: usize,
    pub decoder: MaskDecoderConfig,
}

impl SamConfig {
    pub fn vit_b() -> Self {
        Self::with_encoder(EncoderConfig::Vit(VitConfig::vit_b()))
    }

    pub fn mobile_sam() -> Self {
        Self::with_encoder(EncoderConfig::TinyVit(TinyVitConfig::mobile_sam()))
    }

    fn with_encoder(encoder: EncoderConfig) -> Self {
        SamConfig {
            encoder,
            prompt_embed_dim: 256,
            mask_in_chans: 16,
            decoder: MaskDecoderConfig::default(),
        }
    }

    /// The configuration of the checkpoint at hand (SAM checkpoints carry no config file; the
    /// shapes say which model it is).
    pub fn infer(ckpt: &Checkpoint) -> Result<Self, ModelError> {
        let encoder = if ckpt.contains("image_encoder.patch_embed.seq.0.c.weight") {
            EncoderConfig::TinyVit(TinyVitConfig::infer(ckpt)?)
        } else if ckpt.contains("image_encoder.patch_embed.proj.weight") {
            EncoderConfig::Vit(VitConfig::infer(ckpt)?)
        } else {
            return Err(ModelError::at(
                ckpt.path(),
                "not a Segment Anything checkpoint: neither SAM's ViT (image_encoder.patch_embed.proj.weight) \
                 nor MobileSAM's TinyViT (image_encoder.patch_embed.seq.0.c.weight)",
            ));
        };
        let mut config = Self::with_encoder(encoder);
        let depth = (0..)
            .take_while(|i| ckpt.contains(&format!("mask_decoder.transformer.layers.{i}.norm1.weight")))
            .count();
        config.decoder.depth = depth;
        // `build_sam` fixes the prompt and decoder widths (256, MLP 2048); smaller SAMs such as
        // the embedded default's are read off the shapes. The head count is not in the shapes
        // and stays SAM's 8. A missing key keeps SAM's value, so the loader's error names the
        // key and the shape it expected.
        let keys = ckpt.keys();
        let dim = |key: &str, axis: usize, default: usize| {
            keys.iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, s)| s.get(axis).copied())
                .unwrap_or(default)
        };
        let width = dim("mask_decoder.iou_token.weight", 1, config.prompt_embed_dim);
        config.prompt_embed_dim = width;
        config.mask_in_chans = dim("prompt_encoder.mask_downscaling.3.weight", 0, config.mask_in_chans);
        config.decoder.transformer_dim = width;
        config.decoder.mlp_dim = dim(
            "mask_decoder.transformer.layers.0.mlp.lin1.weight",
            0,
            config.decoder.mlp_dim,
        );
        config.decoder.iou_head_hidden_dim = dim(
            "mask_decoder.iou_prediction_head.layers.0.weight",
            0,
            config.decoder.iou_head_hidden_dim,
        );
        let out_chans = match &config.encoder {
            EncoderConfig::Vit(c) => Some(c.out_chans),
            EncoderConfig::TinyVit(_) => None,
        };
        if width % (2 * config.decoder.num_heads) != 0 || out_chans.is_some_and(|c| c != width) {
            return Err(ModelError::at(
                ckpt.path(),
                format!(
                    "inconsistent SAM widths: decoder {width} (must split into {} heads after 2× downsampling), \
                     image embedding {out_chans:?}",
                    config.decoder.num_heads
                ),
            ));
        }
        Ok(config)
    }
}

/// An image as the decoder sees it: its embedding and the sizes needed to map prompts in and
/// masks out.
pub struct ImageEmbedding {
    /// `[1, g², 256]`, token-major.
    pub embedding: Tensor<3>,
    /// `(height, width)` of the image given.
    pub original_size: (usize, usize),
    /// `(height, width)` after resizing the longest side to the encoder's input size.
    pub input_size: (usize, usize),
}

/// A prompt in original-image pixel coordinates.
#[derive(Clone, Debug, Default)]
pub struct Prompt {
    pub points: Vec<Point>,
    /// `[x0, y0, x1, y1]`.
    pub bbox: Option<[f32; 4]>,
    /// Low-resolution mask logits `[256 × 256]` (a previous prediction's), row-major.
    pub mask: Option<Vec<f32>>,
}

pub struct Prediction {
    /// Mask logits at the original image size, one `height × width` plane per mask.
    pub masks: Vec<Vec<f32>>,
    /// The decoder's own estimate of each mask's IoU.
    pub iou: Vec<f32>,
    /// `[n, 256, 256]` logits, for feeding back as a mask prompt.
    pub low_res: Vec<Vec<f32>>,
    pub size: (usize, usize),
}

pub struct Sam {
    pub config: SamConfig,
    pub image_encoder: ImageEncoder,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
    device: Device,
}

impl Sam {
    /// Loads a SAM checkpoint (`.pth` as published, or safetensors with the same keys).
    pub fn load(path: &Path, quant: Quantization, device: &Device) -> Result<Self, ModelError> {
        let ckpt = Checkpoint::open(path)?.fitting(device)?;
        let config = SamConfig::infer(&ckpt)?;
        Self::from_checkpoint(config, &ckpt, quant, device)
    }

    pub fn from_checkpoint(
        config: SamConfig,
        ckpt: &Checkpoint,
        quant: Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (image_encoder, grid) = match &config.encoder {
            EncoderConfig::Vit(c) => (
                ImageEncoder::Vit(ImageEncoderVit::load(ckpt, c.clone(), quant, device)?),
                c.img_size / c.patch_size,
            ),
            EncoderConfig::TinyVit(c) => {
                let e = TinyVit::load(ckpt, c.clone(), quant, device)?;
                let grid = e.grid();
                (ImageEncoder::TinyVit(e), grid)
            }
        };
        Ok(Sam {
            image_encoder,
            prompt_encoder: PromptEncoder::load(
                ckpt,
                config.prompt_embed_dim,
                grid,
                config.encoder.img_size(),
                config.mask_in_chans,
                device,
            )?,
            mask_decoder: MaskDecoder::load(ckpt, config.decoder.clone(), quant, device)?,
            config,
            device: device.clone(),
        })
    }

    fn grid(&self) -> usize {
        self.prompt_encoder.grid()
    }

    /// Runs the image encoder (`SamPredictor.set_image`).
    pub fn embed_image(&self, image: &RgbImage) -> Result<ImageEmbedding, ModelError> {
        let size = self.config.encoder.img_size();
        let input = preprocess::prepare(image, size)?;
        let pixels = Tensor::from_data(TensorData::new(input.pixels, [1, 3, size, size]), &self.device);
        Ok(self.embed_pixels(pixels, input.original_size, input.input_size))
    }

    /// The encoder on already preprocessed pixels `[1, 3, S, S]`.
    pub fn embed_pixels(
        &self,
        pixels: Tensor<4>,
        original_size: (usize, usize),
        input_size: (usize, usize),
    ) -> ImageEmbedding {
        let features = self.image_encoder.forward(pixels);
        let [_, c, g, _] = features.dims();
        ImageEmbedding {
            embedding: features.reshape([1, c, g * g]).swap_dims(1, 2),
            original_size,
            input_size,
        }
    }

    /// Decodes one prompt (`SamPredictor.predict` with `return_logits=True`): with `multimask`
    /// the three disambiguating masks, otherwise the single-mask output.
    pub fn predict(&self, image: &ImageEmbedding, prompt: &Prompt, multimask: bool) -> Result<Prediction, ModelError> {
        let (low_res, iou) = self.decode(image, prompt, multimask)?;
        let side = self.prompt_encoder.mask_input_size();
        let masks = low_res
            .iter()
            .map(|m| {
                preprocess::postprocess(
                    m,
                    side,
                    self.config.encoder.img_size(),
                    image.input_size,
                    image.original_size,
                )
            })
            .collect();
        Ok(Prediction {
            masks,
            iou,
            low_res,
            size: image.original_size,
        })
    }

    /// The mask decoder alone: low-resolution logits (`256 × 256` planes) and predicted IoUs of
    /// the chosen masks, before post-processing.
    #[allow(clippy::type_complexity)]
    pub fn decode(
        &self,
        image: &ImageEmbedding,
        prompt: &Prompt,
        multimask: bool,
    ) -> Result<(Vec<Vec<f32>>, Vec<f32>), ModelError> {
        let (oh, ow) = image.original_size;
        let (ih, iw) = image.input_size;
        let (sx, sy) = (iw as f32 / ow as f32, ih as f32 / oh as f32);
        let points: Vec<Point> = prompt
            .points
            .iter()
            .map(|p| Point {
                x: p.x * sx,
                y: p.y * sy,
                label: p.label,
            })
            .collect();
        let bbox = prompt.bbox.map(|[x0, y0, x1, y1]| [x0 * sx, y0 * sy, x1 * sx, y1 * sy]);
        if points.is_empty() && bbox.is_none() && prompt.mask.is_none() {
            return Err(ModelError("a SAM prompt needs points, a box or a mask".into()));
        }
        let side = self.prompt_encoder.mask_input_size();
        let mask = match &prompt.mask {
            Some(m) if m.len() != side * side => {
                return Err(ModelError(format!(
                    "mask prompt has {} values, the model takes {side}×{side}",
                    m.len()
                )));
            }
            Some(m) => Some(Tensor::from_data(
                TensorData::new(m.clone(), [1, 1, side, side]),
                &self.device,
            )),
            None => None,
        };
        let sparse = self.prompt_encoder.sparse(&points, bbox, &self.device);
        let dense = self.prompt_encoder.dense(mask);
        let (logits, iou) = self.mask_decoder.forward(
            image.embedding.clone(),
            self.prompt_encoder.dense_pe.clone(),
            sparse,
            dense,
            self.grid(),
        );
        let n = self.config.decoder.num_multimask_outputs + 1;
        let low = to_vec(logits);
        let iou = to_vec(iou);
        let chosen: Vec<usize> = if multimask { (1..n).collect() } else { vec![0] };
        let plane = side * side;
        let low_res: Vec<Vec<f32>> = chosen
            .iter()
            .map(|&i| low[i * plane..(i + 1) * plane].to_vec())
            .collect();
        Ok((low_res, chosen.iter().map(|&i| iou[i]).collect()))
    }

    /// Bytes held by the linear layers (encoder and decoder): `(now, in f32)`, i.e. after and
    /// before quantization.
    pub fn linear_bytes(&self) -> (usize, usize) {
        let all = self
            .image_encoder
            .linears()
            .into_iter()
            .chain(self.mask_decoder.linears());
        all.fold((0, 0), |(now, f32), l| (now + l.bytes(), f32 + l.f32_bytes()))
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_else(|e| panic!("reading SAM output: {e:?}"))
}

//! SAM's prompt encoder: points and box corners become sparse tokens (random-Fourier positional
//! encoding plus a learned embedding per label), a low-resolution mask becomes a dense map
//! (two stride-2 convolutions and a 1×1), and "no mask" a learned constant.
//!
//! Sparse tokens are a handful of 256-vectors, so they are computed on the CPU in f64 and
//! uploaded; the dense positional encoding of the embedding grid is computed once at load.

use burn::tensor::{Device, Tensor, TensorData};
use divergen_kernels::gelu;

use crate::checkpoint::Checkpoint;
use crate::error::ModelError;
use crate::layers::{LayerNorm, Linear, Quantization};

/// A point prompt in the model's input frame (the resized image, before padding).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub x: f32,
    pub y: f32,
    pub label: PointLabel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointLabel {
    Background,
    Foreground,
    /// The padding point SAM appends when no box is given; embedded as "not a point".
    Padding,
    BoxTopLeft,
    BoxBottomRight,
}

impl PointLabel {
    /// SAM's integer labels: -1 padding, 0 background, 1 foreground, 2/3 box corners.
    pub fn from_sam(label: i32) -> Option<Self> {
        match label {
            -1 => Some(PointLabel::Padding),
            0 => Some(PointLabel::Background),
            1 => Some(PointLabel::Foreground),
            2 => Some(PointLabel::BoxTopLeft),
            3 => Some(PointLabel::BoxBottomRight),
            _ => None,
        }
    }
}

pub struct PromptEncoder {
    pub embed_dim: usize,
    /// `[2, embed_dim/2]` random frequencies.
    gaussian: Vec<f32>,
    /// Background, foreground, box top-left, box bottom-right.
    point_embeddings: [Vec<f32>; 4],
    not_a_point: Vec<f32>,
    no_mask: Tensor<3>,
    mask_conv1: Linear,
    mask_norm1: LayerNorm,
    mask_conv2: Linear,
    mask_norm2: LayerNorm,
    mask_conv3: Linear,
    /// `[1, grid², embed_dim]`: the positional encoding of every embedding cell.
    pub dense_pe: Tensor<3>,
    input_size: usize,
    grid: usize,
}

impl PromptEncoder {
    pub fn load(
        ckpt: &Checkpoint,
        embed_dim: usize,
        grid: usize,
        input_size: usize,
        mask_in_chans: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let pre = "prompt_encoder";
        let half = embed_dim / 2;
        let embedding = |name: &str| ckpt.values(&format!("{pre}.{name}.weight"), &[1, embed_dim]);
        let gaussian = ckpt.values(
            &format!("{pre}.pe_layer.positional_encoding_gaussian_matrix"),
            &[2, half],
        )?;
        let c4 = mask_in_chans / 4;
        let conv = |i: usize, out: usize, inp: usize, k: usize| -> Result<Linear, ModelError> {
            let w = ckpt.values(&format!("{pre}.mask_downscaling.{i}.weight"), &[out, inp, k, k])?;
            let b = ckpt.values(&format!("{pre}.mask_downscaling.{i}.bias"), &[out])?;
            Ok(Linear::from_values(
                w,
                Some(b),
                out,
                inp * k * k,
                Quantization::None,
                device,
            ))
        };
        let norm = |i: usize, c: usize| LayerNorm::load(ckpt, &format!("{pre}.mask_downscaling.{i}"), c, 1e-6, device);
        let mut encoder = PromptEncoder {
            embed_dim,
            point_embeddings: [
                embedding("point_embeddings.0")?,
                embedding("point_embeddings.1")?,
                embedding("point_embeddings.2")?,
                embedding("point_embeddings.3")?,
            ],
            not_a_point: embedding("not_a_point_embed")?,
            no_mask: Tensor::from_data(TensorData::new(embedding("no_mask_embed")?, [1, 1, embed_dim]), device),
            mask_conv1: conv(0, c4, 1, 2)?,
            mask_norm1: norm(1, c4)?,
            mask_conv2: conv(3, mask_in_chans, c4, 2)?,
            mask_norm2: norm(4, mask_in_chans)?,
            mask_conv3: conv(6, embed_dim, mask_in_chans, 1)?,
            gaussian,
            dense_pe: Tensor::zeros([1, 1, 1], device),
            input_size,
            grid,
        };
        let cells: Vec<[f64; 2]> = (0..grid * grid)
            .map(|i| {
                let (y, x) = (i / grid, i % grid);
                [(x as f64 + 0.5) / grid as f64, (y as f64 + 0.5) / grid as f64]
            })
            .collect();
        let pe: Vec<f32> = cells.iter().flat_map(|&c| encoder.encode(c)).collect();
        encoder.dense_pe = Tensor::from_data(TensorData::new(pe, [1, grid * grid, embed_dim]), device);
        Ok(encoder)
    }

    /// `PositionEmbeddingRandom._pe_encoding` of one point in [0, 1]²: sin and cos of
    /// 2π·((2p - 1)·G).
    fn encode(&self, p: [f64; 2]) -> Vec<f32> {
        random_fourier(&self.gaussian, p)
    }

    /// Sparse tokens `[1, N, embed_dim]` for points (coordinates in the input frame) and an
    /// optional box `[x0, y0, x1, y1]`, with SAM's padding point when there is no box.
    pub fn sparse(&self, points: &[Point], bbox: Option<[f32; 4]>, device: &Device) -> Tensor<3> {
        let mut all: Vec<Point> = points
            .iter()
            .map(|p| Point {
                x: p.x + 0.5,
                y: p.y + 0.5,
                label: p.label,
            })
            .collect();
        if !points.is_empty() && bbox.is_none() {
            all.push(Point {
                x: 0.0,
                y: 0.0,
                label: PointLabel::Padding,
            });
        }
        if let Some([x0, y0, x1, y1]) = bbox {
            all.push(Point {
                x: x0 + 0.5,
                y: y0 + 0.5,
                label: PointLabel::BoxTopLeft,
            });
            all.push(Point {
                x: x1 + 0.5,
                y: y1 + 0.5,
                label: PointLabel::BoxBottomRight,
            });
        }
        let size = self.input_size as f64;
        let tokens: Vec<f32> = all
            .iter()
            .flat_map(|p| {
                let pe = self.encode([p.x as f64 / size, p.y as f64 / size]);
                let learned = match p.label {
                    PointLabel::Padding => return self.not_a_point.clone(),
                    PointLabel::Background => &self.point_embeddings[0],
                    PointLabel::Foreground => &self.point_embeddings[1],
                    PointLabel::BoxTopLeft => &self.point_embeddings[2],
                    PointLabel::BoxBottomRight => &self.point_embeddings[3],
                };
                pe.iter().zip(learned).map(|(a, b)| a + b).collect::<Vec<f32>>()
            })
            .collect();
        Tensor::from_data(TensorData::new(tokens, [1, all.len(), self.embed_dim]), device)
    }

    /// Dense embedding `[1, grid², embed_dim]` (token-major): the mask input downscaled 4×, or
    /// the "no mask" embedding broadcast over the grid.
    pub fn dense(&self, mask: Option<Tensor<4>>) -> Tensor<3> {
        let Some(mask) = mask else {
            return self.no_mask.clone();
        };
        let g = self.grid;
        let m = 2 * g; // after the first stride-2 convolution
        let c4 = self.mask_conv1.out_features();
        // Non-overlapping 2×2 convolutions are GEMMs over flattened patches.
        let x = mask
            .reshape([1, 1, m, 2, m, 2])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([1, m * m, 4]);
        let x = gelu(self.mask_norm1.forward(self.mask_conv1.forward(x)), false);
        let x = x
            .reshape([1, g, 2, g, 2, c4])
            .permute([0, 1, 3, 5, 2, 4])
            .reshape([1, g * g, c4 * 4]);
        let x = gelu(self.mask_norm2.forward(self.mask_conv2.forward(x)), false);
        self.mask_conv3.forward(x)
    }

    /// Side of the image-embedding grid.
    pub fn grid(&self) -> usize {
        self.grid
    }

    /// Side of the low-resolution mask input (4× the embedding grid).
    pub fn mask_input_size(&self) -> usize {
        4 * self.grid
    }
}

/// `PositionEmbeddingRandom._pe_encoding` of one point in [0, 1]² with the `[2, D/2]` matrix
/// `gaussian` (row-major): sin and cos of 2π·((2p - 1)·G), `D` values.
pub fn random_fourier(gaussian: &[f32], p: [f64; 2]) -> Vec<f32> {
    let half = gaussian.len() / 2;
    let (x, y) = (2.0 * p[0] - 1.0, 2.0 * p[1] - 1.0);
    let angles: Vec<f64> = (0..half)
        .map(|j| 2.0 * std::f64::consts::PI * (x * gaussian[j] as f64 + y * gaussian[half + j] as f64))
        .collect();
    angles
        .iter()
        .map(|a| a.sin() as f32)
        .chain(angles.iter().map(|a| a.cos() as f32))
        .collect()
}

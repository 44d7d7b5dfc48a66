//! Training the embedded default's tiny models with burn's autodiff on the CPU, exported in the
//! layouts the real-model loaders read.

pub mod clip;
pub mod diffusion;
pub mod sam;

use std::path::Path;

use burn::nn::{LayerNorm, Linear};
use burn::tensor::Tensor;

use crate::checkpoint::ModelError;

/// One exported tensor: state-dict key, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A state dict being assembled for export, in PyTorch's conventions (Linear weights
/// `[out, in]`).
#[derive(Default)]
pub struct StateDict(pub Vec<NamedTensor>);

impl StateDict {
    pub fn tensor<const D: usize>(&mut self, key: impl Into<String>, t: Tensor<D>) -> Result<(), ModelError> {
        let key = key.into();
        let shape = t.dims().to_vec();
        let values = t
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| ModelError(format!("{key}: {e:?}")))?;
        self.0.push((key, shape, values));
        Ok(())
    }

    /// `nn.Linear`: burn stores `[in, out]`, PyTorch `[out, in]`.
    pub fn linear(&mut self, key: &str, l: &Linear) -> Result<(), ModelError> {
        self.tensor(format!("{key}.weight"), l.weight.val().transpose())?;
        if let Some(b) = &l.bias {
            self.tensor(format!("{key}.bias"), b.val())?;
        }
        Ok(())
    }

    pub fn norm(&mut self, key: &str, n: &LayerNorm) -> Result<(), ModelError> {
        self.tensor(format!("{key}.weight"), n.gamma.val())?;
        if let Some(b) = &n.beta {
            self.tensor(format!("{key}.bias"), b.val())?;
        }
        Ok(())
    }

    /// Writes the tensors as f32 safetensors.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        use safetensors::{Dtype, tensor::TensorView};
        let bytes: Vec<Vec<u8>> = self
            .0
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = self
            .0
            .iter()
            .zip(&bytes)
            .map(|((k, shape, _), b)| {
                TensorView::new(Dtype::F32, shape.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| ModelError::at(path, format!("{k}: {e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize_to_file(views, None, path).map_err(|e| ModelError::at(path, format!("{e:?}")))
    }
}

/// Adam with a 50-step warm-up and a cosine decay to 5 % of `peak`.
pub fn learning_rate(peak: f64, step: usize, steps: usize) -> f64 {
    let warm = ((step + 1) as f64 / 50.0).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos());
    peak * warm * (0.05 + 0.95 * cosine)
}

/// A scalar loss's value, for logging.
pub fn scalar(t: &Tensor<1>) -> f64 {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN) as f64
}

/// Mean loss over each tenth of a run.
pub fn by_tenth(losses: &[f64]) -> Vec<f64> {
    let tenth = (losses.len() / 10).max(1);
    losses
        .chunks(tenth)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect()
}

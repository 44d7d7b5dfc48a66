//! `divergen-train`: the embedded default's tiny models trained with burn's autodiff on the CPU
//! from the procedural domain, exported in the layouts the real-model loaders read, and measured
//! on the domain's held-out data. Only this crate enables burn's `autodiff` and `optim`, so the
//! device binary `divergen` links no training stack.

pub mod clip;
pub mod corpus;
pub mod diffusion;
pub mod eval;
pub mod sam;
pub mod sam_examples;

use std::path::Path;

use burn::nn::{LayerNorm, Linear};
use burn::tensor::Tensor;

use divergen_models::error::ModelError;

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

    /// One step of an exponential moving average: every value moves to
    /// `decay · self + (1 − decay) · current`. `current` must be the same model's export.
    pub fn blend_toward(&mut self, current: &StateDict, decay: f32) -> Result<(), ModelError> {
        if self.0.len() != current.0.len() {
            return Err(ModelError(format!(
                "averaging {} tensors with {}",
                self.0.len(),
                current.0.len()
            )));
        }
        for ((key, shape, avg), (other_key, other_shape, now)) in self.0.iter_mut().zip(&current.0) {
            if key != other_key || shape != other_shape {
                return Err(ModelError(format!(
                    "averaging {key} {shape:?} with {other_key} {other_shape:?}"
                )));
            }
            for (a, n) in avg.iter_mut().zip(now) {
                *a = decay * *a + (1.0 - decay) * n;
            }
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
        divergen_models::checkpoint::write_safetensors(views, path)
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

/// What a tagged parameter is filled with.
#[derive(Clone, Copy)]
enum Tag {
    /// Every element holds the parameter's index in visiting order.
    Index,
    /// Every element holds its own flat position in the parameter.
    Position,
}

struct Tagger {
    tag: Tag,
    visited: usize,
    shapes: Vec<Vec<usize>>,
}

impl burn::module::ModuleMapper for Tagger {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let index = self.visited;
        self.visited += 1;
        let tag = self.tag;
        param.map(|t| {
            let dims: [usize; D] = t.dims();
            let n = dims.iter().product::<usize>();
            self.shapes.push(dims.to_vec());
            let values: Vec<f32> = match tag {
                Tag::Index => vec![index as f32; n],
                Tag::Position => (0..n).map(|p| p as f32).collect(),
            };
            Tensor::from_data(burn::tensor::TensorData::new(values, dims), &t.device())
        })
    }
}

struct Loader {
    visited: usize,
    values: Vec<Vec<f32>>,
}

impl burn::module::ModuleMapper for Loader {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let values = std::mem::take(&mut self.values[self.visited]);
        self.visited += 1;
        param.map(|t| {
            let trained = t.is_require_grad();
            let loaded = Tensor::from_data(burn::tensor::TensorData::new(values, t.dims()), &t.device());
            if trained { loaded.require_grad() } else { loaded }
        })
    }
}

/// Reads a file written from `export` back into `model`, so training can resume from shipped
/// weights. Rather than a second, hand-kept key list (which would drift from the export), it
/// runs `export` twice on tagged copies of the model: once with each parameter filled with its
/// index, once with each element holding its own position. That tells, for every exported
/// value, which parameter and element it came from, through whatever transposes the export
/// applies.
pub fn load_exported<M: burn::module::Module>(
    model: M,
    export: impl Fn(&M) -> Result<StateDict, ModelError>,
    path: &Path,
) -> Result<M, ModelError> {
    let tagged = |tag: Tag| -> Result<(StateDict, Vec<Vec<usize>>), ModelError> {
        let mut tagger = Tagger {
            tag,
            visited: 0,
            shapes: Vec::new(),
        };
        let copy = model.clone().map(&mut tagger);
        Ok((export(&copy)?, tagger.shapes))
    };
    let (by_index, shapes) = tagged(Tag::Index)?;
    let (by_position, _) = tagged(Tag::Position)?;
    if let Some(big) = shapes.iter().find(|s| s.iter().product::<usize>() >= 1 << 24) {
        return Err(ModelError(format!(
            "a parameter of shape {big:?} is too large to tag with f32 positions"
        )));
    }
    let checkpoint = divergen_models::checkpoint::Checkpoint::open(path)?;
    let mut values: Vec<Vec<f32>> = shapes.iter().map(|s| vec![f32::NAN; s.iter().product()]).collect();
    let mut filled: Vec<usize> = vec![0; shapes.len()];
    for ((key, shape, indices), (_, _, positions)) in by_index.0.iter().zip(&by_position.0) {
        let index = indices.first().copied().unwrap_or(0.0);
        if indices.iter().any(|&i| i != index) {
            return Err(ModelError(format!(
                "{key} is exported from more than one parameter; it cannot be read back"
            )));
        }
        let target = &mut values[index as usize];
        let stored = checkpoint.values(key, shape)?;
        for (&p, v) in positions.iter().zip(stored) {
            target[p as usize] = v;
        }
        filled[index as usize] += positions.len();
    }
    if let Some(i) = (0..shapes.len()).find(|&i| filled[i] != values[i].len()) {
        return Err(ModelError::at(
            path,
            format!(
                "parameter {i} (shape {:?}) is not fully covered by the exported keys",
                shapes[i]
            ),
        ));
    }
    Ok(model.map(&mut Loader { visited: 0, values }))
}

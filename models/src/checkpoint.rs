//! Reading safetensors checkpoints with errors that name the file, the key, and what was
//! expected: a user pointing at the wrong file learns exactly what is wrong.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

#[derive(Debug)]
pub struct ModelError(pub String);

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ModelError {}

impl ModelError {
    pub fn at(path: &Path, what: impl fmt::Display) -> Self {
        ModelError(format!("{}: {what}", path.display()))
    }
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A whole safetensors file in memory with its index.
pub struct Checkpoint {
    path: PathBuf,
    bytes: Vec<u8>,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::at(path, e))?;
        let (header, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| ModelError::at(path, format!("not a valid safetensors file ({e:?})")))?;
        let data_start = 8 + header;
        let mut entries = HashMap::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
            if end > bytes.len() {
                return Err(ModelError::at(
                    path,
                    format!("tensor {name} runs past the end of the file (truncated?)"),
                ));
            }
            entries.insert(
                name,
                Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                },
            );
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            bytes,
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The tensor under `key` as f32 (f32, f16 and bf16 are read), after checking its shape.
    pub fn values(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| ModelError::at(&self.path, format!("missing tensor {key} (expected shape {shape:?})")))?;
        if entry.shape != shape {
            return Err(ModelError::at(
                &self.path,
                format!("tensor {key} has shape {:?}, expected {shape:?}", entry.shape),
            ));
        }
        let raw = &self.bytes[entry.start..entry.end];
        let values: Vec<f32> = match entry.dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::at(
                    &self.path,
                    format!("tensor {key} is {other:?}; expected a float tensor (F32, F16 or BF16)"),
                ));
            }
        };
        if values.len() != shape.iter().product::<usize>() {
            return Err(ModelError::at(
                &self.path,
                format!("tensor {key} holds {} values for shape {shape:?}", values.len()),
            ));
        }
        Ok(values)
    }

    pub fn tensor<const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, ModelError> {
        let values = self.values(key, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

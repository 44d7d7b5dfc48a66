//! Reading checkpoints (safetensors, and PyTorch's `.pth`/`.pt` through burn-store's pickle
//! reader) with errors that name the file, the key, and what was expected: a user pointing at
//! the wrong file learns exactly what is wrong.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::ModelError;

/// The `__metadata__` of every safetensors file divergen writes. transformers and diffusers read
/// `metadata.get("format")` when loading and fail on a file that has no metadata at all.
pub fn safetensors_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes tensors as a safetensors file with [`safetensors_metadata`], through a temporary file
/// renamed into place, so a failure never leaves a half-written checkpoint under `path`.
pub fn write_safetensors<S, V>(tensors: impl IntoIterator<Item = (S, V)>, path: &Path) -> Result<(), ModelError>
where
    S: AsRef<str> + Ord + fmt::Display,
    V: safetensors::View,
{
    let bytes = safetensors::serialize(tensors, Some(safetensors_metadata()))
        .map_err(|e| ModelError::at(path, format!("{e:?}")))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ModelError::at(path, e)
        })
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

enum Source {
    /// The whole file in memory with its index.
    Safetensors {
        bytes: Vec<u8>,
        entries: HashMap<String, Entry>,
    },
    /// Metadata only; each tensor is read from the file when asked for.
    Pytorch(HashMap<String, pytorch_reader::Tensor>),
    /// Every key at whatever shape is asked for, filled by [`crate::recipe`]: full-size models
    /// with random weights for benchmarks, without writing gigabytes of checkpoint first.
    Recipe,
}

/// A checkpoint's tensors by key, whatever the file format.
/// Tensors the loaders keep in host memory.
const HOST_RESIDENT: [&str; 1] = ["embeddings.token_embedding.weight"];

pub struct Checkpoint {
    path: PathBuf,
    source: Source,
}

impl Checkpoint {
    /// Opens a safetensors file or a PyTorch checkpoint (`torch.save` of a state dict, ZIP or
    /// legacy), told apart by content, not by name.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let mut head = [0u8; 9];
        let n = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .map_err(|e| ModelError::at(path, e))?;
        // safetensors: a little-endian header length, then the JSON header.
        if n == 9 && head[8] == b'{' {
            Self::open_safetensors(path)
        } else {
            Self::open_pytorch(path)
        }
    }

    /// A checkpoint that holds every key at the shape its loader asks for, filled with the
    /// recipe's deterministic random values. For loaders given an explicit config (it has no
    /// key list to infer one from).
    pub fn recipe() -> Self {
        Checkpoint {
            path: PathBuf::from("<recipe weights>"),
            source: Source::Recipe,
        }
    }

    fn open_safetensors(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::at(path, e))?;
        let (header, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => ModelError::at(
                path,
                "the file is shorter than its safetensors header says (truncated?)",
            ),
            e => ModelError::at(path, format!("not a valid safetensors file ({e:?})")),
        })?;
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
            source: Source::Safetensors { bytes, entries },
        })
    }

    fn open_pytorch(path: &Path) -> Result<Self, ModelError> {
        let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| {
            ModelError::at(
                path,
                format!("neither a safetensors file nor a readable PyTorch checkpoint ({e})"),
            )
        })?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            source: Source::Pytorch(reader.into_tensors()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, key: &str) -> bool {
        match &self.source {
            Source::Safetensors { entries, .. } => entries.contains_key(key),
            Source::Pytorch(tensors) => tensors.contains_key(key),
            Source::Recipe => true,
        }
    }

    /// Every key with its shape, sorted.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut keys: Vec<(String, Vec<usize>)> = match &self.source {
            Source::Safetensors { entries, .. } => entries.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect(),
            Source::Pytorch(tensors) => tensors.iter().map(|(k, t)| (k.clone(), t.shape().to_vec())).collect(),
            Source::Recipe => Vec::new(),
        };
        keys.sort();
        keys
    }

    /// Bytes the tensors take on the device once loaded as f32, from the header alone: what a
    /// memory plan budgets for before loading. CLIP's token table is left out: it stays in host
    /// memory (a prompt reads 77 of its rows).
    pub fn f32_bytes(&self) -> u64 {
        self.keys()
            .iter()
            .filter(|(k, _)| !HOST_RESIDENT.iter().any(|h| k.ends_with(h)))
            .map(|(_, shape)| shape.iter().product::<usize>() as u64 * 4)
            .sum()
    }

    /// `self` if every tensor the device will hold fits one of its bindings (burn binds each
    /// tensor whole); else an error naming the first that does not, rather than a model that
    /// silently computes nothing. Quantized layers only get smaller, so f32 is the bound.
    pub fn fitting(self, device: &Device) -> Result<Self, ModelError> {
        let Some(limit) = divergen_kernels::device::max_tensor_bytes(device) else {
            return Ok(self);
        };
        let too_large = self
            .keys()
            .into_iter()
            .filter(|(k, _)| !HOST_RESIDENT.iter().any(|h| k.ends_with(h)))
            .map(|(k, shape)| (k, shape.iter().product::<usize>() as u64 * 4))
            .find(|(_, bytes)| *bytes > limit);
        match too_large {
            None => Ok(self),
            Some((key, bytes)) => Err(ModelError::at(
                &self.path,
                format!(
                    "tensor {key} takes {} MiB as f32, more than the {} MiB this device holds per tensor",
                    bytes.div_ceil(1 << 20),
                    limit.div_ceil(1 << 20)
                ),
            )),
        }
    }

    fn missing(&self, key: &str, shape: &[usize]) -> ModelError {
        ModelError::at(&self.path, format!("missing tensor {key} (expected shape {shape:?})"))
    }

    fn wrong_shape(&self, key: &str, found: &[usize], shape: &[usize]) -> ModelError {
        ModelError::at(
            &self.path,
            format!("tensor {key} has shape {found:?}, expected {shape:?}"),
        )
    }

    /// The tensor under `key` as f32 (f32, f16 and bf16 are read; PyTorch files also f64),
    /// after checking its shape.
    pub fn values(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let values = match &self.source {
            Source::Recipe => crate::recipe::tensor(key, shape),
            Source::Safetensors { bytes, entries } => {
                let entry = entries.get(key).ok_or_else(|| self.missing(key, shape))?;
                if entry.shape != shape {
                    return Err(self.wrong_shape(key, &entry.shape, shape));
                }
                let raw = &bytes[entry.start..entry.end];
                match entry.dtype {
                    Dtype::F32 => decode_f32(raw),
                    Dtype::F16 => decode_f16(raw),
                    Dtype::BF16 => decode_bf16(raw),
                    other => {
                        return Err(ModelError::at(
                            &self.path,
                            format!("tensor {key} is {other:?}; expected a float tensor (F32, F16 or BF16)"),
                        ));
                    }
                }
            }
            Source::Pytorch(tensors) => {
                use pytorch_reader::DType as T;
                let tensor = tensors.get(key).ok_or_else(|| self.missing(key, shape))?;
                if tensor.shape() != shape {
                    return Err(self.wrong_shape(key, tensor.shape(), shape));
                }
                let raw = tensor.read().map_err(|e| ModelError::at(&self.path, e))?;
                // The reader hands back native-endian bytes.
                match tensor.dtype() {
                    T::F32 => raw
                        .chunks_exact(4)
                        .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    T::F16 => raw
                        .chunks_exact(2)
                        .map(|c| half::f16::from_ne_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    T::BF16 => raw
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_ne_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    T::F64 => raw
                        .chunks_exact(8)
                        .map(|c| f64::from_ne_bytes(c.try_into().expect("8-byte chunk")) as f32)
                        .collect(),
                    other => {
                        return Err(ModelError::at(
                            &self.path,
                            format!("tensor {key} is {other:?}; expected a float tensor (F32, F16, BF16 or F64)"),
                        ));
                    }
                }
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

fn decode_f32(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn decode_f16(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

fn decode_bf16(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_carry_the_format_metadata_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let values: Vec<u8> = [1f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![3], &values).unwrap();
        write_safetensors([("w".to_string(), view)], &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            metadata
                .metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let read = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(read.tensor("w").unwrap().data(), values.as_slice());
        assert!(!dir.path().join("w.safetensors.tmp").exists());
    }
}

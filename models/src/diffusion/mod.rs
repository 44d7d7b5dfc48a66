//! The Stable Diffusion family: the UNet (`unet`), the decoders (`vae`, `taesd`, with `tiling`
//! past one binding), the schedulers, the text-to-image pipeline and the two-family generator
//! mix (`mix`).

pub mod mix;
pub mod pipeline;
pub mod scheduler;
pub mod taesd;
pub mod tiling;
pub mod unet;
pub mod vae;

use std::path::{Path, PathBuf};

use crate::error::ModelError;

/// The weights file of a diffusers component folder: `diffusion_pytorch_model.safetensors`
/// (diffusers models) or `model.safetensors` (transformers models).
pub(crate) fn component_weights(dir: &Path) -> Result<PathBuf, ModelError> {
    ["diffusion_pytorch_model.safetensors", "model.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| ModelError::at(dir, "no diffusion_pytorch_model.safetensors or model.safetensors"))
}

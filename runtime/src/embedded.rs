//! The embedded default: the procedural domain and the tiny models trained on it are compiled
//! into the binary, so `divergen run` with no arguments runs DiverGen's four stages on a fresh
//! machine with nothing to download. [`prepare`] writes them under `<out>/embedded/` and
//! returns the run config to use.

use std::path::{Path, PathBuf};

use crate::Result;
use crate::domain::{self, DomainConfig};

/// The default run's config (paths relative to `<out>/embedded/`).
pub const RUN_TOML: &str = include_str!("../default/run.toml");

macro_rules! shipped {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../default/", $path)))),*]
    };
}

/// Every shipped model file, by its path under `models/`.
pub const MODEL_FILES: &[(&str, &[u8])] = shipped![
    "tiny-clip/config.json",
    "tiny-clip/model.safetensors",
    "tiny-clip/vocab.json",
    "tiny-clip/merges.txt",
    "tiny-sam/model.safetensors",
    "tiny-sd/model_index.json",
    "tiny-sd/scheduler/scheduler_config.json",
    "tiny-sd/text_encoder/config.json",
    "tiny-sd/text_encoder/model.safetensors",
    "tiny-sd/tokenizer/vocab.json",
    "tiny-sd/tokenizer/merges.txt",
    "tiny-sd/unet/config.json",
    "tiny-sd/unet/diffusion_pytorch_model.safetensors",
    "tiny-sd/vae/config.json",
    "tiny-sd/vae/diffusion_pytorch_model.safetensors",
];

/// Writes the domain (if its `domain.json` is not already the default's) and the shipped
/// models (each only if missing or different) under `root`, then the run config; returns the
/// config's path.
pub fn prepare(root: &Path) -> Result<PathBuf> {
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let domain_dir = root.join("domain");
    let config = DomainConfig::default();
    let marker = domain_dir.join("domain.json");
    let wanted = serde_json::to_value(&config)?;
    let current = std::fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    if current.as_ref().and_then(|c| c.get("config")) != Some(&wanted) {
        log::info!("writing the procedural domain to {}", domain_dir.display());
        domain::write(&domain_dir, &config)?;
    }
    for (name, bytes) in MODEL_FILES {
        let path = root.join("models").join(name);
        if std::fs::read(&path).is_ok_and(|b| b == *bytes) {
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        divergen_dataset::files::write_atomically(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let path = root.join("run.toml");
    divergen_dataset::files::write_atomically(&path, RUN_TOML.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

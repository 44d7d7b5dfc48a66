//! Deterministic pseudo-random weights, bit-for-bit the same as `models/fixtures/recipe.py`:
//! parity fixtures store only configs and reference outputs, and tests rebuild the checkpoint.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

/// `offset + scale * (2u - 1)`, `u` the top 24 bits of splitmix64 over `fnv1a64(name) + i·golden`.
pub fn values(name: &str, count: usize, scale: f64, offset: f64) -> Vec<f32> {
    let seed = fnv1a64(name);
    (0..count as u64)
        .map(|i| {
            let mut z = i.wrapping_mul(GOLDEN).wrapping_add(seed);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            (offset + scale * (2.0 * u - 1.0)) as f32
        })
        .collect()
}

/// The values the fixture scripts give a checkpoint tensor, by its key and shape.
pub fn tensor(name: &str, shape: &[usize]) -> Vec<f32> {
    let count = shape.iter().product::<usize>().max(1);
    let (scale, offset) = if name.contains("norm") && name.ends_with(".weight") {
        (0.1, 1.0)
    } else if name.ends_with(".bn.weight") || name.ends_with("running_var") {
        // Batch norm: scales near 1 and positive running variances.
        (0.1, 1.0)
    } else if name.ends_with(".bias") || name.contains("embedding") || name.ends_with("logit_scale") {
        (0.02, 0.0)
    } else {
        let fan_in: usize = if shape.len() > 1 {
            shape[1..].iter().product()
        } else {
            shape.first().copied().unwrap_or(1)
        };
        (1.0 / (fan_in as f64).sqrt(), 0.0)
    };
    values(name, count, scale, offset)
}

/// Writes a safetensors checkpoint with the recipe's values for every key of a fixture's
/// `keys` map (`{"key": [shape..]}`, as the fixture scripts record it), skipping the
/// `position_ids` buffers transformers stores alongside the weights. Parity tests rebuild the
/// reference model's checkpoint this way.
pub fn write_checkpoint(
    path: &std::path::Path,
    keys: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), crate::error::ModelError> {
    use crate::error::ModelError;
    use safetensors::{Dtype, tensor::TensorView};
    let mut tensors = Vec::new();
    for (key, shape) in keys.iter().filter(|(k, _)| !k.ends_with("position_ids")) {
        let shape: Vec<usize> = shape
            .as_array()
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| ModelError::at(path, format!("shape of {key} is not a list of sizes")))?;
        let bytes: Vec<u8> = tensor(key, &shape).iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((key.clone(), shape, bytes));
    }
    let views = tensors
        .iter()
        .map(|(k, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (k.clone(), view))
                .map_err(|e| ModelError::at(path, format!("{k}: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    crate::checkpoint::write_safetensors(views, path)
}

/// Builds a diffusers pipeline folder from a fixture made by `make_pipeline_fixture.py`: its
/// `model_index.json` and component configs, recipe weights for every component its
/// `reference.json` lists keys for, and the tokenizer from OpenAI's BPE list (`bpe`).
pub fn write_diffusers_folder(
    fixture: &std::path::Path,
    bpe: &std::path::Path,
    out: &std::path::Path,
) -> Result<(), crate::error::ModelError> {
    use crate::error::ModelError;
    fn io(p: &std::path::Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
        move |e| ModelError::at(p, e)
    }
    let reference_path = fixture.join("reference.json");
    let text = std::fs::read_to_string(&reference_path).map_err(io(&reference_path))?;
    let reference: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::at(&reference_path, e))?;
    std::fs::copy(fixture.join("model_index.json"), out.join("model_index.json")).map_err(io(fixture))?;
    for (component, config, weights) in [
        ("scheduler", "scheduler_config.json", None),
        ("text_encoder", "config.json", Some("model.safetensors")),
        ("unet", "config.json", Some("diffusion_pytorch_model.safetensors")),
        ("vae", "config.json", Some("diffusion_pytorch_model.safetensors")),
    ] {
        let dir = out.join(component);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::copy(fixture.join(component).join(config), dir.join(config)).map_err(io(&dir))?;
        if let Some(weights) = weights {
            let keys = reference["keys"][component]
                .as_object()
                .ok_or_else(|| ModelError::at(&reference_path, format!("no keys for {component}")))?;
            write_checkpoint(&dir.join(weights), keys)?;
        }
    }
    let tokenizer = out.join("tokenizer");
    std::fs::create_dir_all(&tokenizer).map_err(io(&tokenizer))?;
    crate::clip::tokenizer::ClipTokenizer::from_openai_bpe(bpe)
        .and_then(|t| t.save_hf(&tokenizer))
        .map_err(|e| ModelError(e.to_string()))
}

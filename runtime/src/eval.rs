//! `divergen eval`: the embedded default's quality bars, measured on the procedural domain's
//! held-out data through the same loaders and kernels the pipeline uses.

use std::path::Path;

use burn::tensor::Device;
use divergen_models::clip::{Clip, Quantization};
use divergen_models::clip_tokenizer::ClipTokenizer;
use serde::{Deserialize, Serialize};

use crate::pipeline::filtering::{dot, embed_images, embed_texts};

pub use crate::domain::RenderRecord as Render;

#[derive(Clone, Debug, Deserialize)]
pub struct Category {
    pub id: u32,
    pub name: String,
    pub def: String,
}

pub fn read_renders(domain: &Path, split: &str) -> Result<Vec<Render>, String> {
    let path = domain.join("renders").join(format!("{split}.jsonl"));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (write the domain with `divergen domain`)", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1)))
        .collect()
}

pub fn read_categories(domain: &Path) -> Result<Vec<Category>, String> {
    let path = domain.join("categories.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[derive(Clone, Debug, Serialize)]
pub struct CategoryAccuracy {
    pub id: u32,
    pub name: String,
    pub accuracy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ZeroShot {
    pub images: usize,
    pub accuracy: f64,
    pub per_category: Vec<CategoryAccuracy>,
}

/// The zero-shot prompt for a category: DiverGen's wording without attributes.
pub fn class_prompt(name: &str) -> String {
    format!("A photo of a {}, in a white background", name.replace('_', " "))
}

/// Zero-shot classification of the held-out renders: the category whose prompt embedding is
/// closest to the image's.
pub fn clip_zero_shot(clip_dir: &Path, domain: &Path, device: &Device) -> Result<ZeroShot, String> {
    let categories = read_categories(domain)?;
    let renders = read_renders(domain, "val")?;
    let clip = Clip::load(clip_dir, Quantization::None, device).map_err(|e| e.to_string())?;
    let tokenizer = ClipTokenizer::from_dir(clip_dir).map_err(|e| e.to_string())?;
    let prompts: Vec<String> = categories.iter().map(|c| class_prompt(&c.name)).collect();
    let texts = embed_texts(&clip, &tokenizer, &prompts)?;
    let dir = domain.join("renders/val");
    let mut images = Vec::with_capacity(renders.len());
    for r in &renders {
        let path = dir.join(&r.file);
        images.push(
            image::open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .into_rgb8(),
        );
    }
    let embedded = embed_images(&clip, &images, device)?;
    let mut right = vec![0usize; categories.len()];
    let mut total = vec![0usize; categories.len()];
    for (r, e) in renders.iter().zip(&embedded) {
        let best = texts
            .iter()
            .enumerate()
            .max_by(|a, b| dot(a.1, e).total_cmp(&dot(b.1, e)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let k = categories
            .iter()
            .position(|c| c.id == r.category_id)
            .ok_or("render of an unknown category")?;
        total[k] += 1;
        right[k] += (best == k) as usize;
    }
    Ok(ZeroShot {
        images: renders.len(),
        accuracy: right.iter().sum::<usize>() as f64 / renders.len().max(1) as f64,
        per_category: categories
            .iter()
            .enumerate()
            .map(|(k, c)| CategoryAccuracy {
                id: c.id,
                name: c.name.clone(),
                accuracy: right[k] as f64 / total[k].max(1) as f64,
            })
            .collect(),
    })
}

//! Stage 3, CLIP inter-similarity, as DiverGen's `filteration/` scripts: a generated instance
//! (its image with everything outside the raw SAM object black) is scored by the mean cosine to
//! the real instances of its category (crops with the outside blurred, padded 40 px), which is
//! the dot product with the mean of the real L2-normalised embeddings; kept at ≥ 0.6.
//!
//! The real bank (one mean vector per category) is computed once and cached on disk, keyed by
//! the dataset's and the model's hashes.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use divergen_models::clip::preprocess::pixel_values_sized;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::clip::{Clip, unit_rows};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::categories::Categories;
use super::config::{FilterConfig, NoRealPolicy, RunConfig};
use super::memory::Slot;
use super::prompts;
use super::real_data::{RealDataset, blurred_crop, box_blur};
use crate::Result;

/// DiverGen's padding around a real instance's box, per side.
pub const REAL_CROP_PADDING: u32 = 40;
/// DiverGen's `cv2.blur` kernel for the outside of a real instance.
pub const REAL_BLUR_KERNEL: usize = 10;
/// Images per CLIP forward.
const CLIP_BATCH: usize = 8;

/// L2-normalised CLIP image embeddings, one row per image.
pub fn embed_images(clip: &Clip, images: &[RgbImage], device: &Device) -> Result<Vec<Vec<f32>>> {
    let size = clip.config.vision_config.image_size;
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(CLIP_BATCH) {
        let pixels: Vec<f32> = chunk.iter().flat_map(|i| pixel_values_sized(i, size as u32)).collect();
        let batch = Tensor::from_data(TensorData::new(pixels, [chunk.len(), 3, size, size]), device);
        let e = clip.vision.forward(batch)?;
        out.extend(unit_rows(e)?);
    }
    Ok(out)
}

/// L2-normalised CLIP text embeddings.
pub fn embed_texts(clip: &Clip, tokenizer: &ClipTokenizer, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode_padded(t, tokenizer.end_id()).0)
        .collect();
    Ok(unit_rows(clip.text.forward(&ids)?)?)
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What a generated instance is compared with: its category's real bank or, for a category
/// without real instances under `no_real = "text"`, the CLIP text embedding of its name.
pub struct References {
    pub bank: RealBank,
    pub stats: BankStats,
    /// Category id → the unit text embedding of "a photo of <name>".
    pub text: HashMap<u32, Vec<f32>>,
    /// Selected categories with no real crop.
    pub without_real: Vec<u32>,
}

/// Stage 3's decision on one instance.
pub struct Judgement {
    pub score: Option<f32>,
    /// `real-bank`, `text` or `none`: what `score` was measured against.
    pub kind: &'static str,
    pub kept: bool,
}

impl References {
    /// The real bank (from the cache, completed and written back) and the text embeddings.
    pub fn build(
        config: &RunConfig,
        cache_dir: &Path,
        categories: &Categories,
        real: &RealDataset,
        clip: &mut Slot<Clip>,
        tokenizer: &ClipTokenizer,
        device: &Device,
    ) -> Result<Self> {
        let clip_quant: divergen_models::layers::Quantization = config.filter.quant.into();
        let key = bank_key(
            &config.real.annotations,
            &config.filter.clip,
            &format!("{clip_quant:?}"),
            config.filter.max_real_per_category,
        )?;
        let (bank, stats) = real_bank(
            cache_dir,
            &key,
            &categories.selected,
            real,
            config.filter.max_real_per_category,
            clip.get()?,
            device,
        )?;
        let without_real: Vec<u32> = categories
            .selected
            .iter()
            .copied()
            .filter(|c| !bank.categories.contains_key(c))
            .collect();
        let text = if config.filter.no_real == NoRealPolicy::Text && !without_real.is_empty() {
            let texts: Vec<String> = without_real
                .iter()
                .map(|&c| {
                    let category = categories.get(c).ok_or_else(|| format!("category {c} vanished"))?;
                    Ok(format!("a photo of {}", prompts::display_name(category)))
                })
                .collect::<Result<_>>()?;
            without_real
                .iter()
                .copied()
                .zip(embed_texts(clip.get()?, tokenizer, &texts)?)
                .collect()
        } else {
            HashMap::new()
        };
        Ok(References {
            bank,
            stats,
            text,
            without_real,
        })
    }

    /// Scores a unit embedding of `category` and keeps it at or above the threshold for what it
    /// was scored against; an unscored one is kept only under `no_real = "keep"`.
    pub fn judge(&self, category: u32, embedding: &[f32], filter: &FilterConfig) -> Judgement {
        if let Some(s) = self.bank.score(category, embedding) {
            return Judgement {
                score: Some(s),
                kind: "real-bank",
                kept: s >= filter.threshold,
            };
        }
        if let Some(t) = self.text.get(&category) {
            let s = dot(t, embedding);
            return Judgement {
                score: Some(s),
                kind: "text",
                kept: s >= filter.text_threshold,
            };
        }
        Judgement {
            score: None,
            kind: "none",
            kept: filter.no_real == NoRealPolicy::Keep,
        }
    }
}

/// One category's real bank: the un-renormalised mean of its real crops' unit embeddings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RealBankEntry {
    pub crops: usize,
    pub mean: Vec<f32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RealBank {
    /// What the cache file is for: hashes of the dataset, the model and the settings.
    pub key: String,
    /// Category id → its bank; categories with no real instance are absent.
    pub categories: BTreeMap<u32, RealBankEntry>,
    /// Categories looked up that have no real instance (so they are not looked up again).
    pub without_real: Vec<u32>,
}

impl RealBank {
    pub fn score(&self, category: u32, embedding: &[f32]) -> Option<f32> {
        self.categories.get(&category).map(|e| dot(&e.mean, embedding))
    }
}

/// SHA-256 of a file's bytes, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key: the dataset's annotations, the CLIP folder's config and weights, the
/// quantization and the crop cap. Images are named by the annotations, so they are covered.
pub fn bank_key(annotations: &Path, clip_dir: &Path, quant: &str, max_per_category: usize) -> Result<String> {
    let mut h = Sha256::new();
    h.update(file_sha256(annotations)?.as_bytes());
    for f in ["config.json", "model.safetensors"] {
        h.update(file_sha256(&clip_dir.join(f))?.as_bytes());
    }
    h.update(format!("{quant}/{max_per_category}/pad{REAL_CROP_PADDING}/blur{REAL_BLUR_KERNEL}").as_bytes());
    Ok(hex(&h.finalize())[..24].to_string())
}

/// Loads the cached bank for `key` from `cache_dir`, computes the categories it lacks, and
/// writes it back (atomically) if anything was added.
pub fn real_bank(
    cache_dir: &Path,
    key: &str,
    categories: &[u32],
    dataset: &RealDataset,
    max_per_category: usize,
    clip: &Clip,
    device: &Device,
) -> Result<(RealBank, BankStats)> {
    let path = cache_path(cache_dir, key);
    let mut bank = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<RealBank>(&bytes) {
            Ok(b) if b.key == key => b,
            Ok(_) | Err(_) => {
                log::warn!(
                    "{}: unreadable or for another key; recomputing the real bank",
                    path.display()
                );
                RealBank::default()
            }
        },
        Err(_) => RealBank::default(),
    };
    bank.key = key.to_string();
    let missing: Vec<u32> = categories
        .iter()
        .copied()
        .filter(|c| !bank.categories.contains_key(c) && !bank.without_real.contains(c))
        .collect();
    let mut stats = BankStats {
        cached: categories.len() - missing.len(),
        ..Default::default()
    };
    if missing.is_empty() {
        return Ok((bank, stats));
    }
    // The real instances of the missing categories, in dataset order, capped per category.
    let mut wanted: BTreeMap<u32, Vec<(usize, usize)>> = missing.iter().map(|&c| (c, Vec::new())).collect();
    for (i, image) in dataset.images.iter().enumerate() {
        for (j, a) in image.annotations.iter().enumerate() {
            if let Some(list) = wanted.get_mut(&a.category_id)
                && list.len() < max_per_category
                && a.iscrowd == 0
            {
                list.push((i, j));
            }
        }
    }
    let mut by_image: BTreeMap<usize, Vec<(usize, u32)>> = BTreeMap::new();
    for (&c, list) in &wanted {
        for &(i, j) in list {
            by_image.entry(i).or_default().push((j, c));
        }
    }
    let mut sums: BTreeMap<u32, (usize, Vec<f32>)> = BTreeMap::new();
    let mut pending: Vec<(u32, RgbImage)> = Vec::new();
    let flush = |pending: &mut Vec<(u32, RgbImage)>, sums: &mut BTreeMap<u32, (usize, Vec<f32>)>| -> Result<()> {
        let images: Vec<RgbImage> = pending.iter().map(|(_, i)| i.clone()).collect();
        for ((c, _), e) in pending.iter().zip(embed_images(clip, &images, device)?) {
            let entry = sums.entry(*c).or_insert_with(|| (0, vec![0.0; e.len()]));
            entry.0 += 1;
            entry.1.iter_mut().zip(&e).for_each(|(s, v)| *s += v);
        }
        pending.clear();
        Ok(())
    };
    for (&i, anns) in &by_image {
        let real = &dataset.images[i];
        let img = real.open()?;
        let blurred = box_blur(&img, REAL_BLUR_KERNEL);
        for &(j, c) in anns {
            let ann = &real.annotations[j];
            let mask = ann
                .segmentation
                .to_mask(img.width(), img.height())
                .map_err(|e| format!("{}: annotation {}: {e}", dataset.source.display(), ann.id))?;
            if let Some(crop) = blurred_crop(&img, &blurred, &mask, REAL_CROP_PADDING) {
                pending.push((c, crop));
                stats.crops += 1;
            }
            if pending.len() >= CLIP_BATCH {
                flush(&mut pending, &mut sums)?;
            }
        }
    }
    flush(&mut pending, &mut sums)?;
    for c in missing {
        match sums.remove(&c) {
            Some((n, sum)) => {
                bank.categories.insert(
                    c,
                    RealBankEntry {
                        crops: n,
                        mean: sum.into_iter().map(|s| s / n as f32).collect(),
                    },
                );
            }
            None => bank.without_real.push(c),
        }
        stats.computed += 1;
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| format!("{}: {e}", cache_dir.display()))?;
    let bytes = serde_json::to_vec(&bank)?;
    divergen_dataset::files::write_atomically(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((bank, stats))
}

pub fn cache_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("real-bank-{key}.json"))
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BankStats {
    /// Categories found in the cache.
    pub cached: usize,
    /// Categories computed this run.
    pub computed: usize,
    /// Real crops embedded this run.
    pub crops: usize,
}

/// Mean pairwise cosine distance `1 − cos` of unit embeddings; `None` below two.
pub fn mean_pairwise_distance(embeddings: &[&[f32]]) -> Option<f64> {
    let n = embeddings.len();
    if n < 2 {
        return None;
    }
    let mut sum = 0f64;
    for i in 0..n {
        for j in i + 1..n {
            sum += 1.0 - dot(embeddings[i], embeddings[j]) as f64;
        }
    }
    Some(sum / (n * (n - 1) / 2) as f64)
}

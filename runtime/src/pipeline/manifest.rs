//! What a run writes about itself: `run.json` (the manifest, written last), `instances.json`
//! (one record per generated image) and the instance pool in X-Paste's `pool.json` form.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::annotation::DropReason;
use super::augmentation::PasteReport;
use super::categories::Categories;
use super::config::RunConfig;
use super::filtering::{self, BankStats, RealBank};
use super::output::SinkReport;
use super::scheduler;
use crate::{Error, Result};

/// One generated image: what made it and what became of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub name: String,
    pub category_id: u32,
    pub generator: String,
    pub prompt_id: u32,
    pub prompt: String,
    pub seed: u64,
    /// SAM's IoU estimate of the background mask it used.
    pub sam_iou: f32,
    /// Against the real bank, or the text (see `score_kind`); absent when not scored.
    pub clip_score: Option<f32>,
    /// `real-bank`, `text` or `none`.
    pub score_kind: String,
    pub kept: bool,
    pub drop_reason: Option<DropReason>,
    /// The RGBA crop, relative to the run folder (`pool/…` when kept, `rejected/…` otherwise).
    pub crop: Option<String>,
    /// `[x, y, w, h]` of the crop in the generated image.
    pub bbox: Option<[u32; 4]>,
    pub area_fraction: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StageReport {
    pub seconds: f64,
    pub items: u64,
    pub per_second: f64,
}

impl StageReport {
    pub fn add(&mut self, start: Instant, items: usize) {
        self.seconds += start.elapsed().as_secs_f64();
        self.items += items as u64;
        self.per_second = if self.seconds > 0.0 {
            self.items as f64 / self.seconds
        } else {
            0.0
        };
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stages {
    pub real_bank: StageReport,
    pub generation: StageReport,
    pub annotation: StageReport,
    pub filtering: StageReport,
    pub augmentation: StageReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct CategoryReport {
    pub id: u32,
    pub name: String,
    pub frequency: String,
    pub generated: usize,
    pub annotated: usize,
    pub kept: usize,
    pub acceptance: f64,
    pub drops: BTreeMap<String, usize>,
    pub distinct_prompts: usize,
    /// Mean pairwise CLIP distance (1 − cos) of the kept instances.
    pub kept_diversity: Option<f64>,
    pub mean_clip_score: Option<f64>,
    /// Real crops in the bank (0: scored by the no-real policy).
    pub real_crops: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunManifest {
    pub run_id: String,
    pub device_id: String,
    pub seed: u64,
    pub device: String,
    pub budget_mib: Option<u64>,
    pub plan: Vec<scheduler::ModelPlan>,
    pub peak_device_mib: Option<f64>,
    pub stages: Stages,
    pub real_bank: BankStats,
    pub generated: usize,
    pub kept: usize,
    pub drops: BTreeMap<String, usize>,
    pub categories: Vec<CategoryReport>,
    pub paste: PasteReport,
    pub output: SinkReport,
    pub pool: String,
    pub config: RunConfig,
}

pub fn reason_name(reason: DropReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| format!("{reason:?}"))
}

/// Dropped instances per reason, as `run.json` counts them.
pub fn drop_counts(records: &[InstanceRecord]) -> BTreeMap<String, usize> {
    let mut drops = BTreeMap::new();
    for reason in records.iter().filter_map(|r| r.drop_reason) {
        *drops.entry(reason_name(reason)).or_default() += 1;
    }
    drops
}

pub fn category_reports(
    categories: &Categories,
    records: &[InstanceRecord],
    embeddings: &[Option<Vec<f32>>],
    bank: &RealBank,
) -> Vec<CategoryReport> {
    categories
        .selected
        .iter()
        .map(|&c| {
            let category = categories.get(c).expect("selected ids are in the table");
            let mine: Vec<usize> = (0..records.len()).filter(|&i| records[i].category_id == c).collect();
            let mut drops = BTreeMap::new();
            for &i in &mine {
                if let Some(r) = records[i].drop_reason {
                    *drops.entry(reason_name(r)).or_default() += 1;
                }
            }
            let kept: Vec<usize> = mine.iter().copied().filter(|&i| records[i].kept).collect();
            let kept_embeddings: Vec<&[f32]> = kept.iter().filter_map(|&i| embeddings[i].as_deref()).collect();
            let scores: Vec<f64> = mine
                .iter()
                .filter_map(|&i| records[i].clip_score.map(f64::from))
                .collect();
            let mut prompts: Vec<&str> = mine.iter().map(|&i| records[i].prompt.as_str()).collect();
            prompts.sort_unstable();
            prompts.dedup();
            CategoryReport {
                id: c,
                name: category.name.clone(),
                frequency: category.frequency.code().into(),
                generated: mine.len(),
                annotated: mine
                    .iter()
                    .filter(|&&i| records[i].drop_reason.is_none_or(|r| r == DropReason::ClipFilter))
                    .count(),
                kept: kept.len(),
                acceptance: if mine.is_empty() {
                    0.0
                } else {
                    kept.len() as f64 / mine.len() as f64
                },
                drops,
                distinct_prompts: prompts.len(),
                kept_diversity: filtering::mean_pairwise_distance(&kept_embeddings),
                mean_clip_score: (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64),
                real_crops: bank.categories.get(&c).map_or(0, |e| e.crops),
            }
        })
        .collect()
}

pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    divergen_dataset::files::write_atomically(path, &bytes).map_err(Error::io(path))
}

/// X-Paste's pool file: 0-based category index → `*`-prefixed paths of pre-cropped RGBA
/// instances (the `*` tells its loader they are already processed). Paths are absolute so the
/// file works from any working directory.
pub fn write_pool(out: &Path, pool_dir: &Path, records: &[InstanceRecord]) -> Result<()> {
    std::fs::create_dir_all(pool_dir).map_err(Error::io(pool_dir))?;
    let root = std::fs::canonicalize(out).map_err(Error::io(out))?;
    let mut pool: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.kept) {
        if let Some(crop) = &r.crop {
            pool.entry((r.category_id - 1).to_string())
                .or_default()
                .push(format!("*{}", root.join(crop).display()));
        }
    }
    write_json(&pool_dir.join("pool.json"), &pool)
}

/// Reads a finished run's records back (for `divergen report`).
pub fn read_records(dir: &Path) -> Result<Vec<InstanceRecord>> {
    let path = dir.join(super::INSTANCES);
    let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()).into())
}

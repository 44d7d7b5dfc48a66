//! The run configuration (`divergen run --config F`), one TOML table per stage. Every table
//! refuses unknown keys, so a typo is an error naming the key instead of a silently ignored
//! setting. Relative paths are relative to the config file.

use std::path::{Path, PathBuf};

use crate::Result;
use divergen_models::diffusion::mix::GeneratorSpec;
use divergen_models::layers::Quantization;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Same seed, same output.
    #[serde(default)]
    pub seed: u64,
    /// Device memory budget in MiB; models that do not fit together are loaded per batch.
    #[serde(default)]
    pub budget_mib: Option<u64>,
    /// Names the device in the samples' provenance.
    #[serde(default = "default_device_id")]
    pub device_id: String,
    pub categories: CategoriesConfig,
    pub generation: GenerationConfig,
    pub annotation: AnnotationConfig,
    pub filter: FilterConfig,
    pub real: RealConfig,
    #[serde(default)]
    pub paste: PasteConfig,
    #[serde(default)]
    pub output: OutputConfig,
}

fn default_device_id() -> String {
    "divergen-device".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    None,
    Int8,
    Int4,
}

impl From<Quant> for Quantization {
    fn from(q: Quant) -> Self {
        match q {
            Quant::None => Quantization::None,
            Quant::Int8 => Quantization::Int8,
            Quant::Int4 => Quantization::Int4,
        }
    }
}

fn int8() -> Quant {
    Quant::Int8
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CategoriesConfig {
    /// An LVIS `*_cat_info.json` (DiverGen's 1,203, or the 1,453 with the ImageNet extras).
    pub table: PathBuf,
    /// Keep only these ids.
    #[serde(default)]
    pub ids: Option<Vec<u32>>,
    /// Keep only these LVIS frequencies (`r`, `c`, `f`).
    #[serde(default)]
    pub frequency: Option<Vec<String>>,
    /// Keep at most this many (the first, by id, after the filters above).
    #[serde(default)]
    pub limit: Option<usize>,
    /// `area_mean_std2.json`: per category id the mean and std of the linear size.
    #[serde(default)]
    pub area_stats: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSource {
    /// `a photo of a single {name}, {def}, in a white background`.
    Template,
    /// `<bank>/<id>.txt`, one prompt a line.
    Bank,
    /// Seeded prompts in the bank's style, for categories without a bank file.
    Grammar,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    pub images_per_category: usize,
    /// Images generated, annotated and filtered together (K): each stage's models are loaded
    /// once per batch when the budget does not hold them all.
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_sources")]
    pub prompt_sources: Vec<PromptSource>,
    #[serde(default)]
    pub prompt_bank: Option<PathBuf>,
    /// Grammar prompts per category without a bank (DiverGen's banks hold 128).
    #[serde(default = "default_grammar_prompts")]
    pub grammar_prompts: usize,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default = "int8")]
    pub quant: Quant,
    pub generators: Vec<GeneratorSpec>,
}

fn default_batch() -> usize {
    4
}

fn default_sources() -> Vec<PromptSource> {
    vec![PromptSource::Template, PromptSource::Bank, PromptSource::Grammar]
}

fn default_grammar_prompts() -> usize {
    128
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotationConfig {
    /// A SAM or MobileSAM checkpoint (`.pth` or safetensors).
    pub sam: PathBuf,
    #[serde(default = "int8")]
    pub quant: Quant,
    /// Masks covering less than this fraction of the image are dropped as empty.
    #[serde(default = "default_min_area")]
    pub min_area: f64,
}

fn default_min_area() -> f64 {
    0.001
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoRealPolicy {
    /// Keep every instance.
    Keep,
    /// CLIP image–text score against the template prompt, X-Paste's filter.
    Text,
    /// DiverGen's released scripts: a category missing from the similarity CSV is dropped.
    Drop,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// A Hugging Face CLIPModel folder.
    pub clip: PathBuf,
    #[serde(default = "int8")]
    pub quant: Quant,
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// What to do with categories that have no real instances (the ImageNet extras).
    #[serde(default = "default_policy")]
    pub no_real: NoRealPolicy,
    /// The image–text cosine a `text` policy keeps at (X-Paste's 0.21).
    #[serde(default = "default_text_threshold")]
    pub text_threshold: f32,
    /// Real crops embedded per category at most (DiverGen uses all; the mean settles quickly).
    #[serde(default = "default_max_real")]
    pub max_real_per_category: usize,
    /// Where the real banks are cached (default: `<out>/cache`).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

fn default_threshold() -> f32 {
    0.6
}

fn default_policy() -> NoRealPolicy {
    NoRealPolicy::Text
}

fn default_text_threshold() -> f32 {
    0.21
}

fn default_max_real() -> usize {
    64
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RealConfig {
    /// COCO/LVIS instances JSON.
    pub annotations: PathBuf,
    /// The folder its `file_name`s are relative to.
    pub images: PathBuf,
    /// Annotations whose category id is not in `categories.table`: `warn` (default) leaves them
    /// out with a warning naming the ids and counts; `error` stops the run before any work.
    #[serde(default)]
    pub unknown_categories: UnknownCategories,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownCategories {
    #[default]
    Warn,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Blend {
    /// DiverGen's `basic`: binary mask.
    Hard,
    /// The instance's alpha as a soft mask.
    Alpha,
    /// The mask box-blurred 5×5 (DiverGen's `gaussian`, which is a box blur).
    Blur,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PasteConfig {
    /// Real images to paste onto (default: all of them, once).
    #[serde(default)]
    pub images: Option<usize>,
    /// Instances per image are uniform on `0..max_instances` (DiverGen: 20, so 0–19).
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// Linear scale for categories without size statistics, uniform in this range.
    #[serde(default = "default_random_scale")]
    pub random_scale: [f64; 2],
    #[serde(default = "default_shape_jitter")]
    pub shape_jitter: f64,
    #[serde(default = "default_flip")]
    pub flip: f64,
    /// An occluded instance is kept if its box moved ≤ this many pixels on every side…
    #[serde(default = "default_bbox_thr")]
    pub bbox_occluded_thr: f64,
    /// …or more than this many of its pixels remain.
    #[serde(default = "default_mask_thr")]
    pub mask_occluded_thr: u64,
    #[serde(default = "default_blend")]
    pub blend: Blend,
}

impl Default for PasteConfig {
    fn default() -> Self {
        PasteConfig {
            images: None,
            max_instances: default_max_instances(),
            random_scale: default_random_scale(),
            shape_jitter: default_shape_jitter(),
            flip: default_flip(),
            bbox_occluded_thr: default_bbox_thr(),
            mask_occluded_thr: default_mask_thr(),
            blend: default_blend(),
        }
    }
}

fn default_max_instances() -> usize {
    20
}
fn default_random_scale() -> [f64; 2] {
    [0.05, 0.3]
}
fn default_shape_jitter() -> f64 {
    0.2
}
fn default_flip() -> f64 {
    0.5
}
fn default_bbox_thr() -> f64 {
    10.0
}
fn default_mask_thr() -> u64 {
    300
}
fn default_blend() -> Blend {
    Blend::Hard
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Samples per dataset shard.
    #[serde(default = "default_shard_size")]
    pub shard_size: usize,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            shard_size: default_shard_size(),
        }
    }
}

fn default_shard_size() -> usize {
    256
}

impl RunConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut config: RunConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Makes relative paths relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.categories.table);
        if let Some(p) = &mut self.categories.area_stats {
            fix(p);
        }
        if let Some(p) = &mut self.generation.prompt_bank {
            fix(p);
        }
        for g in &mut self.generation.generators {
            fix(&mut g.folder);
            if let Some(t) = &mut g.taesd {
                fix(t);
            }
        }
        fix(&mut self.annotation.sam);
        fix(&mut self.filter.clip);
        if let Some(p) = &mut self.filter.cache {
            fix(p);
        }
        fix(&mut self.real.annotations);
        fix(&mut self.real.images);
    }

    /// Values serde cannot check; each error names its key.
    pub fn validate(&self) -> Result<()> {
        let g = &self.generation;
        if g.images_per_category == 0 {
            return Err("generation.images_per_category must be at least 1".into());
        }
        if g.batch == 0 {
            return Err("generation.batch must be at least 1".into());
        }
        if g.prompt_sources.is_empty() {
            return Err("generation.prompt_sources is empty".into());
        }
        if g.prompt_sources.contains(&PromptSource::Bank) && g.prompt_bank.is_none() {
            return Err("generation.prompt_sources has \"bank\" but generation.prompt_bank is not set".into());
        }
        if g.prompt_sources.contains(&PromptSource::Grammar) && g.grammar_prompts == 0 {
            return Err("generation.grammar_prompts must be at least 1".into());
        }
        divergen_models::diffusion::mix::GeneratorMix::new(g.generators.clone())
            .map_err(|e| format!("generation.generators: {e}"))?;
        if let Some(f) = &self.categories.frequency
            && let Some(bad) = f.iter().find(|f| !matches!(f.as_str(), "r" | "c" | "f"))
        {
            return Err(format!("categories.frequency: {bad:?} is not one of \"r\", \"c\", \"f\"").into());
        }
        if self.categories.limit == Some(0) {
            return Err("categories.limit must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.annotation.min_area) {
            return Err(format!("annotation.min_area {} must be in [0, 1)", self.annotation.min_area).into());
        }
        let f = &self.filter;
        if !(-1.0..=1.0).contains(&f.threshold) {
            return Err(format!("filter.threshold {} must be a cosine in [-1, 1]", f.threshold).into());
        }
        if !(-1.0..=1.0).contains(&f.text_threshold) {
            return Err(format!("filter.text_threshold {} must be a cosine in [-1, 1]", f.text_threshold).into());
        }
        if f.max_real_per_category == 0 {
            return Err("filter.max_real_per_category must be at least 1".into());
        }
        let p = &self.paste;
        if p.max_instances == 0 {
            return Err("paste.max_instances must be at least 1 (instances are drawn from 0..max_instances)".into());
        }
        let [lo, hi] = p.random_scale;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(format!("paste.random_scale [{lo}, {hi}] must be 0 < min ≤ max").into());
        }
        if !(0.0..1.0).contains(&p.shape_jitter) {
            return Err(format!("paste.shape_jitter {} must be in [0, 1)", p.shape_jitter).into());
        }
        if !(0.0..=1.0).contains(&p.flip) {
            return Err(format!("paste.flip {} must be a probability", p.flip).into());
        }
        if p.bbox_occluded_thr.is_nan() || p.bbox_occluded_thr < 0.0 {
            return Err(format!("paste.bbox_occluded_thr {} must be ≥ 0", p.bbox_occluded_thr).into());
        }
        if self.output.shard_size == 0 {
            return Err("output.shard_size must be at least 1".into());
        }
        if self.budget_mib == Some(0) {
            return Err("budget_mib must be at least 1".into());
        }
        divergen_protocol::check_id("device_id", &self.device_id)?;
        Ok(())
    }
}

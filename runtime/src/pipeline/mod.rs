//! `divergen run`: DiverGen's four stages on the device, under a memory budget.
//!
//! 1. [`generation`](crate::pipeline::prompts) — categories × prompts × generators, batched;
//! 2. [`annotation`] — SAM-background;
//! 3. [`filtering`] — CLIP inter-similarity against a cached real bank;
//! 4. [`augmentation`] — instance paste onto the real images, written as LVIS/COCO shards or
//!    streamed to a host.
//!
//! Stages 1–3 run per batch of `generation.batch` images; stage 4 runs once the instance pool is
//! complete, because DiverGen's category-balanced draw is defined over the whole pool (pasting
//! from a partial pool would over-draw the categories generated first).

pub mod annotation;
pub mod augmentation;
pub mod categories;
pub mod config;
pub mod filtering;
pub mod output;
pub mod prompts;
pub mod real_data;
pub mod report;
pub mod scheduler;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use divergen_models::checkpoint::Checkpoint;
use divergen_models::clip::Clip;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::diffusion::mix::GeneratorMix;
use divergen_models::diffusion::pipeline::{Request, Residency, StableDiffusion, quantized_share};
use divergen_models::layers::Quantization;
use divergen_models::sam::Sam;
use divergen_protocol::{ImageData, Instance, Origin, Provenance, Rle, Sample};
use image::RgbImage;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::annotation::{BACKGROUND_MASK_INDEX, DropReason};
use self::augmentation::{Layer, PasteStats, Pool, PoolInstance};
use self::categories::Categories;
use self::config::{NoRealPolicy, RunConfig};
use self::filtering::{BankStats, RealBank};
use self::output::{Sink, SinkReport, Target};
use self::real_data::RealDataset;

/// Where `divergen run` sends the pasted samples.
#[derive(Clone, Debug)]
pub enum Destination {
    /// `<out>/dataset/`, as `divergen-host` writes it.
    Local,
    /// A `divergen-host serve` address (`host:port`, `serial:PATH`, `stdio`).
    Host(String),
}

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
    fn add(&mut self, start: Instant, items: usize) {
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

#[derive(Clone, Debug, Default, Serialize)]
pub struct PasteReport {
    pub images: u64,
    pub instances_pasted: u64,
    pub instances_per_image: f64,
    pub rejected_by_size: u64,
    pub dropped_by_occlusion: u64,
    pub real_annotations: u64,
    /// Real annotations left out: crowd regions, categories outside the table, bad masks.
    pub real_annotations_skipped: u64,
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

pub const MANIFEST: &str = "run.json";
pub const INSTANCES: &str = "instances.json";
pub const PROMPTS: &str = "prompts.json";
/// Folder of per-instance results (`<name>.json`), so a killed run resumes where it stopped.
pub const RESUME: &str = "resume";

/// A model slot: loaded on first use, kept or dropped after each stage as the plan says.
struct Slot<T> {
    resident: bool,
    model: Option<T>,
}

impl<T> Slot<T> {
    fn get(&mut self, load: impl FnOnce() -> Result<T, String>) -> Result<&T, String> {
        if self.model.is_none() {
            self.model = Some(load()?);
        }
        Ok(self.model.as_ref().expect("loaded above"))
    }

    fn release(&mut self, device: &Device) {
        if !self.resident && self.model.take().is_some() {
            device.memory_cleanup();
        }
    }
}

fn peak_mib(device: &Device, peak: &mut Option<f64>) {
    if let Some(u) = device.memory_pool_usage() {
        let now = u.bytes_reserved as f64 / (1 << 20) as f64;
        *peak = Some(peak.map_or(now, |p: f64| p.max(now)));
    }
}

/// Mixes `(seed, a, b)` into one seed (SplitMix64 finaliser), so every image's seed is a pure
/// function of the run seed and its place.
pub fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The run id: a hash of everything that shapes the output (not the budget, batch size or cache
/// folder, which only change how it is computed), so rerunning the same run resumes it: the host
/// and the local store drop what they already hold.
pub fn run_id(config: &RunConfig) -> Result<String, String> {
    let mut shaping = config.clone();
    shaping.budget_mib = None;
    shaping.generation.batch = 0;
    shaping.filter.cache = None;
    let json = serde_json::to_vec(&shaping).map_err(|e| e.to_string())?;
    Ok(format!("run-{}", &filtering::hex(&Sha256::digest(&json))[..16]))
}

fn job_name(job: &Job) -> String {
    format!("{:05}-{:05}", job.category, job.index)
}

/// What determines an instance: a saved result is reused only if all of it matches (the run id
/// is a hash of the whole config, so any changed setting regenerates).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct JobKey {
    run_id: String,
    category_id: u32,
    generator: String,
    prompt: String,
    seed: u64,
}

/// An instance through stages 1–3: its record, its CLIP embedding (when it got that far) and,
/// when kept, its RGBA crop for stage 4.
struct Finished {
    record: InstanceRecord,
    embedding: Option<Vec<f32>>,
    crop: Option<Arc<image::RgbaImage>>,
}

#[derive(Serialize, Deserialize)]
struct SavedInstance {
    key: JobKey,
    record: InstanceRecord,
    embedding: Option<Vec<f32>>,
}

impl Finished {
    /// Written after the crop PNG, through a renamed temporary file: a saved result always
    /// names a complete crop.
    fn save(&self, path: &Path, key: JobKey) -> Result<(), String> {
        let saved = SavedInstance {
            key,
            record: self.record.clone(),
            embedding: self.embedding.clone(),
        };
        write_json(path, &saved)
    }

    /// A result an earlier run saved for `job`, if it is whole and was made by the same config;
    /// anything else is regenerated (with a warning when a file was there but unusable).
    fn load(out: &Path, path: &Path, expected: &JobKey, job: &Job) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        let unusable = |why: &str| {
            log::warn!("{}: {why}; the instance is generated again", path.display());
            None
        };
        let Ok(saved) = serde_json::from_slice::<SavedInstance>(&bytes) else {
            return unusable("not a saved instance");
        };
        if saved.key != *expected {
            return unusable("made by another config or job");
        }
        let r = &saved.record;
        if r.name != job_name(job) || r.category_id != job.category || r.prompt_id != job.prompt_id {
            return unusable("its record names another job");
        }
        // Everything that reached CLIP has a crop (pool or rejected) and an embedding.
        if saved.embedding.is_some() != r.crop.is_some() {
            return unusable("its record and embedding disagree");
        }
        let crop = match (&r.crop, r.kept) {
            (Some(rel), kept) => {
                let Ok(image) = crate::images::open(&out.join(rel)) else {
                    return unusable("its crop is missing or unreadable");
                };
                let image = image.into_rgba8();
                if r.bbox.is_none_or(|[_, _, w, h]| image.dimensions() != (w, h)) {
                    return unusable("its crop has another size than its record");
                }
                kept.then(|| Arc::new(image))
            }
            (None, true) => return unusable("kept without a crop"),
            (None, false) => None,
        };
        Some(Finished {
            record: saved.record,
            embedding: saved.embedding,
            crop,
        })
    }
}

struct Job {
    category: u32,
    index: usize,
    prompt_id: u32,
    generator: usize,
    seed: u64,
}

struct Annotated {
    job: usize,
    image: RgbImage,
    sam_iou: f32,
    result: Result<annotation::Annotated, DropReason>,
}

/// Real annotations whose category is not in the table, as id → count.
pub fn unknown_categories(real: &RealDataset, categories: &Categories) -> BTreeMap<u32, usize> {
    let mut unknown = BTreeMap::new();
    for a in real.images.iter().flat_map(|i| &i.annotations) {
        if categories.get(a.category_id).is_none() {
            *unknown.entry(a.category_id).or_insert(0) += 1;
        }
    }
    unknown
}

/// Says which real annotations the run cannot use because their category is unknown, and stops
/// the run if the config asks for that.
fn check_unknown_categories(real: &RealDataset, categories: &Categories, config: &RunConfig) -> Result<(), String> {
    let unknown = unknown_categories(real, categories);
    if unknown.is_empty() {
        return Ok(());
    }
    let total: usize = unknown.values().sum();
    let ids: Vec<String> = unknown.iter().map(|(id, n)| format!("{id} ({n}×)")).collect();
    let what = format!(
        "{}: {total} annotations name category ids that {} does not have: {}",
        real.source.display(),
        config.categories.table.display(),
        ids.join(", ")
    );
    match config.real.unknown_categories {
        config::UnknownCategories::Error => Err(format!("{what} (real.unknown_categories = \"error\")")),
        config::UnknownCategories::Warn => {
            log::warn!("{what}; they are left out (set real.unknown_categories = \"error\" to stop instead)");
            Ok(())
        }
    }
}

/// Runs the four stages; writes `<out>/run.json` last, so its presence means the run finished.
pub fn run(
    config: &RunConfig,
    out: &Path,
    destination: &Destination,
    device: &Device,
    device_name: &str,
) -> Result<RunManifest, String> {
    let run_id = run_id(config)?;
    let categories = Categories::load(&config.categories)?;
    let real = RealDataset::load(&config.real.annotations, &config.real.images)?;
    check_unknown_categories(&real, &categories, config)?;
    let mix = GeneratorMix::new(config.generation.generators.clone()).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let manifest_path = out.join(MANIFEST);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    }
    log::info!(
        "run {run_id}: {} categories × {} images, {} generators, {} real images",
        categories.selected.len(),
        config.generation.images_per_category,
        mix.generators.len(),
        real.images.len()
    );

    // Stage 1's plan: prompts per category, then one job per image.
    let mut prompt_table: Vec<(u32, String)> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    let generation = &config.generation;
    let total = categories.selected.len() * generation.images_per_category;
    let generators = mix.assign(total, config.seed);
    for &c in &categories.selected {
        let category = categories.get(c).ok_or_else(|| format!("category {c} vanished"))?;
        let prompts = prompts::category_prompts(
            category,
            &generation.prompt_sources,
            generation.prompt_bank.as_deref(),
            generation.grammar_prompts,
            config.seed,
        )?;
        let first = prompt_table.len() as u32;
        let picks = prompts::assign(
            prompts.len(),
            generation.images_per_category,
            mix_seed(config.seed, c as u64, 1),
        );
        prompt_table.extend(prompts.into_iter().map(|p| (c, p)));
        for (index, pick) in picks.into_iter().enumerate() {
            jobs.push(Job {
                category: c,
                index,
                prompt_id: first + pick as u32,
                generator: generators[jobs.len()],
                seed: mix_seed(config.seed, c as u64, index as u64 + 2),
            });
        }
    }
    let prompts_json: Vec<serde_json::Value> = prompt_table
        .iter()
        .enumerate()
        .map(|(i, (c, p))| serde_json::json!({"id": i, "category_id": c, "prompt": p}))
        .collect();
    write_json(&out.join(PROMPTS), &prompts_json)?;

    // Memory plan.
    let gen_quant: Quantization = generation.quant.into();
    let mut diffusion: Vec<StableDiffusion> = (0..mix.generators.len())
        .map(|i| mix.open(i, gen_quant, device).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut estimates: Vec<(String, u64)> = Vec::new();
    for (g, sd) in mix.generators.iter().zip(&diffusion) {
        let b = sd.model_bytes().map_err(|e| e.to_string())?;
        estimates.push((format!("{} text encoder", g.id), b.text_encoder));
        estimates.push((format!("{} unet", g.id), b.unet));
        estimates.push((format!("{} decoder", g.id), b.decoder));
    }
    let sam_quant: Quantization = config.annotation.quant.into();
    let clip_quant: Quantization = config.filter.quant.into();
    let sam_bytes = Checkpoint::open(&config.annotation.sam)
        .map_err(|e| e.to_string())?
        .f32_bytes();
    let clip_weights = config.filter.clip.join("model.safetensors");
    let clip_bytes = Checkpoint::open(&clip_weights).map_err(|e| e.to_string())?.f32_bytes();
    estimates.push(("sam".into(), (sam_bytes as f64 * quantized_share(sam_quant)) as u64));
    estimates.push(("clip".into(), (clip_bytes as f64 * quantized_share(clip_quant)) as u64));
    let plan = scheduler::plan(&estimates, config.budget_mib.map(|m| m << 20))?;
    for p in &plan {
        log::info!(
            "memory plan: {} ≈ {:.0} MiB, {}",
            p.name,
            p.estimated_mib,
            if p.resident { "resident" } else { "loaded per batch" }
        );
    }
    for (i, sd) in diffusion.iter_mut().enumerate() {
        sd.set_residency(Residency {
            text_encoder: plan[3 * i].resident,
            unet: plan[3 * i + 1].resident,
            decoder: plan[3 * i + 2].resident,
        });
    }
    let n = plan.len();
    let mut sam = Slot::<Sam> {
        resident: plan[n - 2].resident,
        model: None,
    };
    let mut clip = Slot::<Clip> {
        resident: plan[n - 1].resident,
        model: None,
    };
    let load_sam = || Sam::load(&config.annotation.sam, sam_quant, device).map_err(|e| e.to_string());
    let load_clip = || Clip::load(&config.filter.clip, clip_quant, device).map_err(|e| e.to_string());
    let tokenizer = ClipTokenizer::from_dir(&config.filter.clip).map_err(|e| e.to_string())?;
    let mut stages = Stages::default();
    let mut peak = None;

    // Stage 3's real bank (cached), and text embeddings for categories without real instances.
    let start = Instant::now();
    let cache_dir = config.filter.cache.clone().unwrap_or_else(|| out.join("cache"));
    let key = filtering::bank_key(
        &config.real.annotations,
        &config.filter.clip,
        &format!("{clip_quant:?}"),
        config.filter.max_real_per_category,
    )?;
    let (bank, bank_stats) = {
        let model = clip.get(load_clip)?;
        filtering::real_bank(
            &cache_dir,
            &key,
            &categories.selected,
            &real,
            config.filter.max_real_per_category,
            model,
            device,
        )?
    };
    let no_real: Vec<u32> = categories
        .selected
        .iter()
        .copied()
        .filter(|c| !bank.categories.contains_key(c))
        .collect();
    let text_embeddings: HashMap<u32, Vec<f32>> = if config.filter.no_real == NoRealPolicy::Text && !no_real.is_empty()
    {
        let texts: Vec<String> = no_real
            .iter()
            .map(|&c| {
                format!(
                    "a photo of {}",
                    prompts::display_name(categories.get(c).expect("selected"))
                )
            })
            .collect();
        let model = clip.get(load_clip)?;
        no_real
            .iter()
            .copied()
            .zip(filtering::embed_texts(model, &tokenizer, &texts)?)
            .collect()
    } else {
        HashMap::new()
    };
    clip.release(device);
    stages.real_bank.add(start, bank_stats.crops);
    peak_mib(device, &mut peak);
    log::info!(
        "real bank: {} categories with real crops ({} cached, {} crops embedded now), {} without",
        bank.categories.len(),
        bank_stats.cached,
        bank_stats.crops,
        no_real.len()
    );

    // Stages 1–3, batch by batch.
    let pool_dir = out.join("pool");
    let rejected_dir = out.join("rejected");
    let resume_dir = out.join(RESUME);
    std::fs::create_dir_all(&resume_dir).map_err(|e| format!("{}: {e}", resume_dir.display()))?;
    let key_of = |job: &Job| JobKey {
        run_id: run_id.clone(),
        category_id: job.category,
        generator: mix.generators[job.generator].id.clone(),
        prompt: prompt_table[job.prompt_id as usize].1.clone(),
        seed: job.seed,
    };
    let saved_at = |job: &Job| resume_dir.join(format!("{}.json", job_name(job)));
    // Per job, what stages 1–3 made of it: read back from an interrupted run, or done now.
    let mut finished: Vec<Option<Finished>> = jobs
        .iter()
        .map(|job| Finished::load(out, &saved_at(job), &key_of(job), job))
        .collect();
    let resumed = finished.iter().filter(|f| f.is_some()).count();
    if resumed > 0 {
        log::info!(
            "resuming: {resumed} of {} instances were finished by an earlier run of this config",
            jobs.len()
        );
    }
    let pending: Vec<usize> = (0..jobs.len()).filter(|&j| finished[j].is_none()).collect();
    // Counts instances through all three stages; the message follows the denoising steps.
    let progress = crate::progress::Progress::new("instances", jobs.len() as u64);
    progress.set_position(resumed as u64);
    for batch in pending.chunks(generation.batch) {
        // Stage 1: each generator's share of the batch.
        let start = Instant::now();
        let mut images: Vec<(usize, RgbImage)> = Vec::with_capacity(batch.len());
        for (g, sd) in diffusion.iter_mut().enumerate() {
            let mine: Vec<usize> = batch.iter().copied().filter(|&j| jobs[j].generator == g).collect();
            if mine.is_empty() {
                continue;
            }
            let requests: Vec<Request> = mine
                .iter()
                .map(|&j| Request {
                    prompt: prompt_table[jobs[j].prompt_id as usize].1.clone(),
                    negative_prompt: generation.negative_prompt.clone(),
                    seed: jobs[j].seed,
                    latents: None,
                })
                .collect();
            let id = &mix.generators[g].id;
            let generated = sd
                .generate_observed(
                    &requests,
                    Some(&mut |done, total| {
                        progress.set_message(format!("generating {} with {id}: step {done}/{total}", mine.len()));
                        progress.set_position(finished.iter().filter(|f| f.is_some()).count() as u64);
                    }),
                )
                .map_err(|e| format!("generator {id:?}: {e}"))?;
            log::debug!(
                "generator {:?}: {} images, encode {:.0} ms, denoise {:.0} ms, decode {:.0} ms",
                mix.generators[g].id,
                mine.len(),
                generated.encode_ms,
                generated.denoise_ms,
                generated.decode_ms
            );
            images.extend(mine.into_iter().zip(generated.images));
            peak_mib(device, &mut peak);
        }
        images.sort_by_key(|(j, _)| *j);
        stages.generation.add(start, images.len());

        // Stage 2: SAM-background.
        progress.set_message(format!("annotating and filtering {}", batch.len()));
        let start = Instant::now();
        let mut annotated: Vec<Annotated> = Vec::with_capacity(images.len());
        {
            let model = sam.get(load_sam)?;
            for (j, image) in images {
                let embedding = model.embed_image(&image).map_err(|e| e.to_string())?;
                let prompt = annotation::corner_prompt(image.width(), image.height());
                let prediction = model.predict(&embedding, &prompt, true).map_err(|e| e.to_string())?;
                let logits = prediction
                    .masks
                    .get(BACKGROUND_MASK_INDEX)
                    .ok_or("SAM returned fewer than 3 masks")?;
                let result = annotation::instance_from_background(&image, logits, config.annotation.min_area);
                annotated.push(Annotated {
                    job: j,
                    sam_iou: prediction.iou[BACKGROUND_MASK_INDEX],
                    image,
                    result,
                });
            }
        }
        sam.release(device);
        peak_mib(device, &mut peak);
        stages.annotation.add(start, annotated.len());

        // Stage 3: CLIP inter-similarity.
        let start = Instant::now();
        let to_embed: Vec<RgbImage> = annotated
            .iter()
            .filter_map(|a| {
                a.result
                    .as_ref()
                    .ok()
                    .map(|r| annotation::black_background(&a.image, &r.raw_object))
            })
            .collect();
        let mut embedded = if to_embed.is_empty() {
            Vec::new()
        } else {
            let model = clip.get(load_clip)?;
            filtering::embed_images(model, &to_embed, device)?
        }
        .into_iter();
        clip.release(device);
        peak_mib(device, &mut peak);
        stages.filtering.add(start, to_embed.len());

        for a in annotated {
            let job = &jobs[a.job];
            let name = job_name(job);
            let generator = mix.generators[job.generator].id.clone();
            let mut record = InstanceRecord {
                name: name.clone(),
                category_id: job.category,
                generator,
                prompt_id: job.prompt_id,
                prompt: prompt_table[job.prompt_id as usize].1.clone(),
                seed: job.seed,
                sam_iou: a.sam_iou,
                clip_score: None,
                score_kind: "none".into(),
                kept: false,
                drop_reason: None,
                crop: None,
                bbox: None,
                area_fraction: None,
            };
            let instance = match a.result {
                Err(reason) => {
                    record.drop_reason = Some(reason);
                    let done = Finished {
                        record,
                        embedding: None,
                        crop: None,
                    };
                    done.save(&saved_at(job), key_of(job))?;
                    finished[a.job] = Some(done);
                    progress.inc(1);
                    continue;
                }
                Ok(i) => i,
            };
            let e = embedded.next().ok_or("CLIP returned fewer embeddings than images")?;
            let (score, kind) = match bank.score(job.category, &e) {
                Some(s) => (Some(s), "real-bank"),
                None => match text_embeddings.get(&job.category) {
                    Some(t) => (Some(filtering::dot(t, &e)), "text"),
                    None => (None, "none"),
                },
            };
            let kept = match (kind, score) {
                ("real-bank", Some(s)) => s >= config.filter.threshold,
                ("text", Some(s)) => s >= config.filter.text_threshold,
                _ => config.filter.no_real == NoRealPolicy::Keep,
            };
            record.clip_score = score;
            record.score_kind = kind.into();
            record.kept = kept;
            record.bbox = Some(instance.bbox);
            record.area_fraction = Some(instance.area_fraction);
            let (dir, rel) = if kept {
                (
                    pool_dir.join(job.category.to_string()),
                    format!("pool/{}/{name}.png", job.category),
                )
            } else {
                record.drop_reason = Some(DropReason::ClipFilter);
                (
                    rejected_dir.join(job.category.to_string()),
                    format!("rejected/{}/{name}.png", job.category),
                )
            };
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let png = encode_rgba(&instance.crop)?;
            let path = out.join(&rel);
            divergen_dataset::files::write_atomically(&path, &png).map_err(|e| format!("{}: {e}", path.display()))?;
            record.crop = Some(rel);
            let done = Finished {
                record,
                embedding: Some(e),
                crop: kept.then(|| Arc::new(instance.crop)),
            };
            done.save(&saved_at(job), key_of(job))?;
            finished[a.job] = Some(done);
            progress.inc(1);
        }
    }
    // In job order, as an uninterrupted run has them: the pool's balanced draw depends on it.
    let mut records: Vec<InstanceRecord> = Vec::with_capacity(jobs.len());
    let mut embeddings: Vec<Option<Vec<f32>>> = Vec::with_capacity(jobs.len());
    let mut pool_instances: Vec<PoolInstance> = Vec::new();
    for (job, done) in jobs.iter().zip(finished) {
        let done = done.ok_or("an instance was neither resumed nor generated")?;
        if let Some(crop) = done.crop {
            pool_instances.push(PoolInstance {
                category_id: job.category,
                crop,
                generator_id: job.generator as u16,
                prompt_id: job.prompt_id,
                clip_score: done.record.clip_score.unwrap_or(f32::NAN),
                sam_iou: done.record.sam_iou,
            });
        }
        records.push(done.record);
        embeddings.push(done.embedding);
    }
    progress.finish();
    for sd in &mut diffusion {
        sd.unload();
    }
    sam.model = None;
    clip.model = None;
    device.memory_cleanup();

    // The instance pool: X-Paste's `{"<0-based id>": ["*<path>", …]}` plus our records.
    write_pool(out, &pool_dir, &records)?;
    write_json(&out.join(INSTANCES), &records)?;

    // Stage 4: paste onto the real images.
    let start = Instant::now();
    let pool = Pool::new(pool_instances);
    let (dataset_dir, outbox_dir) = (out.join("dataset"), out.join("outbox"));
    let target = match destination {
        Destination::Local => Target::Local {
            dir: &dataset_dir,
            shard_size: config.output.shard_size,
        },
        Destination::Host(host) => Target::Stream {
            host,
            outbox: &outbox_dir,
        },
    };
    let mut sink = Sink::open(target, &config.device_id, &run_id, categories.table.clone())?;
    let count = config.paste.images.unwrap_or(real.images.len());
    let mut paste = PasteReport::default();
    let bar = crate::progress::Progress::new("paste", count as u64);
    for i in 0..count {
        let Some(real_image) = real.images.get(i % real.images.len().max(1)) else {
            break;
        };
        let mut image = real_image.open()?;
        let (w, h) = (image.width(), image.height());
        let mut layers = Vec::with_capacity(real_image.annotations.len());
        for a in &real_image.annotations {
            if a.iscrowd != 0 || categories.get(a.category_id).is_none() {
                paste.real_annotations_skipped += 1;
                continue;
            }
            let mask = match a.segmentation.to_mask(w, h) {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("{}: annotation {}: {e}; left out", real.source.display(), a.id);
                    paste.real_annotations_skipped += 1;
                    continue;
                }
            };
            let Some(bbox) = augmentation::mask_box(&mask, w as usize, h as usize) else {
                paste.real_annotations_skipped += 1;
                continue;
            };
            paste.real_annotations += 1;
            layers.push(Layer {
                category_id: a.category_id,
                mask,
                bbox,
                source: None,
            });
        }
        let mut rng = StdRng::seed_from_u64(mix_seed(config.seed, i as u64, 0x9a57e));
        let (layers, stats) = augmentation::paste(
            &mut image,
            layers,
            &pool,
            &categories.area_stats,
            &config.paste,
            &mut rng,
        );
        add_paste_stats(&mut paste, &stats);
        let sample = to_sample(config, &run_id, i as u64, &image, &layers, &real_image.entry)?;
        sink.send(sample)?;
        paste.images += 1;
        bar.inc(1);
    }
    bar.finish();
    let output = sink.finish()?;
    paste.instances_per_image = if paste.images > 0 {
        paste.instances_pasted as f64 / paste.images as f64
    } else {
        0.0
    };
    stages.augmentation.add(start, paste.images as usize);

    let category_reports = category_reports(&categories, &records, &embeddings, &bank);
    let mut drops: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        if let Some(reason) = r.drop_reason {
            *drops.entry(reason_name(reason)).or_default() += 1;
        }
    }
    let manifest = RunManifest {
        run_id,
        device_id: config.device_id.clone(),
        seed: config.seed,
        device: device_name.to_string(),
        budget_mib: config.budget_mib,
        plan,
        peak_device_mib: peak,
        stages,
        real_bank: bank_stats,
        generated: records.len(),
        kept: records.iter().filter(|r| r.kept).count(),
        drops,
        categories: category_reports,
        paste,
        output,
        pool: pool_dir.join("pool.json").display().to_string(),
        config: config.clone(),
    };
    write_json(&manifest_path, &manifest)?;
    Ok(manifest)
}

fn add_paste_stats(report: &mut PasteReport, stats: &PasteStats) {
    report.instances_pasted += stats.pasted as u64;
    report.rejected_by_size += stats.rejected_size as u64;
    report.dropped_by_occlusion += stats.occluded_dropped as u64;
}

pub fn reason_name(reason: DropReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| format!("{reason:?}"))
}

fn category_reports(
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

fn to_sample(
    config: &RunConfig,
    run_id: &str,
    seq: u64,
    image: &RgbImage,
    layers: &[Layer],
    entry: &real_data::ImageEntry,
) -> Result<Sample, String> {
    let (w, h) = (image.width(), image.height());
    let instances = layers
        .iter()
        .map(|l| {
            let bytes: Vec<u8> = l.mask.iter().map(|&m| m as u8).collect();
            let [x0, y0, x1, y1] = l.bbox;
            Instance {
                category_id: l.category_id,
                bbox: [x0 as f32, y0 as f32, (x1 - x0) as f32, (y1 - y0) as f32],
                mask: Rle::from_row_major(h, w, &bytes),
                origin: match l.source {
                    None => Origin::Real,
                    Some(p) => Origin::Generated {
                        generator_id: p.generator_id,
                        prompt_id: p.prompt_id,
                        clip_score: if p.clip_score.is_finite() { p.clip_score } else { 0.0 },
                        sam_iou: p.sam_iou,
                    },
                },
            }
        })
        .collect();
    let sample = Sample {
        provenance: Provenance {
            device_id: config.device_id.clone(),
            run_id: run_id.to_string(),
            seed: config.seed,
            seq,
        },
        width: w,
        height: h,
        image: ImageData::Png(divergen_dataset::files::encode_png(w, h, image.as_raw())),
        instances,
        neg_category_ids: negative_categories(entry, layers),
        not_exhaustive_category_ids: entry.not_exhaustive_category_ids.clone(),
    };
    Ok(sample)
}

/// The real image's verified-absent categories, less every category the sample now annotates
/// (pasting a category makes it present) and any it lists as not exhaustively annotated (present
/// too), so LVIS's federated loss never trains an annotated instance as background.
fn negative_categories(entry: &real_data::ImageEntry, layers: &[augmentation::Layer]) -> Vec<u32> {
    entry
        .neg_category_ids
        .iter()
        .copied()
        .filter(|c| !layers.iter().any(|l| l.category_id == *c) && !entry.not_exhaustive_category_ids.contains(c))
        .collect()
}

fn encode_rgba(image: &image::RgbaImage) -> Result<Vec<u8>, String> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(png)
}

pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    divergen_dataset::files::write_atomically(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// X-Paste's pool file: 0-based category index → `*`-prefixed paths of pre-cropped RGBA
/// instances (the `*` tells its loader they are already processed). Paths are absolute so the
/// file works from any working directory.
fn write_pool(out: &Path, pool_dir: &Path, records: &[InstanceRecord]) -> Result<(), String> {
    std::fs::create_dir_all(pool_dir).map_err(|e| format!("{}: {e}", pool_dir.display()))?;
    let root = std::fs::canonicalize(out).map_err(|e| format!("{}: {e}", out.display()))?;
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
pub fn read_records(dir: &Path) -> Result<Vec<InstanceRecord>, String> {
    let path = dir.join(INSTANCES);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pasted_category_leaves_the_negative_list() {
        let entry = real_data::ImageEntry {
            id: 1,
            file_name: None,
            coco_url: None,
            width: 2,
            height: 1,
            neg_category_ids: vec![3, 5, 7, 9],
            not_exhaustive_category_ids: vec![9],
        };
        let layer = |category_id, source| Layer {
            category_id,
            mask: vec![true, false],
            bbox: [0, 0, 1, 1],
            source,
        };
        let pasted = augmentation::PastedFrom {
            generator_id: 0,
            prompt_id: 0,
            clip_score: 0.7,
            sam_iou: 0.9,
        };
        let layers = [layer(5, Some(pasted)), layer(2, None)];
        // 5 is pasted here; 9 is listed as present-but-not-exhaustive, so it is not absent.
        assert_eq!(negative_categories(&entry, &layers), vec![3, 7]);
    }
}

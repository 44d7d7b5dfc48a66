//! `divergen run`: DiverGen's four stages on the device, under a memory budget.
//!
//! 1. [`generation`] — categories × prompts × generators, batched;
//! 2. [`annotation`] — SAM-background;
//! 3. [`filtering`] — CLIP inter-similarity against a cached real bank;
//! 4. [`augmentation`] — instance paste onto the real images, written as LVIS/COCO shards or
//!    streamed to a host ([`output`], as [`sample`]s).
//!
//! Stages 1–3 run per batch of `generation.batch` images, with the models the [`memory`] plan
//! keeps or reloads, and save each instance as it is done ([`resume`]); stage 4 runs once the
//! instance pool is complete, because DiverGen's category-balanced draw is defined over the
//! whole pool (pasting from a partial pool would over-draw the categories generated first).
//! [`manifest`] is what the run writes about itself.

pub mod annotation;
pub mod augmentation;
pub mod categories;
pub mod config;
pub mod filtering;
pub mod generation;
pub mod manifest;
pub mod mask;
pub mod memory;
pub mod output;
pub mod prompts;
pub mod real_data;
pub mod report;
pub mod resume;
pub mod sample;
pub mod scheduler;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::diffusion::mix::GeneratorMix;
use image::RgbImage;
use sha2::{Digest, Sha256};

pub use self::generation::mix_seed;
pub use self::manifest::{CategoryReport, InstanceRecord, RunManifest, StageReport, Stages, read_records, write_json};
use crate::{Error, Result};

use self::annotation::{Annotation, DropReason};
use self::augmentation::{Pool, PoolInstance};
use self::categories::Categories;
use self::config::RunConfig;
use self::filtering::References;
use self::generation::{Job, Plan};
use self::memory::{Models, PeakMemory};
use self::output::{Sink, Target};
use self::real_data::RealDataset;
use self::resume::{Finished, Resume};

/// Where `divergen run` sends the pasted samples.
#[derive(Clone, Debug)]
pub enum Destination {
    /// `<out>/dataset/`, as `divergen-host` writes it.
    Local,
    /// A `divergen-host serve` address (`host:port`, `serial:PATH`, `stdio`).
    Host(String),
}

pub const MANIFEST: &str = "run.json";
pub const INSTANCES: &str = "instances.json";
pub const PROMPTS: &str = "prompts.json";
/// Folder of per-instance results (`<name>.json`), so a killed run resumes where it stopped.
pub const RESUME: &str = "resume";

/// The run id: a hash of everything that shapes the output (not the budget, batch size or cache
/// folder, which only change how it is computed), so rerunning the same run resumes it: the host
/// and the local store drop what they already hold.
pub fn run_id(config: &RunConfig) -> Result<String> {
    let mut shaping = config.clone();
    shaping.budget_mib = None;
    shaping.generation.batch = 0;
    shaping.filter.cache = None;
    let json = serde_json::to_vec(&shaping)?;
    Ok(format!("run-{}", &filtering::hex(&Sha256::digest(&json))[..16]))
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
fn check_unknown_categories(real: &RealDataset, categories: &Categories, config: &RunConfig) -> Result<()> {
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
        config::UnknownCategories::Error => Err(format!("{what} (real.unknown_categories = \"error\")").into()),
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
) -> Result<RunManifest> {
    let run_id = run_id(config)?;
    let categories = Categories::load(&config.categories)?;
    let real = RealDataset::load(&config.real.annotations, &config.real.images)?;
    check_unknown_categories(&real, &categories, config)?;
    let mix = GeneratorMix::new(config.generation.generators.clone())?;
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let manifest_path = out.join(MANIFEST);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).map_err(Error::io(&manifest_path))?;
    }
    log::info!(
        "run {run_id}: {} categories × {} images, {} generators, {} real images",
        categories.selected.len(),
        config.generation.images_per_category,
        mix.generators.len(),
        real.images.len()
    );
    let plan = Plan::new(config, &categories, &mix)?;
    write_json(&out.join(PROMPTS), &plan.prompts_json())?;
    let mut models = Models::plan(config, &mix, device)?;
    let tokenizer = ClipTokenizer::from_dir(&config.filter.clip)?;
    let mut stages = Stages::default();
    let mut peak = PeakMemory::default();

    // Stage 3's references come first: the real bank is shared by every batch.
    let start = Instant::now();
    let cache_dir = config.filter.cache.clone().unwrap_or_else(|| out.join("cache"));
    let references = References::build(
        config,
        &cache_dir,
        &categories,
        &real,
        &mut models.clip,
        &tokenizer,
        device,
    )?;
    models.clip.release(device);
    stages.real_bank.add(start, references.stats.crops);
    peak.sample(device);
    log::info!(
        "real bank: {} categories with real crops ({} cached, {} crops embedded now), {} without",
        references.bank.categories.len(),
        references.stats.cached,
        references.stats.crops,
        references.without_real.len()
    );

    // Stages 1–3, then the pool in job order, as an uninterrupted run has it: the pool's balanced
    // draw depends on that order.
    let finished = instances(
        config,
        out,
        &run_id,
        &plan,
        &mix,
        &mut models,
        &references,
        &mut stages,
        &mut peak,
        device,
    )?;
    let (records, embeddings, pool_instances) = split_finished(&plan, finished);
    models.unload_all(device);
    let pool_dir = out.join("pool");
    manifest::write_pool(out, &pool_dir, &records)?;
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
    let paste = augmentation::paste_all(config, &run_id, &real, &categories, &pool, &mut sink)?;
    let output = sink.finish()?;
    stages.augmentation.add(start, paste.images as usize);

    let manifest = RunManifest {
        run_id,
        device_id: config.device_id.clone(),
        seed: config.seed,
        device: device_name.to_string(),
        budget_mib: config.budget_mib,
        plan: models.plan,
        peak_device_mib: peak.0,
        stages,
        generated: records.len(),
        kept: records.iter().filter(|r| r.kept).count(),
        drops: manifest::drop_counts(&records),
        categories: manifest::category_reports(&categories, &records, &embeddings, &references.bank),
        real_bank: references.stats,
        paste,
        output,
        pool: pool_dir.join("pool.json").display().to_string(),
        config: config.clone(),
    };
    write_json(&manifest_path, &manifest)?;
    Ok(manifest)
}

/// Stages 1–3 over every job an earlier run of this config did not finish, batch by batch
/// (generate K, annotate K, filter K), each instance saved as soon as it is done; in job order.
#[allow(clippy::too_many_arguments)]
fn instances(
    config: &RunConfig,
    out: &Path,
    run_id: &str,
    plan: &Plan,
    mix: &GeneratorMix,
    models: &mut Models,
    references: &References,
    stages: &mut Stages,
    peak: &mut PeakMemory,
    device: &Device,
) -> Result<Vec<Finished>> {
    let generator_ids = mix.generators.iter().map(|g| g.id.clone()).collect();
    let resume = Resume::open(out, run_id, plan, generator_ids)?;
    let mut finished: Vec<Option<Finished>> = plan.jobs.iter().map(|job| resume.load(job)).collect();
    let resumed = finished.iter().filter(|f| f.is_some()).count();
    if resumed > 0 {
        log::info!(
            "resuming: {resumed} of {} instances were finished by an earlier run of this config",
            plan.jobs.len()
        );
    }
    let pending: Vec<usize> = (0..plan.jobs.len()).filter(|&j| finished[j].is_none()).collect();
    // Counts instances through all three stages; the message follows the denoising steps.
    let progress = crate::progress::Progress::new("instances", plan.jobs.len() as u64);
    progress.set_position(resumed as u64);
    for batch in pending.chunks(config.generation.batch) {
        let start = Instant::now();
        let done = finished.iter().filter(|f| f.is_some()).count() as u64;
        let images = generation::generate(
            plan,
            batch,
            mix,
            &mut models.diffusion,
            &config.generation.negative_prompt,
            &progress,
            done,
            device,
            peak,
        )?;
        stages.generation.add(start, images.len());

        progress.set_message(format!("annotating and filtering {}", batch.len()));
        let start = Instant::now();
        let mut annotated: Vec<(usize, RgbImage, Annotation)> = Vec::with_capacity(images.len());
        {
            let sam = models.sam.get()?;
            for (j, image) in images {
                let annotation = annotation::annotate(sam, &image, config.annotation.min_area)?;
                annotated.push((j, image, annotation));
            }
        }
        models.sam.release(device);
        peak.sample(device);
        stages.annotation.add(start, annotated.len());

        let start = Instant::now();
        let to_embed: Vec<RgbImage> = annotated
            .iter()
            .filter_map(|(_, image, a)| {
                a.instance
                    .as_ref()
                    .ok()
                    .map(|i| annotation::black_background(image, &i.raw_object))
            })
            .collect();
        let mut embedded = if to_embed.is_empty() {
            Vec::new()
        } else {
            filtering::embed_images(models.clip.get()?, &to_embed, device)?
        }
        .into_iter();
        models.clip.release(device);
        peak.sample(device);
        stages.filtering.add(start, to_embed.len());

        for (j, _, a) in annotated {
            let job = &plan.jobs[j];
            let embedding = match &a.instance {
                Ok(_) => Some(embedded.next().ok_or("CLIP returned fewer embeddings than images")?),
                Err(_) => None,
            };
            let done = finish(config, out, plan, mix, job, a, embedding, references)?;
            resume.save(job, &done)?;
            finished[j] = Some(done);
            progress.inc(1);
        }
    }
    progress.finish();
    finished
        .into_iter()
        .map(|f| f.ok_or_else(|| "an instance was neither resumed nor generated".into()))
        .collect()
}

/// The records and embeddings of every instance, and the kept ones as the paste pool.
fn split_finished(
    plan: &Plan,
    finished: Vec<Finished>,
) -> (Vec<InstanceRecord>, Vec<Option<Vec<f32>>>, Vec<PoolInstance>) {
    let mut records: Vec<InstanceRecord> = Vec::with_capacity(plan.jobs.len());
    let mut embeddings: Vec<Option<Vec<f32>>> = Vec::with_capacity(plan.jobs.len());
    let mut pool_instances: Vec<PoolInstance> = Vec::new();
    for (job, done) in plan.jobs.iter().zip(finished) {
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
    (records, embeddings, pool_instances)
}

/// One instance's record after stages 1–3, its crop written under `pool/` when kept and under
/// `rejected/` when the CLIP filter dropped it.
#[allow(clippy::too_many_arguments)]
fn finish(
    config: &RunConfig,
    out: &Path,
    plan: &Plan,
    mix: &GeneratorMix,
    job: &Job,
    annotation: Annotation,
    embedding: Option<Vec<f32>>,
    references: &References,
) -> Result<Finished> {
    let name = job.name();
    let mut record = InstanceRecord {
        name: name.clone(),
        category_id: job.category,
        generator: mix.generators[job.generator].id.clone(),
        prompt_id: job.prompt_id,
        prompt: plan.prompt(job).to_string(),
        seed: job.seed,
        sam_iou: annotation.sam_iou,
        clip_score: None,
        score_kind: "none".into(),
        kept: false,
        drop_reason: None,
        crop: None,
        bbox: None,
        area_fraction: None,
    };
    let (instance, embedding) = match (annotation.instance, embedding) {
        (Err(reason), _) => {
            record.drop_reason = Some(reason);
            return Ok(Finished {
                record,
                embedding: None,
                crop: None,
            });
        }
        (Ok(i), Some(e)) => (i, e),
        (Ok(_), None) => return Err(format!("{name}: annotated but not embedded").into()),
    };
    let judgement = references.judge(job.category, &embedding, &config.filter);
    record.clip_score = judgement.score;
    record.score_kind = judgement.kind.into();
    record.kept = judgement.kept;
    record.bbox = Some(instance.bbox.xywh());
    record.area_fraction = Some(instance.area_fraction);
    let folder = if judgement.kept {
        "pool"
    } else {
        record.drop_reason = Some(DropReason::ClipFilter);
        "rejected"
    };
    let rel = format!("{folder}/{}/{name}.png", job.category);
    let path = out.join(&rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    let png = encode_rgba(&instance.crop)?;
    divergen_dataset::files::write_atomically(&path, &png).map_err(Error::io(&path))?;
    record.crop = Some(rel);
    Ok(Finished {
        record,
        embedding: Some(embedding),
        crop: judgement.kept.then(|| Arc::new(instance.crop)),
    })
}

fn encode_rgba(image: &image::RgbaImage) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(png)
}

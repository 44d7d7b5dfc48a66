//! Each instance's result through stages 1–3 is saved as soon as it exists (`resume/<name>.json`,
//! after its crop), so a killed run, rerun with the same config, starts where it stopped and
//! ends with the output an uninterrupted run gives.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbaImage;
use serde::{Deserialize, Serialize};

use super::generation::{Job, Plan};
use super::manifest::{InstanceRecord, write_json};
use crate::{Error, Result};

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

#[derive(Serialize, Deserialize)]
struct SavedInstance {
    key: JobKey,
    record: InstanceRecord,
    embedding: Option<Vec<f32>>,
}

/// An instance through stages 1–3: its record, its CLIP embedding (when it got that far) and,
/// when kept, its RGBA crop for stage 4.
pub struct Finished {
    pub record: InstanceRecord,
    pub embedding: Option<Vec<f32>>,
    pub crop: Option<Arc<RgbaImage>>,
}

/// The run's `resume/` folder.
pub struct Resume<'a> {
    out: &'a Path,
    dir: PathBuf,
    run_id: &'a str,
    plan: &'a Plan,
    generator_ids: Vec<String>,
}

impl<'a> Resume<'a> {
    pub fn open(out: &'a Path, run_id: &'a str, plan: &'a Plan, generator_ids: Vec<String>) -> Result<Self> {
        let dir = out.join(super::RESUME);
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        Ok(Resume {
            out,
            dir,
            run_id,
            plan,
            generator_ids,
        })
    }

    fn key(&self, job: &Job) -> JobKey {
        JobKey {
            run_id: self.run_id.to_string(),
            category_id: job.category,
            generator: self.generator_ids[job.generator].clone(),
            prompt: self.plan.prompt(job).to_string(),
            seed: job.seed,
        }
    }

    fn path(&self, job: &Job) -> PathBuf {
        self.dir.join(format!("{}.json", job.name()))
    }

    /// Written after the crop PNG, through a renamed temporary file: a saved result always
    /// names a complete crop.
    pub fn save(&self, job: &Job, done: &Finished) -> Result<()> {
        let saved = SavedInstance {
            key: self.key(job),
            record: done.record.clone(),
            embedding: done.embedding.clone(),
        };
        write_json(&self.path(job), &saved)
    }

    /// A result an earlier run saved for `job`, if it is whole and was made by the same config;
    /// anything else is regenerated (with a warning when a file was there but unusable).
    pub fn load(&self, job: &Job) -> Option<Finished> {
        let path = self.path(job);
        let bytes = std::fs::read(&path).ok()?;
        let unusable = |why: &str| {
            log::warn!("{}: {why}; the instance is generated again", path.display());
            None
        };
        let Ok(saved) = serde_json::from_slice::<SavedInstance>(&bytes) else {
            return unusable("not a saved instance");
        };
        if saved.key != self.key(job) {
            return unusable("made by another config or job");
        }
        let r = &saved.record;
        if r.name != job.name() || r.category_id != job.category || r.prompt_id != job.prompt_id {
            return unusable("its record names another job");
        }
        // Everything that reached CLIP has a crop (pool or rejected) and an embedding.
        if saved.embedding.is_some() != r.crop.is_some() {
            return unusable("its record and embedding disagree");
        }
        let crop = match (&r.crop, r.kept) {
            (Some(rel), kept) => {
                let Ok(image) = crate::images::open(&self.out.join(rel)) else {
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

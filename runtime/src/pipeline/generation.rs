//! Stage 1, instance generation: categories × prompts × generators. Every image is a job fixed
//! before anything runs (category, prompt, generator, seed), so a run's output depends on its
//! config alone, never on batch size, budget or what a killed run already finished.

use burn::tensor::Device;
use divergen_models::diffusion::mix::GeneratorMix;
use divergen_models::diffusion::pipeline::{Request, StableDiffusion};
use image::RgbImage;

use super::categories::Categories;
use super::config::RunConfig;
use super::memory::PeakMemory;
use super::prompts;
use crate::Result;
use crate::progress::Progress;

/// One image to generate.
pub struct Job {
    pub category: u32,
    /// Its place among its category's images.
    pub index: usize,
    /// Into [`Plan::prompts`].
    pub prompt_id: u32,
    /// Into the generator mix.
    pub generator: usize,
    pub seed: u64,
}

impl Job {
    /// `<category>-<index>`, the name of its crop, record and saved result.
    pub fn name(&self) -> String {
        format!("{:05}-{:05}", self.category, self.index)
    }
}

/// Stage 1's plan: every prompt of every category (`prompts.json`), and one job per image.
pub struct Plan {
    /// `(category id, prompt)`, indexed by prompt id.
    pub prompts: Vec<(u32, String)>,
    pub jobs: Vec<Job>,
}

impl Plan {
    pub fn new(config: &RunConfig, categories: &Categories, mix: &GeneratorMix) -> Result<Self> {
        let generation = &config.generation;
        let mut plan = Plan {
            prompts: Vec::new(),
            jobs: Vec::new(),
        };
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
            let first = plan.prompts.len() as u32;
            let picks = prompts::assign(
                prompts.len(),
                generation.images_per_category,
                mix_seed(config.seed, c as u64, 1),
            );
            plan.prompts.extend(prompts.into_iter().map(|p| (c, p)));
            for (index, pick) in picks.into_iter().enumerate() {
                plan.jobs.push(Job {
                    category: c,
                    index,
                    prompt_id: first + pick as u32,
                    generator: generators[plan.jobs.len()],
                    seed: mix_seed(config.seed, c as u64, index as u64 + 2),
                });
            }
        }
        Ok(plan)
    }

    pub fn prompt(&self, job: &Job) -> &str {
        &self.prompts[job.prompt_id as usize].1
    }

    /// `prompts.json`: `[{"id", "category_id", "prompt"}]`.
    pub fn prompts_json(&self) -> Vec<serde_json::Value> {
        self.prompts
            .iter()
            .enumerate()
            .map(|(i, (c, p))| serde_json::json!({"id": i, "category_id": c, "prompt": p}))
            .collect()
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

/// Draws the images of `batch` (job indices), each generator its share; in job order.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    plan: &Plan,
    batch: &[usize],
    mix: &GeneratorMix,
    diffusion: &mut [StableDiffusion],
    negative_prompt: &str,
    progress: &Progress,
    done: u64,
    device: &Device,
    peak: &mut PeakMemory,
) -> Result<Vec<(usize, RgbImage)>> {
    let mut images: Vec<(usize, RgbImage)> = Vec::with_capacity(batch.len());
    for (g, sd) in diffusion.iter_mut().enumerate() {
        let mine: Vec<usize> = batch.iter().copied().filter(|&j| plan.jobs[j].generator == g).collect();
        if mine.is_empty() {
            continue;
        }
        let requests: Vec<Request> = mine
            .iter()
            .map(|&j| Request {
                prompt: plan.prompt(&plan.jobs[j]).to_string(),
                negative_prompt: negative_prompt.to_string(),
                seed: plan.jobs[j].seed,
                latents: None,
            })
            .collect();
        let id = &mix.generators[g].id;
        let generated = sd
            .generate_observed(
                &requests,
                Some(&mut |step, steps| {
                    progress.set_message(format!("generating {} with {id}: step {step}/{steps}", mine.len()));
                    progress.set_position(done);
                }),
            )
            .map_err(|e| format!("generator {id:?}: {e}"))?;
        log::debug!(
            "generator {id:?}: {} images, encode {:.0} ms, denoise {:.0} ms, decode {:.0} ms",
            mine.len(),
            generated.encode_ms,
            generated.denoise_ms,
            generated.decode_ms
        );
        images.extend(mine.into_iter().zip(generated.images));
        peak.sample(device);
    }
    images.sort_by_key(|(j, _)| *j);
    Ok(images)
}

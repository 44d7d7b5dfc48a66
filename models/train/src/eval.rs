//! `divergen-train eval`: the embedded default's quality bars, measured on the procedural domain's
//! held-out data through the same loaders and kernels the pipeline uses.

use std::path::Path;

use burn::tensor::Device;
use divergen_models::clip::tokenizer::ClipTokenizer;
use divergen_models::clip::{Clip, Quantization};
use divergen_runtime::{Error, Result};
use serde::Serialize;

use divergen_runtime::pipeline::filtering::{dot, embed_images, embed_texts};
use divergen_runtime::pipeline::mask::Mask;

pub use divergen_runtime::domain::RenderRecord as Render;

pub use divergen_runtime::domain::CatInfo;

pub fn read_renders(domain: &Path, split: &str) -> Result<Vec<Render>> {
    let path = domain.join("renders").join(format!("{split}.jsonl"));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (write the domain with `divergen domain`)", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1).into()))
        .collect()
}

/// The domain's `categories.json`.
pub fn read_categories(domain: &Path) -> Result<Vec<CatInfo>> {
    let path = domain.join("categories.json");
    let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()).into())
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
pub fn clip_zero_shot(clip_dir: &Path, domain: &Path, quant: Quantization, device: &Device) -> Result<ZeroShot> {
    let categories = read_categories(domain)?;
    let renders = read_renders(domain, "val")?;
    let clip = Clip::load(clip_dir, quant, device)?;
    let tokenizer = ClipTokenizer::from_dir(clip_dir)?;
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

#[derive(Clone, Debug, Serialize)]
pub struct SamQuality {
    /// Held-out white-background renders, prompted with DiverGen's 4 corners and cleaned up as
    /// stage 2 does (inverted third multimask output, largest filled component).
    pub renders: usize,
    pub render_iou: f64,
    /// Renders whose mask came out empty or degenerate (IoU 0, counted in the mean).
    pub render_drops: usize,
    /// Held-out scene instances, prompted with their box, single-mask output.
    pub scene_instances: usize,
    pub box_iou: f64,
    pub per_category: Vec<CategoryIou>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CategoryIou {
    pub id: u32,
    pub name: String,
    pub renders: usize,
    pub render_iou: f64,
    /// Held-out scene instances of the category (rare ones may have none).
    pub instances: usize,
    pub box_iou: f64,
}

pub fn iou(a: &[bool], b: &[bool]) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        inter += (x && y) as usize;
        union += (x || y) as usize;
    }
    if union == 0 { 1.0 } else { inter as f64 / union as f64 }
}

/// The mask stage 2 keeps, at the image's size: the crop's alpha placed back at its box.
pub fn annotated_mask(a: &divergen_runtime::pipeline::annotation::Annotated, w: u32, h: u32) -> Mask {
    let mut mask = Mask::empty(w, h);
    for (x, y, p) in a.crop.enumerate_pixels() {
        if p.0[3] > 0 {
            mask.set(a.bbox.x0 + x, a.bbox.y0 + y);
        }
    }
    mask
}

/// SAM's two quality bars on the domain's held-out data; `limit` takes every n-th item for a
/// quick check.
pub fn sam_quality(
    sam_path: &Path,
    domain: &Path,
    stride: usize,
    quant: Quantization,
    device: &Device,
) -> Result<SamQuality> {
    use divergen_models::sam::{Prompt, Sam};
    use divergen_runtime::pipeline::annotation::annotate;
    use divergen_runtime::pipeline::real_data::RealDataset;
    let stride = stride.max(1);
    let categories = read_categories(domain)?;
    let sam = Sam::load(sam_path, quant, device)?;
    let k_of = |id: u32| categories.iter().position(|c| c.id == id).ok_or("unknown category");
    let mut render_sum = vec![(0f64, 0usize); categories.len()];
    let mut drops = 0;
    let dir = domain.join("renders/val");
    for r in read_renders(domain, "val")?.iter().step_by(stride) {
        let path = dir.join(&r.file);
        let image = image::open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_rgb8();
        let mask_path = dir.join(&r.mask);
        let truth: Vec<bool> = image::open(&mask_path)
            .map_err(|e| format!("{}: {e}", mask_path.display()))?
            .into_luma8()
            .pixels()
            .map(|p| p.0[0] > 127)
            .collect();
        let score = match annotate(&sam, &image, 0.0)?.instance {
            Ok(a) => iou(annotated_mask(&a, image.width(), image.height()).bits(), &truth),
            Err(_) => {
                drops += 1;
                0.0
            }
        };
        let k = k_of(r.category_id)?;
        render_sum[k].0 += score;
        render_sum[k].1 += 1;
    }
    let scenes = RealDataset::load(&domain.join("scenes/val.json"), &domain.join("scenes/val"))?;
    let mut box_sum = vec![(0f64, 0usize); categories.len()];
    for img in scenes.images.iter().step_by(stride) {
        let image = img.open()?;
        let (w, h) = (image.width(), image.height());
        let embedding = sam.embed_image(&image)?;
        for a in &img.annotations {
            let truth = a.segmentation.to_mask(w, h)?;
            let Some(b) = truth.bounds() else {
                continue;
            };
            // SAM's box prompt names the last pixel inside, not the first outside.
            let prompt = Prompt {
                bbox: Some([b.x0 as f32, b.y0 as f32, (b.x1 - 1) as f32, (b.y1 - 1) as f32]),
                ..Default::default()
            };
            let prediction = sam.predict(&embedding, &prompt, false)?;
            let mask: Vec<bool> = prediction.masks[0].iter().map(|&l| l > 0.0).collect();
            let k = k_of(a.category_id)?;
            box_sum[k].0 += iou(&mask, truth.bits());
            box_sum[k].1 += 1;
        }
    }
    let mean = |v: &[(f64, usize)]| {
        let n: usize = v.iter().map(|x| x.1).sum();
        (v.iter().map(|x| x.0).sum::<f64>() / n.max(1) as f64, n)
    };
    let (render_iou, renders) = mean(&render_sum);
    let (box_iou, scene_instances) = mean(&box_sum);
    Ok(SamQuality {
        renders,
        render_iou,
        render_drops: drops,
        scene_instances,
        box_iou,
        per_category: categories
            .iter()
            .enumerate()
            .map(|(k, c)| CategoryIou {
                id: c.id,
                name: c.name.clone(),
                renders: render_sum[k].1,
                render_iou: render_sum[k].0 / render_sum[k].1.max(1) as f64,
                instances: box_sum[k].1,
                box_iou: box_sum[k].0 / box_sum[k].1.max(1) as f64,
            })
            .collect(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorCategory {
    pub id: u32,
    pub name: String,
    pub recognised: f64,
    /// Mean pairwise CLIP-embedding distance (1 − cos) of the generated images, and of the
    /// held-out real renders of the same category.
    pub diversity_generated: f64,
    pub diversity_real: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorQuality {
    pub images: usize,
    /// Generated images the CLIP assigns to their prompted category (zero-shot).
    pub recognised: f64,
    pub diversity_generated: f64,
    pub diversity_real: f64,
    pub seconds: f64,
    pub per_category: Vec<GeneratorCategory>,
}

/// The settings a generator quality run uses.
pub struct GeneratorEval<'a> {
    pub generator: &'a Path,
    pub clip: &'a Path,
    pub domain: &'a Path,
    pub per_category: usize,
    pub options: divergen_models::diffusion::pipeline::GenerateOptions,
    /// Where to write the generated images (one PNG per image), if anywhere.
    pub save: Option<&'a Path>,
}

/// Generates `per_category` images per category from its prompt bank (round-robin), then
/// measures recognition and within-category diversity with the CLIP.
pub fn generator_quality(e: &GeneratorEval, device: &Device) -> Result<GeneratorQuality> {
    use divergen_models::diffusion::pipeline::{Request, StableDiffusion};
    use divergen_runtime::pipeline::filtering::mean_pairwise_distance;
    let start = std::time::Instant::now();
    let categories = read_categories(e.domain)?;
    let mut sd = StableDiffusion::open(e.generator, &e.options, device).map_err(|x| x.to_string())?;
    let mut generated: Vec<Vec<image::RgbImage>> = Vec::new();
    for (k, c) in categories.iter().enumerate() {
        let bank_path = e.domain.join("prompt_bank").join(format!("{}.txt", c.id));
        let bank = std::fs::read_to_string(&bank_path).map_err(|x| format!("{}: {x}", bank_path.display()))?;
        let prompts: Vec<&str> = bank.lines().filter(|l| !l.trim().is_empty()).collect();
        if prompts.is_empty() {
            return Err(format!("{}: no prompts", bank_path.display()).into());
        }
        let requests: Vec<Request> = (0..e.per_category)
            .map(|i| Request {
                prompt: prompts[i % prompts.len()].to_string(),
                negative_prompt: String::new(),
                seed: divergen_runtime::pipeline::mix_seed(0xe7a1, k as u64, i as u64),
                latents: None,
            })
            .collect();
        let out = sd.generate(&requests).map_err(|x| x.to_string())?;
        if let Some(dir) = e.save {
            std::fs::create_dir_all(dir).map_err(|x| format!("{}: {x}", dir.display()))?;
            for (i, img) in out.images.iter().enumerate() {
                let p = dir.join(format!("{:03}-{i:03}.png", c.id));
                img.save(&p).map_err(|x| format!("{}: {x}", p.display()))?;
            }
        }
        generated.push(out.images);
    }
    sd.unload();
    let clip = Clip::load(e.clip, Quantization::None, device).map_err(|x| x.to_string())?;
    let tokenizer = ClipTokenizer::from_dir(e.clip).map_err(|x| x.to_string())?;
    let prompts: Vec<String> = categories.iter().map(|c| class_prompt(&c.name)).collect();
    let texts = embed_texts(&clip, &tokenizer, &prompts)?;
    let renders = read_renders(e.domain, "val")?;
    let dir = e.domain.join("renders/val");
    let mut per_category = Vec::new();
    let (mut right, mut total) = (0usize, 0usize);
    let (mut div_gen, mut div_real) = (Vec::new(), Vec::new());
    for (k, c) in categories.iter().enumerate() {
        let embedded = embed_images(&clip, &generated[k], device)?;
        let hits = embedded
            .iter()
            .filter(|v| {
                texts
                    .iter()
                    .enumerate()
                    .max_by(|a, b| dot(a.1, v).total_cmp(&dot(b.1, v)))
                    .map(|(i, _)| i)
                    == Some(k)
            })
            .count();
        right += hits;
        total += embedded.len();
        let mut real = Vec::new();
        for r in renders.iter().filter(|r| r.category_id == c.id) {
            let path = dir.join(&r.file);
            real.push(
                image::open(&path)
                    .map_err(|x| format!("{}: {x}", path.display()))?
                    .into_rgb8(),
            );
        }
        let real = embed_images(&clip, &real, device)?;
        let g = mean_pairwise_distance(&slices(&embedded)).unwrap_or(0.0);
        let r = mean_pairwise_distance(&slices(&real)).unwrap_or(0.0);
        div_gen.push(g);
        div_real.push(r);
        per_category.push(GeneratorCategory {
            id: c.id,
            name: c.name.clone(),
            recognised: hits as f64 / embedded.len().max(1) as f64,
            diversity_generated: g,
            diversity_real: r,
        });
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(GeneratorQuality {
        images: total,
        recognised: right as f64 / total.max(1) as f64,
        diversity_generated: mean(&div_gen),
        diversity_real: mean(&div_real),
        seconds: start.elapsed().as_secs_f64(),
        per_category,
    })
}

fn slices(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

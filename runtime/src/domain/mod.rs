//! The procedural domain behind the embedded default: 18 object categories with names and
//! definitions, a long-tailed frequency split, "real" scenes written as an LVIS-style dataset
//! (JSON + PNGs + per-category size statistics), single-object renders in a white background
//! with captions in DiverGen's prompt-bank style, and a prompt bank per category. Everything is a
//! pure function of the seed.

pub mod render;
pub mod shapes;

use std::collections::BTreeMap;
use std::path::Path;

use divergen_protocol::{Frequency, Rle};
use image::{GrayImage, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use self::render::{Appearance, background, caption, white_render};
use self::shapes::SHAPES;
use crate::Result;
use crate::pipeline::mix_seed;

#[derive(Clone, Debug, Serialize)]
pub struct DomainConfig {
    pub seed: u64,
    pub scene_width: u32,
    pub scene_height: u32,
    pub train_scenes: usize,
    pub val_scenes: usize,
    pub render_side: u32,
    pub train_renders_per_category: usize,
    pub val_renders_per_category: usize,
    pub bank_prompts: usize,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            seed: 0,
            scene_width: 128,
            scene_height: 96,
            train_scenes: 400,
            val_scenes: 80,
            render_side: 64,
            train_renders_per_category: 64,
            val_renders_per_category: 16,
            bank_prompts: 32,
        }
    }
}

/// Relative chance of each frequency group in a scene: frequent categories fill most scenes,
/// rare ones appear in a handful (LVIS's rare: at most 10 training images).
fn weight(f: Frequency) -> f64 {
    match f {
        Frequency::Frequent => 6.0,
        Frequency::Common => 1.5,
        Frequency::Rare => 0.12,
    }
}

/// Category id of shape `index` (COCO ids start at 1).
pub fn category_id(index: usize) -> u32 {
    index as u32 + 1
}

/// `categories.json`: the LVIS cat_info form the pipeline reads.
pub use divergen_dataset::coco::CatInfo;

/// One line of `renders/<split>.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenderRecord {
    pub file: String,
    pub mask: String,
    pub category_id: u32,
    pub caption: String,
    pub colour: String,
    pub texture: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DomainSummary {
    pub categories: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub train_instances: usize,
    pub val_instances: usize,
    pub renders: usize,
    /// Training images per frequency group: (group, min, max).
    pub image_counts: Vec<(String, u64, u64)>,
}

/// One scene: the image and its instances' visible masks (row-major) with category ids.
pub struct Scene {
    pub image: RgbImage,
    pub instances: Vec<(u32, Vec<bool>)>,
}

/// Instances smaller than this many visible pixels are not annotated.
const MIN_VISIBLE: usize = 40;

pub fn scene(config: &DomainConfig, split: u64, index: usize) -> Scene {
    let mut rng = StdRng::seed_from_u64(mix_seed(config.seed, split, index as u64));
    let (w, h) = (config.scene_width, config.scene_height);
    let mut image = background(w, h, &mut rng);
    let total: f64 = SHAPES.iter().map(|s| weight(s.frequency)).sum();
    let count = rng.random_range(2..=6);
    let mut instances: Vec<(u32, Vec<bool>)> = Vec::new();
    let side = w.min(h) as f64;
    for _ in 0..count {
        let mut pick = rng.random_range(0.0..total);
        let category = SHAPES
            .iter()
            .position(|s| {
                pick -= weight(s.frequency);
                pick < 0.0
            })
            .unwrap_or(SHAPES.len() - 1);
        let radius = rng.random_range(0.1 * side..0.3 * side);
        let centre = (rng.random_range(0.0..w as f64), rng.random_range(0.0..h as f64));
        let a = Appearance::random(category, centre, radius, std::f64::consts::PI, &mut rng);
        let mask = a.paint(&mut image);
        for (_, earlier) in instances.iter_mut() {
            earlier.iter_mut().zip(&mask).for_each(|(e, &m)| *e &= !m);
        }
        instances.push((category_id(category), mask));
    }
    instances.retain(|(_, m)| m.iter().filter(|&&v| v).count() >= MIN_VISIBLE);
    Scene { image, instances }
}

/// Writes the domain under `out`; returns what it wrote.
pub fn write(out: &Path, config: &DomainConfig) -> Result<DomainSummary> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| format!("{}: {e}", p.display())
    };
    let mut summary = DomainSummary {
        categories: SHAPES.len(),
        ..Default::default()
    };
    let (w, h) = (config.scene_width, config.scene_height);
    let mut image_count = vec![0u64; SHAPES.len()];
    let mut instance_count = vec![0u64; SHAPES.len()];
    let mut sizes: Vec<Vec<f64>> = vec![Vec::new(); SHAPES.len()];
    for (split, name, scenes) in [(1u64, "train", config.train_scenes), (2, "val", config.val_scenes)] {
        let dir = out.join("scenes").join(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut images = Vec::new();
        let mut annotations = Vec::new();
        for i in 0..scenes {
            let s = scene(config, split, i);
            let file = format!("{:06}.png", i + 1);
            let path = dir.join(&file);
            s.image.save(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let present: Vec<u32> = s.instances.iter().map(|(c, _)| *c).collect();
            // LVIS's negative labels: a few categories verified absent.
            let neg: Vec<u32> = (1..=SHAPES.len() as u32)
                .filter(|c| !present.contains(c))
                .take(3)
                .collect();
            images.push(serde_json::json!({
                "id": i + 1, "file_name": file, "width": w, "height": h,
                "neg_category_ids": neg, "not_exhaustive_category_ids": []
            }));
            let mut seen = std::collections::BTreeSet::new();
            for (c, mask) in &s.instances {
                let bytes: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
                let rle = Rle::from_row_major(h, w, &bytes);
                let [bx, by, bw, bh] = rle.bbox();
                annotations.push(serde_json::json!({
                    "id": annotations.len() + 1, "image_id": i + 1, "category_id": c,
                    "segmentation": {"size": [h, w], "counts": rle.counts},
                    "area": rle.area(), "bbox": [bx, by, bw, bh], "iscrowd": 0
                }));
                if split == 1 {
                    let k = (*c - 1) as usize;
                    instance_count[k] += 1;
                    seen.insert(k);
                    sizes[k].push(((bw * bh) as f64 / (w * h) as f64).sqrt());
                }
            }
            if split == 1 {
                seen.into_iter().for_each(|k| image_count[k] += 1);
                summary.train_instances += s.instances.len();
            } else {
                summary.val_instances += s.instances.len();
            }
        }
        let categories: Vec<serde_json::Value> = SHAPES
            .iter()
            .enumerate()
            .map(|(k, s)| serde_json::json!({"id": category_id(k), "name": s.name}))
            .collect();
        let json = serde_json::json!({"images": images, "annotations": annotations, "categories": categories});
        let path = out.join("scenes").join(format!("{name}.json"));
        write_json(&path, &json)?;
        if split == 1 {
            summary.train_images = scenes;
        } else {
            summary.val_images = scenes;
        }
    }

    let infos: Vec<CatInfo> = SHAPES
        .iter()
        .enumerate()
        .map(|(k, s)| CatInfo {
            id: category_id(k),
            name: s.name.into(),
            def: s.def.into(),
            synset: format!("{}.n.01", s.name),
            synonyms: vec![s.name.into()],
            frequency: s.frequency.code().into(),
            image_count: image_count[k],
            instance_count: instance_count[k],
        })
        .collect();
    write_json(&out.join("categories.json"), &infos)?;
    let stats: BTreeMap<String, [f64; 2]> = sizes
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            (category_id(k).to_string(), [mean, var.sqrt()])
        })
        .collect();
    write_json(&out.join("area_mean_std.json"), &stats)?;
    for f in [Frequency::Frequent, Frequency::Common, Frequency::Rare] {
        let counts: Vec<u64> = (0..SHAPES.len())
            .filter(|&k| SHAPES[k].frequency == f)
            .map(|k| image_count[k])
            .collect();
        let (lo, hi) = (
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        summary.image_counts.push((f.code().into(), lo, hi));
    }

    // Single-object renders with captions, and a prompt bank per category.
    for (split, name, per) in [
        (3u64, "train", config.train_renders_per_category),
        (4, "val", config.val_renders_per_category),
    ] {
        let dir = out.join("renders").join(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut lines = String::new();
        for k in 0..SHAPES.len() {
            for i in 0..per {
                let mut rng = StdRng::seed_from_u64(mix_seed(config.seed, split, (k * 100_000 + i) as u64));
                let (img, mask, a) = white_render(k, config.render_side, &mut rng);
                let stem = format!("{:03}-{:05}", category_id(k), i);
                let (file, mask_file) = (format!("{stem}.png"), format!("{stem}-mask.png"));
                img.save(dir.join(&file))
                    .map_err(|e| format!("{}: {e}", dir.join(&file).display()))?;
                let side = config.render_side;
                let m = GrayImage::from_raw(side, side, mask.iter().map(|&v| if v { 255 } else { 0 }).collect())
                    .ok_or("mask size mismatch")?;
                m.save(dir.join(&mask_file))
                    .map_err(|e| format!("{}: {e}", dir.join(&mask_file).display()))?;
                let record = RenderRecord {
                    file,
                    mask: mask_file,
                    category_id: category_id(k),
                    caption: caption(&a, side as f64, rng.random_range(0..5)),
                    colour: render::COLOURS[a.colour].0.into(),
                    texture: a.texture.word().into(),
                };
                lines.push_str(&serde_json::to_string(&record)?);
                lines.push('\n');
                summary.renders += 1;
            }
        }
        let path = out.join("renders").join(format!("{name}.jsonl"));
        divergen_dataset::files::write_atomically(&path, lines.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let bank = out.join("prompt_bank");
    std::fs::create_dir_all(&bank).map_err(io(&bank))?;
    for k in 0..SHAPES.len() {
        let mut rng = StdRng::seed_from_u64(mix_seed(config.seed, 5, k as u64));
        let mut prompts: Vec<String> = Vec::new();
        let side = config.render_side as f64;
        let mut attempts = 0;
        while prompts.len() < config.bank_prompts && attempts < config.bank_prompts * 50 {
            attempts += 1;
            let radius = rng.random_range(0.22 * side..0.42 * side);
            let a = Appearance::random(k, (side / 2.0, side / 2.0), radius, 0.5, &mut rng);
            let p = caption(&a, side, rng.random_range(0..5));
            if !prompts.contains(&p) {
                prompts.push(p);
            }
        }
        let path = bank.join(format!("{}.txt", category_id(k)));
        divergen_dataset::files::write_atomically(&path, (prompts.join("\n") + "\n").as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    write_json(
        &out.join("domain.json"),
        &serde_json::json!({"config": config, "summary": summary}),
    )?;
    Ok(summary)
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    crate::pipeline::write_json(path, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DomainConfig {
        DomainConfig {
            train_scenes: 12,
            val_scenes: 3,
            train_renders_per_category: 2,
            val_renders_per_category: 1,
            bank_prompts: 8,
            ..Default::default()
        }
    }

    #[test]
    fn scenes_are_seeded_and_masks_are_disjoint() {
        let c = small();
        let a = scene(&c, 1, 3);
        let b = scene(&c, 1, 3);
        assert_eq!(a.image, b.image);
        assert_ne!(scene(&c, 1, 4).image, a.image);
        let n = (c.scene_width * c.scene_height) as usize;
        let mut owners = vec![0u8; n];
        for (cat, m) in &a.instances {
            assert!((1..=SHAPES.len() as u32).contains(cat));
            assert!(m.iter().filter(|&&v| v).count() >= MIN_VISIBLE);
            m.iter()
                .enumerate()
                .filter(|(_, v)| **v)
                .for_each(|(i, _)| owners[i] += 1);
        }
        assert!(owners.iter().all(|&o| o <= 1), "visible masks overlap");
    }

    #[test]
    fn every_shape_renders_a_solid_object_with_its_holes() {
        let mut rng = StdRng::seed_from_u64(1);
        for (k, s) in SHAPES.iter().enumerate() {
            let (img, mask, a) = white_render(k, 64, &mut rng);
            let area = mask.iter().filter(|&&m| m).count();
            assert!((150..3000).contains(&area), "{}: {area} px", s.name);
            // Off the mask the render is white; on it, not.
            for (i, &m) in mask.iter().enumerate() {
                let p = img.as_raw()[i * 3..i * 3 + 3].to_vec();
                assert_eq!(p == [255, 255, 255], !m, "{} pixel {i}", s.name);
            }
            let cap = caption(&a, 64.0, 0);
            assert!(
                cap.contains(&s.name.replace('_', " ")) && cap.ends_with(", in a white background"),
                "{cap}"
            );
        }
        // The nut's hole is empty: its centre is background.
        let (_, mask, _) = white_render(5, 64, &mut StdRng::seed_from_u64(2));
        let filled = mask.iter().filter(|&&m| m).count();
        let (img, _, a) = white_render(5, 64, &mut StdRng::seed_from_u64(2));
        let (cx, cy) = (a.centre.0 as u32, a.centre.1 as u32);
        assert_eq!(img.get_pixel(cx, cy).0, [255, 255, 255], "hole of {filled} px nut");
    }

    #[test]
    fn the_written_domain_is_an_lvis_dataset_the_pipeline_reads() {
        let dir = tempfile::tempdir().unwrap();
        let c = small();
        let summary = write(dir.path(), &c).unwrap();
        assert_eq!(summary.categories, 18);
        assert_eq!(summary.renders, 18 * 3);
        let real = crate::pipeline::real_data::RealDataset::load(
            &dir.path().join("scenes/train.json"),
            &dir.path().join("scenes/train"),
        )
        .unwrap();
        assert_eq!(real.images.len(), 12);
        let mut total = 0;
        for image in &real.images {
            let img = image.open().unwrap();
            for a in &image.annotations {
                let m = a.segmentation.to_mask(img.width(), img.height()).unwrap();
                assert!(m.area() >= MIN_VISIBLE);
                total += 1;
            }
        }
        assert_eq!(total, summary.train_instances);
        let cats = crate::pipeline::categories::Categories::load(&crate::pipeline::config::CategoriesConfig {
            table: dir.path().join("categories.json"),
            ids: None,
            frequency: None,
            limit: None,
            area_stats: Some(dir.path().join("area_mean_std.json")),
        })
        .unwrap();
        assert_eq!(cats.selected.len(), 18);
        assert!(cats.area_stats.values().all(|&(m, s)| m > 0.0 && m < 1.0 && s >= 0.0));
        let bank = std::fs::read_to_string(dir.path().join("prompt_bank/4.txt")).unwrap();
        assert_eq!(bank.lines().count(), 8);
        assert!(
            bank.lines()
                .all(|l| l.contains("star") && l.ends_with(", in a white background"))
        );
        // Same seed, same bytes.
        let again = tempfile::tempdir().unwrap();
        write(again.path(), &c).unwrap();
        for f in [
            "scenes/train.json",
            "renders/val.jsonl",
            "categories.json",
            "scenes/train/000007.png",
        ] {
            assert_eq!(
                std::fs::read(dir.path().join(f)).unwrap(),
                std::fs::read(again.path().join(f)).unwrap(),
                "{f}"
            );
        }
    }

    #[test]
    fn the_default_split_is_long_tailed() {
        // Counting scenes only (no files): frequent categories appear in many more training
        // images than common ones, rare ones in at most ten, as LVIS defines them.
        let c = DomainConfig::default();
        let mut images = vec![0usize; SHAPES.len()];
        for i in 0..c.train_scenes {
            let s = scene(&c, 1, i);
            let mut seen: Vec<u32> = s.instances.iter().map(|(c, _)| *c).collect();
            seen.sort_unstable();
            seen.dedup();
            seen.into_iter().for_each(|c| images[(c - 1) as usize] += 1);
        }
        let group = |f: Frequency| -> Vec<usize> {
            (0..SHAPES.len())
                .filter(|&k| SHAPES[k].frequency == f)
                .map(|k| images[k])
                .collect()
        };
        let (f, c_, r) = (
            group(Frequency::Frequent),
            group(Frequency::Common),
            group(Frequency::Rare),
        );
        assert!(f.iter().min() > c_.iter().max(), "{f:?} vs {c_:?}");
        assert!(c_.iter().min() > r.iter().max(), "{c_:?} vs {r:?}");
        assert!(r.iter().all(|&n| (1..=10).contains(&n)), "rare: {r:?}");
    }
}

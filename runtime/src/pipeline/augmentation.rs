//! Stage 4, instance paste, as DiverGen's `CopyPasteMapper` (X-Paste's algorithm with its
//! random-scale fallback): per real image a uniform `0..max_instances` count, each a uniform
//! category then a uniform instance of it, sized from the category's size statistics, jittered,
//! flipped, centred uniformly, pasted in turn; every earlier mask loses the pasted pixels and is
//! kept only if its box moved ≤ 10 px on every side or > 300 px of it remain.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use image::imageops::{self, FilterType};
use image::{RgbImage, RgbaImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::categories::Categories;
use super::config::{Blend, PasteConfig, RunConfig};
use super::generation::mix_seed;
use super::mask::{Mask, PixelBox};
use super::output::Sink;
use super::real_data::RealDataset;
use super::sample::to_sample;
use crate::Result;

/// One kept generated instance.
#[derive(Clone, Debug)]
pub struct PoolInstance {
    pub category_id: u32,
    pub crop: Arc<RgbaImage>,
    pub generator_id: u16,
    pub prompt_id: u32,
    pub clip_score: f32,
    pub sam_iou: f32,
}

/// An instance on the canvas, real or pasted.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub category_id: u32,
    /// The canvas's size.
    pub mask: Mask,
    /// The mask's bounds, kept in step with it.
    pub bbox: PixelBox,
    /// `None` for a real instance; the pool instance otherwise.
    pub source: Option<PastedFrom>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PastedFrom {
    pub generator_id: u16,
    pub prompt_id: u32,
    pub clip_score: f32,
    pub sam_iou: f32,
}

/// What one paste did, for the run's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PasteStats {
    pub drawn: usize,
    pub pasted: usize,
    /// Too small or not smaller than the image.
    pub rejected_size: usize,
    /// Earlier instances removed by the occlusion rule.
    pub occluded_dropped: usize,
}

/// Pool of kept instances grouped by category, in category order (so draws are reproducible).
pub struct Pool {
    pub by_category: BTreeMap<u32, Vec<PoolInstance>>,
}

impl Pool {
    pub fn new(instances: Vec<PoolInstance>) -> Self {
        let mut by_category: BTreeMap<u32, Vec<PoolInstance>> = BTreeMap::new();
        for i in instances {
            by_category.entry(i.category_id).or_default().push(i);
        }
        Pool { by_category }
    }

    pub fn is_empty(&self) -> bool {
        self.by_category.is_empty()
    }

    /// `cas_random`: a uniform category among those with instances, then a uniform instance.
    pub fn draw(&self, rng: &mut StdRng) -> Option<&PoolInstance> {
        if self.by_category.is_empty() {
            return None;
        }
        let c = rng.random_range(0..self.by_category.len());
        let list = self.by_category.values().nth(c)?;
        list.get(rng.random_range(0..list.len()))
    }
}

/// Standard normal draw (Box–Muller); one per call keeps the draw order simple to reason about.
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The pasted size `(w, h)` of an instance on a `width × height` canvas, or `None` if rejected.
pub fn target_size(
    crop: (u32, u32),
    stats: Option<(f64, f64)>,
    width: u32,
    height: u32,
    config: &PasteConfig,
    rng: &mut StdRng,
) -> Option<(u32, u32)> {
    let (cw, ch) = (crop.0 as f64, crop.1 as f64);
    let (w, h) = (width as f64, height as f64);
    let jitter = rng.random_range(1.0 - config.shape_jitter..=1.0 + config.shape_jitter);
    let (tw, th, min) = match stats {
        Some((mean, std)) => {
            let s = (mean + std * normal(rng)).clamp(10.0 / h, 0.5);
            let area = s * s * h * w;
            let aspect = cw / ch * jitter;
            let tw = (aspect * area).sqrt();
            (tw, tw / aspect, 5.0)
        }
        None => {
            let [lo, hi] = config.random_scale;
            let scale = rng.random_range(lo..=hi);
            (cw * scale * jitter, ch * scale, 3.0)
        }
    };
    // `int()` in the reference: truncation.
    let (tw, th) = (tw.floor(), th.floor());
    (tw >= min && th >= min && tw < w && th < h).then_some((tw as u32, th as u32))
}

/// Stage 4's counters, in the manifest.
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

/// Stage 4 over the real images: `paste.images` samples (every real image once by default,
/// cycling when more are asked), each pasted with its own seeded draw and sent to `sink`.
pub fn paste_all(
    config: &RunConfig,
    run_id: &str,
    real: &RealDataset,
    categories: &Categories,
    pool: &Pool,
    sink: &mut Sink,
) -> Result<PasteReport> {
    let count = config.paste.images.unwrap_or(real.images.len());
    let mut report = PasteReport::default();
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
                report.real_annotations_skipped += 1;
                continue;
            }
            let mask = match a.segmentation.to_mask(w, h) {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("{}: annotation {}: {e}; left out", real.source.display(), a.id);
                    report.real_annotations_skipped += 1;
                    continue;
                }
            };
            let Some(bbox) = mask.bounds() else {
                report.real_annotations_skipped += 1;
                continue;
            };
            report.real_annotations += 1;
            layers.push(Layer {
                category_id: a.category_id,
                mask,
                bbox,
                source: None,
            });
        }
        let mut rng = StdRng::seed_from_u64(mix_seed(config.seed, i as u64, 0x9a57e));
        let (layers, stats) = paste(
            &mut image,
            layers,
            pool,
            &categories.area_stats,
            &config.paste,
            &mut rng,
        );
        report.instances_pasted += stats.pasted as u64;
        report.rejected_by_size += stats.rejected_size as u64;
        report.dropped_by_occlusion += stats.occluded_dropped as u64;
        sink.send(to_sample(config, run_id, i as u64, &image, &layers, &real_image.entry))?;
        report.images += 1;
        bar.inc(1);
    }
    bar.finish();
    report.instances_per_image = if report.images > 0 {
        report.instances_pasted as f64 / report.images as f64
    } else {
        0.0
    };
    Ok(report)
}

/// Pastes a uniform `0..max_instances` draws from the pool onto `image`, whose real instances
/// are `layers`. Returns the layers that survive, real first then pasted, in paste order.
pub fn paste(
    image: &mut RgbImage,
    mut layers: Vec<Layer>,
    pool: &Pool,
    area_stats: &HashMap<u32, (f64, f64)>,
    config: &PasteConfig,
    rng: &mut StdRng,
) -> (Vec<Layer>, PasteStats) {
    let mut stats = PasteStats::default();
    if pool.is_empty() {
        return (layers, stats);
    }
    let (w, h) = (image.width(), image.height());
    let count = rng.random_range(0..config.max_instances);
    for _ in 0..count {
        let Some(instance) = pool.draw(rng) else { break };
        stats.drawn += 1;
        let crop = &instance.crop;
        let Some((tw, th)) = target_size(
            (crop.width(), crop.height()),
            area_stats.get(&instance.category_id).copied(),
            w,
            h,
            config,
            rng,
        ) else {
            stats.rejected_size += 1;
            continue;
        };
        let mut resized = imageops::resize(crop.as_ref(), tw, th, FilterType::Triangle);
        if rng.random_bool(config.flip) {
            imageops::flip_horizontal_in_place(&mut resized);
        }
        // Top-left uniform in [-tw/2, w - tw/2): the centre is uniform over the image.
        let x0 = rng.random_range(-((tw / 2) as i64)..(w as i64 - (tw / 2) as i64));
        let y0 = rng.random_range(-((th / 2) as i64)..(h as i64 - (th / 2) as i64));
        let mut mask = Mask::empty(w, h);
        let soft = blend_weights(&resized, config.blend);
        for y in 0..th as i64 {
            for x in 0..tw as i64 {
                let (cx, cy) = (x0 + x, y0 + y);
                if cx < 0 || cy < 0 || cx >= w as i64 || cy >= h as i64 {
                    continue;
                }
                let src = resized.get_pixel(x as u32, y as u32);
                if src[3] > 0 {
                    mask.set(cx as u32, cy as u32);
                }
                let a = soft[(y * tw as i64 + x) as usize];
                if a > 0.0 {
                    let dst = image.get_pixel_mut(cx as u32, cy as u32);
                    for c in 0..3 {
                        dst[c] = (dst[c] as f32 * (1.0 - a) + src[c] as f32 * a).round() as u8;
                    }
                }
            }
        }
        let Some(bbox) = mask.bounds() else {
            stats.rejected_size += 1;
            continue;
        };
        stats.occluded_dropped += occlude(&mut layers, &mask, config);
        layers.push(Layer {
            category_id: instance.category_id,
            mask,
            bbox,
            source: Some(PastedFrom {
                generator_id: instance.generator_id,
                prompt_id: instance.prompt_id,
                clip_score: instance.clip_score,
                sam_iou: instance.sam_iou,
            }),
        });
        stats.pasted += 1;
    }
    (layers, stats)
}

/// Removes `pasted` from every earlier mask and drops the instances the occlusion rule rejects
/// (box moved more than `bbox_occluded_thr` on some side and at most `mask_occluded_thr` pixels
/// left). Returns how many were dropped.
pub fn occlude(layers: &mut Vec<Layer>, pasted: &Mask, config: &PasteConfig) -> usize {
    let before = layers.len();
    layers.retain_mut(|layer| {
        let remaining = layer.mask.subtract(pasted) as u64;
        let Some(now) = layer.mask.bounds() else {
            return false;
        };
        let moved = layer.bbox.largest_side_shift(&now);
        layer.bbox = now;
        moved as f64 <= config.bbox_occluded_thr || remaining > config.mask_occluded_thr
    });
    before - layers.len()
}

/// Per-pixel blend weight of a resized RGBA instance: binary (`basic`), its alpha (`alpha`),
/// or the binary mask box-blurred 5×5 (`gaussian` in DiverGen, which is `cv2.blur`).
fn blend_weights(instance: &RgbaImage, blend: Blend) -> Vec<f32> {
    let (w, h) = (instance.width() as usize, instance.height() as usize);
    let binary: Vec<f32> = instance.pixels().map(|p| if p[3] > 0 { 1.0 } else { 0.0 }).collect();
    match blend {
        Blend::Hard => binary,
        Blend::Alpha => instance.pixels().map(|p| p[3] as f32 / 255.0).collect(),
        Blend::Blur => {
            let mut out = vec![0f32; w * h];
            for y in 0..h {
                for x in 0..w {
                    let mut s = 0f32;
                    for dy in -2i64..=2 {
                        for dx in -2i64..=2 {
                            // Outside the instance counts as background.
                            let (sx, sy) = (x as i64 + dx, y as i64 + dy);
                            if sx >= 0 && sy >= 0 && (sx as usize) < w && (sy as usize) < h {
                                s += binary[sy as usize * w + sx as usize];
                            }
                        }
                    }
                    out[y * w + x] = s / 25.0;
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn solid(w: u32, h: u32) -> Arc<RgbaImage> {
        Arc::new(RgbaImage::from_pixel(w, h, image::Rgba([200, 10, 10, 255])))
    }

    fn instance(category_id: u32, crop: Arc<RgbaImage>) -> PoolInstance {
        PoolInstance {
            category_id,
            crop,
            generator_id: 0,
            prompt_id: 0,
            clip_score: 0.7,
            sam_iou: 0.9,
        }
    }

    fn rect_layer(w: u32, h: u32, [x0, y0, x1, y1]: [u32; 4]) -> Layer {
        let mut mask = Mask::empty(w, h);
        for y in y0..y1 {
            for x in x0..x1 {
                mask.set(x, y);
            }
        }
        Layer {
            category_id: 1,
            mask,
            bbox: PixelBox { x0, y0, x1, y1 },
            source: None,
        }
    }

    fn corners(b: PixelBox) -> [u32; 4] {
        [b.x0, b.y0, b.x1, b.y1]
    }

    #[test]
    fn sizes_follow_the_statistics_and_are_clipped() {
        let config = PasteConfig {
            shape_jitter: 0.0,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        // std 0: s = mean exactly; area = s²·H·W, square crop → side s·sqrt(HW).
        let (w, h) = target_size((50, 50), Some((0.25, 0.0)), 400, 100, &config, &mut rng).unwrap();
        assert_eq!((w, h), (50, 50));
        // A mean above 0.5 is clipped to 0.5: 0.5·sqrt(400·100) = 100 ≥ height 100 → rejected.
        assert_eq!(
            target_size((50, 50), Some((0.9, 0.0)), 400, 100, &config, &mut rng),
            None
        );
        // Below 10/H is lifted to 10/H: side 10/100·200 = 20.
        let (w, _) = target_size((50, 50), Some((0.001, 0.0)), 400, 100, &config, &mut rng).unwrap();
        assert_eq!(w, 20);
        // Without statistics: the crop's own size × U(0.05, 0.3).
        for _ in 0..100 {
            let (w, h) = target_size((100, 200), None, 1000, 1000, &config, &mut rng).unwrap();
            assert!((5..=30).contains(&w) && (10..=60).contains(&h), "{w}x{h}");
        }
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let config = PasteConfig::default();
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..200 {
            let (w, h) = target_size((100, 100), Some((0.2, 0.0)), 500, 500, &config, &mut rng).unwrap();
            let aspect = w as f64 / h as f64;
            assert!((0.78..=1.22).contains(&aspect), "{aspect}");
        }
    }

    #[test]
    fn occlusion_keeps_by_box_shift_or_remaining_area() {
        let (w, h) = (200, 100);
        let mut layers = vec![
            // Loses its left 20 columns: box moves 20 px, 10x30 = 300 px left (not > 300) → dropped.
            rect_layer(w, h, [10, 10, 40, 40]),
            // Loses its left 20 columns: box moves 20 px, but 20x40 = 800 px left → kept.
            rect_layer(w, h, [100, 10, 140, 50]),
            // Loses one column: box moves 1 px, 29x30 = 870 px left → kept.
            rect_layer(w, h, [150, 60, 180, 90]),
            // Covered entirely → dropped.
            rect_layer(w, h, [0, 80, 10, 90]),
            // Untouched → kept as is.
            rect_layer(w, h, [60, 60, 70, 70]),
        ];
        let mut pasted = Mask::empty(w, h);
        for y in 0..h {
            for x in 0..w {
                if x < 30 || (100..120).contains(&x) || (x == 150 && y >= 60) {
                    pasted.set(x, y);
                }
            }
        }
        let dropped = occlude(&mut layers, &pasted, &PasteConfig::default());
        assert_eq!(dropped, 2);
        let boxes: Vec<[u32; 4]> = layers.iter().map(|l| corners(l.bbox)).collect();
        assert_eq!(boxes, [[120, 10, 140, 50], [151, 60, 180, 90], [60, 60, 70, 70]]);
        // With 301 px left the first one would stay: the rule is "more than 300".
        let mut one = vec![rect_layer(w, h, [10, 10, 40, 40])];
        one[0].mask.set(45, 45);
        one[0].bbox = PixelBox {
            x0: 10,
            y0: 10,
            x1: 46,
            y1: 46,
        };
        assert_eq!(occlude(&mut one, &pasted, &PasteConfig::default()), 0);
    }

    #[test]
    fn paste_keeps_masks_inside_the_image_and_disjoint() {
        let pool = Pool::new(vec![instance(1, solid(60, 40)), instance(2, solid(30, 90))]);
        let stats: HashMap<u32, (f64, f64)> = [(1, (0.3, 0.1))].into();
        let config = PasteConfig::default();
        let mut total = PasteStats::default();
        for seed in 0..40 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut image = RgbImage::new(160, 120);
            let real = vec![rect_layer(160, 120, [20, 20, 80, 70])];
            let (layers, s) = paste(&mut image, real, &pool, &stats, &config, &mut rng);
            total.pasted += s.pasted;
            total.drawn += s.drawn;
            let mut owner = vec![0u32; 160 * 120];
            for layer in &layers {
                assert_eq!((layer.mask.width(), layer.mask.height()), (160, 120));
                assert_eq!(layer.mask.bounds(), Some(layer.bbox));
                for (i, &m) in layer.mask.bits().iter().enumerate() {
                    if m {
                        owner[i] += 1;
                        // Pasted pixels are painted with the instance's colour.
                        if layer.source.is_some() {
                            assert_eq!(image.as_raw()[i * 3], 200);
                        }
                    }
                }
            }
            assert!(owner.iter().all(|&o| o <= 1), "masks overlap");
            assert!(s.drawn < 20);
        }
        assert!(total.pasted > 100, "{total:?}");
    }

    #[test]
    fn draws_are_category_balanced() {
        // 1 instance of category 1, 99 of category 2: categories are drawn uniformly anyway.
        let mut list = vec![instance(1, solid(4, 4))];
        list.extend((0..99).map(|_| instance(2, solid(4, 4))));
        let pool = Pool::new(list);
        let mut rng = StdRng::seed_from_u64(3);
        let n = 20_000;
        let ones = (0..n).filter(|_| pool.draw(&mut rng).unwrap().category_id == 1).count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.5).abs() < 0.02, "{share}");
    }

    #[test]
    fn the_same_seed_pastes_the_same_image() {
        let pool = Pool::new(vec![instance(1, solid(60, 40))]);
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut image = RgbImage::new(100, 100);
            let (layers, _) = paste(
                &mut image,
                vec![],
                &pool,
                &HashMap::new(),
                &PasteConfig::default(),
                &mut rng,
            );
            (image, layers)
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5).0, run(6).0);
    }
}

//! Synthetic samples shaped like the pipeline's output (a textured background with pasted,
//! partly occluding objects), used by `divergen stream bench` and the stream tests. Each sample
//! is a pure function of (spec, seq), so a receiver can regenerate and compare what it got.

use divergen_dataset::files::encode_png;
use divergen_protocol::{Category, CategoryTable, Frequency, ImageData, Instance, Origin, Provenance, Rle, Sample};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageEncoding {
    Png,
    Rgb8,
}

#[derive(Clone, Debug)]
pub struct SampleSpec {
    pub device_id: String,
    pub run_id: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// Mean instance count; each sample draws 0..=2*mean.
    pub instances: u32,
    pub encoding: ImageEncoding,
    pub categories: u32,
}

impl SampleSpec {
    /// What `divergen stream bench` sends: 512x512 PNG, about 10 instances.
    pub fn realistic(device_id: &str, run_id: &str) -> Self {
        SampleSpec {
            device_id: device_id.into(),
            run_id: run_id.into(),
            seed: 1,
            width: 512,
            height: 512,
            instances: 10,
            encoding: ImageEncoding::Png,
            categories: 64,
        }
    }

    /// Small raw images, for tests that push thousands of samples.
    pub fn tiny(device_id: &str, run_id: &str) -> Self {
        SampleSpec {
            width: 24,
            height: 16,
            instances: 3,
            encoding: ImageEncoding::Rgb8,
            ..Self::realistic(device_id, run_id)
        }
    }
}

/// A category table with LVIS's frequency mix (roughly 1/3 each of frequent/common/rare).
pub fn categories(count: u32) -> CategoryTable {
    let frequencies = [Frequency::Frequent, Frequency::Common, Frequency::Rare];
    CategoryTable {
        categories: (1..=count)
            .map(|id| Category {
                id,
                name: format!("object_{id}"),
                synset: format!("object_{id}.n.01"),
                def: format!("synthetic object number {id}"),
                frequency: frequencies[id as usize % 3],
            })
            .collect(),
    }
}

pub fn sample(spec: &SampleSpec, seq: u64) -> Sample {
    let mut rng = StdRng::seed_from_u64(spec.seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (w, h) = (spec.width as usize, spec.height as usize);
    let mut rgb = vec![0u8; w * h * 3];
    // Background: two-colour gradient with a soft texture, like a photo rather than noise.
    let (c0, c1): ([f32; 3], [f32; 3]) = (rng.random(), rng.random());
    let (fx, fy) = (rng.random_range(0.01..0.08f32), rng.random_range(0.01..0.08f32));
    for y in 0..h {
        for x in 0..w {
            let t = (x + y) as f32 / (w + h) as f32;
            let texture = 12.0 * ((x as f32 * fx).sin() * (y as f32 * fy).cos());
            for c in 0..3 {
                let v = 255.0 * (c0[c] * (1.0 - t) + c1[c] * t) + texture + rng.random_range(-3.0..3.0f32);
                rgb[(y * w + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    // Objects pasted in order; later ones occlude earlier ones, as instance paste does.
    let count = rng.random_range(0..=2 * spec.instances) as usize;
    let mut owner = vec![u16::MAX; w * h];
    let mut drawn = Vec::with_capacity(count);
    for index in 0..count {
        let (cx, cy) = (rng.random_range(0.0..w as f32), rng.random_range(0.0..h as f32));
        let rx = rng.random_range(2.0..(w as f32 * 0.25).max(3.0));
        let ry = rng.random_range(2.0..(h as f32 * 0.25).max(3.0));
        let colour: [u8; 3] = rng.random();
        let category_id = rng.random_range(1..=spec.categories);
        let origin = if rng.random_bool(0.3) {
            Origin::Real
        } else {
            Origin::Generated {
                generator_id: rng.random_range(0..2),
                prompt_id: rng.random_range(0..129),
                clip_score: rng.random_range(0.6..0.95),
                sam_iou: rng.random_range(0.7..1.0),
            }
        };
        let (x0, x1) = (
            ((cx - rx).floor().max(0.0)) as usize,
            ((cx + rx).ceil() as usize).min(w),
        );
        let (y0, y1) = (
            ((cy - ry).floor().max(0.0)) as usize,
            ((cy + ry).ceil() as usize).min(h),
        );
        for y in y0..y1 {
            for x in x0..x1 {
                let (dx, dy) = ((x as f32 + 0.5 - cx) / rx, (y as f32 + 0.5 - cy) / ry);
                if dx * dx + dy * dy <= 1.0 {
                    owner[y * w + x] = index as u16;
                    let shade = 1.0 - 0.3 * (dx * dx + dy * dy);
                    for c in 0..3 {
                        rgb[(y * w + x) * 3 + c] = (colour[c] as f32 * shade) as u8;
                    }
                }
            }
        }
        drawn.push((category_id, origin));
    }
    let mut instances = Vec::new();
    let mut mask = vec![0u8; w * h];
    for (index, (category_id, origin)) in drawn.into_iter().enumerate() {
        for (m, &o) in mask.iter_mut().zip(&owner) {
            *m = (o == index as u16) as u8;
        }
        let rle = Rle::from_row_major(spec.height, spec.width, &mask);
        if rle.area() == 0 {
            continue; // fully covered by later objects
        }
        instances.push(Instance {
            category_id,
            bbox: rle.bbox(),
            mask: rle,
            origin,
        });
    }
    let image = match spec.encoding {
        ImageEncoding::Rgb8 => ImageData::Rgb8(rgb),
        ImageEncoding::Png => ImageData::Png(encode_png(spec.width, spec.height, &rgb)),
    };
    let neg = rng.random_range(1..=spec.categories);
    Sample {
        provenance: Provenance {
            device_id: spec.device_id.clone(),
            run_id: spec.run_id.clone(),
            seed: spec.seed,
            seq,
        },
        width: spec.width,
        height: spec.height,
        image,
        neg_category_ids: if instances.iter().any(|i| i.category_id == neg) {
            vec![]
        } else {
            vec![neg]
        },
        not_exhaustive_category_ids: instances.first().map(|i| vec![i.category_id]).unwrap_or_default(),
        instances,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_valid_and_realistically_sized() {
        let spec = SampleSpec::realistic("dev", "run");
        let table = categories(spec.categories);
        let a = sample(&spec, 7);
        assert_eq!(a, sample(&spec, 7));
        assert_ne!(a, sample(&spec, 8));
        a.validate(Some(&table)).unwrap();
        let ImageData::Png(png) = &a.image else {
            panic!("realistic samples are PNG")
        };
        let decoded = image::load_from_memory(png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (512, 512));
        let counts: Vec<usize> = (0..50).map(|s| sample(&spec, s).instances.len()).collect();
        let mean = counts.iter().sum::<usize>() as f32 / counts.len() as f32;
        assert!((6.0..14.0).contains(&mean), "about 10 instances, got {mean}");
    }
}

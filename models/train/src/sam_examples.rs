//! Training examples for the embedded default's tiny SAM, drawn fresh from the domain: white
//! renders with the 4-corner background prompt, a box and a point, and scenes with box and
//! point prompts on their (occluded) instances. Seeds come from streams disjoint from the
//! domain's written splits, so the held-out renders and scenes are never trained on.

use crate::sam::{PromptTarget, SamExample, Supervise, TinySamConfig, TrainPoint, low_res_target};
use divergen_models::sam::preprocess::{prepare, preprocess_shape};
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use divergen_runtime::domain::render::white_render;
use divergen_runtime::domain::shapes::SHAPES;
use divergen_runtime::domain::{DomainConfig, scene};
use divergen_runtime::pipeline::mix_seed;

/// The split numbers `divergen domain` writes are 1–4; training draws from these.
const TRAIN_SCENES: u64 = 11;
const TRAIN_RENDERS: u64 = 13;

/// Generated objects are not clean renders: an off-white background, sensor-like noise and
/// softness, so SAM learns the white-background prompt on images like the generator's.
fn roughen(img: &mut RgbImage, rng: &mut StdRng) {
    if rng.random_bool(0.5) {
        let tint = [0; 3].map(|_| rng.random_range(225.0..255.0f32) / 255.0);
        for p in img.pixels_mut() {
            if p.0 == [255, 255, 255] {
                *p = Rgb([0, 1, 2].map(|c| (255.0 * tint[c]) as u8));
            }
        }
    }
    if rng.random_bool(0.5) {
        let sigma = rng.random_range(2.0..10.0f32);
        for p in img.pixels_mut() {
            for c in 0..3 {
                // A cheap symmetric noise: the sum of three uniforms.
                let n: f32 = (0..3).map(|_| rng.random_range(-1.0..1.0f32)).sum::<f32>() * sigma * 0.58;
                p.0[c] = (p.0[c] as f32 + n).clamp(0.0, 255.0) as u8;
            }
        }
    }
    if rng.random_bool(0.3) {
        let src = img.clone();
        let (w, h) = (img.width() as i64, img.height() as i64);
        for y in 0..h {
            for x in 0..w {
                let mut sum = [0u32; 3];
                for (dx, dy) in [
                    (-1, -1),
                    (0, -1),
                    (1, -1),
                    (-1, 0),
                    (0, 0),
                    (1, 0),
                    (-1, 1),
                    (0, 1),
                    (1, 1),
                ] {
                    let p = src.get_pixel((x + dx).clamp(0, w - 1) as u32, (y + dy).clamp(0, h - 1) as u32);
                    for (s, &v) in sum.iter_mut().zip(&p.0) {
                        *s += v as u32;
                    }
                }
                img.put_pixel(x as u32, y as u32, Rgb(sum.map(|s| (s / 9) as u8)));
            }
        }
    }
}

fn bbox(mask: &[bool], width: usize) -> Option<[f32; 4]> {
    let mut b: Option<[usize; 4]> = None;
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = (i % width, i / width);
        b = Some(match b {
            None => [x, y, x, y],
            Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
        });
    }
    b.map(|b| b.map(|v| v as f32))
}

/// A box prompt as SAM trains them: the mask's box with each side moved by up to 5 % of its
/// extent.
fn jittered_box(mask: &[bool], width: usize, rng: &mut StdRng) -> Option<[f32; 4]> {
    let [x0, y0, x1, y1] = bbox(mask, width)?;
    let (jx, jy) = (0.05 * (x1 - x0 + 1.0), 0.05 * (y1 - y0 + 1.0));
    let mut j = |s: f32| if s > 0.0 { rng.random_range(-s..=s) } else { 0.0 };
    Some([x0 + j(jx), y0 + j(jy), x1 + j(jx), y1 + j(jy)])
}

fn inside_point(mask: &[bool], width: usize, rng: &mut StdRng) -> Option<(f32, f32)> {
    let inside: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
    if inside.is_empty() {
        return None;
    }
    let i = inside[rng.random_range(0..inside.len())];
    Some(((i % width) as f32, (i / width) as f32))
}

/// An image's size and the encoder's: prompts are mapped as `ResizeLongestSide.apply_coords`
/// maps them, each axis by its own rounded ratio.
struct Frame {
    width: usize,
    height: usize,
    sx: f32,
    sy: f32,
}

impl Frame {
    fn new(width: usize, height: usize, config: &TinySamConfig) -> Self {
        let (ih, iw) = preprocess_shape(height, width, config.img_size);
        Frame {
            width,
            height,
            sx: iw as f32 / width as f32,
            sy: ih as f32 / height as f32,
        }
    }
}

impl Frame {
    fn prompt(
        &self,
        config: &TinySamConfig,
        mask: &[bool],
        points: Vec<TrainPoint>,
        bbox: Option<[f32; 4]>,
        supervise: Supervise,
    ) -> PromptTarget {
        let (target, weight) = low_res_target(mask, self.width, self.height, config);
        let (sx, sy) = (self.sx, self.sy);
        PromptTarget {
            points: points
                .into_iter()
                .map(|p| TrainPoint {
                    x: p.x * sx,
                    y: p.y * sy,
                    label: p.label,
                })
                .collect(),
            bbox: bbox.map(|[x0, y0, x1, y1]| [x0 * sx, y0 * sy, x1 * sx, y1 * sy]),
            target,
            weight,
            supervise,
        }
    }
}

fn foreground(x: f32, y: f32) -> TrainPoint {
    TrainPoint { x, y, label: 1 }
}

/// One training image for the tiny SAM: a white render (half the time) or a scene.
pub fn sam_example(config: &TinySamConfig, domain: &DomainConfig, seed: u64, index: u64) -> SamExample {
    let mut rng = StdRng::seed_from_u64(mix_seed(seed, TRAIN_RENDERS, index));
    let (image, prompts) = if rng.random_bool(0.5) {
        let k = rng.random_range(0..SHAPES.len());
        let (mut img, mask, _) = white_render(k, domain.render_side, &mut rng);
        roughen(&mut img, &mut rng);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let frame = Frame::new(w, h, config);
        let (x1, y1) = ((w - 1) as f32, (h - 1) as f32);
        let corners = vec![
            foreground(0.0, 0.0),
            foreground(x1, 0.0),
            foreground(0.0, y1),
            foreground(x1, y1),
        ];
        let background: Vec<bool> = mask.iter().map(|m| !m).collect();
        let mut prompts = vec![frame.prompt(config, &background, corners, None, Supervise::Outputs(vec![0, 3]))];
        if let Some(b) = jittered_box(&mask, w, &mut rng) {
            prompts.push(frame.prompt(config, &mask, vec![], Some(b), Supervise::Outputs(vec![0])));
        }
        if let Some((x, y)) = inside_point(&mask, w, &mut rng) {
            prompts.push(frame.prompt(
                config,
                &mask,
                vec![foreground(x, y)],
                None,
                Supervise::BestOf(vec![1, 2, 3]),
            ));
        }
        (img, prompts)
    } else {
        let scenes = DomainConfig {
            seed: seed ^ 0x5ca1_ab1e,
            ..domain.clone()
        };
        let s = scene(&scenes, TRAIN_SCENES, index as usize);
        let (w, h) = (s.image.width() as usize, s.image.height() as usize);
        let frame = Frame::new(w, h, config);
        let mut prompts = Vec::new();
        for _ in 0..2 {
            if s.instances.is_empty() {
                break;
            }
            let (_, mask) = &s.instances[rng.random_range(0..s.instances.len())];
            if let Some(b) = jittered_box(mask, w, &mut rng) {
                prompts.push(frame.prompt(config, mask, vec![], Some(b), Supervise::Outputs(vec![0])));
            }
        }
        if !s.instances.is_empty() {
            let (_, mask) = &s.instances[rng.random_range(0..s.instances.len())];
            if let Some((x, y)) = inside_point(mask, w, &mut rng) {
                prompts.push(frame.prompt(
                    config,
                    mask,
                    vec![foreground(x, y)],
                    None,
                    Supervise::BestOf(vec![1, 2, 3]),
                ));
            }
        }
        (s.image, prompts)
    };
    let pixels = prepare(&image, config.img_size)
        .unwrap_or_else(|e| panic!("a drawn image is never empty: {e}"))
        .pixels;
    SamExample { pixels, prompts }
}

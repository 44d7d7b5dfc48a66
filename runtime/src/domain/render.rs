//! Drawing the procedural domain: objects with a colour, a texture, a size, a rotation and an
//! aspect, either alone "in a white background" (with a caption in the prompt banks' style) or
//! several at once on a textured background, occluding each other.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand::rngs::StdRng;

use super::shapes::{Outline, Polygon, SHAPES, Shape};
use crate::pipeline::real_data::rasterize_polygons;

/// Colours a caption can name, away from white so a white background stays background.
pub const COLOURS: [(&str, [u8; 3]); 10] = [
    ("red", [200, 40, 40]),
    ("orange", [230, 130, 30]),
    ("yellow", [220, 200, 40]),
    ("green", [50, 160, 60]),
    ("teal", [30, 150, 150]),
    ("blue", [40, 80, 200]),
    ("purple", [130, 60, 170]),
    ("pink", [230, 110, 170]),
    ("brown", [120, 75, 40]),
    ("black", [35, 35, 35]),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Texture {
    Plain,
    Striped,
    Dotted,
    Checkered,
    Speckled,
}

impl Texture {
    pub const ALL: [Texture; 5] = [
        Texture::Plain,
        Texture::Striped,
        Texture::Dotted,
        Texture::Checkered,
        Texture::Speckled,
    ];

    pub fn word(self) -> &'static str {
        match self {
            Texture::Plain => "plain",
            Texture::Striped => "striped",
            Texture::Dotted => "dotted",
            Texture::Checkered => "checkered",
            Texture::Speckled => "speckled",
        }
    }
}

/// Everything that decides how one object looks.
#[derive(Clone, Debug)]
pub struct Appearance {
    pub category: usize,
    pub colour: usize,
    pub texture: Texture,
    /// Centre in pixels.
    pub centre: (f64, f64),
    /// Half the object's extent in pixels (before aspect).
    pub radius: f64,
    /// Width over height.
    pub aspect: f64,
    pub rotation: f64,
    /// Texture phase, so two striped objects do not line up.
    pub phase: f64,
}

impl Appearance {
    pub fn random(category: usize, centre: (f64, f64), radius: f64, max_rotation: f64, rng: &mut StdRng) -> Self {
        Appearance {
            category,
            colour: rng.random_range(0..COLOURS.len()),
            texture: Texture::ALL[rng.random_range(0..Texture::ALL.len())],
            centre,
            radius,
            aspect: rng.random_range(0.75..1.33),
            rotation: rng.random_range(-max_rotation..=max_rotation),
            phase: rng.random_range(0.0..8.0),
        }
    }

    pub fn shape(&self) -> &'static Shape {
        &SHAPES[self.category]
    }

    fn place(&self, p: &Polygon) -> Vec<f64> {
        let (sin, cos) = self.rotation.sin_cos();
        let (sx, sy) = (self.radius * self.aspect.sqrt(), self.radius / self.aspect.sqrt());
        p.iter()
            .flat_map(|&(x, y)| {
                let (x, y) = (x * sx, y * sy);
                [self.centre.0 + x * cos - y * sin, self.centre.1 + x * sin + y * cos]
            })
            .collect()
    }

    /// The object's pixels on a `w × h` canvas.
    pub fn mask(&self, w: usize, h: usize) -> Vec<bool> {
        let Outline { solids, holes } = (self.shape().outline)();
        let placed = |polys: &[Polygon]| -> Vec<Vec<f64>> { polys.iter().map(|p| self.place(p)).collect() };
        let mut mask = rasterize_polygons(&placed(&solids), w, h);
        if !holes.is_empty() {
            let hole = rasterize_polygons(&placed(&holes), w, h);
            mask.iter_mut().zip(hole).for_each(|(m, h)| *m &= !h);
        }
        mask
    }

    /// The object's colour at a pixel: the base colour modulated by the texture, in the
    /// object's own rotated frame.
    fn colour_at(&self, x: f64, y: f64) -> [u8; 3] {
        let base = COLOURS[self.colour].1;
        let (sin, cos) = self.rotation.sin_cos();
        let (dx, dy) = (x - self.centre.0, y - self.centre.1);
        let (u, v) = (
            (dx * cos + dy * sin) / self.radius,
            (-dx * sin + dy * cos) / self.radius,
        );
        let period = 0.35;
        let factor = match self.texture {
            Texture::Plain => 1.0,
            Texture::Striped => {
                if ((u / period + self.phase).floor() as i64).rem_euclid(2) == 0 {
                    1.0
                } else {
                    0.55
                }
            }
            Texture::Dotted => {
                let (fu, fv) = ((u / period + self.phase).fract() - 0.5, (v / period).fract() - 0.5);
                if fu * fu + fv * fv < 0.09 { 1.6 } else { 0.85 }
            }
            Texture::Checkered => {
                let a = (u / period + self.phase).floor() as i64 + (v / period).floor() as i64;
                if a.rem_euclid(2) == 0 { 1.0 } else { 0.6 }
            }
            Texture::Speckled => {
                let n = ((u * 91.7 + v * 47.3 + self.phase).sin() * 43758.55).fract().abs();
                if n > 0.8 { 1.7 } else { 0.9 }
            }
        };
        base.map(|c| (c as f64 * factor).clamp(0.0, 255.0) as u8)
    }

    /// Paints the object; returns its mask.
    pub fn paint(&self, canvas: &mut RgbImage) -> Vec<bool> {
        let (w, h) = (canvas.width() as usize, canvas.height() as usize);
        let mask = self.mask(w, h);
        for y in 0..h {
            for x in 0..w {
                if !mask[y * w + x] {
                    continue;
                }
                // A darker rim makes the outline visible on similar backgrounds.
                let rim = (x == 0 || !mask[y * w + x - 1])
                    || (x + 1 == w || !mask[y * w + x + 1])
                    || (y == 0 || !mask[(y - 1) * w + x])
                    || (y + 1 == h || !mask[(y + 1) * w + x]);
                let mut c = self.colour_at(x as f64 + 0.5, y as f64 + 0.5);
                if rim {
                    c = c.map(|v| (v as f64 * 0.6) as u8);
                }
                canvas.put_pixel(x as u32, y as u32, Rgb(c));
            }
        }
        mask
    }

    /// "small"/"large" relative to the canvas, for captions.
    pub fn size_word(&self, side: f64) -> &'static str {
        if self.radius < 0.3 * side { "small" } else { "large" }
    }
}

/// The five openings of DiverGen's prompt banks.
pub const OPENINGS: [&str; 5] = [
    "A photo of",
    "An image of",
    "A real photo of",
    "A photography of",
    "An illustration of",
];

/// A caption in the banks' style that says what the render shows.
pub fn caption(a: &Appearance, side: f64, opening: usize) -> String {
    let name = a.shape().name.replace('_', " ");
    let texture = match a.texture {
        Texture::Plain => String::new(),
        t => format!("{} ", t.word()),
    };
    format!(
        "{} a {} {} {texture}{name}, in a white background",
        OPENINGS[opening % OPENINGS.len()],
        a.size_word(side),
        COLOURS[a.colour].0
    )
}

/// One object alone on white: the image, its mask and its appearance.
pub fn white_render(category: usize, side: u32, rng: &mut StdRng) -> (RgbImage, Vec<bool>, Appearance) {
    let s = side as f64;
    let radius = rng.random_range(0.22 * s..0.42 * s);
    let centre = (
        s / 2.0 + rng.random_range(-0.06 * s..0.06 * s),
        s / 2.0 + rng.random_range(-0.06 * s..0.06 * s),
    );
    let a = Appearance::random(category, centre, radius, 0.5, rng);
    let mut img = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
    let mask = a.paint(&mut img);
    (img, mask, a)
}

/// A textured background: two muted colours blended by a slow wave, with grain.
pub fn background(w: u32, h: u32, rng: &mut StdRng) -> RgbImage {
    let muted = |rng: &mut StdRng| -> [f64; 3] { [0; 3].map(|_| rng.random_range(90.0..200.0)) };
    let (a, b) = (muted(rng), muted(rng));
    let (fx, fy, phase) = (
        rng.random_range(0.02..0.12),
        rng.random_range(0.02..0.12),
        rng.random_range(0.0..6.3),
    );
    RgbImage::from_fn(w, h, |x, y| {
        let t = 0.5 + 0.5 * ((x as f64 * fx + y as f64 * fy + phase).sin());
        let grain = (((x * 7919 + y * 104_729) % 97) as f64 / 97.0 - 0.5) * 18.0;
        Rgb([0, 1, 2].map(|c| (a[c] * t + b[c] * (1.0 - t) + grain).clamp(0.0, 255.0) as u8))
    })
}

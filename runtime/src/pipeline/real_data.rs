//! The real dataset a run uses, in COCO/LVIS form (instances JSON + image folder): its instance
//! crops feed stage 3's real bank, its images and masks are stage 4's paste backgrounds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use divergen_protocol::Rle;
use image::{Rgb, RgbImage};
use serde::Deserialize;

use super::mask::Mask;
use crate::{Error, Result};

#[derive(Deserialize)]
struct CocoJson {
    images: Vec<ImageEntry>,
    annotations: Vec<AnnotationEntry>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ImageEntry {
    pub id: u64,
    /// COCO has it; LVIS v1 has only `coco_url`, whose last segment is the file name.
    #[serde(default)]
    pub file_name: Option<String>,
    #[serde(default)]
    pub coco_url: Option<String>,
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub neg_category_ids: Vec<u32>,
    #[serde(default)]
    pub not_exhaustive_category_ids: Vec<u32>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AnnotationEntry {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u32,
    pub segmentation: Segmentation,
    #[serde(default)]
    pub iscrowd: u8,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Rle { counts: RleCounts, size: [u32; 2] },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RleCounts {
    Uncompressed(Vec<u32>),
    /// pycocotools' compressed string.
    Compressed(String),
}

pub struct RealImage {
    pub entry: ImageEntry,
    pub path: PathBuf,
    pub annotations: Vec<AnnotationEntry>,
}

pub struct RealDataset {
    pub source: PathBuf,
    pub images: Vec<RealImage>,
}

impl ImageEntry {
    pub fn file_name(&self) -> Option<&str> {
        self.file_name
            .as_deref()
            .or_else(|| self.coco_url.as_deref().and_then(|u| u.rsplit('/').next()))
            .filter(|n| !n.is_empty())
    }
}

impl RealDataset {
    pub fn load(annotations: &Path, images: &Path) -> Result<Self> {
        let at = |e: &dyn std::fmt::Display| Error::from(format!("{}: {e}", annotations.display()));
        let bytes = std::fs::read(annotations).map_err(|e| at(&e))?;
        let json: CocoJson =
            serde_json::from_slice(&bytes).map_err(|e| at(&format!("not a COCO/LVIS instances file: {e}")))?;
        let mut by_image: HashMap<u64, Vec<AnnotationEntry>> = HashMap::new();
        for a in json.annotations {
            by_image.entry(a.image_id).or_default().push(a);
        }
        let mut out = Vec::with_capacity(json.images.len());
        for entry in json.images {
            let name = entry
                .file_name()
                .ok_or_else(|| at(&format!("image {} has neither file_name nor coco_url", entry.id)))?;
            if name.contains("..") || Path::new(name).is_absolute() {
                return Err(at(&format!(
                    "image {}: file name {name:?} leaves the image folder",
                    entry.id
                )));
            }
            if entry.width == 0 || entry.height == 0 {
                return Err(at(&format!(
                    "image {} has size {}x{}",
                    entry.id, entry.width, entry.height
                )));
            }
            let mut anns = by_image.remove(&entry.id).unwrap_or_default();
            anns.sort_by_key(|a| a.id);
            out.push(RealImage {
                path: images.join(name),
                entry,
                annotations: anns,
            });
        }
        if let Some(orphan) = by_image.keys().next() {
            return Err(at(&format!("annotations refer to image {orphan}, which is not listed")));
        }
        out.sort_by_key(|i| i.entry.id);
        Ok(RealDataset {
            source: annotations.to_path_buf(),
            images: out,
        })
    }
}

impl RealImage {
    /// Decodes the image and checks it has the size the JSON says.
    pub fn open(&self) -> Result<RgbImage> {
        let img = crate::images::open(&self.path)?.into_rgb8();
        if (img.width(), img.height()) != (self.entry.width, self.entry.height) {
            return Err(format!(
                "{}: image is {}x{}, the annotations say {}x{}",
                self.path.display(),
                img.width(),
                img.height(),
                self.entry.width,
                self.entry.height
            )
            .into());
        }
        Ok(img)
    }
}

impl Segmentation {
    /// The mask over a `width × height` image.
    pub fn to_mask(&self, width: u32, height: u32) -> Result<Mask> {
        match self {
            Segmentation::Polygons(polys) => {
                for p in polys {
                    if p.len() < 6 || p.len() % 2 != 0 || p.iter().any(|v| !v.is_finite()) {
                        return Err(format!("a polygon of {} values (x,y pairs, at least 3 points)", p.len()).into());
                    }
                }
                Ok(Mask::from_bits(
                    width,
                    height,
                    rasterize_polygons(polys, width as usize, height as usize),
                ))
            }
            Segmentation::Rle { counts, size } => {
                if *size != [height, width] {
                    return Err(format!("RLE size {size:?}, the image is [{height}, {width}]").into());
                }
                let counts = match counts {
                    RleCounts::Uncompressed(c) => c.clone(),
                    RleCounts::Compressed(s) => decode_rle_string(s)?,
                };
                let rle = Rle {
                    height: size[0],
                    width: size[1],
                    counts,
                };
                rle.check().map_err(String::from)?;
                Ok(Mask::from_bits(
                    width,
                    height,
                    rle.to_row_major().into_iter().map(|v| v != 0).collect(),
                ))
            }
        }
    }
}

/// pycocotools' compressed counts (`rleFrString`): 5 bits a character with a continuation bit,
/// counts after the second stored as differences from the one two before.
pub fn decode_rle_string(s: &str) -> Result<Vec<u32>> {
    let bytes = s.as_bytes();
    let mut counts: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let (mut x, mut k, mut more) = (0i64, 0u32, true);
        while more {
            let c = *bytes.get(p).ok_or("compressed RLE ends inside a count")? as i64 - 48;
            if !(0..64).contains(&c) || k > 60 {
                return Err(format!("compressed RLE has a bad character at {p}").into());
            }
            x |= (c & 0x1f) << (5 * k);
            more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more && c & 0x10 != 0 {
                x |= -1i64 << (5 * k);
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2];
        }
        counts.push(x);
    }
    counts
        .into_iter()
        .map(|c| u32::try_from(c).map_err(|_| format!("compressed RLE decodes to a count of {c}").into()))
        .collect()
}

/// Even-odd fill of the polygons' union at pixel centres: a pixel is in when its centre
/// `(x+0.5, y+0.5)` is inside a polygon. pycocotools rasterizes on a 5× grid instead, so
/// boundary pixels can differ by one; areas agree within the outline's length.
pub fn rasterize_polygons(polys: &[Vec<f64>], w: usize, h: usize) -> Vec<bool> {
    let mut mask = vec![false; w * h];
    let mut crossings = Vec::new();
    for poly in polys {
        let pts: Vec<(f64, f64)> = poly.chunks(2).map(|c| (c[0], c[1])).collect();
        for y in 0..h {
            let cy = y as f64 + 0.5;
            crossings.clear();
            for i in 0..pts.len() {
                let (a, b) = (pts[i], pts[(i + 1) % pts.len()]);
                if (a.1 <= cy) != (b.1 <= cy) {
                    crossings.push(a.0 + (cy - a.1) / (b.1 - a.1) * (b.0 - a.0));
                }
            }
            crossings.sort_by(f64::total_cmp);
            for pair in crossings.chunks(2) {
                if let [x0, x1] = pair {
                    // Centres x+0.5 in [x0, x1).
                    let first = (x0 - 0.5).ceil().max(0.0) as usize;
                    let last = ((x1 - 0.5).ceil() as isize).min(w as isize);
                    for x in first..last.max(0) as usize {
                        mask[y * w + x] = true;
                    }
                }
            }
        }
    }
    mask
}

/// A real instance as DiverGen embeds it (`convert_lvis_to_coco_crop.py --mode padding --fill
/// blur --padding_width 40`): outside the mask the image is replaced by its 10×10 box blur, and
/// the mask's box padded by 40 px a side, clipped to the image, is cropped.
pub fn blurred_crop(image: &RgbImage, blurred: &RgbImage, mask: &Mask, padding: u32) -> Option<RgbImage> {
    let b = mask.bounds()?;
    let x0 = b.x0.saturating_sub(padding);
    let y0 = b.y0.saturating_sub(padding);
    let x1 = (b.x1 + padding).min(image.width());
    let y1 = (b.y1 + padding).min(image.height());
    Some(RgbImage::from_fn(x1 - x0, y1 - y0, |cx, cy| {
        let (sx, sy) = (x0 + cx, y0 + cy);
        if mask.get(sx, sy) {
            *image.get_pixel(sx, sy)
        } else {
            *blurred.get_pixel(sx, sy)
        }
    }))
}

/// `cv2.blur(img, (k, k))`: the normalized box filter, anchored at `k/2` (so an even kernel
/// covers `x-k/2 ..= x+k/2-1`), borders reflected without repeating the edge (REFLECT_101).
pub fn box_blur(image: &RgbImage, k: usize) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let period = 2 * (n - 1);
        let mut i = i.rem_euclid(period);
        if i >= n {
            i = period - i;
        }
        i as usize
    };
    let anchor = (k / 2) as isize;
    let src = image.as_raw();
    // Separable: rows then columns, in f32 sums, rounded once at the end like OpenCV's u8 path.
    let mut rows = vec![0f32; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut s = 0f32;
                for t in 0..k as isize {
                    let sx = reflect(x as isize - anchor + t, w);
                    s += src[(y * w + sx) * 3 + c] as f32;
                }
                rows[(y * w + x) * 3 + c] = s;
            }
        }
    }
    let norm = 1.0 / (k * k) as f32;
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let mut px = [0u8; 3];
        for (c, v) in px.iter_mut().enumerate() {
            let mut s = 0f32;
            for t in 0..k as isize {
                let sy = reflect(y as isize - anchor + t, h);
                s += rows[(sy * w + x as usize) * 3 + c];
            }
            *v = (s * norm).round().clamp(0.0, 255.0) as u8;
        }
        Rgb(px)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rectangle_polygon_covers_the_pixels_whose_centres_it_contains() {
        let mask = rasterize_polygons(&[vec![1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]], 6, 5);
        let rows: Vec<String> = mask
            .chunks(6)
            .map(|r| r.iter().map(|&b| if b { '#' } else { '.' }).collect())
            .collect();
        assert_eq!(rows, ["......", ".###..", ".###..", "......", "......"]);
    }

    #[test]
    fn a_triangle_has_the_area_of_its_polygon() {
        let mask = rasterize_polygons(&[vec![0.0, 0.0, 100.0, 0.0, 0.0, 100.0]], 100, 100);
        let area = mask.iter().filter(|&&b| b).count();
        assert!((area as i64 - 5000).abs() <= 100, "{area}");
    }

    #[test]
    fn compressed_rle_decodes_like_pycocotools() {
        // pycocotools.mask.encode of a 4x3 Fortran mask [[0,1,1],[0,1,1],[0,0,0],[1,0,0]]
        // (column-major counts 3,1,2,2,4) gives b'31202'... computed by hand from rleToString:
        // counts after the second are stored as differences from two before.
        let counts = [3u32, 1, 2, 2, 4];
        let mut s = String::new();
        for (i, &c) in counts.iter().enumerate() {
            let mut x = c as i64 - if i > 2 { counts[i - 2] as i64 } else { 0 };
            loop {
                let mut ch = x & 0x1f;
                x >>= 5;
                let more = if ch & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    ch |= 0x20;
                }
                s.push((ch as u8 + 48) as char);
                if !more {
                    break;
                }
            }
        }
        assert_eq!(decode_rle_string(&s).unwrap(), counts);
        assert!(decode_rle_string("3\u{7f}").is_err());
    }

    #[test]
    fn box_blur_matches_opencv_on_a_ramp() {
        // cv2.blur(np.arange(12, dtype=uint8).reshape(1,12) repeated in 3 channels, (10,10)) on
        // a single row: the vertical pass is the identity, REFLECT_101 at both ends.
        let img = RgbImage::from_fn(12, 1, |x, _| Rgb([x as u8 * 10; 3]));
        let out = box_blur(&img, 10);
        // x=0: window -5..=4 → reflected 5,4,3,2,1,0,1,2,3,4 → mean 2.5 → ×10 = 25.
        assert_eq!(out.get_pixel(0, 0).0[0], 25);
        // x=6: window 1..=10 → mean 5.5 → 55.
        assert_eq!(out.get_pixel(6, 0).0[0], 55);
    }

    #[test]
    fn the_blurred_crop_pads_and_clips() {
        let img = RgbImage::from_fn(100, 80, |x, y| Rgb([x as u8, y as u8, 0]));
        let blurred = RgbImage::from_pixel(100, 80, Rgb([9, 9, 9]));
        let mut mask = Mask::empty(100, 80);
        for y in 10..20 {
            for x in 70..90 {
                mask.set(x, y);
            }
        }
        let crop = blurred_crop(&img, &blurred, &mask, 40).unwrap();
        assert_eq!((crop.width(), crop.height()), (100 - 30, 20 + 40));
        assert_eq!(crop.get_pixel(70 - 30, 10).0, [70, 10, 0]);
        assert_eq!(crop.get_pixel(0, 0).0, [9, 9, 9]);
    }
}

//! Stage 2, SAM-background, exactly as DiverGen's `get_background_sam_mask.py` and
//! `clean_pool_if.py`: prompt SAM with the four image corners as positive points, take the third
//! multimask output (the background), invert it, then keep the largest external component
//! (ranked by the area its outline encloses, as `cv2.contourArea`), fill that outline, multiply
//! the alpha by it (`alpha *= seg`) and crop to its tight box.

use divergen_models::sam::{Point, PointLabel, Prompt, Sam};
use image::{Rgb, RgbImage, RgbaImage};

use super::mask::{Mask, PixelBox};
use crate::Result;

/// DiverGen's prompt: `[m,m], [0,W-1-m], [H-1-m,m], [H-1-m,W-1-m]` with margin 0, all positive.
pub fn corner_prompt(width: u32, height: u32) -> Prompt {
    let (x1, y1) = ((width - 1) as f32, (height - 1) as f32);
    Prompt {
        points: [(0.0, 0.0), (x1, 0.0), (0.0, y1), (x1, y1)]
            .into_iter()
            .map(|(x, y)| Point {
                x,
                y,
                label: PointLabel::Foreground,
            })
            .collect(),
        ..Default::default()
    }
}

/// The multimask output DiverGen takes (`masks[2]`), whatever SAM's IoU estimates say.
pub const BACKGROUND_MASK_INDEX: usize = 2;

/// Why an annotation produced no instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropReason {
    /// Nothing left after inverting the background.
    EmptyMask,
    /// The object covers less than `annotation.min_area` of the image.
    TooSmall,
    /// The tight box is thinner than 2 pixels.
    Degenerate,
    /// Below the CLIP threshold (stage 3).
    ClipFilter,
}

/// A generated instance after SAM-background.
#[derive(Clone, Debug)]
pub struct Annotated {
    /// The object (inverted background), full image size, before clean-up: stage 3 embeds the
    /// image with everything outside it black.
    pub raw_object: Mask,
    /// The RGBA crop: alpha 255 on the kept object pixels, 0 elsewhere.
    pub crop: RgbaImage,
    /// Where the crop is in the generated image.
    pub bbox: PixelBox,
    /// Object pixels kept, over the image's.
    pub area_fraction: f64,
}

/// SAM-background on one generated image.
pub struct Annotation {
    /// SAM's IoU estimate of the background mask taken.
    pub sam_iou: f32,
    /// The instance, or why the image gave none.
    pub instance: Result<Annotated, DropReason>,
}

/// Prompts SAM with the corners, takes the background mask and makes the instance from it.
pub fn annotate(sam: &Sam, image: &RgbImage, min_area: f64) -> Result<Annotation> {
    let embedding = sam.embed_image(image)?;
    let prompt = corner_prompt(image.width(), image.height());
    let prediction = sam.predict(&embedding, &prompt, true)?;
    let (Some(logits), Some(&sam_iou)) = (
        prediction.masks.get(BACKGROUND_MASK_INDEX),
        prediction.iou.get(BACKGROUND_MASK_INDEX),
    ) else {
        return Err("SAM returned fewer than 3 masks".into());
    };
    Ok(Annotation {
        sam_iou,
        instance: instance_from_background(image, logits, min_area),
    })
}

/// Turns SAM's background logits (`height × width`, row-major) into the instance, or says why not.
pub fn instance_from_background(
    image: &RgbImage,
    background_logits: &[f32],
    min_area: f64,
) -> Result<Annotated, DropReason> {
    let (w, h) = (image.width(), image.height());
    // SAM's mask threshold is logit 0; the saved PNG is 0/255, so DiverGen's `alpha > 128` is
    // the same cut.
    let object = Mask::from_bits(w, h, background_logits.iter().map(|&l| l <= 0.0).collect());
    let seg = largest_filled_component(&object).ok_or(DropReason::EmptyMask)?;
    let keep = object.and(&seg);
    let kept = keep.area();
    if kept == 0 {
        return Err(DropReason::EmptyMask);
    }
    let area_fraction = kept as f64 / (w as usize * h as usize) as f64;
    if area_fraction < min_area {
        return Err(DropReason::TooSmall);
    }
    let bbox = seg.bounds().ok_or(DropReason::EmptyMask)?;
    if bbox.width() < 2 || bbox.height() < 2 {
        return Err(DropReason::Degenerate);
    }
    let crop = RgbaImage::from_fn(bbox.width(), bbox.height(), |x, y| {
        let (sx, sy) = (bbox.x0 + x, bbox.y0 + y);
        let Rgb([r, g, b]) = *image.get_pixel(sx, sy);
        let a = if keep.get(sx, sy) { 255 } else { 0 };
        image::Rgba([r, g, b, a])
    });
    Ok(Annotated {
        raw_object: object,
        crop,
        bbox,
        area_fraction,
    })
}

/// The 8-connected component (OpenCV's contours follow 8-connectivity) whose outer outline
/// encloses the most area, with everything inside that outline set: `findContours(RETR_EXTERNAL)`
/// → largest `contourArea` → `fillPoly`.
pub fn largest_filled_component(object: &Mask) -> Option<Mask> {
    let (w, h) = (object.width() as usize, object.height() as usize);
    let mask = object.bits();
    let mut label = vec![0u32; w * h];
    let mut best: Option<(usize, Vec<bool>)> = None;
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if mask[j] && label[j] == 0 {
                        label[j] = next;
                        stack.push(j);
                    }
                }
            }
        }
        let filled = fill_outline(&members, &label, next, w, h);
        let area = filled.iter().filter(|&&f| f).count();
        if best.as_ref().is_none_or(|(a, _)| area > *a) {
            best = Some((area, filled));
        }
    }
    best.map(|(_, filled)| Mask::from_bits(object.width(), object.height(), filled))
}

/// Everything a component's outer outline encloses: the pixels of its box that cannot reach the
/// box's outside through 4-connected non-component pixels (8-connected foreground pairs with
/// 4-connected background).
fn fill_outline(members: &[usize], label: &[u32], id: u32, w: usize, h: usize) -> Vec<bool> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for &i in members {
        let (x, y) = (i % w, i / w);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    // The box grown by one pixel, so the outside is one connected ring.
    let (bw, bh) = (x1 - x0 + 3, y1 - y0 + 3);
    let inside = |bx: usize, by: usize| -> bool {
        if bx == 0 || by == 0 || bx == bw - 1 || by == bh - 1 {
            return false;
        }
        label[(y0 + by - 1) * w + (x0 + bx - 1)] == id
    };
    let mut outside = vec![false; bw * bh];
    let mut stack = vec![0usize];
    outside[0] = true;
    while let Some(i) = stack.pop() {
        let (x, y) = (i % bw, i / bw);
        let neighbours = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
        for (nx, ny) in neighbours {
            if nx >= bw || ny >= bh {
                continue;
            }
            let j = ny * bw + nx;
            if !outside[j] && !inside(nx, ny) {
                outside[j] = true;
                stack.push(j);
            }
        }
    }
    let mut filled = vec![false; w * h];
    for by in 1..bh - 1 {
        for bx in 1..bw - 1 {
            if !outside[by * bw + bx] {
                filled[(y0 + by - 1) * w + (x0 + bx - 1)] = true;
            }
        }
    }
    filled
}

/// The generated image as stage 3 embeds it: pixels outside the raw object black.
pub fn black_background(image: &RgbImage, object: &Mask) -> RgbImage {
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        if object.get(x, y) {
            *image.get_pixel(x, y)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(rows: &[&str]) -> Mask {
        let bits = rows.iter().flat_map(|r| r.bytes().map(|b| b == b'#')).collect();
        Mask::from_bits(rows[0].len() as u32, rows.len() as u32, bits)
    }

    fn show(mask: &Mask) -> Vec<String> {
        mask.bits()
            .chunks(mask.width() as usize)
            .map(|r| r.iter().map(|&b| if b { '#' } else { '.' }).collect())
            .collect()
    }

    #[test]
    fn the_largest_outline_wins_and_is_filled() {
        // A ring enclosing an island (kept: it is inside the outline), and a solid blob with
        // more pixels than the ring but a smaller enclosed area (dropped).
        let mask = grid(&[
            "...........",
            ".#####.....",
            ".#...#.###.",
            ".#.#.#.###.",
            ".#...#.###.",
            ".#####.###.",
            ".......###.",
            ".......###.",
        ]);
        let filled = largest_filled_component(&mask).unwrap();
        assert_eq!(
            show(&filled),
            [
                "...........",
                ".#####.....",
                ".#####.....",
                ".#####.....",
                ".#####.....",
                ".#####.....",
                "...........",
                "...........",
            ]
        );
    }

    #[test]
    fn diagonal_pixels_are_one_component() {
        let mask = grid(&["#...", ".#..", "..#.", "...."]);
        let filled = largest_filled_component(&mask).unwrap();
        assert_eq!(filled, mask);
    }

    #[test]
    fn sam_background_inverts_keeps_holes_transparent_and_crops() {
        // Logits > 0 are background. The object is a ring with a hole and an island; a stray
        // speck elsewhere is removed.
        let object = grid(&[
            "........", ".#####..", ".#...#..", ".#.#.#..", ".#...#..", ".#####..", "........", "......#.",
        ]);
        let logits: Vec<f32> = object.bits().iter().map(|&o| if o { -3.0 } else { 4.0 }).collect();
        let image = RgbImage::from_fn(object.width(), object.height(), |x, y| Rgb([x as u8, y as u8, 7]));
        let a = instance_from_background(&image, &logits, 0.0).unwrap();
        assert_eq!(a.bbox.xywh(), [1, 1, 5, 5]);
        let alpha: Vec<String> = (0..5)
            .map(|y| {
                (0..5)
                    .map(|x| if a.crop.get_pixel(x, y)[3] == 255 { '#' } else { '.' })
                    .collect()
            })
            .collect();
        // `alpha *= seg`: the filled outline only removes what lies outside it.
        assert_eq!(alpha, ["#####", "#...#", "#.#.#", "#...#", "#####"]);
        assert_eq!(a.crop.get_pixel(0, 0).0, [1, 1, 7, 255]);
        assert_eq!(a.raw_object, object);
        assert!((a.area_fraction - 17.0 / 64.0).abs() < 1e-12);
    }

    #[test]
    fn empty_tiny_and_thin_masks_are_dropped_with_a_reason() {
        let image = RgbImage::new(8, 8);
        assert_eq!(
            instance_from_background(&image, &[1.0; 64], 0.0).unwrap_err(),
            DropReason::EmptyMask
        );
        let mut line = [1.0f32; 64];
        for x in 0..8 {
            line[3 * 8 + x] = -1.0;
        }
        assert_eq!(
            instance_from_background(&image, &line, 0.0).unwrap_err(),
            DropReason::Degenerate
        );
        assert_eq!(
            instance_from_background(&image, &line, 0.5).unwrap_err(),
            DropReason::TooSmall
        );
    }

    #[test]
    fn the_prompt_is_the_four_corners_all_positive() {
        let p = corner_prompt(256, 128);
        let xy: Vec<(f32, f32)> = p.points.iter().map(|p| (p.x, p.y)).collect();
        assert_eq!(xy, [(0.0, 0.0), (255.0, 0.0), (0.0, 127.0), (255.0, 127.0)]);
        assert!(p.points.iter().all(|p| p.label == PointLabel::Foreground));
    }
}

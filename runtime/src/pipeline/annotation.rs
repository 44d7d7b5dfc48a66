//! Stage 2, SAM-background, exactly as DiverGen's `get_background_sam_mask.py` and
//! `clean_pool_if.py`: prompt SAM with the four image corners as positive points, take the third
//! multimask output (the background), invert it, then keep the largest external component
//! (ranked by the area its outline encloses, as `cv2.contourArea`), fill that outline, multiply
//! the alpha by it (`alpha *= seg`) and crop to its tight box.

use divergen_models::sam::{Point, PointLabel, Prompt, Sam};
use image::{Rgb, RgbImage, RgbaImage};

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
    pub raw_object: Vec<bool>,
    /// The RGBA crop: alpha 255 on the kept object pixels, 0 elsewhere.
    pub crop: RgbaImage,
    /// `[x, y, w, h]` of the crop in the generated image.
    pub bbox: [u32; 4],
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
pub fn annotate(sam: &Sam, image: &RgbImage, min_area: f64) -> Result<Annotation, String> {
    let embedding = sam.embed_image(image).map_err(|e| e.to_string())?;
    let prompt = corner_prompt(image.width(), image.height());
    let prediction = sam.predict(&embedding, &prompt, true).map_err(|e| e.to_string())?;
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
    let (w, h) = (image.width() as usize, image.height() as usize);
    // SAM's mask threshold is logit 0; the saved PNG is 0/255, so DiverGen's `alpha > 128` is
    // the same cut.
    let object: Vec<bool> = background_logits.iter().map(|&l| l <= 0.0).collect();
    let seg = largest_filled_component(&object, w, h).ok_or(DropReason::EmptyMask)?;
    let keep: Vec<bool> = object.iter().zip(&seg).map(|(&o, &s)| o && s).collect();
    let kept = keep.iter().filter(|&&k| k).count();
    if kept == 0 {
        return Err(DropReason::EmptyMask);
    }
    let area_fraction = kept as f64 / (w * h) as f64;
    if area_fraction < min_area {
        return Err(DropReason::TooSmall);
    }
    let [x0, y0, bw, bh] = tight_box(&seg, w, h).ok_or(DropReason::EmptyMask)?;
    if bw < 2 || bh < 2 {
        return Err(DropReason::Degenerate);
    }
    let crop = RgbaImage::from_fn(bw as u32, bh as u32, |x, y| {
        let (sx, sy) = (x0 + x as usize, y0 + y as usize);
        let Rgb([r, g, b]) = *image.get_pixel(sx as u32, sy as u32);
        let a = if keep[sy * w + sx] { 255 } else { 0 };
        image::Rgba([r, g, b, a])
    });
    Ok(Annotated {
        raw_object: object,
        crop,
        bbox: [x0 as u32, y0 as u32, bw as u32, bh as u32],
        area_fraction,
    })
}

/// `[x, y, w, h]` of the set pixels.
pub fn tight_box(mask: &[bool], w: usize, h: usize) -> Option<[usize; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
    }
    (x0 != usize::MAX).then(|| [x0, y0, x1 - x0 + 1, y1 - y0 + 1])
}

/// The 8-connected component (OpenCV's contours follow 8-connectivity) whose outer outline
/// encloses the most area, with everything inside that outline set: `findContours(RETR_EXTERNAL)`
/// → largest `contourArea` → `fillPoly`.
pub fn largest_filled_component(mask: &[bool], w: usize, h: usize) -> Option<Vec<bool>> {
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
    best.map(|(_, filled)| filled)
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
pub fn black_background(image: &RgbImage, object: &[bool]) -> RgbImage {
    let w = image.width() as usize;
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        if object[y as usize * w + x as usize] {
            *image.get_pixel(x, y)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let h = rows.len();
        let w = rows[0].len();
        (rows.iter().flat_map(|r| r.bytes().map(|b| b == b'#')).collect(), w, h)
    }

    fn show(mask: &[bool], w: usize) -> Vec<String> {
        mask.chunks(w)
            .map(|r| r.iter().map(|&b| if b { '#' } else { '.' }).collect())
            .collect()
    }

    #[test]
    fn the_largest_outline_wins_and_is_filled() {
        // A ring enclosing an island (kept: it is inside the outline), and a solid blob with
        // more pixels than the ring but a smaller enclosed area (dropped).
        let (mask, w, h) = grid(&[
            "...........",
            ".#####.....",
            ".#...#.###.",
            ".#.#.#.###.",
            ".#...#.###.",
            ".#####.###.",
            ".......###.",
            ".......###.",
        ]);
        let filled = largest_filled_component(&mask, w, h).unwrap();
        assert_eq!(
            show(&filled, w),
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
        let (mask, w, h) = grid(&["#...", ".#..", "..#.", "...."]);
        let filled = largest_filled_component(&mask, w, h).unwrap();
        assert_eq!(filled, mask);
    }

    #[test]
    fn sam_background_inverts_keeps_holes_transparent_and_crops() {
        // Logits > 0 are background. The object is a ring with a hole and an island; a stray
        // speck elsewhere is removed.
        let (object, w, h) = grid(&[
            "........", ".#####..", ".#...#..", ".#.#.#..", ".#...#..", ".#####..", "........", "......#.",
        ]);
        let logits: Vec<f32> = object.iter().map(|&o| if o { -3.0 } else { 4.0 }).collect();
        let image = RgbImage::from_fn(w as u32, h as u32, |x, y| Rgb([x as u8, y as u8, 7]));
        let a = instance_from_background(&image, &logits, 0.0).unwrap();
        assert_eq!(a.bbox, [1, 1, 5, 5]);
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

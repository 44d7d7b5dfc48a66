//! A pasted canvas as the wire's [`Sample`]: what the local store and the host write as
//! LVIS/COCO.

use divergen_protocol::{ImageData, Instance, Origin, Provenance, Sample};
use image::RgbImage;

use super::augmentation::Layer;
use super::config::RunConfig;
use super::real_data::ImageEntry;

/// The `seq`-th sample of the run: the canvas as PNG, each surviving layer as an instance (box
/// `[x, y, w, h]`, mask as COCO RLE, real or generated with its provenance).
pub fn to_sample(
    config: &RunConfig,
    run_id: &str,
    seq: u64,
    image: &RgbImage,
    layers: &[Layer],
    entry: &ImageEntry,
) -> Sample {
    let (w, h) = (image.width(), image.height());
    let instances = layers
        .iter()
        .map(|l| Instance {
            category_id: l.category_id,
            bbox: l.bbox.xywh().map(|v| v as f32),
            mask: l.mask.to_rle(),
            origin: match l.source {
                None => Origin::Real,
                Some(p) => Origin::Generated {
                    generator_id: p.generator_id,
                    prompt_id: p.prompt_id,
                    clip_score: if p.clip_score.is_finite() { p.clip_score } else { 0.0 },
                    sam_iou: p.sam_iou,
                },
            },
        })
        .collect();
    Sample {
        provenance: Provenance {
            device_id: config.device_id.clone(),
            run_id: run_id.to_string(),
            seed: config.seed,
            seq,
        },
        width: w,
        height: h,
        image: ImageData::Png(divergen_dataset::files::encode_png(w, h, image.as_raw())),
        instances,
        neg_category_ids: negative_categories(entry, layers),
        not_exhaustive_category_ids: entry.not_exhaustive_category_ids.clone(),
    }
}

/// The real image's verified-absent categories, less every category the sample now annotates
/// (pasting a category makes it present) and any it lists as not exhaustively annotated (present
/// too), so LVIS's federated loss never trains an annotated instance as background.
fn negative_categories(entry: &ImageEntry, layers: &[Layer]) -> Vec<u32> {
    entry
        .neg_category_ids
        .iter()
        .copied()
        .filter(|c| !layers.iter().any(|l| l.category_id == *c) && !entry.not_exhaustive_category_ids.contains(c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::augmentation::PastedFrom;
    use crate::pipeline::mask::{Mask, PixelBox};

    #[test]
    fn a_pasted_category_leaves_the_negative_list() {
        let entry = ImageEntry {
            id: 1,
            file_name: None,
            coco_url: None,
            width: 2,
            height: 1,
            neg_category_ids: vec![3, 5, 7, 9],
            not_exhaustive_category_ids: vec![9],
        };
        let layer = |category_id, source| Layer {
            category_id,
            mask: Mask::from_bits(2, 1, vec![true, false]),
            bbox: PixelBox {
                x0: 0,
                y0: 0,
                x1: 1,
                y1: 1,
            },
            source,
        };
        let pasted = PastedFrom {
            generator_id: 0,
            prompt_id: 0,
            clip_score: 0.7,
            sam_iou: 0.9,
        };
        let layers = [layer(5, Some(pasted)), layer(2, None)];
        // 5 is pasted here; 9 is listed as present-but-not-exhaustive, so it is not absent.
        assert_eq!(negative_categories(&entry, &layers), vec![3, 7]);
    }
}

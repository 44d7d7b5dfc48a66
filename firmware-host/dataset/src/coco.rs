//! The LVIS/COCO `annotations.json` each shard is written as, and read back by `verify` and the
//! burn dataset. Standard fields first; divergen's provenance fields ride along as extra keys,
//! which pycocotools, lvis-api and detectron2 ignore.

use divergen_protocol::{Category, Frequency, Instance, Origin, Rle, Sample};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CocoFile {
    pub info: Info,
    pub licenses: Vec<serde_json::Value>,
    pub categories: Vec<CocoCategory>,
    pub images: Vec<CocoImage>,
    pub annotations: Vec<CocoAnnotation>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Info {
    pub description: String,
    pub version: String,
    pub shard: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CocoCategory {
    pub id: u32,
    pub name: String,
    pub synset: String,
    pub def: String,
    /// LVIS's `f`, `c` or `r`.
    pub frequency: String,
    pub image_count: u64,
    pub instance_count: u64,
}

impl CocoCategory {
    pub fn new(c: &Category) -> Self {
        CocoCategory {
            id: c.id,
            name: c.name.clone(),
            synset: c.synset.clone(),
            def: c.def.clone(),
            frequency: c.frequency.code().into(),
            image_count: 0,
            instance_count: 0,
        }
    }

    pub fn frequency(&self) -> Option<Frequency> {
        Frequency::from_code(&self.frequency)
    }
}

/// One category of an LVIS `*_cat_info.json` table (DiverGen's, the procedural domain's): what
/// the pipeline reads its category set from and the domain writes. Fields LVIS's files may lack
/// read as empty.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CatInfo {
    pub id: u32,
    pub name: String,
    #[serde(default)]
    pub def: String,
    #[serde(default)]
    pub synset: String,
    #[serde(default)]
    pub synonyms: Vec<String>,
    /// LVIS's `f`, `c` or `r`.
    pub frequency: String,
    #[serde(default)]
    pub image_count: u64,
    #[serde(default)]
    pub instance_count: u64,
}

impl CatInfo {
    pub fn frequency(&self) -> Option<Frequency> {
        Frequency::from_code(&self.frequency)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CocoImage {
    pub id: u64,
    /// Relative to the shard's `images/` folder (detectron2's `image_root`).
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    pub neg_category_ids: Vec<u32>,
    pub not_exhaustive_category_ids: Vec<u32>,
    pub device_id: String,
    pub run_id: String,
    pub seed: u64,
    pub seq: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CocoRle {
    /// `[height, width]`.
    pub size: [u32; 2],
    /// Uncompressed column-major counts; pycocotools converts them with `frPyObjects`.
    pub counts: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CocoAnnotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u32,
    pub segmentation: CocoRle,
    /// Pixels of the mask. Written as an integer; read from any JSON number, since COCO's own
    /// files (and tools that compute polygon areas) store floats.
    #[serde(deserialize_with = "area_from_number")]
    pub area: u64,
    pub bbox: [f32; 4],
    pub iscrowd: u8,
    /// `real` or `generated`.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_id: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sam_iou: Option<f32>,
}

fn area_from_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let area = f64::deserialize(d)?;
    if area.is_finite() && area >= 0.0 && area <= u64::MAX as f64 {
        Ok(area.round() as u64)
    } else {
        Err(serde::de::Error::custom(format!("area {area} is not a pixel count")))
    }
}

impl CocoAnnotation {
    pub fn new(id: u64, image_id: u64, inst: &Instance) -> Self {
        let (source, generator_id, prompt_id, clip_score, sam_iou) = match inst.origin {
            Origin::Real => ("real", None, None, None, None),
            Origin::Generated {
                generator_id,
                prompt_id,
                clip_score,
                sam_iou,
            } => (
                "generated",
                Some(generator_id),
                Some(prompt_id),
                Some(clip_score),
                Some(sam_iou),
            ),
        };
        CocoAnnotation {
            id,
            image_id,
            category_id: inst.category_id,
            segmentation: CocoRle {
                size: [inst.mask.height, inst.mask.width],
                counts: inst.mask.counts.clone(),
            },
            area: inst.mask.area(),
            bbox: inst.bbox,
            iscrowd: 0,
            source: source.into(),
            generator_id,
            prompt_id,
            clip_score,
            sam_iou,
        }
    }

    pub fn rle(&self) -> Rle {
        Rle {
            height: self.segmentation.size[0],
            width: self.segmentation.size[1],
            counts: self.segmentation.counts.clone(),
        }
    }

    /// The protocol instance this annotation was written from.
    pub fn instance(&self) -> Result<Instance, String> {
        let origin = match self.source.as_str() {
            "real" => Origin::Real,
            "generated" => Origin::Generated {
                generator_id: self.generator_id.ok_or("generated annotation without generator_id")?,
                prompt_id: self.prompt_id.ok_or("generated annotation without prompt_id")?,
                clip_score: self.clip_score.ok_or("generated annotation without clip_score")?,
                sam_iou: self.sam_iou.ok_or("generated annotation without sam_iou")?,
            },
            other => {
                return Err(format!(
                    "annotation {}: source {other:?} is neither real nor generated",
                    self.id
                ));
            }
        };
        Ok(Instance {
            category_id: self.category_id,
            bbox: self.bbox,
            mask: self.rle(),
            origin,
        })
    }
}

/// Path of a sample's image inside `images/`: one folder per device and run, so ids that
/// contain separators cannot collide.
pub fn image_file_name(sample: &Sample) -> String {
    let p = &sample.provenance;
    format!("{}/{}/{:010}.png", p.device_id, p.run_id, p.seq)
}

//! A burn `Dataset` over written shards (the trait burn re-exports as
//! `burn::data::dataset::Dataset`), so a trainer reads the stream's output with burn's loaders.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use burn_dataset::{Dataset, DatasetError};
use divergen_protocol::{ImageData, Provenance, Sample};

use crate::coco::{CocoAnnotation, CocoFile, CocoImage};
use crate::store::list_shards;

struct Entry {
    images_dir: PathBuf,
    image: CocoImage,
    annotations: Vec<CocoAnnotation>,
}

/// Every sample of every sealed shard under an output folder, in shard then image-id order.
/// Items are [`Sample`]s with the image decoded to RGB8, exactly as the device sent them
/// (PNG-sent images decode to the same pixels).
pub struct ShardDataset {
    entries: Vec<Entry>,
}

impl ShardDataset {
    pub fn open(out: &Path) -> io::Result<Self> {
        let mut entries = Vec::new();
        for (_, shard) in list_shards(out)? {
            if shard.extension().is_some_and(|e| e == "tmp") {
                continue;
            }
            let path = shard.join("annotations.json");
            let file: CocoFile =
                serde_json::from_slice(&fs::read(&path).map_err(|e| err(&path, e))?).map_err(|e| err(&path, e))?;
            let mut by_image: std::collections::HashMap<u64, Vec<CocoAnnotation>> = Default::default();
            for ann in file.annotations {
                by_image.entry(ann.image_id).or_default().push(ann);
            }
            for image in file.images {
                let annotations = by_image.remove(&image.id).unwrap_or_default();
                entries.push(Entry {
                    images_dir: shard.join("images"),
                    image,
                    annotations,
                });
            }
        }
        Ok(ShardDataset { entries })
    }

    fn load(&self, entry: &Entry) -> Result<Sample, String> {
        let path = entry.images_dir.join(&entry.image.file_name);
        let rgb = image::open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_rgb8();
        let image = &entry.image;
        let mut annotations: Vec<&CocoAnnotation> = entry.annotations.iter().collect();
        annotations.sort_by_key(|a| a.id);
        Ok(Sample {
            provenance: Provenance {
                device_id: image.device_id.clone(),
                run_id: image.run_id.clone(),
                seed: image.seed,
                seq: image.seq,
            },
            width: rgb.width(),
            height: rgb.height(),
            image: ImageData::Rgb8(rgb.into_raw()),
            instances: annotations
                .into_iter()
                .map(|a| a.instance())
                .collect::<Result<_, _>>()?,
            neg_category_ids: image.neg_category_ids.clone(),
            not_exhaustive_category_ids: image.not_exhaustive_category_ids.clone(),
        })
    }
}

impl Dataset<Sample> for ShardDataset {
    /// Panics past `len()`, as burn's trait specifies; an unreadable image is an `Err`.
    fn get(&self, index: usize) -> Result<Sample, DatasetError> {
        let entry = &self.entries[index];
        self.load(entry)
            .map_err(|e| DatasetError::new(io::Error::other(format!("dataset item {index}: {e}"))))
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{}: {e}", path.display()))
}

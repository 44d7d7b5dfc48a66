//! Shards: `shard-NNNNNN/` holds `annotations.json` (LVIS/COCO), `images/` and `index.json` (ids
//! and sequence ranges, read at start-up); with `--tar`, `shard-NNNNNN.tar` holds the same
//! samples as WebDataset members.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use divergen_protocol::{ImageData, Sample};
use serde::{Deserialize, Serialize};

use super::journal::scan_journal;
use super::sealer::SealJob;
use super::{SessionKey, err, key};
use crate::coco::{self, CocoAnnotation, CocoCategory, CocoFile, CocoImage};
use crate::files::{encode_png, sync_dir, write_synced};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShardIndex {
    pub shard: u64,
    pub samples: u64,
    pub first_image_id: u64,
    pub first_annotation_id: u64,
    pub annotations: u64,
    /// Per (device, run): the sequence number after the last sample this shard holds.
    pub sessions: Vec<SessionRange>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRange {
    pub device_id: String,
    pub run_id: String,
    pub next_seq: u64,
}

/// Shard folders (`shard-N` and unfinished `shard-N.tmp`) by number.
pub fn list_shards(out: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut shards = Vec::new();
    for entry in fs::read_dir(out).map_err(|e| err(out, e))? {
        let entry = entry.map_err(|e| err(out, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("shard-") else {
            continue;
        };
        let number = rest.strip_suffix(".tmp").unwrap_or(rest);
        if entry.file_type().map_err(|e| err(out, e))?.is_dir()
            && let Ok(n) = number.parse::<u64>()
        {
            shards.push((n, entry.path()));
        }
    }
    shards.sort();
    Ok(shards)
}

/// Builds `shard-N.tmp/` from a full journal, fsyncs it, publishes it by renaming, then deletes
/// the journal. Runs on the sealer thread.
pub(super) fn seal_journal(job: &SealJob) -> io::Result<usize> {
    let mut shard = ShardBuilder::start(job)?;
    let journal = File::open(&job.journal).map_err(|e| err(&job.journal, e))?;
    scan_journal(&journal, &job.journal, |sample| shard.add(&sample))?;
    shard.finish()
}

/// A shard being built in `shard-N.tmp/` from the samples of one journal, in journal order.
struct ShardBuilder<'a> {
    job: &'a SealJob,
    name: String,
    tmp: PathBuf,
    images_dir: PathBuf,
    categories: BTreeMap<u32, CocoCategory>,
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
    /// Per (device, run): the sequence number after the last sample added.
    sessions: BTreeMap<SessionKey, u64>,
    /// Image folders created so far (one per device and run), each fsynced once at the end.
    made_dirs: HashSet<PathBuf>,
    /// With `--tar`: the WebDataset archive being written beside the folder, and its path.
    tar: Option<(tar::Builder<BufWriter<File>>, PathBuf)>,
    next_annotation_id: u64,
}

impl<'a> ShardBuilder<'a> {
    /// Starts `shard-N.tmp/` afresh (a leftover one is from a seal that crashed).
    fn start(job: &'a SealJob) -> io::Result<Self> {
        let out = &job.out;
        let name = format!("shard-{:06}", job.shard);
        let tmp = out.join(format!("{name}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
        }
        let images_dir = tmp.join("images");
        fs::create_dir_all(&images_dir).map_err(|e| err(&images_dir, e))?;
        let categories = job
            .categories
            .categories
            .iter()
            .map(|c| (c.id, CocoCategory::new(c)))
            .collect();
        let tar = match job.tar {
            true => {
                let path = out.join(format!("{name}.tar.tmp"));
                Some((
                    tar::Builder::new(BufWriter::new(File::create(&path).map_err(|e| err(&path, e))?)),
                    path,
                ))
            }
            false => None,
        };
        Ok(ShardBuilder {
            job,
            name,
            tmp,
            images_dir,
            categories,
            images: Vec::new(),
            annotations: Vec::new(),
            sessions: BTreeMap::new(),
            made_dirs: HashSet::new(),
            tar,
            next_annotation_id: job.first_annotation_id,
        })
    }

    /// Writes the sample's image (fsynced), records its image and annotations, and appends it to
    /// the WebDataset archive.
    fn add(&mut self, sample: &Sample) -> io::Result<()> {
        let image_id = self.job.first_image_id + self.images.len() as u64;
        let file_name = coco::image_file_name(sample);
        let png = self.write_image(sample, &file_name)?;
        let p = &sample.provenance;
        let image = CocoImage {
            id: image_id,
            file_name,
            width: sample.width,
            height: sample.height,
            neg_category_ids: sample.neg_category_ids.clone(),
            not_exhaustive_category_ids: sample.not_exhaustive_category_ids.clone(),
            device_id: p.device_id.clone(),
            run_id: p.run_id.clone(),
            seed: p.seed,
            seq: p.seq,
        };
        let first_annotation = self.annotations.len();
        let mut seen_categories = HashSet::new();
        for inst in &sample.instances {
            self.annotations
                .push(CocoAnnotation::new(self.next_annotation_id, image_id, inst));
            self.next_annotation_id += 1;
            if let Some(c) = self.categories.get_mut(&inst.category_id) {
                c.instance_count += 1;
                if seen_categories.insert(inst.category_id) {
                    c.image_count += 1;
                }
            }
        }
        if let Some((builder, path)) = self.tar.as_mut() {
            append_webdataset_sample(builder, path, &image, &self.annotations[first_annotation..], &png)?;
        }
        self.sessions.insert(key(sample), p.seq + 1);
        self.images.push(image);
        Ok(())
    }

    /// The sample's PNG under `images/`, fsynced; returns its bytes.
    fn write_image(&mut self, sample: &Sample, file_name: &str) -> io::Result<Vec<u8>> {
        let png = match &sample.image {
            ImageData::Png(png) => png.clone(),
            ImageData::Rgb8(rgb) => encode_png(sample.width, sample.height, rgb),
        };
        let path = self.images_dir.join(file_name);
        let dir = path.parent().expect("image paths have a folder").to_path_buf();
        if self.made_dirs.insert(dir.clone()) {
            fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
        }
        let mut file = File::create(&path).map_err(|e| err(&path, e))?;
        file.write_all(&png)
            .and_then(|()| file.sync_data())
            .map_err(|e| err(&path, e))?;
        Ok(png)
    }

    /// Writes `annotations.json` and `index.json`, fsyncs every folder, publishes the archive and
    /// then the folder by renaming, and only then deletes the journal. Returns the sample count.
    fn finish(self) -> io::Result<usize> {
        let ShardBuilder {
            job,
            name,
            tmp,
            images_dir,
            categories,
            images,
            annotations,
            sessions,
            made_dirs,
            tar,
            next_annotation_id,
        } = self;
        let out = &job.out;
        let samples = images.len();
        let file = CocoFile {
            info: coco::Info {
                description: "divergen: DiverGen instance-paste samples streamed from devices".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                shard: job.shard,
            },
            licenses: Vec::new(),
            categories: categories.into_values().collect(),
            images,
            annotations,
        };
        let index = ShardIndex {
            shard: job.shard,
            samples: samples as u64,
            first_image_id: job.first_image_id,
            first_annotation_id: job.first_annotation_id,
            annotations: next_annotation_id - job.first_annotation_id,
            sessions: sessions
                .into_iter()
                .map(|((device_id, run_id), next_seq)| SessionRange {
                    device_id,
                    run_id,
                    next_seq,
                })
                .collect(),
        };
        write_synced(
            &tmp.join("annotations.json"),
            &serde_json::to_vec(&file).map_err(|e| err(&tmp, e))?,
        )?;
        write_synced(
            &tmp.join("index.json"),
            &serde_json::to_vec_pretty(&index).map_err(|e| err(&tmp, e))?,
        )?;
        // The run folders, then the device folders above them.
        let parents: HashSet<PathBuf> = made_dirs
            .iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect();
        for dir in made_dirs.iter().chain(&parents) {
            sync_dir(dir)?;
        }
        sync_dir(&images_dir)?;
        sync_dir(&tmp)?;
        if let Some((builder, path)) = tar {
            let file = builder.into_inner().map_err(|e| err(&path, e))?;
            file.into_inner()
                .map_err(|e| err(&path, e.error()))?
                .sync_all()
                .map_err(|e| err(&path, e))?;
            fs::rename(&path, out.join(format!("{name}.tar"))).map_err(|e| err(&path, e))?;
        }
        let published = out.join(&name);
        fs::rename(&tmp, &published).map_err(|e| err(&published, e))?;
        sync_dir(out)?;
        // Only now may the journal go.
        fs::remove_file(&job.journal).map_err(|e| err(&job.journal, e))?;
        sync_dir(out)?;
        log::info!("sealed {} ({samples} samples)", published.display());
        Ok(samples)
    }
}

/// WebDataset: members sharing a key (the image id) form one sample, here `<id>.png` and
/// `<id>.json` (the image record and its annotations).
fn append_webdataset_sample(
    builder: &mut tar::Builder<BufWriter<File>>,
    path: &Path,
    image: &CocoImage,
    annotations: &[CocoAnnotation],
    png: &[u8],
) -> io::Result<()> {
    let key = format!("{:010}", image.id);
    let meta = serde_json::json!({
        "image": image,
        "annotations": annotations,
    });
    let meta = serde_json::to_vec(&meta).map_err(|e| err(path, e))?;
    for (member, data) in [(format!("{key}.png"), png), (format!("{key}.json"), meta.as_slice())] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, &member, data)
            .map_err(|e| err(path, e))?;
    }
    Ok(())
}

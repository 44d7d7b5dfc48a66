//! The host's durable dataset writer.
//!
//! Output folder:
//! - `categories.json`: the category table pinned by the first device (or `--categories`);
//! - `journal.log`: samples of the shard being filled, records `[len u32][crc32 u32][postcard
//!   Sample]`, fsynced before the host acknowledges them;
//! - `shard-NNNNNN/`: sealed shards, each `annotations.json` (LVIS/COCO) + `images/` +
//!   `index.json` (ids and sequence ranges, read at start-up);
//! - `shard-NNNNNN.tar` (with `--tar`): the same shard as WebDataset samples.
//!
//! A shard is built in `shard-NNNNNN.tmp/`, fsynced, and published by renaming the folder; only
//! then is the journal emptied. A crash at any point leaves either the journal (sealed again at
//! the next start) or the published shard (its samples are skipped when the journal is replayed).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use divergen_protocol::{CategoryTable, ImageData, Sample};
use serde::{Deserialize, Serialize};

use crate::coco::{self, CocoAnnotation, CocoCategory, CocoFile, CocoImage};

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
pub const CATEGORIES_FILE: &str = "categories.json";
pub const JOURNAL_FILE: &str = "journal.log";

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub out: PathBuf,
    /// Samples per shard.
    pub shard_size: usize,
    /// Also write each shard as a WebDataset `.tar`.
    pub tar: bool,
}

/// One (device, run): the unit sequence numbers count in.
pub type SessionKey = (String, String);

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

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StoreStats {
    pub committed: u64,
    pub duplicates: u64,
    pub commits: u64,
    pub shards_sealed: u64,
    pub journal_write: Duration,
    pub journal_fsync: Duration,
    pub seal: Duration,
}

/// What [`Store::commit`] did with a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// First sequence number the store does not hold for the session (the cumulative ack).
    pub next_seq: u64,
    /// A sample further ahead arrived: everything from `next_seq` must be sent again.
    pub gap: bool,
}

pub struct Store {
    config: StoreConfig,
    categories: Option<CategoryTable>,
    sessions: HashMap<SessionKey, u64>,
    journal: File,
    journal_records: usize,
    next_shard: u64,
    next_image_id: u64,
    next_annotation_id: u64,
    subscribers: Vec<SyncSender<Arc<Sample>>>,
    stats: StoreStats,
}

fn err(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{}: {what}", path.display()))
}

impl Store {
    /// Opens `out`, recovering from whatever an earlier host process left: removes half-built
    /// shards, reads the sealed ones' indexes, replays the journal and seals it if full.
    pub fn open(config: StoreConfig) -> io::Result<Self> {
        if config.shard_size == 0 {
            return Err(io::Error::other("shard size must be at least 1"));
        }
        let out = config.out.clone();
        fs::create_dir_all(&out).map_err(|e| err(&out, e))?;
        let categories = match fs::read(out.join(CATEGORIES_FILE)) {
            Ok(bytes) => {
                let path = out.join(CATEGORIES_FILE);
                let table: CategoryTable = serde_json::from_slice(&bytes).map_err(|e| err(&path, e))?;
                table.validate().map_err(|e| err(&path, e))?;
                Some(table)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(&out.join(CATEGORIES_FILE), e)),
        };
        let mut sessions = HashMap::new();
        let (mut next_shard, mut next_image_id, mut next_annotation_id) = (0, 1, 1);
        for (shard, path) in list_shards(&out)? {
            if path.extension().is_some_and(|e| e == "tmp") {
                log::warn!("removing {}, a shard a crashed host left half-built", path.display());
                fs::remove_dir_all(&path).map_err(|e| err(&path, e))?;
                continue;
            }
            let index_path = path.join("index.json");
            let index: ShardIndex = serde_json::from_slice(&fs::read(&index_path).map_err(|e| err(&index_path, e))?)
                .map_err(|e| err(&index_path, e))?;
            for s in index.sessions {
                let next = sessions.entry((s.device_id, s.run_id)).or_insert(0u64);
                *next = (*next).max(s.next_seq);
            }
            next_shard = next_shard.max(shard + 1);
            next_image_id = next_image_id.max(index.first_image_id + index.samples);
            next_annotation_id = next_annotation_id.max(index.first_annotation_id + index.annotations);
        }
        let journal_path = out.join(JOURNAL_FILE);
        let journal = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&journal_path)
            .map_err(|e| err(&journal_path, e))?;
        let mut store = Store {
            config,
            categories,
            sessions,
            journal: journal.try_clone().map_err(|e| err(&journal_path, e))?,
            journal_records: 0,
            next_shard,
            next_image_id,
            next_annotation_id,
            subscribers: Vec::new(),
            stats: StoreStats::default(),
        };
        // Pass 1: which records a published shard already holds, and whether the tail is torn.
        let mut held = 0usize;
        let mut kept = 0usize;
        let (intact_len, total_len) = scan_journal(&journal, &journal_path, |s| {
            if s.provenance.seq < store.next_seq(&key(&s)) {
                held += 1;
            } else {
                kept += 1;
            }
            Ok(())
        })?;
        if intact_len < total_len {
            log::warn!(
                "{}: cutting {} bytes of a record torn by a crash (never acknowledged)",
                journal_path.display(),
                total_len - intact_len
            );
        }
        if held > 0 || intact_len < total_len {
            // Rewrite the journal without what a published shard already holds.
            let tmp = out.join("journal.log.tmp");
            {
                let mut w = BufWriter::new(File::create(&tmp).map_err(|e| err(&tmp, e))?);
                let sessions = &store.sessions;
                scan_journal(&journal, &journal_path, |s| {
                    if s.provenance.seq >= sessions.get(&key(&s)).copied().unwrap_or(0) {
                        w.write_all(&journal_record(&s)).map_err(|e| err(&tmp, e))?;
                    }
                    Ok(())
                })?;
                w.into_inner()
                    .map_err(|e| err(&tmp, e.error()))?
                    .sync_all()
                    .map_err(|e| err(&tmp, e))?;
            }
            fs::rename(&tmp, &journal_path).map_err(|e| err(&journal_path, e))?;
            sync_dir(&out)?;
            store.journal = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&journal_path)
                .map_err(|e| err(&journal_path, e))?;
            log::info!(
                "{}: {held} samples already in a published shard were dropped from the journal",
                journal_path.display()
            );
        }
        // Pass 2: the session positions the journal's samples advance to.
        let mut advanced: Vec<(SessionKey, u64)> = Vec::new();
        scan_journal(&store.journal, &journal_path, |s| {
            advanced.push((key(&s), s.provenance.seq));
            Ok(())
        })?;
        debug_assert_eq!(advanced.len(), kept);
        for (session, seq) in advanced {
            let expected = store.next_seq(&session);
            if seq != expected {
                return Err(err(
                    &journal_path,
                    format!("holds sample {seq} of {}/{} but not {expected}", session.0, session.1),
                ));
            }
            store.sessions.insert(session, expected + 1);
            store.journal_records += 1;
        }
        if store.journal_records > 0 {
            log::info!(
                "{}: {} committed samples waiting for their shard",
                journal_path.display(),
                store.journal_records
            );
        }
        if store.journal_records >= store.config.shard_size {
            store.seal()?;
        }
        Ok(store)
    }

    pub fn categories(&self) -> Option<&CategoryTable> {
        self.categories.as_ref()
    }

    /// Pins the category table for this output folder (first device, or `--categories`).
    pub fn pin_categories(&mut self, table: CategoryTable) -> io::Result<()> {
        let path = self.config.out.join(CATEGORIES_FILE);
        table.validate().map_err(|e| err(&path, e))?;
        let json = serde_json::to_vec_pretty(&table).map_err(|e| err(&path, e))?;
        write_atomically(&path, &json)?;
        self.categories = Some(table);
        Ok(())
    }

    /// First sequence number not held for this (device, run).
    pub fn next_seq(&self, key: &SessionKey) -> u64 {
        self.sessions.get(key).copied().unwrap_or(0)
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Samples committed to the open shard and not yet sealed.
    pub fn pending(&self) -> usize {
        self.journal_records
    }

    /// A channel of samples as they are committed (after the fsync, before the ack). A slow
    /// reader slows the host, which slows the devices: nothing is dropped.
    pub fn subscribe(&mut self, capacity: usize) -> Receiver<Arc<Sample>> {
        let (tx, rx) = sync_channel(capacity);
        self.subscribers.push(tx);
        rx
    }

    /// Durably appends the in-order samples of `batch` (all from `session`, already validated),
    /// skipping ones already held. Returns the cumulative ack to send.
    pub fn commit(&mut self, session: &SessionKey, batch: Vec<Sample>) -> io::Result<Committed> {
        let mut next = self.next_seq(session);
        let mut gap = false;
        let mut fresh = Vec::new();
        for sample in batch {
            let seq = sample.provenance.seq;
            if seq < next {
                self.stats.duplicates += 1;
            } else if seq == next {
                next += 1;
                fresh.push(sample);
            } else {
                gap = true;
                break;
            }
        }
        let mut start = 0;
        while start < fresh.len() {
            let room = self.config.shard_size - self.journal_records;
            let end = (start + room).min(fresh.len());
            self.append(&fresh[start..end])?;
            self.sessions.insert(session.clone(), fresh[end - 1].provenance.seq + 1);
            start = end;
            if self.journal_records >= self.config.shard_size {
                self.seal()?;
            }
        }
        for sample in fresh {
            let sample = Arc::new(sample);
            self.subscribers.retain(|tx| tx.send(sample.clone()).is_ok());
        }
        Ok(Committed { next_seq: next, gap })
    }

    fn append(&mut self, samples: &[Sample]) -> io::Result<()> {
        let path = self.config.out.join(JOURNAL_FILE);
        let started = Instant::now();
        let mut bytes = Vec::new();
        for s in samples {
            bytes.extend_from_slice(&journal_record(s));
        }
        self.journal.write_all(&bytes).map_err(|e| err(&path, e))?;
        let written = Instant::now();
        self.journal.sync_data().map_err(|e| err(&path, e))?;
        self.stats.journal_write += written - started;
        self.stats.journal_fsync += written.elapsed();
        self.stats.commits += 1;
        self.stats.committed += samples.len() as u64;
        self.journal_records += samples.len();
        Ok(())
    }

    /// Turns the journal into a published shard. Called when it is full and at shutdown.
    pub fn seal(&mut self) -> io::Result<()> {
        if self.journal_records == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let out = self.config.out.clone();
        let journal_path = out.join(JOURNAL_FILE);
        let shard = self.next_shard;
        let name = format!("shard-{shard:06}");
        let tmp = out.join(format!("{name}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
        }
        let images_dir = tmp.join("images");
        fs::create_dir_all(&images_dir).map_err(|e| err(&images_dir, e))?;
        let table = self
            .categories
            .as_ref()
            .ok_or_else(|| err(&out, "samples but no category table"))?;
        let mut categories: BTreeMap<u32, CocoCategory> =
            table.categories.iter().map(|c| (c.id, CocoCategory::new(c))).collect();
        let mut images = Vec::with_capacity(self.journal_records);
        let mut annotations = Vec::new();
        let mut sessions: BTreeMap<SessionKey, u64> = BTreeMap::new();
        let mut made_dirs = std::collections::HashSet::new();
        let mut tar = match self.config.tar {
            true => {
                let path = out.join(format!("{name}.tar.tmp"));
                Some((
                    tar::Builder::new(BufWriter::new(File::create(&path).map_err(|e| err(&path, e))?)),
                    path,
                ))
            }
            false => None,
        };
        let (first_image_id, first_annotation_id) = (self.next_image_id, self.next_annotation_id);
        let mut next_annotation_id = first_annotation_id;
        let journal = self.journal.try_clone().map_err(|e| err(&journal_path, e))?;
        scan_journal(&journal, &journal_path, |sample| {
            let sample = &sample;
            let image_id = first_image_id + images.len() as u64;
            let file_name = coco::image_file_name(sample);
            let png = match &sample.image {
                ImageData::Png(png) => png.clone(),
                ImageData::Rgb8(rgb) => encode_png(sample.width, sample.height, rgb),
            };
            let path = images_dir.join(&file_name);
            let dir = path.parent().expect("image paths have a folder").to_path_buf();
            if made_dirs.insert(dir.clone()) {
                fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
            }
            let mut file = File::create(&path).map_err(|e| err(&path, e))?;
            file.write_all(&png)
                .and_then(|()| file.sync_data())
                .map_err(|e| err(&path, e))?;
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
            let first_ann = next_annotation_id;
            let mut seen_categories = std::collections::HashSet::new();
            for inst in &sample.instances {
                annotations.push(CocoAnnotation::new(next_annotation_id, image_id, inst));
                next_annotation_id += 1;
                if let Some(c) = categories.get_mut(&inst.category_id) {
                    c.instance_count += 1;
                    if seen_categories.insert(inst.category_id) {
                        c.image_count += 1;
                    }
                }
            }
            if let Some((builder, path)) = tar.as_mut() {
                // WebDataset: members sharing a key (the image id) form one sample.
                let key = format!("{image_id:010}");
                let meta = serde_json::json!({
                    "image": &image,
                    "annotations": &annotations[(first_ann - first_annotation_id) as usize..],
                });
                let meta = serde_json::to_vec(&meta).map_err(|e| err(path, e))?;
                for (member, data) in [(format!("{key}.png"), &png), (format!("{key}.json"), &meta)] {
                    let mut header = tar::Header::new_gnu();
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    header.set_cksum();
                    builder
                        .append_data(&mut header, &member, data.as_slice())
                        .map_err(|e| err(path, e))?;
                }
            }
            sessions.insert(key(sample), p.seq + 1);
            images.push(image);
            Ok(())
        })?;
        let samples = images.len();
        let file = CocoFile {
            info: coco::Info {
                description: "divergen: DiverGen instance-paste samples streamed from devices".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                shard,
            },
            licenses: Vec::new(),
            categories: categories.into_values().collect(),
            images,
            annotations,
        };
        let index = ShardIndex {
            shard,
            samples: samples as u64,
            first_image_id,
            first_annotation_id,
            annotations: next_annotation_id - first_annotation_id,
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
        for dir in &made_dirs {
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
        sync_dir(&out)?;
        // Only now may the journal forget these samples.
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_all())
            .map_err(|e| err(&journal_path, e))?;
        self.journal_records = 0;
        self.next_shard += 1;
        self.next_image_id += samples as u64;
        self.next_annotation_id = next_annotation_id;
        self.stats.shards_sealed += 1;
        self.stats.seal += started.elapsed();
        log::info!("sealed {} ({samples} samples)", published.display());
        Ok(())
    }
}

fn key(sample: &Sample) -> SessionKey {
    (sample.provenance.device_id.clone(), sample.provenance.run_id.clone())
}

fn journal_record(sample: &Sample) -> Vec<u8> {
    let body = postcard::to_allocvec(sample).expect("serialising to a Vec cannot fail");
    let mut record = Vec::with_capacity(body.len() + 8);
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&CRC32.checksum(&body).to_le_bytes());
    record.extend_from_slice(&body);
    record
}

/// Streams every intact record to `each`; returns the intact and total byte lengths (a torn
/// tail is where they differ).
fn scan_journal(journal: &File, path: &Path, mut each: impl FnMut(Sample) -> io::Result<()>) -> io::Result<(u64, u64)> {
    use std::io::{BufReader, Seek};
    let total = journal.metadata().map_err(|e| err(path, e))?.len();
    let mut reader = journal.try_clone().map_err(|e| err(path, e))?;
    reader.seek(io::SeekFrom::Start(0)).map_err(|e| err(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut offset = 0u64;
    let mut body = Vec::new();
    while offset + 8 <= total {
        let mut header = [0u8; 8];
        reader.read_exact(&mut header).map_err(|e| err(path, e))?;
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if offset + 8 + len > total {
            break;
        }
        body.resize(len as usize, 0);
        reader.read_exact(&mut body).map_err(|e| err(path, e))?;
        if CRC32.checksum(&body) != crc {
            break;
        }
        let sample: Sample = postcard::from_bytes(&body).map_err(|e| {
            err(
                path,
                format!("record at byte {offset} passed its CRC but does not decode: {e}"),
            )
        })?;
        each(sample)?;
        offset += 8 + len;
    }
    Ok((offset, total))
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

pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::Adaptive)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .expect("a validated RGB8 buffer encodes");
    png
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path).map_err(|e| err(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| err(path, e))
}

/// temp-then-rename, with the data and the folder entry fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use divergen_protocol::{Category, Frequency, Provenance};

    fn table() -> CategoryTable {
        CategoryTable {
            categories: vec![Category {
                id: 1,
                name: "thing".into(),
                synset: "thing.n.01".into(),
                def: String::new(),
                frequency: Frequency::Rare,
            }],
        }
    }

    fn sample(seq: u64) -> Sample {
        let mask = divergen_protocol::Rle::from_row_major(2, 2, &[1, 0, 0, 0]);
        Sample {
            provenance: Provenance {
                device_id: "d".into(),
                run_id: "r".into(),
                seed: 0,
                seq,
            },
            width: 2,
            height: 2,
            image: ImageData::Rgb8(vec![seq as u8; 12]),
            instances: vec![divergen_protocol::Instance {
                category_id: 1,
                bbox: mask.bbox(),
                mask,
                origin: divergen_protocol::Origin::Real,
            }],
            neg_category_ids: vec![],
            not_exhaustive_category_ids: vec![],
        }
    }

    fn open(out: &Path) -> Store {
        Store::open(StoreConfig {
            out: out.to_path_buf(),
            shard_size: 4,
            tar: false,
        })
        .unwrap()
    }

    #[test]
    fn duplicates_are_dropped_gaps_reported_and_shards_roll_at_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.pin_categories(table()).unwrap();
        let key = ("d".to_string(), "r".to_string());
        assert_eq!(
            store.commit(&key, (0..3).map(sample).collect()).unwrap(),
            Committed {
                next_seq: 3,
                gap: false
            }
        );
        let again = store
            .commit(&key, vec![sample(1), sample(2), sample(3), sample(5)])
            .unwrap();
        assert_eq!(again, Committed { next_seq: 4, gap: true });
        assert_eq!(store.stats().duplicates, 2);
        assert!(
            dir.path().join("shard-000000/annotations.json").exists(),
            "4 samples fill a shard"
        );
        assert_eq!(store.pending(), 0);
    }

    #[test]
    fn a_crash_after_publishing_a_shard_but_before_emptying_the_journal_loses_and_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let key = ("d".to_string(), "r".to_string());
        {
            let mut store = open(dir.path());
            store.pin_categories(table()).unwrap();
            store.commit(&key, (0..3).map(sample).collect()).unwrap();
        }
        // Keep a copy of the journal, let the shard seal, then put the journal back: the state a
        // crash between the folder rename and the journal truncation leaves.
        let journal = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        {
            let mut store = open(dir.path());
            store.commit(&key, vec![sample(3)]).unwrap();
        }
        let mut full = journal.clone();
        full.extend_from_slice(&journal_record(&sample(3)));
        fs::write(dir.path().join(JOURNAL_FILE), &full).unwrap();
        // And a torn record after it.
        let mut torn = full.clone();
        torn.extend_from_slice(&journal_record(&sample(4))[..10]);
        fs::write(dir.path().join(JOURNAL_FILE), &torn).unwrap();
        let mut store = open(dir.path());
        assert_eq!(store.pending(), 0, "everything in the journal is already in shard 0");
        assert_eq!(store.next_seq(&key), 4);
        store.commit(&key, (4..8).map(sample).collect()).unwrap();
        let ds = crate::ShardDataset::open(dir.path()).unwrap();
        use burn_dataset::Dataset;
        let seqs: Vec<u64> = ds.iter().map(|s| s.unwrap().provenance.seq).collect();
        assert_eq!(seqs, (0..8).collect::<Vec<_>>());
    }
}

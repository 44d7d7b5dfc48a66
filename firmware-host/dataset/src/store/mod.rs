//! The durable LVIS/COCO shard writer, used by the host and by a device writing locally.
//!
//! Output folder:
//! - `categories.json`: the category table pinned by the first device (or `--categories`);
//! - `journal-NNNNNN.log`: samples of shard NNNNNN while it fills, records `[len u32][crc32
//!   u32][postcard Sample]`, fsynced before the host acknowledges them;
//! - `shard-NNNNNN/`: sealed shards, each `annotations.json` (LVIS/COCO) + `images/` +
//!   `index.json` (ids and sequence ranges, read at start-up);
//! - `shard-NNNNNN.tar` (with `--tar`): the same shard as WebDataset samples.
//!
//! A full journal goes to a sealer thread, which builds `shard-NNNNNN.tmp/`, fsyncs it, publishes
//! it by renaming the folder, and only then deletes the journal. A crash at any point leaves the
//! journal (sealed again after the next start), the published shard (a leftover journal for it
//! is deleted), or both.

//!
//! The parts: `journal.rs` (the record format and its scan), `sealer.rs` (the thread that seals
//! full journals in order), `shard.rs` (building, publishing and listing shards); this file is
//! the store itself: recovery at start-up, commits, rotation.

mod journal;
mod sealer;
mod shard;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use divergen_protocol::{CategoryTable, Sample};
use serde::Serialize;

pub use crate::files::{encode_png, sync_dir, write_atomically};
pub use journal::list_journals;
use journal::{journal_path, journal_record, scan_journal};
use sealer::{SealJob, Sealer};
pub use shard::{SessionRange, ShardIndex, list_shards};

pub const CATEGORIES_FILE: &str = "categories.json";

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
    /// The journal being filled (`journal-<journal_shard>.log`), opened on first append.
    journal: Option<File>,
    journal_shard: u64,
    journal_records: usize,
    /// Image and annotation ids the open journal's first sample gets.
    journal_first_ids: (u64, u64),
    next_image_id: u64,
    next_annotation_id: u64,
    sealer: Sealer,
    subscribers: Vec<SyncSender<Arc<Sample>>>,
    stats: StoreStats,
}

fn err(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{}: {what}", path.display()))
}

fn key(sample: &Sample) -> SessionKey {
    (sample.provenance.device_id.clone(), sample.provenance.run_id.clone())
}

impl Store {
    /// Opens `out`, recovering from whatever an earlier host process left: removes half-built
    /// shards, reads the sealed ones' indexes, replays the journals, and queues full ones for
    /// sealing.
    pub fn open(config: StoreConfig) -> io::Result<Self> {
        if config.shard_size == 0 {
            return Err(io::Error::other("shard size must be at least 1"));
        }
        let out = config.out.clone();
        fs::create_dir_all(&out).map_err(|e| err(&out, e))?;
        let categories_path = out.join(CATEGORIES_FILE);
        let categories = match fs::read(&categories_path) {
            Ok(bytes) => {
                let table: CategoryTable = serde_json::from_slice(&bytes).map_err(|e| err(&categories_path, e))?;
                table.validate().map_err(|e| err(&categories_path, e))?;
                Some(table)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(&categories_path, e)),
        };
        let mut sessions = HashMap::new();
        let (mut next_shard, mut next_image_id, mut next_annotation_id) = (0, 1, 1);
        let mut sealed = HashSet::new();
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
            sealed.insert(shard);
            next_shard = next_shard.max(shard + 1);
            next_image_id = next_image_id.max(index.first_image_id + index.samples);
            next_annotation_id = next_annotation_id.max(index.first_annotation_id + index.annotations);
        }
        let mut store = Store {
            config,
            categories,
            sessions,
            journal: None,
            journal_shard: next_shard,
            journal_records: 0,
            journal_first_ids: (next_image_id, next_annotation_id),
            next_image_id,
            next_annotation_id,
            sealer: Sealer::start()?,
            subscribers: Vec::new(),
            stats: StoreStats::default(),
        };
        let journals = list_journals(&out)?;
        let last = journals.last().map(|(n, _)| *n);
        for (shard, path) in journals {
            if sealed.contains(&shard) {
                // Published, but the host stopped before deleting the journal.
                fs::remove_file(&path).map_err(|e| err(&path, e))?;
                continue;
            }
            if shard < store.journal_shard {
                return Err(err(
                    &path,
                    format!(
                        "journal for shard {shard}, but shard {} is already sealed",
                        store.journal_shard - 1
                    ),
                ));
            }
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|e| err(&path, e))?;
            let mut replayed = 0usize;
            let (first_image, first_annotation) = (store.next_image_id, store.next_annotation_id);
            let sessions = &mut store.sessions;
            let (mut images, mut annotations) = (0u64, 0u64);
            let (intact, total) = scan_journal(&file, &path, |s| {
                let session = key(&s);
                let expected = sessions.get(&session).copied().unwrap_or(0);
                if s.provenance.seq != expected {
                    return Err(err(
                        &path,
                        format!(
                            "holds sample {} of {}/{} where {expected} was due",
                            s.provenance.seq, session.0, session.1
                        ),
                    ));
                }
                sessions.insert(session, expected + 1);
                images += 1;
                annotations += s.instances.len() as u64;
                replayed += 1;
                Ok(())
            })?;
            if intact < total {
                log::warn!(
                    "{}: cutting {} bytes of a record torn by a crash (never acknowledged)",
                    path.display(),
                    total - intact
                );
                file.set_len(intact)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| err(&path, e))?;
            }
            store.next_image_id += images;
            store.next_annotation_id += annotations;
            store.journal_shard = shard;
            store.journal_first_ids = (first_image, first_annotation);
            store.journal_records = replayed;
            store.journal = Some(file);
            log::info!("{}: {replayed} acknowledged samples recovered", path.display());
            if Some(shard) != last || replayed >= store.config.shard_size {
                store.rotate()?;
            }
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
        let seal = self.sealer.state();
        StoreStats {
            shards_sealed: seal.sealed,
            seal: seal.time,
            ..self.stats
        }
    }

    /// Samples committed to the open journal and not yet handed to the sealer.
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
        if let Some(e) = &self.sealer.state().error {
            return Err(io::Error::other(format!("not accepting samples: {e}")));
        }
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
                self.rotate()?;
            }
        }
        for sample in fresh {
            let sample = Arc::new(sample);
            self.subscribers.retain(|tx| tx.send(sample.clone()).is_ok());
        }
        Ok(Committed { next_seq: next, gap })
    }

    fn append(&mut self, samples: &[Sample]) -> io::Result<()> {
        let path = journal_path(&self.config.out, self.journal_shard);
        if self.journal.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| err(&path, e))?;
            sync_dir(&self.config.out)?;
            self.journal = Some(file);
            self.journal_first_ids = (self.next_image_id, self.next_annotation_id);
        }
        let journal = self.journal.as_mut().expect("opened above");
        let started = Instant::now();
        let mut bytes = Vec::new();
        for s in samples {
            bytes.extend_from_slice(&journal_record(s));
        }
        journal.write_all(&bytes).map_err(|e| err(&path, e))?;
        let written = Instant::now();
        journal.sync_data().map_err(|e| err(&path, e))?;
        self.stats.journal_write += written - started;
        self.stats.journal_fsync += written.elapsed();
        self.stats.commits += 1;
        self.stats.committed += samples.len() as u64;
        self.journal_records += samples.len();
        self.next_image_id += samples.len() as u64;
        self.next_annotation_id += samples.iter().map(|s| s.instances.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Hands the open journal to the sealer and starts the next one.
    fn rotate(&mut self) -> io::Result<()> {
        if self.journal.take().is_none() || self.journal_records == 0 {
            return Ok(());
        }
        let categories = self
            .categories
            .clone()
            .ok_or_else(|| err(&self.config.out, "samples but no category table"))?;
        self.sealer.submit(SealJob {
            out: self.config.out.clone(),
            shard: self.journal_shard,
            journal: journal_path(&self.config.out, self.journal_shard),
            first_image_id: self.journal_first_ids.0,
            first_annotation_id: self.journal_first_ids.1,
            categories,
            tar: self.config.tar,
        })?;
        self.journal_shard += 1;
        self.journal_records = 0;
        self.journal_first_ids = (self.next_image_id, self.next_annotation_id);
        Ok(())
    }

    /// Seals everything, the partly filled journal included, and waits until it is published
    /// (graceful shutdown).
    pub fn seal(&mut self) -> io::Result<()> {
        self.rotate()?;
        self.sealer.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_dataset::Dataset;
    use divergen_protocol::ImageData;
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
        assert_eq!(store.pending(), 0, "4 samples fill a shard and go to the sealer");
        store.sealer.wait().unwrap();
        assert!(dir.path().join("shard-000000/annotations.json").exists());
        assert!(
            !journal_path(dir.path(), 0).exists(),
            "a sealed shard's journal is deleted"
        );
    }

    #[test]
    fn a_crash_after_publishing_a_shard_but_before_deleting_its_journal_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let key = ("d".to_string(), "r".to_string());
        let journal = {
            let mut store = open(dir.path());
            store.pin_categories(table()).unwrap();
            store.commit(&key, (0..4).map(sample).collect()).unwrap();
            store.sealer.wait().unwrap();
            (0..4).flat_map(|i| journal_record(&sample(i))).collect::<Vec<u8>>()
        };
        fs::write(journal_path(dir.path(), 0), &journal).unwrap();
        let mut store = open(dir.path());
        assert!(!journal_path(dir.path(), 0).exists());
        assert_eq!((store.pending(), store.next_seq(&key)), (0, 4));
        store.commit(&key, (4..6).map(sample).collect()).unwrap();
        store.seal().unwrap();
        let seqs: Vec<u64> = crate::dataset::ShardDataset::open(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.unwrap().provenance.seq)
            .collect();
        assert_eq!(seqs, (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_journal_tail_is_cut_and_ids_continue_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = ("d".to_string(), "r".to_string());
        {
            let mut store = open(dir.path());
            store.pin_categories(table()).unwrap();
            store.commit(&key, (0..2).map(sample).collect()).unwrap();
        } // killed: no seal
        let path = journal_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&journal_record(&sample(2))[..10]);
        fs::write(&path, &bytes).unwrap();
        let mut store = open(dir.path());
        assert_eq!((store.pending(), store.next_seq(&key)), (2, 2));
        store.commit(&key, (2..7).map(sample).collect()).unwrap();
        store.seal().unwrap();
        drop(store);
        let mut store = open(dir.path());
        store.commit(&key, vec![sample(7)]).unwrap();
        store.seal().unwrap();
        let ds = crate::dataset::ShardDataset::open(dir.path()).unwrap();
        let seqs: Vec<u64> = ds.iter().map(|s| s.unwrap().provenance.seq).collect();
        assert_eq!(seqs, (0..8).collect::<Vec<_>>());
        let report = crate::verify::verify(dir.path(), |_, _| {}).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.shards, report.images, report.annotations), (3, 8, 8));
    }
}

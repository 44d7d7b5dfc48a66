//! Where pasted samples go: the same LVIS/COCO shards `divergen-host` writes (its `Store`, used
//! here in-process), or the sample stream to a host through the persistent outbox. Either way a
//! bounded queue sits in front, so pasting waits when the disk or the link falls behind.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use divergen_dataset::store::SessionKey;
use divergen_dataset::{Store, StoreConfig};
use divergen_protocol::{CategoryTable, Sample};
use serde::Serialize;

use crate::Result;
use crate::stream::{Outbox, OutboxConfig, StreamConfig, Streamer, transport};

/// Samples waiting between paste and output, at most.
const QUEUE: usize = 8;
/// Samples per store commit (each commit is one fsync).
const COMMIT_BATCH: usize = 16;

#[derive(Clone, Debug, Serialize)]
pub struct SinkReport {
    pub kind: &'static str,
    pub target: String,
    pub samples: u64,
    /// Samples the store already held (a rerun of the same run id resumes).
    pub duplicates: u64,
}

pub enum Target<'a> {
    Local { dir: &'a Path, shard_size: usize },
    Stream { host: &'a str, outbox: &'a Path },
}

/// A writer thread behind a bounded queue.
pub struct Sink {
    sender: Option<SyncSender<Sample>>,
    worker: Option<JoinHandle<Result<SinkReport>>>,
}

impl Sink {
    pub fn open(target: Target, device_id: &str, run_id: &str, table: CategoryTable) -> Result<Self> {
        let (sender, receiver) = sync_channel::<Sample>(QUEUE);
        let key: SessionKey = (device_id.to_string(), run_id.to_string());
        let worker = match target {
            Target::Local { dir, shard_size } => {
                let mut store = Store::open(StoreConfig {
                    out: dir.to_path_buf(),
                    shard_size,
                    tar: false,
                })
                .map_err(|e| format!("{}: {e}", dir.display()))?;
                match store.categories() {
                    Some(pinned) if pinned != &table => {
                        return Err(format!(
                            "{}: holds a dataset with another category table ({} categories); use another output folder",
                            dir.display(),
                            pinned.categories.len()
                        ).into());
                    }
                    Some(_) => {}
                    None => store
                        .pin_categories(table)
                        .map_err(|e| format!("{}: {e}", dir.display()))?,
                }
                let target = dir.display().to_string();
                std::thread::spawn(move || write_local(store, key, receiver, target))
            }
            Target::Stream { host, outbox } => {
                let outbox = Arc::new(
                    Outbox::open(outbox, OutboxConfig::default()).map_err(|e| format!("{}: {e}", outbox.display()))?,
                );
                let transport = transport::parse(host)?;
                let streamer = Streamer::start(outbox.clone(), transport, StreamConfig::new(device_id, run_id, table))
                    .map_err(|e| format!("stream to {host}: {e}"))?;
                let target = host.to_string();
                std::thread::spawn(move || stream(outbox, streamer, receiver, target))
            }
        };
        Ok(Sink {
            sender: Some(sender),
            worker: Some(worker),
        })
    }

    /// Queues a sample; blocks while the queue is full. An error means the writer stopped.
    pub fn send(&mut self, sample: Sample) -> Result<()> {
        let sent = self.sender.as_ref().map(|s| s.send(sample).is_ok()).unwrap_or(false);
        if sent {
            return Ok(());
        }
        // The writer ended early: its error says why.
        Err(self.join().err().unwrap_or_else(|| "the output writer stopped".into()))
    }

    pub fn finish(mut self) -> Result<SinkReport> {
        self.join()
    }

    fn join(&mut self) -> Result<SinkReport> {
        self.sender = None;
        match self.worker.take() {
            Some(w) => w.join().map_err(|_| "the output writer panicked".to_string())?,
            None => Err("the output writer already ended".into()),
        }
    }
}

fn write_local(mut store: Store, key: SessionKey, samples: Receiver<Sample>, target: String) -> Result<SinkReport> {
    let mut batch = Vec::with_capacity(COMMIT_BATCH);
    let mut total = 0u64;
    let before = store.stats().duplicates;
    let commit = |store: &mut Store, batch: &mut Vec<Sample>| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let committed = store
            .commit(&key, std::mem::take(batch))
            .map_err(|e| format!("{target}: {e}"))?;
        if committed.gap {
            return Err(format!("{target}: samples out of order (next expected {})", committed.next_seq).into());
        }
        Ok(())
    };
    for sample in samples {
        total += 1;
        batch.push(sample);
        if batch.len() >= COMMIT_BATCH {
            commit(&mut store, &mut batch)?;
        }
    }
    commit(&mut store, &mut batch)?;
    store.seal().map_err(|e| format!("{target}: {e}"))?;
    Ok(SinkReport {
        kind: "local",
        target,
        samples: total,
        duplicates: store.stats().duplicates - before,
    })
}

fn stream(outbox: Arc<Outbox>, streamer: Streamer, samples: Receiver<Sample>, target: String) -> Result<SinkReport> {
    let mut total = 0u64;
    for sample in samples {
        outbox.push(sample).map_err(|e| format!("outbox: {e}"))?;
        total += 1;
    }
    streamer
        .finish(Duration::from_secs(600))
        .map_err(|e| format!("stream to {target}: {e}"))?;
    Ok(SinkReport {
        kind: "stream",
        target,
        samples: total,
        duplicates: 0,
    })
}

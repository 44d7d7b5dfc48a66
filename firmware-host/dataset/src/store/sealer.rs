//! The sealer thread: full journals become shards in order, off the commit path.

use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use divergen_protocol::CategoryTable;

use super::shard::seal_journal;

/// A full journal waiting to become `shard-N`.
pub(super) struct SealJob {
    pub out: PathBuf,
    pub shard: u64,
    pub journal: PathBuf,
    pub first_image_id: u64,
    pub first_annotation_id: u64,
    pub categories: CategoryTable,
    pub tar: bool,
}

#[derive(Default)]
pub(super) struct SealState {
    queued: usize,
    pub error: Option<String>,
    pub sealed: u64,
    pub time: Duration,
}

/// Seals shards on its own thread, in order, so a seal (thousands of fsyncs) never holds up
/// the commits and acks of the devices.
pub(super) struct Sealer {
    jobs: Option<Sender<SealJob>>,
    thread: Option<JoinHandle<()>>,
    state: Arc<(Mutex<SealState>, Condvar)>,
}

impl Sealer {
    pub(super) fn start() -> io::Result<Self> {
        let (tx, rx) = channel::<SealJob>();
        let state = Arc::new((Mutex::new(SealState::default()), Condvar::new()));
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("divergen-sealer".into())
            .spawn(move || {
                for job in rx {
                    let started = Instant::now();
                    let result = seal_journal(&job);
                    let (lock, done) = &*shared;
                    let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
                    state.queued -= 1;
                    state.time += started.elapsed();
                    match result {
                        Ok(_) => state.sealed += 1,
                        Err(e) => {
                            log::error!(
                                "sealing shard {} failed: {e}; its samples stay in the journal",
                                job.shard
                            );
                            state.error.get_or_insert(e.to_string());
                        }
                    }
                    done.notify_all();
                }
            })?;
        Ok(Sealer {
            jobs: Some(tx),
            thread: Some(thread),
            state,
        })
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, SealState> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn submit(&self, job: SealJob) -> io::Result<()> {
        self.state().queued += 1;
        let jobs = self.jobs.as_ref().expect("sealer open while the store is");
        jobs.send(job)
            .map_err(|_| io::Error::other("the sealer thread is gone"))
    }

    /// Waits until every submitted shard is published; the first failure, if any.
    pub(super) fn wait(&self) -> io::Result<()> {
        let (lock, done) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        while state.queued > 0 {
            state = done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        match &state.error {
            Some(e) => Err(io::Error::other(e.clone())),
            None => Ok(()),
        }
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

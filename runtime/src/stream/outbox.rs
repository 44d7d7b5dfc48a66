//! The device's persistent outbox: every sample stays on disk until the host acknowledges it.
//!
//! Layout of the outbox folder:
//! - `seg-<first seq, 20 digits>.log`: append-only segments of records
//!   `[seq u64 LE][len u32 LE][crc32 u32 LE][frame bytes]`, where the frame is the ready-to-send
//!   encoded [`DeviceMessage::Sample`];
//! - `acked`: the cumulative ack (`next_seq` u64 LE + its CRC-32), replaced by temp-then-rename.
//!
//! A record torn by power loss fails its length or CRC check when the outbox is reopened and is
//! cut off there: `push` had not returned, so that sample was never produced. Segments whose
//! records are all acknowledged are deleted. The bound (`max_bytes`) counts unacknowledged
//! records; the segment being written may hold up to `segment_bytes` more of acknowledged ones.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use divergen_protocol::{DeviceMessage, Sample, crc32, encode_message};

const HEADER: usize = 16;

#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// Unacknowledged bytes the outbox may hold; `push` blocks beyond this.
    pub max_bytes: u64,
    /// A new segment file starts after this many bytes.
    pub segment_bytes: u64,
    /// fsync each record and each ack. Off only for benchmarks of the link itself.
    pub sync: bool,
}

impl OutboxConfig {
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        OutboxConfig {
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(64 << 10, 64 << 20),
            sync: true,
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self::with_max_bytes(256 << 20)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct OutboxStats {
    pub pushed: u64,
    /// Pushes that had to wait for acknowledgements (backpressure).
    pub blocked_pushes: u64,
    pub blocked_time: Duration,
}

struct Record {
    seq: u64,
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Sequence number after the segment's last record.
    end_seq: u64,
}

struct State {
    records: VecDeque<Record>,
    segments: VecDeque<Segment>,
    writer: Option<(File, u64)>,
    acked: u64,
    next_seq: u64,
    bytes: u64,
    closed: Option<String>,
    /// Bumped on every push, ack and [`Outbox::notify`], so waiters never miss a wake-up.
    epoch: u64,
    stats: OutboxStats,
}

pub struct Outbox {
    dir: PathBuf,
    config: OutboxConfig,
    state: Mutex<State>,
    changed: Condvar,
}

fn io_err(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("outbox {}: {what}", path.display()))
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, recovering whatever a previous run left.
    pub fn open(dir: impl Into<PathBuf>, config: OutboxConfig) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let acked = read_acked(&dir)?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(first) = name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".log")) {
                let first = first
                    .parse::<u64>()
                    .map_err(|_| io_err(&path, "segment name is not seg-<number>.log"))?;
                names.push((first, path));
            }
        }
        names.sort();
        let mut state = State {
            records: VecDeque::new(),
            segments: VecDeque::new(),
            writer: None,
            acked,
            next_seq: acked,
            bytes: 0,
            closed: None,
            epoch: 0,
            stats: OutboxStats::default(),
        };
        let mut expected: Option<u64> = None;
        for (first_seq, path) in names {
            let end_seq = scan_segment(&path, first_seq, expected, |seq, offset, len| {
                if seq >= acked {
                    state.records.push_back(Record {
                        seq,
                        segment: first_seq,
                        offset,
                        len,
                    });
                    state.bytes += len as u64 + HEADER as u64;
                }
            })?;
            expected = Some(end_seq);
            if end_seq <= acked || end_seq == first_seq {
                fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                continue;
            }
            state.next_seq = state.next_seq.max(end_seq);
            state.segments.push_back(Segment {
                first_seq,
                path,
                end_seq,
            });
        }
        if let Some(first) = state.records.front()
            && first.seq != acked
        {
            return Err(io_err(
                &dir,
                format!(
                    "samples {acked}..{} are missing: neither acknowledged nor on disk",
                    first.seq
                ),
            ));
        }
        if !state.records.is_empty() {
            log::info!(
                "outbox {}: resuming with {} unacknowledged samples ({}..{})",
                dir.display(),
                state.records.len(),
                acked,
                state.next_seq
            );
        }
        Ok(Outbox {
            dir,
            config,
            state: Mutex::new(state),
            changed: Condvar::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Assigns the next sequence number to `sample`, stores it durably and returns the number.
    /// Blocks while the outbox is full; fails only on a disk error, a sample larger than the
    /// whole outbox, or after [`Outbox::close`].
    pub fn push(&self, sample: Sample) -> io::Result<u64> {
        // The host would refuse it and end the stream; better to fail the producer now.
        sample
            .validate(None)
            .map_err(|e| io_err(&self.dir, format!("sample refused before sending: {e}")))?;
        let mut message = DeviceMessage::Sample(sample);
        let mut state = self.lock();
        let started = Instant::now();
        let mut waited = false;
        // Encoded for a sequence number; redone only if another producer took that number
        // while this one waited for room.
        let mut encoded: Option<(u64, Vec<u8>)> = None;
        loop {
            if let Some(reason) = &state.closed {
                return Err(io::Error::other(format!("outbox closed: {reason}")));
            }
            let seq = state.next_seq;
            if encoded.as_ref().is_none_or(|(for_seq, _)| *for_seq != seq) {
                if let DeviceMessage::Sample(sample) = &mut message {
                    sample.provenance.seq = seq;
                }
                encoded = Some((seq, encode_message(&message)));
            }
            let frame = &encoded.as_ref().expect("encoded above").1;
            let size = (frame.len() + HEADER) as u64;
            if frame.len() > divergen_protocol::limits::MAX_FRAME_BYTES {
                return Err(io_err(
                    &self.dir,
                    format!("a {}-byte sample exceeds the protocol's frame limit", frame.len()),
                ));
            }
            if size > self.config.max_bytes {
                return Err(io_err(
                    &self.dir,
                    format!(
                        "a {size}-byte sample does not fit an outbox of {} bytes",
                        self.config.max_bytes
                    ),
                ));
            }
            if state.bytes + size > self.config.max_bytes {
                waited = true;
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            self.append(&mut state, seq, frame)?;
            state.next_seq += 1;
            state.bytes += size;
            state.epoch += 1;
            state.stats.pushed += 1;
            if waited {
                state.stats.blocked_pushes += 1;
                state.stats.blocked_time += started.elapsed();
            }
            drop(state);
            self.changed.notify_all();
            return Ok(seq);
        }
    }

    fn append(&self, state: &mut State, seq: u64, frame: &[u8]) -> io::Result<()> {
        let roll = match &state.writer {
            Some((_, len)) => *len >= self.config.segment_bytes,
            None => true,
        };
        if roll {
            let path = self.dir.join(format!("seg-{seq:020}.log"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            if self.config.sync {
                sync_dir(&self.dir)?;
            }
            state.writer = Some((file, 0));
            state.segments.push_back(Segment {
                first_seq: seq,
                path,
                end_seq: seq,
            });
        }
        let (file, len) = state.writer.as_mut().expect("a segment is open after rolling");
        let mut record = Vec::with_capacity(HEADER + frame.len());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32(frame).to_le_bytes());
        record.extend_from_slice(frame);
        let segment = state.segments.back_mut().expect("the open segment is listed");
        let result = file
            .write_all(&record)
            .and_then(|()| if self.config.sync { file.sync_data() } else { Ok(()) });
        if let Err(e) = result {
            // The tail may now be torn; a fresh segment keeps later records readable.
            state.writer = None;
            return Err(io_err(&segment.path, e));
        }
        state.records.push_back(Record {
            seq,
            segment: segment.first_seq,
            offset: *len + HEADER as u64,
            len: frame.len() as u32,
        });
        segment.end_seq = seq + 1;
        *len += record.len() as u64;
        Ok(())
    }

    /// The encoded frame of `seq`, if it is still unacknowledged.
    pub fn frame(&self, seq: u64) -> io::Result<Option<Vec<u8>>> {
        let (path, offset, len) = {
            let state = self.lock();
            let Some(first) = state.records.front() else {
                return Ok(None);
            };
            let Some(record) = seq.checked_sub(first.seq).and_then(|i| state.records.get(i as usize)) else {
                return Ok(None);
            };
            let segment = state
                .segments
                .iter()
                .find(|s| s.first_seq == record.segment)
                .expect("record's segment");
            (segment.path.clone(), record.offset, record.len)
        };
        let mut frame = vec![0u8; len as usize];
        let file = File::open(&path).map_err(|e| io_err(&path, e))?;
        read_exact_at(&file, &mut frame, offset).map_err(|e| io_err(&path, e))?;
        Ok(Some(frame))
    }

    /// Records the host's cumulative ack: everything below `next_seq` is stored there.
    pub fn ack(&self, next_seq: u64) -> io::Result<()> {
        let mut state = self.lock();
        if next_seq <= state.acked {
            return Ok(());
        }
        if next_seq > state.next_seq {
            return Err(io_err(
                &self.dir,
                format!(
                    "host acknowledged up to {next_seq} but only {} samples exist",
                    state.next_seq
                ),
            ));
        }
        while state.records.front().is_some_and(|r| r.seq < next_seq) {
            let record = state.records.pop_front().expect("checked non-empty");
            state.bytes -= record.len as u64 + HEADER as u64;
        }
        state.acked = next_seq;
        write_acked(&self.dir, next_seq, self.config.sync)?;
        // Delete fully acknowledged segments, except the one being appended to.
        while state.segments.len() > 1 && state.segments.front().is_some_and(|s| s.end_seq <= next_seq) {
            let segment = state.segments.pop_front().expect("checked non-empty");
            fs::remove_file(&segment.path).map_err(|e| io_err(&segment.path, e))?;
        }
        state.epoch += 1;
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// First sequence number not yet acknowledged.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Sequence number the next push gets.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    pub fn unacked_bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn stats(&self) -> OutboxStats {
        self.lock().stats
    }

    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Wakes anything in [`Outbox::wait_changed`] (the link's reader calls it on each message).
    pub fn notify(&self) {
        self.lock().epoch += 1;
        self.changed.notify_all();
    }

    /// Waits until anything changed since `epoch`, or `timeout`.
    pub fn wait_changed(&self, epoch: u64, timeout: Duration) {
        let state = self.lock();
        if state.epoch == epoch {
            let _ = self.changed.wait_timeout(state, timeout);
        }
    }

    /// Waits until every pushed sample is acknowledged, or `timeout`. True when all are.
    pub fn wait_all_acked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.acked < state.next_seq && state.closed.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.acked == state.next_seq
    }

    /// Makes pushes fail from now on (the link failed for good); what is stored stays stored.
    pub fn close(&self, reason: &str) {
        self.lock().closed = Some(reason.to_string());
        self.changed.notify_all();
    }
}

/// Reads records, calls `found(seq, offset, len)` for each intact one, truncates a torn tail.
/// Returns the sequence number after the last intact record.
fn scan_segment(
    path: &Path,
    first_seq: u64,
    expected_first: Option<u64>,
    mut found: impl FnMut(u64, u64, u32),
) -> io::Result<u64> {
    if let Some(expected) = expected_first
        && expected != first_seq
    {
        return Err(io_err(
            path,
            format!("segment starts at {first_seq}, the previous one ended at {expected}"),
        ));
    }
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io_err(path, e))?;
    let mut offset = 0usize;
    let mut next = first_seq;
    while offset + HEADER <= bytes.len() {
        let header = &bytes[offset..offset + HEADER];
        let seq = u64::from_le_bytes(header[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
        let body = offset + HEADER;
        let intact =
            seq == next && body + len as usize <= bytes.len() && crc32(&bytes[body..body + len as usize]) == crc;
        if !intact {
            break;
        }
        found(seq, body as u64, len);
        next += 1;
        offset = body + len as usize;
    }
    if offset < bytes.len() {
        log::warn!(
            "outbox {}: cutting a torn record at byte {offset} ({} bytes after the last intact sample {})",
            path.display(),
            bytes.len() - offset,
            next.wrapping_sub(1)
        );
        let file = OpenOptions::new().write(true).open(path).map_err(|e| io_err(path, e))?;
        file.set_len(offset as u64)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(path, e))?;
    }
    Ok(next)
}

fn read_acked(dir: &Path) -> io::Result<u64> {
    let path = dir.join("acked");
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(&path, e)),
    };
    if bytes.len() != 12 || crc32(&bytes[..8]).to_le_bytes() != bytes[8..12] {
        return Err(io_err(&path, "ack file is corrupt (expected 8 bytes + CRC-32)"));
    }
    Ok(u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")))
}

fn write_acked(dir: &Path, next_seq: u64, sync: bool) -> io::Result<()> {
    let path = dir.join("acked");
    let tmp = dir.join("acked.tmp");
    let mut bytes = next_seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32(&bytes).to_le_bytes());
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        if sync {
            file.sync_data()?;
        }
        fs::rename(&tmp, &path)?;
        if sync {
            sync_dir(dir)?;
        }
        Ok(())
    };
    write().map_err(|e| io_err(&path, e))
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

/// A positioned read: `pread` on Unix; elsewhere (Windows, where DX12 is offered) a seek on the
/// handle this call opened alone, so no other reader's position moves.
#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(mut file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::synthetic;
    use divergen_protocol::decode_message;
    use std::sync::Arc;

    fn tiny(seq: u64) -> Sample {
        synthetic::sample(&synthetic::SampleSpec::tiny("dev", "run"), seq)
    }

    fn decoded_seq(frame: &[u8]) -> u64 {
        match decode_message::<DeviceMessage>(&frame[..frame.len() - 1]).unwrap() {
            DeviceMessage::Sample(s) => s.provenance.seq,
            other => panic!("not a sample: {other:?}"),
        }
    }

    #[test]
    fn unacknowledged_samples_survive_a_restart_and_acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let config = OutboxConfig {
            max_bytes: 1 << 20,
            segment_bytes: 2048,
            sync: true,
        };
        {
            let outbox = Outbox::open(dir.path(), config.clone()).unwrap();
            for i in 0..20 {
                assert_eq!(outbox.push(tiny(999)).unwrap(), i);
            }
            outbox.ack(12).unwrap();
            assert_eq!(decoded_seq(&outbox.frame(12).unwrap().unwrap()), 12);
            assert!(outbox.frame(11).unwrap().is_none());
        }
        let segments = || {
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seg-"))
                .count()
        };
        let before = segments();
        let outbox = Outbox::open(dir.path(), config).unwrap();
        assert_eq!((outbox.acked(), outbox.next_seq()), (12, 20));
        for seq in 12..20 {
            assert_eq!(decoded_seq(&outbox.frame(seq).unwrap().unwrap()), seq);
        }
        assert_eq!(outbox.push(tiny(0)).unwrap(), 20);
        outbox.ack(21).unwrap();
        assert!(segments() < before, "acknowledged segments are removed");
        assert_eq!(outbox.unacked_bytes(), 0);
    }

    #[test]
    fn a_torn_last_record_is_cut_and_numbering_continues_after_the_last_intact_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = OutboxConfig {
            max_bytes: 1 << 20,
            segment_bytes: 1 << 20,
            sync: false,
        };
        {
            let outbox = Outbox::open(dir.path(), config.clone()).unwrap();
            for _ in 0..5 {
                outbox.push(tiny(0)).unwrap();
            }
        }
        let seg = dir.path().join(format!("seg-{:020}.log", 0));
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let outbox = Outbox::open(dir.path(), config).unwrap();
        assert_eq!(outbox.next_seq(), 4);
        assert_eq!(outbox.push(tiny(0)).unwrap(), 4);
        assert_eq!(decoded_seq(&outbox.frame(4).unwrap().unwrap()), 4);
    }

    #[test]
    fn a_full_outbox_blocks_the_producer_until_acks_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let frame_bytes = encode_message(&DeviceMessage::Sample(tiny(0))).len() as u64 + HEADER as u64;
        let config = OutboxConfig {
            max_bytes: frame_bytes * 3,
            segment_bytes: 1 << 20,
            sync: false,
        };
        let outbox = Arc::new(Outbox::open(dir.path(), config).unwrap());
        let producer = {
            let outbox = outbox.clone();
            std::thread::spawn(move || (0..6).map(|_| outbox.push(tiny(0)).unwrap()).collect::<Vec<_>>())
        };
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(outbox.next_seq(), 3, "three fit, the fourth waits");
        outbox.ack(2).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(outbox.next_seq(), 5);
        outbox.ack(5).unwrap();
        assert_eq!(producer.join().unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(outbox.stats().blocked_pushes, 2);
    }

    #[test]
    fn an_invalid_sample_is_refused_at_push_and_takes_no_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxConfig::default()).unwrap();
        let mut bad = (0..).map(tiny).find(|s| !s.instances.is_empty()).unwrap();
        bad.instances[0].mask.counts.push(5);
        let err = outbox.push(bad).unwrap_err().to_string();
        assert!(err.contains("instance 0") && err.contains("sum"), "{err}");
        assert_eq!(outbox.push(tiny(0)).unwrap(), 0);
    }

    #[test]
    fn an_ack_beyond_what_was_pushed_and_a_corrupt_ack_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxConfig::default()).unwrap();
        outbox.push(tiny(0)).unwrap();
        assert!(outbox.ack(2).unwrap_err().to_string().contains("only 1 samples exist"));
        drop(outbox);
        fs::write(dir.path().join("acked"), b"garbage").unwrap();
        let err = Outbox::open(dir.path(), OutboxConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("acked") && err.contains("corrupt"), "{err}");
    }
}

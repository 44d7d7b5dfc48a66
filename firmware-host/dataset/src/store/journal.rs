//! The journal: `journal-NNNNNN.log` holds the samples of shard NNNNNN while it fills, as
//! records `[len u32][crc32 u32][postcard Sample]`. A record is fsynced before the host
//! acknowledges it; a torn tail (a crash mid-write) fails its length or CRC check and is where
//! a scan stops.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use divergen_protocol::{Sample, crc32};

use super::err;

pub(super) fn journal_path(out: &Path, shard: u64) -> PathBuf {
    out.join(format!("journal-{shard:06}.log"))
}

/// `journal-N.log` files by shard number.
pub fn list_journals(out: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut journals = Vec::new();
    for entry in fs::read_dir(out).map_err(|e| err(out, e))? {
        let path = entry.map_err(|e| err(out, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(n) = name.strip_prefix("journal-").and_then(|n| n.strip_suffix(".log"))
            && let Ok(n) = n.parse::<u64>()
        {
            journals.push((n, path));
        }
    }
    journals.sort();
    Ok(journals)
}

pub(super) fn journal_record(sample: &Sample) -> Vec<u8> {
    let body = postcard::to_allocvec(sample).expect("serialising to a Vec cannot fail");
    let mut record = Vec::with_capacity(body.len() + 8);
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32(&body).to_le_bytes());
    record.extend_from_slice(&body);
    record
}

/// Streams every intact record to `each`; returns the intact and total byte lengths (a torn
/// tail is where they differ).
pub(super) fn scan_journal(
    journal: &File,
    path: &Path,
    mut each: impl FnMut(Sample) -> io::Result<()>,
) -> io::Result<(u64, u64)> {
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
        if crc32(&body) != crc {
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

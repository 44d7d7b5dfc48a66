//! Durable file writes and PNG encoding, written once for the device's outputs and the host's
//! shards.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

fn err(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{}: {what}", path.display()))
}

/// Fast PNG settings: a device spends its CPU on the models and the host on its disks, not on
/// compression ratio.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::Adaptive)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .expect("encoding a well-sized RGB8 buffer into memory cannot fail");
    png
}

/// Writes and fsyncs one file (no rename: the caller renames the folder it sits in).
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path).map_err(|e| err(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| err(path, e))
}

/// temp-then-rename, with the data and the folder entry fsynced: a reader sees the old file or
/// the new one, never half of one, even across a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes a folder's entries (a rename, a new file) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("divergen-dataset-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.json");
        write_atomically(&path, b"old").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(!dir.join("a.tmp").exists());
        let missing = write_atomically(&dir.join("no-such-folder").join("b.json"), b"x").unwrap_err();
        assert!(missing.to_string().contains("no-such-folder"), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn png_round_trips_the_pixels() {
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        let png = encode_png(4, 3, &rgb);
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (4, 3));
        assert_eq!(back.into_raw(), rgb);
    }
}

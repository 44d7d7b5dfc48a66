//! Writing result images so that a failure never leaves a partial file behind.

use std::path::Path;

/// Writes a PNG beside the target and renames it into place.
pub fn write_atomically(image: &image::DynamicImage, path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .suffix(".png")
        .tempfile_in(dir)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    image
        .write_to(&mut std::io::BufWriter::new(tmp.as_file()), image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tmp.persist(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

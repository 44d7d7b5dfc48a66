//! Writing result images so that a failure never leaves a partial file behind.

use std::path::Path;

use divergen_runtime::Result;

/// Writes a PNG beside the target and renames it into place.
pub fn write_atomically(image: &image::DynamicImage, path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut builder = tempfile::Builder::new();
    builder.suffix(".png");
    // tempfile creates 0600 files; a result image is for everyone, as any created file is
    // (0666 less the umask).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let tmp = builder
        .tempfile_in(dir)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    image
        .write_to(&mut std::io::BufWriter::new(tmp.as_file()), image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tmp.persist(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn written_images_are_readable_by_everyone_the_umask_allows() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        write_atomically(&image::DynamicImage::new_rgb8(2, 2), &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // Test runners use umask 022 (or 002): the file must come out 0644 (0664), never 0600.
        assert_eq!(mode & 0o044, 0o044, "mode {mode:o}");
    }
}

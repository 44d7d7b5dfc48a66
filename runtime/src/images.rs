//! Reading input images strictly: a truncated or corrupt file is an error naming it, never a
//! picture with grey where the data ran out.
//!
//! PNG decoding in the `image` crate already fails on a truncated stream. Its JPEG decoder
//! (zune-jpeg) runs with strict mode off, filling whatever is missing with grey and logging the
//! error, so JPEGs are decoded here through zune-jpeg itself with strict mode on.

use std::path::Path;

use image::{DynamicImage, ImageFormat, RgbImage};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use crate::{Error, Result};

/// Decodes the image file at `path`; errors name the file.
pub fn open(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    decode(&bytes).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// Decodes an image from memory, JPEGs strictly (see the module's documentation).
pub fn decode(bytes: &[u8]) -> Result<DynamicImage> {
    let format = image::guess_format(bytes).map_err(|e| e.to_string())?;
    if format != ImageFormat::Jpeg {
        return image::load_from_memory_with_format(bytes, format).map_err(|e| e.to_string().into());
    }
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let pixels = decoder
        .decode()
        .map_err(|e| format!("corrupt or truncated JPEG: {e:?}"))?;
    let (w, h) = decoder
        .dimensions()
        .ok_or_else(|| "JPEG without dimensions".to_string())?;
    let (w, h) = (
        u32::try_from(w).map_err(|e| e.to_string())?,
        u32::try_from(h).map_err(|e| e.to_string())?,
    );
    RgbImage::from_raw(w, h, pixels)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| format!("JPEG decoded to the wrong number of bytes for {w}x{h}").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(image: DynamicImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Jpeg)
            .unwrap();
        bytes
    }

    /// Big and busy enough that half the file is well inside the entropy-coded scan.
    fn gradient() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(320, 240, |x, y| {
            image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x ^ y) % 256) as u8])
        }))
    }

    #[test]
    fn whole_jpegs_decode_like_the_image_crate() {
        let bytes = jpeg(gradient());
        let ours = decode(&bytes).unwrap().into_rgb8();
        let theirs = image::load_from_memory(&bytes).unwrap().into_rgb8();
        assert_eq!(ours.dimensions(), (320, 240));
        // Same IDCT and upsampling (both are zune-jpeg), so the pixels agree.
        assert_eq!(ours, theirs);
        let gray = jpeg(DynamicImage::ImageLuma8(gradient().into_luma8()));
        assert_eq!(decode(&gray).unwrap().into_rgb8().dimensions(), (320, 240));
    }

    #[test]
    fn truncated_jpegs_and_pngs_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = jpeg(gradient());
        // The lenient decoder accepts the half file and fills the rest with grey.
        assert!(image::load_from_memory(&bytes[..bytes.len() / 2]).is_ok());
        let half = dir.path().join("half.jpg");
        std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
        let err = open(&half).unwrap_err().to_string();
        assert!(err.contains("half.jpg") && err.contains("JPEG"), "{err}");
        let mut png = Vec::new();
        gradient()
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let cut = dir.path().join("cut.png");
        std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
        assert!(open(&cut).unwrap_err().to_string().contains("cut.png"));
        let junk = dir.path().join("junk.jpg");
        std::fs::write(&junk, b"not an image at all").unwrap();
        assert!(open(&junk).unwrap_err().to_string().contains("junk.jpg"));
    }
}

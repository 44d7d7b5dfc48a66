//! Decoding latents in overlapping tiles, for images whose whole decode would hold a tensor larger
//! than the device can bind (burn keeps each tensor in one buffer, bound whole; lavapipe and
//! WebGPU's defaults bind 128 MiB, which SD's VAE passes at 512²).
//!
//! The split is diffusers' `AutoencoderKL.tiled_decode`, step for step: latent tiles of `T`
//! starting every `⌊0.75·T⌋` cells, each decoded alone; each decoded tile blended linearly into
//! the (already blended) tile above and the one to its left over `⌊0.25·S⌋` pixels (`S` the
//! decoded tile side), then cropped to `S − ⌊0.25·S⌋` and stitched. As in diffusers, each tile's
//! group norms see only that tile, so a tiled image differs slightly from a whole one; it is
//! only used where the whole one cannot run. Tiles come back to the host one row at a time, so
//! the stitched image is never one device tensor either.

use burn::tensor::Tensor;

use crate::error::ModelError;

/// diffusers' `tile_overlap_factor`.
const OVERLAP: f64 = 0.25;

/// How a latent is cut: square tiles of `latent_tile` cells, decoded `factor`× larger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub latent_tile: usize,
    pub factor: usize,
}

impl Tiling {
    /// Latent cells between the starts of two neighbouring tiles (`overlap_size` in diffusers).
    fn step(&self) -> usize {
        (self.latent_tile as f64 * (1.0 - OVERLAP)) as usize
    }

    fn sample_tile(&self) -> usize {
        self.latent_tile * self.factor
    }

    /// Pixels blended across each seam.
    fn blend_extent(&self) -> usize {
        (self.sample_tile() as f64 * OVERLAP) as usize
    }

    /// Pixels each tile contributes along each side.
    fn row_limit(&self) -> usize {
        self.sample_tile() - self.blend_extent()
    }

    /// The largest tile side, a multiple of 8 cells (so the tiles cover the image exactly), whose
    /// decode `fits`; `None` when even 8 cells do not.
    pub fn largest_fitting(factor: usize, max_side: usize, fits: impl Fn(usize) -> bool) -> Option<Tiling> {
        (1..=max_side.div_ceil(8))
            .rev()
            .map(|k| 8 * k)
            .find(|&side| fits(side))
            .map(|latent_tile| Tiling { latent_tile, factor })
    }
}

/// Decoded pixels on the host, `[B, C, H, W]` row-major, in the decoder's range.
#[derive(Clone, Debug, PartialEq)]
pub struct HostImage {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl HostImage {
    fn at(&self, plane: usize, y: usize, x: usize) -> usize {
        (plane * self.shape[2] + y) * self.shape[3] + x
    }

    fn planes(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    pub fn from_tensor(image: Tensor<4>) -> Result<Self, ModelError> {
        let shape = image.dims();
        let data = image
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError(format!("reading the decoded image back: {e:?}")))?;
        Ok(HostImage { shape, data })
    }

    /// `b`'s first rows blended from `a`'s last (`blend_v`): `a` is the tile above.
    fn blend_from_above(&mut self, above: &HostImage, extent: usize) {
        let e = extent.min(above.shape[2]).min(self.shape[2]);
        for p in 0..self.planes() {
            for y in 0..e {
                let w = (y as f64 / e as f64) as f32;
                let keep = (1.0 - y as f64 / e as f64) as f32;
                for x in 0..self.shape[3] {
                    let i = self.at(p, y, x);
                    self.data[i] = above.data[above.at(p, above.shape[2] - e + y, x)] * keep + self.data[i] * w;
                }
            }
        }
    }

    /// `b`'s first columns blended from `a`'s last (`blend_h`): `a` is the tile to the left.
    fn blend_from_left(&mut self, left: &HostImage, extent: usize) {
        let e = extent.min(left.shape[3]).min(self.shape[3]);
        for p in 0..self.planes() {
            for y in 0..self.shape[2] {
                for x in 0..e {
                    let w = (x as f64 / e as f64) as f32;
                    let keep = (1.0 - x as f64 / e as f64) as f32;
                    let i = self.at(p, y, x);
                    self.data[i] = left.data[left.at(p, y, left.shape[3] - e + x)] * keep + self.data[i] * w;
                }
            }
        }
    }
}

/// Decodes `latents [B, C, h, w]` tile by tile with `decode` (latents → pixels, the whole
/// decoder including its input scaling) and stitches the result as diffusers does.
pub fn decode_tiled(
    latents: Tensor<4>,
    tiling: Tiling,
    decode: impl Fn(Tensor<4>) -> Tensor<4>,
) -> Result<HostImage, ModelError> {
    let [b, c, lh, lw] = latents.dims();
    let (t, step) = (tiling.latent_tile, tiling.step());
    if step == 0 || !t.is_multiple_of(4) {
        return Err(ModelError(format!(
            "a latent tile of {t} cells does not tile (a positive multiple of 4 is needed)"
        )));
    }
    let (extent, limit) = (tiling.blend_extent(), tiling.row_limit());
    let mut above: Vec<HostImage> = Vec::new();
    let mut strips: Vec<HostImage> = Vec::new();
    for i in (0..lh).step_by(step) {
        let mut row: Vec<HostImage> = Vec::new();
        for j in (0..lw).step_by(step) {
            let tile = latents
                .clone()
                .slice([0..b, 0..c, i..(i + t).min(lh), j..(j + t).min(lw)]);
            let mut decoded = HostImage::from_tensor(decode(tile))?;
            if let Some(up) = above.get(row.len()) {
                decoded.blend_from_above(up, extent);
            }
            if let Some(left) = row.last() {
                decoded.blend_from_left(left, extent);
            }
            row.push(decoded);
        }
        strips.push(crop_and_join(&row, limit));
        above = row;
    }
    let shape = [
        b,
        strips[0].shape[1],
        strips.iter().map(|s| s.shape[2]).sum(),
        strips[0].shape[3],
    ];
    let mut data = vec![0f32; shape.iter().product()];
    let mut y0 = 0;
    for strip in &strips {
        let rows = strip.shape[2];
        for p in 0..strip.planes() {
            let from = &strip.data[p * rows * shape[3]..(p + 1) * rows * shape[3]];
            let at = (p * shape[2] + y0) * shape[3];
            data[at..at + from.len()].copy_from_slice(from);
        }
        y0 += rows;
    }
    Ok(HostImage { shape, data })
}

/// One row of blended tiles, each cropped to `limit × limit` from its top left, side by side.
fn crop_and_join(row: &[HostImage], limit: usize) -> HostImage {
    let [b, c, th, _] = row[0].shape;
    let h = th.min(limit);
    let widths: Vec<usize> = row.iter().map(|t| t.shape[3].min(limit)).collect();
    let w: usize = widths.iter().sum();
    let mut data = Vec::with_capacity(b * c * h * w);
    for p in 0..b * c {
        for y in 0..h {
            for (tile, &tw) in row.iter().zip(&widths) {
                let start = tile.at(p, y, 0);
                data.extend_from_slice(&tile.data[start..start + tw]);
            }
        }
    }
    HostImage {
        shape: [b, c, h, w],
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_exactly() {
        // diffusers' SD numbers: 64-cell tiles every 48, 512-pixel tiles blended over 128, 384 kept.
        let t = Tiling {
            latent_tile: 64,
            factor: 8,
        };
        assert_eq!((t.step(), t.blend_extent(), t.row_limit()), (48, 128, 384));
        assert_eq!(t.step() * t.factor, t.row_limit());
        let fits = Tiling::largest_fitting(8, 128, |side| side * side <= 40 * 40);
        assert_eq!(fits.map(|t| t.latent_tile), Some(40));
        assert_eq!(Tiling::largest_fitting(8, 128, |_| false), None);
    }
}

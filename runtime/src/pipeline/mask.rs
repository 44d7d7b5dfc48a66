//! The one mask and the one box of every stage: a binary mask the size of its image, and the
//! pixel box `[x0, x1) × [y0, y1)` of its set pixels. COCO's `[x, y, w, h]` and its RLE appear
//! only where a file or the wire is written.

use divergen_protocol::Rle;

/// A binary mask over a `width × height` image, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    width: u32,
    height: u32,
    bits: Vec<bool>,
}

impl Mask {
    pub fn empty(width: u32, height: u32) -> Self {
        Mask {
            width,
            height,
            bits: vec![false; width as usize * height as usize],
        }
    }

    /// `bits` row-major; their count must be `width × height`.
    pub fn from_bits(width: u32, height: u32, bits: Vec<bool>) -> Self {
        assert_eq!(
            bits.len(),
            width as usize * height as usize,
            "a {width}×{height} mask from {} bits",
            bits.len()
        );
        Mask { width, height, bits }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Row-major.
    pub fn bits(&self) -> &[bool] {
        &self.bits
    }

    pub fn get(&self, x: u32, y: u32) -> bool {
        self.bits[y as usize * self.width as usize + x as usize]
    }

    pub fn set(&mut self, x: u32, y: u32) {
        self.bits[y as usize * self.width as usize + x as usize] = true;
    }

    /// Set pixels.
    pub fn area(&self) -> usize {
        self.bits.iter().filter(|&&b| b).count()
    }

    /// The pixels set in both.
    pub fn and(&self, other: &Mask) -> Mask {
        debug_assert_eq!((self.width, self.height), (other.width, other.height));
        let bits = self.bits.iter().zip(&other.bits).map(|(&a, &b)| a && b).collect();
        Mask::from_bits(self.width, self.height, bits)
    }

    /// Clears every pixel `other` sets; returns the pixels left.
    pub fn subtract(&mut self, other: &Mask) -> usize {
        debug_assert_eq!((self.width, self.height), (other.width, other.height));
        let mut left = 0;
        for (m, &o) in self.bits.iter_mut().zip(&other.bits) {
            *m &= !o;
            left += *m as usize;
        }
        left
    }

    /// The box of the set pixels, `None` when none is set.
    pub fn bounds(&self) -> Option<PixelBox> {
        let w = self.width as usize;
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (y, row) in self.bits.chunks_exact(w.max(1)).enumerate() {
            for (x, _) in row.iter().enumerate().filter(|(_, b)| **b) {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
        (x0 != usize::MAX).then(|| PixelBox {
            x0: x0 as u32,
            y0: y0 as u32,
            x1: x1 as u32 + 1,
            y1: y1 as u32 + 1,
        })
    }

    /// COCO's column-major RLE.
    pub fn to_rle(&self) -> Rle {
        let bytes: Vec<u8> = self.bits.iter().map(|&b| b as u8).collect();
        Rle::from_row_major(self.height, self.width, &bytes)
    }
}

/// Pixels `x0 ≤ x < x1`, `y0 ≤ y < y1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl PixelBox {
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }

    /// COCO's `[x, y, w, h]`.
    pub fn xywh(&self) -> [u32; 4] {
        [self.x0, self.y0, self.width(), self.height()]
    }

    /// How far the side that moved most moved from `other`, in pixels.
    pub fn largest_side_shift(&self, other: &PixelBox) -> u32 {
        [
            self.x0.abs_diff(other.x0),
            self.y0.abs_diff(other.y0),
            self.x1.abs_diff(other.x1),
            self.y1.abs_diff(other.y1),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_subtraction_and_rle_agree_with_the_pixels() {
        let mut m = Mask::empty(5, 4);
        assert_eq!(m.bounds(), None);
        m.set(1, 1);
        m.set(3, 2);
        let b = m.bounds().unwrap();
        assert_eq!(b.xywh(), [1, 1, 3, 2]);
        assert_eq!(m.area(), 2);
        let mut other = Mask::empty(5, 4);
        other.set(3, 2);
        assert_eq!(m.and(&other).area(), 1);
        assert_eq!(m.subtract(&other), 1);
        let now = m.bounds().unwrap();
        assert_eq!(now.xywh(), [1, 1, 1, 1]);
        assert_eq!(b.largest_side_shift(&now), 2);
        // Column-major runs from the top-left: 5 zeros (column 0 and the top of column 1), one 1,
        // then the other 13 zeros.
        assert_eq!(m.to_rle().counts, vec![5, 1, 14]);
    }
}

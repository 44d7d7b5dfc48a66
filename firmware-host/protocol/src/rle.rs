//! COCO run-length encoding of binary masks: column-major (Fortran order), counts alternate
//! background/foreground runs starting with background, `size` is `[height, width]`.

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rle {
    pub height: u32,
    pub width: u32,
    pub counts: Vec<u32>,
}

impl Rle {
    /// Encodes a row-major mask (`mask[y * width + x] != 0` is foreground).
    pub fn from_row_major(height: u32, width: u32, mask: &[u8]) -> Self {
        let (h, w) = (height as usize, width as usize);
        assert_eq!(mask.len(), h * w, "mask length must be height * width");
        let mut counts = Vec::new();
        let mut current = false;
        let mut run = 0u32;
        for x in 0..w {
            for y in 0..h {
                let on = mask[y * w + x] != 0;
                if on != current {
                    counts.push(run);
                    run = 0;
                    current = on;
                }
                run += 1;
            }
        }
        counts.push(run);
        Rle { height, width, counts }
    }

    /// Decodes into a row-major 0/1 mask.
    pub fn to_row_major(&self) -> Vec<u8> {
        let (h, w) = (self.height as usize, self.width as usize);
        let mut mask = alloc::vec![0u8; h * w];
        let mut index = 0usize;
        for (i, &run) in self.counts.iter().enumerate() {
            if i % 2 == 1 {
                for k in index..(index + run as usize).min(h * w) {
                    mask[(k % h) * w + k / h] = 1;
                }
            }
            index += run as usize;
        }
        mask
    }

    pub fn pixels(&self) -> u64 {
        self.height as u64 * self.width as u64
    }

    /// Foreground pixel count (COCO `area` of a mask annotation).
    pub fn area(&self) -> u64 {
        self.counts.iter().skip(1).step_by(2).map(|&c| c as u64).sum()
    }

    /// `[x, y, w, h]` of the foreground's extent, as pycocotools' `toBbox` computes it.
    pub fn bbox(&self) -> [f32; 4] {
        let h = self.height as u64;
        let (mut x0, mut y0, mut x1, mut y1) = (u64::MAX, u64::MAX, 0u64, 0u64);
        let mut index = 0u64;
        for (i, &run) in self.counts.iter().enumerate() {
            let run = run as u64;
            if i % 2 == 1 && run > 0 {
                let (first, last) = (index, index + run - 1);
                let (fx, lx) = (first / h, last / h);
                x0 = x0.min(fx);
                x1 = x1.max(lx);
                if fx == lx {
                    y0 = y0.min(first % h);
                    y1 = y1.max(last % h);
                } else {
                    // The run wraps over a column boundary, so it covers the full height somewhere.
                    y0 = 0;
                    y1 = h - 1;
                }
            }
            index += run;
        }
        if x0 == u64::MAX {
            return [0.0; 4];
        }
        [x0 as f32, y0 as f32, (x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32]
    }

    /// Counts must cover exactly `height * width` pixels; zero-length runs are only allowed first.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.counts.is_empty() {
            return Err("mask RLE has no counts");
        }
        if self.counts.iter().skip(1).any(|&c| c == 0) {
            return Err("mask RLE has a zero-length run after the first");
        }
        let total: u64 = self.counts.iter().map(|&c| c as u64).sum();
        if total != self.pixels() {
            return Err("mask RLE counts do not sum to height * width");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn column_major_round_trip_matches_hand_computed_runs() {
        // 2x3 mask, row-major:
        // 0 1 1
        // 0 0 1
        // column-major walk: (0,0)=0 (1,0)=0 | (0,1)=1 | (1,1)=0 | (0,2)=1 (1,2)=1
        let mask = vec![0, 1, 1, 0, 0, 1];
        let rle = Rle::from_row_major(2, 3, &mask);
        assert_eq!(rle.counts, vec![2, 1, 1, 2]);
        assert_eq!(rle.to_row_major(), mask);
        assert_eq!(rle.area(), 3);
        assert_eq!(rle.bbox(), [1.0, 0.0, 2.0, 2.0]);
        rle.check().unwrap();
    }

    #[test]
    fn mask_starting_with_foreground_gets_a_zero_first_run() {
        let rle = Rle::from_row_major(1, 2, &[1, 0]);
        assert_eq!(rle.counts, vec![0, 1, 1]);
        rle.check().unwrap();
        assert_eq!(Rle::from_row_major(2, 2, &[0; 4]).bbox(), [0.0; 4]);
    }

    #[test]
    fn random_masks_round_trip_and_boxes_agree_with_a_scan() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let (h, w) = (rng.random_range(1..20u32), rng.random_range(1..20u32));
            let density = rng.random_range(0.0..1.0f32);
            let mask: Vec<u8> = (0..h * w).map(|_| (rng.random::<f32>() < density) as u8).collect();
            let rle = Rle::from_row_major(h, w, &mask);
            rle.check().unwrap();
            assert_eq!(rle.to_row_major(), mask);
            let on: Vec<(u32, u32)> = (0..h * w)
                .filter(|&i| mask[i as usize] != 0)
                .map(|i| (i % w, i / w))
                .collect();
            let expected = if on.is_empty() {
                [0.0; 4]
            } else {
                let x0 = on.iter().map(|p| p.0).min().unwrap();
                let x1 = on.iter().map(|p| p.0).max().unwrap();
                let y0 = on.iter().map(|p| p.1).min().unwrap();
                let y1 = on.iter().map(|p| p.1).max().unwrap();
                [x0 as f32, y0 as f32, (x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32]
            };
            assert_eq!(rle.bbox(), expected);
            assert_eq!(rle.area(), on.len() as u64);
        }
    }

    #[test]
    fn malformed_counts_are_rejected() {
        let bad_sum = Rle {
            height: 2,
            width: 2,
            counts: vec![1, 2],
        };
        assert!(bad_sum.check().is_err());
        let zero_run = Rle {
            height: 2,
            width: 2,
            counts: vec![1, 0, 3],
        };
        assert!(zero_run.check().is_err());
    }
}

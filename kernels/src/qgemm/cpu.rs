//! The CPU engine's int8/int4 GEMM, weight-only: output channels in tiles of 64; each rayon task
//! widens its tile of packed weights to f32 in a buffer of its own (`64·K` floats, in cache)
//! and multiplies with the `gemm` crate into its own output columns. Weights stay packed in
//! memory; no dequantised copy of the matrix is ever kept.

use rayon::prelude::*;

use crate::gemm::cpu::{SharedOut, gemm_into};
use crate::quant::{INT4_BLOCK, Int4Weights, Int8Weights};

const TILE: usize = 64;

/// `x [m, k] · Wᵀ` with `widen(row, dst)` writing row `row` of W as f32.
fn tiled(x: &[f32], m: usize, n: usize, k: usize, widen: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    if out.is_empty() {
        return out;
    }
    let dst = SharedOut(out.as_mut_ptr());
    (0..n.div_ceil(TILE)).into_par_iter().for_each(|t| {
        let (n0, rows) = (t * TILE, TILE.min(n - t * TILE));
        let mut w = vec![0f32; rows * k];
        for (r, row) in w.chunks_mut(k).enumerate() {
            widen(n0 + r, row);
        }
        // SAFETY: this tile writes columns n0..n0+rows of every output row only.
        unsafe { gemm_into(dst.ptr().add(n0), n, x, &w, (m, rows, k), true, false, false) };
    });
    out
}

/// `x [m, k] · Wᵀ` for int8 weights: `words` and `scales` laid out as [`Int8Weights`].
pub fn int8(x: &[f32], m: usize, (n, k): (usize, usize), words: &[u32], scales: &[f32]) -> Vec<f32> {
    let per_row = Int8Weights::words_per_row(k);
    tiled(x, m, n, k, |row, dst| {
        let scale = scales[row];
        for (c, word) in words[row * per_row..][..per_row].iter().enumerate() {
            for (b, value) in word.to_le_bytes().into_iter().enumerate() {
                if let Some(d) = dst.get_mut(4 * c + b) {
                    *d = value as i8 as f32 * scale;
                }
            }
        }
    })
}

/// `x [m, k] · Wᵀ` for int4 weights: `words` and the packed f16 `scales` as [`Int4Weights`].
pub fn int4(x: &[f32], m: usize, (n, k): (usize, usize), words: &[u32], scales: &[u32]) -> Vec<f32> {
    let blocks = Int4Weights::blocks_per_row(k);
    tiled(x, m, n, k, |row, dst| {
        for (b, chunk) in dst.chunks_mut(INT4_BLOCK).enumerate() {
            let s = row * blocks + b;
            let scale = half::f16::from_bits((scales[s / 2] >> (16 * (s % 2))) as u16).to_f32();
            let words = &words[s * 4..][..4];
            for (i, d) in chunk.iter_mut().enumerate() {
                let nibble = ((words[i / 8] >> (4 * (i % 8))) & 0xF) as i8;
                *d = ((nibble << 4) >> 4) as f32 * scale;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};

    #[test]
    fn int8_and_int4_match_the_reference() {
        for (m, n, k) in [(1, 1, 1), (1, 130, 77), (9, 200, 96), (33, 64, 300)] {
            let w = random_vec(n * k, 1, 0.2);
            let x = random_vec(m * k, 2, 1.0);
            let (q8, q4) = (Int8Weights::quantize(&w, n, k), Int4Weights::quantize(&w, n, k));
            assert_close(
                &int8(&x, m, (n, k), &q8.words, &q8.scales),
                &super::super::reference_int8(&x, m, &q8),
                1e-5,
                "cpu int8",
            );
            assert_close(
                &int4(&x, m, (n, k), &q4.words, &q4.scales),
                &super::super::reference_int4(&x, m, &q4),
                1e-5,
                "cpu int4",
            );
        }
    }
}

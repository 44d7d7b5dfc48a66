//! Weight-only quantized formats read by the `qgemm` kernel.
//!
//! Both formats quantize a weight matrix `W` of shape `[n, k]` (`n` output channels, `k` inputs:
//! the `nn.Linear` layout, and a conv weight flattened to `[out, in·kh·kw]`) row by row, so a
//! matrix product `x · Wᵀ` reads one packed row per output.
//!
//! ## Int8: one symmetric scale per output channel
//! * `words`: `n × ceil(k/4)` little-endian `u32`s. Element `(row, c)` is byte `c % 4` (bits
//!   `8·(c%4) .. 8·(c%4)+8`) of word `row·ceil(k/4) + c/4`, a two's-complement `i8` in
//!   `[-127, 127]`. Padding bytes past `k` are zero.
//! * `scales`: `n` `f32`s; `W[row, c] ≈ q · scales[row]` with `scales[row] = max|W[row, :]| / 127`.
//! * Bound: `|W − deq(W)| ≤ scales[row] / 2` element-wise.
//!
//! ## Int4: blocks of 32 along `k`, one f16 scale a block
//! * `words`: `n × ceil(k/32) × 4` `u32`s: each block is 16 bytes, two values a byte. Element `i`
//!   (0..32) of block `b` in row `row` is nibble `i % 8` (bits `4·(i%8) .. 4·(i%8)+4`) of word
//!   `(row·ceil(k/32) + b)·4 + i/8`: so byte `j` holds element `2j` in its low nibble and `2j+1` in
//!   its high nibble. Nibbles are two's-complement `i4` in `[-7, 7]`; padding past `k` is zero.
//! * `scales`: `n × ceil(k/32)` IEEE f16 scales, two a word: scale `s = row·ceil(k/32) + b` is
//!   the low half (bits 0..16) of word `s/2` when `s` is even and the high half when odd.
//!   `scale = max|block| / 7`, rounded *up* to the next f16 so no value clips.
//! * Bound: `|W − deq(W)| ≤ scale_f16 / 2` element-wise.

use half::f16;

/// Int8 weights, symmetric, one scale per output channel (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Weights {
    pub n: usize,
    pub k: usize,
    pub words: Vec<u32>,
    pub scales: Vec<f32>,
}

/// Int4 weights, symmetric, one f16 scale per 32 inputs (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Weights {
    pub n: usize,
    pub k: usize,
    pub words: Vec<u32>,
    /// f16 scales packed two per word.
    pub scales: Vec<u32>,
}

pub const INT4_BLOCK: usize = 32;

fn check_shape(w: &[f32], n: usize, k: usize) {
    assert_eq!(w.len(), n * k, "weight has {} values, expected n·k = {n}·{k}", w.len());
}

impl Int8Weights {
    pub fn words_per_row(k: usize) -> usize {
        k.div_ceil(4)
    }

    /// Quantizes a row-major `[n, k]` f32 matrix.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        check_shape(w, n, k);
        let wpr = Self::words_per_row(k);
        let mut words = vec![0u32; n * wpr];
        let mut scales = vec![0f32; n];
        for row in 0..n {
            let src = &w[row * k..(row + 1) * k];
            let max = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            scales[row] = scale;
            for (c, &v) in src.iter().enumerate() {
                let q = (v / scale).round().clamp(-127.0, 127.0) as i8;
                words[row * wpr + c / 4] |= (q as u8 as u32) << (8 * (c % 4));
            }
        }
        Self { n, k, words, scales }
    }

    /// Quantizes f16 weights (checkpoints often store them so).
    pub fn quantize_f16(w: &[f16], n: usize, k: usize) -> Self {
        Self::quantize(&w.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), n, k)
    }

    pub fn value(&self, row: usize, c: usize) -> i8 {
        let word = self.words[row * Self::words_per_row(self.k) + c / 4];
        (word >> (8 * (c % 4))) as u8 as i8
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for row in 0..self.n {
            for c in 0..self.k {
                out.push(self.value(row, c) as f32 * self.scales[row]);
            }
        }
        out
    }

    /// Largest error quantization may introduce in `row`.
    pub fn error_bound(&self, row: usize) -> f32 {
        self.scales[row] / 2.0
    }

    pub fn bytes(&self) -> usize {
        self.words.len() * 4 + self.scales.len() * 4
    }
}

impl Int4Weights {
    pub fn blocks_per_row(k: usize) -> usize {
        k.div_ceil(INT4_BLOCK)
    }

    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        check_shape(w, n, k);
        let bpr = Self::blocks_per_row(k);
        let mut words = vec![0u32; n * bpr * 4];
        let mut scales = vec![0u32; (n * bpr).div_ceil(2)];
        for row in 0..n {
            for b in 0..bpr {
                let start = row * k + b * INT4_BLOCK;
                let end = row * k + ((b + 1) * INT4_BLOCK).min(k);
                let block = &w[start..end];
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = round_up_f16(if max > 0.0 { max / 7.0 } else { 1.0 });
                let s = row * bpr + b;
                scales[s / 2] |= (scale.to_bits() as u32) << (16 * (s % 2));
                let scale = scale.to_f32();
                for (i, &v) in block.iter().enumerate() {
                    let q = (v / scale).round().clamp(-7.0, 7.0) as i32;
                    words[(row * bpr + b) * 4 + i / 8] |= ((q & 0xF) as u32) << (4 * (i % 8));
                }
            }
        }
        Self { n, k, words, scales }
    }

    pub fn quantize_f16(w: &[f16], n: usize, k: usize) -> Self {
        Self::quantize(&w.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), n, k)
    }

    pub fn scale(&self, row: usize, block: usize) -> f32 {
        let s = row * Self::blocks_per_row(self.k) + block;
        f16::from_bits((self.scales[s / 2] >> (16 * (s % 2))) as u16).to_f32()
    }

    pub fn value(&self, row: usize, c: usize) -> i8 {
        let (b, i) = (c / INT4_BLOCK, c % INT4_BLOCK);
        let word = self.words[(row * Self::blocks_per_row(self.k) + b) * 4 + i / 8];
        let nibble = ((word >> (4 * (i % 8))) & 0xF) as i8;
        (nibble << 4) >> 4
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for row in 0..self.n {
            for c in 0..self.k {
                out.push(self.value(row, c) as f32 * self.scale(row, c / INT4_BLOCK));
            }
        }
        out
    }

    pub fn error_bound(&self, row: usize, c: usize) -> f32 {
        self.scale(row, c / INT4_BLOCK) / 2.0
    }

    pub fn bytes(&self) -> usize {
        self.words.len() * 4 + self.scales.len() * 4
    }
}

/// The smallest f16 not below `x` (x > 0), so `max / scale ≤ 7` holds after rounding.
fn round_up_f16(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_vec;

    #[test]
    fn int8_round_trip_stays_within_its_bound() {
        let (n, k) = (37, 71);
        let w = random_vec(n * k, 1, 3.0);
        let q = Int8Weights::quantize(&w, n, k);
        let d = q.dequantize();
        for row in 0..n {
            for c in 0..k {
                let err = (w[row * k + c] - d[row * k + c]).abs();
                assert!(err <= q.error_bound(row) * (1.0 + 1e-6), "row {row} col {c}: {err}");
            }
        }
        // The largest magnitude of each row maps to ±127 exactly.
        for row in 0..n {
            let (c, _) = w[row * k..(row + 1) * k]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .expect("non-empty row");
            assert_eq!(q.value(row, c).unsigned_abs(), 127);
        }
    }

    #[test]
    fn int4_round_trip_stays_within_its_bound() {
        let (n, k) = (19, 100); // 100 = 3 full blocks + a partial one
        let w = random_vec(n * k, 2, 0.5);
        let q = Int4Weights::quantize(&w, n, k);
        let d = q.dequantize();
        for row in 0..n {
            for c in 0..k {
                let err = (w[row * k + c] - d[row * k + c]).abs();
                assert!(err <= q.error_bound(row, c) * (1.0 + 1e-6), "row {row} col {c}: {err}");
                assert!((-7..=7).contains(&q.value(row, c)));
            }
        }
        assert_eq!(q.words.len(), n * 4 * 4);
        assert_eq!(q.scales.len(), (n * 4).div_ceil(2));
    }

    #[test]
    fn zero_rows_quantize_to_zero() {
        let w = vec![0.0; 2 * 40];
        assert!(Int8Weights::quantize(&w, 2, 40).dequantize().iter().all(|&v| v == 0.0));
        assert!(Int4Weights::quantize(&w, 2, 40).dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn layouts_match_the_documented_bit_positions() {
        // Row 0: values 1, -2, 3, ... chosen so the scale is exactly 1 (max 127).
        let mut w = vec![0f32; 8];
        w[0] = 127.0;
        w[1] = -1.0;
        w[5] = 2.0;
        let q = Int8Weights::quantize(&w, 1, 8);
        assert_eq!(q.words, vec![0x0000_FF7F, 0x0000_0200]);
        let mut w = vec![0f32; 32];
        w[0] = 7.0;
        w[1] = -1.0;
        w[9] = 3.0;
        let q = Int4Weights::quantize(&w, 1, 32);
        assert_eq!(q.words, vec![0x0000_00F7, 0x0000_0030, 0, 0]);
        assert_eq!(q.scales, vec![f16::from_f32(1.0).to_bits() as u32]);
    }
}

//! The CPU engine's int8/int4 GEMM.
//!
//! The production path ([`PackedInt8`], [`PackedInt4`]) packs the weights once, at load, into
//! the panels the integer-dot micro-kernels of [`super::dot`] read; each product then quantizes
//! its activations to int8 per row (symmetric, `max|x| / 127`, ties to even: the rule of the GPU's
//! `quantize_rows.wgsl`), sums exact integer dots and scales the sums in f32. No dequantised
//! copy of a weight exists at any time.
//!
//! [`int8`] and [`int4`] are the weight-only path: tiles of 64 rows widened to f32 in a per-task
//! buffer and multiplied with the `gemm` crate, for activations that must stay f32.

use rayon::prelude::*;

use super::dot::{self, DotIsa, GROUP, MAX_ROWS, PANEL};
use crate::gemm::cpu::{SharedOut, gemm_into};
use crate::quant::{INT4_BLOCK, Int4Weights, Int8Weights};

const TILE: usize = 64;

/// Rows of activations one task multiplies against one panel: enough to reuse the panel from
/// cache many times, few enough that two cores still split a batch of 400 tokens.
const ROWS_PER_TASK: usize = 8 * MAX_ROWS;

fn isa() -> DotIsa {
    static ISA: std::sync::OnceLock<DotIsa> = std::sync::OnceLock::new();
    *ISA.get_or_init(DotIsa::detect)
}

#[inline(always)]
fn abs_max(values: &[f32]) -> f32 {
    crate::cpu_math::lane_max(values, 0.0, f32::abs)
}

/// One row to int8 (bytes `^ offset`), returning its scale.
#[inline(always)]
fn quantize_row(row: &[f32], dst: &mut [u8], offset: u8) -> f32 {
    let max = abs_max(row);
    let scale = if max == 0.0 { 1.0 } else { max / 127.0 };
    // 1.5·2²³ added to a value of at most 127 leaves it, rounded to nearest-even, in the low
    // mantissa bits, whose low byte is then its two's complement: no saturating `as i8`, which
    // converts lane by lane.
    const MAGIC: f32 = 12_582_912.0;
    for (d, &v) in dst.iter_mut().zip(row) {
        // A division, not a multiply by the reciprocal: the GPU path and the reference
        // divide, and the two can round a value to different integers.
        *d = (((v / scale).clamp(-127.0, 127.0) + MAGIC).to_bits() as u8) ^ offset;
    }
    scale
}

/// [`quantize_row`] compiled for AVX-512: the baseline build vectorizes it four lanes wide only.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row_avx512(row: &[f32], dst: &mut [u8], offset: u8) -> f32 {
    quantize_row(row, dst, offset)
}

/// `x [m, k]` quantized per row into `stride`-byte rows (zero-padded past `k`), with each row's
/// scale; bytes offset by 128 where the micro-kernel multiplies unsigned activations.
fn quantize_activations(x: &[f32], m: usize, k: usize, stride: usize, isa: DotIsa) -> (Vec<u8>, Vec<f32>) {
    let offset = if isa.offset_activations() { 0x80u8 } else { 0 };
    let mut bytes = vec![offset; m * stride];
    let mut scales = vec![0f32; m];
    let wide = isa == DotIsa::Avx512Vnni;
    let quantize = |(row, (dst, scale)): (&[f32], (&mut [u8], &mut f32))| {
        *scale = if wide {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the VNNI micro-kernel was detected, so AVX-512 F and BW are present.
            unsafe {
                quantize_row_avx512(row, dst, offset)
            }
            #[cfg(not(target_arch = "x86_64"))]
            quantize_row(row, dst, offset)
        } else {
            quantize_row(row, dst, offset)
        };
    };
    let rows = x
        .par_chunks(k)
        .zip(bytes.par_chunks_mut(stride).zip(scales.par_iter_mut()));
    if m * k >= 1 << 16 {
        rows.for_each(quantize);
    } else {
        x.chunks(k)
            .zip(bytes.chunks_mut(stride).zip(scales.iter_mut()))
            .for_each(quantize);
    }
    (bytes, scales)
}

/// Int8 weights in the micro-kernels' panels (see [`dot::PANEL`]), packed once at load.
#[derive(Clone, Debug)]
pub struct PackedInt8 {
    pub n: usize,
    pub k: usize,
    groups: usize,
    /// `[ceil(n/64)][groups][64][4]`, zero past `n` and `k`.
    panels: Vec<i8>,
    scales: Vec<f32>,
    /// `128 · Σ_k W[c, k]` per channel: what offset activations add to each exact sum.
    offset_sums: Vec<i32>,
}

impl PackedInt8 {
    pub fn pack(w: &Int8Weights) -> Self {
        let (n, k) = (w.n, w.k);
        let groups = k.div_ceil(GROUP);
        let panel_count = n.div_ceil(PANEL);
        let mut panels = vec![0i8; panel_count * groups * PANEL * GROUP];
        let mut offset_sums = vec![0i32; panel_count * PANEL];
        for (c, offset_sum) in offset_sums.iter_mut().enumerate().take(n) {
            let (p, lane) = (c / PANEL, c % PANEL);
            for kk in 0..k {
                let v = w.value(c, kk);
                let (g, j) = (kk / GROUP, kk % GROUP);
                panels[((p * groups + g) * PANEL + lane) * GROUP + j] = v;
                *offset_sum += 128 * v as i32;
            }
        }
        Self {
            n,
            k,
            groups,
            panels,
            scales: w.scales.clone(),
            offset_sums,
        }
    }

    /// Bytes held: the panels (with their padding), the scales and the offset sums.
    pub fn bytes(&self) -> usize {
        self.panels.len() + 4 * (self.scales.len() + self.offset_sums.len())
    }

    /// `x [m, k] · Wᵀ` with activations quantized per row to int8.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_on(isa(), x, m)
    }

    fn matmul_on(&self, isa: DotIsa, x: &[f32], m: usize) -> Vec<f32> {
        let panel_bytes = self.groups * PANEL * GROUP;
        let stride = self.groups * GROUP;
        panel_product(isa, x, m, (self.n, self.k), stride, |acts, p, rows, dst| {
            let (n, offset, xscales) = (self.n, acts.offset, &acts.scales[..]);
            let (c0, width) = (p * PANEL, PANEL.min(n - p * PANEL));
            let w = &self.panels[p * panel_bytes..][..panel_bytes];
            let (scales, offsets) = (&self.scales[c0..][..width], &self.offset_sums[c0..][..width]);
            let mut sums = [[0i32; PANEL]; MAX_ROWS];
            let end = rows.end;
            for r0 in rows.step_by(MAX_ROWS) {
                let count = MAX_ROWS.min(end - r0);
                dot::panel(
                    isa,
                    &acts.bytes[r0 * stride..],
                    stride,
                    count,
                    w,
                    self.groups,
                    &mut sums,
                );
                for (r, sum) in sums.iter().enumerate().take(count) {
                    // SAFETY: row r0+r, columns c0..c0+width belong to this task alone.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add((r0 + r) * n + c0), width) };
                    let (sum, sx) = (&sum[..width], xscales[r0 + r]);
                    if offset {
                        for (((o, &s), &off), &ws) in o.iter_mut().zip(sum).zip(offsets).zip(scales) {
                            *o = (s - off) as f32 * sx * ws;
                        }
                    } else {
                        for ((o, &s), &ws) in o.iter_mut().zip(sum).zip(scales) {
                            *o = s as f32 * sx * ws;
                        }
                    }
                }
            }
        })
    }
}

/// Int4 weights packed at load: per panel and per 32-input block, four 256-byte pair-groups in
/// which byte `j` of channel `c`'s lane holds input `8q + j` in its low nibble and `8q + 4 + j`
/// in its high nibble, so one shift and mask yields two groups of the int8 panel layout.
#[derive(Clone, Debug)]
pub struct PackedInt4 {
    pub n: usize,
    pub k: usize,
    blocks: usize,
    /// `[ceil(n/64)][blocks][4][64][4]` nibble pairs, zero past `n` and `k`.
    nibbles: Vec<u8>,
    /// `[ceil(n/64)][blocks][64]`: each channel's block scale, widened from f16 once.
    scales: Vec<f32>,
    /// Per channel, `Σ_b scale_b · 128 · Σ W[c, block b]`: what offset activations add to the
    /// scaled sum. One f32 a channel rather than one integer a block keeps a GEMV's reads to
    /// the nibbles and the scales.
    offsets: Vec<f32>,
}

const BLOCK_GROUPS: usize = INT4_BLOCK / GROUP;

impl PackedInt4 {
    pub fn pack(w: &Int4Weights) -> Self {
        let (n, k) = (w.n, w.k);
        let blocks = Int4Weights::blocks_per_row(k);
        let panel_count = n.div_ceil(PANEL);
        let mut nibbles = vec![0u8; panel_count * blocks * INT4_BLOCK / 2 * PANEL];
        let mut scales = vec![0f32; panel_count * blocks * PANEL];
        let mut offsets = vec![0f32; panel_count * PANEL];
        for (c, offset) in offsets.iter_mut().enumerate().take(n) {
            let (p, lane) = (c / PANEL, c % PANEL);
            for b in 0..blocks {
                let at = (p * blocks + b) * PANEL + lane;
                let s = c * blocks + b;
                scales[at] = half::f16::from_bits((w.scales[s / 2] >> (16 * (s % 2))) as u16).to_f32();
                let mut sum = 0i32;
                for i in 0..INT4_BLOCK.min(k - b * INT4_BLOCK) {
                    let v = w.value(c, b * INT4_BLOCK + i);
                    sum += v as i32;
                    let (q, j, high) = (i / 8, i % GROUP, (i % 8) >= GROUP);
                    let byte = &mut nibbles[(((p * blocks + b) * 4 + q) * PANEL + lane) * GROUP + j];
                    *byte |= ((v as u8) & 0xF) << if high { 4 } else { 0 };
                }
                *offset += (128 * sum) as f32 * scales[at];
            }
        }
        Self {
            n,
            k,
            blocks,
            nibbles,
            scales,
            offsets,
        }
    }

    pub fn bytes(&self) -> usize {
        self.nibbles.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    /// `x [m, k] · Wᵀ`: exact integer sums per 32-input block, each scaled by its block's scale
    /// into an f32 sum, then by the row's scale (the GPU's `qgemm_dot4` order).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_on(isa(), x, m)
    }

    fn matmul_on(&self, isa: DotIsa, x: &[f32], m: usize) -> Vec<f32> {
        let block_bytes = INT4_BLOCK / 2 * PANEL;
        let stride = self.blocks * INT4_BLOCK;
        panel_product(isa, x, m, (self.n, self.k), stride, |acts, p, rows, dst| {
            let n = self.n;
            let (c0, width) = (p * PANEL, PANEL.min(n - p * PANEL));
            let mut acc = vec![[0f32; PANEL]; rows.len()];
            let mut panel = [0i8; BLOCK_GROUPS * PANEL * GROUP];
            let mut dots = [[0i32; PANEL]; MAX_ROWS];
            for b in 0..self.blocks {
                let at = (p * self.blocks + b) * PANEL;
                let packed = &self.nibbles[(p * self.blocks + b) * block_bytes..][..block_bytes];
                for (q, pair) in packed.chunks_exact(PANEL * GROUP).enumerate() {
                    let (low, high) = panel[2 * q * PANEL * GROUP..][..2 * PANEL * GROUP].split_at_mut(PANEL * GROUP);
                    for ((lo, hi), &byte) in low.iter_mut().zip(high.iter_mut()).zip(pair) {
                        *lo = ((byte << 4) as i8) >> 4;
                        *hi = (byte as i8) >> 4;
                    }
                }
                let scales = &self.scales[at..][..PANEL];
                for r0 in rows.clone().step_by(MAX_ROWS) {
                    let count = MAX_ROWS.min(rows.end - r0);
                    let x = &acts.bytes[r0 * stride + b * INT4_BLOCK..];
                    dot::panel(isa, x, stride, count, &panel, BLOCK_GROUPS, &mut dots);
                    for (a, d) in acc[r0 - rows.start..].iter_mut().zip(&dots).take(count) {
                        for ((a, &d), &s) in a.iter_mut().zip(d).zip(scales) {
                            *a += d as f32 * s;
                        }
                    }
                }
            }
            let offsets = &self.offsets[c0..][..width];
            for (row, a) in rows.zip(&acc) {
                // SAFETY: row `row`, columns c0..c0+width belong to this task alone.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(row * n + c0), width) };
                for ((o, a), off) in o.iter_mut().zip(a).zip(offsets) {
                    *o = if acts.offset { a - off } else { *a } * acts.scales[row];
                }
            }
        })
    }
}

/// Activations quantized for the micro-kernels: `stride` bytes a row, and each row's scale.
struct Activations {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    /// Bytes are `i8 + 128` (the VNNI kernel's unsigned operand).
    offset: bool,
}

/// What both packed products share: the checks, the activations quantized once, the output, and
/// one rayon task per (64-channel panel, block of rows), each handed its panel index, its rows
/// and the output to write its columns of.
fn panel_product(
    isa: DotIsa,
    x: &[f32],
    m: usize,
    (n, k): (usize, usize),
    stride: usize,
    task: impl Fn(&Activations, usize, std::ops::Range<usize>, SharedOut) + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "qgemm: {} activations are not {m} rows of {k}", x.len());
    let mut out = vec![0f32; m * n];
    if out.is_empty() {
        return out;
    }
    let (bytes, scales) = quantize_activations(x, m, k, stride, isa);
    let acts = Activations {
        bytes,
        scales,
        offset: isa.offset_activations(),
    };
    let dst = SharedOut(out.as_mut_ptr());
    let row_blocks = m.div_ceil(ROWS_PER_TASK);
    (0..n.div_ceil(PANEL) * row_blocks).into_par_iter().for_each(|t| {
        let (p, block) = (t / row_blocks, t % row_blocks);
        let rows = block * ROWS_PER_TASK..((block + 1) * ROWS_PER_TASK).min(m);
        task(&acts, p, rows, dst);
    });
    out
}

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

    #[test]
    fn the_lane_maximum_is_the_maximum() {
        let values = random_vec(1000, 9, 3.0);
        for len in [0, 7, 16, 1000] {
            let want = values[..len].iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(abs_max(&values[..len]), want);
        }
    }

    /// The packed integer paths against the references of exact integer sums, on every
    /// micro-kernel this CPU runs (the portable one always; AVX2 and VNNI where present).
    #[test]
    fn packed_integer_dots_match_the_exact_reference() {
        let isas: Vec<DotIsa> = [DotIsa::Portable, DotIsa::Avx2, DotIsa::Avx512Vnni, DotIsa::NeonDot]
            .into_iter()
            .filter(|i| i.runs_here())
            .collect();
        assert!(isas.contains(&isa()), "the detected micro-kernel {:?} is tested", isa());
        for (m, n, k) in [(1, 1, 1), (1, 130, 77), (7, 200, 96), (13, 64, 300), (50, 65, 33)] {
            let w = random_vec(n * k, 3, 0.2);
            let x = random_vec(m * k, 4, 1.0);
            let (q8, q4) = (Int8Weights::quantize(&w, n, k), Int4Weights::quantize(&w, n, k));
            let (p8, p4) = (PackedInt8::pack(&q8), PackedInt4::pack(&q4));
            let want8 = super::super::reference_int8_dot4(&x, m, &q8);
            let want4 = super::super::reference_int4_dot4(&x, m, &q4);
            for &isa in &isas {
                let (got8, got4) = (p8.matmul_on(isa, &x, m), p4.matmul_on(isa, &x, m));
                assert_close(&got8, &want8, 1e-6, &format!("packed int8 ({isa:?}) {m}x{n}x{k}"));
                assert_close(&got4, &want4, 1e-6, &format!("packed int4 ({isa:?}) {m}x{n}x{k}"));
            }
        }
    }
}

//! The CPU engine's GEMM: the `gemm` crate (burn's Flex backend uses it too). It packs panels of
//! both operands, picks its micro-kernel at run time (AVX-512 with the `x86-v4` feature, AVX2 +
//! FMA, NEON, or portable), and splits large products over rayon's pool. Strides make `Bᵀ` free.

use gemm::Parallelism;
use rayon::prelude::*;

use super::GemmShape;
use crate::activation::Activation;

/// An output buffer shared by rayon tasks that each write their own disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: users hand each task a disjoint part of the buffer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer, through a method so closures capture the whole (`Sync`) wrapper.
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Below this many multiply-adds a product is not worth splitting over threads: batches of
/// small products (attention heads, per-image convolutions) run one product per thread instead.
const SPLIT_MACS: usize = 1 << 21;

/// `dst [m, n] (row stride dst_rs) = a [m, k] · b`, where `b` is `[k, n]`, or `[n, k]` read
/// transposed; all row-major. `accumulate` adds to what `dst` holds.
///
/// # Safety
/// `dst` must be valid for writes at `i·dst_rs + j` for `i < m`, `j < n`, and no other thread
/// may touch those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    dst: *mut f32,
    dst_rs: usize,
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    transpose_b: bool,
    accumulate: bool,
    threads: bool,
) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n);
    if m <= SKINNY_ROWS {
        // SAFETY: forwarded from the caller.
        unsafe { skinny_into(dst, dst_rs, a, b, (m, n, k), transpose_b, accumulate, threads) };
        return;
    }
    let (rhs_cs, rhs_rs) = if transpose_b { (k as isize, 1) } else { (1, n as isize) };
    let parallelism = if threads && m * n * k >= SPLIT_MACS {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the operands are in bounds for their strides (checked by the callers' shapes), and
    // the caller owns the destination rows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Up to this many rows of A, a product is a few matrix-vector products: streaming B once beats
/// packing it (the `gemm` crate packs all of B, 64 MB for a 4096² weight, for a single row).
const SKINNY_ROWS: usize = 4;

/// Columns of B per task in the matrix-vector path.
const SKINNY_COLUMNS: usize = 256;

/// The skinny product: each output element a dot product of contiguous rows when B is `[n, k]`
/// (a linear layer's weight), rows of B scaled and summed when B is `[k, n]`; column blocks
/// on rayon's threads.
///
/// # Safety
/// As [`gemm_into`].
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_into(
    dst: *mut f32,
    dst_rs: usize,
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    transpose_b: bool,
    accumulate: bool,
    threads: bool,
) {
    let out = SharedOut(dst);
    let block = |j0: usize| {
        let width = SKINNY_COLUMNS.min(n - j0);
        for i in 0..m {
            let x = &a[i * k..][..k];
            // SAFETY: row i, columns j0..j0+width belong to this block.
            let row = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(i * dst_rs + j0), width) };
            if !accumulate {
                row.fill(0.0);
            }
            if transpose_b {
                for (j, o) in row.iter_mut().enumerate() {
                    let w = &b[(j0 + j) * k..][..k];
                    *o += dot(x, w);
                }
            } else {
                for (kk, &xv) in x.iter().enumerate() {
                    let w = &b[kk * n + j0..][..width];
                    for (o, &wv) in row.iter_mut().zip(w) {
                        *o += xv * wv;
                    }
                }
            }
        }
    };
    let blocks = n.div_ceil(SKINNY_COLUMNS);
    if threads && blocks > 1 {
        (0..blocks).into_par_iter().for_each(|t| block(t * SKINNY_COLUMNS));
    } else {
        (0..blocks).for_each(|t| block(t * SKINNY_COLUMNS));
    }
}

/// A dot product in 16 independent lanes, so the compiler keeps it in vector registers.
fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (xc, wc) = (x.chunks_exact(16), w.chunks_exact(16));
    let tail: f32 = xc.remainder().iter().zip(wc.remainder()).map(|(a, b)| a * b).sum();
    for (xs, ws) in xc.zip(wc) {
        for l in 0..16 {
            lanes[l] += xs[l] * ws[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `a · b` (or `a · bᵀ`) over a batch, as [`super::reference`] computes it.
pub fn gemm(a: &[f32], b: &[f32], s: &GemmShape) -> Vec<f32> {
    let mut c = vec![0f32; s.batch * s.m * s.n];
    if c.is_empty() {
        return c;
    }
    if s.batch > 1 && s.a_batched && !s.b_batched {
        // One B for every batch (a linear layer's weight): one product of batch·m rows packs
        // B once, not once per batch, and gives the micro-kernel tall panels.
        let rows = s.batch * s.m;
        // SAFETY: `c` is the whole [batch·m, n] output, written by this product alone.
        unsafe { gemm_into(c.as_mut_ptr(), s.n, a, b, (rows, s.n, s.k), s.transpose_b, false, true) };
        return c;
    }
    let (a_stride, b_stride) = (
        if s.a_batched { s.m * s.k } else { 0 },
        if s.b_batched { s.k * s.n } else { 0 },
    );
    let one = |bi: usize, out: &mut [f32], threads: bool| {
        // SAFETY: `out` is this product's own [m, n] block.
        unsafe {
            gemm_into(
                out.as_mut_ptr(),
                s.n,
                &a[bi * a_stride..],
                &b[bi * b_stride..],
                (s.m, s.n, s.k),
                s.transpose_b,
                false,
                threads,
            )
        }
    };
    if s.batch > 1 && s.m * s.n * s.k < SPLIT_MACS {
        c.par_chunks_mut(s.m * s.n)
            .enumerate()
            .for_each(|(bi, out)| one(bi, out, false));
    } else {
        for (bi, out) in c.chunks_mut(s.m * s.n).enumerate() {
            one(bi, out, true);
        }
    }
    c
}

/// A linear layer's f32 weight `W [N, K]` (PyTorch's `[out, in]`), packed once at load into the
/// layout this CPU's micro-kernel reads, so no call re-packs it (the `gemm` crate packs its
/// right-hand operand on every call: 7 MB for each of CLIP's QKV projections).
#[derive(Debug)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    layout: Layout,
}

#[derive(Debug)]
enum Layout {
    /// AVX2 + FMA: `[⌈N/16⌉][K][16]`, zero-padded columns, read by [`avx2::tile`].
    Panels(Vec<f32>),
    /// Elsewhere: `Wᵀ [K, N]` for the `gemm` crate, whose AVX-512 and NEON micro-kernels we
    /// have measured (on AVX-512 at 78 % of OpenBLAS at 1024³) but whose transposed packing
    /// ran at a third of the untransposed one for N = 768.
    Transposed(Vec<f32>),
}

impl PackedF32 {
    /// `w` is `[n, k]` row-major.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedF32: weight has {} values, not {n}×{k}", w.len());
        let layout = if avx2::applies() {
            Layout::Panels(avx2::pack(w, n, k))
        } else {
            let mut t = vec![0f32; w.len()];
            for (o, row) in w.chunks_exact(k.max(1)).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    t[i * n + o] = v;
                }
            }
            Layout::Transposed(t)
        };
        PackedF32 { n, k, layout }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// `act(x [m, k] · Wᵀ + bias)`, as `[m, n]`: the bias and the activation are applied as
    /// each tile is stored, while it is in L1, not in passes of their own.
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, act: Option<Activation>) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "PackedF32: input has {} values, not {m}×{k}", x.len());
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "PackedF32: bias has {} values, not {n}", b.len());
        }
        match &self.layout {
            Layout::Panels(panels) => {
                // Every element is written by exactly one tile, so the buffer is not zeroed
                // first: that memset ran on one thread and was 6 % of MobileSAM's encoder.
                let mut out = Vec::with_capacity(m * n);
                let dst = out.spare_capacity_mut().as_mut_ptr().cast::<f32>();
                avx2::matmul(panels, x, (m, n, k), bias, act, dst);
                // SAFETY: `avx2::matmul` wrote all m·n elements.
                unsafe { out.set_len(m * n) };
                out
            }
            Layout::Transposed(t) => {
                // The bias is the destination's starting value: the product accumulates onto it.
                let mut out = match bias {
                    Some(b) => b.repeat(m),
                    None => vec![0f32; m * n],
                };
                if m * n > 0 {
                    // SAFETY: `out` is the whole [m, n] product, written by this call alone.
                    unsafe { gemm_into(out.as_mut_ptr(), n, x, t, (m, n, k), false, bias.is_some(), true) };
                }
                if let Some(act) = act {
                    out.par_chunks_mut(1 << 14)
                        .for_each(|chunk| crate::activation::cpu::in_place(chunk, act));
                }
                out
            }
        }
    }
}

/// The AVX2 + FMA micro-kernel for [`PackedF32`]: 6 rows × 16 columns in 12 ymm accumulators,
/// each step two loads of the weight panel and six broadcasts of activations. K is walked in
/// chunks whose panel slice (16 KB) stays in a 32 KB L1 while every row tile passes over it.
mod avx2 {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::SharedOut;
    use crate::activation::Activation;

    pub(super) const WIDTH: usize = 16;
    const ROWS: usize = 6;
    const K_CHUNK: usize = 256;
    /// Activations a band of rows may hold: an L2's worth on Zen 3 (512 KB), half of one on Zen 4;
    /// the panel it meets streams from L1.
    const A_BAND_BYTES: usize = 512 * 1024;
    const MAX_BAND_ROWS: usize = 2048;

    pub(super) fn applies() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            crate::cpu_math::has_avx2_fma() && !crate::cpu_math::has_avx512()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    pub(super) fn pack(w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut panels = vec![0f32; n.div_ceil(WIDTH) * k * WIDTH];
        for (j, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let panel = &mut panels[j / WIDTH * k * WIDTH..][..k * WIDTH];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * WIDTH + j % WIDTH] = v;
            }
        }
        panels
    }

    /// # Contract
    /// `out` must be valid for writes of `m·n` values; every one of them is written.
    pub(super) fn matmul(
        panels: &[f32],
        x: &[f32],
        (m, n, k): (usize, usize, usize),
        bias: Option<&[f32]>,
        act: Option<Activation>,
        out: *mut f32,
    ) {
        let blocks = n.div_ceil(WIDTH);
        if blocks * m == 0 {
            return;
        }
        // Rows are taken in bands whose activations (band × K) stay in L2 while every column
        // block passes over them: without bands, MobileSAM's 65536-token × 64 products read
        // their 16 MB of activations again for every 16 columns.
        let band = (A_BAND_BYTES / (4 * k.max(1))).clamp(ROWS, MAX_BAND_ROWS) / ROWS * ROWS;
        let bands = m.div_ceil(band);
        let dst = SharedOut(out);
        // Consecutive tasks share a band: rayon hands each thread a contiguous run of them.
        let task = |task: usize| {
            let (band_index, block) = (task / blocks, task % blocks);
            let (m_lo, m_hi) = (band_index * band, m.min((band_index + 1) * band));
            let n0 = block * WIDTH;
            let cols = WIDTH.min(n - n0);
            let panel = &panels[block * k * WIDTH..][..k * WIDTH];
            let bias = bias.map(|b| &b[n0..n0 + cols]);
            if k == 0 {
                for r in m_lo..m_hi {
                    // SAFETY: this task alone writes rows m_lo..m_hi, columns n0..n0+cols.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(r * n + n0), cols) };
                    match bias {
                        Some(b) => row.copy_from_slice(b),
                        None => row.fill(0.0),
                    }
                    if let Some(act) = act {
                        crate::activation::cpu::in_place(row, act);
                    }
                }
                return;
            }
            for k0 in (0..k).step_by(K_CHUNK) {
                let last = k0 + K_CHUNK >= k;
                let chunk = &panel[k0 * WIDTH..][..K_CHUNK.min(k - k0) * WIDTH];
                for m0 in (m_lo..m_hi).step_by(ROWS) {
                    let rows = ROWS.min(m_hi - m0);
                    let a = &x[m0 * k + k0..];
                    let start = if k0 == 0 { Start::Bias(bias) } else { Start::Accumulate };
                    // SAFETY: AVX2 and FMA are present (`applies`); this task alone writes rows
                    // m0..m0+rows, columns n0..n0+cols; `a` holds `rows` rows of stride k.
                    unsafe {
                        let c = dst.ptr().add(m0 * n + n0);
                        match rows {
                            6 => tile::<6>(a, k, chunk, c, n, cols, start),
                            5 => tile::<5>(a, k, chunk, c, n, cols, start),
                            4 => tile::<4>(a, k, chunk, c, n, cols, start),
                            3 => tile::<3>(a, k, chunk, c, n, cols, start),
                            2 => tile::<2>(a, k, chunk, c, n, cols, start),
                            _ => tile::<1>(a, k, chunk, c, n, cols, start),
                        }
                    }
                    if let (true, Some(act)) = (last, act) {
                        for r in m0..m0 + rows {
                            // SAFETY: the tile just stored these values; this task owns them.
                            let row = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(r * n + n0), cols) };
                            crate::activation::cpu::in_place(row, act);
                        }
                    }
                }
            }
        };
        (0..bands * blocks).into_par_iter().for_each(task);
    }

    /// What a tile's sums start from: the bias (or zero) on the first K chunk, what the
    /// destination holds on the later ones.
    #[derive(Clone, Copy)]
    enum Start<'a> {
        Bias(Option<&'a [f32]>),
        Accumulate,
    }

    /// `R` rows × `cols` (≤ 16) columns over one K chunk (`chunk.len() / 16` steps).
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `c` must be valid for `R` rows of `cols` values at row
    /// stride `ldc`; `a` must hold `R` rows of stride `lda` covering the chunk's steps.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        a: &[f32],
        lda: usize,
        chunk: &[f32],
        c: *mut f32,
        ldc: usize,
        cols: usize,
        start: Start,
    ) {
        let steps = chunk.len() / WIDTH;
        debug_assert!(a.len() >= (R - 1) * lda + steps);
        // Partial column blocks go through a 16-wide staging row: the panel is zero-padded, the
        // destination is not.
        let load = |src: *const f32| -> [__m256; 2] {
            let mut staged = [0f32; WIDTH];
            // SAFETY: the caller's row holds `cols` values.
            unsafe {
                std::ptr::copy_nonoverlapping(src, staged.as_mut_ptr(), cols);
                [
                    _mm256_loadu_ps(staged.as_ptr()),
                    _mm256_loadu_ps(staged.as_ptr().add(8)),
                ]
            }
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        match start {
            Start::Bias(Some(b)) => acc = [load(b.as_ptr()); R],
            Start::Bias(None) => {}
            // SAFETY: row r of the tile lies at c + r·ldc (the caller's contract).
            Start::Accumulate => acc = std::array::from_fn(|r| load(unsafe { c.add(r * ldc) })),
        }
        let rows: [*const f32; R] = std::array::from_fn(|r| a[r * lda..].as_ptr());
        let mut p = chunk.as_ptr();
        for step in 0..steps {
            // SAFETY: the chunk holds `steps` rows of 16; each activation row covers `steps`.
            unsafe {
                let (w0, w1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                for r in 0..R {
                    let xv = _mm256_broadcast_ss(&*rows[r].add(step));
                    acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
                }
                p = p.add(WIDTH);
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { crate::cpu_math::store_ymm_pair(c.add(r * ldc), *sums, cols) };
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile<const R: usize>(_: &[f32], _: usize, _: &[f32], _: *mut f32, _: usize, _: usize, _: Start) {
        unreachable!("the AVX2 micro-kernel only runs where `applies` said so")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};

    #[test]
    fn matches_the_reference_on_odd_shapes_batches_and_transposes() {
        for (batch, m, n, k, a_batched, b_batched, transpose_b) in [
            (1, 1, 1, 1, true, true, false),
            (1, 1, 700, 333, true, true, true),
            (2, 3, 300, 129, true, true, false),
            (1, 67, 45, 131, true, true, false),
            (3, 17, 33, 9, true, true, true),
            (4, 5, 300, 70, false, true, false),
            (1, 256, 256, 256, true, true, true),
            (2, 130, 70, 260, true, true, false),
            (3, 50, 40, 30, true, false, true),
        ] {
            let s = GemmShape {
                batch,
                m,
                n,
                k,
                a_batched,
                b_batched,
                transpose_b,
            };
            let a = random_vec(if a_batched { batch } else { 1 } * m * k, 5, 1.0);
            let b = random_vec(if s.b_batched { batch } else { 1 } * k * n, 6, 1.0);
            assert_close(
                &gemm(&a, &b, &s),
                &super::super::reference(&a, &b, &s),
                1e-5,
                &format!("cpu gemm {s:?}"),
            );
        }
    }

    #[test]
    fn packed_weights_match_the_reference_with_and_without_bias() {
        // Row tails (m not a multiple of 6), column tails (n not a multiple of 16), several K
        // chunks (k > 256), a single row, and an empty K.
        for (m, n, k) in [
            (1, 1, 1),
            (7, 33, 300),
            (13, 16, 600),
            (1, 100, 64),
            (6, 48, 513),
            (4, 5, 0),
        ] {
            let x = random_vec(m * k, 7, 1.0);
            let w = random_vec(n * k, 8, 1.0);
            let bias = random_vec(n, 9, 1.0);
            let packed = PackedF32::pack(&w, n, k);
            let s = GemmShape {
                batch: 1,
                m,
                n,
                k,
                a_batched: true,
                b_batched: true,
                transpose_b: true,
            };
            let plain = super::super::reference(&x, &w, &s);
            assert_close(
                &packed.matmul(&x, m, None, None),
                &plain,
                1e-5,
                &format!("packed {m}×{n}×{k}"),
            );
            let biased: Vec<f32> = plain.iter().enumerate().map(|(i, v)| v + bias[i % n]).collect();
            assert_close(
                &packed.matmul(&x, m, Some(&bias), None),
                &biased,
                1e-5,
                &format!("packed {m}×{n}×{k} + bias"),
            );
            let activated: Vec<f32> = biased.iter().map(|&v| Activation::GeluErf.reference(v)).collect();
            assert_close(
                &packed.matmul(&x, m, Some(&bias), Some(Activation::GeluErf)),
                &activated,
                1e-5,
                &format!("gelu(packed {m}×{n}×{k} + bias)"),
            );
        }
    }
}

//! The CPU engine's GEMM: the `gemm` crate (burn's Flex backend uses it too). It packs panels of
//! both operands, picks its micro-kernel at run time (AVX-512 with the `x86-v4` feature, AVX2 +
//! FMA, NEON, or portable), and splits large products over rayon's pool. Strides make `Bᵀ` free.

use gemm::Parallelism;
use rayon::prelude::*;

use super::GemmShape;

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
}

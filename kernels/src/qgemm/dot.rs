//! Integer-dot micro-kernels of the CPU engine's int8 GEMM, one per ISA, all reading the same
//! packed layout (see [`PANEL`]): AVX-512 VNNI (`vpdpbusd`), AVX2 (`vpmaddubsw` with the sign
//! trick), NEON (`sdot`), and a portable one. The ISA is chosen once, at run time.
//!
//! Only `core::arch` here, so the module builds on its own for any target
//! (`rustc --crate-type lib --target aarch64-unknown-linux-gnu kernels/src/qgemm/dot.rs`).

/// Output channels a packed panel holds. Within a panel, weights are stored group by group of
/// [`GROUP`] inputs: for each group the 64 channels' 4 bytes in channel order, so one 64-byte
/// load is 16 channels × 4 inputs: one `vpdpbusd` on AVX-512, four `sdot`s on NEON.
pub const PANEL: usize = 64;
/// Inputs one 32-bit lane holds.
pub const GROUP: usize = 4;
/// Rows of activations one call multiplies.
pub const MAX_ROWS: usize = 6;

/// The micro-kernel a CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotIsa {
    /// `vpdpbusd`: unsigned × signed bytes, so activations arrive offset by 128.
    Avx512Vnni,
    /// `vpmaddubsw` on |x| and sign(w, x): no pair can saturate with |x|, |w| ≤ 127.
    Avx2,
    /// `sdot`: signed × signed bytes.
    NeonDot,
    Portable,
}

impl DotIsa {
    /// The fastest micro-kernel this CPU runs.
    pub fn detect() -> Self {
        [DotIsa::Avx512Vnni, DotIsa::Avx2, DotIsa::NeonDot]
            .into_iter()
            .find(|isa| isa.runs_here())
            .unwrap_or(DotIsa::Portable)
    }

    /// Whether this CPU can run the micro-kernel (the portable one runs everywhere).
    pub fn runs_here(self) -> bool {
        match self {
            DotIsa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            DotIsa::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            DotIsa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "aarch64")]
            DotIsa::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether activations are stored offset by 128 (as `u8`) rather than as `i8`.
    pub fn offset_activations(self) -> bool {
        self == DotIsa::Avx512Vnni
    }
}

/// `out[r][c] = Σ_g Σ_j x[r][4g + j] · w[g][c][j]` over `groups` groups, for `rows ≤ MAX_ROWS`
/// rows of `x` (row `r` starts at byte `r · x_stride`) and one packed panel `w`
/// (`groups · PANEL · GROUP` bytes). Bytes of `x` are `i8`, or `i8 + 128` for
/// [`DotIsa::Avx512Vnni`]; the caller removes the offset.
/// Rows past `rows` are left as they were.
pub fn panel(
    isa: DotIsa,
    x: &[u8],
    x_stride: usize,
    rows: usize,
    w: &[i8],
    groups: usize,
    out: &mut [[i32; PANEL]; MAX_ROWS],
) {
    assert!(rows <= MAX_ROWS && w.len() >= groups * PANEL * GROUP && isa.runs_here());
    assert!(rows == 0 || x.len() >= (rows - 1) * x_stride + groups * GROUP);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA was detected on this CPU, and the asserts above bound every read.
        DotIsa::Avx512Vnni => unsafe { x86::vnni(x.as_ptr(), x_stride, rows, w.as_ptr(), groups, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        DotIsa::Avx2 => unsafe { x86::avx2(x.as_ptr(), x_stride, rows, w.as_ptr(), groups, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        DotIsa::NeonDot => unsafe { arm::sdot(x.as_ptr(), x_stride, rows, w.as_ptr(), groups, out) },
        _ => portable(x, x_stride, rows, w, groups, out),
    }
}

fn portable(x: &[u8], x_stride: usize, rows: usize, w: &[i8], groups: usize, out: &mut [[i32; PANEL]; MAX_ROWS]) {
    for (r, acc) in out.iter_mut().enumerate().take(rows) {
        acc.fill(0);
        let xr = &x[r * x_stride..];
        for g in 0..groups {
            let xg = &xr[g * GROUP..][..GROUP];
            for (c, wc) in w[g * PANEL * GROUP..][..PANEL * GROUP].chunks_exact(GROUP).enumerate() {
                acc[c] += (0..GROUP).map(|j| xg[j] as i8 as i32 * wc[j] as i32).sum::<i32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GROUP, MAX_ROWS, PANEL};
    use core::arch::x86_64::*;

    /// Dispatches on `rows` so each row count gets its own fully unrolled loop.
    macro_rules! by_rows {
        ($kernel:ident, $rows:expr, $($arg:expr),*) => {
            match $rows {
                1 => $kernel::<1>($($arg),*),
                2 => $kernel::<2>($($arg),*),
                3 => $kernel::<3>($($arg),*),
                4 => $kernel::<4>($($arg),*),
                5 => $kernel::<5>($($arg),*),
                6 => $kernel::<6>($($arg),*),
                _ => {}
            }
        };
    }

    pub unsafe fn vnni(
        x: *const u8,
        xs: usize,
        rows: usize,
        w: *const i8,
        groups: usize,
        out: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        unsafe { by_rows!(vnni_rows, rows, x, xs, w, groups, out) }
    }

    /// Rows × 4 registers of 16 i32 sums: 24 accumulators, 4 weight loads and R broadcasts per
    /// group of 4 inputs, so each 64-byte weight load feeds R `vpdpbusd`s.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni_rows<const R: usize>(
        x: *const u8,
        xs: usize,
        w: *const i8,
        groups: usize,
        out: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        for g in 0..groups {
            let wp = unsafe { w.add(g * PANEL * GROUP) };
            let wv: [__m512i; 4] = core::array::from_fn(|i| unsafe { _mm512_loadu_si512(wp.add(64 * i).cast()) });
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = unsafe { x.add(r * xs + g * GROUP).cast::<i32>().read_unaligned() };
                let xb = _mm512_set1_epi32(xv);
                for (a, wq) in acc_r.iter_mut().zip(wv) {
                    *a = _mm512_dpbusd_epi32(*a, xb, wq);
                }
            }
        }
        for (acc_r, o) in acc.iter().zip(out.iter_mut()) {
            for (i, a) in acc_r.iter().enumerate() {
                unsafe { _mm512_storeu_si512(o.as_mut_ptr().add(16 * i).cast(), *a) };
            }
        }
    }

    pub unsafe fn avx2(
        x: *const u8,
        xs: usize,
        rows: usize,
        w: *const i8,
        groups: usize,
        out: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        // Sixteen ymm registers: a quarter panel (16 channels, two registers) at a time.
        for quarter in 0..4 {
            unsafe { by_rows!(avx2_rows, rows, x, xs, w, groups, out, quarter) }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2_rows<const R: usize>(
        x: *const u8,
        xs: usize,
        w: *const i8,
        groups: usize,
        out: &mut [[i32; PANEL]; MAX_ROWS],
        quarter: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..groups {
            let wp = unsafe { w.add(g * PANEL * GROUP + quarter * 64) };
            let wv: [__m256i; 2] = core::array::from_fn(|i| unsafe { _mm256_loadu_si256(wp.add(32 * i).cast()) });
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = unsafe { x.add(r * xs + g * GROUP).cast::<i32>().read_unaligned() };
                let xb = _mm256_set1_epi32(xv);
                let magnitude = _mm256_sign_epi8(xb, xb);
                for (a, wq) in acc_r.iter_mut().zip(wv) {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wq, xb));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (acc_r, o) in acc.iter().zip(out.iter_mut()) {
            for (i, a) in acc_r.iter().enumerate() {
                unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(quarter * 16 + 8 * i).cast(), *a) };
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{GROUP, MAX_ROWS, PANEL};
    use core::arch::aarch64::*;

    pub unsafe fn sdot(
        x: *const u8,
        xs: usize,
        rows: usize,
        w: *const i8,
        groups: usize,
        out: &mut [[i32; PANEL]; MAX_ROWS],
    ) {
        // 32 q registers: a quarter panel (16 channels, four registers) × up to 6 rows.
        for quarter in 0..4 {
            for r0 in (0..rows).step_by(3) {
                let n = (rows - r0).min(3);
                unsafe {
                    match n {
                        1 => sdot_rows::<1>(x.add(r0 * xs), xs, w, groups, &mut out[r0..], quarter),
                        2 => sdot_rows::<2>(x.add(r0 * xs), xs, w, groups, &mut out[r0..], quarter),
                        _ => sdot_rows::<3>(x.add(r0 * xs), xs, w, groups, &mut out[r0..], quarter),
                    }
                }
            }
        }
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn sdot_rows<const R: usize>(
        x: *const u8,
        xs: usize,
        w: *const i8,
        groups: usize,
        out: &mut [[i32; PANEL]],
        quarter: usize,
    ) {
        let mut acc = [[vdupq_n_s32(0); 4]; R];
        for g in 0..groups {
            let wp = unsafe { w.add(g * PANEL * GROUP + quarter * 16 * GROUP) };
            let wv: [int8x16_t; 4] = core::array::from_fn(|i| unsafe { vld1q_s8(wp.add(16 * i)) });
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = unsafe { x.add(r * xs + g * GROUP).cast::<i32>().read_unaligned() };
                let xb = vreinterpretq_s8_s32(vdupq_n_s32(xv));
                for (a, wq) in acc_r.iter_mut().zip(wv) {
                    // `vdotq_s32` is still unstable in Rust; the instruction itself is not.
                    // SAFETY: register-only, on a CPU with dotprod.
                    unsafe {
                        core::arch::asm!("sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
                            acc = inout(vreg) *a, w = in(vreg) wq, x = in(vreg) xb,
                            options(pure, nomem, nostack));
                    }
                }
            }
        }
        for (acc_r, o) in acc.iter().zip(out.iter_mut()) {
            for (i, a) in acc_r.iter().enumerate() {
                unsafe { vst1q_s32(o.as_mut_ptr().add(quarter * 16 + 4 * i), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each micro-kernel this CPU runs gives the portable one's exact sums, for every row count,
    /// over bytes spanning the whole int8 range the quantizers produce ([-127, 127]).
    #[test]
    fn every_micro_kernel_here_matches_the_portable_one() {
        let (groups, stride) = (37, 37 * GROUP + 3);
        let byte = |i: usize, mul: usize| ((i * mul % 255) as i32 - 127) as i8;
        let w: Vec<i8> = (0..groups * PANEL * GROUP).map(|i| byte(i, 7919)).collect();
        let x: Vec<u8> = (0..MAX_ROWS * stride).map(|i| byte(i, 104_729) as u8).collect();
        let column_sums: Vec<i32> = (0..PANEL)
            .map(|c| {
                (0..groups * GROUP)
                    .map(|k| w[(k / GROUP * PANEL + c) * GROUP + k % GROUP] as i32)
                    .sum()
            })
            .collect();
        let isas = [DotIsa::Avx512Vnni, DotIsa::Avx2, DotIsa::NeonDot];
        for isa in isas.into_iter().filter(|i| i.runs_here()) {
            let input: Vec<u8> = if isa.offset_activations() {
                x.iter().map(|b| b ^ 0x80).collect()
            } else {
                x.clone()
            };
            for rows in 0..=MAX_ROWS {
                let (mut got, mut want) = ([[0; PANEL]; MAX_ROWS], [[0; PANEL]; MAX_ROWS]);
                panel(isa, &input, stride, rows, &w, groups, &mut got);
                panel(DotIsa::Portable, &x, stride, rows, &w, groups, &mut want);
                for r in 0..rows {
                    for c in 0..PANEL {
                        let sum = if isa.offset_activations() {
                            got[r][c] - 128 * column_sums[c]
                        } else {
                            got[r][c]
                        };
                        assert_eq!(sum, want[r][c], "{isa:?}, {rows} rows: row {r}, channel {c}");
                    }
                }
            }
        }
    }
}

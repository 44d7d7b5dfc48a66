//! Scalar math the CPU kernels' inner loops use, written so LLVM vectorizes the loops around it:
//! no calls, no branches. `f32::exp` is a call to libm's `expf` per element, which had made the
//! softmax inside attention cost as much as its two products.

/// `eˣ` to about 1.5e-7 relative (Cephes' `expf` polynomial on `x − n·ln 2`, then `2ⁿ` from the
/// exponent bits). Inputs below −87.3 (including −∞) give 2⁻¹²⁶ ≈ 1.2e-38 rather than 0, which
/// no sum of attention weights or sigmoid can tell apart; inputs above 88.7 saturate.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.722_83);
    // n = round(x·log₂e), as a float and, from the same bits, as an integer: `as i32` would
    // saturate and check for NaN lane by lane, which keeps the loop from vectorizing.
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_2e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 0.166_666_65);
    let p = p.mul_add(r, 0.5);
    let p = (p * r).mul_add(r, r) + 1.0;
    // n ∈ [−126, 128]: 2ⁿ is built directly in the exponent field (n = 128 only at the clamp,
    // where p < 1 keeps the product finite).
    let (half, rest) = (ni >> 1, ni - (ni >> 1));
    p * f32::from_bits(((half + 127) as u32) << 23) * f32::from_bits(((rest + 127) as u32) << 23)
}

/// `Σ f(v)` in 16 independent lanes: a single running f32 sum is a dependency chain the compiler
/// may not reorder, so it would run one element a cycle.
#[inline(always)]
pub fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += f(x);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `max(floor, max f(v))` in 16 independent lanes, so the loop vectorizes (`f32::max` in one
/// running fold does not: it orders NaNs).
#[inline(always)]
pub fn lane_max(v: &[f32], floor: f32, f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [floor; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(floor, |a, &x| a.max(f(x)));
    for chunk in chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            let y = f(x);
            *l = if y > *l { y } else { *l };
        }
    }
    lanes.iter().fold(tail, |a, &l| a.max(l))
}

/// Runs `$body` compiled for AVX-512 (F, BW, VL, FMA) where the CPU has it, else for AVX2 + FMA,
/// else for the baseline: the build targets baseline x86-64, which vectorizes four lanes wide
/// and has no FMA instruction (each `mul_add` would be a call to libm's `fmaf`).
/// `$body` must not rely on any feature beyond what it checks itself.
macro_rules! dispatch_simd {
    ($name:ident, fn($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if crate::cpu_math::has_avx512() {
                    // SAFETY: the features `wide` was compiled for are present on this CPU.
                    return unsafe { wide($($arg),*) };
                }
                if crate::cpu_math::has_avx2_fma() {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch_simd;

/// Stores two ymm registers (16 floats) to `dst`, or only their first `lanes` values when the
/// row ends sooner: the partial tile store shared by the AVX2 micro-kernels.
///
/// # Safety
/// AVX must be present; `dst` must be valid for `lanes.min(16)` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn store_ymm_pair(dst: *mut f32, sums: [std::arch::x86_64::__m256; 2], lanes: usize) {
    use std::arch::x86_64::_mm256_storeu_ps;
    // SAFETY: the caller's contract; the staging row holds 16 floats.
    unsafe {
        if lanes >= 16 {
            _mm256_storeu_ps(dst, sums[0]);
            _mm256_storeu_ps(dst.add(8), sums[1]);
        } else {
            let mut staged = [0f32; 16];
            _mm256_storeu_ps(staged.as_mut_ptr(), sums[0]);
            _mm256_storeu_ps(staged.as_mut_ptr().add(8), sums[1]);
            std::ptr::copy_nonoverlapping(staged.as_ptr(), dst, lanes);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, 4e-7 in f32), the WGSL kernel's formula:
/// branch-free, where libm's `erff` picks one of five rational approximations per element and
/// had made GELU a quarter of MobileSAM's encoder.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let p = 1.061_405_4f32.mul_add(t, -1.453_152);
    let p = p.mul_add(t, 1.421_413_8);
    let p = p.mul_add(t, -0.284_496_72);
    let p = p.mul_add(t, 0.254_829_6);
    (1.0 - p * t * exp(-a * a)).copysign(x)
}

/// tanh from [`exp`]: `1 − 2 / (e²ˣ + 1)`, exact at the saturated ends, within 2e-7 absolute.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_the_standard_library() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert!(exp(f32::NEG_INFINITY) < 1.2e-38 && exp(-1e4) >= 0.0);
        assert!(exp(100.0).is_finite() && exp(100.0) > 3e38);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_and_tanh_are_within_their_bounds() {
        let (mut erf_worst, mut tanh_worst) = (0f64, 0f64);
        let mut x = -12.0f32;
        while x < 12.0 {
            erf_worst = erf_worst.max((erf(x) as f64 - libm::erf(x as f64)).abs());
            tanh_worst = tanh_worst.max((tanh(x) as f64 - (x as f64).tanh()).abs());
            x += 0.000_97;
        }
        assert!(erf_worst < 5e-7, "erf: worst absolute error {erf_worst:e}");
        assert!(tanh_worst < 3e-7, "tanh: worst absolute error {tanh_worst:e}");
        assert_eq!((erf(f32::INFINITY), erf(f32::NEG_INFINITY)), (1.0, -1.0));
        assert_eq!((tanh(100.0), tanh(-100.0)), (1.0, -1.0));
    }
}

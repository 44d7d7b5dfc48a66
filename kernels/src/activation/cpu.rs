//! The CPU engine's activations, in f32 over chunks of the tensor on rayon's threads, with
//! `exp`, `erf` and `tanh` from [`crate::cpu_math`] so every loop vectorizes.

use rayon::prelude::*;

use super::Activation;
use crate::cpu_math::{self, dispatch_simd};

const CHUNK: usize = 1 << 14;

pub fn activation(x: &[f32], kind: Activation) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(dst, src)| apply(dst, src, kind));
    out
}

dispatch_simd!(apply, fn(dst: &mut [f32], src: &[f32], kind: Activation) {
    match kind {
        Activation::Silu => map(dst, src, silu),
        Activation::GeluErf => map(dst, src, gelu_erf),
        Activation::QuickGelu => map(dst, src, quick_gelu),
        Activation::GeluTanh => map(dst, src, gelu_tanh),
    }
});

dispatch_simd!(apply_in_place, fn(values: &mut [f32], kind: Activation) {
    match kind {
        Activation::Silu => map_in_place(values, silu),
        Activation::GeluErf => map_in_place(values, gelu_erf),
        Activation::QuickGelu => map_in_place(values, quick_gelu),
        Activation::GeluTanh => map_in_place(values, gelu_tanh),
    }
});

/// The activation over values a kernel has just stored (still in L1): the epilogue of a fused
/// product, in place of a separate pass over the whole tensor.
pub(crate) fn in_place(values: &mut [f32], kind: Activation) {
    apply_in_place(values, kind)
}

// Inlined into each ISA's build of the loops above, so they vectorize with that ISA.
#[inline(always)]
fn map(dst: &mut [f32], src: &[f32], f: impl Fn(f32) -> f32) {
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = f(v);
    }
}

#[inline(always)]
fn map_in_place(values: &mut [f32], f: impl Fn(f32) -> f32) {
    for v in values.iter_mut() {
        *v = f(*v);
    }
}

#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + cpu_math::exp(-v))
}

#[inline(always)]
fn gelu_erf(v: f32) -> f32 {
    0.5 * v * (1.0 + cpu_math::erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn quick_gelu(v: f32) -> f32 {
    v / (1.0 + cpu_math::exp(-1.702 * v))
}

#[inline(always)]
fn gelu_tanh(v: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * v * (1.0 + cpu_math::tanh(C * (v + 0.044715 * v * v * v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_vec};

    #[test]
    fn activations_match_the_reference() {
        let x = random_vec(40_000, 1, 6.0);
        for kind in [
            Activation::Silu,
            Activation::GeluErf,
            Activation::GeluTanh,
            Activation::QuickGelu,
        ] {
            let want: Vec<f32> = x.iter().map(|&v| kind.reference(v)).collect();
            assert_close(&activation(&x, kind), &want, 1e-6, &format!("cpu {kind:?}"));
            let mut fused = x.clone();
            in_place(&mut fused, kind);
            assert_close(&fused, &want, 1e-6, &format!("cpu {kind:?} in place"));
        }
    }
}

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
        Activation::Silu => {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = v / (1.0 + cpu_math::exp(-v));
            }
        }
        Activation::GeluErf => {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = 0.5 * v * (1.0 + cpu_math::erf(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        Activation::QuickGelu => {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = v / (1.0 + cpu_math::exp(-1.702 * v));
            }
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // √(2/π)
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = 0.5 * v * (1.0 + cpu_math::tanh(C * (v + 0.044715 * v * v * v)));
            }
        }
    }
});

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
        }
    }
}

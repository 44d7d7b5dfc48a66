//! Element-wise activations: SiLU, GELU (exact erf form, and the tanh approximation) and
//! OpenAI's QuickGELU.

use burn::backend::wgpu::{CubeTensor, into_contiguous};
use burn::tensor::DType;

use crate::launch::{WgslKernel, as_u32, binding, empty_like_device, fold_groups, params};

pub mod cpu;

const TEMPLATE: &str = include_str!("activation.wgsl");
const WG: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    Silu,
    /// `x·Φ(x)` with the exact normal CDF (CLIP, SAM's MLPs, SD's GEGLU).
    GeluErf,
    /// The tanh approximation (OpenAI's `quick`-free GELU variants, TinyViT).
    GeluTanh,
    /// `x·σ(1.702·x)`: OpenAI's CLIP (`quick_gelu`). One pass instead of burn's three.
    QuickGelu,
}

impl Activation {
    fn shader_fn(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluErf => "gelu_erf",
            Self::GeluTanh => "gelu_tanh",
            Self::QuickGelu => "quick_gelu",
        }
    }

    /// CPU reference, in f64.
    pub fn reference(self, x: f32) -> f32 {
        let v = x as f64;
        (match self {
            Self::Silu => v / (1.0 + (-v).exp()),
            Self::GeluErf => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
            Self::GeluTanh => {
                0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
            }
            Self::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
        }) as f32
    }
}

/// erf to ~1e-15 (W. J. Cody's rational approximations are overkill here; a series and a
/// continued fraction suffice for a reference).
fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series: converges quickly for |x| < 2.5.
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..100 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), accurate for |x| ≥ 2.5.
        let a = x.abs();
        let mut f = a;
        for n in (1..60).rev() {
            f = a + (n as f64 / 2.0) / f;
        }
        let erfc = (-a * a).exp() / (f * std::f64::consts::PI.sqrt());
        x.signum() * (1.0 - erfc)
    }
}

pub(crate) fn launch(x: CubeTensor, act: Activation) -> CubeTensor {
    assert_eq!(x.dtype, DType::F32, "activation: f32 only, got {:?}", x.dtype);
    let x = into_contiguous(x);
    let len = x.meta.shape().num_elements();
    let out = empty_like_device(&x, x.meta.shape().clone(), DType::F32);
    if len == 0 {
        return out;
    }
    let (ty, items) = if len.is_multiple_of(4) {
        ("vec4<f32>", len / 4)
    } else {
        ("f32", len)
    };
    let p = params(&x.client, &[as_u32(items, "elements"), 0, 0, 0]);
    let (gx, gy) = fold_groups(as_u32(items.div_ceil(WG as usize), "groups"));
    WgslKernel::new("activation", TEMPLATE)
        .var("op", act.shader_fn())
        .var("ty", ty)
        .launch(&x.client, (WG, 1, 1), (gx, gy, 1), vec![binding(&x), binding(&out), p]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, for_each_kernel_device, random_vec, to_vec, upload};

    #[test]
    fn erf_reference_is_accurate() {
        // Known values: erf(0.5), erf(1), erf(2), erf(3).
        for (x, want) in [
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-13);
        }
    }

    #[test]
    fn activations_match_reference() {
        // 1000 values over [-10, 10] (saturated tails included) plus odd length for the tail group.
        let x = random_vec(1001, 80, 10.0);
        let x4 = random_vec(1000, 81, 10.0); // a multiple of 4: the vec4 path
        for x in [&x, &x4] {
            for act in [
                Activation::Silu,
                Activation::GeluErf,
                Activation::GeluTanh,
                Activation::QuickGelu,
            ] {
                let want: Vec<f32> = x.iter().map(|&v| act.reference(v)).collect();
                for_each_kernel_device(|dev, label| {
                    let got = crate::activation(upload::<1>(x, &[x.len()], dev), act);
                    // A&S erf is good to 1.5e-7 absolute; exp/tanh on GPUs to a few ulp.
                    assert_close(&to_vec(got), &want, 1e-6, &format!("{label} {act:?} n={}", x.len()));
                });
            }
        }
    }
}

//! Helpers for kernel tests, model tests and benchmarks: the devices to run on, seeded inputs,
//! and a tolerance check that names what failed.

use std::sync::OnceLock;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::device::{DeviceRequest, LimitsProfile, open};

pub struct TestDevice {
    pub label: String,
    pub device: Device,
    pub shader_f16: bool,
}

/// The adapter twice, once with its own limits and once with WebGPU's defaults (phone limits),
/// so every test proves both; or the CPU backend alone when no adapter exists (an error under
/// `DIVERGEN_REQUIRE_GPU=1`).
pub fn devices() -> &'static [TestDevice] {
    static DEVICES: OnceLock<Vec<TestDevice>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let base = DeviceRequest::from_env().unwrap_or_else(|e| panic!("{e}"));
        let mut found = Vec::new();
        for limits in [LimitsProfile::Adapter, LimitsProfile::Mobile] {
            let opened = open(&DeviceRequest { limits, ..base.clone() }).unwrap_or_else(|e| panic!("{e}"));
            match &opened.adapter {
                Some(a) => found.push(TestDevice {
                    label: format!("{} [{limits}]", a.name),
                    device: opened.device.clone(),
                    shader_f16: a.shader_f16,
                }),
                None => {
                    found.push(TestDevice {
                        label: "cpu".into(),
                        device: opened.device.clone(),
                        shader_f16: true,
                    });
                    break;
                }
            }
        }
        found
    })
}

/// Runs `f` on every test device.
pub fn for_each_device(f: impl Fn(&Device, &str)) {
    for d in devices() {
        f(&d.device, &d.label);
    }
}

pub fn supports_f16(device: &Device) -> bool {
    devices()
        .iter()
        .find(|d| d.device == *device)
        .is_some_and(|d| d.shader_f16)
}

/// `len` values uniform in `[-amplitude, amplitude]`, reproducible from `seed`.
pub fn random_vec(len: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-amplitude..=amplitude)).collect()
}

pub fn upload<const D: usize>(values: &[f32], dims: &[usize], device: &Device) -> Tensor<D> {
    assert_eq!(dims.len(), D, "upload: {} dims for a rank-{D} tensor", dims.len());
    Tensor::from_data(TensorData::new(values.to_vec(), dims.to_vec()), device)
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_else(|e| panic!("readback: {e:?}"))
}

/// Largest absolute difference, relative to the largest reference magnitude.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(
        got.len(),
        want.len(),
        "lengths differ: got {}, want {}",
        got.len(),
        want.len()
    );
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0f32, |m, (g, w)| {
        if g.is_nan() != w.is_nan() {
            f32::INFINITY
        } else {
            m.max((g - w).abs())
        }
    }) / scale
}

/// Asserts `relative_error(got, want) ≤ tolerance`, naming the case and the worst element.
pub fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    let err = relative_error(got, want);
    if err > tolerance {
        let (i, _) = got
            .iter()
            .zip(want)
            .enumerate()
            .max_by(|a, b| (a.1.0 - a.1.1).abs().total_cmp(&(b.1.0 - b.1.1).abs()))
            .expect("non-empty");
        panic!(
            "{what}: relative error {err:e} > {tolerance:e} (worst at {i}: got {}, want {})",
            got[i], want[i]
        );
    }
}

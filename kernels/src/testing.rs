//! Helpers for kernel tests, model tests and benchmarks: the devices to run on, seeded inputs,
//! and a tolerance check that names what failed.

use std::sync::OnceLock;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::device::{DeviceRequest, LimitsProfile, open};
use crate::variants::{KernelFamily, KernelPlan};

pub struct TestDevice {
    pub label: String,
    pub device: Device,
    pub shader_f16: bool,
    pub limits: LimitsProfile,
    /// The kernel variants it runs (`None` on the CPU backend).
    pub plan: Option<KernelPlan>,
}

fn open_test_device(request: &DeviceRequest) -> TestDevice {
    let opened = open(request).unwrap_or_else(|e| panic!("{e}"));
    match (&opened.adapter, opened.plan) {
        (Some(a), Some(plan)) => TestDevice {
            label: format!("{} [{}, {} kernels]", a.name, request.limits, plan.family),
            device: opened.device.clone(),
            shader_f16: a.shader_f16,
            limits: request.limits,
            plan: Some(plan),
        },
        _ => TestDevice {
            label: "native CPU engine".into(),
            device: opened.device.clone(),
            shader_f16: true,
            limits: request.limits,
            plan: None,
        },
    }
}

/// The adapter twice, once with its own limits and once with WebGPU's defaults (phone limits),
/// then the native CPU engine, so every test proves all three. A CPU rasterizer counts as an
/// adapter here (CI proves every WGSL kernel on lavapipe), though `auto` would give it way to
/// the engine. `DIVERGEN_BACKEND=cpu` leaves only the engine; with no adapter at all the engine
/// alone runs (an error under `DIVERGEN_REQUIRE_GPU=1`). Each adapter runs the kernel family
/// the environment asks for.
pub fn devices() -> &'static [TestDevice] {
    static DEVICES: OnceLock<Vec<TestDevice>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let base = DeviceRequest::from_env().unwrap_or_else(|e| panic!("{e}"));
        let engine_only = base
            .backend
            .as_deref()
            .is_some_and(|b| b.trim().eq_ignore_ascii_case("cpu"));
        let mut found = Vec::new();
        if !engine_only {
            let adapter = DeviceRequest {
                backend: base.backend.clone().or_else(|| Some("gpu".into())),
                ..base.clone()
            };
            for limits in [LimitsProfile::Adapter, LimitsProfile::Mobile] {
                let device = open_test_device(&DeviceRequest {
                    limits,
                    ..adapter.clone()
                });
                if device.plan.is_none() {
                    break; // no adapter: the engine below is all there is
                }
                found.push(device);
            }
        }
        // The engine joins even under DIVERGEN_REQUIRE_GPU=1, which guards the adapter above.
        found.push(open_test_device(&DeviceRequest {
            backend: Some("cpu".into()),
            require_gpu: false,
            ..base
        }));
        found
    })
}

/// [`devices`], plus the same adapter under both limits running the other kernel family: the
/// GPU variants on lavapipe, the register variants on a GPU. Kernel tests run on all of them,
/// so every variant is proven wherever tests run.
pub fn kernel_devices() -> &'static [TestDevice] {
    static DEVICES: OnceLock<Vec<TestDevice>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let base = DeviceRequest::from_env().unwrap_or_else(|e| panic!("{e}"));
        let mut found = Vec::new();
        for d in devices() {
            let Some(plan) = d.plan else {
                continue; // the CPU engine has one family
            };
            let other = match plan.family {
                KernelFamily::Cpu => KernelFamily::Gpu,
                _ => KernelFamily::Cpu,
            };
            found.push(open_test_device(&DeviceRequest {
                limits: d.limits,
                kernels: other,
                backend: base.backend.clone().or_else(|| Some("gpu".into())),
                ..base.clone()
            }));
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

/// Runs `f` on every test device and on [`kernel_devices`]: both kernel families.
pub fn for_each_kernel_device(f: impl Fn(&Device, &str)) {
    for d in devices().iter().chain(kernel_devices()) {
        f(&d.device, &d.label);
    }
}

/// The kernel variants `device` runs (`None` on the CPU backend).
pub fn plan_of(device: &Device) -> Option<KernelPlan> {
    crate::variants::plan_of(device)
}

/// Whether quantized products on `device` round their activations to int8 as well: the GPU's
/// `dot4` variant and the CPU engine's packed integer dots do; weight-only kernels keep f32.
pub fn quantizes_activations(device: &Device) -> bool {
    *device == Device::flex() || plan_of(device).is_some_and(|p| p.qgemm == crate::variants::Qgemm::Dot4)
}

pub fn supports_f16(device: &Device) -> bool {
    devices()
        .iter()
        .chain(kernel_devices())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variants::{Attention, F16Math, Matmul, Qgemm, Reduce};

    /// Kernel tests prove every variant only if the devices they run on span both families and
    /// the GPU family gets each variant the adapter can run, under both limit profiles.
    #[test]
    fn kernel_devices_cover_every_variant_the_adapter_offers() {
        let all: Vec<&TestDevice> = devices().iter().chain(kernel_devices()).collect();
        if all.iter().all(|d| d.plan.is_none()) {
            eprintln!("CPU backend: no kernel variants to cover");
            return;
        }
        let gpu: Vec<&TestDevice> = all
            .iter()
            .copied()
            .filter(|d| d.plan.is_some_and(|p| p.family == KernelFamily::Gpu))
            .collect();
        let cpu = all
            .iter()
            .filter(|d| d.plan.is_some_and(|p| p.family == KernelFamily::Cpu))
            .count();
        assert_eq!((gpu.len(), cpu), (2, 2), "both families under both limit profiles");
        for d in gpu {
            let p = d.plan.expect("plan");
            // Every adapter divergen targets, phones included, grants what the shared tiles
            // need (WebGPU's defaults do); subgroups, f16 and packed dots follow the adapter.
            assert_eq!(
                (p.matmul, p.attention),
                (Matmul::Shared, Attention::Shared),
                "{}",
                d.label
            );
            let opened = crate::device::enumerate(&DeviceRequest::from_env().unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
            let adapter = opened
                .iter()
                .find(|a| d.label.starts_with(&a.name))
                .expect("the test adapter is listed");
            assert_eq!(p.reduce == Reduce::Subgroup, adapter.subgroups, "{}", d.label);
            assert_eq!(p.f16 == F16Math::Math, adapter.shader_f16, "{}", d.label);
            assert_eq!(p.qgemm, Qgemm::Dot4, "{}: naga implements packed dots", d.label);
        }
    }
}

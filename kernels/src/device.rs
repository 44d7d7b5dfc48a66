//! Choosing the compute device: a wgpu adapter on Vulkan, Metal or DX12, shared with burn, or
//! the native CPU engine ([`crate::engine`], on burn's Flex backend) when no adapter exists or
//! the only ones are CPU rasterizers.
//!
//! The device is created here rather than by burn so that we decide its limits: `Limits::Mobile`
//! asks only for WebGPU's defaults (128 MiB storage bindings, 256 invocations and 16 KiB shared
//! memory per workgroup), which proves on a desktop that every kernel also fits a phone GPU.

use std::fmt;
use std::sync::Mutex;

use burn::backend::wgpu::{RuntimeOptions, WgpuSetup, try_init_device, wgpu};
use burn::cubecl::Device as CubeDevice;
use burn::tensor::Device;
use serde::Serialize;

use crate::engine::CpuEngine;
use crate::variants::{DeviceCaps, ENV_KERNELS, KernelFamily, KernelPlan};

/// Environment variable naming the adapter: its index in `divergen devices`, or part of its name.
pub const ENV_ADAPTER: &str = "DIVERGEN_ADAPTER";
/// Environment variable restricting the graphics API: `vulkan`, `metal` or `dx12`.
pub const ENV_BACKEND: &str = "DIVERGEN_BACKEND";
/// Environment variable choosing the limits profile: `adapter` (default) or `mobile`.
pub const ENV_LIMITS: &str = "DIVERGEN_LIMITS";
/// When set to `1`, a missing adapter is an error instead of a fall-back to the CPU engine, and
/// `auto` keeps a CPU rasterizer rather than giving way to the engine.
pub const ENV_REQUIRE_GPU: &str = "DIVERGEN_REQUIRE_GPU";
/// Environment variable lowering the storage-binding limit the device is created with (bytes),
/// to see what a device with smaller bindings than this one would do.
pub const ENV_MAX_BINDING_BYTES: &str = "DIVERGEN_MAX_BINDING_BYTES";

/// The largest tensor each opened device holds: burn keeps every tensor in one buffer and binds
/// it whole, so no tensor may exceed the storage-binding limit (nor the buffer limit).
static TENSOR_LIMITS: Mutex<Vec<(Device, u64)>> = Mutex::new(Vec::new());

/// The most bytes one tensor may take on `device` (on the CPU engine an eighth of the memory);
/// `None` for devices not opened by [`open`]. Models split their work (tiled decoding, chunked
/// feed-forward) to stay under it, and refuse up front what cannot be split.
pub fn max_tensor_bytes(device: &Device) -> Option<u64> {
    TENSOR_LIMITS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(d, _)| d == device)
        .map(|(_, bytes)| *bytes)
}

/// Names of adapters opened here that are CPU rasterizers (device type `Cpu`).
static CPU_ADAPTERS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Whether kernels on the adapter called `name` run as SIMD lanes of CPU threads (lavapipe,
/// SwiftShader) rather than on a GPU: the two want very different register tiles.
pub(crate) fn runs_on_cpu(name: &str) -> bool {
    let known = CPU_ADAPTERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|n| n == name);
    let lower = name.to_ascii_lowercase();
    known
        || ["llvmpipe", "lavapipe", "swiftshader"]
            .iter()
            .any(|n| lower.contains(n))
}

/// Which limits the logical device is created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsProfile {
    /// Everything the adapter offers.
    Adapter,
    /// WebGPU's default limits, which phone GPUs are guaranteed to meet.
    Mobile,
}

impl std::str::FromStr for LimitsProfile {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "adapter" | "full" | "" => Ok(Self::Adapter),
            "mobile" | "webgpu" => Ok(Self::Mobile),
            other => Err(DeviceError::BadSetting(format!(
                "limits profile '{other}' is not one of: adapter, mobile"
            ))),
        }
    }
}

impl fmt::Display for LimitsProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Adapter => "adapter",
            Self::Mobile => "mobile",
        })
    }
}

/// What the user asked for; every field has an environment variable and a CLI flag.
#[derive(Clone, Debug)]
pub struct DeviceRequest {
    pub adapter: Option<String>,
    pub backend: Option<String>,
    pub limits: LimitsProfile,
    pub require_gpu: bool,
    /// Which family of kernel variants to run (`DIVERGEN_KERNELS`); see [`crate::variants`].
    pub kernels: KernelFamily,
    /// A storage-binding limit below the adapter's (`DIVERGEN_MAX_BINDING_BYTES`).
    pub max_binding_bytes: Option<u64>,
    /// Threads of the CPU engine (`--threads`; else `RAYON_NUM_THREADS`, else one per core).
    pub threads: Option<usize>,
}

impl DeviceRequest {
    /// Reads `DIVERGEN_ADAPTER`, `DIVERGEN_BACKEND`, `DIVERGEN_LIMITS`, `DIVERGEN_REQUIRE_GPU`
    /// and `DIVERGEN_KERNELS`.
    pub fn from_env() -> Result<Self, DeviceError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Ok(Self {
            adapter: var(ENV_ADAPTER),
            backend: var(ENV_BACKEND),
            limits: var(ENV_LIMITS)
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(LimitsProfile::Adapter),
            require_gpu: var(ENV_REQUIRE_GPU).is_some_and(|v| v != "0"),
            kernels: var(ENV_KERNELS)
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(KernelFamily::Auto),
            max_binding_bytes: var(ENV_MAX_BINDING_BYTES)
                .map(|v| parse_binding_bytes(&v))
                .transpose()?,
            threads: None,
        })
    }
}

/// A storage-binding limit as the user writes it: a positive number of bytes, at least 64 KiB
/// (below that not even the small models' weights fit one binding).
pub fn parse_binding_bytes(text: &str) -> Result<u64, DeviceError> {
    match text.trim().parse::<u64>() {
        Ok(bytes) if bytes >= 64 * 1024 => Ok(bytes),
        _ => Err(DeviceError::BadSetting(format!(
            "{ENV_MAX_BINDING_BYTES}='{text}': a storage-binding limit in bytes of at least 65536 is expected"
        ))),
    }
}

/// An adapter as `divergen devices` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterReport {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub max_storage_binding_bytes: u64,
    pub max_buffer_bytes: u64,
    pub max_invocations_per_workgroup: u32,
    pub max_workgroup_shared_bytes: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Every optional feature the adapter offers, experimental ones included.
    pub offered_features: Vec<String>,
    /// What opening it requests: the [`wanted_features`] that it offers, never an experimental one.
    pub requested_features: Vec<String>,
}

/// The optional features divergen and burn use, each requested only where the adapter offers it:
/// - timestamp queries (all three): cubecl times autotune candidates with them, writing
///   timestamps inside encoders and passes;
/// - `SHADER_F16`: our f16 GEMMs, and cubecl compiles f16 kernels when the adapter has it;
/// - `SUBGROUP`, `SUBGROUP_BARRIER`: our subgroup reductions, and cubecl's plane operations;
/// - `SHADER_FLOAT32_ATOMIC`: cubecl's atomic reductions;
/// - `SHADER_INT64`, `SHADER_F64`: cubecl registers these types off the adapter's features, so a
///   kernel of burn's that uses them would fail to compile without them.
///
/// cubecl reads the adapter's features rather than the device's, so leaving out one it relies on
/// breaks burn later, in the middle of a model; requesting an experimental one (ray queries, mesh
/// shaders, which current Mesa, NVIDIA and AMD drivers expose) makes `request_device` fail.
pub fn wanted_features() -> wgpu::Features {
    wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
        | wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::SUBGROUP_BARRIER
        | wgpu::Features::SHADER_FLOAT32_ATOMIC
        | wgpu::Features::SHADER_INT64
        | wgpu::Features::SHADER_F64
}

/// The features to request of an adapter offering `offered`.
pub fn features_to_request(offered: wgpu::Features) -> wgpu::Features {
    (offered & wanted_features()) - wgpu::Features::all_experimental_mask()
}

fn feature_names(features: wgpu::Features) -> Vec<String> {
    features.iter_names().map(|(name, _)| name.to_string()).collect()
}

impl AdapterReport {
    fn new(index: usize, adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        Self {
            index,
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: [info.driver, info.driver_info]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            max_storage_binding_bytes: limits.max_storage_buffer_binding_size,
            max_buffer_bytes: limits.max_buffer_size,
            max_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_workgroup_shared_bytes: limits.max_compute_workgroup_storage_size,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            offered_features: feature_names(features),
            requested_features: feature_names(features_to_request(features)),
        }
    }
}

/// The device every model and kernel runs on, with what was chosen and why.
#[derive(Clone, Debug)]
pub struct ComputeDevice {
    pub device: Device,
    /// `None` when running on the CPU engine.
    pub adapter: Option<AdapterReport>,
    pub limits: LimitsProfile,
    /// Limits the logical device was actually created with (what kernels may rely on).
    pub granted: Option<GrantedLimits>,
    /// The kernel variants this device runs (`None` on the CPU backend).
    pub plan: Option<KernelPlan>,
    /// The native CPU engine, when that is what runs.
    pub cpu: Option<CpuEngine>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct GrantedLimits {
    pub max_storage_binding_bytes: u64,
    pub max_invocations_per_workgroup: u32,
    pub max_workgroup_shared_bytes: u32,
}

impl ComputeDevice {
    pub fn describe(&self) -> String {
        match &self.adapter {
            Some(a) => format!(
                "{} ({}, {}, limits: {}, kernels: {})",
                a.name,
                a.backend,
                a.device_type,
                self.limits,
                self.plan.map_or(KernelFamily::Auto, |p| p.family)
            ),
            None => match &self.cpu {
                Some(e) => format!("native CPU engine ({}, {} threads)", e.isa, e.threads),
                None => "CPU backend".to_string(),
            },
        }
    }
}

#[derive(Debug)]
pub enum DeviceError {
    BadSetting(String),
    NoAdapter(String),
    Request(String),
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadSetting(m) => write!(f, "bad device setting: {m}"),
            Self::NoAdapter(m) => write!(f, "no usable GPU adapter: {m}"),
            Self::Request(m) => write!(f, "could not open the GPU device: {m}"),
        }
    }
}

impl std::error::Error for DeviceError {}

fn backends_for(request: &DeviceRequest) -> Result<wgpu::Backends, DeviceError> {
    let all = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    match request.backend.as_deref().map(|b| b.trim().to_ascii_lowercase()) {
        None => Ok(all),
        Some(b) => match b.as_str() {
            "vulkan" => Ok(wgpu::Backends::VULKAN),
            "metal" => Ok(wgpu::Backends::METAL),
            "dx12" => Ok(wgpu::Backends::DX12),
            "auto" | "any" | "gpu" | "wgpu" => Ok(all),
            // The CPU engine, skipping any adapter (lavapipe included).
            "cpu" => Ok(wgpu::Backends::empty()),
            other => Err(DeviceError::BadSetting(format!(
                "backend '{other}' is not one of: vulkan, metal, dx12, gpu, cpu, auto"
            ))),
        },
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

/// Every adapter on the allowed graphics APIs, in the order `DIVERGEN_ADAPTER=<index>` uses.
pub fn enumerate(request: &DeviceRequest) -> Result<Vec<AdapterReport>, DeviceError> {
    let backends = backends_for(request)?;
    let adapters = pollster::block_on(instance(backends).enumerate_adapters(backends));
    Ok(adapters
        .iter()
        .enumerate()
        .map(|(i, a)| AdapterReport::new(i, a))
        .collect())
}

/// Real GPUs first; lavapipe/SwiftShader (device type `Cpu`) only when nothing else exists.
fn preference(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn pick(adapters: Vec<wgpu::Adapter>, wanted: Option<&str>) -> Result<(usize, wgpu::Adapter), DeviceError> {
    let mut indexed: Vec<(usize, wgpu::Adapter)> = adapters.into_iter().enumerate().collect();
    if let Some(wanted) = wanted {
        let found = match wanted.trim().parse::<usize>() {
            Ok(i) => indexed.into_iter().find(|(j, _)| *j == i),
            Err(_) => {
                let needle = wanted.to_ascii_lowercase();
                indexed
                    .into_iter()
                    .find(|(_, a)| a.get_info().name.to_ascii_lowercase().contains(&needle))
            }
        };
        return found
            .ok_or_else(|| DeviceError::NoAdapter(format!("no adapter matches '{wanted}' (see `divergen devices`)")));
    }
    indexed.sort_by_key(|(_, a)| preference(a.get_info().device_type));
    indexed
        .into_iter()
        .next()
        .ok_or_else(|| DeviceError::NoAdapter("no Vulkan, Metal or DX12 adapter was found".into()))
}

/// The native CPU engine as a [`ComputeDevice`], its pool started and its tensor limit known.
fn cpu_engine(request: &DeviceRequest) -> ComputeDevice {
    let engine = crate::engine::start(request.threads);
    let device = Device::flex();
    let mut limits = TENSOR_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    if !limits.iter().any(|(d, _)| *d == device) {
        limits.push((device.clone(), engine.max_tensor_bytes));
    }
    ComputeDevice {
        device,
        adapter: None,
        limits: request.limits,
        granted: None,
        plan: None,
        cpu: Some(engine),
    }
}

/// Whether `auto` should leave `adapter` for the CPU engine: it is a CPU rasterizer, and the
/// user neither named it, nor an API, nor asked for a GPU.
fn rasterizer_gives_way(request: &DeviceRequest, adapter: &wgpu::Adapter) -> bool {
    let auto = request
        .backend
        .as_deref()
        .is_none_or(|b| matches!(b.trim().to_ascii_lowercase().as_str(), "" | "auto"));
    auto && request.adapter.is_none() && !request.require_gpu && adapter.get_info().device_type == wgpu::DeviceType::Cpu
}

/// Opens the requested device, registering it with burn so burn ops and our kernels share it.
///
/// Each call creates a new logical device; callers keep the result and clone its `device`.
pub fn open(request: &DeviceRequest) -> Result<ComputeDevice, DeviceError> {
    let backends = backends_for(request)?;
    if backends.is_empty() {
        if request.require_gpu {
            return Err(DeviceError::BadSetting(format!(
                "backend 'cpu' asked for while {ENV_REQUIRE_GPU}=1 requires a GPU"
            )));
        }
        return Ok(cpu_engine(request));
    }
    let instance = instance(backends);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    let (index, adapter) = match pick(adapters, request.adapter.as_deref()) {
        Ok(found) => found,
        Err(e) if !request.require_gpu && request.adapter.is_none() => {
            let engine = cpu_engine(request);
            log::warn!(
                "{e}; running the {} (set {ENV_REQUIRE_GPU}=1 to make this an error)",
                engine.describe()
            );
            return Ok(engine);
        }
        Err(e) => return Err(e),
    };
    if rasterizer_gives_way(request, &adapter) {
        let engine = cpu_engine(request);
        log::info!(
            "{} is a CPU rasterizer: running the {} instead, which is faster on the same cores (--backend vulkan runs on the rasterizer)",
            adapter.get_info().name,
            engine.describe()
        );
        return Ok(engine);
    }
    let report = AdapterReport::new(index, &adapter);
    let mut required_limits = match request.limits {
        LimitsProfile::Adapter => adapter.limits(),
        LimitsProfile::Mobile => wgpu::Limits::defaults(),
    };
    if let Some(bytes) = request.max_binding_bytes {
        required_limits.max_storage_buffer_binding_size = required_limits.max_storage_buffer_binding_size.min(bytes);
    }
    let required_features = features_to_request(adapter.features());
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("divergen"),
        required_features,
        required_limits,
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .map_err(|e| DeviceError::Request(format!("{} ({}): {e}", report.name, request.limits)))?;
    let limits = device.limits();
    let granted = GrantedLimits {
        max_storage_binding_bytes: limits.max_storage_buffer_binding_size,
        max_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_workgroup_shared_bytes: limits.max_compute_workgroup_storage_size,
    };
    let info = adapter.get_info();
    let granted_features = device.features();
    let caps = DeviceCaps {
        cpu_adapter: info.device_type == wgpu::DeviceType::Cpu,
        shader_f16: granted_features.contains(wgpu::Features::SHADER_F16),
        subgroups: granted_features.contains(wgpu::Features::SUBGROUP),
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
        max_workgroup_shared_bytes: granted.max_workgroup_shared_bytes,
        max_invocations_per_workgroup: granted.max_invocations_per_workgroup,
        packed_dot: instance
            .wgsl_language_features()
            .contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct),
    };
    let plan = KernelPlan::choose(request.kernels, &caps).with_overrides(&caps, |k| std::env::var(k).ok())?;
    if caps.cpu_adapter {
        CPU_ADAPTERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(report.name.clone());
    }
    let backend = info.backend;
    let setup = WgpuSetup {
        instance,
        adapter,
        device,
        queue,
        backend,
    };
    let refused = |e: &dyn fmt::Debug| DeviceError::Request(format!("burn refused {}: {e:?}", report.name));
    let options = RuntimeOptions::try_default().map_err(|e| refused(&e))?;
    let wgpu_device = try_init_device(setup, options).map_err(|e| refused(&e))?;
    crate::variants::register(
        Device::from(wgpu_device.clone()),
        CubeDevice::Wgpu(wgpu_device.clone()),
        plan,
    );
    let device = Device::from(wgpu_device);
    TENSOR_LIMITS.lock().unwrap_or_else(|e| e.into_inner()).push((
        device.clone(),
        limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
    ));
    log::info!(
        "compute device: {} ({}, {}, limits: {}, kernels: {})",
        report.name,
        report.backend,
        report.device_type,
        request.limits,
        plan.family
    );
    Ok(ComputeDevice {
        device,
        adapter: Some(report),
        limits: request.limits,
        granted: Some(granted),
        plan: Some(plan),
        cpu: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experimental_and_unwanted_features_are_never_requested() {
        let offered = wgpu::Features::all();
        let requested = features_to_request(offered);
        assert!(!requested.intersects(wgpu::Features::all_experimental_mask()));
        assert!(!requested.contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS));
        assert_eq!(requested, wanted_features());
        // Each wanted feature only where offered.
        let partial = wgpu::Features::SHADER_F16 | wgpu::Features::EXPERIMENTAL_RAY_QUERY;
        assert_eq!(features_to_request(partial), wgpu::Features::SHADER_F16);
    }

    /// Opens the test adapter as the product does. Under `DIVERGEN_EXPECT_EXPERIMENTAL=1` (CI sets
    /// it for Mesa 25 lavapipe) the driver must offer experimental features, so this proves such
    /// a driver opens.
    #[test]
    fn the_adapter_opens_requesting_only_what_it_offers() {
        let mut request = DeviceRequest::from_env().unwrap_or_else(|e| panic!("{e}"));
        // Any adapter, a rasterizer included (`auto` would give lavapipe way to the CPU engine).
        request.backend.get_or_insert_with(|| "gpu".into());
        let opened = open(&request).unwrap_or_else(|e| panic!("{e}"));
        let Some(adapter) = opened.adapter else {
            assert!(!request.require_gpu, "no adapter under {ENV_REQUIRE_GPU}=1");
            return;
        };
        let experimental: Vec<&String> = adapter
            .offered_features
            .iter()
            .filter(|f| f.starts_with("EXPERIMENTAL_"))
            .collect();
        if std::env::var("DIVERGEN_EXPECT_EXPERIMENTAL").is_ok_and(|v| v == "1") {
            assert!(
                !experimental.is_empty(),
                "{} ({}) offers no experimental feature: not the driver this test is for",
                adapter.name,
                adapter.driver
            );
        }
        assert!(
            adapter
                .requested_features
                .iter()
                .all(|f| !f.starts_with("EXPERIMENTAL_"))
        );
        for f in &adapter.requested_features {
            assert!(adapter.offered_features.contains(f), "{f} requested but not offered");
        }
        eprintln!(
            "{} ({}) opened; offered {} features ({} experimental), requested {:?}",
            adapter.name,
            adapter.driver,
            adapter.offered_features.len(),
            experimental.len(),
            adapter.requested_features
        );
    }

    /// `auto` runs the best GPU adapter when there is one, and the native CPU engine when the
    /// only adapters are CPU rasterizers (the case on CI's lavapipe) or there are none; naming
    /// the API or asking for a GPU keeps the rasterizer.
    #[test]
    fn auto_gives_a_cpu_rasterizer_way_to_the_cpu_engine() {
        let auto = DeviceRequest {
            backend: None,
            adapter: None,
            require_gpu: false,
            ..DeviceRequest::from_env().unwrap_or_else(|e| panic!("{e}"))
        };
        let adapters = enumerate(&auto).unwrap_or_else(|e| panic!("{e}"));
        let opened = open(&auto).unwrap_or_else(|e| panic!("{e}"));
        if adapters.iter().any(|a| a.device_type != "Cpu") {
            let chosen = opened.adapter.expect("a GPU adapter is chosen");
            assert_ne!(chosen.device_type, "Cpu", "{} chosen over a GPU", chosen.name);
            return;
        }
        let engine = opened.cpu.clone().expect("the CPU engine runs");
        assert!(opened.adapter.is_none() && engine.threads >= 1, "{}", opened.describe());
        assert!(
            opened.describe().starts_with("native CPU engine"),
            "{}",
            opened.describe()
        );
        assert_eq!(max_tensor_bytes(&opened.device), Some(engine.max_tensor_bytes));
        if !adapters.is_empty() {
            let named = open(&DeviceRequest {
                backend: Some("vulkan".into()),
                ..auto
            })
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(named.adapter.is_some(), "--backend vulkan must keep the rasterizer");
        }
    }
}

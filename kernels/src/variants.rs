//! Which variant of each kernel a device runs, decided once when the device is opened.
//!
//! Two families exist because the two kinds of adapter reward opposite things. On a CPU
//! rasterizer (lavapipe, SwiftShader) a workgroup is a loop over SIMD lanes: barriers are
//! expensive and every lane-divergent load is a gather, so large register tiles with no
//! workgroup memory win there. On GPUs the classic techniques win: tiles staged in workgroup
//! memory, subgroup reductions, f16 arithmetic and packed int8 dot products.
//!
//! The choice is a function of what the opened device offers (adapter type, granted limits,
//! features, subgroup sizes), never of its name. `DIVERGEN_KERNELS=cpu|gpu` forces a family;
//! `DIVERGEN_VARIANT_<KERNEL>` forces one kernel, and asking for a variant the device cannot run
//! is an error naming the missing capability.

use std::fmt;
use std::sync::Mutex;

use burn::backend::wgpu::CubeTensor;
use burn::cubecl::Device as CubeDevice;
use burn::tensor::Device;
use serde::Serialize;

use crate::device::DeviceError;

/// Environment variable forcing a family: `auto` (default), `cpu` or `gpu`.
pub const ENV_KERNELS: &str = "DIVERGEN_KERNELS";

/// Workgroup memory the shared-tile GEMM/conv needs: two `BK × 128` f32 tiles (see
/// `gemm/tiled.wgsl`). WebGPU's default 16 KiB holds it, so phones qualify.
pub(crate) const SHARED_MATMUL_BYTES: u32 = 2 * 8 * 128 * 4;
/// Invocations per workgroup of the shared-tile GEMM/conv (16 × 16).
pub(crate) const SHARED_MATMUL_INVOCATIONS: u32 = 256;

/// A family of variants, as `DIVERGEN_KERNELS` or `--kernels` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFamily {
    /// The family that suits the adapter: `cpu` on CPU rasterizers, `gpu` elsewhere.
    Auto,
    /// Register tiles, workgroup-memory trees, f32 arithmetic: what lavapipe rewards.
    Cpu,
    /// Every GPU variant the device can run.
    Gpu,
}

impl std::str::FromStr for KernelFamily {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "gpu" => Ok(Self::Gpu),
            other => Err(DeviceError::BadSetting(format!(
                "{ENV_KERNELS}='{other}' is not one of: auto, cpu, gpu"
            ))),
        }
    }
}

impl fmt::Display for KernelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
        })
    }
}

/// What an opened device can run, as far as the variants care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceCaps {
    /// The adapter's device type is `Cpu` (a rasterizer running on CPU threads).
    pub cpu_adapter: bool,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub max_workgroup_shared_bytes: u32,
    pub max_invocations_per_workgroup: u32,
    /// WGSL's `packed_4x8_integer_dot_product` (`dot4I8Packed`, `pack4xI8`) is implemented.
    pub packed_dot: bool,
}

/// GEMM and convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Matmul {
    /// Each invocation a large tile in registers, no workgroup memory (`gemm/gemm.wgsl`).
    Register,
    /// 128×128 blocks staged through workgroup memory, 8×8 per invocation (`gemm/tiled.wgsl`).
    Shared,
}

/// Workgroup reductions of the norms and softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduce {
    /// A tree over workgroup memory, a barrier per level.
    Tree,
    /// `subgroupAdd`/`subgroupMax`, then one value per subgroup through workgroup memory.
    Subgroup,
}

/// Fused attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// Every invocation streams K and V itself; several queries per invocation share each load.
    Register,
    /// The workgroup stages blocks of K and V in workgroup memory, read by all its queries.
    Shared,
}

/// Quantized GEMM/GEMV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Qgemm {
    /// Weight-only: dequantized to f32 in registers, f32 activations and accumulation.
    Dequant,
    /// Activations quantized per row to int8 on the fly, `dot4I8Packed` with i32 accumulation.
    Dot4,
}

/// Arithmetic of f16 GEMMs (f16 inputs only; f32 inputs always compute in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum F16Math {
    /// f16 storage, f32 arithmetic.
    Storage,
    /// f16 products and partial sums over one K tile, added into f32 accumulators per tile.
    Math,
}

/// The variants one device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KernelPlan {
    pub family: KernelFamily,
    pub matmul: Matmul,
    pub reduce: Reduce,
    pub attention: Attention,
    pub qgemm: Qgemm,
    pub f16: F16Math,
    /// Workgroup memory the device granted, which sizes the shared attention tiles.
    pub max_workgroup_shared_bytes: u32,
    /// The adapter is a CPU rasterizer (the register tiles' sizes differ there).
    pub cpu_adapter: bool,
}

impl KernelPlan {
    /// What lavapipe rewards, and what runs on a device opened outside [`crate::device::open`].
    pub const CPU: Self = Self {
        family: KernelFamily::Cpu,
        matmul: Matmul::Register,
        reduce: Reduce::Tree,
        attention: Attention::Register,
        qgemm: Qgemm::Dequant,
        f16: F16Math::Storage,
        max_workgroup_shared_bytes: 16 * 1024,
        cpu_adapter: true,
    };

    /// The plan for `family` on a device with `caps`, before per-kernel overrides.
    pub fn choose(family: KernelFamily, caps: &DeviceCaps) -> Self {
        let family = match family {
            KernelFamily::Auto if caps.cpu_adapter => KernelFamily::Cpu,
            KernelFamily::Auto => KernelFamily::Gpu,
            other => other,
        };
        let base = Self {
            max_workgroup_shared_bytes: caps.max_workgroup_shared_bytes,
            cpu_adapter: caps.cpu_adapter,
            ..Self::CPU
        };
        if family == KernelFamily::Cpu {
            return base;
        }
        Self {
            family,
            matmul: if shared_matmul_fits(caps) {
                Matmul::Shared
            } else {
                Matmul::Register
            },
            reduce: if subgroups_usable(caps) {
                Reduce::Subgroup
            } else {
                Reduce::Tree
            },
            attention: if shared_attention_fits(caps) {
                Attention::Shared
            } else {
                Attention::Register
            },
            qgemm: if caps.packed_dot { Qgemm::Dot4 } else { Qgemm::Dequant },
            f16: if caps.shader_f16 {
                F16Math::Math
            } else {
                F16Math::Storage
            },
            ..base
        }
    }

    /// Applies `DIVERGEN_VARIANT_<KERNEL>` overrides from `lookup` (the environment in use).
    pub fn with_overrides(
        mut self,
        caps: &DeviceCaps,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, DeviceError> {
        let var = |kernel: &str| {
            let name = format!("DIVERGEN_VARIANT_{kernel}");
            lookup(&name)
                .map(|v| v.trim().to_ascii_lowercase())
                .filter(|v| !v.is_empty())
                .map(|v| (name, v))
        };
        let bad = |name: &str, value: &str, allowed: &str| {
            DeviceError::BadSetting(format!("{name}='{value}' is not one of: {allowed}"))
        };
        let missing = |name: &str, value: &str, what: &str| {
            DeviceError::BadSetting(format!("{name}={value} needs {what}, which this device does not offer"))
        };
        if let Some((name, v)) = var("MATMUL") {
            self.matmul = match v.as_str() {
                "register" => Matmul::Register,
                "shared" if shared_matmul_fits(caps) => Matmul::Shared,
                "shared" => {
                    return Err(missing(
                        &name,
                        &v,
                        &format!(
                            "{SHARED_MATMUL_BYTES} bytes of workgroup memory and {SHARED_MATMUL_INVOCATIONS} invocations"
                        ),
                    ));
                }
                _ => return Err(bad(&name, &v, "register, shared")),
            };
        }
        if let Some((name, v)) = var("REDUCE") {
            self.reduce = match v.as_str() {
                "tree" => Reduce::Tree,
                "subgroup" if subgroups_usable(caps) => Reduce::Subgroup,
                "subgroup" => return Err(missing(&name, &v, "subgroup operations")),
                _ => return Err(bad(&name, &v, "tree, subgroup")),
            };
        }
        if let Some((name, v)) = var("ATTENTION") {
            self.attention = match v.as_str() {
                "register" => Attention::Register,
                "shared" if shared_attention_fits(caps) => Attention::Shared,
                "shared" => return Err(missing(&name, &v, "8 KiB of workgroup memory")),
                _ => return Err(bad(&name, &v, "register, shared")),
            };
        }
        if let Some((name, v)) = var("QGEMM") {
            self.qgemm = match v.as_str() {
                "dequant" => Qgemm::Dequant,
                "dot4" if caps.packed_dot => Qgemm::Dot4,
                "dot4" => return Err(missing(&name, &v, "WGSL's packed_4x8_integer_dot_product")),
                _ => return Err(bad(&name, &v, "dequant, dot4")),
            };
        }
        if let Some((name, v)) = var("F16") {
            self.f16 = match v.as_str() {
                "storage" => F16Math::Storage,
                "math" if caps.shader_f16 => F16Math::Math,
                "math" => return Err(missing(&name, &v, "shader-f16")),
                _ => return Err(bad(&name, &v, "storage, math")),
            };
        }
        Ok(self)
    }

    /// Keys of a shared attention tile for head width `d`: as many as fit twice (K and V) in the
    /// granted workgroup memory, a power of two from 8 to 64.
    pub(crate) fn attention_keys_per_tile(&self, d: usize) -> u32 {
        let fit = self.max_workgroup_shared_bytes as usize / (2 * d.max(4) * 4);
        let mut keys = 8u32;
        while keys < 64 && (keys as usize * 2) <= fit {
            keys *= 2;
        }
        keys
    }
}

fn shared_matmul_fits(caps: &DeviceCaps) -> bool {
    caps.max_workgroup_shared_bytes >= SHARED_MATMUL_BYTES
        && caps.max_invocations_per_workgroup >= SHARED_MATMUL_INVOCATIONS
}

fn shared_attention_fits(caps: &DeviceCaps) -> bool {
    // The smallest tile: 8 keys of K and V at the widest head (256).
    caps.max_workgroup_shared_bytes as usize >= 2 * 8 * crate::attention::MAX_HEAD_DIM * 4
}

fn subgroups_usable(caps: &DeviceCaps) -> bool {
    // The reductions keep one partial per subgroup in a workgroup-sized array, which holds for
    // any size ≥ 1; size 0 means the driver reported none.
    caps.subgroups && caps.subgroup_min_size >= 1
}

/// Plans of the devices opened here, with the burn device and the cubecl device each is known by.
static PLANS: Mutex<Vec<(Device, CubeDevice, KernelPlan)>> = Mutex::new(Vec::new());

pub(crate) fn register(device: Device, cube: CubeDevice, plan: KernelPlan) {
    PLANS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((device, cube, plan));
}

fn find_plan(matches: impl Fn(&Device, &CubeDevice) -> bool) -> Option<KernelPlan> {
    PLANS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(d, c, _)| matches(d, c))
        .map(|(_, _, p)| *p)
}

/// The plan of a device opened by [`crate::device::open`]; `None` for burn's own devices and the
/// CPU backend.
pub fn plan_of(device: &Device) -> Option<KernelPlan> {
    find_plan(|d, _| d == device)
}

/// The plan a launch on `t`'s device follows. A device burn opened itself was never inspected:
/// it gets the register family, which runs on every adapter within WebGPU's default limits.
pub(crate) fn plan_for(t: &CubeTensor) -> KernelPlan {
    find_plan(|_, c| *c == t.device).unwrap_or(KernelPlan::CPU)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: DeviceCaps = DeviceCaps {
        cpu_adapter: false,
        shader_f16: true,
        subgroups: true,
        subgroup_min_size: 32,
        subgroup_max_size: 32,
        max_workgroup_shared_bytes: 49_152,
        max_invocations_per_workgroup: 1024,
        packed_dot: true,
    };

    #[test]
    fn auto_picks_the_family_from_the_adapter_type() {
        let lavapipe = DeviceCaps {
            cpu_adapter: true,
            subgroup_min_size: 8,
            subgroup_max_size: 8,
            ..GPU
        };
        assert_eq!(
            KernelPlan::choose(KernelFamily::Auto, &lavapipe).matmul,
            Matmul::Register
        );
        let gpu = KernelPlan::choose(KernelFamily::Auto, &GPU);
        assert_eq!(
            (gpu.family, gpu.matmul, gpu.reduce, gpu.attention, gpu.qgemm, gpu.f16),
            (
                KernelFamily::Gpu,
                Matmul::Shared,
                Reduce::Subgroup,
                Attention::Shared,
                Qgemm::Dot4,
                F16Math::Math
            )
        );
        assert_eq!(KernelPlan::choose(KernelFamily::Gpu, &lavapipe).matmul, Matmul::Shared);
    }

    #[test]
    fn each_variant_needs_its_capability() {
        let bare = DeviceCaps {
            shader_f16: false,
            subgroups: false,
            subgroup_min_size: 0,
            max_workgroup_shared_bytes: 4096,
            max_invocations_per_workgroup: 128,
            packed_dot: false,
            ..GPU
        };
        let plan = KernelPlan::choose(KernelFamily::Gpu, &bare);
        assert_eq!(
            (plan.matmul, plan.reduce, plan.attention, plan.qgemm, plan.f16),
            (
                Matmul::Register,
                Reduce::Tree,
                Attention::Register,
                Qgemm::Dequant,
                F16Math::Storage
            )
        );
        for (var, value) in [
            ("DIVERGEN_VARIANT_MATMUL", "shared"),
            ("DIVERGEN_VARIANT_REDUCE", "subgroup"),
            ("DIVERGEN_VARIANT_ATTENTION", "shared"),
            ("DIVERGEN_VARIANT_QGEMM", "dot4"),
            ("DIVERGEN_VARIANT_F16", "math"),
        ] {
            let err = plan
                .with_overrides(&bare, |k| (k == var).then(|| value.to_string()))
                .expect_err(var);
            assert!(err.to_string().contains(var), "{err}");
        }
        let err = plan
            .with_overrides(&bare, |k| (k == "DIVERGEN_VARIANT_REDUCE").then(|| "fast".into()))
            .expect_err("bad value");
        assert!(err.to_string().contains("tree, subgroup"), "{err}");
    }

    #[test]
    fn overrides_replace_single_kernels() {
        let plan = KernelPlan::choose(KernelFamily::Auto, &GPU)
            .with_overrides(&GPU, |k| (k == "DIVERGEN_VARIANT_QGEMM").then(|| "dequant".into()))
            .expect("valid override");
        assert_eq!((plan.qgemm, plan.matmul), (Qgemm::Dequant, Matmul::Shared));
    }

    #[test]
    fn attention_tiles_fit_the_granted_memory() {
        let plan = KernelPlan::choose(KernelFamily::Gpu, &GPU);
        assert_eq!(plan.attention_keys_per_tile(64), 64);
        let mobile = KernelPlan {
            max_workgroup_shared_bytes: 16_384,
            ..plan
        };
        assert_eq!(mobile.attention_keys_per_tile(64), 32);
        assert_eq!(mobile.attention_keys_per_tile(256), 8);
        for d in [4, 64, 128, 256] {
            assert!(2 * mobile.attention_keys_per_tile(d) as usize * d * 4 <= 16_384);
        }
    }
}

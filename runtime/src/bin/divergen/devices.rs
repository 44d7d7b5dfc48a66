//! `divergen devices`: what the device layer sees and what it would choose.

use divergen_kernels::device::{AdapterReport, DeviceRequest, GrantedLimits, enumerate, open};
use divergen_kernels::engine::CpuEngine;
use divergen_kernels::variants::KernelPlan;
use divergen_runtime::Result;
use serde::Serialize;

#[derive(Serialize)]
struct Report {
    adapters: Vec<AdapterReport>,
    /// Index into `adapters`, or `null` when the CPU engine is used.
    chosen: Option<usize>,
    backend: String,
    limits: String,
    granted: Option<GrantedLimits>,
    /// The kernel variants the chosen device runs.
    kernels: Option<KernelPlan>,
    /// The native CPU engine: always available, chosen when `chosen` is null.
    cpu_engine: CpuEngine,
}

pub fn run(request: &DeviceRequest, json: bool) -> Result<()> {
    let adapters = enumerate(request)?;
    let chosen = open(request)?;
    let report = Report {
        adapters,
        chosen: chosen.adapter.as_ref().map(|a| a.index),
        backend: chosen.describe(),
        limits: chosen.limits.to_string(),
        granted: chosen.granted,
        kernels: chosen.plan,
        cpu_engine: chosen
            .cpu
            .clone()
            .unwrap_or_else(|| divergen_kernels::engine::start(request.threads)),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if report.adapters.is_empty() {
        println!("no Vulkan, Metal or DX12 adapter found");
    }
    for a in &report.adapters {
        let mark = if Some(a.index) == report.chosen { "*" } else { " " };
        println!(
            "{mark} [{}] {} — {} {} ({})",
            a.index, a.name, a.backend, a.device_type, a.driver
        );
        println!(
            "      max storage binding {} MiB, buffer {} MiB, {} invocations/workgroup, {} KiB shared",
            a.max_storage_binding_bytes >> 20,
            a.max_buffer_bytes >> 20,
            a.max_invocations_per_workgroup,
            a.max_workgroup_shared_bytes >> 10
        );
        println!(
            "      shader-f16 {}, subgroups {} (size {}–{})",
            yes(a.shader_f16),
            yes(a.subgroups),
            a.subgroup_min_size,
            a.subgroup_max_size
        );
        println!("      offered features: {}", a.offered_features.join(", "));
        println!("      requested: {}", a.requested_features.join(", "));
    }
    let e = &report.cpu_engine;
    let mark = if report.chosen.is_none() { "*" } else { " " };
    println!(
        "{mark} native CPU engine — {}, {} threads, tensors up to {} MiB",
        e.isa,
        e.threads,
        e.max_tensor_bytes >> 20
    );
    println!("using: {}", report.backend);
    if let Some(g) = report.granted {
        println!(
            "granted limits: storage binding {} MiB, {} invocations/workgroup, {} KiB shared",
            g.max_storage_binding_bytes >> 20,
            g.max_invocations_per_workgroup,
            g.max_workgroup_shared_bytes >> 10
        );
    }
    if let Some(p) = report.kernels {
        println!(
            "kernels: {} family — matmul {:?}, reductions {:?}, attention {:?}, quantized {:?}, f16 {:?}",
            p.family, p.matmul, p.reduce, p.attention, p.qgemm, p.f16
        );
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

//! The native CPU engine: burn's Flex backend for tensor plumbing, with every [`crate::DivergenKernels`]
//! op running its production CPU kernel (`<op>/cpu.rs`) on one rayon pool sized to the cores.
//! It is the default wherever the only adapters are CPU rasterizers (lavapipe, SwiftShader): the
//! same cores run it several times faster than they run our WGSL through a rasterizer.

use std::sync::OnceLock;

use serde::Serialize;

/// What the CPU engine runs on, as `divergen devices` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct CpuEngine {
    /// The widest instruction set the GEMM micro-kernels use on this CPU.
    pub isa: &'static str,
    pub threads: usize,
    /// The largest tensor the engine accepts (an eighth of the machine's memory), so one
    /// oversized request is refused up front instead of exhausting memory part-way through.
    pub max_tensor_bytes: u64,
}

/// The widest ISA the `gemm` crate's run-time dispatch picks here.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return if std::arch::is_x86_feature_detected!("avx512vnni") {
                "AVX-512 (with VNNI)"
            } else {
                "AVX-512"
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "AVX2 + FMA";
        }
        "SSE2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "portable"
    }
}

fn total_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts the engine's pool once: `threads` (the CLI's `--threads`), else `RAYON_NUM_THREADS`,
/// else one thread per core. Later calls return the first call's engine.
pub fn start(threads: Option<usize>) -> CpuEngine {
    static ENGINE: OnceLock<CpuEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("divergen-cpu-{i}"));
            if let Some(n) = threads.filter(|&n| n > 0) {
                pool = pool.num_threads(n);
            }
            // Fails only if a pool was built already (by a dependency): that pool is then ours.
            if let Err(e) = pool.build_global() {
                log::debug!("CPU engine: using the existing rayon pool ({e})");
            }
            keep_freed_memory();
            CpuEngine {
                isa: isa(),
                threads: rayon::current_num_threads(),
                max_tensor_bytes: total_memory_bytes().map_or(2 << 30, |m| m / 8),
            }
        })
        .clone()
}

/// glibc serves every allocation above 32 MiB (often above 128 KiB) with its own `mmap` and
/// unmaps it on free, so each op's output (64 MiB for TAESD's 512² activations) came back as
/// fresh pages, one fault per 4 KiB: a quarter of TAESD's decode time here. Raising the mmap and
/// trim thresholds keeps freed buffers in the heap for the next op, as ONNX Runtime's arena
/// does; resident memory then stays at its high-water mark, which is what the benchmarks report.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only sets allocator parameters; no allocation is in flight in this
        // call, and glibc applies the values to later allocations.
        let (mmap, trim) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD),
                libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD),
            )
        };
        log::debug!(
            "CPU engine: malloc mmap threshold set: {}, trim threshold set: {}",
            mmap == 1,
            trim == 1
        );
    }
}

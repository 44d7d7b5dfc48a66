//! Launch shapes, chosen by `divergen bench kernels` sweeps (see kernels/BENCHMARKS.md).
//!
//! Every shape stays within WebGPU's default limits (≤ 256 invocations, no workgroup memory
//! beyond 1 KiB), so the same choice is valid on phones and is what `--limits mobile` tests.
//! `DIVERGEN_TILE_<KERNEL>=tm,wg_x,wg_y[,tnv]` overrides a choice for tuning experiments.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tile {
    /// Rows (or output channels) each invocation owns.
    pub tm: u32,
    /// Column vec4s each invocation owns (GEMM only: TN = 4·tnv).
    pub tnv: u32,
    pub wg_x: u32,
    pub wg_y: u32,
}

fn parse(var: &str) -> Option<Tile> {
    let v = std::env::var(var).ok()?;
    let parts: Vec<u32> = v.split(',').filter_map(|p| p.trim().parse().ok()).collect();
    match parts[..] {
        [tm, wg_x, wg_y] if tm > 0 && wg_x > 0 && wg_y > 0 && wg_x * wg_y <= 256 => {
            Some(Tile { tm, tnv: 1, wg_x, wg_y })
        }
        [tm, wg_x, wg_y, tnv] if tm > 0 && tnv > 0 && wg_x > 0 && wg_y > 0 && wg_x * wg_y <= 256 => {
            Some(Tile { tm, tnv, wg_x, wg_y })
        }
        _ => {
            log::warn!("{var}='{v}' is not 'tm,wg_x,wg_y[,tnv]' with wg_x·wg_y ≤ 256; ignored");
            None
        }
    }
}

fn cached(cell: &'static OnceLock<Option<Tile>>, var: &str) -> Option<Tile> {
    *cell.get_or_init(|| parse(var))
}

/// Whether a launch goes to a CPU rasterizer (see [`crate::device::runs_on_cpu`]).
pub(crate) fn on_cpu(client: &burn::cubecl::client::Client) -> bool {
    crate::device::runs_on_cpu(&client.properties().identity.name)
}

const fn tile(tm: u32, tnv: u32, wg_x: u32, wg_y: u32) -> Tile {
    Tile { tm, tnv, wg_x, wg_y }
}

impl Tile {
    /// GEMM. On lavapipe every lane-divergent load is a loop over 8 lanes, so the largest tile
    /// measured fastest (16×32: 26.5 GFLOP/s at 512³ quiet, against 4.4 for a 4×4 tile); on GPUs 8×8 keeps the
    /// 64 accumulators in registers.
    pub(crate) fn gemm(m: usize, cpu: bool) -> Tile {
        static GEMM: OnceLock<Option<Tile>> = OnceLock::new();
        static GEMV: OnceLock<Option<Tile>> = OnceLock::new();
        if m <= 2 {
            let default = if cpu { tile(1, 2, 64, 1) } else { tile(1, 1, 64, 1) };
            cached(&GEMV, "DIVERGEN_TILE_GEMV").unwrap_or(default)
        } else {
            let default = if cpu { tile(16, 8, 8, 4) } else { tile(8, 2, 8, 8) };
            cached(&GEMM, "DIVERGEN_TILE_GEMM").unwrap_or(default)
        }
    }

    pub(crate) fn qgemm(m: usize, cpu: bool) -> Tile {
        static QGEMM: OnceLock<Option<Tile>> = OnceLock::new();
        static QGEMV: OnceLock<Option<Tile>> = OnceLock::new();
        if m <= 2 {
            let default = if cpu { tile(1, 2, 64, 1) } else { tile(1, 1, 64, 1) };
            cached(&QGEMV, "DIVERGEN_TILE_QGEMV").unwrap_or(default)
        } else {
            let default = if cpu { tile(16, 4, 8, 4) } else { tile(8, 2, 8, 8) };
            cached(&QGEMM, "DIVERGEN_TILE_QGEMM").unwrap_or(default)
        }
    }

    /// Convolution: `tm` output channels × `4·tnv` output pixels per invocation. On lavapipe
    /// 16 × 32 with an 8×2 workgroup ran 3×3 128→128 at 14 GFLOP/s, against 3.7 for 4 × 4.
    pub(crate) fn conv(cpu: bool) -> Tile {
        static CONV: OnceLock<Option<Tile>> = OnceLock::new();
        let default = if cpu { tile(16, 8, 8, 2) } else { tile(4, 2, 8, 8) };
        cached(&CONV, "DIVERGEN_TILE_CONV").unwrap_or(default)
    }

    /// Attention: `tm` keys per online-softmax block, `tnv` query rows per invocation. On
    /// lavapipe 8 queries × 8 keys ran seq 1024 in 124 ms against 184 ms for 4 × 8.
    pub(crate) fn attention(cpu: bool) -> Tile {
        static ATTN: OnceLock<Option<Tile>> = OnceLock::new();
        let default = if cpu { tile(8, 8, 16, 1) } else { tile(8, 1, 64, 1) };
        cached(&ATTN, "DIVERGEN_TILE_ATTENTION").unwrap_or(default)
    }
}

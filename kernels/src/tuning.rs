//! Launch shapes, chosen by `divergen bench kernels` sweeps (see kernels/BENCHMARKS.md).
//!
//! Every shape stays within WebGPU's default limits (≤ 256 invocations, no workgroup memory
//! beyond 1 KiB), so the same choice is valid on phones and is what `--limits mobile` tests.
//! `DIVERGEN_TILE_<KERNEL>=tm,wg_x,wg_y` overrides a choice for tuning experiments.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tile {
    /// Rows (or output channels) each invocation owns.
    pub tm: u32,
    pub wg_x: u32,
    pub wg_y: u32,
}

fn parse(var: &str) -> Option<Tile> {
    let v = std::env::var(var).ok()?;
    let parts: Vec<u32> = v.split(',').filter_map(|p| p.trim().parse().ok()).collect();
    match parts[..] {
        [tm, wg_x, wg_y] if tm > 0 && wg_x > 0 && wg_y > 0 && wg_x * wg_y <= 256 => Some(Tile { tm, wg_x, wg_y }),
        _ => {
            log::warn!("{var}='{v}' is not 'tm,wg_x,wg_y' with wg_x·wg_y ≤ 256; ignored");
            None
        }
    }
}

fn cached(cell: &'static OnceLock<Option<Tile>>, var: &str) -> Option<Tile> {
    *cell.get_or_init(|| parse(var))
}

impl Tile {
    pub(crate) fn gemm(m: usize) -> Tile {
        static GEMM: OnceLock<Option<Tile>> = OnceLock::new();
        static GEMV: OnceLock<Option<Tile>> = OnceLock::new();
        if m <= 2 {
            cached(&GEMV, "DIVERGEN_TILE_GEMV").unwrap_or(Tile {
                tm: 1,
                wg_x: 64,
                wg_y: 1,
            })
        } else {
            cached(&GEMM, "DIVERGEN_TILE_GEMM").unwrap_or(Tile {
                tm: 4,
                wg_x: 8,
                wg_y: 8,
            })
        }
    }

    pub(crate) fn qgemm(m: usize) -> Tile {
        static QGEMM: OnceLock<Option<Tile>> = OnceLock::new();
        static QGEMV: OnceLock<Option<Tile>> = OnceLock::new();
        if m <= 2 {
            cached(&QGEMV, "DIVERGEN_TILE_QGEMV").unwrap_or(Tile {
                tm: 1,
                wg_x: 64,
                wg_y: 1,
            })
        } else {
            cached(&QGEMM, "DIVERGEN_TILE_QGEMM").unwrap_or(Tile {
                tm: 4,
                wg_x: 8,
                wg_y: 8,
            })
        }
    }

    pub(crate) fn conv() -> Tile {
        static CONV: OnceLock<Option<Tile>> = OnceLock::new();
        cached(&CONV, "DIVERGEN_TILE_CONV").unwrap_or(Tile {
            tm: 4,
            wg_x: 8,
            wg_y: 8,
        })
    }

    /// Attention: `tm` is the number of keys scored per online-softmax block.
    pub(crate) fn attention() -> Tile {
        static ATTN: OnceLock<Option<Tile>> = OnceLock::new();
        cached(&ATTN, "DIVERGEN_TILE_ATTENTION").unwrap_or(Tile {
            tm: 8,
            wg_x: 64,
            wg_y: 1,
        })
    }
}

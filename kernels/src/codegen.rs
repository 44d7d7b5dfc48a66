//! Helpers for the launchers that generate unrolled WGSL (register tiles as named variables).

/// Component names of a vec4, in order.
pub(crate) const LANES: [&str; 4] = ["x", "y", "z", "w"];

/// `vec4<f32>(f(j0), f(j0 + 1), f(j0 + 2), f(j0 + 3))`: four adjacent columns of a tile.
pub(crate) fn vec4_of(j0: u32, f: impl Fn(u32) -> String) -> String {
    format!("vec4<f32>({}, {}, {}, {})", f(j0), f(j0 + 1), f(j0 + 2), f(j0 + 3))
}

// Element-wise activations; the grid folds into x and y for tensors past 65,535 workgroups.
// T is vec4<f32> when the length allows (a quarter of the invocations and loads), else f32.
alias T = {{ ty }};
struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<T>;
@group(0) @binding(1) var<storage, read_write> y: array<T>;
@group(0) @binding(2) var<storage, read_write> p: Params;

// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7); WGSL has no erf.
fn erf(v: T) -> T {
    let t = 1.0 / (1.0 + 0.3275911 * abs(v));
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return sign(v) * (1.0 - poly * exp(-v * v));
}

fn silu(v: T) -> T {
    return v / (1.0 + exp(-v));
}

fn quick_gelu(v: T) -> T {
    return v / (1.0 + exp(-1.702 * v));
}

fn gelu_erf(v: T) -> T {
    return 0.5 * v * (1.0 + erf(v * 0.70710678118654752));
}

// tanh saturates to ±1 long before |u| = 10; clamping keeps drivers that build tanh from exp
// away from inf/inf.
fn gelu_tanh(v: T) -> T {
    let u = clamp(0.7978845608028654 * (v + 0.044715 * v * v * v), T(-10.0), T(10.0));
    return 0.5 * v * (1.0 + tanh(u));
}

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * groups.x) * {{ wg_x }}u + lid;
    if (i < p.len) {
        y[i] = {{ op }}(x[i]);
    }
}

// Group norm over NC(spatial) input, one workgroup per (sample, group), optionally fused with SiLU
// (the UNet/VAE ResNet block does norm → SiLU back to back: fusing saves a full read and write).
// A group's channels are contiguous in memory, so it is one run of (C/G)·spatial values.
// Two passes (mean, then variance of the centred values) to avoid E[x²]−E[x]² cancellation.
// T is vec4<f32> when the spatial size is a multiple of 4 (the four then share a channel), so
// each invocation moves a quarter of the loads; else f32.
alias T = {{ ty }};
const W: u32 = {{ width }}u;

fn hsum(v: T) -> f32 {
    return {{ hsum }};
}
struct Params {
    channels: u32,
    spatial: u32,
    groups: u32,
    eps_bits: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<T>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;
@group(0) @binding(4) var<storage, read_write> p: Params;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
{{ reduce_builtins }}
) {
{{ reduce_init }}
    let per_group = p.channels / p.groups;
    let len = per_group * p.spatial / W;
    let base = wid.x * len;
    let group = wid.x % p.groups;

    var sum = 0.0;
    for (var i = lid; i < len; i += {{ wg_x }}u) {
        sum += hsum(x[base + i]);
    }
    let count = f32(len * W);
    let mean = reduce_sum(sum, lid) / count;
    var sq = 0.0;
    for (var i = lid; i < len; i += {{ wg_x }}u) {
        let d = x[base + i] - T(mean);
        sq += hsum(d * d);
    }
    let rstd = inverseSqrt(reduce_sum(sq, lid) / count + bitcast<f32>(p.eps_bits));

    for (var i = lid; i < len; i += {{ wg_x }}u) {
        let ch = group * per_group + (i * W) / p.spatial;
        var v = (x[base + i] - T(mean)) * (rstd * gamma[ch]) + T(beta[ch]);
{{ activation }}
        y[base + i] = v;
    }
}

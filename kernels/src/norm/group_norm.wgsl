// Group norm over NC(spatial) input, one workgroup per (sample, group), optionally fused with SiLU
// (the UNet/VAE ResNet block does norm → SiLU back to back: fusing saves a full read and write).
// A group's channels are contiguous in memory, so it is one run of (C/G)·spatial values.
// Two passes (mean, then variance of the centred values) to avoid E[x²]−E[x]² cancellation.
struct Params {
    channels: u32,
    spatial: u32,
    groups: u32,
    eps_bits: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> p: Params;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let per_group = p.channels / p.groups;
    let len = per_group * p.spatial;
    let base = wid.x * len;
    let group = wid.x % p.groups;

    var sum = 0.0;
    for (var i = lid; i < len; i += {{ wg_x }}u) {
        sum += x[base + i];
    }
    let mean = reduce_sum(sum, lid) / f32(len);
    var sq = 0.0;
    for (var i = lid; i < len; i += {{ wg_x }}u) {
        let d = x[base + i] - mean;
        sq += d * d;
    }
    let rstd = inverseSqrt(reduce_sum(sq, lid) / f32(len) + bitcast<f32>(p.eps_bits));

    for (var i = lid; i < len; i += {{ wg_x }}u) {
        let ch = group * per_group + i / p.spatial;
        var v = (x[base + i] - mean) * rstd * gamma[ch] + beta[ch];
{{ activation }}
        y[base + i] = v;
    }
}

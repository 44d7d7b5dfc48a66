// Layer norm over the last dimension, one workgroup per row (rows fold into x and y).
struct Params {
    rows: u32,
    dim: u32,
    eps_bits: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> p: Params;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
{{ reduce_builtins }}
) {
{{ reduce_init }}
    // Folded grids can overshoot: spare workgroups redo the last row but write nothing, so
    // every invocation still reaches every barrier.
    let valid = wid.x + wid.y * groups.x < p.rows;
    let row = min(wid.x + wid.y * groups.x, p.rows - 1u);
    let base = row * p.dim;
    var sum = 0.0;
    for (var i = lid; i < p.dim; i += {{ wg_x }}u) {
        sum += x[base + i];
    }
    let mean = reduce_sum(sum, lid) / f32(p.dim);
    var sq = 0.0;
    for (var i = lid; i < p.dim; i += {{ wg_x }}u) {
        let d = x[base + i] - mean;
        sq += d * d;
    }
    let rstd = inverseSqrt(reduce_sum(sq, lid) / f32(p.dim) + bitcast<f32>(p.eps_bits));
    if (valid) {
        for (var i = lid; i < p.dim; i += {{ wg_x }}u) {
            y[base + i] = (x[base + i] - mean) * rstd * gamma[i] + beta[i];
        }
    }
}

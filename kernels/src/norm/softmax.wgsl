// Softmax over the last dimension, one workgroup per row; the row maximum is subtracted first
// so exp never overflows.
struct Params {
    rows: u32,
    dim: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> p: Params;

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
    var mx = -3.0e38;
    for (var i = lid; i < p.dim; i += {{ wg_x }}u) {
        mx = max(mx, x[base + i]);
    }
    mx = reduce_max(mx, lid);
    var sum = 0.0;
    for (var i = lid; i < p.dim; i += {{ wg_x }}u) {
        sum += exp(x[base + i] - mx);
    }
    let inv = 1.0 / reduce_sum(sum, lid);
    if (valid) {
        for (var i = lid; i < p.dim; i += {{ wg_x }}u) {
            y[base + i] = exp(x[base + i] - mx) * inv;
        }
    }
}

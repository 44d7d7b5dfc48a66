// Dynamic int8 quantization of activations for the packed-dot product (qgemm_dot4.wgsl): one
// workgroup per row finds max|x|, then packs round(x / scale) four to a word with
// scale = max|x| / 127 (1 for an all-zero row). Words past K are zero, so the row is padded to
// whatever the weight layout needs (`words_per_row`).
struct Params {
    rows: u32,
    k: u32,
    words_per_row: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> xq: array<u32>;
@group(0) @binding(2) var<storage, read_write> xs: array<f32>;
@group(0) @binding(3) var<storage, read_write> p: Params;

fn quantize(v: f32, scale: f32) -> i32 {
    return i32(clamp(round(v / scale), -127.0, 127.0));
}

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
    let base = row * p.k;
    var mx = 0.0;
    for (var i = lid; i < p.k; i += {{ wg_x }}u) {
        mx = max(mx, abs(x[base + i]));
    }
    mx = reduce_max(mx, lid);
    let scale = select(mx / 127.0, 1.0, mx == 0.0);
    if (valid) {
        for (var wi = lid; wi < p.words_per_row; wi += {{ wg_x }}u) {
            var q = vec4<i32>(0);
            for (var e = 0u; e < 4u; e++) {
                let kk = wi * 4u + e;
                if (kk < p.k) {
                    q[e] = quantize(x[base + kk], scale);
                }
            }
            xq[row * p.words_per_row + wi] = pack4xI8(q);
        }
        if (lid == 0u) {
            xs[row] = scale;
        }
    }
}

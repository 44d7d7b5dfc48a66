// Fused attention for GPUs: attention.wgsl's online softmax, with K and V staged through
// workgroup memory KT keys at a time. Each key vector is read from device memory once per
// workgroup instead of once per invocation, and the invocations then read it as a broadcast.
// KT is sized from the granted workgroup memory (attention/mod.rs). Invocations past the last
// query still stage keys and reach every barrier; their results are not stored.
struct Params {
    sq: u32,
    skv: u32,
    scale_bits: u32,
    // Key grid width of the relative-position bias (unused without one).
    kw: u32,
}

@group(0) @binding(0) var<storage, read_write> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> p: Params;
{{ bias_bindings }}
const D4: u32 = {{ d4 }}u;
const KB: u32 = {{ kb }}u;
const KT: u32 = {{ kt }}u;
const TQ: u32 = {{ tq }}u;
const WG: u32 = {{ wg_x }}u;
// Finite stand-in for -inf: exp(NEG - finite) is 0 without producing inf - inf = NaN.
const NEG: f32 = -3.0e38;

var<workgroup> ks: array<vec4<f32>, {{ tile_len }}>;
var<workgroup> vs: array<vec4<f32>, {{ tile_len }}>;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wid.x * WG + lid.x) * TQ;
    let head = wid.y;
    let scale = bitcast<f32>(p.scale_bits);
    let kv_base = head * p.skv * D4;
{{ decls }}
    for (var t0 = 0u; t0 < p.skv; t0 += KT) {
        // Keys past the end repeat the last one: the scores mask them, and they stay finite.
        for (var i = li; i < KT * D4; i += WG) {
            let key = min(t0 + i / D4, p.skv - 1u);
            ks[i] = k[kv_base + key * D4 + i % D4];
            vs[i] = v[kv_base + key * D4 + i % D4];
        }
        workgroupBarrier();
        let t_end = min(t0 + KT, p.skv);
        for (var j0 = t0; j0 < t_end; j0 += KB) {
{{ body }}
        }
        // Nobody may restage the tile while another invocation still reads it.
        workgroupBarrier();
    }
{{ store }}
}

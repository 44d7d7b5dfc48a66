// Fused attention O = softmax(Q·Kᵀ·scale)·V with an online softmax (FlashAttention's recurrence):
// the seq×seq score matrix never exists, so memory grows linearly in sequence length.
//
// One invocation owns one query row: its scaled query and output accumulator live in registers.
// All invocations of a workgroup walk the same keys in lock-step, so K and V loads are uniform
// across SIMD lanes. Scores are taken KB keys at a time so the accumulator is rescaled once per
// block rather than once per key.
struct Params {
    sq: u32,
    skv: u32,
    scale_bits: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read_write> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> p: Params;

const D4: u32 = {{ d4 }}u;
const KB: u32 = {{ kb }}u;
// Finite stand-in for -inf: exp(NEG - finite) is 0 without producing inf - inf = NaN.
const NEG: f32 = -3.0e38;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.x * {{ wg_x }}u + lid.x;
    if (row >= p.sq) {
        return;
    }
    let head = wid.y;
    let scale = bitcast<f32>(p.scale_bits);
    let q_base = (head * p.sq + row) * D4;
    let kv_base = head * p.skv * D4;

    var qv: array<vec4<f32>, D4>;
    var acc: array<vec4<f32>, D4>;
    for (var d = 0u; d < D4; d++) {
        qv[d] = q[q_base + d] * scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;
    for (var j0 = 0u; j0 < p.skv; j0 += KB) {
        var s: array<f32, KB>;
        var block_max = m;
        for (var t = 0u; t < KB; t++) {
            let j = min(j0 + t, p.skv - 1u);
            let kb = kv_base + j * D4;
            var dv = vec4<f32>(0.0);
            for (var d = 0u; d < D4; d++) {
                dv = fma(qv[d], k[kb + d], dv);
            }
            let score = select(NEG, dv.x + dv.y + dv.z + dv.w, j0 + t < p.skv);
            s[t] = score;
            block_max = max(block_max, score);
        }
        let correction = exp(m - block_max);
        l *= correction;
        for (var d = 0u; d < D4; d++) {
            acc[d] *= correction;
        }
        for (var t = 0u; t < KB; t++) {
            let j = min(j0 + t, p.skv - 1u);
            let vb = kv_base + j * D4;
            let pt = exp(s[t] - block_max);
            l += pt;
            for (var d = 0u; d < D4; d++) {
                acc[d] = fma(vec4<f32>(pt), v[vb + d], acc[d]);
            }
        }
        m = block_max;
    }
    let inv = 1.0 / l;
    for (var d = 0u; d < D4; d++) {
        o[q_base + d] = acc[d] * inv;
    }
}

// Fused attention O = softmax(Q·Kᵀ·scale)·V with an online softmax (FlashAttention's recurrence):
// the seq×seq score matrix never exists, so memory grows linearly in sequence length.
//
// One invocation owns TQ query rows: their scaled queries and output accumulators live in
// registers, and each K and V vector loaded serves all TQ of them (on lavapipe a load is a loop
// over SIMD lanes, so this reuse is what pays; on GPUs TQ = 1 keeps registers for occupancy).
// Scores are taken KB keys at a time so accumulators are rescaled once per block, not per key.
// The body is generated fully unrolled (attention/mod.rs) over TQ, KB and the head dimension.
//
// Optionally each score gains a decomposed relative-position bias (SAM's ViT, after MViTv2):
// keys form a KH×KW grid and score(i, j) += bias_h[i, j / KW] + bias_w[i, j % KW], so the bias is
// O(Sq·(KH+KW)) in memory, never O(Sq·Skv).
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
const TQ: u32 = {{ tq }}u;
// Finite stand-in for -inf: exp(NEG - finite) is 0 without producing inf - inf = NaN.
const NEG: f32 = -3.0e38;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = (wid.x * {{ wg_x }}u + lid.x) * TQ;
    if (row0 >= p.sq) {
        return;
    }
    let head = wid.y;
    let scale = bitcast<f32>(p.scale_bits);
    let kv_base = head * p.skv * D4;
{{ decls }}
    for (var j0 = 0u; j0 < p.skv; j0 += KB) {
{{ body }}
    }
{{ store }}
}

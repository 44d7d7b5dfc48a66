// Y = X·Wᵀ with both sides int8 (the GPU variant of qgemm.wgsl): X was quantized per row by
// quantize_rows.wgsl, W is the int8 or int4 layout of src/quant.rs. Each dot4I8Packed does four
// multiply-adds in one instruction (SPIR-V OpSDot where the driver has integer dot products,
// naga's polyfill elsewhere) and sums stay exact in i32 until the scales are applied: per
// channel (int8) at the end, or per 32-value block (int4, whose nibbles are widened to packed
// bytes first).
//
// Each invocation owns TM rows × TN channels, generated unrolled (qgemm/mod.rs).
struct Params {
    m: u32,
    n: u32,
    k: u32,
    // Weight words per row (int8: ceil(K/4); int4: 4 per block).
    words_per_row: u32,
    // Activation words per row (int8: as the weights; int4: 8 per block).
    x_words_per_row: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> xq: array<u32>;
@group(0) @binding(1) var<storage, read_write> xs: array<f32>;
@group(0) @binding(2) var<storage, read_write> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> scales: array<{{ scale_elem }}>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
@group(0) @binding(5) var<storage, read_write> p: Params;

// Nibbles 0..3 and 4..7 of an int4 word, sign-extended into four packed bytes each.
fn widen_i4_lo(v: u32) -> u32 {
    return pack4xI8(bitcast<vec4<i32>>(vec4<u32>(v << 28u, v << 24u, v << 20u, v << 16u)) >> vec4<u32>(28u));
}

fn widen_i4_hi(v: u32) -> u32 {
    return pack4xI8(bitcast<vec4<i32>>(vec4<u32>(v << 12u, v << 8u, v << 4u, v)) >> vec4<u32>(28u));
}

{{ scale_fn }}

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col0 = (wid.x * {{ wg_x }}u + lid.x) * {{ tn }}u;
    let row0 = (wid.y * {{ wg_y }}u + lid.y) * {{ tm }}u;
    if (col0 >= p.n || row0 >= p.m) {
        return;
    }
{{ body }}
}

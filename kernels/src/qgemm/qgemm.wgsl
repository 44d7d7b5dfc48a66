// Y = X·Wᵀ with W quantized weight-only (layouts in src/quant.rs), dequantized in registers.
// Weights are read a vec4<u32> at a time where the layout allows (16 int8 values, or one whole
// 32-value int4 block): fewer, wider loads are what a weight-bound GEMV needs everywhere.
//
// Each invocation owns a TM×TN tile of Y (TM rows of X, TN output channels). A GEMV is the same
// kernel with TM = 1: it is bound by reading W, which is 4× (int8) or 8× (int4) smaller than f32.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    words_per_row: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<{{ a_elem }}>;
@group(0) @binding(1) var<storage, read_write> w: array<{{ w_elem }}>;
@group(0) @binding(2) var<storage, read_write> scales: array<{{ scale_elem }}>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> p: Params;

const TM: u32 = {{ tm }}u;
const TN: u32 = {{ tn }}u;

// X[row, k..k+4]; columns past K read as zero.
fn load_a(base: u32, row: u32, k: u32) -> vec4<f32> {
{{ load_a }}
}

// Four signed bytes, least significant first (int8 layout).
fn unpack_i8(v: u32) -> vec4<f32> {
    let s = bitcast<vec4<i32>>(vec4<u32>(v << 24u, v << 16u, v << 8u, v)) >> vec4<u32>(24u);
    return vec4<f32>(s);
}

// Nibbles 0..3 and 4..7 of a word as signed values (int4 layout).
fn unpack_i4_lo(v: u32) -> vec4<f32> {
    let s = bitcast<vec4<i32>>(vec4<u32>(v << 28u, v << 24u, v << 20u, v << 16u)) >> vec4<u32>(28u);
    return vec4<f32>(s);
}

fn unpack_i4_hi(v: u32) -> vec4<f32> {
    let s = bitcast<vec4<i32>>(vec4<u32>(v << 12u, v << 8u, v << 4u, v)) >> vec4<u32>(28u);
    return vec4<f32>(s);
}

{{ scale_fn }}

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col0 = (wid.x * {{ wg_x }}u + lid.x) * TN;
    let row0 = (wid.y * {{ wg_y }}u + lid.y) * TM;
    if (col0 >= p.n || row0 >= p.m) {
        return;
    }
    let base_c = 0u;
    // Generated, fully unrolled (qgemm/mod.rs): rows r{i}, channels c{j} (clamped to N-1; their
    // sums are never stored), weight-row offsets w{j} and accumulators acc{i}_{g}.
{{ decls }}
{{ body }}
{{ store }}
}

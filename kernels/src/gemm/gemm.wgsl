// Batched C = A·B or A·Bᵀ with f32 accumulation.
//
// Each invocation owns a TM×TN tile of C in registers (TN a multiple of 4, as vec4s) and
// streams K four at a time with vec4 loads. No workgroup memory and no barriers. On lavapipe
// every storage load whose address differs across SIMD lanes becomes a loop over the lanes, so
// the tile is as large as registers (and cheap spills) allow: each vec4 loaded feeds
// 4·TN (A) or 4·TM (B) FMAs. On GPUs the same tile is ordinary register blocking, and the lanes
// along x share their rows of A, so those loads hit the same cache lines.
//
// Every binding is read_write, inputs included: burn's allocator packs several tensors into one
// wgpu buffer, and wgpu rejects one buffer bound both read-only and writable in a dispatch.
{{ enable }}

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad0: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> a: array<{{ a_elem }}>;
@group(0) @binding(1) var<storage, read_write> b: array<{{ b_elem }}>;
@group(0) @binding(2) var<storage, read_write> c: array<{{ c_elem }}>;
@group(0) @binding(3) var<storage, read_write> p: Params;

const TM: u32 = {{ tm }}u;
const TN: u32 = {{ tn }}u;

// A[row, k..k+4]; columns past K read as zero.
fn load_a(base: u32, row: u32, k: u32) -> vec4<f32> {
{{ load_a }}
}

// NN: B[x, y..y+4] (x = k, y = column). NT: B[x, y..y+4] (x = column, y = k).
// Out-of-range rows are clamped (they pair with zero columns of A or with dropped outputs).
fn load_b(base: u32, x: u32, y: u32) -> vec4<f32> {
{{ load_b }}
}

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col0 = (wid.x * {{ wg_x }}u + lid.x) * TN;
    let row0 = (wid.y * {{ wg_y }}u + lid.y) * TM;
    if (col0 >= p.n || row0 >= p.m) {
        return;
    }
    let base_a = wid.z * p.stride_a;
    let base_b = wid.z * p.stride_b;
    let base_c = wid.z * p.stride_c;

    // Generated, fully unrolled (gemm/mod.rs): rows r{i} (clamped to M-1; their sums are never
    // stored) and accumulators acc{i}_{g}, one vec4 of columns each, as named registers.
{{ decls }}
    for (var k = 0u; k < p.k; k += 4u) {
{{ step }}
    }
{{ store }}
}

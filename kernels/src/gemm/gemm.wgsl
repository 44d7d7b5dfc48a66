// Batched C = A·B or A·Bᵀ with f32 accumulation.
//
// Each invocation owns a TM×4 tile of C in registers and streams K four at a time with vec4
// loads. No workgroup memory and no barriers: on lavapipe a barrier costs more than the reuse it
// buys (invocations run as SIMD lanes of one CPU thread), and on GPUs the 8 lanes along x share
// the same rows of A, so those loads hit the same cache lines.
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
    let col0 = (wid.x * {{ wg_x }}u + lid.x) * 4u;
    let row0 = (wid.y * {{ wg_y }}u + lid.y) * TM;
    if (col0 >= p.n || row0 >= p.m) {
        return;
    }
    let base_a = wid.z * p.stride_a;
    let base_b = wid.z * p.stride_b;

    var rows: array<u32, TM>;
    var acc: array<vec4<f32>, TM>;
    for (var i = 0u; i < TM; i++) {
        // Rows past M load row M-1; their sums are never stored.
        rows[i] = min(row0 + i, p.m - 1u);
        acc[i] = vec4<f32>(0.0);
    }

    for (var k = 0u; k < p.k; k += 4u) {
{{ step }}
    }

    let base_c = wid.z * p.stride_c;
    for (var i = 0u; i < TM; i++) {
        let row = row0 + i;
        if (row < p.m) {
            let o = base_c + row * p.n + col0;
            for (var j = 0u; j < 4u; j++) {
                if (col0 + j < p.n) {
                    c[o + j] = {{ c_elem }}(acc[i][j]);
                }
            }
        }
    }
}

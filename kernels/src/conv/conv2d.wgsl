// 2-D convolution (NCHW, weights [Co, Ci, KH, KW]) as an implicit GEMM: M = Co, N = output
// pixels, K = Ci·KH·KW, with the im2col matrix never written out. Each invocation owns TM output
// channels × 4 output pixels. The lanes along x share their output channels, so weight loads are
// uniform across a SIMD group; padding taps read as zero through a select, not a branch.
struct Params {
    ci: u32,
    h: u32,
    w: u32,
    co: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> wt: array<f32>;
@group(0) @binding(2) var<storage, read_write> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> p: Params;

const TM: u32 = {{ tm }}u;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let npix = p.oh * p.ow;
    let pix0 = (wid.x * {{ wg_x }}u + lid.x) * 4u;
    let co0 = (wid.y * {{ wg_y }}u + lid.y) * TM;
    if (pix0 >= npix || co0 >= p.co) {
        return;
    }
    let n = wid.z;
    let iw = i32(p.w);
    let ih = i32(p.h);

    var iy0: vec4<i32>;
    var ix0: vec4<i32>;
    for (var j = 0u; j < 4u; j++) {
        let pix = min(pix0 + j, npix - 1u);
        iy0[j] = i32((pix / p.ow) * p.stride) - i32(p.pad);
        ix0[j] = i32((pix % p.ow) * p.stride) - i32(p.pad);
    }
    let taps = p.kh * p.kw;
    let k_len = p.ci * taps;
    var w_row: array<u32, TM>;
    var acc: array<vec4<f32>, TM>;
    for (var i = 0u; i < TM; i++) {
        w_row[i] = min(co0 + i, p.co - 1u) * k_len;
        acc[i] = vec4<f32>(0.0);
    }

    for (var c = 0u; c < p.ci; c++) {
        let x_base = (n * p.ci + c) * p.h * p.w;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = iy0 + vec4<i32>(i32(ky));
            let row_ok = iy >= vec4<i32>(0) & iy < vec4<i32>(ih);
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = ix0 + vec4<i32>(i32(kx));
                let ok = row_ok & ix >= vec4<i32>(0) & ix < vec4<i32>(iw);
                let idx = select(vec4<i32>(0), iy * iw + ix, ok);
                let xv = select(
                    vec4<f32>(0.0),
                    vec4<f32>(x[x_base + u32(idx.x)], x[x_base + u32(idx.y)], x[x_base + u32(idx.z)], x[x_base + u32(idx.w)]),
                    ok,
                );
                let tap = c * taps + ky * p.kw + kx;
                for (var i = 0u; i < TM; i++) {
                    acc[i] = fma(vec4<f32>(wt[w_row[i] + tap]), xv, acc[i]);
                }
            }
        }
    }

    for (var i = 0u; i < TM; i++) {
        let co = co0 + i;
        if (co < p.co) {
            let o = (n * p.co + co) * npix + pix0;
            let b = bias[co];
            for (var j = 0u; j < 4u; j++) {
                if (pix0 + j < npix) {
                    y[o + j] = acc[i][j] + b;
                }
            }
        }
    }
}

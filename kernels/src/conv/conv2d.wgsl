// 2-D convolution (NCHW, weights [Co, Ci, KH, KW]) as an implicit GEMM: M = Co, N = output
// pixels, K = Ci·KH·KW, with the im2col matrix never written out. Each invocation owns TM output
// channels × TP output pixels, generated fully unrolled (conv/mod.rs) so the tile lives in named
// registers. The lanes along x share their output channels, so weight loads hit the same cache
// lines; padding taps read as zero through a select, not a branch. 1×1 stride-1 convolutions
// never come here: they are plain GEMMs (see conv/mod.rs).
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
    n: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> wt: array<f32>;
@group(0) @binding(2) var<storage, read_write> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> p: Params;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let npix = p.oh * p.ow;
    let pix0 = (wid.x * {{ wg_x }}u + lid.x) * {{ tp }}u;
    let co0 = (wid.y * {{ wg_y }}u + lid.y) * {{ tm }}u;
    if (pix0 >= npix || co0 >= p.co) {
        return;
    }
    let n = wid.z;
    let iw = i32(p.w);
    let ih = i32(p.h);
    let taps = p.kh * p.kw;
    let k_len = p.ci * taps;
{{ decls }}
    for (var c = 0u; c < p.ci; c++) {
        let x_base = (n * p.ci + c) * p.h * p.w;
        let w_base = c * taps;
        for (var ky = 0u; ky < p.kh; ky++) {
            for (var kx = 0u; kx < p.kw; kx++) {
                let tap = w_base + ky * p.kw + kx;
{{ step }}
            }
        }
    }
{{ store }}
}

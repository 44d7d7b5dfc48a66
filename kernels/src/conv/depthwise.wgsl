// Depthwise 2-D convolution (NCHW, weights [C, 1, KH, KW], one filter per channel): TinyViT's
// MBConv, patch-merging and local convolutions. Each output reads only its own channel's KH×KW
// window, so there is no reduction across channels to tile: one output per invocation, with
// the channel's taps read from a small weight row that stays in cache across the plane.
// The same parameter block as conv2d.wgsl (conv/mod.rs: conv_params); Co = C here.
struct Params {
    c: u32,
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
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * groups.x) * {{ wg_x }}u + lid;
    let plane_len = p.oh * p.ow;
    if (i >= p.n * p.c * plane_len) {
        return;
    }
    let plane = i / plane_len;
    let c = plane % p.c;
    let r = i % plane_len;
    let oy = i32(r / p.ow);
    let ox = i32(r % p.ow);
    let x_base = plane * p.h * p.w;
    let w_base = c * p.kh * p.kw;
    var acc = bias[c];
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = oy * i32(p.stride) + i32(ky) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = ox * i32(p.stride) + i32(kx) - i32(p.pad);
            if (ix >= 0 && ix < i32(p.w)) {
                acc = fma(x[x_base + u32(iy) * p.w + u32(ix)], wt[w_base + ky * p.kw + kx], acc);
            }
        }
    }
    y[i] = acc;
}

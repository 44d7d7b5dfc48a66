// Convolution as the operands of gemm/tiled.wgsl (the GPU variant): A is the weight [Co, K] with
// K = Ci·KH·KW, B the im2col matrix [K, OH·OW] gathered here on the fly, never written out, and
// the store adds the bias. Same bindings and parameter block as conv2d.wgsl.
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

fn dims() -> vec3<u32> {
    return vec3<u32>(p.co, p.oh * p.ow, p.ci * p.kh * p.kw);
}

fn load_a(batch: u32, row: u32, k: u32) -> f32 {
    let k_len = p.ci * p.kh * p.kw;
    if (row >= p.co || k >= k_len) {
        return 0.0;
    }
    return wt[row * k_len + k];
}

// Column `pix` of im2col row `k` = (channel, ky, kx); padding taps read as zero.
fn load_b(batch: u32, k: u32, pix: u32) -> f32 {
    let taps = p.kh * p.kw;
    if (k >= p.ci * taps || pix >= p.oh * p.ow) {
        return 0.0;
    }
    let c = k / taps;
    let t = k % taps;
    let iy = i32((pix / p.ow) * p.stride + t / p.kw) - i32(p.pad);
    let ix = i32((pix % p.ow) * p.stride + t % p.kw) - i32(p.pad);
    if (iy < 0 || iy >= i32(p.h) || ix < 0 || ix >= i32(p.w)) {
        return 0.0;
    }
    return x[((batch * p.ci + c) * p.h + u32(iy)) * p.w + u32(ix)];
}

fn store(batch: u32, row: u32, pix: u32, value: f32) {
    y[(batch * p.co + row) * p.oh * p.ow + pix] = value + bias[row];
}

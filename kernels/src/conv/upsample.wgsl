// Nearest-neighbour 2× upsampling of NCHW maps (the UNet/VAE up blocks), one output per invocation.
struct Params {
    planes: u32,
    h: u32,
    w: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> p: Params;

@compute @workgroup_size({{ wg_x }}, {{ wg_y }}, {{ wg_z }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * groups.x) * {{ wg_x }}u + lid;
    let ow = 2u * p.w;
    let plane_len = 4u * p.h * p.w;
    if (i >= p.planes * plane_len) {
        return;
    }
    let plane = i / plane_len;
    let r = i % plane_len;
    let oy = r / ow;
    let ox = r % ow;
    y[i] = x[(plane * p.h + oy / 2u) * p.w + ox / 2u];
}

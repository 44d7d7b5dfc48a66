//! A block shaped like the models' hot paths (ResNet + attention), built from every kernel of
//! the extension API interleaved with burn's own ops, must give the same numbers on the GPU
//! adapter (under both limit profiles) as on the CPU engine, with the quantized products done
//! the same way (int8 activations or f32 ones) on both sides.

use burn::tensor::{Device, Tensor};
use divergen_kernels::quant::{Int4Weights, Int8Weights};
use divergen_kernels::testing::{assert_close, devices, quantizes_activations, random_vec, to_vec, upload};
use divergen_kernels::{
    QuantizedWeight, attention, conv2d, gelu, gemm, gemm_bt, group_norm, layer_norm, qgemm, silu, softmax,
    upsample_nearest2x,
};

const C: usize = 8;
const HW: usize = 6;
const HEADS: usize = 2;

struct Weights {
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    conv3: Vec<f32>,
    conv1: Vec<f32>,
    bias: Vec<f32>,
    proj: Vec<f32>,
    ff: Vec<f32>,
}

fn weights() -> Weights {
    Weights {
        x: random_vec(C * HW * HW, 1, 1.0),
        gamma: random_vec(C, 2, 1.0),
        beta: random_vec(C, 3, 0.5),
        conv3: random_vec(C * C * 9, 4, 0.2),
        conv1: random_vec(C * C, 5, 0.3),
        bias: random_vec(C, 6, 0.1),
        proj: random_vec(3 * C * C, 7, 0.3),
        ff: random_vec(4 * C * C, 8, 0.3),
    }
}

/// GroupNorm+SiLU → conv3×3 → residual → conv1×1 stride 2 → upsample → tokens → Q/K/V (f32 GEMM)
/// → attention → int8 and int4 projections → LayerNorm → GELU → logits GEMM → softmax.
/// `weight_only`: the CPU engine's quantized products keep f32 activations, as a GPU's `dequant`
/// kernels do.
fn block(w: &Weights, device: &Device, weight_only: bool) -> Vec<f32> {
    let x: Tensor<4> = upload(&w.x, &[1, C, HW, HW], device);
    let gamma: Tensor<1> = upload(&w.gamma, &[C], device);
    let beta: Tensor<1> = upload(&w.beta, &[C], device);
    let bias: Tensor<1> = upload(&w.bias, &[C], device);
    let h = group_norm(x.clone(), gamma.clone(), beta.clone(), 4, 1e-5, true);
    let h = conv2d(h, upload(&w.conv3, &[C, C, 3, 3], device), bias.clone(), 1, 1) + x;
    let h = silu(h);
    let h = conv2d(h, upload(&w.conv1, &[C, C, 1, 1], device), bias, 2, 0);
    let h = upsample_nearest2x(h); // back to HW×HW
    let tokens = h.reshape([1, C, HW * HW]).swap_dims(1, 2); // [1, S, C], a strided view
    let qkv = gemm_bt(tokens.clone(), upload::<3>(&w.proj, &[1, 3 * C, C], device)); // [1, S, 3C]
    let heads = |t: Tensor<3>| t.reshape([1, HW * HW, HEADS, C / HEADS]).swap_dims(1, 2);
    let q = heads(qkv.clone().narrow(2, 0, C));
    let k = heads(qkv.clone().narrow(2, C, C));
    let v = heads(qkv.narrow(2, 2 * C, C));
    let a = attention(q, k, v, 1.0 / ((C / HEADS) as f32).sqrt()); // [1, H, S, C/H]
    let a = a.swap_dims(1, 2).reshape([HW * HW, C]);
    let (q8, q4) = (
        Int8Weights::quantize(&w.ff[..2 * C * C], 2 * C, C),
        Int4Weights::quantize(&w.ff[2 * C * C..], C, 2 * C),
    );
    let (ff8, ff4) = if weight_only {
        (
            QuantizedWeight::int8_weight_only(&q8, device),
            QuantizedWeight::int4_weight_only(&q4, device),
        )
    } else {
        (QuantizedWeight::int8(&q8, device), QuantizedWeight::int4(&q4, device))
    };
    let f = qgemm(qgemm(a.clone(), &ff8), &ff4) + a; // [S, C]
    let f = layer_norm(f, Tensor::ones([C], device), Tensor::zeros([C], device), 1e-5);
    let f = gelu(f, false);
    let logits = gemm(f.clone().unsqueeze::<3>(), f.transpose().unsqueeze::<3>()); // [1, S, S]
    to_vec(softmax(logits))
}

#[test]
fn every_kernel_composes_with_burn_ops_and_matches_the_cpu_fallback() {
    let w = weights();
    let (engine, engine_weight_only) = (block(&w, &Device::flex(), false), block(&w, &Device::flex(), true));
    assert!(engine.iter().chain(&engine_weight_only).all(|v| v.is_finite()));
    // Rounding the activations to int8 moves the result, but only by that rounding.
    assert_close(
        &engine,
        &engine_weight_only,
        2e-2,
        "CPU engine: int8 vs f32 activations",
    );
    for d in devices() {
        let got = block(&w, &d.device, false);
        let want = if quantizes_activations(&d.device) {
            &engine
        } else {
            &engine_weight_only
        };
        assert_close(&got, want, 1e-4, &format!("{}: model block vs CPU engine", d.label));
    }
}

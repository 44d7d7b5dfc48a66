//! Kernel microbenchmarks: each kernel at realistic sizes against the same op through burn's
//! default path on the same device. Used by `divergen bench kernels`.
//!
//! A case reports the median of N timed runs after a warm-up, where each run queues `reps` calls
//! and waits for the device once, so queueing overhead is amortised the way a model sees it.
//! The first call is timed on its own: it includes WGSL compilation (ours) or autotune (burn).

use std::time::{Duration, Instant};

use burn::tensor::activation;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Tensor};
use serde::Serialize;

use crate::quant::{Int4Weights, Int8Weights};
use crate::testing::{random_vec, upload};
use crate::{QuantizedWeight, attention, conv2d, gelu, gemm, gemm_bt, group_norm, qgemm};

#[derive(Clone, Debug, Serialize)]
pub struct BenchCase {
    pub kernel: String,
    pub shape: String,
    /// Which variant of our kernel ran (see [`crate::variants`]).
    pub variant: String,
    pub ours_ms: f64,
    /// `None` where burn has no equivalent or cannot run the case (reason in `note`).
    pub burn_ms: Option<f64>,
    /// burn_ms / ours_ms: above 1 means ours is faster.
    pub speedup: Option<f64>,
    pub gflops: Option<f64>,
    pub gbps: Option<f64>,
    pub ours_first_call_ms: f64,
    pub burn_first_call_ms: Option<f64>,
    /// Device memory in use right after the first call, output still alive (ours, then burn's),
    /// in MiB: the case's inputs and output plus anything the op keeps.
    pub ours_mem_mib: Option<f64>,
    pub burn_mem_mib: Option<f64>,
    pub note: String,
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Fewer sizes and runs: a smoke pass that still exercises every kernel.
    pub quick: bool,
    /// Skip burn's side (its first matmul per shape autotunes for seconds).
    pub ours_only: bool,
    /// Run only cases whose kernel name contains this.
    pub filter: Option<String>,
}

impl BenchOptions {
    fn wants(&self, kernel: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| kernel.contains(f))
    }

    fn wants_any(&self, kernels: &[&str]) -> bool {
        kernels.iter().any(|k| self.wants(k))
    }
}

struct Timing {
    first_ms: f64,
    median_ms: f64,
    mem_mib: Option<f64>,
}

fn sync(device: &Device) {
    if let Err(e) = device.sync() {
        panic!("device failed during the benchmark: {e:?}");
    }
}

/// Times `op` (which must queue work and return its output so it is not optimised away).
fn time<T>(device: &Device, quick: bool, mut op: impl FnMut() -> T) -> Timing {
    device.memory_cleanup();
    let start = Instant::now();
    let out = op();
    sync(device);
    let first = start.elapsed();
    // Inputs plus this output (plus whatever the op keeps): what a model holds at this step.
    let mem_mib = device
        .memory_pool_usage()
        .map(|u| u.bytes_in_use as f64 / (1 << 20) as f64);
    drop(out);
    // Second call: steady state, used to size the runs to ~0.3 s (quick) or ~1 s per sample set.
    let start = Instant::now();
    let out = op();
    sync(device);
    drop(out);
    let one = start.elapsed().max(Duration::from_micros(20));
    let budget = if quick { 0.3 } else { 1.0 };
    let reps = ((budget / 5.0 / one.as_secs_f64()) as usize).clamp(1, 50);
    let samples = if quick { 3 } else { 5 };
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let outs: Vec<T> = (0..reps).map(|_| op()).collect();
        sync(device);
        drop(outs);
        times.push(start.elapsed().as_secs_f64() * 1e3 / reps as f64);
    }
    times.sort_by(f64::total_cmp);
    Timing {
        first_ms: first.as_secs_f64() * 1e3,
        median_ms: times[times.len() / 2],
        mem_mib,
    }
}

struct Work {
    flops: Option<f64>,
    bytes: Option<f64>,
}

fn case(kernel: &str, shape: String, work: Work, ours: Timing, burn: Option<Timing>, note: &str) -> BenchCase {
    let per_s = |x: Option<f64>| x.map(|v| v / (ours.median_ms * 1e-3) / 1e9);
    BenchCase {
        kernel: kernel.to_string(),
        shape,
        variant: String::new(),
        ours_ms: ours.median_ms,
        burn_ms: burn.as_ref().map(|b| b.median_ms),
        speedup: burn.as_ref().map(|b| b.median_ms / ours.median_ms),
        gflops: per_s(work.flops),
        gbps: per_s(work.bytes),
        ours_first_call_ms: ours.first_ms,
        burn_first_call_ms: burn.as_ref().map(|b| b.first_ms),
        ours_mem_mib: ours.mem_mib,
        burn_mem_mib: burn.as_ref().and_then(|b| b.mem_mib),
        note: note.to_string(),
    }
}

/// The variant a case's kernel runs under `plan` (`cpu engine` on the native CPU engine).
fn variant_name(kernel: &str, plan: Option<crate::variants::KernelPlan>) -> String {
    let Some(p) = plan else {
        return "cpu engine".into();
    };
    let name = |v: &dyn std::fmt::Debug| format!("{v:?}").to_ascii_lowercase();
    match kernel {
        k if k.starts_with("gemv_int") || k.starts_with("qgemm") => name(&p.qgemm),
        "gemv_f32" => "register".into(),
        "gemm_f16" => format!("{}, f16 {}", name(&p.matmul), name(&p.f16)),
        k if k.starts_with("gemm") || k.starts_with("conv") => name(&p.matmul),
        "attention" => name(&p.attention),
        k if k.starts_with("group_norm") => name(&p.reduce),
        _ => "–".into(),
    }
}

fn rand_tensor<const D: usize>(dims: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    upload(&random_vec(dims.iter().product(), seed, 1.0), &dims, device)
}

/// Runs every case, calling `report` as each finishes (for progress and streaming output).
pub fn run(
    device: &Device,
    shader_f16: bool,
    opts: &BenchOptions,
    mut report: impl FnMut(&BenchCase),
) -> Vec<BenchCase> {
    let q = opts.quick;
    let mut out = Vec::new();
    let plan = crate::variants::plan_of(device);
    let mut push = |mut c: BenchCase| {
        c.variant = variant_name(&c.kernel, plan);
        report(&c);
        out.push(c);
    };
    let burn_side = |f: &mut dyn FnMut() -> Timing| if opts.ours_only { None } else { Some(f()) };

    // GEMM, f32: the core of every linear layer.
    let sizes: &[usize] = if q { &[256, 512] } else { &[256, 512, 1024, 2048] };
    for &n in sizes.iter().filter(|_| opts.wants("gemm_f32")) {
        let a = rand_tensor([1, n, n], 1, device);
        let b = rand_tensor([1, n, n], 2, device);
        let ours = time(device, q, || gemm(a.clone(), b.clone()));
        let burn = burn_side(&mut || time(device, q, || a.clone().matmul(b.clone())));
        let flops = 2.0 * (n * n * n) as f64;
        push(case(
            "gemm_f32",
            format!("{n}x{n}x{n}"),
            Work {
                flops: Some(flops),
                bytes: None,
            },
            ours,
            burn,
            "",
        ));
    }

    // GEMM with f16 storage.
    if shader_f16 && opts.wants("gemm_f16") {
        let n = if q { 512 } else { 1024 };
        let a = rand_tensor([1, n, n], 3, device).cast(DType::F16);
        let b = rand_tensor([1, n, n], 4, device).cast(DType::F16);
        let ours = time(device, q, || gemm(a.clone(), b.clone()));
        let burn = burn_side(&mut || time(device, q, || a.clone().matmul(b.clone())));
        push(case(
            "gemm_f16",
            format!("{n}x{n}x{n}"),
            Work {
                flops: Some(2.0 * (n * n * n) as f64),
                bytes: None,
            },
            ours,
            burn,
            "f16 storage, f32 accumulate",
        ));
    }

    // GEMV: decoding one token / one pooled embedding through a linear layer; bound by weight reads.
    let gemv_shapes: &[(usize, usize)] = if q {
        &[(1280, 5120)]
    } else {
        &[(4096, 4096), (1280, 5120)]
    };
    for &(n, k) in gemv_shapes
        .iter()
        .filter(|_| opts.wants_any(&["gemv_f32", "gemv_int8", "gemv_int4"]))
    {
        let w = random_vec(n * k, 5, 0.05);
        let x = rand_tensor([1, k], 6, device);
        let wt: Tensor<2> = upload(&w, &[n, k], device);
        let w_kn: Tensor<2> = upload(&transpose(&w, n, k), &[k, n], device); // burn's natural layout
        let q8 = QuantizedWeight::int8(&Int8Weights::quantize(&w, n, k), device);
        let q4 = QuantizedWeight::int4(&Int4Weights::quantize(&w, n, k), device);
        let shape = format!("N={n} K={k}");
        let f32_bytes = (n * k * 4) as f64;
        let ours = time(device, q, || gemm_bt(x.clone(), wt.clone()));
        let burn = burn_side(&mut || time(device, q, || x.clone().matmul(w_kn.clone())));
        let f32_ms = ours.median_ms;
        push(case(
            "gemv_f32",
            shape.clone(),
            Work {
                flops: Some(2.0 * (n * k) as f64),
                bytes: Some(f32_bytes),
            },
            ours,
            burn,
            "",
        ));
        for (name, weight) in [("gemv_int8", &q8), ("gemv_int4", &q4)] {
            let ours = time(device, q, || qgemm(x.clone(), weight));
            let note = format!("{:.2}x our f32 GEMV", f32_ms / ours.median_ms);
            let burn = burn_side(&mut || time(device, q, || x.clone().matmul(w_kn.clone())));
            push(case(
                name,
                shape.clone(),
                Work {
                    flops: Some(2.0 * (n * k) as f64),
                    bytes: Some(weight.bytes() as f64),
                },
                ours,
                burn,
                &note,
            ));
        }
    }

    // Quantized GEMM at batch 256 (a SAM/CLIP token block through a 1024-wide layer).
    if opts.wants_any(&["gemm_bt_f32", "qgemm_int8", "qgemm_int4"]) {
        let (m, n, k) = (256, 1024, 1024);
        let w = random_vec(n * k, 7, 0.05);
        let x = rand_tensor([m, k], 8, device);
        let wt: Tensor<2> = upload(&w, &[n, k], device);
        let w_kn: Tensor<2> = upload(&transpose(&w, n, k), &[k, n], device);
        let shape = format!("M={m} N={n} K={k}");
        let flops = Some(2.0 * (m * n * k) as f64);
        let ours = time(device, q, || gemm_bt(x.clone(), wt.clone()));
        let burn = burn_side(&mut || time(device, q, || x.clone().matmul(w_kn.clone())));
        push(case(
            "gemm_bt_f32",
            shape.clone(),
            Work { flops, bytes: None },
            ours,
            burn,
            "linear-layer layout",
        ));
        let q8 = QuantizedWeight::int8(&Int8Weights::quantize(&w, n, k), device);
        let q4 = QuantizedWeight::int4(&Int4Weights::quantize(&w, n, k), device);
        for (name, weight) in [("qgemm_int8", &q8), ("qgemm_int4", &q4)] {
            let ours = time(device, q, || qgemm(x.clone(), weight));
            let burn = burn_side(&mut || time(device, q, || x.clone().matmul(w_kn.clone())));
            push(case(
                name,
                shape.clone(),
                Work { flops, bytes: None },
                ours,
                burn,
                "burn column: its f32 matmul",
            ));
        }
    }

    // Fused attention: 8 heads of 64, self-attention over a latent of `seq` tokens.
    let seqs: &[usize] = if q { &[256, 1024] } else { &[256, 1024, 4096] };
    for &s in seqs.iter().filter(|_| opts.wants("attention")) {
        let (h, d) = (8, 64);
        let qt = rand_tensor([1, h, s, d], 9, device);
        let kt = rand_tensor([1, h, s, d], 10, device);
        let vt = rand_tensor([1, h, s, d], 11, device);
        let scale = 1.0 / (d as f32).sqrt();
        let ours = time(device, q, || attention(qt.clone(), kt.clone(), vt.clone(), scale));
        let scores_bytes = (h * s * s * 4) as u64;
        let (burn, note) = if scores_bytes > 128 << 20 {
            (
                None,
                format!(
                    "burn's path needs a {} MiB score matrix, past the 128 MiB binding limit",
                    scores_bytes >> 20
                ),
            )
        } else {
            let burn = burn_side(&mut || {
                time(device, q, || {
                    activation::softmax(qt.clone().matmul(kt.clone().swap_dims(2, 3)) * scale, 3).matmul(vt.clone())
                })
            });
            (
                burn,
                format!(
                    "burn: matmul + softmax + matmul, score matrix {} MiB",
                    scores_bytes >> 20
                ),
            )
        };
        let flops = 4.0 * (h * s * s * d) as f64;
        push(case(
            "attention",
            format!("seq={s} heads={h} d={d}"),
            Work {
                flops: Some(flops),
                bytes: None,
            },
            ours,
            burn,
            &note,
        ));
    }
    // SD cross-attention: 4096 latent tokens against 77 text tokens.
    if !q && opts.wants("attention") {
        let (h, d, sq, skv) = (8, 40, 4096, 77);
        let qt = rand_tensor([1, h, sq, d], 12, device);
        let kt = rand_tensor([1, h, skv, d], 13, device);
        let vt = rand_tensor([1, h, skv, d], 14, device);
        let scale = 1.0 / (d as f32).sqrt();
        let ours = time(device, q, || attention(qt.clone(), kt.clone(), vt.clone(), scale));
        let burn = burn_side(&mut || {
            time(device, q, || {
                activation::softmax(qt.clone().matmul(kt.clone().swap_dims(2, 3)) * scale, 3).matmul(vt.clone())
            })
        });
        push(case(
            "attention",
            format!("cross sq={sq} skv={skv} heads={h} d={d}"),
            Work {
                flops: Some(4.0 * (h * sq * skv * d) as f64),
                bytes: None,
            },
            ours,
            burn,
            "SD 1.5 cross-attention",
        ));
    }

    // Group norm (+SiLU) on a 320-channel 64×64 map: every SD ResNet block starts so.
    if opts.wants_any(&["group_norm", "group_norm_silu"]) {
        let (c, hw) = (320, 64);
        let x = rand_tensor([1, c, hw, hw], 15, device);
        let gamma = rand_tensor([c], 16, device);
        let beta = rand_tensor([c], 17, device);
        let bytes = Some(2.0 * (c * hw * hw * 4) as f64);
        let norm = burn::nn::GroupNormConfig::new(32, c).init(device);
        for silu in [false, true]
            .into_iter()
            .filter(|&silu| opts.wants(if silu { "group_norm_silu" } else { "group_norm" }))
        {
            let ours = time(device, q, || {
                group_norm(x.clone(), gamma.clone(), beta.clone(), 32, 1e-5, silu)
            });
            let burn = burn_side(&mut || {
                time(device, q, || {
                    let y = norm.forward(x.clone());
                    if silu { activation::silu(y) } else { y }
                })
            });
            let name = if silu { "group_norm_silu" } else { "group_norm" };
            push(case(
                name,
                format!("{c}x{hw}x{hw} groups=32"),
                Work { flops: None, bytes },
                ours,
                burn,
                "burn: nn::GroupNorm (+ silu)",
            ));
        }
    }

    // Convolutions: a 320-channel 3×3 (UNet's most common conv) and its stride-2 downsampler.
    if opts.wants_any(&["conv3x3", "conv1x1"]) {
        let (c, hw) = if q { (128, 32) } else { (320, 32) };
        let x = rand_tensor([1, c, hw, hw], 18, device);
        let w = upload::<4>(&random_vec(c * c * 9, 19, 0.05), &[c, c, 3, 3], device);
        let b = rand_tensor([c], 20, device);
        for stride in [1, 2].into_iter().filter(|_| opts.wants("conv3x3")) {
            let ours = time(device, q, || conv2d(x.clone(), w.clone(), b.clone(), stride, 1));
            let burn = burn_side(&mut || {
                time(device, q, || {
                    burn_conv2d(
                        x.clone(),
                        w.clone(),
                        Some(b.clone()),
                        ConvOptions::new([stride, stride], [1, 1], [1, 1], 1),
                    )
                })
            });
            let o = hw.div_ceil(stride);
            let flops = 2.0 * (c * c * 9 * o * o) as f64;
            push(case(
                "conv3x3",
                format!("{c}->{c} {hw}x{hw} stride={stride}"),
                Work {
                    flops: Some(flops),
                    bytes: None,
                },
                ours,
                burn,
                "",
            ));
        }
        if opts.wants("conv1x1") {
            let w1 = upload::<4>(&random_vec(c * c, 21, 0.05), &[c, c, 1, 1], device);
            let ours = time(device, q, || conv2d(x.clone(), w1.clone(), b.clone(), 1, 0));
            let burn = burn_side(&mut || {
                time(device, q, || {
                    burn_conv2d(
                        x.clone(),
                        w1.clone(),
                        Some(b.clone()),
                        ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
                    )
                })
            });
            push(case(
                "conv1x1",
                format!("{c}->{c} {hw}x{hw}"),
                Work {
                    flops: Some(2.0 * (c * c * hw * hw) as f64),
                    bytes: None,
                },
                ours,
                burn,
                "",
            ));
        }
    }

    // GELU over 4M values (memory bound).
    if opts.wants("gelu_erf") {
        let n = 1 << 22;
        let x = rand_tensor([n], 22, device);
        let ours = time(device, q, || gelu(x.clone(), false));
        let burn = burn_side(&mut || time(device, q, || activation::gelu(x.clone())));
        push(case(
            "gelu_erf",
            format!("{n}"),
            Work {
                flops: None,
                bytes: Some(2.0 * (n * 4) as f64),
            },
            ours,
            burn,
            "",
        ));
    }
    out
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| w[r * cols + c]))
        .collect()
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.digits$}"))
}

/// The results as a Markdown table (what kernels/BENCHMARKS.md records).
pub fn markdown(cases: &[BenchCase]) -> String {
    let mut s = String::from(
        "| kernel | variant | shape | ours ms | burn ms | burn/ours | GFLOP/s | GB/s | first call ours / burn ms | MiB in use ours / burn | note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for c in cases {
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {} | {} | {} | {} | {:.0} / {} | {} / {} | {} |\n",
            c.kernel,
            c.variant,
            c.shape,
            c.ours_ms,
            fmt_opt(c.burn_ms, 3),
            fmt_opt(c.speedup, 2),
            fmt_opt(c.gflops, 1),
            fmt_opt(c.gbps, 2),
            c.ours_first_call_ms,
            fmt_opt(c.burn_first_call_ms, 0),
            fmt_opt(c.ours_mem_mib, 0),
            fmt_opt(c.burn_mem_mib, 0),
            c.note
        ));
    }
    s
}

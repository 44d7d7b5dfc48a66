//! divergen's compute kernels: hand-written WGSL for the hot paths of CLIP, SAM and Stable
//! Diffusion, launched inside burn through one backend extension ([`DivergenKernels`]).
//!
//! Each kernel lives in its own folder: the `.wgsl` file, the Rust that launches it, its CPU
//! kernel, its reference, and its tests. Models call the tensor-level functions re-exported
//! here; on a machine without a GPU (or with only a CPU rasterizer) the same calls run the
//! native CPU engine ([`engine`]) on burn's Flex backend.

pub mod activation;
pub mod attention;
pub mod bench;
mod codegen;
pub mod conv;
pub(crate) mod cpu_math;
pub mod device;
pub mod engine;
pub mod gemm;
mod launch;
pub mod norm;
mod ops;
pub mod qgemm;
pub mod quant;
pub mod testing;
mod tuning;
pub mod variants;

pub use activation::Activation;
pub use ops::{
    DenseWeight, DivergenKernels, QuantizedWeight, activation, attention, attention_packed_qkv, attention_rel_pos,
    conv2d, depthwise_conv2d, gelu, gemm, gemm_bt, group_norm, layer_norm, linear, qgemm, silu, softmax,
    upsample_nearest2x,
};
pub use qgemm::QuantFormat;

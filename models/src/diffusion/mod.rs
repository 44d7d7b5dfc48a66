//! The Stable Diffusion family: schedulers and the VAE decoder so far; the UNet and the text
//! encoder wiring come next.

pub mod pipeline;
pub mod scheduler;
pub mod taesd;
pub mod unet;
pub mod vae;

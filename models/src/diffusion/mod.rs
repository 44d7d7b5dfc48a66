//! The Stable Diffusion family: schedulers (this stop), then the text encoder, UNet and VAE.

pub mod scheduler;

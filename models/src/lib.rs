//! divergen's models: CLIP and SAM for annotation and filtering, the diffusion family for
//! generation, each a burn module with a loader for its official checkpoint layout.

pub mod bench;
pub mod checkpoint;
pub mod clip;
pub mod diffusion;
pub mod error;
pub mod layers;
pub mod recipe;
pub mod resize;
pub mod sam;

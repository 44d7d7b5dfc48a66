//! divergen's models: CLIP and SAM for annotation and filtering, the diffusion family for
//! generation, each a burn module with a loader for its official checkpoint layout.

pub mod clip_tokenizer;

//! Training the embedded default's tiny models with burn's autodiff on the CPU, exported in the
//! layouts the real-model loaders read.

pub mod clip;

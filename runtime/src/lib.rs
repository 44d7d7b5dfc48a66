//! The device side of divergen. The `divergen` binary is a thin CLI over this library.

pub mod domain;
pub mod embedded;
pub mod eval;
pub mod images;
pub mod pipeline;
pub mod progress;
pub mod stream;

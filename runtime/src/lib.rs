//! The device side of divergen. The `divergen` binary is a thin CLI over this library.

pub mod cli;
pub mod domain;
pub mod embedded;
pub mod error;
pub mod images;
pub mod pipeline;
pub mod progress;
pub mod stream;

pub use error::{Error, Result};

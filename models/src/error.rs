//! The one error type of the model crate: what went wrong, led by the file (and where it
//! applies the checkpoint key) it went wrong in.

use std::fmt;
use std::path::Path;

#[derive(Debug)]
pub struct ModelError(pub String);

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ModelError {}

impl ModelError {
    pub fn at(path: &Path, what: impl fmt::Display) -> Self {
        ModelError(format!("{}: {what}", path.display()))
    }
}

//! The one error type of the runtime, and of divergen-train, which builds on it. Its messages lead
//! with the file (and, for a config, the key) they are about; a model's error keeps its own words.

use std::path::{Path, PathBuf};

use divergen_models::error::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint that failed to load, or a model that failed to run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// No device could be opened as asked.
    #[error(transparent)]
    Device(#[from] divergen_kernels::device::DeviceError),
    #[error(transparent)]
    Tokenizer(#[from] divergen_models::clip::tokenizer::TokenizerError),
    /// Serialising what we write (our own types) failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A file or folder that could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// Bad input or a failed stage, said in full.
    #[error("{0}")]
    Message(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// For `map_err`: an I/O error on `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::Message(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::Message(message.to_string())
    }
}

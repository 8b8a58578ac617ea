//! The error type of the GGUF module (its own file so that the fuzz target
//! can compile the reader without the rest of qcoder).

use std::path::PathBuf;

use super::{CodecError, ParseError};

/// Errors of the GGUF module. Messages name the file, and the key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // The inner errors are printed inline (and not exposed as `source`) so
    // that `error: {:#}` shows each message once.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    Parse { path: PathBuf, error: ParseError },
    #[error("{}: metadata key `{key}` is missing", path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("{}: metadata key `{key}` is {found}, expected {expected}", path.display())]
    KeyType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{tensor}`: {error}", path.display())]
    Codec {
        path: PathBuf,
        tensor: String,
        error: CodecError,
    },
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
}

//! GGUF, llama.cpp's model format: reader, writer, block codecs, and the
//! mapping between GGUF and Hugging Face checkpoints. This is the only module
//! that knows GGUF keys and tensor names.
//!
//! * [`reader`]: memory-mapped, validated parsing ([`GgufFile`]).
//! * [`writer`]: header → key/values → tensor infos → aligned data;
//!   [`export`] plans what an HF model becomes in GGUF.
//! * [`codec`], [`kquants`], [`blocks`]: the ggml block formats.
//! * [`hf`]: config, tensor names, llama's Q/K permutation, Q4_K_M mix.
//! * [`vocab`]: `tokenizer.ggml.*` ⇄ `tokenizer.json`.

pub mod blocks;
pub mod codec;
pub mod export;
pub mod hf;
pub mod keys;
pub mod kquants;
pub mod reader;
pub mod types;
pub mod value;
pub mod vocab;
pub mod writer;

use std::path::PathBuf;

pub use codec::CodecError;
pub use reader::{GgufFile, Header, ParseError, TensorInfo};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};

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

//! GGUF, llama.cpp's model format: reader, writer, block codecs, and the
//! mapping between GGUF and Hugging Face checkpoints. This is the only module
//! that knows GGUF keys and tensor names.
//!
//! * [`reader`]: memory-mapped, validated parsing ([`GgufFile`]).
//! * [`writer`]: header → key/values → tensor infos → aligned data;
//!   [`export`] plans what an HF model becomes in GGUF.
//! * [`codec`], [`kquants`], [`blocks`]: the ggml block formats.
//! * [`hf`]: config, tensor names, llama's Q/K permutation, Q4_K_M mix.
//! * [`repack`]: GPTQ/AWQ integers into Q4_0/Q4_1 blocks without re-rounding.
//! * [`vocab`]: `tokenizer.ggml.*` ⇄ `tokenizer.json`.

pub mod blocks;
pub mod codec;
mod error;
pub mod export;
pub mod hf;
pub mod keys;
pub mod kquants;
pub mod reader;
pub mod repack;
pub mod types;
pub mod value;
pub mod vocab;
pub mod writer;

pub use codec::CodecError;
pub use error::GgufError;
pub use reader::{GgufFile, Header, ParseError, TensorInfo};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};

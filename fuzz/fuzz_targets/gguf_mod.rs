//! qcoder's GGUF reader and codecs, compiled from src/gguf without the rest
//! of qcoder (which needs libtorch). Paths are relative to this directory.

#![allow(dead_code, unused_imports)]

#[path = "../../src/gguf/blocks.rs"]
pub mod blocks;
#[path = "../../src/gguf/codec.rs"]
pub mod codec;
#[path = "../../src/gguf/error.rs"]
mod error;
#[path = "../../src/gguf/keys.rs"]
pub mod keys;
#[path = "../../src/gguf/kquants.rs"]
pub mod kquants;
#[path = "../../src/gguf/reader.rs"]
pub mod reader;
#[path = "../../src/gguf/types.rs"]
pub mod types;
#[path = "../../src/gguf/value.rs"]
pub mod value;

pub use codec::CodecError;
pub use error::GgufError;
pub use reader::ParseError;
pub use value::Value;

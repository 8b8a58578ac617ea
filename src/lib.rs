//! qcoder: turn an open code LLM into a model tuned on a team's own code.
//!
//! Stages talk through files with documented formats; the library modules
//! below do the work and `commands` only orchestrates them.

pub mod cli;
pub mod commands;
pub mod data;
pub mod device;
pub mod eval;
pub mod gguf;
pub mod infer;
pub mod lora;
pub mod model;
pub mod pipeline;
pub mod quant;
pub mod settings;
pub mod team;
pub mod tokenizer;
pub mod train;

//! Evaluation of models on held-out code.

pub mod gate;
pub mod ppl;

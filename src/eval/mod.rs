//! Evaluation of models on held-out code.

pub mod fim;
pub mod gate;
pub mod humaneval;
pub mod latency;
pub mod plot;
pub mod ppl;
pub mod sandbox;

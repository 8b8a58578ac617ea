//! Inference on top of the decoder: sampling and the generation loop.

pub mod cpu_kernels;
pub mod generate;
pub mod quantized;
pub mod sampling;

pub use generate::{generate, generate_batch_until, generate_until, Generated, StopReason};
pub use sampling::{Sampler, SamplingParams};

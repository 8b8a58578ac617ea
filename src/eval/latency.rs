//! Completion latency as an IDE user feels it: FIM prompts from the eval data,
//! exactly [`COMPLETION_TOKENS`] new tokens each (end tokens are ignored, so
//! every sample does the same work), batch 1, greedy, after one untimed
//! warm-up. Time to first token is the prompt pass plus choosing the first
//! token; total is until the last token is chosen.

use std::time::Duration;

use serde::Serialize;

use super::fim::{complete, FimError, FimSample};
use crate::model::CausalLm;
use crate::tokenizer::CodeTokenizer;

pub const COMPLETION_TOKENS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error("latency: no samples")]
    NoSamples,
    #[error(transparent)]
    Fim(#[from] FimError),
}

/// One timed completion.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub ttft_ms: f64,
    pub total_ms: f64,
    /// Decode passes after the first token and their time.
    pub decode_steps: usize,
    pub decode_ms: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub samples: usize,
    pub completion_tokens: usize,
    pub ttft_ms: Percentiles,
    pub total_ms: Percentiles,
    /// All prompt tokens over all prompt-pass time.
    pub prefill_tokens_per_s: f64,
    /// All decode passes over all decode time.
    pub decode_tokens_per_s: f64,
    pub timings: Vec<Timing>,
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn percentiles(values: &[f64]) -> Percentiles {
    Percentiles {
        p50: percentile(values, 50.0),
        p95: percentile(values, 95.0),
        p99: percentile(values, 99.0),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Times one 64-token completion per sample.
pub fn measure(
    model: &CausalLm,
    tokenizer: &CodeTokenizer,
    samples: &[FimSample],
    on_done: &mut dyn FnMut(),
) -> Result<LatencySummary, LatencyError> {
    let first = samples.first().ok_or(LatencyError::NoSamples)?;
    let run = |s: &FimSample| -> Result<Timing, LatencyError> {
        let (_, out, prompt_tokens) = complete(model, tokenizer, &[], s, COMPLETION_TOKENS)?;
        Ok(Timing {
            prompt_tokens,
            new_tokens: out.tokens.len(),
            ttft_ms: ms(out.prefill),
            total_ms: ms(out.prefill + out.decode),
            decode_steps: out.decode_steps,
            decode_ms: ms(out.decode),
        })
    };
    // Warm-up: first-call allocations and kernel selection are not latency.
    run(first)?;
    let mut timings = Vec::with_capacity(samples.len());
    for s in samples {
        timings.push(run(s)?);
        on_done();
    }
    let ttft: Vec<f64> = timings.iter().map(|t| t.ttft_ms).collect();
    let total: Vec<f64> = timings.iter().map(|t| t.total_ms).collect();
    let rate = |n: usize, ms: f64| if ms > 0.0 { n as f64 / (ms / 1e3) } else { 0.0 };
    Ok(LatencySummary {
        samples: timings.len(),
        completion_tokens: COMPLETION_TOKENS,
        ttft_ms: percentiles(&ttft),
        total_ms: percentiles(&total),
        prefill_tokens_per_s: rate(
            timings.iter().map(|t| t.prompt_tokens).sum(),
            ttft.iter().sum(),
        ),
        decode_tokens_per_s: rate(
            timings.iter().map(|t| t.decode_steps).sum(),
            timings.iter().map(|t| t.decode_ms).sum(),
        ),
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 95.0), 95.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0], 50.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}

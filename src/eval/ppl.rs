//! Token-level perplexity with a sliding window (the strided evaluation of
//! the transformers perplexity guide): each document is cut into windows of
//! `window` tokens advancing by `stride`; a token is scored once, in the first
//! window where it is a target, with at least `window - stride` tokens of
//! context once the first window is past.

use tch::{Kind, Tensor};

use crate::model::{CausalLm, ModelError};

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Perplexity {
    /// Σ −log p over scored tokens (nats).
    pub nll: f64,
    pub tokens: usize,
    pub documents: usize,
}

impl Perplexity {
    pub fn ppl(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            (self.nll / self.tokens as f64).exp()
        }
    }
    pub fn add(&mut self, other: Perplexity) {
        self.nll += other.nll;
        self.tokens += other.tokens;
        self.documents += other.documents;
    }
}

/// Positions of the output head computed at once (bounds the f32 logits
/// held in memory over a 152k vocabulary).
const HEAD_CHUNK: i64 = 256;

/// Perplexity of one document (its first token is never a target).
pub fn document_perplexity(
    model: &CausalLm,
    ids: &[u32],
    window: usize,
    stride: usize,
) -> Result<Perplexity, ModelError> {
    let _guard = tch::no_grad_guard();
    let window = window.min(model.max_positions()).max(2);
    // Windows overlap by at least one token, so every token but the first
    // has a predictor.
    let stride = stride.clamp(1, window - 1);
    let mut out = Perplexity {
        documents: 1,
        ..Default::default()
    };
    if ids.len() < 2 {
        return Ok(out);
    }
    let all: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let mut prev_end = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + window).min(all.len());
        // Targets are the tokens in (max(prev_end, begin+1) .. end].
        let first_target = prev_end.max(begin + 1);
        let input = Tensor::from_slice(&all[begin..end]).unsqueeze(0);
        let hidden = model.forward_hidden(&input, None)?.squeeze_dim(0); // (len, hidden)
                                                                         // Position p predicts token p+1: predictors of targets t are t-1.
        let from = (first_target - 1 - begin) as i64;
        let count = (end - first_target) as i64;
        let targets = Tensor::from_slice(&all[first_target..end]).to_device(model.device());
        let mut start = 0;
        while start < count {
            let n = HEAD_CHUNK.min(count - start);
            let h = hidden.narrow(0, from + start, n);
            let logp = model.lm_head.forward(&h).log_softmax(-1, Kind::Float);
            let t = targets.narrow(0, start, n).unsqueeze(1);
            out.nll -= logp
                .gather(1, &t, false)
                .sum(Kind::Double)
                .double_value(&[]);
            start += n;
        }
        out.tokens += count as usize;
        prev_end = end;
        if end == all.len() {
            break;
        }
        begin += stride;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{load_dir, LoadOptions};
    use std::path::PathBuf;

    fn model() -> CausalLm {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
        load_dir(
            &dir,
            LoadOptions {
                device: tch::Device::Cpu,
                kind: Kind::Float,
            },
        )
        .unwrap()
    }

    /// With a window covering the document, the sliding evaluation is the
    /// plain mean NLL of one forward pass.
    #[test]
    fn full_window_equals_one_pass() {
        let m = model();
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 400 + 20) as u32).collect();
        let p = document_perplexity(&m, &ids, 64, 32).unwrap();
        assert_eq!(p.tokens, 39);
        let input =
            Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
        let logp = m
            .forward(&input, None)
            .unwrap()
            .get(0)
            .log_softmax(-1, Kind::Float);
        let t = Tensor::from_slice(&ids[1..].iter().map(|&t| t as i64).collect::<Vec<_>>())
            .unsqueeze(1);
        let nll = -logp
            .narrow(0, 0, 39)
            .gather(1, &t, false)
            .sum(Kind::Double)
            .double_value(&[]);
        assert!((p.nll - nll).abs() < 1e-3, "{} vs {nll}", p.nll);
    }

    /// Sliding windows score every target exactly once.
    #[test]
    fn sliding_scores_each_token_once() {
        let m = model();
        let ids: Vec<u32> = (0..100).map(|i| (i * 13 % 400 + 20) as u32).collect();
        for (w, s) in [(16, 8), (32, 32), (10, 3)] {
            assert_eq!(
                document_perplexity(&m, &ids, w, s).unwrap().tokens,
                99,
                "window {w} stride {s}"
            );
        }
    }
}

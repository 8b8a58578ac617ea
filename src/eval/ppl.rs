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
    corpus_perplexity(model, &[ids], window, stride, 1, &mut |_| {})
}

/// One window of a document: its tokens `begin..end`, of which
/// `first_target..end` are scored.
#[derive(Debug, Clone, Copy)]
struct Window {
    doc: usize,
    begin: usize,
    end: usize,
    first_target: usize,
}

/// The windows of a document of `len` tokens: a token is a target in the
/// first window where it is one.
fn windows(doc: usize, len: usize, window: usize, stride: usize, out: &mut Vec<Window>) {
    if len < 2 {
        return;
    }
    let (mut prev_end, mut begin) = (0, 0);
    loop {
        let end = (begin + window).min(len);
        out.push(Window {
            doc,
            begin,
            end,
            first_target: prev_end.max(begin + 1),
        });
        prev_end = end;
        if end == len {
            break;
        }
        begin += stride;
    }
}

/// Perplexity over `docs`, their windows run `batch` at a time: the windows
/// of all documents, longest first, right-padded to the longest of their
/// batch. Right padding changes nothing a real position computes (attention
/// is causal: no position sees the ones after it), so batching only changes
/// floating-point rounding. `on_scored` sees the targets scored after each
/// batch.
pub fn corpus_perplexity(
    model: &CausalLm,
    docs: &[impl AsRef<[u32]>],
    window: usize,
    stride: usize,
    batch: usize,
    on_scored: &mut dyn FnMut(usize),
) -> Result<Perplexity, ModelError> {
    let _guard = tch::no_grad_guard();
    let window = window.min(model.max_positions()).max(2);
    // Windows overlap by at least one token, so every token but the first
    // has a predictor.
    let stride = stride.clamp(1, window - 1);
    let mut out = Perplexity {
        documents: docs.len(),
        ..Default::default()
    };
    let mut all = Vec::new();
    for (d, ids) in docs.iter().enumerate() {
        windows(d, ids.as_ref().len(), window, stride, &mut all);
    }
    all.sort_by_key(|w| std::cmp::Reverse(w.end - w.begin));
    for chunk in all.chunks(batch.max(1)) {
        let longest = chunk[0].end - chunk[0].begin;
        let mut input = vec![0i64; chunk.len() * longest];
        for (row, w) in chunk.iter().enumerate() {
            let ids = &docs[w.doc].as_ref()[w.begin..w.end];
            for (slot, &t) in input[row * longest..].iter_mut().zip(ids) {
                *slot = t as i64;
            }
        }
        let input = Tensor::from_slice(&input).view([chunk.len() as i64, longest as i64]);
        let hidden = model.forward_hidden(&input, None)?; // (rows, longest, hidden)
        let mut scored = 0;
        for (row, w) in chunk.iter().enumerate() {
            let ids = docs[w.doc].as_ref();
            // Position p predicts token p+1: predictors of targets t are t-1.
            let from = (w.first_target - 1 - w.begin) as i64;
            let count = (w.end - w.first_target) as i64;
            let targets: Vec<i64> = ids[w.first_target..w.end]
                .iter()
                .map(|&t| t as i64)
                .collect();
            let targets = Tensor::from_slice(&targets).to_device(model.device());
            let hidden = hidden.get(row as i64);
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
            scored += count as usize;
        }
        out.tokens += scored;
        on_scored(scored);
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

    /// Windows of several documents run in right-padded batches score the
    /// same tokens with the same log-likelihood as one window at a time.
    #[test]
    fn batched_windows_equal_one_at_a_time() {
        let m = model();
        let docs: Vec<Vec<u32>> = [100usize, 37, 1, 64, 9]
            .iter()
            .enumerate()
            .map(|(d, &n)| {
                (0..n)
                    .map(|i| ((i * 13 + d * 101) % 400 + 20) as u32)
                    .collect()
            })
            .collect();
        let mut alone = Perplexity::default();
        for doc in &docs {
            alone.add(document_perplexity(&m, doc, 32, 16).unwrap());
        }
        let mut reported = 0;
        let batched = corpus_perplexity(&m, &docs, 32, 16, 3, &mut |n| reported += n).unwrap();
        assert_eq!(batched.tokens, alone.tokens);
        assert_eq!(batched.tokens, 99 + 36 + 63 + 8);
        assert_eq!(reported, batched.tokens);
        assert_eq!(batched.documents, 5);
        let rel = (batched.nll - alone.nll).abs() / alone.nll;
        assert!(rel < 1e-5, "batched nll {} vs {}", batched.nll, alone.nll);
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

//! Next-token choice: greedy, or temperature with top-k / top-p (nucleus)
//! sampling from a seeded generator, so a given seed always gives the same text.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Picks the next token from `logits` (vocab,), any dtype, any device.
    pub fn sample(&mut self, logits: &Tensor) -> u32 {
        if self.is_greedy() {
            return logits.argmax(-1, false).int64_value(&[]) as u32;
        }
        let probs = (logits.to_kind(Kind::Float) / self.params.temperature)
            .softmax(-1, Kind::Float)
            .to_device(tch::Device::Cpu);
        let probs: Vec<f32> = match Vec::<f32>::try_from(&probs) {
            Ok(v) => v,
            Err(_) => return logits.argmax(-1, false).int64_value(&[]) as u32,
        };
        let candidates = nucleus(&probs, self.params.top_k, self.params.top_p);
        let total: f64 = candidates.iter().map(|&(p, _)| p as f64).sum();
        let mut r = self.rng.random::<f64>() * total;
        for &(p, id) in &candidates {
            r -= p as f64;
            if r <= 0.0 {
                return id;
            }
        }
        candidates.last().map_or(0, |&(_, id)| id)
    }
}

/// The most likely tokens, in descending probability, cut to `top_k` and to
/// the smallest prefix whose mass reaches `top_p`. Grows a partial selection
/// instead of sorting a 150k vocabulary every step.
fn nucleus(probs: &[f32], top_k: usize, top_p: f64) -> Vec<(f32, u32)> {
    let mut all: Vec<(f32, u32)> = probs
        .iter()
        .enumerate()
        .filter(|(_, p)| **p > 0.0)
        .map(|(i, &p)| (p, i as u32))
        .collect();
    let limit = if top_k == 0 {
        all.len()
    } else {
        top_k.min(all.len())
    };
    let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut k = 64.min(limit);
    loop {
        if k < all.len() {
            all.select_nth_unstable_by(k, desc);
        }
        let mut head: Vec<(f32, u32)> = all[..k].to_vec();
        head.sort_unstable_by(desc);
        let mut mass = 0.0f64;
        for (n, &(p, _)) in head.iter().enumerate() {
            mass += p as f64;
            if mass >= top_p {
                head.truncate(n + 1);
                return head;
            }
        }
        if k >= limit {
            return head;
        }
        k = (k * 4).min(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_keeps_the_smallest_covering_set() {
        let probs = [0.1, 0.5, 0.05, 0.3, 0.05];
        let ids: Vec<u32> = nucleus(&probs, 0, 0.8).iter().map(|c| c.1).collect();
        assert_eq!(ids, vec![1, 3]);
        let ids: Vec<u32> = nucleus(&probs, 1, 1.0).iter().map(|c| c.1).collect();
        assert_eq!(ids, vec![1]);
        assert_eq!(nucleus(&probs, 0, 1.0).len(), 5);
    }

    #[test]
    fn nucleus_grows_past_the_first_window() {
        let probs = vec![1.0 / 1000.0; 1000];
        assert_eq!(nucleus(&probs, 0, 0.5).len(), 500);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 0.5, 1.5]);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = || {
            let mut s = Sampler::new(params);
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(a.iter().any(|&t| t != a[0]), "sampling never varied: {a:?}");
    }
}

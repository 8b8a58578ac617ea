//! Autoregressive generation with a preallocated KV cache: one prefill pass
//! over the prompt, then one decode pass per new token, stopping at any stop
//! token, at `max_new_tokens`, or when the context is full.

use std::time::{Duration, Instant};

use tch::Tensor;

use super::sampling::{Sampler, SamplingParams};
use crate::model::{CausalLm, ModelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model emitted this stop token (not included in the output).
    StopToken(u32),
    MaxTokens,
    /// The sequence reached `max_position_embeddings`.
    ContextFull,
    /// The caller's `stop_after` said the output is complete (a stop sequence).
    Caller,
}

impl StopReason {
    pub fn describe(&self) -> String {
        match self {
            StopReason::StopToken(id) => format!("stop token {id}"),
            StopReason::MaxTokens => "max_new_tokens".into(),
            StopReason::ContextFull => "context full".into(),
            StopReason::Caller => "stop sequence".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Prompt pass until the first new token is chosen (time to first token).
    pub prefill: Duration,
    /// All later passes.
    pub decode: Duration,
    /// Number of decode passes timed in `decode`.
    pub decode_steps: usize,
}

/// Generates up to `max_new_tokens` after `prompt`. `on_token` sees each new
/// token as it is chosen (for streaming).
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_ids: &[u32],
    sampling: SamplingParams,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generated, ModelError> {
    generate_until(
        model,
        prompt,
        max_new_tokens,
        stop_ids,
        sampling,
        &mut |id| {
            on_token(id);
            false
        },
    )
}

/// [`generate`], where `stop_after` sees each new token and ends the
/// generation by returning true (after that token, which is kept): for stop
/// sequences that are text, not single tokens.
pub fn generate_until(
    model: &CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_ids: &[u32],
    sampling: SamplingParams,
    stop_after: &mut dyn FnMut(u32) -> bool,
) -> Result<Generated, ModelError> {
    check_prompt(model, prompt)?;
    let max_pos = model.max_positions();
    let capacity = (prompt.len() + max_new_tokens).min(max_pos);
    let mut tokens = Vec::with_capacity(max_new_tokens);
    if max_new_tokens == 0 {
        return Ok(Generated {
            tokens,
            stop: StopReason::MaxTokens,
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            decode_steps: 0,
        });
    }
    let mut cache = model.new_cache(1, capacity)?;
    let mut sampler = Sampler::new(sampling);
    let _guard = tch::no_grad_guard();
    let step = |ids: &[i64], cache: &mut crate::model::KvCache| {
        let input = Tensor::from_slice(ids).unsqueeze(0);
        model.forward_last(&input, Some(cache))
    };

    let start = Instant::now();
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let logits = step(&ids, &mut cache)?;
    let mut next = sampler.sample(&logits.get(0));
    let prefill = start.elapsed();

    let decode_start = Instant::now();
    let _threads = model.own_cpu_kernels.then(|| TorchThreads::set(1));
    let mut decode_steps = 0;
    let stop = loop {
        if stop_ids.contains(&next) {
            break StopReason::StopToken(next);
        }
        tokens.push(next);
        if stop_after(next) {
            break StopReason::Caller;
        }
        if tokens.len() >= max_new_tokens {
            break StopReason::MaxTokens;
        }
        if cache.len() >= capacity {
            break StopReason::ContextFull;
        }
        let logits = step(&[next as i64], &mut cache)?;
        decode_steps += 1;
        next = sampler.sample(&logits.get(0));
    };
    Ok(Generated {
        tokens,
        stop,
        prefill,
        decode: decode_start.elapsed(),
        decode_steps,
    })
}

fn check_prompt(model: &CausalLm, prompt: &[u32]) -> Result<(), ModelError> {
    let max_pos = model.max_positions();
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    if prompt.len() > max_pos {
        return Err(ModelError::TooLong {
            what: "the prompt",
            len: prompt.len(),
            max: max_pos,
        });
    }
    let vocab = model.config().vocab_size;
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::TokenOutOfRange {
            id: id as i64,
            vocab,
        });
    }
    Ok(())
}

/// [`generate_until`] for several prompts at once, in one left-padded batch
/// (`CausalLm::new_padded_cache`): each step runs every row through the
/// model together, which on a GPU (and with the multi-row CPU kernels) costs
/// little more than one row. `stop_after(row, id)` sees each new token of
/// each row. A finished row leaves the batch (its rows of the KV cache are
/// dropped), so the steps after it compute only the rows still going. Each
/// row's `prefill` is the batch's, its `decode` the time until it finished.
/// The results are in the prompts' order.
///
/// Rows get the same tokens as alone up to floating-point rounding: the
/// batch takes other kernels (a padded prompt pass, batched products), so
/// where two candidates' logits nearly tie, greedy choices can differ.
pub fn generate_batch_until(
    model: &CausalLm,
    prompts: &[&[u32]],
    max_new_tokens: usize,
    stop_ids: &[u32],
    sampling: SamplingParams,
    stop_after: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Vec<Generated>, ModelError> {
    if let [prompt] = prompts {
        let out = generate_until(
            model,
            prompt,
            max_new_tokens,
            stop_ids,
            sampling,
            &mut |id| stop_after(0, id),
        )?;
        return Ok(vec![out]);
    }
    for prompt in prompts {
        check_prompt(model, prompt)?;
    }
    let rows = prompts.len();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let capacity = (longest + max_new_tokens).min(model.max_positions());
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut stops: Vec<Option<StopReason>> = vec![None; rows];
    let mut decode_times = vec![Duration::ZERO; rows];
    let mut decode_steps = vec![0usize; rows];
    if rows == 0 || max_new_tokens == 0 {
        return Ok((0..rows)
            .map(|_| Generated {
                tokens: Vec::new(),
                stop: StopReason::MaxTokens,
                prefill: Duration::ZERO,
                decode: Duration::ZERO,
                decode_steps: 0,
            })
            .collect());
    }
    let mut cache = model.new_padded_cache(&pads, capacity)?;
    let mut samplers: Vec<Sampler> = (0..rows).map(|_| Sampler::new(sampling)).collect();
    let _guard = tch::no_grad_guard();

    let start = Instant::now();
    // Padding is token 0 (any id in the vocabulary: no real token sees it).
    let mut ids = vec![0i64; rows * longest];
    for (row, prompt) in prompts.iter().enumerate() {
        for (slot, &t) in ids[row * longest + pads[row]..]
            .iter_mut()
            .zip(prompt.iter())
        {
            *slot = t as i64;
        }
    }
    let input = Tensor::from_slice(&ids).view([rows as i64, longest as i64]);
    let logits = model.forward_last(&input, Some(&mut cache))?;
    let mut next: Vec<u32> = (0..rows)
        .map(|row| samplers[row].sample(&logits.get(row as i64)))
        .collect();
    let prefill = start.elapsed();

    let decode_start = Instant::now();
    let _threads = model.own_cpu_kernels.then(|| TorchThreads::set(1));
    let mut live: Vec<usize> = (0..rows).collect();
    loop {
        for row in 0..rows {
            if stops[row].is_some() {
                continue;
            }
            let id = next[row];
            let stop = if stop_ids.contains(&id) {
                Some(StopReason::StopToken(id))
            } else {
                tokens[row].push(id);
                if stop_after(row, id) {
                    Some(StopReason::Caller)
                } else if tokens[row].len() >= max_new_tokens {
                    Some(StopReason::MaxTokens)
                } else if cache.len() >= capacity {
                    Some(StopReason::ContextFull)
                } else {
                    None
                }
            };
            if stop.is_some() {
                stops[row] = stop;
                decode_times[row] = decode_start.elapsed();
            }
        }
        if stops.iter().all(Option::is_some) {
            break;
        }
        // The cache's rows are the prompts in `live`; drop the finished ones.
        let keep: Vec<usize> = (0..live.len())
            .filter(|&i| stops[live[i]].is_none())
            .collect();
        if keep.len() < live.len() {
            cache.retain_rows(&keep)?;
            live = keep.iter().map(|&i| live[i]).collect();
        }
        let step: Vec<i64> = live.iter().map(|&row| next[row] as i64).collect();
        let input = Tensor::from_slice(&step).view([live.len() as i64, 1]);
        let logits = model.forward_last(&input, Some(&mut cache))?;
        for (i, &row) in live.iter().enumerate() {
            decode_steps[row] += 1;
            next[row] = samplers[row].sample(&logits.get(i as i64));
        }
    }
    Ok(tokens
        .into_iter()
        .zip(stops)
        .zip(decode_times.into_iter().zip(decode_steps))
        .map(|((tokens, stop), (decode, decode_steps))| Generated {
            tokens,
            stop: stop.expect("every row stopped"),
            prefill,
            decode,
            decode_steps,
        })
        .collect())
}

/// libtorch's intra-op thread count for a scope, restored on drop.
struct TorchThreads(i32);

impl TorchThreads {
    fn set(n: i32) -> Self {
        let old = tch::get_num_threads();
        tch::set_num_threads(n);
        Self(old)
    }
}

impl Drop for TorchThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

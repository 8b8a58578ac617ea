//! Evaluation of models on held-out code.

pub mod fim;
pub mod gate;
pub mod humaneval;
pub mod latency;
pub mod plot;
pub mod ppl;
pub mod sandbox;

use crate::infer::{generate_batch_until, Generated, SamplingParams};
use crate::model::{CausalLm, ModelError};
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// Greedy completions of `prompts`, each cut by `cut` (the prompt's index
/// and the decoded text → the part kept), in batches of up to `batch` prompts of similar length
/// (fewer padding positions): a row stops as soon as its cut drops
/// something, so no token is spent past the cut. Returns, in the prompts'
/// order, the kept text and the generation of each. `on_done` sees the
/// number of prompts finished after each batch.
pub(crate) fn complete_until_cut<E: From<ModelError> + From<TokenizerError>>(
    model: &CausalLm,
    tokenizer: &CodeTokenizer,
    prompts: &[Vec<u32>],
    cut: &dyn Fn(usize, &str) -> &str,
    (max_new_tokens, stop_ids): (usize, &[u32]),
    batch: usize,
    on_done: &mut dyn FnMut(usize),
) -> Result<Vec<(String, Generated)>, E> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut out: Vec<Option<(String, Generated)>> = (0..prompts.len()).map(|_| None).collect();
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); chunk.len()];
        let mut stream_err = None;
        let generated = generate_batch_until(
            model,
            &rows,
            max_new_tokens,
            stop_ids,
            SamplingParams::default(),
            &mut |row, id| {
                ids[row].push(id);
                // Decoding the whole text each step costs little next to a
                // forward pass, and is right across multi-token characters.
                match tokenizer.decode(&ids[row], false) {
                    Ok(text) => cut(chunk[row], &text).len() < text.len(),
                    Err(e) => {
                        stream_err = Some(e);
                        true
                    }
                }
            },
        )?;
        if let Some(e) = stream_err {
            return Err(e.into());
        }
        for (&i, generated) in chunk.iter().zip(generated) {
            let text = tokenizer.decode(&generated.tokens, false)?;
            out[i] = Some((cut(i, &text).to_string(), generated));
        }
        on_done(chunk.len());
    }
    Ok(out
        .into_iter()
        .map(|o| o.expect("every prompt completed"))
        .collect())
}

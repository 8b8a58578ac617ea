//! Evaluation of models on held-out code.

pub mod fim;
pub mod gate;
pub mod humaneval;
pub mod latency;
pub mod plot;
pub mod ppl;
pub mod sandbox;

use crate::infer::{generate_until, Generated, SamplingParams};
use crate::model::{CausalLm, ModelError};
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// Greedy completion of `prompt` cut by `cut` (the decoded text → the part
/// kept): generation stops as soon as `cut` drops something, so no token is
/// spent past the cut. Returns the kept text and the generation.
pub(crate) fn complete_until_cut<E: From<ModelError> + From<TokenizerError>>(
    model: &CausalLm,
    tokenizer: &CodeTokenizer,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_ids: &[u32],
    cut: impl Fn(&str) -> &str,
) -> Result<(String, Generated), E> {
    let mut ids = Vec::new();
    let mut stream_err = None;
    let out = generate_until(
        model,
        prompt,
        max_new_tokens,
        stop_ids,
        SamplingParams::default(),
        &mut |id| {
            ids.push(id);
            // Decoding the whole text each step costs little next to a
            // forward pass, and is right across multi-token characters.
            match tokenizer.decode(&ids, false) {
                Ok(text) => cut(&text).len() < text.len(),
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
    let text = tokenizer.decode(&out.tokens, false)?;
    Ok((cut(&text).to_string(), out))
}

//! Fill-in-the-middle on held-out code, the IDE completion metric: hide a
//! span of a file (one line, or a block of 2–8 lines), let the model write the
//! middle from the prefix and suffix, and compare.
//!
//! - exact match: the completion is byte-for-byte the hidden text;
//! - accepted: the completion would be accepted as-is — the same lines once
//!   trailing whitespace is trimmed from each line and trailing blank lines
//!   are dropped (what an editor's "trim trailing whitespace" makes equal);
//! - edit similarity: 1 − Levenshtein(completion, hidden) / max(len), over
//!   characters (1 for equal strings, 0 for entirely different ones).
//!
//! The hidden span is whole lines without the final newline: the prefix ends
//! at the start of the first hidden line and the suffix starts with the
//! newline after the last one, so the cursor sits where a user would type.
//!
//! A completion is as many lines as the hidden span, as an editor showing a
//! completion of that size would insert (line-level completion benchmarks
//! such as RepoBench and CrossCodeEval likewise score the first line):
//! generation stops at the newline that would start one line more, and the
//! text is cut there. Without the cut a model that writes on into the suffix
//! is never accepted, and each sample costs the full token budget.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::infer::Generated;
use crate::model::{CausalLm, ModelError};
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// Context kept around the hole, cut at line boundaries, so that one sample
/// costs about the same on any file (Qwen2.5-Coder's own FIM evals keep a
/// few thousand characters too).
pub const MAX_PREFIX_CHARS: usize = 2048;
pub const MAX_SUFFIX_CHARS: usize = 1024;
/// Tokens a middle may run to; a block of 8 lines of code is about 100.
pub const MAX_NEW_TOKENS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum FimError {
    #[error("the eval data has no file with a non-blank line to hide")]
    NothingToHide,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FimSample {
    /// Index of the document in the eval data.
    pub document: usize,
    /// First hidden line (0-based) and number of hidden lines.
    pub first_line: usize,
    pub lines: usize,
    pub prefix: String,
    pub middle: String,
    pub suffix: String,
}

/// `n` samples, the same for a given seed and data: documents in a seeded
/// random order (cycling when `n` exceeds their number), a hidden span in each.
pub fn sample_spans(texts: &[String], n: usize, seed: u64) -> Result<Vec<FimSample>, FimError> {
    let mut eligible: Vec<usize> = (0..texts.len())
        .filter(|&i| texts[i].lines().any(|l| !l.trim().is_empty()))
        .collect();
    if eligible.is_empty() {
        return Err(FimError::NothingToHide);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    eligible.shuffle(&mut rng);
    Ok((0..n)
        .map(|i| {
            let document = eligible[i % eligible.len()];
            span(&texts[document], document, &mut rng)
        })
        .collect())
}

fn span(text: &str, document: usize, rng: &mut StdRng) -> FimSample {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let blank = |l: &&str| l.trim().is_empty();
    let (first_line, count) = loop {
        let want = if rng.random_bool(0.5) {
            1
        } else {
            rng.random_range(2..=8)
        };
        let count = want.min(lines.len());
        let first = rng.random_range(0..=lines.len() - count);
        // Hiding only blank lines tests nothing; some line of the span must
        // have code (the document has one, so this ends).
        if !lines[first..first + count].iter().all(blank) {
            break (first, count);
        }
    };
    let mut prefix: String = lines[..first_line].concat();
    let mut middle: String = lines[first_line..first_line + count].concat();
    let mut suffix: String = lines[first_line + count..].concat();
    if middle.ends_with('\n') {
        middle.pop();
        suffix.insert(0, '\n');
    }
    if prefix.len() > MAX_PREFIX_CHARS {
        let mut cut = prefix.len() - MAX_PREFIX_CHARS;
        while !prefix.is_char_boundary(cut) {
            cut += 1;
        }
        // Start at the first line that begins inside the kept window.
        let start = prefix[cut..]
            .find('\n')
            .map_or(prefix.len(), |p| cut + p + 1);
        prefix.drain(..start);
    }
    if suffix.len() > MAX_SUFFIX_CHARS {
        let mut end = MAX_SUFFIX_CHARS;
        while !suffix.is_char_boundary(end) {
            end -= 1;
        }
        let end = suffix[..end].rfind('\n').map_or(0, |p| p + 1);
        suffix.truncate(end);
    }
    FimSample {
        document,
        first_line,
        lines: count,
        prefix,
        middle,
        suffix,
    }
}

/// Levenshtein distance over characters (two-row dynamic programme).
pub fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// 1 − Levenshtein / max length in characters; 1 for two empty strings.
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let len = a.chars().count().max(b.chars().count());
    if len == 0 {
        return 1.0;
    }
    1.0 - levenshtein(a, b) as f64 / len as f64
}

fn normalise(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim_end).collect();
    lines.join("\n").trim_end_matches('\n').to_string()
}

/// Whether a completion would be accepted as-is (see the module docs).
pub fn accepted(completion: &str, middle: &str) -> bool {
    normalise(completion) == normalise(middle)
}

#[derive(Debug, Clone, Serialize)]
pub struct FimResult {
    pub document: usize,
    pub first_line: usize,
    pub lines: usize,
    pub middle: String,
    pub completion: String,
    pub exact: bool,
    pub accepted: bool,
    pub edit_similarity: f64,
}

/// Means over the samples.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FimScores {
    pub samples: usize,
    pub exact_match: f64,
    pub accept_rate: f64,
    pub edit_similarity: f64,
}

pub fn scores(results: &[FimResult]) -> FimScores {
    let n = results.len();
    if n == 0 {
        return FimScores::default();
    }
    let mean = |f: &dyn Fn(&FimResult) -> f64| results.iter().map(f).sum::<f64>() / n as f64;
    FimScores {
        samples: n,
        exact_match: mean(&|r| f64::from(u8::from(r.exact))),
        accept_rate: mean(&|r| f64::from(u8::from(r.accepted))),
        edit_similarity: mean(&|r| r.edit_similarity),
    }
}

/// The prefix-suffix-middle prompt of `sample` in at most `max_tokens` ids:
/// when the context is too long for the model, the start of the prefix and
/// the end of the suffix go first (two thirds of the room for the prefix).
pub fn prompt(
    tokenizer: &CodeTokenizer,
    sample: &FimSample,
    max_tokens: usize,
) -> Result<Vec<u32>, FimError> {
    let fim = tokenizer.fim().ok_or(TokenizerError::NoFim)?;
    let mut prefix = tokenizer.encode(&sample.prefix, false)?;
    let mut suffix = tokenizer.encode(&sample.suffix, false)?;
    let room = max_tokens.saturating_sub(3);
    if prefix.len() + suffix.len() > room {
        let keep_suffix = suffix
            .len()
            .min(room / 3)
            .max(room.saturating_sub(prefix.len()));
        suffix.truncate(keep_suffix);
        let keep_prefix = room - suffix.len();
        prefix.drain(..prefix.len() - keep_prefix);
    }
    let mut ids = Vec::with_capacity(prefix.len() + suffix.len() + 3);
    ids.push(fim.prefix);
    ids.extend(prefix);
    ids.push(fim.suffix);
    ids.extend(suffix);
    ids.push(fim.middle);
    Ok(ids)
}

/// Generates a middle for `sample` (greedy; at most `max_new_tokens`, ending
/// at `stop_ids`); returns its text, the generation with its timings, and
/// the prompt length.
pub fn complete(
    model: &CausalLm,
    tokenizer: &CodeTokenizer,
    stop_ids: &[u32],
    sample: &FimSample,
    max_new_tokens: usize,
) -> Result<(String, Generated, usize), FimError> {
    let mut out = complete_batch(
        model,
        tokenizer,
        stop_ids,
        std::slice::from_ref(sample),
        max_new_tokens,
        1,
        &mut |_| {},
    )?;
    Ok(out.pop().expect("one sample, one completion"))
}

/// [`complete`] for many samples, generated in batches of up to `batch`
/// prompts (see `complete_until_cut`); `on_done` sees how many finished
/// after each batch.
pub fn complete_batch(
    model: &CausalLm,
    tokenizer: &CodeTokenizer,
    stop_ids: &[u32],
    samples: &[FimSample],
    max_new_tokens: usize,
    batch: usize,
    on_done: &mut dyn FnMut(usize),
) -> Result<Vec<(String, Generated, usize)>, FimError> {
    let room = model.max_positions().saturating_sub(max_new_tokens);
    let prompts = samples
        .iter()
        .map(|sample| prompt(tokenizer, sample, room))
        .collect::<Result<Vec<_>, _>>()?;
    let done = super::complete_until_cut::<FimError>(
        model,
        tokenizer,
        &prompts,
        &|i, text| cut_lines(text, samples[i].lines),
        (max_new_tokens, stop_ids),
        batch,
        on_done,
    )?;
    Ok(done
        .into_iter()
        .zip(&prompts)
        .map(|((text, out), p)| (text, out, p.len()))
        .collect())
}

/// The first `lines` lines of `text`, without the newline that ends the last.
pub fn cut_lines(text: &str, lines: usize) -> &str {
    match text.match_indices('\n').nth(lines.saturating_sub(1)) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// Scores one completion of `sample`.
pub fn score(sample: &FimSample, completion: String) -> FimResult {
    FimResult {
        document: sample.document,
        first_line: sample.first_line,
        lines: sample.lines,
        exact: completion == sample.middle,
        accepted: accepted(&completion, &sample.middle),
        edit_similarity: edit_similarity(&completion, &sample.middle),
        middle: sample.middle.clone(),
        completion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<String> {
        vec![
            "def add(a, b):\n    return a + b\n".into(),
            "\n\n".into(),
            (0..40).map(|i| format!("x{i} = {i}\n")).collect(),
        ]
    }

    #[test]
    fn spans_are_deterministic_and_reassemble() {
        let texts = docs();
        let a = sample_spans(&texts, 20, 7).unwrap();
        assert_eq!(a, sample_spans(&texts, 20, 7).unwrap());
        assert_ne!(a, sample_spans(&texts, 20, 8).unwrap());
        for s in &a {
            assert_ne!(s.document, 1, "blank documents are skipped");
            assert!((1..=8).contains(&s.lines));
            assert!(!s.middle.trim().is_empty());
            assert!(!s.middle.ends_with('\n'));
            let whole = format!("{}{}{}", s.prefix, s.middle, s.suffix);
            assert!(texts[s.document].contains(&whole), "{s:?}");
        }
        assert!(matches!(
            sample_spans(&texts[1..2], 3, 0),
            Err(FimError::NothingToHide)
        ));
    }

    #[test]
    fn long_context_is_cut_at_line_boundaries() {
        let text: String = (0..2000).map(|i| format!("value_{i} = {i}\n")).collect();
        for s in sample_spans(std::slice::from_ref(&text), 10, 1).unwrap() {
            assert!(s.prefix.len() <= MAX_PREFIX_CHARS);
            assert!(s.suffix.len() <= MAX_SUFFIX_CHARS);
            assert!(s.prefix.is_empty() || s.prefix.ends_with('\n'));
            assert!(text.contains(&format!("{}{}{}", s.prefix, s.middle, s.suffix)));
        }
    }

    #[test]
    fn metrics() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert!((edit_similarity("kitten", "sitting") - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
        assert_eq!(edit_similarity("", ""), 1.0);
        assert!(accepted("    x = 1  \n", "    x = 1"));
        assert!(accepted("a\nb", "a  \nb"));
        assert!(!accepted("  x = 1", "    x = 1"));
        let s = FimSample {
            document: 0,
            first_line: 0,
            lines: 1,
            prefix: String::new(),
            middle: "x = 1".into(),
            suffix: String::new(),
        };
        let r = score(&s, "x = 1 ".into());
        assert!(!r.exact && r.accepted);
        let sc = scores(&[r, score(&s, "x = 1".into())]);
        assert_eq!((sc.exact_match, sc.accept_rate), (0.5, 1.0));
    }

    #[test]
    fn completions_are_cut_at_the_span_line_count() {
        assert_eq!(cut_lines("a\nb\nc", 1), "a");
        assert_eq!(cut_lines("a\nb\nc", 2), "a\nb");
        assert_eq!(cut_lines("a\nb", 2), "a\nb");
        assert_eq!(cut_lines("a\nb\n", 2), "a\nb");
        assert_eq!(cut_lines("\nx", 1), "");
        assert_eq!(cut_lines("abc", 3), "abc");
    }
}

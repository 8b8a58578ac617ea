//! Fill-in-the-middle samples the way Qwen2.5-Coder (after StarCoder and
//! bigcode's Megatron-LM `permute`) was trained: a document is split at two
//! random *character* positions into prefix / middle / suffix, each piece is
//! tokenised on its own, and the pieces are joined with the FIM tokens:
//!
//! PSM: `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>M`
//! SPM: `<|fim_prefix|><|fim_suffix|>S<|fim_middle|>PM` (bigcode's SPM variant)
//!
//! Randomness comes from a per-document generator derived from the seed and
//! the document's index, so tokenisation can run in parallel and still give
//! the same samples on every run.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::tokenizer::{CodeTokenizer, FimTokens, TokenizerError};

/// How a document becomes a training sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FimMode {
    /// Left to right, as written.
    Plain,
    Psm,
    Spm,
}

/// FIM rates of a run.
#[derive(Debug, Clone, Copy)]
pub struct FimSpec {
    pub fim_rate: f64,
    pub spm_rate: f64,
}

/// A generator for document `index` of a run seeded with `seed`.
pub fn doc_rng(seed: u64, index: u64) -> StdRng {
    // splitmix64 of (seed, index): distinct, well-mixed streams per document.
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// Draws the mode and, for FIM, the two character split points (sorted).
pub fn draw(text: &str, spec: FimSpec, rng: &mut impl Rng) -> (FimMode, usize, usize) {
    if rng.random::<f64>() >= spec.fim_rate {
        return (FimMode::Plain, 0, 0);
    }
    let n_chars = text.chars().count();
    let a = rng.random_range(0..=n_chars);
    let b = rng.random_range(0..=n_chars);
    let (lo, hi) = (a.min(b), a.max(b));
    let mode = if rng.random::<f64>() < spec.spm_rate {
        FimMode::Spm
    } else {
        FimMode::Psm
    };
    (mode, lo, hi)
}

/// Splits `text` at character positions `lo <= hi` into (prefix, middle, suffix).
pub fn split_chars(text: &str, lo: usize, hi: usize) -> (&str, &str, &str) {
    let byte = |c: usize| text.char_indices().nth(c).map_or(text.len(), |(i, _)| i);
    let (lo, hi) = (byte(lo), byte(hi));
    (&text[..lo], &text[lo..hi], &text[hi..])
}

/// One document as token ids (no EOS; packing adds it).
pub fn encode_document(
    tok: &CodeTokenizer,
    fim: Option<FimTokens>,
    text: &str,
    spec: FimSpec,
    rng: &mut impl Rng,
) -> Result<Vec<u32>, TokenizerError> {
    let (mode, lo, hi) = match fim {
        Some(_) => draw(text, spec, rng),
        None => (FimMode::Plain, 0, 0),
    };
    let Some(f) = fim.filter(|_| mode != FimMode::Plain) else {
        return tok.encode(text, false);
    };
    let (prefix, middle, suffix) = split_chars(text, lo, hi);
    let (p, m, s) = (
        tok.encode(prefix, false)?,
        tok.encode(middle, false)?,
        tok.encode(suffix, false)?,
    );
    let mut ids = Vec::with_capacity(p.len() + m.len() + s.len() + 3);
    match mode {
        FimMode::Psm => {
            ids.push(f.prefix);
            ids.extend(p);
            ids.push(f.suffix);
            ids.extend(s);
            ids.push(f.middle);
            ids.extend(m);
        }
        FimMode::Spm => {
            ids.push(f.prefix);
            ids.push(f.suffix);
            ids.extend(s);
            ids.push(f.middle);
            ids.extend(p);
            ids.extend(m);
        }
        FimMode::Plain => unreachable!("plain documents returned above"),
    }
    Ok(ids)
}

/// Tokenises all documents in parallel (rayon); document `i` draws its FIM
/// split from `doc_rng(seed, i)`, so the result does not depend on threads.
pub fn encode_all(
    tok: &CodeTokenizer,
    docs: &[String],
    spec: FimSpec,
    seed: u64,
) -> Result<Vec<Vec<u32>>, TokenizerError> {
    let fim = if spec.fim_rate > 0.0 {
        Some(tok.fim().ok_or(TokenizerError::NoFim)?)
    } else {
        None
    };
    docs.par_iter()
        .enumerate()
        .map(|(i, doc)| {
            let mut rng = doc_rng(seed, i as u64);
            encode_document(tok, fim, doc, spec, &mut rng)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_by_character() {
        let text = "aé€b";
        assert_eq!(split_chars(text, 1, 3), ("a", "é€", "b"));
        assert_eq!(split_chars(text, 0, 4), ("", "aé€b", ""));
        assert_eq!(split_chars(text, 4, 4), ("aé€b", "", ""));
    }

    #[test]
    fn rates_are_respected_and_deterministic() {
        let spec = FimSpec {
            fim_rate: 0.5,
            spm_rate: 0.25,
        };
        let text = "def f(x):\n    return x + 1\n";
        let mut counts = [0usize; 3];
        for i in 0..4000 {
            let (mode, lo, hi) = draw(text, spec, &mut doc_rng(7, i));
            assert!(lo <= hi && hi <= text.chars().count());
            counts[mode as usize] += 1;
            assert_eq!((mode, lo, hi), draw(text, spec, &mut doc_rng(7, i)));
        }
        let fim = (counts[1] + counts[2]) as f64 / 4000.0;
        let spm = counts[2] as f64 / (counts[1] + counts[2]) as f64;
        assert!((fim - 0.5).abs() < 0.05, "{counts:?}");
        assert!((spm - 0.25).abs() < 0.05, "{counts:?}");
        let never = FimSpec {
            fim_rate: 0.0,
            spm_rate: 1.0,
        };
        assert_eq!(draw(text, never, &mut doc_rng(1, 1)).0, FimMode::Plain);
    }

    #[test]
    fn psm_and_spm_layouts() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
        let tok = CodeTokenizer::from_model_dir(&dir).unwrap();
        let f = tok.fim().unwrap();
        let text = "import os\nprint(os.sep)\n";
        let always = |spm_rate| FimSpec {
            fim_rate: 1.0,
            spm_rate,
        };
        for (spm_rate, want) in [(0.0, FimMode::Psm), (1.0, FimMode::Spm)] {
            for i in 0..20 {
                let (mode, lo, hi) = draw(text, always(spm_rate), &mut doc_rng(3, i));
                assert_eq!(mode, want);
                let ids =
                    encode_document(&tok, Some(f), text, always(spm_rate), &mut doc_rng(3, i))
                        .unwrap();
                let (p, m, s) = split_chars(text, lo, hi);
                let enc = |t: &str| tok.encode(t, false).unwrap();
                let mut expect = vec![f.prefix];
                if mode == FimMode::Psm {
                    expect.extend(enc(p));
                    expect.push(f.suffix);
                    expect.extend(enc(s));
                    expect.push(f.middle);
                    expect.extend(enc(m));
                } else {
                    expect.push(f.suffix);
                    expect.extend(enc(s));
                    expect.push(f.middle);
                    expect.extend(enc(p));
                    expect.extend(enc(m));
                }
                assert_eq!(ids, expect);
            }
        }
    }
}

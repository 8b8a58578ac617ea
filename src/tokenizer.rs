//! `tokenizer.json` through the `tokenizers` crate, plus what code models need
//! on top of it: the fill-in-the-middle tokens and the full set of stop tokens.
//!
//! Qwen2.5-Coder / Qwen3 ids (same in both vocabularies): `<|endoftext|>`
//! 151643, `<|im_start|>` 151644, `<|im_end|>` 151645, `<|fim_prefix|>` 151659,
//! `<|fim_middle|>` 151660, `<|fim_suffix|>` 151661, `<|fim_pad|>` 151662,
//! `<|repo_name|>` 151663, `<|file_sep|>` 151664. They are looked up by name,
//! so StarCoder-style spellings (`<fim_prefix>`, used by SmolLM2) work too.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("no tokenizer.json in {} (qcoder needs the fast-tokenizer file)", dir.display())]
    Missing { dir: PathBuf },
    #[error("{}: cannot load tokenizer: {msg}", path.display())]
    Load { path: PathBuf, msg: String },
    #[error("tokenizing: {0}")]
    Encode(String),
    #[error("decoding: {0}")]
    Decode(String),
    #[error("this tokenizer has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>)")]
    NoFim,
}

/// Token ids of the FIM format (Qwen2.5-Coder's `<|fim_*|>` or StarCoder's `<fim_*>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FimTokens {
    pub prefix: u32,
    pub middle: u32,
    pub suffix: u32,
    pub pad: Option<u32>,
    pub repo_name: Option<u32>,
    pub file_sep: Option<u32>,
}

/// Tokens that end a completion whenever the model emits them: end of text,
/// end of a chat turn, and the FIM/repo separators a code model emits when the
/// middle is done (llama.cpp treats the same set as end-of-generation).
const STOP_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
];

pub struct CodeTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    fim: Option<FimTokens>,
    stop_ids: Vec<u32>,
}

impl CodeTokenizer {
    /// Loads `tokenizer.json` from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        Self::from_file(&path)
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let id = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let fim = match (
            id(&["<|fim_prefix|>", "<fim_prefix>"]),
            id(&["<|fim_middle|>", "<fim_middle>"]),
            id(&["<|fim_suffix|>", "<fim_suffix>"]),
        ) {
            (Some(prefix), Some(middle), Some(suffix)) => Some(FimTokens {
                prefix,
                middle,
                suffix,
                pad: id(&["<|fim_pad|>", "<fim_pad>"]),
                repo_name: id(&["<|repo_name|>", "<repo_name>"]),
                file_sep: id(&["<|file_sep|>", "<file_sep>"]),
            }),
            _ => None,
        };
        let mut stop_ids: Vec<u32> = STOP_TOKENS
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            fim,
            stop_ids,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn fim(&self) -> Option<FimTokens> {
        self.fim
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Stop ids: the tokenizer's end tokens plus `extra` (from `config.json`
    /// and `generation_config.json`), sorted and deduplicated.
    pub fn stop_ids(&self, extra: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> = self.stop_ids.iter().chain(extra).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Encodes text as HF `tokenizer(text)` does (special tokens in the text
    /// are recognised; `add_special_tokens` runs the post-processor, e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A prefix-suffix-middle FIM prompt, the format Qwen2.5-Coder was trained
    /// on: `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`; the
    /// same ids HF gets from tokenizing that string.
    pub fn fim_prompt(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>, TokenizerError> {
        let fim = self.fim.ok_or(TokenizerError::NoFim)?;
        let mut ids = vec![fim.prefix];
        ids.extend(self.encode(prefix, false)?);
        ids.push(fim.suffix);
        ids.extend(self.encode(suffix, false)?);
        ids.push(fim.middle);
        Ok(ids)
    }

    /// A streaming decoder that yields text as soon as it forms whole characters.
    pub fn decode_stream(&self) -> TextStream<'_> {
        TextStream {
            tok: self,
            ids: Vec::new(),
            emitted: 0,
        }
    }
}

/// Incremental detokenisation: decodes the whole sequence each step and emits
/// the new suffix once it no longer ends in a partial UTF-8 character.
pub struct TextStream<'a> {
    tok: &'a CodeTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, false)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(new))
    }

    /// Whatever has not been emitted yet (a trailing partial character
    /// included, as U+FFFD).
    pub fn finish(&self) -> Result<String, TokenizerError> {
        let text = self.tok.decode(&self.ids, false)?;
        Ok(text.get(self.emitted..).unwrap_or("").to_string())
    }
}

//! The tokenizer, both ways: GGUF's `tokenizer.ggml.*` keys (llama.cpp's
//! `gpt2`, i.e. byte-level BPE, model) ⇄ HF `tokenizer.json`,
//! `tokenizer_config.json` and the stop ids of `generation_config.json`.
//!
//! GGUF does not store the pre-tokenizer, only its name (`tokenizer.ggml.pre`,
//! chosen by `convert_hf_to_gguf.py` from a hash of the tokenizer's output).
//! [`PRE_TOKENIZERS`] maps the names qcoder supports to the `tokenizer.json`
//! normalizer and pre-tokenizer that llama.cpp's regexes for that name
//! (src/llama-vocab.cpp) were transcribed from.

use serde_json::{json, Map, Value as Json};

use super::keys::{token_type, tokenizer as tk};
use super::reader::GgufFile;
use super::{GgufError, Value};

/// Qwen2's split regex, as in Qwen's `tokenizer.json` (llama.cpp's
/// LLAMA_VOCAB_PRE_TYPE_QWEN2 is the same pattern without the `(?i:)` group).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split regex, as in its `tokenizer.json` (LLAMA_VOCAB_PRE_TYPE_LLAMA3).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A pre-tokenizer llama.cpp knows by name.
pub struct PreTokenizer {
    /// `tokenizer.ggml.pre` values (the first is written on export).
    pub names: &'static [&'static str],
    normalizer: fn() -> Json,
    pre_tokenizer: fn() -> Json,
    /// BPE `ignore_merges` (Llama 3 looks whole words up before merging).
    ignore_merges: bool,
}

fn byte_level(use_regex: bool, trim_offsets: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false, false),
    ]})
}

pub const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &["qwen2"],
        normalizer: || json!({"type": "NFC"}),
        pre_tokenizer: || split_then_bytes(QWEN2_REGEX),
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["llama-bpe"],
        normalizer: || Json::Null,
        pre_tokenizer: || split_then_bytes(LLAMA3_REGEX),
        ignore_merges: true,
    },
    // llama.cpp: one regex list (`\p{N}` then GPT-2's) for all of these, which
    // is HF's Digits(individual) + ByteLevel(use_regex) of StarCoder/SmolLM.
    PreTokenizer {
        names: &["smollm", "starcoder", "refact", "codeshell"],
        normalizer: || Json::Null,
        pre_tokenizer: || {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true, true),
            ]})
        },
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["gpt2", "default"],
        normalizer: || Json::Null,
        pre_tokenizer: || byte_level(true, true),
        ignore_merges: false,
    },
];

fn supported_pre() -> String {
    PRE_TOKENIZERS
        .iter()
        .flat_map(|p| p.names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Token texts llama.cpp treats as end-of-generation (its EOG list in
/// src/llama-vocab.cpp, restricted to the families qcoder runs).
const EOG_TEXTS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
];

/// The HF tokenizer files of a GGUF file.
pub struct HfTokenizer {
    pub tokenizer_json: Json,
    pub tokenizer_config: Json,
    pub bos: Option<u32>,
    pub pad: Option<u32>,
    /// Stop ids for `generation_config.json`: eos first, then EOT/EOM and the
    /// control tokens llama.cpp would stop on.
    pub eos: Vec<u32>,
}

impl HfTokenizer {
    pub fn from_gguf(file: &GgufFile, context_length: usize) -> Result<Self, GgufError> {
        let invalid = |msg: String| GgufError::Invalid {
            path: file.path().to_path_buf(),
            msg,
        };
        let model = file.str(tk::MODEL)?;
        if model != "gpt2" {
            return Err(invalid(format!(
                "tokenizer model `{model}` is not supported (only `gpt2`, byte-level BPE)"
            )));
        }
        let pre_name = file.opt_str(tk::PRE)?.unwrap_or("default");
        let pre = PRE_TOKENIZERS
            .iter()
            .find(|p| p.names.contains(&pre_name))
            .ok_or_else(|| {
                invalid(format!(
                    "pre-tokenizer `{pre_name}` (tokenizer.ggml.pre) is not supported (supported: {})",
                    supported_pre()
                ))
            })?;
        let tokens = file
            .opt_strings(tk::TOKENS)?
            .ok_or_else(|| GgufError::MissingKey {
                path: file.path().to_path_buf(),
                key: tk::TOKENS.into(),
            })?;
        let types = file
            .opt_ints(tk::TOKEN_TYPE)?
            .unwrap_or_else(|| vec![token_type::NORMAL as i64; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(invalid(format!(
                "{} has {} entries but {} has {}",
                tk::TOKEN_TYPE,
                types.len(),
                tk::TOKENS,
                tokens.len()
            )));
        }
        let merges = file.opt_strings(tk::MERGES)?.unwrap_or(&[]);
        let id = |key: &str| -> Result<Option<u32>, GgufError> {
            let v = file.opt_u64(key)?;
            match v {
                Some(v) if v as usize >= tokens.len() => Err(invalid(format!(
                    "{key} = {v} is outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
                other => Ok(other.map(|v| v as u32)),
            }
        };
        let (bos, eos, pad, unk) = (
            id(tk::BOS_ID)?,
            id(tk::EOS_ID)?,
            id(tk::PAD_ID)?,
            id(tk::UNK_ID)?,
        );
        let (eot, eom) = (id(tk::EOT_ID)?, id(tk::EOM_ID)?);
        let add_bos = file.opt_bool(tk::ADD_BOS)?.unwrap_or(false);

        let mut vocab = Map::new();
        let mut added = Vec::new();
        let mut added_decoder = Map::new();
        for (i, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            match ty as i32 {
                token_type::UNUSED => {}
                token_type::CONTROL | token_type::USER_DEFINED => {
                    let special = ty as i32 == token_type::CONTROL;
                    let entry = json!({
                        "content": tok, "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": special,
                    });
                    let mut with_id = Map::new();
                    with_id.insert("id".into(), json!(i));
                    with_id.extend(entry.as_object().cloned().unwrap_or_default());
                    added.push(Json::Object(with_id));
                    added_decoder.insert(i.to_string(), entry);
                }
                _ => {
                    vocab.entry(tok.clone()).or_insert(json!(i));
                }
            }
        }
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .filter(|(_, b)| !b.contains(' '))
                .ok_or_else(|| {
                    invalid(format!(
                        "merge {i} (`{m}`) is not two tokens separated by a space"
                    ))
                })?;
            merge_pairs.push(json!([a, b]));
        }
        let text = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
        let post_processor = match (add_bos, text(bos)) {
            (true, Some(bos_text)) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": bos_text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {bos_text.clone(): {"id": bos_text, "ids": [bos], "tokens": [bos_text]}},
            }),
            _ => byte_level(false, false),
        };
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": (pre.normalizer)(),
            "pre_tokenizer": (pre.pre_tokenizer)(),
            "post_processor": post_processor,
            "decoder": byte_level(true, true),
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": pre.ignore_merges,
                "vocab": vocab, "merges": merge_pairs,
            },
        });

        let mut stops: Vec<u32> = Vec::new();
        for id in [eos, eot, eom].into_iter().flatten() {
            if !stops.contains(&id) {
                stops.push(id);
            }
        }
        for (i, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty as i32 == token_type::CONTROL
                && EOG_TEXTS.contains(&tok.as_str())
                && !stops.contains(&(i as u32))
            {
                stops.push(i as u32);
            }
        }
        let chat_template = file.opt_str(tk::CHAT_TEMPLATE)?;
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "add_eos_token": file.opt_bool(tk::ADD_EOS)?.unwrap_or(false),
            "bos_token": text(bos),
            "eos_token": text(eos),
            "pad_token": text(pad),
            "unk_token": text(unk),
            "clean_up_tokenization_spaces": false,
            "model_max_length": context_length,
            "added_tokens_decoder": added_decoder,
        });
        if let (Some(t), Some(obj)) = (chat_template, config.as_object_mut()) {
            obj.insert("chat_template".into(), json!(t));
        }
        Ok(Self {
            tokenizer_json,
            tokenizer_config: config,
            bos,
            pad,
            eos: stops,
        })
    }
}

/// `generation_config.json` for an imported model.
pub fn generation_config(bos: Option<u32>, eos: &[u32], pad: Option<u32>) -> Json {
    let mut m = Map::new();
    if let Some(b) = bos {
        m.insert("bos_token_id".into(), json!(b));
    }
    match eos {
        [] => {}
        [one] => {
            m.insert("eos_token_id".into(), json!(one));
        }
        many => {
            m.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(p) = pad {
        m.insert("pad_token_id".into(), json!(p));
    }
    Json::Object(m)
}

// ----------------------------------------------------------------------------
// HF → GGUF

/// What an HF model directory's tokenizer contributes to a GGUF file.
pub struct GgufVocab {
    pub kv: Vec<(String, Value)>,
}

/// Everything the exporter needs to know about an HF tokenizer.
pub struct HfTokenizerInput<'a> {
    pub tokenizer_json: &'a Json,
    pub tokenizer_config: Option<&'a Json>,
    /// `vocab_size` of config.json (the embedding rows; may exceed the
    /// tokenizer's vocabulary, as Qwen's 151936 > 151665).
    pub vocab_size: usize,
    /// eos ids from config.json and generation_config.json, in that order.
    pub eos_ids: &'a [u32],
    pub bos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

/// Builds the `tokenizer.*` keys (`_set_vocab_gpt2` and `SpecialVocab` of
/// convert_hf_to_gguf.py / gguf-py): tokens padded to `vocab_size` with
/// `[PAD{i}]` (type UNUSED), token types (added special → CONTROL, other added
/// → USER_DEFINED, the rest NORMAL), merges as `a b`, special ids, FIM ids and
/// the chat template.
pub fn gguf_vocab(input: &HfTokenizerInput<'_>) -> Result<GgufVocab, String> {
    let tj = input.tokenizer_json;
    let model = tj.get("model").ok_or("tokenizer.json has no `model`")?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err("only BPE tokenizers (byte-level, GPT-2 style) can be exported to GGUF".into());
    }
    let pre_name = detect_pre(tj)?;
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or("tokenizer.json `model.vocab` is not an object")?;
    let mut tokens: Vec<Option<String>> = vec![None; input.vocab_size];
    let mut types = vec![token_type::UNUSED; input.vocab_size];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<(), String> {
        let i = id as usize;
        if i >= tokens.len() {
            return Err(format!(
                "token `{text}` has id {id}, beyond vocab_size {} of config.json",
                tokens.len()
            ));
        }
        tokens[i] = Some(text.to_string());
        types[i] = ty;
        Ok(())
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| format!("vocab entry `{text}` has no integer id"))?;
        place(id, text, token_type::NORMAL)?;
    }
    let mut by_text = std::collections::HashMap::new();
    if let Some(added) = tj.get("added_tokens").and_then(Json::as_array) {
        for t in added {
            let id = t
                .get("id")
                .and_then(Json::as_u64)
                .ok_or("added token without id")?;
            let text = t
                .get("content")
                .and_then(Json::as_str)
                .ok_or("added token without content")?;
            let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
            place(
                id,
                text,
                if special {
                    token_type::CONTROL
                } else {
                    token_type::USER_DEFINED
                },
            )?;
            by_text.insert(text.to_string(), id as u32);
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = match model.get("merges").and_then(Json::as_array) {
        None => Vec::new(),
        Some(list) => list
            .iter()
            .map(|m| match m {
                Json::String(s) => Ok(s.clone()),
                Json::Array(pair) => match (
                    pair.first().and_then(Json::as_str),
                    pair.get(1).and_then(Json::as_str),
                ) {
                    (Some(a), Some(b)) if pair.len() == 2 => Ok(format!("{a} {b}")),
                    _ => Err(format!("merge {m} is not a pair of strings")),
                },
                other => Err(format!("merge {other} is neither \"a b\" nor [a, b]")),
            })
            .collect::<Result<_, _>>()?,
    };
    let find = |names: &[&str]| names.iter().find_map(|n| by_text.get(*n).copied());
    let config_token = |key: &str| -> Option<u32> {
        let v = input.tokenizer_config?.get(key)?;
        let text = v
            .as_str()
            .or_else(|| v.get("content").and_then(Json::as_str))?;
        by_text.get(text).copied()
    };
    let eos = input
        .eos_ids
        .first()
        .copied()
        .or_else(|| config_token("eos_token"));
    let bos = input.bos_id.or_else(|| config_token("bos_token"));
    let pad = input.pad_id.or_else(|| config_token("pad_token"));
    // EOT: the one of <|im_end|> / <|endoftext|> that eos is not, so runtimes
    // that stop only on eos and eot (llama.cpp before its EOG set,
    // ggml-org/llama.cpp#9606) stop on both chat turns and FIM completions.
    let im_end = find(&["<|im_end|>"]);
    let endoftext = find(&["<|endoftext|>"]);
    let eot = match (eos, im_end, endoftext) {
        (Some(e), Some(a), Some(b)) => Some(if e == a { b } else { a }),
        (_, a, b) => a.or(b).or(find(&["<|eot_id|>"])),
    };
    let add_bos = input
        .tokenizer_config
        .and_then(|c| c.get("add_bos_token"))
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let mut kv = vec![
        (tk::MODEL.to_string(), Value::String("gpt2".into())),
        (tk::PRE.to_string(), Value::String(pre_name.to_string())),
        (
            tk::TOKENS.to_string(),
            Value::Array(super::Array::String(tokens)),
        ),
        (
            tk::TOKEN_TYPE.to_string(),
            Value::Array(super::Array::I32(types)),
        ),
        (
            tk::MERGES.to_string(),
            Value::Array(super::Array::String(merges)),
        ),
    ];
    let ids = [
        (tk::BOS_ID, bos),
        (tk::EOS_ID, eos),
        (tk::EOT_ID, eot),
        (tk::PAD_ID, pad),
        (tk::FIM_PRE_ID, find(&["<|fim_prefix|>", "<fim_prefix>"])),
        (tk::FIM_SUF_ID, find(&["<|fim_suffix|>", "<fim_suffix>"])),
        (tk::FIM_MID_ID, find(&["<|fim_middle|>", "<fim_middle>"])),
        (tk::FIM_PAD_ID, find(&["<|fim_pad|>", "<fim_pad>"])),
        (tk::FIM_REP_ID, find(&["<|repo_name|>", "<repo_name>"])),
        (tk::FIM_SEP_ID, find(&["<|file_sep|>", "<file_sep>"])),
    ];
    for (key, id) in ids {
        if let Some(id) = id {
            kv.push((key.to_string(), Value::U32(id)));
        }
    }
    kv.push((tk::ADD_BOS.to_string(), Value::Bool(add_bos)));
    if let Some(t) = input
        .tokenizer_config
        .and_then(|c| c.get("chat_template"))
        .and_then(Json::as_str)
    {
        kv.push((tk::CHAT_TEMPLATE.to_string(), Value::String(t.to_string())));
    }
    Ok(GgufVocab { kv })
}

/// `tokenizer.ggml.pre` for a `tokenizer.json`: the entry of
/// [`PRE_TOKENIZERS`] whose normalizer and pre-tokenizer it has (offset
/// trimming, which does not change ids, is ignored).
pub fn detect_pre(tokenizer_json: &Json) -> Result<&'static str, String> {
    fn canon(v: &Json) -> Json {
        match v {
            Json::Object(m) => Json::Object(
                m.iter()
                    .filter(|(k, _)| k.as_str() != "trim_offsets")
                    .map(|(k, v)| (k.clone(), canon(v)))
                    .collect(),
            ),
            Json::Array(a) => Json::Array(a.iter().map(canon).collect()),
            other => other.clone(),
        }
    }
    let null = Json::Null;
    let norm = canon(tokenizer_json.get("normalizer").unwrap_or(&null));
    let pre = canon(tokenizer_json.get("pre_tokenizer").unwrap_or(&null));
    PRE_TOKENIZERS
        .iter()
        .find(|p| canon(&(p.normalizer)()) == norm && canon(&(p.pre_tokenizer)()) == pre)
        .map(|p| p.names[0])
        .ok_or_else(|| {
            format!(
                "this tokenizer's normalizer/pre-tokenizer matches none llama.cpp knows that qcoder can name (supported: {}): {}",
                supported_pre(),
                serde_json::to_string(&pre).unwrap_or_default()
            )
        })
}

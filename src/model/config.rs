//! `config.json` of a Hugging Face causal LM, mirrored with HF's field names.
//!
//! Reads both generations of the file: transformers < 5 writes top-level
//! `rope_theta`, `rope_scaling` and `torch_dtype`; transformers >= 5 writes
//! `rope_parameters` (holding `rope_theta`, `rope_type`, ...) and `dtype`.
//! Unknown fields are kept in `extra` so a config written back (merge, export)
//! loses nothing.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ModelError;

/// The decoder families qcoder runs. All share one decoder implementation
/// (`decoder.rs`); they differ only in the switches below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5, Qwen2.5-Coder): bias on q/k/v.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on each head of q and k, explicit `head_dim`.
    Qwen3,
    /// `LlamaForCausalLM` and `MistralForCausalLM`.
    Llama,
}

impl Architecture {
    /// The `model_type` values qcoder accepts and the family each maps to.
    pub const MODEL_TYPES: &'static [(&'static str, Architecture)] = &[
        ("qwen2", Architecture::Qwen2),
        ("qwen3", Architecture::Qwen3),
        ("llama", Architecture::Llama),
        ("mistral", Architecture::Llama),
    ];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::MODEL_TYPES
            .iter()
            .find(|(name, _)| *name == model_type)
            .map(|(_, arch)| *arch)
    }

    /// Default for `tie_word_embeddings` when the config omits it (the
    /// transformers config classes of all three families default to false).
    fn default_tie_word_embeddings(self) -> bool {
        false
    }

    /// Whether q/k/v carry a bias when `attention_bias` is absent.
    fn default_qkv_bias(self) -> bool {
        matches!(self, Architecture::Qwen2)
    }
}

/// A token id field that HF writes either as one integer or as a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Serde mirror of `config.json`. Field names are HF's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<Value>,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// How RoPE frequencies are scaled (`rope_type` in transformers).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (Peng et al. 2023), as transformers computes it.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

/// RoPE settings resolved from either config generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// Number of dimensions of each head that rotate (`head_dim` unless
    /// `partial_rotary_factor` says otherwise).
    pub dim: usize,
    pub scaling: RopeScaling,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: ModelConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        config.validate().map_err(|msg| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(config)
    }

    pub fn architecture(&self) -> Result<Architecture, ModelError> {
        Architecture::from_model_type(&self.model_type).ok_or_else(|| {
            ModelError::UnsupportedModelType {
                model_type: self.model_type.clone(),
                supported: Architecture::MODEL_TYPES
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })
    }

    /// Checks the invariants the decoder relies on; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        self.architecture().map_err(|e| e.to_string())?;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(format!("`{field}` must be positive"));
            }
        }
        let n_kv = self.n_kv_heads();
        if n_kv == 0 || !self.num_attention_heads.is_multiple_of(n_kv) {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({n_kv})",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "`hidden_size` ({}) is not a multiple of `num_attention_heads` ({}) and no `head_dim` is given",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "`head_dim` ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(format!(
                    "`hidden_act` = \"{act}\" is not supported (only \"silu\")"
                ));
            }
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err("`rms_norm_eps` must be positive".into());
        }
        self.rope()?;
        self.layer_windows()?;
        Ok(())
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or_else(|| {
            self.architecture()
                .map(Architecture::default_tie_word_embeddings)
                .unwrap_or(false)
        })
    }

    pub fn qkv_bias(&self) -> bool {
        match self.architecture() {
            // Qwen2 always has q/k/v bias; its config has no switch for it.
            Ok(Architecture::Qwen2) => true,
            Ok(arch) => self
                .attention_bias
                .unwrap_or_else(|| arch.default_qkv_bias()),
            Err(_) => false,
        }
    }

    /// Bias on `o_proj`: Llama and Qwen3 follow `attention_bias`, Qwen2 has none.
    pub fn o_bias(&self) -> bool {
        match self.architecture() {
            Ok(Architecture::Qwen2) | Err(_) => false,
            Ok(_) => self.attention_bias.unwrap_or(false),
        }
    }

    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }

    pub fn has_qk_norm(&self) -> bool {
        matches!(self.architecture(), Ok(Architecture::Qwen3))
    }

    /// The dtype the checkpoint says it was saved in (`dtype` or `torch_dtype`).
    pub fn saved_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    /// End-of-sequence ids from the config (more come from
    /// `generation_config.json` and the tokenizer).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Per-layer sliding-window size (`None` = full attention), following
    /// transformers: `layer_types` when present; Qwen2/Qwen3 slide on layers
    /// `>= max_window_layers` only when `use_sliding_window`; Mistral slides on
    /// every layer when `sliding_window` is set.
    pub fn layer_windows(&self) -> Result<Vec<Option<usize>>, String> {
        let n = self.num_hidden_layers;
        let arch = self.architecture().map_err(|e| e.to_string())?;
        let window = match arch {
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if self.use_sliding_window.unwrap_or(false) {
                    self.sliding_window
                } else {
                    None
                }
            }
            Architecture::Llama => {
                if self.model_type == "mistral" {
                    self.sliding_window
                } else {
                    None
                }
            }
        };
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                return Err(format!(
                    "`layer_types` has {} entries but `num_hidden_layers` is {n}",
                    types.len()
                ));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => Ok(window.or(self.sliding_window)),
                    other => Err(format!("`layer_types` entry \"{other}\" is not supported")),
                })
                .collect();
        }
        Ok((0..n)
            .map(|i| match arch {
                Architecture::Qwen2 | Architecture::Qwen3 => {
                    let first = self.max_window_layers.unwrap_or(n);
                    window.filter(|_| i >= first)
                }
                Architecture::Llama => window,
            })
            .collect())
    }

    /// RoPE parameters from `rope_parameters` (transformers >= 5) or
    /// `rope_theta` + `rope_scaling` (older files).
    pub fn rope(&self) -> Result<Rope, String> {
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .filter(|v| !v.is_null());
        let obj = match params {
            Some(Value::Object(obj)) => Some(obj),
            Some(_) => return Err("`rope_parameters` / `rope_scaling` must be an object".into()),
            None => None,
        };
        let field = |key: &str| obj.and_then(|o| o.get(key)).filter(|v| !v.is_null());
        let number = |key: &str| -> Result<Option<f64>, String> {
            match field(key) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("rope parameter `{key}` must be a number")),
            }
        };
        let required = |key: &str| -> Result<f64, String> {
            number(key)?
                .ok_or_else(|| format!("rope parameter `{key}` is required for this rope type"))
        };
        let theta = number("rope_theta")?
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        if theta.is_nan() || theta <= 1.0 {
            return Err(format!("`rope_theta` must be greater than 1, got {theta}"));
        }
        let partial = number("partial_rotary_factor")?
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        let dim = (self.head_dim() as f64 * partial) as usize;
        if dim == 0 || !dim.is_multiple_of(2) || dim > self.head_dim() {
            return Err(format!(
                "rotary dimension {dim} is invalid for head_dim {}",
                self.head_dim()
            ));
        }
        let rope_type = field("rope_type")
            .or_else(|| field("type"))
            .map(|v| v.as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| "default".into());
        let original = || -> Result<f64, String> {
            Ok(number("original_max_position_embeddings")?
                .unwrap_or(self.max_position_embeddings as f64))
        };
        let scaling = match rope_type.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: original()?,
            },
            "yarn" => {
                let original_max = original()?;
                let factor = match number("factor")? {
                    Some(f) => f,
                    None => self.max_position_embeddings as f64 / original_max,
                };
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match number("attention_factor")? {
                    Some(a) => a,
                    None => match (number("mscale")?, number("mscale_all_dim")?) {
                        (Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                            mscale(factor, m) / mscale(factor, m_all)
                        }
                        _ => mscale(factor, 1.0),
                    },
                };
                let truncate = match field("truncate") {
                    None => true,
                    Some(v) => v
                        .as_bool()
                        .ok_or("rope parameter `truncate` must be a boolean")?,
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original_max,
                    // transformers: `get("beta_fast") or 32` (0 also means default).
                    beta_fast: number("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: number("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                    attention_factor,
                    truncate,
                }
            }
            other => {
                return Err(format!(
                "rope type \"{other}\" is not supported (supported: default, linear, llama3, yarn)"
            ))
            }
        };
        if let RopeScaling::Linear { factor }
        | RopeScaling::Llama3 { factor, .. }
        | RopeScaling::Yarn { factor, .. } = &scaling
        {
            if factor.is_nan() || *factor <= 0.0 {
                return Err(format!(
                    "rope scaling `factor` must be positive, got {factor}"
                ));
            }
        }
        Ok(Rope {
            theta,
            dim,
            scaling,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "qwen2", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64,
        })
    }

    fn parse(v: Value) -> ModelConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn old_and_new_rope_forms_agree() {
        let mut old = base();
        old["rope_theta"] = 1e6.into();
        old["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32});
        let mut new = base();
        new["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6,
            "factor": 4.0, "original_max_position_embeddings": 32});
        let a = parse(old).rope().unwrap();
        let b = parse(new).rope().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.theta, 1e6);
        match a.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12),
            other => panic!("expected yarn, got {other:?}"),
        }
    }

    #[test]
    fn unknown_rope_type_is_named() {
        let mut c = base();
        c["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
        let err = parse(c).validate().unwrap_err();
        assert!(err.contains("dynamic"), "{err}");
    }

    #[test]
    fn qwen2_windows_follow_max_window_layers() {
        let mut c = base();
        c["use_sliding_window"] = true.into();
        c["sliding_window"] = 8.into();
        c["max_window_layers"] = 1.into();
        assert_eq!(parse(c).layer_windows().unwrap(), vec![None, Some(8)]);
        let mut c = base();
        c["sliding_window"] = 8.into();
        assert_eq!(parse(c).layer_windows().unwrap(), vec![None, None]);
    }

    #[test]
    fn eos_may_be_int_or_list() {
        let mut c = base();
        c["eos_token_id"] = serde_json::json!([1, 2]);
        assert_eq!(parse(c).eos_token_ids(), vec![1, 2]);
        let mut c = base();
        c["eos_token_id"] = 7.into();
        assert_eq!(parse(c).eos_token_ids(), vec![7]);
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let mut c = base();
        c["use_cache"] = true.into();
        let text = serde_json::to_string(&parse(c)).unwrap();
        assert!(text.contains("\"use_cache\":true"));
    }
}

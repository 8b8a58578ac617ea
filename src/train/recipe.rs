//! `recipe.toml`: everything a fine-tuning run needs, in one file. Unknown
//! keys are rejected (a typo must never silently fall back to a default) and
//! the error names the nearest valid key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::settings::{expand, suggest};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("{}: {field}: {msg}", path.display())]
    Invalid {
        path: PathBuf,
        field: &'static str,
        msg: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    pub output: OutputSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Model directory (HF layout) or hub id `org/name[@revision]`.
    pub path: String,
    /// f32, bf16 or f16 for the frozen base (default: bf16 on CUDA, f32 on CPU).
    pub dtype: Option<String>,
    #[serde(default = "default_device")]
    pub device: String,
    /// Run the frozen base's linear-layer products in int8 (per-token
    /// activations, per-channel weights; `model::int8`). Not with DoRA.
    /// Left out of the serialized recipe when false, so that recipes from
    /// before the key existed keep their trajectory hash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub int8_base: bool,
}

fn default_device() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Ingest output directories (their train split), .parquet / .jsonl
    /// datasets with a `content` column, text files or code directories.
    pub train: Vec<PathBuf>,
    /// Held-out data; default: the eval split of ingest output directories in
    /// `train`, else `eval_fraction` of the packed blocks.
    #[serde(default)]
    pub eval: Vec<PathBuf>,
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Fraction of documents turned into fill-in-the-middle samples.
    #[serde(default = "default_fim_rate")]
    pub fim_rate: f64,
    /// Of those, the fraction in suffix-prefix-middle order.
    #[serde(default = "default_fim_spm_rate")]
    pub fim_spm_rate: f64,
    /// Read at most this much text (1MB, 2GiB, ...).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: String,
    /// Fraction of repositories (with two or more files) whose files become
    /// one repository-level sample instead of one sample per file.
    #[serde(default)]
    pub repo_level_rate: f64,
}

fn default_eval_fraction() -> f64 {
    0.05
}
fn default_fim_rate() -> f64 {
    0.5
}
fn default_fim_spm_rate() -> f64 {
    0.5
}
fn default_max_bytes() -> String {
    "1GB".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"`: every linear layer of the decoder blocks (not lm_head).
    Keyword(String),
    Names(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> TargetModules {
    TargetModules::Keyword("all-linear".into())
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
            use_dora: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Warmup optimizer steps (exclusive with `warmup_ratio`).
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of all optimizer steps.
    pub warmup_ratio: Option<f64>,
    /// Passes over the training blocks (ignored when `max_steps` is set).
    #[serde(default = "default_epochs")]
    pub epochs: f64,
    pub max_steps: Option<usize>,
    #[serde(default = "default_one")]
    pub micro_batch: usize,
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Print a line (and a metrics row) every N optimizer steps.
    #[serde(default = "default_one")]
    pub log_every: usize,
    /// Recompute each decoder layer's activations during the backward pass
    /// instead of keeping them: activation memory of one layer instead of
    /// all, for one more forward pass of the layers.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

fn default_lr() -> f64 {
    2e-4
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_epochs() -> f64 {
    1.0
}
fn default_one() -> usize {
    1
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_seed() -> u64 {
    42
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            schedule: default_schedule(),
            warmup_steps: None,
            warmup_ratio: None,
            epochs: default_epochs(),
            max_steps: None,
            micro_batch: 1,
            grad_accum: 1,
            max_grad_norm: default_max_grad_norm(),
            weight_decay: 0.0,
            betas: default_betas(),
            eps: default_eps(),
            seed: default_seed(),
            log_every: 1,
            gradient_checkpointing: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every N optimizer steps (0: only at the end).
    #[serde(default)]
    pub every: usize,
    /// At most this many eval batches per evaluation.
    #[serde(default = "default_eval_batches")]
    pub max_batches: usize,
}

fn default_eval_batches() -> usize {
    32
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 0,
            max_batches: default_eval_batches(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save a checkpoint every N optimizer steps (0: never).
    #[serde(default)]
    pub every: usize,
    /// Keep the last K checkpoints.
    #[serde(default = "default_keep")]
    pub keep_last: usize,
}

fn default_keep() -> usize {
    2
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: default_keep(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Output directory; relative paths are relative to the recipe file.
    pub dir: PathBuf,
    /// Also write the merged model to DIR/merged.
    #[serde(default)]
    pub merge: bool,
}

/// Every key a section accepts, for "did you mean" suggestions.
const KEYS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "model",
            "data",
            "lora",
            "train",
            "eval",
            "checkpoint",
            "output",
        ],
    ),
    ("model", &["path", "dtype", "device", "int8_base"]),
    (
        "data",
        &[
            "train",
            "eval",
            "eval_fraction",
            "seq_len",
            "fim_rate",
            "fim_spm_rate",
            "max_bytes",
            "repo_level_rate",
        ],
    ),
    (
        "lora",
        &[
            "r",
            "alpha",
            "dropout",
            "target_modules",
            "use_rslora",
            "use_dora",
        ],
    ),
    (
        "train",
        &[
            "lr",
            "schedule",
            "warmup_steps",
            "warmup_ratio",
            "epochs",
            "max_steps",
            "micro_batch",
            "grad_accum",
            "max_grad_norm",
            "weight_decay",
            "betas",
            "eps",
            "seed",
            "log_every",
            "gradient_checkpointing",
        ],
    ),
    ("eval", &["every", "max_batches"]),
    ("checkpoint", &["every", "keep_last"]),
    ("output", &["dir", "merge"]),
];

impl Recipe {
    /// Reads and validates a recipe; relative paths become relative to the
    /// recipe's directory.
    pub fn from_file(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut recipe = Self::parse(&text).map_err(|msg| RecipeError::Parse {
            path: path.to_path_buf(),
            msg,
        })?;
        let invalid = |field: &'static str, msg: String| RecipeError::Invalid {
            path: path.to_path_buf(),
            field,
            msg,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf, field: &'static str| -> Result<(), RecipeError> {
            *p = PathBuf::from(expand(&p.to_string_lossy()).map_err(|m| invalid(field, m))?);
            if p.is_relative() {
                *p = base.join(&*p);
            }
            Ok(())
        };
        for p in &mut recipe.data.train {
            rebase(p, "data.train")?;
        }
        for p in &mut recipe.data.eval {
            rebase(p, "data.eval")?;
        }
        rebase(&mut recipe.output.dir, "output.dir")?;
        recipe.model.path = expand(&recipe.model.path).map_err(|m| invalid("model.path", m))?;
        let model_path = base.join(&recipe.model.path);
        if Path::new(&recipe.model.path).is_relative() && model_path.exists() {
            recipe.model.path = model_path.to_string_lossy().into_owned();
        }
        recipe
            .validate()
            .map_err(|(field, msg)| RecipeError::Invalid {
                path: path.to_path_buf(),
                field,
                msg,
            })?;
        Ok(recipe)
    }

    /// Parses recipe text; an unknown key gets the nearest valid one suggested.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let location = e
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            format!("{location}{}", explain(&msg, text, e.span()))
        })
    }

    /// Semantic checks that need no files: (field, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let d = &self.data;
        let t = &self.train;
        let l = &self.lora;
        let unit = |name, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err((name, format!("{v} is not in [0, 1]")))
            }
        };
        if d.train.is_empty() {
            return Err(("data.train", "give at least one path".into()));
        }
        if d.seq_len < 2 {
            return Err(("data.seq_len", "must be at least 2".into()));
        }
        unit("data.fim_rate", d.fim_rate)?;
        unit("data.fim_spm_rate", d.fim_spm_rate)?;
        unit("data.repo_level_rate", d.repo_level_rate)?;
        if !(0.0..1.0).contains(&d.eval_fraction) {
            return Err((
                "data.eval_fraction",
                format!("{} is not in [0, 1)", d.eval_fraction),
            ));
        }
        crate::data::parse_size(&d.max_bytes).map_err(|e| ("data.max_bytes", e))?;
        if l.r == 0 {
            return Err(("lora.r", "must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(("lora.dropout", format!("{} is not in [0, 1)", l.dropout)));
        }
        if let TargetModules::Keyword(k) = &l.target_modules {
            if k != "all-linear" {
                return Err((
                    "lora.target_modules",
                    format!("{k:?}: give \"all-linear\" or a list of module names such as [\"q_proj\", \"v_proj\"]"),
                ));
            }
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(("train.lr", format!("{} must be positive", t.lr)));
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            return Err((
                "train.warmup_steps",
                "give warmup_steps or warmup_ratio, not both".into(),
            ));
        }
        if let Some(r) = t.warmup_ratio {
            unit("train.warmup_ratio", r)?;
        }
        if t.max_steps == Some(0) {
            return Err(("train.max_steps", "must be at least 1".into()));
        }
        if t.max_steps.is_none() && !(t.epochs.is_finite() && t.epochs > 0.0) {
            return Err(("train.epochs", format!("{} must be positive", t.epochs)));
        }
        if t.micro_batch == 0 {
            return Err(("train.micro_batch", "must be at least 1".into()));
        }
        if t.grad_accum == 0 {
            return Err(("train.grad_accum", "must be at least 1".into()));
        }
        if t.log_every == 0 {
            return Err(("train.log_every", "must be at least 1".into()));
        }
        if t.max_grad_norm.is_nan() || t.max_grad_norm < 0.0 {
            return Err((
                "train.max_grad_norm",
                "must be >= 0 (0: no clipping)".into(),
            ));
        }
        if t.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err((
                "train.betas",
                format!("{:?}: each must be in [0, 1)", t.betas),
            ));
        }
        if t.eps.is_nan() || t.eps <= 0.0 {
            return Err(("train.eps", "must be positive".into()));
        }
        if self.checkpoint.every > 0 && self.checkpoint.keep_last == 0 {
            return Err(("checkpoint.keep_last", "must be at least 1".into()));
        }
        Ok(())
    }

    /// Hash of everything that determines the training trajectory, so a
    /// checkpoint is only resumed by the recipe that wrote it. (`[output]`,
    /// `[checkpoint]` and logging may change between runs.)
    pub fn trajectory_hash(&self) -> String {
        let value = serde_json::json!({
            "model": self.model,
            "data": self.data,
            "lora": self.lora,
            "train": {
                "lr": self.train.lr, "schedule": self.train.schedule,
                "warmup_steps": self.train.warmup_steps, "warmup_ratio": self.train.warmup_ratio,
                "epochs": self.train.epochs, "max_steps": self.train.max_steps,
                "micro_batch": self.train.micro_batch, "grad_accum": self.train.grad_accum,
                "max_grad_norm": self.train.max_grad_norm, "weight_decay": self.train.weight_decay,
                "betas": self.train.betas, "eps": self.train.eps, "seed": self.train.seed,
            },
        });
        let digest = Sha256::digest(value.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Adds "did you mean" to serde's `unknown field` message.
fn explain(msg: &str, text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(rest) = msg.strip_prefix("unknown field `") else {
        return msg.to_string();
    };
    let Some(end) = rest.find('`') else {
        return msg.to_string();
    };
    let key = &rest[..end];
    let section = span.map(|s| section_at(text, s.start)).unwrap_or_default();
    let valid: Vec<&str> = KEYS
        .iter()
        .find(|(name, _)| *name == section)
        .map(|(_, keys)| keys.to_vec())
        .unwrap_or_default();
    let shown = if section.is_empty() {
        format!("unknown section `[{key}]`")
    } else {
        format!("unknown key `{key}` in [{section}]")
    };
    match suggest(key, &valid) {
        Some(best) => format!(
            "{shown}; did you mean `{best}`? (valid: {})",
            valid.join(", ")
        ),
        None => format!("{shown} (valid: {})", valid.join(", ")),
    }
}

/// The `[section]` header in force at byte `pos`.
fn section_at(text: &str, pos: usize) -> String {
    let pos = pos.min(text.len());
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    if text[line_start..].trim_start().starts_with('[') {
        // The unknown key is a section header itself: a top-level key.
        return String::new();
    }
    let mut section = String::new();
    for line in text[..pos.min(text.len())].lines() {
        let l = line.trim();
        if l.starts_with('[') && l.ends_with(']') {
            section = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[model]
path = "m"
[data]
train = ["d"]
seq_len = 64
[output]
dir = "out"
"#;

    #[test]
    fn minimal_recipe_gets_defaults() {
        let r = Recipe::parse(MIN).unwrap();
        assert_eq!(r.lora.r, 16);
        assert_eq!(r.train.schedule, Schedule::Cosine);
        assert!(r.validate().is_ok());
    }

    #[test]
    fn unknown_key_names_the_nearest() {
        let text = MIN.replace("seq_len = 64", "seq_len = 64\nfim_rat = 0.5");
        let err = Recipe::parse(&text).unwrap_err();
        assert!(err.contains("`fim_rat` in [data]"), "{err}");
        assert!(err.contains("did you mean `fim_rate`"), "{err}");
        let text = format!("{MIN}\n[trian]\nlr = 1e-4\n");
        let err = Recipe::parse(&text).unwrap_err();
        assert!(err.contains("did you mean `train`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut r = Recipe::parse(MIN).unwrap();
        r.lora.dropout = 1.0;
        assert_eq!(r.validate().unwrap_err().0, "lora.dropout");
        let mut r = Recipe::parse(MIN).unwrap();
        r.train.warmup_ratio = Some(0.1);
        r.train.warmup_steps = Some(3);
        assert_eq!(r.validate().unwrap_err().0, "train.warmup_steps");
    }

    #[test]
    fn shipped_recipes_are_valid() {
        for text in [
            include_str!("../../recipes/demo.toml"),
            include_str!("../../recipes/qwen2.5-coder-7b-gpu.toml"),
        ] {
            let r = Recipe::parse(text).unwrap();
            r.validate().unwrap();
        }
    }

    #[test]
    fn hash_ignores_output_but_not_lr() {
        let a = Recipe::parse(MIN).unwrap();
        let mut b = a.clone();
        b.output.dir = "elsewhere".into();
        assert_eq!(a.trajectory_hash(), b.trajectory_hash());
        b.train.lr = 1e-3;
        assert_ne!(a.trajectory_hash(), b.trajectory_hash());
    }
}

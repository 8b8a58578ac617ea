//! Hugging Face decoder-only models: configuration, checkpoint files, hub
//! resolution and the decoder itself.

pub mod config;
pub mod decoder;
pub mod hub;
pub mod int8;
pub mod linear;
pub mod save;
pub mod weights;

use std::path::PathBuf;

pub use config::{Architecture, ModelConfig};
pub use decoder::{CausalLm, KvCache};
pub use weights::Checkpoint;

/// Everything that can go wrong loading or running a model. Messages name
/// the file, tensor or field involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("model_type \"{model_type}\" is not supported (supported: {supported})")]
    UnsupportedModelType {
        model_type: String,
        supported: String,
    },
    #[error("{}: not a valid safetensors file (truncated or corrupt?)", path.display())]
    Safetensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("{}: {msg}", path.display())]
    ShardIndex { path: PathBuf, msg: String },
    #[error("{}: no model weights (expected model.safetensors or model.safetensors.index.json)", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: no config.json", dir.display())]
    NoConfig { dir: PathBuf },
    #[error("tensor `{name}` is missing from the checkpoint in {}", dir.display())]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` in {} has shape {got:?}, but the config implies {expected:?}", path.display())]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("tensor `{name}` in {} has dtype {dtype}, which qcoder cannot load", path.display())]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error(
        "{what} is {len} tokens, but the model's context is {max} tokens (max_position_embeddings)"
    )]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{layer}: the fast int4 path cannot run this layer ({reason}); pass --allow-dequant to run it dequantized in f32")]
    FastPath { layer: String, reason: String },
    #[error("the prompt is empty: give at least one token of context")]
    EmptyPrompt,
    #[error("token id {id} is outside the model's vocabulary of {vocab} (the tokenizer does not match the model?)")]
    TokenOutOfRange { id: i64, vocab: usize },
    #[error("{0}")]
    Hub(#[from] hub::HubError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub use decoder::LoadOptions;

use std::path::Path;

/// Reads `config.json` of a model directory.
pub fn read_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ModelError::NoConfig {
            dir: dir.to_path_buf(),
        });
    }
    ModelConfig::from_file(&path)
}

/// Loads a model directory for inference (or as the frozen base of training).
pub fn load_dir(dir: &Path, opts: LoadOptions) -> Result<CausalLm, ModelError> {
    let config = read_config(dir)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    CausalLm::load(&config, &ckpt, opts)
}

/// As `load_dir`, with quantized linears built by `layers` (e.g. the int4 fast path).
pub fn load_dir_with(
    dir: &Path,
    opts: LoadOptions,
    layers: &dyn decoder::QuantizedLayers,
) -> Result<CausalLm, ModelError> {
    let config = read_config(dir)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    CausalLm::load_with(&config, &ckpt, opts, layers)
}

/// End-of-sequence ids of `generation_config.json`, if the directory has one.
pub fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>, ModelError> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let bad = |msg: String| ModelError::Config {
        path: path.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    match value.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value::<config::TokenIds>(v.clone())
            .map(|ids| ids.to_vec())
            .map_err(|_| bad("`eos_token_id` must be an integer or a list of integers".into())),
    }
}

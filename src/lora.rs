//! LoRA adapters (Hu et al., arXiv 2106.09685) in PEFT's conventions, so the
//! files qcoder writes load in PEFT, transformers and vLLM unchanged.
//!
//! A [`LoraLinear`] wraps a frozen base layer behind the same [`Linear`] trait:
//! `y = base(x) + scaling · B(A(dropout(x)))` with A (r, in) Kaiming-uniform
//! (`kaiming_uniform_(a=√5)`, PEFT's default) and B (out, r) zero, scaling
//! `alpha / r` (rsLoRA: `alpha / √r`). The trainable tensors are f32 whatever
//! the base dtype (bf16 on CUDA), and live only in [`Adapter::params`]: the
//! optimizer is handed that list and never sees a base weight.
//!
//! DoRA (Liu et al., arXiv 2402.09353) as PEFT implements it
//! (`DoraLinearVariant`): a trainable magnitude `m` (out) per module, started
//! at the row norms of W, and `y = base(x) + (m/‖W + s·BA‖ − 1)·(x Wᵀ) +
//! (m/‖W + s·BA‖)·s·B A x`, the norm detached from the graph (the paper's
//! §4.3); merged as `(m/‖W + s·BA‖) ⊙ (W + s·BA)`, row by row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::decoder::LAYER_LINEARS;
use crate::model::linear::{DenseLinear, Linear};
use crate::model::weights::OwnedTensor;
use crate::model::{CausalLm, Checkpoint, ModelError};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("target module `{name}` matches no linear layer of the model (it has: {available})")]
    UnknownTarget { name: String, available: String },
    #[error("{}: {msg}", path.display())]
    Adapter { path: PathBuf, msg: String },
    #[error("DoRA needs the dense weight of `{name}`, which is quantized; train DoRA on an unquantized base")]
    DoraNeedsDense { name: String },
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// What to adapt and how (PEFT `LoraConfig` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude vector per module (PEFT `use_dora`).
    pub use_dora: bool,
    /// Module names (`q_proj`, `self_attn.o_proj`), matched as suffixes of
    /// the full name as PEFT does; empty = "all-linear".
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    fn matches(&self, module: &str) -> bool {
        self.targets.is_empty()
            || self
                .targets
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }

    /// The short names PEFT writes in `target_modules`.
    pub fn target_names(&self) -> Vec<String> {
        if self.targets.is_empty() {
            LAYER_LINEARS
                .iter()
                .map(|n| n.rsplit('.').next().unwrap_or(n).to_string())
                .collect()
        } else {
            self.targets.clone()
        }
    }

    /// Checks every named target against the decoder's linear layers (before
    /// any weight is loaded).
    pub fn check_targets(&self) -> Result<(), LoraError> {
        for t in &self.targets {
            let hit = LAYER_LINEARS
                .iter()
                .any(|l| *l == t || l.ends_with(&format!(".{t}")));
            if !hit {
                return Err(LoraError::UnknownTarget {
                    name: t.clone(),
                    available: LAYER_LINEARS
                        .iter()
                        .map(|n| n.rsplit('.').next().unwrap_or(n))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(())
    }
}

/// A base layer plus its low-rank update.
#[derive(Debug)]
pub struct LoraLinear {
    base: Box<dyn Linear>,
    /// (r, in_features), f32, requires grad.
    pub a: Tensor,
    /// (out_features, r), f32, requires grad.
    pub b: Tensor,
    /// DoRA's magnitude (out_features), f32, requires grad.
    pub magnitude: Option<Tensor>,
    scaling: f64,
    dropout: f64,
    training: Arc<AtomicBool>,
}

impl LoraLinear {
    /// PEFT's `DoraLinearVariant.forward` (in f32 whatever the base dtype,
    /// as PEFT casts the input to the LoRA weights' dtype): `h` is the input
    /// after dropout, `y` the base output of the undropped input.
    fn dora(&self, h: &Tensor, y: Tensor, magnitude: &Tensor, dropped: bool) -> Tensor {
        let w = self
            .base
            .dense_weight()
            .expect("DoRA layers have a dense base (checked when attached)")
            .to_kind(Kind::Float);
        let norm = tch::no_grad(|| row_norms(&(&w + self.b.matmul(&self.a) * self.scaling)));
        let scale = magnitude / norm;
        let h = h.to_kind(Kind::Float);
        let lora = h
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None);
        let base = if dropped {
            h.linear::<Tensor>(&w, None)
        } else {
            match self.base.bias() {
                Some(bias) => y.to_kind(Kind::Float) - bias.to_kind(Kind::Float),
                None => y.to_kind(Kind::Float),
            }
        };
        let dora = (&scale - 1.0) * base + scale * lora * self.scaling;
        (y.to_kind(Kind::Float) + dora).to_kind(y.kind())
    }
}

/// The L2 norm of every row of `w` (out, in) over the input dimension, in
/// f32: DoRA's `‖W + s·BA‖` (PEFT's `get_weight_norm`).
fn row_norms(w: &Tensor) -> Tensor {
    w.to_kind(Kind::Float)
        .square()
        .sum_dim_intlist(&[1i64][..], false, Kind::Float)
        .sqrt()
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.base.forward(x);
        let mut h = x.shallow_clone();
        let dropped = self.dropout > 0.0 && self.training.load(Ordering::Relaxed);
        if dropped {
            h = h.dropout(self.dropout, true);
        }
        if let Some(m) = &self.magnitude {
            return self.dora(&h, y, m, dropped);
        }
        // y + s·(x Aᵀ) Bᵀ, with the scaling folded into B and the low-rank
        // product accumulated into the base output by one `addmm` (no
        // separate scaling and addition passes over the layer's output).
        // With a bf16/f16 base the low-rank path runs in the base's dtype
        // from rounded copies of the f32 weights (mixed precision, as under
        // `torch.autocast`; the products still accumulate in f32). PEFT
        // instead converts the activations to f32 and the sum back: two
        // copies of a (tokens × features) tensor per layer and per
        // direction, a large share of a CPU step. The gradients reach the
        // f32 A and B through the casts.
        let kind = x.kind();
        let b = (&self.b * self.scaling).to_kind(kind);
        let xa = h.linear::<Tensor>(&self.a.to_kind(kind), None);
        let (r, out) = (xa.size()[xa.dim() - 1], y.size()[y.dim() - 1]);
        y.reshape([-1, out])
            .addmm(&xa.reshape([-1, r]), &b.tr())
            .view(y.size().as_slice())
    }
    fn in_features(&self) -> i64 {
        self.base.in_features()
    }
    fn out_features(&self) -> i64 {
        self.base.out_features()
    }
    fn dense_weight(&self) -> Option<&Tensor> {
        self.base.dense_weight()
    }
    fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }
}

/// One adapted module: its HF name and (views of) its A and B.
#[derive(Debug)]
pub struct LoraModule {
    /// `model.layers.0.self_attn.q_proj`
    pub name: String,
    pub a: Tensor,
    pub b: Tensor,
    pub magnitude: Option<Tensor>,
}

impl LoraModule {
    /// PEFT's saved key of A or B: `base_model.model.{name}.lora_A.weight`.
    pub fn key(&self, which: char) -> String {
        format!("base_model.model.{}.lora_{which}.weight", self.name)
    }

    /// PEFT's saved key of the DoRA magnitude (no `.weight` suffix: PEFT
    /// saves the `lora_magnitude_vector.default.weight` parameter under it).
    pub fn magnitude_key(&self) -> String {
        format!("base_model.model.{}.lora_magnitude_vector", self.name)
    }
}

/// The LoRA layers inserted into a model, in model order.
#[derive(Debug)]
pub struct Adapter {
    pub config: LoraConfig,
    pub modules: Vec<LoraModule>,
    training: Arc<AtomicBool>,
}

impl Adapter {
    /// Wraps every targeted linear of `model` with a fresh LoRA layer (A from
    /// libtorch's generator, so seed it first; B zero). LoRA tensors are f32
    /// on the model's device.
    pub fn attach(model: &mut CausalLm, config: &LoraConfig) -> Result<Self, LoraError> {
        config.check_targets()?;
        let device = model.device();
        let training = Arc::new(AtomicBool::new(false));
        let mut modules = Vec::new();
        for (name, slot) in model.linears_mut() {
            if !config.matches(&name) {
                continue;
            }
            let (in_f, out_f) = (slot.in_features(), slot.out_features());
            let r = config.r as i64;
            // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in.
            let bound = 1.0 / (in_f as f64).sqrt();
            let a = Tensor::f_empty([r, in_f], (Kind::Float, device))?
                .f_uniform_(-bound, bound)?
                .set_requires_grad(true);
            let b = Tensor::f_zeros([out_f, r], (Kind::Float, device))?.set_requires_grad(true);
            let magnitude = if config.use_dora {
                // PEFT starts m at ‖W + s·BA‖ = ‖W‖ (B is zero), computed in
                // the base weight's dtype.
                let w = slot
                    .dense_weight()
                    .ok_or_else(|| LoraError::DoraNeedsDense { name: name.clone() })?;
                let norms = tch::no_grad(|| row_norms(w).to_kind(w.kind()).to_kind(Kind::Float));
                Some(norms.set_requires_grad(true))
            } else {
                None
            };
            let placeholder: Box<dyn Linear> = Box::new(DenseLinear::new(Tensor::new(), None));
            let base = std::mem::replace(slot, placeholder);
            *slot = Box::new(LoraLinear {
                base,
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                magnitude: magnitude.as_ref().map(Tensor::shallow_clone),
                scaling: config.scaling(),
                dropout: config.dropout,
                training: training.clone(),
            });
            modules.push(LoraModule {
                name,
                a,
                b,
                magnitude,
            });
        }
        Ok(Self {
            config: config.clone(),
            modules,
            training,
        })
    }

    /// Dropout on (training) or off (evaluation).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// The trainable tensors, A then B (then DoRA's magnitude) of each
    /// module, in model order.
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for m in &self.modules {
            out.push((m.key('A'), m.a.shallow_clone()));
            out.push((m.key('B'), m.b.shallow_clone()));
            if let Some(mag) = &m.magnitude {
                out.push((m.magnitude_key(), mag.shallow_clone()));
            }
        }
        out
    }

    pub fn n_params(&self) -> i64 {
        self.params().iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<(), LoraError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoraError::Io { path, source }
        };
        let config = AdapterConfigFile::new(&self.config, base_model);
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&config).map_err(|e| LoraError::Adapter {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(io(&path))?;
        let tensors = self
            .params()
            .into_iter()
            .map(|(k, t)| Ok((k, OwnedTensor::from_tensor(&t.detach())?)))
            .collect::<Result<Vec<_>, ModelError>>()?;
        write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors)
    }

    /// Overwrites A and B with those of a saved adapter (same modules and r).
    pub fn load_weights(&self, dir: &Path) -> Result<(), LoraError> {
        let path = dir.join(ADAPTER_WEIGHTS);
        let ckpt = Checkpoint::open(&path)?;
        let bad = |msg: String| LoraError::Adapter {
            path: path.clone(),
            msg,
        };
        tch::no_grad(|| -> Result<(), LoraError> {
            for (key, param) in self.params() {
                if !ckpt.contains(&key) {
                    return Err(bad(format!("tensor `{key}` is missing")));
                }
                let t = ckpt.tensor_any_shape(&key, Kind::Float, param.device())?;
                if t.size() != param.size() {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}, expected {:?}",
                        t.size(),
                        param.size()
                    )));
                }
                param.shallow_clone().f_copy_(&t)?;
            }
            Ok(())
        })
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, OwnedTensor)]) -> Result<(), LoraError> {
    let views: Vec<(&str, &OwnedTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|source| {
        LoraError::Model(ModelError::Safetensors {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Writes named tensors to one safetensors file (checkpoint state).
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), LoraError> {
    let owned = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), OwnedTensor::from_tensor(&t.detach())?)))
        .collect::<Result<Vec<_>, ModelError>>()?;
    write_safetensors(path, &owned)
}

/// `adapter_config.json` as PEFT writes it for a LoRA adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfigFile {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

impl AdapterConfigFile {
    fn new(c: &LoraConfig, base_model: &str) -> Self {
        let rest = serde_json::json!({
            "alpha_pattern": {},
            "rank_pattern": {},
            "auto_mapping": null,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "modules_to_save": null,
            "revision": null,
        });
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.into()),
            r: c.r,
            lora_alpha: c.alpha,
            lora_dropout: c.dropout,
            target_modules: serde_json::json!(c.target_names()),
            use_rslora: c.use_rslora,
            use_dora: c.use_dora,
            bias: Some("none".into()),
            fan_in_fan_out: false,
            rest: rest.as_object().cloned().unwrap_or_default(),
        }
    }

    pub fn read(dir: &Path) -> Result<Self, LoraError> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|source| LoraError::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |msg: String| LoraError::Adapter {
            path: path.clone(),
            msg,
        };
        let c: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if c.peft_type != "LORA" {
            return Err(bad(format!(
                "peft_type is {:?}; only LORA adapters are supported",
                c.peft_type
            )));
        }
        if c.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out adapters (GPT-2 Conv1D) are not supported".into(),
            ));
        }
        if c.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(bad(format!(
                "bias = {:?}: only adapters without trained biases are supported",
                c.bias
            )));
        }
        if c.r == 0 {
            return Err(bad("r is 0".into()));
        }
        Ok(c)
    }

    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// What a saved adapter does to one base weight.
#[derive(Debug)]
pub struct Update {
    /// `scaling · B A`, f32.
    pub delta: Tensor,
    /// DoRA's magnitude (out), f32.
    pub magnitude: Option<Tensor>,
}

impl Update {
    /// The merged weight in f32: `W + ΔW`, or with DoRA
    /// `(m / ‖W + ΔW‖) ⊙ (W + ΔW)` row by row (PEFT's `merge_safe`).
    pub fn apply(&self, w: &Tensor) -> Tensor {
        let full = w.to_kind(Kind::Float) + &self.delta;
        match &self.magnitude {
            Some(m) => (m / row_norms(&full)).unsqueeze(1) * full,
            None => full,
        }
    }
}

/// The update of every module of a saved adapter, keyed by the base weight
/// it applies to (`model.layers.0.self_attn.q_proj.weight`).
pub fn read_deltas(dir: &Path, device: Device) -> Result<HashMap<String, Update>, LoraError> {
    let config = AdapterConfigFile::read(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let ckpt = Checkpoint::open(&path)?;
    let bad = |msg: String| LoraError::Adapter {
        path: path.clone(),
        msg,
    };
    let mut deltas = HashMap::new();
    let names: Vec<String> = ckpt.tensors().map(|m| m.name.to_string()).collect();
    for key in &names {
        let Some(module) = key
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        else {
            let dora = config.use_dora && key.ends_with(".lora_magnitude_vector");
            if key.ends_with(".lora_B.weight") || dora {
                continue;
            }
            return Err(bad(format!(
                "unexpected tensor `{key}` (expected base_model.model.*.lora_A/lora_B.weight{})",
                if config.use_dora {
                    "/lora_magnitude_vector"
                } else {
                    ""
                }
            )));
        };
        let b_key = format!("base_model.model.{module}.lora_B.weight");
        if !ckpt.contains(&b_key) {
            return Err(bad(format!("`{key}` has no matching `{b_key}`")));
        }
        let a = ckpt.tensor_any_shape(key, Kind::Float, device)?;
        let b = ckpt.tensor_any_shape(&b_key, Kind::Float, device)?;
        if a.size()[0] != b.size()[1] {
            return Err(bad(format!(
                "`{key}` {:?} and `{b_key}` {:?} disagree on the rank",
                a.size(),
                b.size()
            )));
        }
        let magnitude = if config.use_dora {
            let m_key = format!("base_model.model.{module}.lora_magnitude_vector");
            if !ckpt.contains(&m_key) {
                return Err(bad(format!("use_dora is set but `{m_key}` is missing")));
            }
            let m = ckpt.tensor_any_shape(&m_key, Kind::Float, device)?;
            if m.size() != [b.size()[0]] {
                return Err(bad(format!(
                    "`{m_key}` has shape {:?}, expected [{}]",
                    m.size(),
                    b.size()[0]
                )));
            }
            Some(m)
        } else {
            None
        };
        let delta = b.matmul(&a) * config.scaling();
        deltas.insert(format!("{module}.weight"), Update { delta, magnitude });
    }
    if deltas.is_empty() {
        return Err(bad("no LoRA tensors".into()));
    }
    Ok(deltas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_layer_starts_as_the_base_and_adds_scaled_ba() {
        tch::manual_seed(0);
        let w = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
        let base: Box<dyn Linear> = Box::new(DenseLinear::new(w.shallow_clone(), None));
        let a = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([6, 2], (Kind::Float, Device::Cpu));
        let layer = LoraLinear {
            base,
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            magnitude: None,
            scaling: 2.0,
            dropout: 0.5,
            training: Arc::new(AtomicBool::new(false)),
        };
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let y0 = x.matmul(&w.tr());
        assert!(layer.forward(&x).allclose(&y0, 1e-6, 1e-6, false));
        let b2 = Tensor::randn([6, 2], (Kind::Float, Device::Cpu));
        tch::no_grad(|| b.shallow_clone().copy_(&b2));
        let want = &y0 + x.matmul(&a.tr()).matmul(&b2.tr()) * 2.0;
        assert!(layer.forward(&x).allclose(&want, 1e-5, 1e-5, false));
    }

    #[test]
    fn scaling_and_targets() {
        let mut c = LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            targets: vec!["q_proj".into(), "mlp.down_proj".into()],
        };
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
        assert!(c.matches("model.layers.3.self_attn.q_proj"));
        assert!(c.matches("model.layers.3.mlp.down_proj"));
        assert!(!c.matches("model.layers.3.self_attn.k_proj"));
        assert!(c.check_targets().is_ok());
        c.targets = vec!["qkv_proj".into()];
        let err = c.check_targets().unwrap_err().to_string();
        assert!(
            err.contains("`qkv_proj`") && err.contains("q_proj"),
            "{err}"
        );
    }
}

/// What `merge` wrote.
#[derive(Debug)]
pub struct MergeSummary {
    pub merged_modules: usize,
    pub files: Vec<PathBuf>,
}

/// Writes `base` with `adapter` folded into its weights (`W + scaling · B A`,
/// rows rescaled by DoRA's magnitudes when the adapter has them; computed in
/// f32 and stored in each weight's own dtype) as a model directory in `out`
/// (which must exist), with the base's config, tokenizer and generation
/// files copied.
pub fn merge(
    base: &Path,
    adapter: &Path,
    out: &Path,
    max_shard_bytes: u64,
) -> Result<MergeSummary, LoraError> {
    let config = crate::model::read_config(base)?;
    if config.quantization_config.is_some() {
        return Err(LoraError::Adapter {
            path: base.join("config.json"),
            msg: "the base model is quantized; merge into its unquantized original".into(),
        });
    }
    let mut deltas = read_deltas(adapter, Device::Cpu)?;
    let ckpt = Checkpoint::open_dir(base)?;
    let mut writer = crate::model::weights::ShardedWriter::new(out, max_shard_bytes);
    let names: Vec<(String, safetensors::Dtype)> = ckpt
        .tensors()
        .map(|m| (m.name.to_string(), m.dtype))
        .collect();
    let mut merged_modules = 0;
    for (name, dtype) in names {
        let kind = crate::model::weights::kind_of(dtype).ok_or_else(|| {
            LoraError::Model(ModelError::UnsupportedDtype {
                name: name.clone(),
                path: base.to_path_buf(),
                dtype: format!("{dtype:?}"),
            })
        })?;
        let tensor = match deltas.remove(&name) {
            Some(update) => {
                let w = ckpt.tensor_any_shape(&name, Kind::Float, Device::Cpu)?;
                if w.size() != update.delta.size() {
                    return Err(LoraError::Adapter {
                        path: adapter.join(ADAPTER_WEIGHTS),
                        msg: format!(
                            "the update of `{name}` is {:?}, the base weight {:?}",
                            update.delta.size(),
                            w.size()
                        ),
                    });
                }
                merged_modules += 1;
                update.apply(&w).to_kind(kind)
            }
            None => ckpt.tensor_any_shape(&name, kind, Device::Cpu)?,
        };
        writer.add(name, &tensor)?;
    }
    if let Some(name) = deltas.keys().min() {
        return Err(LoraError::Adapter {
            path: adapter.join(ADAPTER_WEIGHTS),
            msg: format!("the adapter updates `{name}`, which the base model does not have"),
        });
    }
    let mut files = writer.finish()?;
    let entries = std::fs::read_dir(base).map_err(|source| LoraError::Io {
        path: base.to_path_buf(),
        source,
    })?;
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let is_weights =
            name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json");
        if path.is_file() && !is_weights && !name.starts_with('.') {
            let dest = out.join(&name);
            std::fs::copy(&path, &dest).map_err(|source| LoraError::Io {
                path: dest.clone(),
                source,
            })?;
            files.push(dest);
        }
    }
    Ok(MergeSummary {
        merged_modules,
        files,
    })
}

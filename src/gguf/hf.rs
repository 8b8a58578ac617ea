//! The mapping between a GGUF file and a Hugging Face checkpoint of the same
//! decoder: architecture names, hyper-parameters, tensor names and shapes,
//! llama.cpp's Q/K row permutation for `llama`, and the Q4_K_M type mix.

use serde_json::{json, Map, Value as Json};

use super::keys::{self, arch_key, attention, general, llm, rope, tensors};
use super::reader::{GgufFile, TensorInfo};
use super::types::GgmlType;
use super::GgufError;
use crate::model::config::{Architecture, ModelConfig, RopeScaling};

/// The GGUF architectures qcoder converts, with their HF counterparts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Qwen2,
    Qwen3,
    Llama,
}

impl GgufArch {
    pub const ALL: &'static [GgufArch] = &[GgufArch::Qwen2, GgufArch::Qwen3, GgufArch::Llama];

    /// `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
            GgufArch::Llama => "llama",
        }
    }

    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|a| a.gguf_name() == name)
    }

    fn hf_class(self) -> &'static str {
        match self {
            GgufArch::Qwen2 => "Qwen2ForCausalLM",
            GgufArch::Qwen3 => "Qwen3ForCausalLM",
            GgufArch::Llama => "LlamaForCausalLM",
        }
    }

    fn model_type(self) -> &'static str {
        self.gguf_name()
    }

    /// The GGUF architecture an HF config is written as (Mistral is `llama`
    /// to llama.cpp, as in `convert_hf_to_gguf.py`).
    pub fn from_config(config: &ModelConfig) -> Result<Self, String> {
        Ok(match config.architecture().map_err(|e| e.to_string())? {
            Architecture::Qwen2 => GgufArch::Qwen2,
            Architecture::Qwen3 => GgufArch::Qwen3,
            Architecture::Llama => GgufArch::Llama,
        })
    }

    /// Whether llama.cpp stores q/k rows of this architecture in its rotary
    /// order (interleaved halves); see [`permute_qk`].
    pub fn permutes_qk(self) -> bool {
        self == GgufArch::Llama
    }

    fn supported() -> String {
        Self::ALL
            .iter()
            .map(|a| a.gguf_name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// HF name of a GGUF tensor name, or `None` when the decoder has no such weight.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    if let Some(&(_, hf)) = tensors::GLOBAL.iter().find(|(g, _)| *g == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix(tensors::LAYER_GGUF_PREFIX)?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = tensors::LAYER.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("{}{layer}.{hf}", tensors::LAYER_HF_PREFIX))
}

/// GGUF name of an HF tensor name.
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    if let Some(&(g, _)) = tensors::GLOBAL.iter().find(|(_, h)| *h == hf_name) {
        return Some(g.to_string());
    }
    let rest = hf_name.strip_prefix(tensors::LAYER_HF_PREFIX)?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = tensors::LAYER.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("{}{layer}.{g}", tensors::LAYER_GGUF_PREFIX))
}

/// The layer of a GGUF tensor name (`blk.{i}.…`).
pub fn layer_of(gguf_name: &str) -> Option<usize> {
    gguf_name
        .strip_prefix(tensors::LAYER_GGUF_PREFIX)?
        .split_once('.')?
        .0
        .parse()
        .ok()
}

/// Every tensor the HF decoder of `config` loads, with its HF shape, in the
/// order `convert_hf_to_gguf.py` writes them (globals, then layer by layer).
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (hidden, ffn) = (config.hidden_size, config.intermediate_size);
    let head_dim = config.head_dim();
    let (q_out, kv_out) = (
        config.num_attention_heads * head_dim,
        config.n_kv_heads() * head_dim,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, hidden],
    )];
    for i in 0..config.num_hidden_layers {
        let p = |s: &str| format!("{}{i}.{s}", tensors::LAYER_HF_PREFIX);
        out.push((p("input_layernorm.weight"), vec![hidden]));
        out.push((p("self_attn.q_proj.weight"), vec![q_out, hidden]));
        out.push((p("self_attn.k_proj.weight"), vec![kv_out, hidden]));
        out.push((p("self_attn.v_proj.weight"), vec![kv_out, hidden]));
        if config.qkv_bias() {
            out.push((p("self_attn.q_proj.bias"), vec![q_out]));
            out.push((p("self_attn.k_proj.bias"), vec![kv_out]));
            out.push((p("self_attn.v_proj.bias"), vec![kv_out]));
        }
        out.push((p("self_attn.o_proj.weight"), vec![hidden, q_out]));
        if config.o_bias() {
            out.push((p("self_attn.o_proj.bias"), vec![hidden]));
        }
        if config.has_qk_norm() {
            out.push((p("self_attn.q_norm.weight"), vec![head_dim]));
            out.push((p("self_attn.k_norm.weight"), vec![head_dim]));
        }
        out.push((p("post_attention_layernorm.weight"), vec![hidden]));
        out.push((p("mlp.gate_proj.weight"), vec![ffn, hidden]));
        out.push((p("mlp.up_proj.weight"), vec![ffn, hidden]));
        out.push((p("mlp.down_proj.weight"), vec![hidden, ffn]));
    }
    out.push(("model.norm.weight".to_string(), vec![hidden]));
    if !config.tie_word_embeddings() {
        out.push((
            "lm_head.weight".to_string(),
            vec![config.vocab_size, hidden],
        ));
    }
    out
}

/// llama.cpp's q/k row order for `llama` (`LlamaModel.permute` in
/// convert_hf_to_gguf.py): within each head, HF's rotate-half layout (first
/// half of the rotary pairs, then the second half) becomes interleaved pairs.
/// Row `h·d + 2i + j` of the result is row `h·d + j·d/2 + i` of the input
/// (d = head_dim, j ∈ {0, 1}). `data` holds `rows × row_len` values.
pub fn permute_qk(data: &[f32], row_len: usize, n_heads: usize) -> Vec<f32> {
    reorder_qk_rows(data, row_len, n_heads, true)
}

/// Inverse of [`permute_qk`].
pub fn unpermute_qk(data: &[f32], row_len: usize, n_heads: usize) -> Vec<f32> {
    reorder_qk_rows(data, row_len, n_heads, false)
}

fn reorder_qk_rows(data: &[f32], row_len: usize, n_heads: usize, forward: bool) -> Vec<f32> {
    let rows = data.len() / row_len;
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let interleaved = h * head_dim + 2 * i + j;
                let halves = h * head_dim + j * half + i;
                let (dst, src) = if forward {
                    (interleaved, halves)
                } else {
                    (halves, interleaved)
                };
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// How many heads the rows of a q/k tensor are grouped in, if the tensor is
/// permuted in llama.cpp's files (`None` for every other tensor).
pub fn qk_heads(arch: GgufArch, config: &ModelConfig, gguf_name: &str) -> Option<usize> {
    if !arch.permutes_qk() {
        return None;
    }
    let suffix = gguf_name
        .strip_prefix(tensors::LAYER_GGUF_PREFIX)?
        .split_once('.')?
        .1;
    match suffix {
        "attn_q.weight" | "attn_q.bias" => Some(config.num_attention_heads),
        "attn_k.weight" | "attn_k.bias" => Some(config.n_kv_heads()),
        _ => None,
    }
}

/// A GGUF file read as an HF checkpoint: its config and its tensors by HF name.
pub struct HfView {
    pub arch: GgufArch,
    pub config: ModelConfig,
    /// (index into the file's tensor table, HF name, HF shape), in file order.
    pub tensors: Vec<(usize, String, Vec<usize>)>,
}

impl HfView {
    pub fn new(file: &GgufFile) -> Result<Self, GgufError> {
        let invalid = |msg: String| GgufError::Invalid {
            path: file.path().to_path_buf(),
            msg,
        };
        let arch_name = file.str(general::ARCHITECTURE)?;
        let arch = GgufArch::from_gguf_name(arch_name).ok_or_else(|| {
            invalid(format!(
                "architecture `{arch_name}` is not supported (supported: {})",
                GgufArch::supported()
            ))
        })?;
        let config = config_from_gguf(file, arch)?;
        config.validate().map_err(|msg| {
            invalid(format!(
                "the hyper-parameters do not form a valid model: {msg}"
            ))
        })?;
        let expected = expected_tensors(&config);
        let mut out = Vec::with_capacity(file.header.tensors.len());
        for (i, t) in file.header.tensors.iter().enumerate() {
            let hf = hf_tensor_name(&t.name).ok_or_else(|| {
                let why = if t.name.starts_with("rope_freqs") {
                    " (precomputed rope frequencies, i.e. Llama 3 rope scaling, cannot be imported)"
                } else {
                    ""
                };
                invalid(format!(
                    "tensor `{}` has no Hugging Face equivalent{why}",
                    t.name
                ))
            })?;
            let shape = t.torch_shape();
            let want = expected
                .iter()
                .find(|(name, _)| *name == hf)
                .ok_or_else(|| {
                    invalid(format!(
                        "tensor `{}` ({hf}) is not part of a {} model with this configuration",
                        t.name,
                        arch.gguf_name()
                    ))
                })?;
            if want.1 != shape {
                return Err(invalid(format!(
                    "tensor `{}` has shape {shape:?} (as {hf}), but the metadata implies {:?}",
                    t.name, want.1
                )));
            }
            out.push((i, hf, shape));
        }
        for (name, _) in &expected {
            if !out.iter().any(|(_, hf, _)| hf == name) {
                let gguf = gguf_tensor_name(name).unwrap_or_else(|| name.clone());
                return Err(GgufError::MissingTensor {
                    path: file.path().to_path_buf(),
                    name: gguf,
                });
            }
        }
        Ok(Self {
            arch,
            config,
            tensors: out,
        })
    }

    /// Tensor `k` of [`Self::tensors`] decoded to f32 in HF row order (llama's
    /// q/k permutation undone).
    pub fn tensor_f32(&self, file: &GgufFile, k: usize) -> Result<Vec<f32>, GgufError> {
        let (i, _, _) = &self.tensors[k];
        let t: &TensorInfo = &file.header.tensors[*i];
        let values = file.decode(t)?;
        Ok(match qk_heads(self.arch, &self.config, &t.name) {
            Some(heads) => unpermute_qk(&values, t.row_len(), heads),
            None => values,
        })
    }
}

/// `config.json` of the model a GGUF file holds, from the `{arch}.*` keys.
fn config_from_gguf(file: &GgufFile, arch: GgufArch) -> Result<ModelConfig, GgufError> {
    let a = arch.gguf_name();
    let key = |template: &str| arch_key(template, a);
    let invalid = |msg: String| GgufError::Invalid {
        path: file.path().to_path_buf(),
        msg,
    };
    let usize_key =
        |template: &str| -> Result<usize, GgufError> { Ok(file.u64(&key(template))? as usize) };
    let hidden = usize_key(llm::EMBEDDING_LENGTH)?;
    let n_heads = usize_key(attention::HEAD_COUNT)?;
    let n_kv = file
        .opt_u64(&key(attention::HEAD_COUNT_KV))?
        .map(|v| v as usize)
        .unwrap_or(n_heads);
    if n_heads == 0 {
        return Err(invalid(format!("`{}` is 0", key(attention::HEAD_COUNT))));
    }
    let head_dim = file
        .opt_u64(&key(attention::KEY_LENGTH))?
        .map(|v| v as usize)
        .unwrap_or(hidden / n_heads);
    if let Some(v) = file.opt_u64(&key(attention::VALUE_LENGTH))? {
        if v as usize != head_dim {
            return Err(invalid(format!(
                "value length {v} differs from key length {head_dim}, which these decoders do not support"
            )));
        }
    }
    if let Some(rope_dim) = file.opt_u64(&key(rope::DIMENSION_COUNT))? {
        if rope_dim as usize != head_dim {
            return Err(invalid(format!(
                "rope covers {rope_dim} of {head_dim} head dimensions; partial rotary embeddings are not supported"
            )));
        }
    }
    let embd = file.tensor(tensors::TOKEN_EMBD)?;
    let vocab_size = embd.dims.get(1).copied().unwrap_or(0) as usize;
    let rms_eps = file
        .opt_f64(&key(attention::LAYERNORM_RMS_EPS))?
        .ok_or_else(|| GgufError::MissingKey {
            path: file.path().to_path_buf(),
            key: key(attention::LAYERNORM_RMS_EPS),
        })?;
    // f32 on disk: print it as the shortest decimal that reads back as the
    // same f32 (9.999999974752427e-07 → 1e-06), as HF configs write it.
    let rms_eps = shortest_f32(rms_eps);
    let theta = file
        .opt_f64(&key(rope::FREQ_BASE))?
        .map(shortest_f32)
        .unwrap_or(10_000.0);
    let rope_scaling = match file.opt_str(&key(rope::SCALING_TYPE))? {
        None | Some("none") => None,
        Some("linear") => {
            let factor = file.opt_f64(&key(rope::SCALING_FACTOR))?.unwrap_or(1.0);
            Some(json!({"rope_type": "linear", "type": "linear", "factor": shortest_f32(factor)}))
        }
        Some("yarn") => {
            let factor = file.opt_f64(&key(rope::SCALING_FACTOR))?.unwrap_or(1.0);
            let mut m = Map::new();
            m.insert("rope_type".into(), json!("yarn"));
            m.insert("type".into(), json!("yarn"));
            m.insert("factor".into(), json!(shortest_f32(factor)));
            if let Some(orig) = file.opt_u64(&key(rope::SCALING_ORIG_CTX_LEN))? {
                m.insert("original_max_position_embeddings".into(), json!(orig));
            }
            if let Some(b) = file.opt_f64(&key(rope::SCALING_YARN_BETA_FAST))? {
                m.insert("beta_fast".into(), json!(shortest_f32(b)));
            }
            if let Some(b) = file.opt_f64(&key(rope::SCALING_YARN_BETA_SLOW))? {
                m.insert("beta_slow".into(), json!(shortest_f32(b)));
            }
            Some(Json::Object(m))
        }
        Some(other) => {
            return Err(invalid(format!(
                "rope scaling type `{other}` is not supported"
            )))
        }
    };
    let has_q_bias = file.header.tensor("blk.0.attn_q.bias").is_some();
    let token_id =
        |k: &str| -> Result<Option<u32>, GgufError> { Ok(file.opt_u64(k)?.map(|v| v as u32)) };
    let value = json!({
        "architectures": [arch.hf_class()],
        "model_type": arch.model_type(),
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": usize_key(llm::FEED_FORWARD_LENGTH)?,
        "num_hidden_layers": usize_key(llm::BLOCK_COUNT)?,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": usize_key(llm::CONTEXT_LENGTH)?,
        "rms_norm_eps": rms_eps,
        "hidden_act": "silu",
        "rope_theta": theta,
        "tie_word_embeddings": file.header.tensor(tensors::OUTPUT).is_none(),
        "bos_token_id": token_id(keys::tokenizer::BOS_ID)?,
        "eos_token_id": token_id(keys::tokenizer::EOS_ID)?,
        "use_cache": true,
    });
    let mut value = value;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| invalid("config is not an object".into()))?;
    if let Some(s) = rope_scaling {
        obj.insert("rope_scaling".into(), s);
    }
    match arch {
        GgufArch::Llama => {
            obj.insert("attention_bias".into(), json!(has_q_bias));
            obj.insert("mlp_bias".into(), json!(false));
        }
        GgufArch::Qwen2 | GgufArch::Qwen3 => {
            obj.insert("use_sliding_window".into(), json!(false));
            if arch == GgufArch::Qwen3 {
                obj.insert("attention_bias".into(), json!(has_q_bias));
            }
        }
    }
    serde_json::from_value(value).map_err(|e| invalid(format!("building config.json: {e}")))
}

/// The shortest decimal that reads back as the same f32 (GGUF stores these
/// hyper-parameters as f32; HF configs hold the decimal the author wrote).
fn shortest_f32(v: f64) -> f64 {
    let s = format!("{}", v as f32);
    s.parse().unwrap_or(v)
}

/// `{arch}.*` hyper-parameters of an HF config, for the GGUF writer.
pub fn gguf_hparams(
    config: &ModelConfig,
    arch: GgufArch,
) -> Result<Vec<(String, super::Value)>, String> {
    use super::Value as V;
    let a = arch.gguf_name();
    let key = |t: &str| arch_key(t, a);
    let rope_cfg = config.rope()?;
    let mut kv = vec![
        (
            key(llm::CONTEXT_LENGTH),
            V::U32(config.max_position_embeddings as u32),
        ),
        (
            key(llm::EMBEDDING_LENGTH),
            V::U32(config.hidden_size as u32),
        ),
        (
            key(llm::BLOCK_COUNT),
            V::U32(config.num_hidden_layers as u32),
        ),
        (
            key(llm::FEED_FORWARD_LENGTH),
            V::U32(config.intermediate_size as u32),
        ),
        (
            key(attention::HEAD_COUNT),
            V::U32(config.num_attention_heads as u32),
        ),
        (
            key(attention::HEAD_COUNT_KV),
            V::U32(config.n_kv_heads() as u32),
        ),
        (key(rope::FREQ_BASE), V::F32(rope_cfg.theta as f32)),
        (
            key(attention::LAYERNORM_RMS_EPS),
            V::F32(config.rms_norm_eps as f32),
        ),
        (key(attention::KEY_LENGTH), V::U32(config.head_dim() as u32)),
        (
            key(attention::VALUE_LENGTH),
            V::U32(config.head_dim() as u32),
        ),
    ];
    if rope_cfg.dim != config.head_dim() {
        return Err(format!(
            "partial rotary embeddings ({} of {} dimensions) are not supported in GGUF export",
            rope_cfg.dim,
            config.head_dim()
        ));
    }
    if arch == GgufArch::Llama {
        kv.push((key(llm::VOCAB_SIZE), V::U32(config.vocab_size as u32)));
        kv.push((key(rope::DIMENSION_COUNT), V::U32(config.head_dim() as u32)));
    }
    match rope_cfg.scaling {
        RopeScaling::Default | RopeScaling::Llama3 { .. } => {}
        RopeScaling::Linear { factor } => {
            kv.push((key(rope::SCALING_TYPE), V::String("linear".into())));
            kv.push((key(rope::SCALING_FACTOR), V::F32(factor as f32)));
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            ..
        } => {
            kv.push((key(rope::SCALING_TYPE), V::String("yarn".into())));
            kv.push((key(rope::SCALING_FACTOR), V::F32(factor as f32)));
            kv.push((
                key(rope::SCALING_ORIG_CTX_LEN),
                V::U32(original_max_position_embeddings as u32),
            ));
            kv.push((key(rope::SCALING_YARN_BETA_FAST), V::F32(beta_fast as f32)));
            kv.push((key(rope::SCALING_YARN_BETA_SLOW), V::F32(beta_slow as f32)));
        }
    }
    if config.layer_windows()?.iter().any(Option::is_some) {
        return Err("sliding-window attention is not supported in GGUF export".into());
    }
    Ok(kv)
}

/// llama.cpp's per-frequency factors for Llama 3 rope scaling, written as the
/// `rope_freqs.weight` tensor (`LlamaModel.generate_extra_tensors` in
/// convert_hf_to_gguf.py); `None` for every other rope type.
pub fn llama3_rope_freqs(config: &ModelConfig) -> Result<Option<Vec<f32>>, String> {
    let rope_cfg = config.rope()?;
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old_ctx,
    } = rope_cfg.scaling
    else {
        return Ok(None);
    };
    let dim = config.head_dim();
    let low_freq_wavelen = old_ctx / low_freq_factor;
    let high_freq_wavelen = old_ctx / high_freq_factor;
    let factors = (0..dim)
        .step_by(2)
        .map(|i| {
            // torch: 1 / base ** (arange(0, dim, 2, f32) / dim), in f32.
            let freq = 1.0f32 / (rope_cfg.theta as f32).powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                factor as f32
            } else {
                let smooth =
                    (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect();
    Ok(Some(factors))
}

/// GGUF name of the Llama 3 rope factors tensor.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The export types `qcoder export --type` offers, as llama.cpp names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4KM,
}

impl FileType {
    pub const ALL: &'static [(FileType, &'static str)] = &[
        (FileType::F16, "f16"),
        (FileType::Bf16, "bf16"),
        (FileType::Q8_0, "q8_0"),
        (FileType::Q4_0, "q4_0"),
        (FileType::Q4_1, "q4_1"),
        (FileType::Q4KM, "q4_k_m"),
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(t, _)| *t)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// `general.file_type` (`llama_ftype`).
    pub fn llama_ftype(self) -> u32 {
        use keys::file_type::*;
        match self {
            FileType::F16 => MOSTLY_F16,
            FileType::Bf16 => MOSTLY_BF16,
            FileType::Q8_0 => MOSTLY_Q8_0,
            FileType::Q4_0 => MOSTLY_Q4_0,
            FileType::Q4_1 => MOSTLY_Q4_1,
            FileType::Q4KM => MOSTLY_Q4_K_M,
        }
    }

    /// The type of most 2-D weights.
    fn base_type(self) -> GgmlType {
        match self {
            FileType::F16 => GgmlType::F16,
            FileType::Bf16 => GgmlType::Bf16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q4KM => GgmlType::Q4K,
        }
    }
}

/// The storage type of one tensor in a file of type `ftype`, following
/// llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp of the llama.cpp
/// vendored in llama-cpp-python 0.3.36), for the tensors of these decoders:
///
/// * 1-D tensors (norms, biases, rope factors) stay F32; so do tensors whose
///   names do not end in `weight`.
/// * F16/BF16 files store every other tensor in that type.
/// * `output.weight` (or `token_embd.weight` when the embeddings are tied)
///   gets Q6_K unless the base type is Q8_0.
/// * Q4_K_M: `attn_v` and `ffn_down` get Q6_K on the layers `use_more_bits`
///   picks (the first and last eighth, and every third layer in between);
///   everything else Q4_K. llama.cpp counts those tensors in file order;
///   qcoder writes layers in numeric order, so the count is the layer index
///   (GGUFs converted from checkpoints whose tensors sort alphabetically —
///   blk.0, blk.1, blk.10, … — get a shifted set, as the real Qwen file does).
/// * A type whose block does not divide the row length falls back as
///   `tensor_type_fallback` does: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and
///   to F16 when even 32 does not divide it.
pub fn tensor_type(
    ftype: FileType,
    gguf_name: &str,
    dims: &[u64],
    n_layers: usize,
    tied_embeddings: bool,
) -> GgmlType {
    if dims.len() < 2 || !gguf_name.ends_with("weight") {
        return GgmlType::F32;
    }
    let base = ftype.base_type();
    if !base.is_quantized() {
        return base;
    }
    let mut ty = base;
    let is_output =
        gguf_name == tensors::OUTPUT || (tied_embeddings && gguf_name == tensors::TOKEN_EMBD);
    let row_len = dims[0];
    if is_output {
        if !row_len.is_multiple_of(GgmlType::Q6K.block_size() as u64) {
            ty = GgmlType::Q8_0;
        } else if base != GgmlType::Q8_0 {
            ty = GgmlType::Q6K;
        }
    } else if ftype == FileType::Q4KM {
        let use_more_bits = |i: usize, n: usize| {
            i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
        };
        let layer = layer_of(gguf_name);
        if let Some(i) = layer {
            if (gguf_name.ends_with(".attn_v.weight") || gguf_name.ends_with(".ffn_down.weight"))
                && use_more_bits(i, n_layers)
            {
                ty = GgmlType::Q6K;
            }
        }
    }
    if !row_len.is_multiple_of(ty.block_size() as u64) {
        ty = match ty {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            GgmlType::Q6K => GgmlType::Q8_0,
            other => other,
        };
        if !row_len.is_multiple_of(ty.block_size() as u64) {
            ty = GgmlType::F16;
        }
    }
    ty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            (
                "blk.11.attn_k.bias",
                "model.layers.11.self_attn.k_proj.bias",
            ),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
            ),
            (
                "blk.3.attn_q_norm.weight",
                "model.layers.3.self_attn.q_norm.weight",
            ),
        ] {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(h));
            assert_eq!(gguf_tensor_name(h).as_deref(), Some(g));
        }
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn qk_permutation_inverts_and_matches_llama_cpp() {
        // 2 heads of head_dim 4, rows of length 1: llama.cpp's permute maps
        // rows [0 1 2 3 | 4 5 6 7] to [0 2 1 3 | 4 6 5 7].
        let rows: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let p = permute_qk(&rows, 1, 2);
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(unpermute_qk(&p, 1, 2), rows);
        let wide: Vec<f32> = (0..8 * 3).map(|i| i as f32).collect();
        assert_eq!(unpermute_qk(&permute_qk(&wide, 3, 2), 3, 2), wide);
    }

    #[test]
    fn q4_k_m_mix_follows_llama_cpp() {
        let t = |name: &str, dims: &[u64]| tensor_type(FileType::Q4KM, name, dims, 24, false);
        // Qwen2.5-0.5B: hidden 896 is not a multiple of 256.
        assert_eq!(t("blk.0.attn_q.weight", &[896, 896]), GgmlType::Q5_0);
        assert_eq!(t("blk.0.ffn_down.weight", &[4864, 896]), GgmlType::Q6K);
        assert_eq!(t("blk.4.ffn_down.weight", &[4864, 896]), GgmlType::Q4K);
        assert_eq!(t("blk.5.ffn_down.weight", &[4864, 896]), GgmlType::Q6K);
        assert_eq!(t("blk.5.attn_v.weight", &[896, 128]), GgmlType::Q8_0);
        assert_eq!(t("output.weight", &[896, 151936]), GgmlType::Q8_0);
        assert_eq!(t("blk.0.attn_norm.weight", &[896]), GgmlType::F32);
        assert_eq!(t("blk.0.attn_q.bias", &[896]), GgmlType::F32);
        assert_eq!(t("output.weight", &[1024, 1000]), GgmlType::Q6K);
        assert_eq!(
            tensor_type(FileType::Q8_0, "output.weight", &[1024, 10], 2, false),
            GgmlType::Q8_0
        );
        assert_eq!(
            tensor_type(FileType::Q4_0, "blk.0.attn_q.weight", &[48, 48], 2, false),
            GgmlType::F16
        );
    }
}

//! What a GGUF export of an HF model contains: the metadata, and for every
//! tensor its GGUF name, ggml dims, storage type and how its values are
//! prepared (llama's q/k permutation) — decided before any data is read, so
//! the header can be written first and the data streamed.

use super::codec::{self, CodecError};
use super::hf::{self, FileType, GgufArch};
use super::keys::{general, QUANTIZATION_VERSION};
use super::types::GgmlType;
use super::value::Value;
use super::vocab::{gguf_vocab, HfTokenizerInput};
use crate::model::config::ModelConfig;

/// Where a tensor's values come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An HF checkpoint tensor, by name.
    Checkpoint(String),
    /// Values computed from the config (Llama 3 rope factors).
    Computed(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct ExportTensor {
    pub gguf_name: String,
    pub source: Source,
    /// HF shape (slowest dimension first).
    pub hf_shape: Vec<usize>,
    /// ggml dims (row length first).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Heads of a q/k tensor that llama.cpp stores permuted.
    permute_heads: Option<usize>,
}

impl ExportTensor {
    pub fn n_elements(&self) -> usize {
        self.hf_shape.iter().product()
    }

    /// The order llama.cpp stores this tensor's rows in: row `r` of the GGUF
    /// tensor is HF row `order[r]` (`None`: the same order).
    pub fn row_order(&self) -> Option<Vec<usize>> {
        let heads = self.permute_heads?;
        let rows: Vec<f32> = (0..self.hf_shape[0]).map(|r| r as f32).collect();
        Some(
            hf::permute_qk(&rows, 1, heads)
                .into_iter()
                .map(|r| r as usize)
                .collect(),
        )
    }

    /// Encodes the tensor's f32 values (HF row order) as GGUF data.
    pub fn encode(&self, values: &[f32]) -> Result<Vec<u8>, CodecError> {
        let row_len = self.dims[0] as usize;
        match self.permute_heads {
            Some(heads) => codec::encode(self.ty, &hf::permute_qk(values, row_len, heads), row_len),
            None => codec::encode(self.ty, values, row_len),
        }
    }
}

pub struct ExportPlan {
    pub arch: GgufArch,
    pub kv: Vec<(String, Value)>,
    pub tensors: Vec<ExportTensor>,
}

impl ExportPlan {
    pub fn new(
        config: &ModelConfig,
        tokenizer: &HfTokenizerInput<'_>,
        ftype: FileType,
        model_name: &str,
    ) -> Result<Self, String> {
        let arch = GgufArch::from_config(config)?;
        let tied = config.tie_word_embeddings();
        let mut tensors = Vec::new();
        for (hf_name, shape) in hf::expected_tensors(config) {
            let gguf_name = hf::gguf_tensor_name(&hf_name)
                .ok_or_else(|| format!("no GGUF name for tensor `{hf_name}`"))?;
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            let ty = hf::tensor_type(ftype, &gguf_name, &dims, config.num_hidden_layers, tied);
            let permute_heads = hf::qk_heads(arch, config, &gguf_name);
            tensors.push(ExportTensor {
                gguf_name,
                source: Source::Checkpoint(hf_name),
                hf_shape: shape,
                dims,
                ty,
                permute_heads,
            });
        }
        if let Some(freqs) = hf::llama3_rope_freqs(config)? {
            tensors.insert(
                0,
                ExportTensor {
                    gguf_name: hf::ROPE_FREQS.to_string(),
                    hf_shape: vec![freqs.len()],
                    dims: vec![freqs.len() as u64],
                    ty: GgmlType::F32,
                    source: Source::Computed(freqs),
                    permute_heads: None,
                },
            );
        }
        let quantized = tensors.iter().any(|t| t.ty.is_quantized());
        let mut kv = vec![
            (
                general::ARCHITECTURE.to_string(),
                Value::String(arch.gguf_name().into()),
            ),
            (general::TYPE.to_string(), Value::String("model".into())),
            (
                general::NAME.to_string(),
                Value::String(model_name.to_string()),
            ),
            (
                general::FILE_TYPE.to_string(),
                Value::U32(ftype.llama_ftype()),
            ),
        ];
        if quantized {
            kv.push((
                general::QUANTIZATION_VERSION.to_string(),
                Value::U32(QUANTIZATION_VERSION),
            ));
        }
        kv.extend(hf::gguf_hparams(config, arch)?);
        kv.extend(gguf_vocab(tokenizer)?.kv);
        Ok(Self { arch, kv, tensors })
    }

    /// Looks a key up in the planned metadata.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

//! Quantized checkpoints on disk: which format a `config.json` declares, the
//! tensors a quantized linear becomes, and reading them back (qcoder's own
//! and third-party GPTQ / AWQ checkpoints). Byte layouts: `pack.rs`.

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::pack;
use super::{natural_g_idx, ColumnOrder, QuantSpec, QuantizedLinear};
use crate::model::{Checkpoint, ModelConfig, ModelError};

/// A quantized checkpoint format, from `quantization_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// AutoGPTQ/GPTQModel; `v2` = `checkpoint_format: gptq_v2` (zeros without the −1).
    Gptq {
        bits: u32,
        group_size: Option<usize>,
        v2: bool,
    },
    /// AutoAWQ GEMM.
    Awq {
        bits: u32,
        group_size: Option<usize>,
    },
}

impl QuantFormat {
    /// Reads `config.quantization_config`; `Ok(None)` for a plain checkpoint.
    pub fn from_config(config: &ModelConfig) -> Result<Option<Self>, String> {
        let Some(q) = &config.quantization_config else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        let bits = q
            .get("bits")
            .or_else(|| q.get("w_bit"))
            .and_then(Value::as_u64)
            .ok_or("`quantization_config.bits` is missing")? as u32;
        let group_size = match q
            .get("group_size")
            .or_else(|| q.get("q_group_size"))
            .and_then(Value::as_i64)
        {
            Some(g) if g > 0 => Some(g as usize),
            _ => None,
        };
        match method {
            "gptq" => {
                if ![2, 3, 4, 8].contains(&bits) {
                    return Err(format!(
                        "GPTQ with {bits} bits is not supported (2, 3, 4, 8)"
                    ));
                }
                let format = q
                    .get("checkpoint_format")
                    .and_then(Value::as_str)
                    .unwrap_or("gptq");
                match format {
                    "gptq" | "gptq_v2" => Ok(Some(QuantFormat::Gptq {
                        bits,
                        group_size,
                        v2: format == "gptq_v2",
                    })),
                    other => Err(format!(
                        "GPTQ checkpoint_format \"{other}\" is not supported (gptq, gptq_v2)"
                    )),
                }
            }
            "awq" => {
                let version = q.get("version").and_then(Value::as_str).unwrap_or("gemm");
                if !version.eq_ignore_ascii_case("gemm") {
                    return Err(format!("AWQ version \"{version}\" is not supported (gemm)"));
                }
                if bits != 4 {
                    return Err(format!("AWQ with {bits} bits is not supported (4)"));
                }
                Ok(Some(QuantFormat::Awq { bits, group_size }))
            }
            other => Err(format!(
                "quant_method \"{other}\" is not supported (gptq, awq)"
            )),
        }
    }

    pub fn bits(&self) -> u32 {
        match self {
            QuantFormat::Gptq { bits, .. } | QuantFormat::Awq { bits, .. } => *bits,
        }
    }

    /// The `quantization_config` qcoder writes for `spec`.
    pub fn config_json(spec: &QuantSpec) -> Value {
        let group = spec.group_size.map_or(-1, |g| g as i64);
        let quantizer = format!("qcoder:{}", env!("CARGO_PKG_VERSION"));
        match spec.method {
            super::MethodKind::Awq => json!({
                "quant_method": "awq",
                "bits": spec.bits,
                "group_size": group,
                "zero_point": !spec.sym,
                "version": "gemm",
                "modules_to_not_convert": null,
                "quantizer": quantizer,
            }),
            _ => json!({
                "quant_method": "gptq",
                "bits": spec.bits,
                "group_size": group,
                "desc_act": spec.order == ColumnOrder::DescAct,
                "sym": spec.sym,
                "lm_head": false,
                "checkpoint_format": "gptq",
                "pack_dtype": "int32",
                "damp_percent": spec.damp,
                "true_sequential": true,
                "static_groups": false,
                "meta": { "quantizer": [quantizer], "method": spec.method.name() },
            }),
        }
    }
}

/// The tensors (name suffix, tensor) a quantized linear is stored as.
pub fn pack_linear(q: &QuantizedLinear, format: QuantFormat) -> Vec<(&'static str, Tensor)> {
    let (out_f, in_f) = (q.out_features() as usize, q.in_features() as usize);
    let groups = q.groups() as usize;
    let ints: Vec<u32> = to_u32(&q.q);
    let zeros: Vec<u32> = to_u32(&q.zeros);
    let scales = q
        .scales
        .to_kind(Kind::Half)
        .to_device(Device::Cpu)
        .contiguous();
    let mut out = Vec::new();
    match format {
        QuantFormat::Gptq { bits, v2, .. } => {
            let qweight = pack::gptq_pack_qweight(&ints, out_f, in_f, bits);
            let qzeros =
                pack::gptq_pack_qzeros(&zeros, groups, out_f, bits, if v2 { 0 } else { 1 });
            out.push((
                "qweight",
                int32(
                    &qweight,
                    &[(in_f * bits as usize / 32) as i64, out_f as i64],
                ),
            ));
            out.push((
                "qzeros",
                int32(
                    &qzeros,
                    &[groups as i64, (out_f * bits as usize / 32) as i64],
                ),
            ));
            out.push(("scales", scales));
            out.push((
                "g_idx",
                q.g_idx
                    .to_kind(Kind::Int)
                    .to_device(Device::Cpu)
                    .contiguous(),
            ));
        }
        QuantFormat::Awq { .. } => {
            // AWQ stores W transposed: integers (in, out).
            let q_t = to_u32(&q.q.transpose(0, 1).contiguous());
            out.push((
                "qweight",
                int32(
                    &pack::awq_pack(&q_t, in_f, out_f),
                    &[in_f as i64, (out_f / 8) as i64],
                ),
            ));
            out.push((
                "qzeros",
                int32(
                    &pack::awq_pack(&zeros, groups, out_f),
                    &[groups as i64, (out_f / 8) as i64],
                ),
            ));
            out.push(("scales", scales));
        }
    }
    if let Some(bias) = &q.bias {
        out.push((
            "bias",
            bias.to_kind(Kind::Half).to_device(Device::Cpu).contiguous(),
        ));
    }
    out
}

fn to_u32(t: &Tensor) -> Vec<u32> {
    let v: Vec<i64> = Vec::<i64>::try_from(
        t.to_kind(Kind::Int64)
            .to_device(Device::Cpu)
            .contiguous()
            .view(-1),
    )
    .expect("an int64 CPU tensor converts to a Vec");
    v.into_iter().map(|x| x as u32).collect()
}

fn int32(words: &[i32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(words).view(shape)
}

fn read_i32(ckpt: &Checkpoint, name: &str, shape: &[i64]) -> Result<Vec<i32>, ModelError> {
    let t = ckpt.tensor(name, shape, Kind::Int, Device::Cpu)?;
    Ok(Vec::<i32>::try_from(t.view(-1))?)
}

/// Reads the quantized linear stored under `prefix` (e.g.
/// `model.layers.0.self_attn.q_proj`) with the given shape.
pub fn read_linear(
    ckpt: &Checkpoint,
    prefix: &str,
    format: QuantFormat,
    in_f: usize,
    out_f: usize,
    with_bias: bool,
) -> Result<QuantizedLinear, ModelError> {
    let name = |leaf: &str| format!("{prefix}.{leaf}");
    let bad_shape = |what: &str| ModelError::ShapeMismatch {
        name: name(what),
        path: ckpt.root().to_path_buf(),
        expected: vec![in_f as i64, out_f as i64],
        got: vec![],
    };
    let scales_meta = ckpt
        .meta(&name("scales"))
        .ok_or_else(|| ModelError::MissingTensor {
            name: name("scales"),
            dir: ckpt.root().to_path_buf(),
        })?;
    let groups = *scales_meta
        .shape
        .first()
        .ok_or_else(|| bad_shape("scales"))?;
    if groups == 0 {
        return Err(bad_shape("scales"));
    }
    let scales = ckpt.tensor(
        &name("scales"),
        &[groups as i64, out_f as i64],
        Kind::Float,
        Device::Cpu,
    )?;
    let bias = if with_bias && ckpt.contains(&name("bias")) {
        Some(ckpt.tensor(&name("bias"), &[out_f as i64], Kind::Float, Device::Cpu)?)
    } else {
        None
    };
    let group_size = in_f.div_ceil(groups);
    let (q, zeros, g_idx) = match format {
        QuantFormat::Gptq { bits, v2, .. } => {
            let b = bits as usize;
            if !(in_f * b).is_multiple_of(32) || !(out_f * b).is_multiple_of(32) {
                return Err(bad_shape("qweight"));
            }
            let qweight = read_i32(
                ckpt,
                &name("qweight"),
                &[(in_f * b / 32) as i64, out_f as i64],
            )?;
            let qzeros = read_i32(
                ckpt,
                &name("qzeros"),
                &[groups as i64, (out_f * b / 32) as i64],
            )?;
            let ints = pack::gptq_unpack_qweight(&qweight, out_f, in_f, bits);
            let zeros =
                pack::gptq_unpack_qzeros(&qzeros, groups, out_f, bits, if v2 { 0 } else { 1 });
            let g_idx = if ckpt.contains(&name("g_idx")) {
                let g = ckpt.tensor(&name("g_idx"), &[in_f as i64], Kind::Int64, Device::Cpu)?;
                let (lo, hi) = (g.min().int64_value(&[]), g.max().int64_value(&[]));
                if lo < 0 || hi >= groups as i64 {
                    return Err(ModelError::Config {
                        path: ckpt.root().to_path_buf(),
                        msg: format!("{}: group index {hi} outside 0..{groups}", name("g_idx")),
                    });
                }
                g
            } else {
                natural_g_idx(in_f as i64, group_size as i64, Device::Cpu)
            };
            (
                weight_ints(&ints, out_f, in_f),
                ints_tensor(&zeros, groups, out_f),
                g_idx,
            )
        }
        QuantFormat::Awq { .. } => {
            if !out_f.is_multiple_of(8) {
                return Err(bad_shape("qweight"));
            }
            let qweight = read_i32(ckpt, &name("qweight"), &[in_f as i64, (out_f / 8) as i64])?;
            let qzeros = read_i32(ckpt, &name("qzeros"), &[groups as i64, (out_f / 8) as i64])?;
            let ints_t = pack::awq_unpack(&qweight, in_f, out_f);
            let zeros = pack::awq_unpack(&qzeros, groups, out_f);
            let q = weight_ints(&ints_t, in_f, out_f)
                .transpose(0, 1)
                .contiguous();
            let g_idx = natural_g_idx(in_f as i64, group_size as i64, Device::Cpu);
            (q, ints_tensor(&zeros, groups, out_f), g_idx)
        }
    };
    Ok(QuantizedLinear {
        bits: format.bits(),
        group_size,
        q,
        scales,
        zeros,
        g_idx,
        bias,
    })
}

/// Unpacked weight integers (each below 2^bits ≤ 256) as uint8: int64 took
/// eight times the memory, and widening them was a quarter of the time it
/// took to load a 4-bit 0.5B model (perf).
fn weight_ints(v: &[u32], rows: usize, cols: usize) -> Tensor {
    let v: Vec<u8> = v.iter().map(|&x| x as u8).collect();
    Tensor::from_slice(&v).view([rows as i64, cols as i64])
}

fn ints_tensor(v: &[u32], rows: usize, cols: usize) -> Tensor {
    let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    Tensor::from_slice(&v).view([rows as i64, cols as i64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{rtn::rtn_matrix, MethodKind};

    #[test]
    fn formats_from_configs() {
        let mut cfg: ModelConfig = serde_json::from_value(json!({
            "model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1, "max_position_embeddings": 8,
        }))
        .unwrap();
        assert_eq!(QuantFormat::from_config(&cfg), Ok(None));
        cfg.quantization_config = Some(
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}),
        );
        assert_eq!(
            QuantFormat::from_config(&cfg),
            Ok(Some(QuantFormat::Gptq {
                bits: 4,
                group_size: Some(128),
                v2: true
            }))
        );
        cfg.quantization_config =
            Some(json!({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "GEMV"}));
        assert!(QuantFormat::from_config(&cfg).unwrap_err().contains("GEMV"));
        cfg.quantization_config = Some(json!({"quant_method": "bitsandbytes", "bits": 4}));
        assert!(QuantFormat::from_config(&cfg)
            .unwrap_err()
            .contains("bitsandbytes"));
    }

    #[test]
    fn packed_tensors_have_the_format_shapes() {
        let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu));
        for (bits, method) in [
            (4, MethodKind::Gptq),
            (3, MethodKind::Gptq),
            (4, MethodKind::Awq),
        ] {
            let spec = QuantSpec {
                method,
                bits,
                group_size: Some(32),
                sym: method == MethodKind::Gptq,
                order: ColumnOrder::Natural,
                damp: 0.01,
                mse: false,
            };
            let q = rtn_matrix(&w, &spec);
            let format = if method == MethodKind::Awq {
                QuantFormat::Awq {
                    bits,
                    group_size: Some(32),
                }
            } else {
                QuantFormat::Gptq {
                    bits,
                    group_size: Some(32),
                    v2: false,
                }
            };
            let packed = pack_linear(&q, format);
            let shape = |n: &str| packed.iter().find(|(k, _)| *k == n).unwrap().1.size();
            match format {
                QuantFormat::Gptq { .. } => {
                    assert_eq!(shape("qweight"), vec![128 * bits as i64 / 32, 64]);
                    assert_eq!(shape("qzeros"), vec![4, 64 * bits as i64 / 32]);
                    assert_eq!(shape("g_idx"), vec![128]);
                }
                QuantFormat::Awq { .. } => {
                    assert_eq!(shape("qweight"), vec![128, 8]);
                    assert_eq!(shape("qzeros"), vec![4, 8]);
                }
            }
            assert_eq!(shape("scales"), vec![4, 64]);
        }
    }
}

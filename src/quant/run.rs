//! The layer-by-layer quantization job: embed the calibration samples, then
//! for each decoder layer load it alone, let the method quantize it, write
//! its packed tensors, and run the *quantized* layer to produce the next
//! layer's inputs. Peak memory is about one decoder layer plus the
//! calibration activations (and one output shard being written).

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::checkpoint::{pack_linear, QuantFormat};
use super::{method_for, suggest_group_sizes, LayerCalibration, MethodKind, QuantError, QuantSpec};
use crate::model::decoder::{DecoderLayer, LoadOptions, Positional};
use crate::model::weights::ShardedWriter;
use crate::model::{read_config, Checkpoint, ModelConfig, ModelError};

pub struct Job<'a> {
    pub model_dir: &'a Path,
    /// Directory all outputs go to (created; must not exist).
    pub out_dir: &'a Path,
    pub spec: QuantSpec,
    /// (samples, seq_len) token ids; required by GPTQ and AWQ.
    pub calibration: Option<Tensor>,
    pub device: Device,
    /// Calibration sequences per forward pass.
    pub batch_size: usize,
    pub max_shard_bytes: u64,
    /// AWQ: calibration rows (tokens) kept per linear for the searches.
    pub awq_rows: usize,
}

#[derive(Debug, Clone)]
pub struct LayerReport {
    pub index: usize,
    pub seconds: f64,
    /// ‖L_q(x) − L(x)‖² / ‖L(x) − x‖² on a calibration subset: how much of
    /// the layer's contribution to the residual stream quantization changed.
    pub rel_error: f64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub layers: Vec<LayerReport>,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    pub files: Vec<PathBuf>,
}

/// Checks that `spec` can quantize every linear of `config` in its format.
pub fn validate(config: &ModelConfig, spec: &QuantSpec) -> Result<(), QuantError> {
    let supported = spec.method.supported_bits();
    if !supported.contains(&spec.bits) {
        return Err(QuantError::Bits {
            method: spec.method.name(),
            bits: spec.bits,
            supported: supported
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let hidden = config.hidden_size;
    let attn = config.num_attention_heads * config.head_dim();
    let kv = config.n_kv_heads() * config.head_dim();
    let ffn = config.intermediate_size;
    let shapes = [
        ("self_attn.q_proj", hidden, attn),
        ("self_attn.k_proj", hidden, kv),
        ("self_attn.v_proj", hidden, kv),
        ("self_attn.o_proj", attn, hidden),
        ("mlp.gate_proj", hidden, ffn),
        ("mlp.up_proj", hidden, ffn),
        ("mlp.down_proj", ffn, hidden),
    ];
    for (name, in_f, out_f) in shapes {
        let layer = format!("model.layers.*.{name} ({in_f} inputs)");
        if let Some(g) = spec.group_size {
            if g == 0 || in_f % g != 0 {
                return Err(QuantError::GroupSize {
                    layer,
                    group: g,
                    in_features: in_f,
                    suggest: suggest_group_sizes(in_f, g),
                });
            }
        }
        let packs = match spec.method {
            MethodKind::Awq => out_f % 8 == 0,
            _ => {
                (in_f * spec.bits as usize).is_multiple_of(32)
                    && (out_f * spec.bits as usize).is_multiple_of(32)
            }
        };
        if !packs {
            return Err(QuantError::Bits {
                method: spec.method.name(),
                bits: spec.bits,
                supported: format!(
                    "{name} is {out_f}x{in_f}; the {} format needs both sides to pack into 32-bit words",
                    if spec.method == MethodKind::Awq { "AWQ" } else { "GPTQ" }
                ),
            });
        }
    }
    Ok(())
}

/// Restarts the peak-RSS count at the current RSS (Linux `clear_refs` 5), so
/// a job run after others in the same process (`qcoder run`) reports its own
/// peak. Best effort: without /proc the count simply starts at exec.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process (VmHWM), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QuantError + '_ {
    move |source| {
        QuantError::Model(ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Runs the job; `layers_bar` advances per layer, `step_bar` per linear group.
pub fn run(
    job: &Job<'_>,
    layers_bar: &ProgressBar,
    step_bar: &ProgressBar,
) -> Result<Report, QuantError> {
    let start = Instant::now();
    reset_peak_rss();
    let config = read_config(job.model_dir)?;
    validate(&config, &job.spec)?;
    let ckpt = Checkpoint::open_dir(job.model_dir)?;
    let format = match job.spec.method {
        MethodKind::Awq => QuantFormat::Awq {
            bits: job.spec.bits,
            group_size: job.spec.group_size,
        },
        _ => QuantFormat::Gptq {
            bits: job.spec.bits,
            group_size: job.spec.group_size,
            v2: false,
        },
    };
    let opts = LoadOptions {
        device: job.device,
        kind: Kind::Float,
    };
    let _guard = tch::no_grad_guard();

    let tmp = temp_dir_for(job.out_dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let mut writer = ShardedWriter::new(&tmp, job.max_shard_bytes);

    // Everything outside the decoder layers stays in f16 (the GPTQ and AWQ
    // convention; their kernels run f16 activations).
    let hidden = config.hidden_size as i64;
    let embed = ckpt.tensor(
        "model.embed_tokens.weight",
        &[config.vocab_size as i64, hidden],
        Kind::Float,
        job.device,
    )?;
    writer.add("model.embed_tokens.weight", &embed.to_kind(Kind::Half))?;
    for name in ["model.norm.weight", "lm_head.weight"] {
        if ckpt.contains(name) && !(name == "lm_head.weight" && config.tie_word_embeddings()) {
            let t = ckpt.tensor_any_shape(name, Kind::Half, Device::Cpu)?;
            writer.add(name, &t)?;
        }
    }

    // Layer-0 inputs of every calibration sequence.
    let mut inputs: Vec<Tensor> = Vec::new();
    let seq_len = match &job.calibration {
        Some(samples) => {
            let (n, seq) = samples.size2()?;
            let mut start_row = 0;
            while start_row < n {
                let rows = (job.batch_size as i64).min(n - start_row);
                let ids = samples.narrow(0, start_row, rows).to_device(job.device);
                inputs.push(Tensor::f_embedding(&embed, &ids, -1, false, false)?);
                start_row += rows;
            }
            seq
        }
        None => 1,
    };
    drop(embed);
    let positional = Positional::new(&config, &job.model_dir.join("config.json"), opts)?;
    let ctx = positional.context(1, seq_len, 0);
    let method = method_for(job.spec.method);

    let mut reports = Vec::with_capacity(config.num_hidden_layers);
    layers_bar.set_length(config.num_hidden_layers as u64);
    for i in 0..config.num_hidden_layers {
        let t0 = Instant::now();
        let name = format!("model.layers.{i}");
        layers_bar.set_message(name.clone());
        step_bar.reset();
        let mut layer = DecoderLayer::load(&config, &ckpt, i, opts)?;
        let calib = LayerCalibration {
            inputs: &inputs,
            ctx: &ctx,
            layer_name: name.clone(),
            max_input_rows: job.awq_rows,
            steps: Some(step_bar),
        };
        // Float outputs on one calibration sequence, to measure what
        // quantization changed.
        let probe = inputs.first().map(|x| {
            let x = x.narrow(0, 0, 1);
            let reference = layer.forward(&x, &ctx, None);
            (x, reference)
        });
        let quantized = method.quantize_layer(&mut layer, &calib, &job.spec)?;
        let next = match quantized.outputs {
            Some(outputs) => outputs,
            None if job.calibration.is_some() => calib.outputs(&layer),
            None => Vec::new(),
        };
        let rel_error = probe
            .map(|(x, reference)| {
                let out = match next.first() {
                    Some(y) => y.narrow(0, 0, 1),
                    None => layer.forward(&x, &ctx, None),
                };
                let num = (&out - &reference)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[]);
                let den = (&reference - &x)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[]);
                if den > 0.0 {
                    num / den
                } else {
                    0.0
                }
            })
            .unwrap_or(f64::NAN);
        for (linear, q) in &quantized.linears {
            for (suffix, t) in pack_linear(q, format) {
                writer.add(format!("{name}.{linear}.{suffix}"), &t)?;
            }
        }
        let norms = [
            (
                "input_layernorm.weight",
                Some(&layer.input_layernorm.weight),
            ),
            (
                "post_attention_layernorm.weight",
                Some(&layer.post_attention_layernorm.weight),
            ),
            (
                "self_attn.q_norm.weight",
                layer.self_attn.q_norm.as_ref().map(|n| &n.weight),
            ),
            (
                "self_attn.k_norm.weight",
                layer.self_attn.k_norm.as_ref().map(|n| &n.weight),
            ),
        ];
        for (leaf, weight) in norms {
            if let Some(w) = weight {
                writer.add(format!("{name}.{leaf}"), &w.to_kind(Kind::Half))?;
            }
        }
        drop(calib);
        if job.calibration.is_some() {
            inputs = next;
        }
        let seconds = t0.elapsed().as_secs_f64();
        if layers_bar.is_hidden() {
            // No terminal (a batch job's log): one line per layer instead of a bar.
            eprintln!(
                "{} {}/{}: {seconds:.1} s, rel. output error {rel_error:.3e}",
                name,
                i + 1,
                config.num_hidden_layers
            );
        }
        reports.push(LayerReport {
            index: i,
            seconds,
            rel_error,
        });
        layers_bar.inc(1);
    }
    step_bar.finish_and_clear();
    let mut files = writer.finish()?;
    files.extend(write_metadata(job, &tmp)?);

    if job.out_dir.exists() {
        std::fs::remove_dir_all(job.out_dir).map_err(io_err(job.out_dir))?;
    }
    std::fs::rename(&tmp, job.out_dir).map_err(io_err(job.out_dir))?;
    let files = files
        .into_iter()
        .filter_map(|f| f.file_name().map(|n| job.out_dir.join(n)))
        .collect();
    Ok(Report {
        layers: reports,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        files,
    })
}

/// `OUT.tmp-qcoder` beside the output: renamed to `OUT` when complete.
pub fn temp_dir_for(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!(".{name}.tmp-qcoder"))
}

/// config.json with `quantization_config`, quantize_config.json (GPTQ), and
/// every tokenizer / generation file of the source directory.
fn write_metadata(job: &Job<'_>, dir: &Path) -> Result<Vec<PathBuf>, QuantError> {
    let src = job.model_dir.join("config.json");
    let text = std::fs::read_to_string(&src).map_err(io_err(&src))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| {
        QuantError::Model(ModelError::Config {
            path: src.clone(),
            msg: e.to_string(),
        })
    })?;
    let qconfig = QuantFormat::config_json(&job.spec);
    if let Some(obj) = config.as_object_mut() {
        obj.insert("quantization_config".into(), qconfig.clone());
        let dtype_key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(dtype_key.into(), Value::String("float16".into()));
    }
    let mut written = Vec::new();
    let mut write_json = |name: &str, value: &Value| -> Result<(), QuantError> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text + "\n").map_err(io_err(&path))?;
        written.push(path);
        Ok(())
    };
    write_json("config.json", &config)?;
    if job.spec.method != MethodKind::Awq {
        write_json("quantize_config.json", &qconfig)?;
    }
    let skip = |name: &str| {
        name == "config.json"
            || name == "quantize_config.json"
            || name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
            || name.ends_with(".bin")
            || name.ends_with(".pt")
            || name.ends_with(".gguf")
            || name.starts_with('.')
    };
    let entries = std::fs::read_dir(job.model_dir).map_err(io_err(job.model_dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && !skip(&name) {
            let target = dir.join(&name);
            std::fs::copy(entry.path(), &target).map_err(io_err(&target))?;
            written.push(target);
        }
    }
    Ok(written)
}

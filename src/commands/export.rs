//! `qcoder export`: a model directory as one GGUF file, or as an HF
//! directory of sharded safetensors.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result};
use safetensors::Dtype;
use serde_json::Value as Json;

use super::staging::{progress, write_json, Staged};
use super::Outcome;
use crate::cli::{ExportArgs, ExportFormat};
use crate::gguf::export::{ExportPlan, ExportTensor, Source};
use crate::gguf::hf::FileType;
use crate::gguf::repack::{self, IntMatrix};
use crate::gguf::vocab::HfTokenizerInput;
use crate::gguf::writer::GgufWriter;
use crate::gguf::GgmlType;
use crate::model::save::{self, bytes_to_f32, f32_to_bytes, SafetensorsWriter, TensorSpec};
use crate::model::{self, Checkpoint};
use crate::quant::checkpoint::{read_linear, QuantFormat};
use crate::quant::QuantizedLinear;
use tch::{Kind, Tensor};

pub fn run(args: ExportArgs) -> Result<Outcome> {
    // With --adapter, the adapter is merged into the base first, into a
    // temporary directory beside the output that is removed afterwards.
    let merged = match &args.adapter {
        Some(adapter) => {
            let parent = match args.output.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            let tmp = tempfile::Builder::new()
                .prefix(".qcoder-merge-")
                .tempdir_in(&parent)
                .with_context(|| {
                    format!("creating a temporary directory in {}", parent.display())
                })?;
            let summary = crate::lora::merge(&args.model, adapter, tmp.path(), u64::MAX)
                .with_context(|| {
                    format!(
                        "merging the adapter {} into {}",
                        adapter.display(),
                        args.model.display()
                    )
                })?;
            eprintln!(
                "merged {} LoRA modules of {} before exporting",
                summary.merged_modules,
                adapter.display()
            );
            Some(tmp)
        }
        None => None,
    };
    let model = merged
        .as_ref()
        .map_or_else(|| args.model.clone(), |t| t.path().to_path_buf());
    match args.format {
        ExportFormat::Gguf => export_gguf(&args, &model),
        ExportFormat::Safetensors => export_safetensors(&args, &model),
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A checkpoint tensor as f32 values, checking its shape.
fn load_f32(ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let (meta, bytes) = ckpt.raw(name)?;
    anyhow::ensure!(
        meta.shape == shape,
        "tensor `{name}` in {} has shape {:?}, but config.json implies {shape:?}",
        meta.file.display(),
        meta.shape
    );
    bytes_to_f32(bytes, meta.dtype).with_context(|| {
        format!(
            "tensor `{name}` in {} is {:?}; only F32, BF16 and F16 weights can be exported",
            meta.file.display(),
            meta.dtype
        )
    })
}

/// A GPTQ/AWQ linear as the GGUF blocks of `t`, with its integers unchanged,
/// or why its geometry does not allow that.
fn repack(q: &QuantizedLinear, t: &ExportTensor) -> std::result::Result<Vec<u8>, String> {
    if q.bits != 4 {
        return Err(format!("{} bits (llama.cpp's 4-bit blocks need 4)", q.bits));
    }
    if q.group_size != repack::BLOCK {
        return Err(format!(
            "group size {} (Q4_0/Q4_1 blocks hold {} consecutive weights; quantize with --group-size 32)",
            q.group_size,
            repack::BLOCK
        ));
    }
    if !q.has_trivial_g_idx() {
        return Err(
            "act-order groups are not consecutive columns (quantize without --act-order)".into(),
        );
    }
    if !matches!(t.ty, GgmlType::Q4_0 | GgmlType::Q4_1) {
        return Err(format!(
            "--type stores this tensor as {} (use q4_0 or q4_1)",
            t.ty
        ));
    }
    let to_u8 = |x: &Tensor| -> std::result::Result<Vec<u8>, String> {
        Vec::<u8>::try_from(&x.to_kind(Kind::Uint8).contiguous().view(-1))
            .map_err(|e| e.to_string())
    };
    let ints = to_u8(&q.q)?;
    // (groups, out) → (out, groups)
    let scales = Vec::<f32>::try_from(&q.scales.transpose(0, 1).contiguous().view(-1))
        .map_err(|e| e.to_string())?;
    let zeros = to_u8(&q.zeros.transpose(0, 1))?;
    let (rows, cols) = (q.out_features() as usize, q.in_features() as usize);
    let m = IntMatrix {
        rows,
        cols,
        ints: &ints,
        scales: &scales,
        zeros: &zeros,
    };
    let result = match t.row_order() {
        Some(order) => {
            let (ints, scales, zeros) = m.reordered(&order);
            IntMatrix {
                rows,
                cols,
                ints: &ints,
                scales: &scales,
                zeros: &zeros,
            }
            .to_blocks(t.ty)
        }
        None => m.to_blocks(t.ty),
    };
    result.map_err(|e| e.to_string())
}

fn export_gguf(args: &ExportArgs, dir: &Path) -> Result<Outcome> {
    let ftype = FileType::parse(&args.gguf_type).with_context(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|(_, n)| *n).collect();
        format!(
            "--type {}: expected one of {}",
            args.gguf_type,
            names.join(", ")
        )
    })?;
    let config = model::read_config(dir)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let tokenizer_json = read_json(&dir.join("tokenizer.json"))?;
    let tokenizer_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let mut eos_ids = model::generation_eos_ids(dir)?;
    for id in config.eos_token_ids() {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    let generation = read_json_opt(&dir.join("generation_config.json"))?;
    let gen_id = |key: &str| {
        generation
            .as_ref()
            .and_then(|g| g.get(key))
            .and_then(Json::as_u64)
            .map(|v| v as u32)
    };
    let cfg_id = |ids: &Option<crate::model::config::TokenIds>| {
        ids.as_ref().and_then(|t| t.to_vec().first().copied())
    };
    let input = HfTokenizerInput {
        tokenizer_json: &tokenizer_json,
        tokenizer_config: tokenizer_config.as_ref(),
        vocab_size: config.vocab_size,
        eos_ids: &eos_ids,
        bos_id: cfg_id(&config.bos_token_id).or_else(|| gen_id("bos_token_id")),
        pad_id: cfg_id(&config.pad_token_id).or_else(|| gen_id("pad_token_id")),
    };
    let name = args
        .model
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "model".into());
    let plan = ExportPlan::new(&config, &input, ftype, &name)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("planning the GGUF export of {}", dir.display()))?;

    let staged = Staged::file(&args.output)?;
    let file = File::create(staged.path())
        .with_context(|| format!("creating {}", staged.path().display()))?;
    let mut writer = GgufWriter::new(BufWriter::with_capacity(1 << 20, file));
    for (key, value) in &plan.kv {
        writer.add_kv(key, value.clone())?;
    }
    for t in &plan.tensors {
        writer.add_tensor(&t.gguf_name, &t.dims, t.ty)?;
    }
    writer.write_header()?;
    let quant = QuantFormat::from_config(&config)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading quantization_config in {}", dir.display()))?;
    let total: u64 = plan.tensors.iter().map(|t| 4 * t.n_elements() as u64).sum();
    let bar = progress(total, &format!("export {}", ftype.name()));
    let mut repacked = 0usize;
    let mut rerounded: Vec<(String, String)> = Vec::new();
    for t in &plan.tensors {
        let quantized = match (&t.source, quant) {
            (Source::Checkpoint(hf_name), Some(format)) if !ckpt.contains(hf_name) => hf_name
                .strip_suffix(".weight")
                .filter(|prefix| ckpt.contains(&format!("{prefix}.scales")))
                .map(|prefix| (prefix, format)),
            _ => None,
        };
        let bytes = if let Some((prefix, format)) = quantized {
            let (out_f, in_f) = (t.hf_shape[0], t.hf_shape[1]);
            let q = read_linear(&ckpt, prefix, format, in_f, out_f, false)
                .with_context(|| format!("reading the quantized linear {prefix}"))?;
            match repack(&q, t) {
                Ok(bytes) => {
                    repacked += 1;
                    bytes
                }
                Err(reason) => {
                    rerounded.push((prefix.to_string(), reason));
                    let w = q.dequantize().contiguous().view(-1);
                    let values = Vec::<f32>::try_from(&w)?;
                    t.encode(&values)
                        .with_context(|| format!("encoding `{}` as {}", t.gguf_name, t.ty))?
                }
            }
        } else {
            let values = match &t.source {
                Source::Checkpoint(hf_name) => load_f32(&ckpt, hf_name, &t.hf_shape)?,
                Source::Computed(v) => v.clone(),
            };
            t.encode(&values)
                .with_context(|| format!("encoding `{}` as {}", t.gguf_name, t.ty))?
        };
        writer.write_tensor(&t.gguf_name, &bytes)?;
        bar.inc(4 * t.n_elements() as u64);
    }
    let out = writer.finish()?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .context("flushing the GGUF file")?;
    file.sync_all().context("syncing the GGUF file")?;
    drop(file);
    bar.finish_and_clear();
    staged.commit()?;
    if quant.is_some() {
        eprintln!(
            "{repacked} quantized linears repacked into llama.cpp blocks with their integers unchanged"
        );
        if let Some((first, reason)) = rerounded.first() {
            eprintln!(
                "{} quantized linears dequantized and rounded again (e.g. {first}: {reason})",
                rerounded.len()
            );
        }
    }
    eprintln!(
        "exported {} as {} ({} tensors) to {}",
        args.model.display(),
        ftype.name(),
        plan.tensors.len(),
        args.output.display()
    );
    Ok(Outcome::Success)
}

/// Tokenizer and generation files copied verbatim into a safetensors export.
const COPIED_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

fn export_safetensors(args: &ExportArgs, dir: &Path) -> Result<Outcome> {
    let (dtype, dtype_name) = match args.dtype.as_str() {
        "bf16" => (Dtype::BF16, "bfloat16"),
        "f16" => (Dtype::F16, "float16"),
        "f32" => (Dtype::F32, "float32"),
        other => anyhow::bail!("--dtype {other}: expected bf16, f16 or f32"),
    };
    let max_shard = crate::data::parse_size(&args.max_shard_size)
        .map_err(anyhow::Error::msg)
        .context("--max-shard-size")?;
    anyhow::ensure!(max_shard > 0, "--max-shard-size must be more than 0 bytes");
    // Validates the directory is a model qcoder understands.
    model::read_config(dir)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let is_float = |d: Dtype| matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16);
    let specs: Vec<TensorSpec> = ckpt
        .tensors()
        .map(|t| TensorSpec {
            name: t.name.to_string(),
            dtype: if is_float(t.dtype) { dtype } else { t.dtype },
            shape: t.shape.to_vec(),
        })
        .collect();
    let shards = save::plan_shards(&specs, max_shard);

    let staged = Staged::dir(&args.output)?;
    let out = staged.path();
    let mut config_json = read_json(&dir.join("config.json"))?;
    if let Some(obj) = config_json.as_object_mut() {
        // transformers >= 5 reads `dtype`, older versions `torch_dtype`.
        obj.insert("torch_dtype".into(), Json::from(dtype_name));
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), Json::from(dtype_name));
        }
    }
    write_json(out, "config.json", &config_json)?;
    for name in COPIED_FILES {
        let src = dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let total: u64 = specs.iter().map(|s| s.n_bytes() as u64).sum();
    let bar = progress(total, "export safetensors");
    for (k, shard) in shards.iter().enumerate() {
        let path = out.join(save::shard_file_name(k, shards.len()));
        let shard_specs: Vec<TensorSpec> = shard.iter().map(|&i| specs[i].clone()).collect();
        let mut writer = SafetensorsWriter::create(&path, shard_specs.clone())?;
        for spec in &shard_specs {
            let (meta, bytes) = ckpt.raw(&spec.name)?;
            let converted = if is_float(meta.dtype) && meta.dtype != dtype {
                let values = bytes_to_f32(bytes, meta.dtype).context("converting dtype")?;
                f32_to_bytes(&values, dtype)
            } else {
                bytes.to_vec()
            };
            writer.write(&spec.name, &converted)?;
            bar.inc(converted.len() as u64);
        }
        writer.finish()?;
    }
    if shards.len() > 1 {
        write_json(
            out,
            model::weights::INDEX_FILE,
            &save::shard_index(&specs, &shards),
        )?;
    }
    bar.finish_and_clear();
    staged.commit()?;
    eprintln!(
        "exported {} ({} tensors, {} {}) to {}",
        dir.display(),
        specs.len(),
        shards.len(),
        if shards.len() == 1 { "file" } else { "shards" },
        args.output.display()
    );
    Ok(Outcome::Success)
}

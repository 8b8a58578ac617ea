//! `qcoder inspect PATH`: what is in a model directory or safetensors file,
//! or in an ingest output directory or Parquet file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::{ingest, Outcome};
use crate::cli::InspectArgs;
use crate::data::stats::STATS_FILE;
use crate::model::weights::dtype_name;
use crate::model::{self, hub, Checkpoint};

pub fn run(args: InspectArgs) -> Result<Outcome> {
    let path = args.path.as_path();
    let path = if path.exists() {
        path.to_path_buf()
    } else {
        hub::resolve_model_dir(&path.to_string_lossy())?
    };
    let mut out = std::io::stdout().lock();
    let is_parquet = path.extension().is_some_and(|e| e == "parquet");
    let result = if path.is_dir() && path.join(STATS_FILE).is_file() {
        ingest::inspect_dir(&path, &mut out)
    } else if path.is_file() && is_parquet {
        ingest::inspect_parquet(&path, &mut out)
    } else if path.is_dir() {
        inspect_model_dir(&path, &mut out)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        inspect_gguf(&path, &mut out)
    } else {
        inspect_safetensors(&path, &mut out)
    };
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(Outcome::Success),
        other => other.map(|_| Outcome::Success),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

fn inspect_model_dir(dir: &Path, out: &mut impl Write) -> Result<()> {
    let config = model::read_config(dir)?;
    let arch = config
        .architectures
        .as_ref()
        .and_then(|a| a.first().cloned())
        .unwrap_or_else(|| "?".into());
    writeln!(out, "model        {}", dir.display())?;
    writeln!(
        out,
        "architecture {arch} (model_type {})",
        config.model_type
    )?;
    writeln!(
        out,
        "shape        {} layers, hidden {}, ffn {}, heads {} (kv {}), head_dim {}, vocab {}",
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.n_kv_heads(),
        config.head_dim(),
        config.vocab_size
    )?;
    let rope = config
        .rope()
        .map(|r| format!("theta {}, scaling {:?}", r.theta, r.scaling))
        .unwrap_or_else(|e| format!("invalid: {e}"));
    writeln!(
        out,
        "context      {} tokens; rope {rope}",
        config.max_position_embeddings
    )?;
    writeln!(
        out,
        "embeddings   {}",
        if config.tie_word_embeddings() {
            "tied"
        } else {
            "separate lm_head"
        }
    )?;
    if let Some(q) = &config.quantization_config {
        writeln!(out, "quantization {q}")?;
    }
    let ckpt = Checkpoint::open_dir(dir)?;
    tensor_table(&ckpt, out)
}

fn inspect_safetensors(path: &Path, out: &mut impl Write) -> Result<()> {
    let ckpt = Checkpoint::open(path).with_context(|| format!("reading {}", path.display()))?;
    writeln!(out, "file         {}", path.display())?;
    tensor_table(&ckpt, out)
}

/// GGUF: version, metadata (long arrays summarised) and the tensor table.
fn inspect_gguf(path: &Path, out: &mut impl Write) -> Result<()> {
    let file = crate::gguf::GgufFile::open(path)?;
    let h = &file.header;
    writeln!(
        out,
        "file         {} ({})",
        path.display(),
        human_bytes(file.file_len())
    )?;
    writeln!(
        out,
        "gguf         version {}, alignment {}, {} metadata keys, {} tensors",
        h.version,
        h.alignment,
        h.metadata.len(),
        h.tensors.len()
    )?;
    writeln!(out)?;
    let key_width = h
        .metadata
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(3)
        .max(3);
    for (key, value) in &h.metadata {
        let mut text = value.to_string();
        if text.len() > 160 {
            let cut = (0..=157)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            text = format!("{}... ({} bytes)", &text[..cut], text.len());
        }
        writeln!(out, "{key:<key_width$}  {:<14} {text}", value.type_name())?;
    }
    writeln!(out)?;
    let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut total = 0u64;
    for t in &h.tensors {
        let e = by_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        total += t.n_elements();
    }
    let types: Vec<String> = by_type
        .iter()
        .map(|(ty, (n, elems))| format!("{ty} {n} ({})", human_count(*elems)))
        .collect();
    writeln!(
        out,
        "parameters   {} in {} tensors: {}",
        human_count(total),
        h.tensors.len(),
        types.join(", ")
    )?;
    writeln!(out)?;
    let width = h
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    writeln!(
        out,
        "{:<width$}  {:<6}  {:<22}  {:>10}  offset",
        "tensor", "type", "dims (ggml order)", "bytes"
    )?;
    for t in &h.tensors {
        writeln!(
            out,
            "{:<width$}  {:<6}  {:<22}  {:>10}  {}",
            t.name,
            t.ty.name(),
            format!("{:?}", t.dims),
            t.n_bytes(),
            h.data_offset + t.offset
        )?;
    }
    Ok(())
}

fn tensor_table(ckpt: &Checkpoint, out: &mut impl Write) -> Result<()> {
    let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0u64;
    for t in ckpt.tensors() {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        total += n;
        *by_dtype.entry(dtype_name(t.dtype)).or_default() += n;
    }
    let files: Vec<String> = ckpt
        .files()
        .map(|f| {
            let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            format!(
                "{} ({})",
                f.file_name().unwrap_or_default().to_string_lossy(),
                human_bytes(size)
            )
        })
        .collect();
    writeln!(out, "files        {}", files.join(", "))?;
    let dtypes: Vec<String> = by_dtype
        .iter()
        .map(|(d, n)| format!("{d} {}", human_count(*n)))
        .collect();
    writeln!(
        out,
        "parameters   {} in {} tensors ({})",
        human_count(total),
        ckpt.len(),
        dtypes.join(", ")
    )?;
    writeln!(out)?;
    let width = ckpt
        .tensors()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    writeln!(out, "{:<width$}  {:<5}  shape", "tensor", "dtype")?;
    for t in ckpt.tensors() {
        writeln!(
            out,
            "{:<width$}  {:<5}  {:?}",
            t.name,
            dtype_name(t.dtype),
            t.shape
        )?;
    }
    Ok(())
}

pub fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

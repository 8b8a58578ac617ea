//! `qcoder import FILE.gguf -o DIR`: a GGUF model as an HF directory.

use anyhow::{Context, Result};
use safetensors::Dtype;

use super::staging::{progress, write_json, Staged};
use super::Outcome;
use crate::cli::ImportArgs;
use crate::gguf::hf::HfView;
use crate::gguf::vocab::{generation_config, HfTokenizer};
use crate::gguf::GgufFile;
use crate::model::save::{f32_to_bytes, SafetensorsWriter, TensorSpec};
use crate::model::weights::SINGLE_FILE;

pub fn run(args: ImportArgs) -> Result<Outcome> {
    let dtype = match args.dtype.as_str() {
        "f32" => Dtype::F32,
        "bf16" => Dtype::BF16,
        "f16" => Dtype::F16,
        other => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let file = GgufFile::open(&args.file)?;
    let view = HfView::new(&file)?;
    let tokenizer = HfTokenizer::from_gguf(&file, view.config.max_position_embeddings)?;

    let mut config = view.config.clone();
    config.torch_dtype = Some(
        match dtype {
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            _ => "float32",
        }
        .into(),
    );
    if config.bos_token_id.is_none() {
        config.bos_token_id = tokenizer.bos.map(crate::model::config::TokenIds::One);
    }

    let staged = Staged::dir(&args.output)?;
    let dir = staged.path();
    write_json(
        dir,
        "config.json",
        &serde_json::to_value(&config).context("serialising config.json")?,
    )?;
    write_json(
        dir,
        "generation_config.json",
        &generation_config(tokenizer.bos, &tokenizer.eos, tokenizer.pad),
    )?;
    write_json(dir, "tokenizer.json", &tokenizer.tokenizer_json)?;
    write_json(dir, "tokenizer_config.json", &tokenizer.tokenizer_config)?;

    let specs: Vec<TensorSpec> = view
        .tensors
        .iter()
        .map(|(_, name, shape)| TensorSpec {
            name: name.clone(),
            dtype,
            shape: shape.clone(),
        })
        .collect();
    let total: u64 = specs.iter().map(|s| s.n_bytes() as u64).sum();
    let weights = dir.join(SINGLE_FILE);
    let mut writer = SafetensorsWriter::create(&weights, specs)?;
    let bar = progress(total, "import");
    for (k, (_, name, _)) in view.tensors.iter().enumerate() {
        let values = view.tensor_f32(&file, k)?;
        let bytes = f32_to_bytes(&values, dtype);
        writer.write(name, &bytes)?;
        bar.inc(bytes.len() as u64);
    }
    writer.finish()?;
    bar.finish_and_clear();
    staged.commit()?;
    eprintln!(
        "imported {} ({}, {} layers, {} tensors) into {}",
        args.file.display(),
        view.arch.gguf_name(),
        view.config.num_hidden_layers,
        view.tensors.len(),
        args.output.display()
    );
    Ok(Outcome::Success)
}

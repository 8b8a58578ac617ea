//! Helper for `scripts/interop/llama-cpp-judge`: qcoder's next-token argmax at
//! every position of a token sequence (teacher forcing), f32 on CPU.
//!
//!   cargo run --release --example gguf_interop -- MODEL_DIR IDS.json
//! IDS.json holds a JSON array of token ids; prints {"argmax": [...]}.

use std::path::PathBuf;

use anyhow::{Context, Result};
use qcoder::model::{self, LoadOptions};
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: gguf_interop MODEL_DIR IDS.json");
    let dir = PathBuf::from(&args[1]);
    let ids: Vec<i64> = serde_json::from_str(
        &std::fs::read_to_string(&args[2]).with_context(|| format!("reading {}", args[2]))?,
    )
    .context("IDS.json must be a JSON array of integers")?;
    let _guard = tch::no_grad_guard();
    let m = model::load_dir(
        &dir,
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        },
    )?;
    let logits = m
        .forward(&Tensor::from_slice(&ids).unsqueeze(0), None)?
        .get(0);
    let argmax: Vec<i64> = Vec::<i64>::try_from(logits.argmax(-1, false))?;
    println!("{}", serde_json::json!({ "argmax": argmax }));
    Ok(())
}

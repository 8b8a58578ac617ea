//! Command-line interface. Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// qcoder: tune an open code LLM on your team's code, quantize it, evaluate
/// it and export it for llama.cpp, transformers and vLLM.
#[derive(Debug, Parser)]
#[command(name = "qcoder", version, about, long_about = None, max_term_width = 100)]
pub struct Cli {
    /// CPU threads for libtorch (default: libtorch's choice, one per core).
    #[arg(long, global = true, env = "QCODER_THREADS")]
    pub threads: Option<i32>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Complete a prompt, or fill in the middle between a prefix and a suffix.
    Generate(GenerateArgs),
    /// Describe a model directory, a .safetensors file or a .gguf file:
    /// architecture, parameter count, dtypes (GGUF: metadata) and the tensor table.
    Inspect(InspectArgs),
    // --- GGUF and export (issue 3) ---
    /// Convert a GGUF file (architectures qwen2, qwen3, llama) into a Hugging
    /// Face model directory that qcoder, transformers and vLLM load.
    Import(ImportArgs),
    /// Write a model directory as GGUF (llama.cpp, Ollama, LM Studio) or as a
    /// sharded safetensors directory (transformers, vLLM).
    Export(ExportArgs),
}

/// Where a model comes from and how it is run.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory (HF layout: config.json, *.safetensors, tokenizer.json)
    /// or hub id `org/name[@revision]`, resolved through the Hugging Face cache
    /// (HF_HOME, HF_HUB_OFFLINE).
    #[arg(long, short = 'm')]
    pub model: String,

    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute dtype: f32, bf16 or f16 (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Text to continue.
    #[arg(long, short = 'p', required_unless_present = "fim_prefix", conflicts_with_all = ["fim_prefix", "fim_suffix"])]
    pub prompt: Option<String>,

    /// Code before the cursor: generate the middle between this and --fim-suffix.
    #[arg(long)]
    pub fim_prefix: Option<String>,

    /// Code after the cursor (with --fim-prefix).
    #[arg(long, requires = "fim_prefix")]
    pub fim_suffix: Option<String>,

    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,

    /// Keep only the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Print one JSON object: token ids, text, stop reason, prefill and decode speed.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A model directory, a hub id, a .safetensors file or a .gguf file.
    pub path: PathBuf,
}

// --- GGUF and export (issue 3) ---

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The GGUF file to convert.
    pub file: PathBuf,

    /// Output directory (created; must not exist or be empty).
    #[arg(long, short = 'o')]
    pub output: PathBuf,

    /// Weight dtype of model.safetensors: f32 (exact: quantized weights are
    /// stored as decoded), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Output formats of `qcoder export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One .gguf file for llama.cpp and the tools built on it.
    Gguf,
    /// An HF directory with sharded safetensors.
    Safetensors,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model directory (HF layout) to export.
    #[arg(long, short = 'm')]
    pub model: PathBuf,

    /// gguf or safetensors.
    #[arg(long, value_enum)]
    pub format: ExportFormat,

    /// GGUF tensor type: f16, bf16, q8_0, q4_0, q4_1 or q4_k_m (llama.cpp's
    /// mix: Q4_K with Q6_K for output and parts of attn_v/ffn_down).
    #[arg(long = "type", default_value = "f16")]
    pub gguf_type: String,

    /// Safetensors dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,

    /// Largest safetensors shard (e.g. 5GB, 500MB, 2GiB).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,

    /// Output: the .gguf file, or the directory for safetensors.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

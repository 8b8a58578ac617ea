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
    /// Quantize the linear layers to 2-8 bits with GPTQ, AWQ or RTN,
    /// calibrated on your own code, into a checkpoint that transformers,
    /// GPTQModel and vLLM load.
    Quantize(QuantizeArgs),
    /// Evaluate one or more models side by side (perplexity, fill-in-the-middle,
    /// HumanEval in a sandbox, completion latency), write report.json,
    /// report.md and SVG figures, and exit 1 when a --gate fails.
    Eval(EvalArgs),
    /// Turn code directories, git repositories and code datasets into clean,
    /// deduplicated, secret-free Parquet shards for fine-tuning.
    ///
    /// Writes OUT_DIR/train-NNNNN-of-NNNNN.parquet, eval-*.parquet and
    /// stats.json (counts by drop reason, secret kind, language and split).
    /// --threads sets the worker threads (default: one per core).
    Ingest(IngestArgs),
    // --- GGUF and export (issue 3) ---
    /// Convert a GGUF file (architectures qwen2, qwen3, llama) into a Hugging
    /// Face model directory that qcoder, transformers and vLLM load.
    Import(ImportArgs),
    /// Write a model directory as GGUF (llama.cpp, Ollama, LM Studio) or as a
    /// sharded safetensors directory (transformers, vLLM).
    Export(ExportArgs),
    // --- LoRA fine-tuning (issue 5) ---
    /// LoRA fine-tune a model on your code, as a recipe.toml describes
    /// (recipes/README.md documents every field).
    ///
    /// Writes OUT/adapter (PEFT layout), OUT/metrics.jsonl, OUT/loss.svg,
    /// checkpoints in OUT/checkpoints/step-N and, with `merge = true`,
    /// OUT/merged.
    Finetune(FinetuneArgs),
    /// Fold a LoRA adapter (PEFT layout) into its base model and write the
    /// result as a model directory.
    Merge(MergeArgs),
    /// Run a pipeline file: import → ingest → finetune → quantize → eval →
    /// export as one batch job. Each stage is skipped when the content hash
    /// of its inputs matches its last finished run, so a killed job resumes
    /// where it stopped.
    Run(RunArgs),
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

    /// Generate --max-new-tokens tokens whatever they are, past end tokens
    /// (for speed measurements).
    #[arg(long)]
    pub ignore_eos: bool,

    #[command(flatten)]
    pub quantized: QuantizedRunArgs,
}

/// How a quantized checkpoint (GPTQ, AWQ) is run.
#[derive(Debug, Args, Clone, Default)]
pub struct QuantizedRunArgs {
    /// Quantized checkpoints: run dequantized dense weights instead of the
    /// int4 kernels.
    #[arg(long)]
    pub dequantize: bool,

    /// Quantized checkpoints: run the layers the int4/int8 kernels cannot
    /// (e.g. 3-bit, or group sizes the kernels lack) dequantized in f32
    /// instead of stopping with an error.
    #[arg(long)]
    pub allow_dequant: bool,

    /// Output head on the fast path: keep, int8 or int4 (default: int8 for
    /// quantized checkpoints, keep otherwise).
    #[arg(long, value_enum)]
    pub head: Option<crate::infer::quantized::HeadQuant>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A model directory, a hub id, a .safetensors or .gguf file, an ingest
    /// output directory or a .parquet file.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColumnOrderArg {
    /// Columns as stored.
    Natural,
    /// All columns by decreasing activation (desc_act); writes a g_idx, which
    /// the fast 4-bit kernels do not take.
    ActOrder,
    /// Each group's own columns by decreasing activation, groups by their most
    /// active column (GAR, GPTQModel's default); g_idx stays trivial.
    GroupAware,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantMethodArg {
    /// GPTQ (Frantar et al.): second-order error compensation.
    Gptq,
    /// AWQ (Lin et al.): activation-aware scaling and clipping.
    Awq,
    /// Round to nearest, no calibration.
    Rtn,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Model directory or hub id (an unquantized checkpoint).
    #[arg(long, short = 'm')]
    pub model: String,

    /// Output directory (written under a temporary name, renamed when complete).
    #[arg(long, short = 'o')]
    pub output: PathBuf,

    /// Bits per weight: 2, 3, 4 or 8 (GPTQ, RTN); 4 (AWQ).
    #[arg(long, default_value_t = 4)]
    pub bits: u32,

    #[arg(long, value_enum, default_value = "gptq")]
    pub method: QuantMethodArg,

    /// Input columns per scale group; -1 = one group per output row.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub group_size: i64,

    /// Symmetric grid (zero point in the middle). Default for GPTQ and RTN.
    #[arg(long, conflicts_with = "asym")]
    pub sym: bool,

    /// Asymmetric grid (fitted zero point). Default for AWQ.
    #[arg(long)]
    pub asym: bool,

    /// GPTQ: the order the input columns are quantized in.
    #[arg(long, value_enum, default_value = "natural")]
    pub order: ColumnOrderArg,

    /// GPTQ: short for --order act-order (desc_act; writes g_idx).
    #[arg(long)]
    pub act_order: bool,

    /// GPTQ and RTN: fit each group's range by least squared rounding error
    /// over 80 shrunk ranges instead of min/max (clips outliers; GPTQ's and
    /// GPTQModel's `mse` option). Default: on for GPTQ at 2 and 3 bits,
    /// where it lowered 3-bit GPTQ perplexity in every seed measured
    /// (BENCHMARKS.md); off at 4 and 8 bits and for RTN.
    #[arg(long, conflicts_with = "no_mse")]
    pub mse: bool,

    /// GPTQ: min/max ranges at 2 and 3 bits too (see --mse).
    #[arg(long)]
    pub no_mse: bool,

    /// GPTQ: Hessian dampening, as a fraction of its mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,

    /// Calibration text: an ingest output directory (its train split), a
    /// .parquet or .jsonl dataset with a `content` column, a text file, or a
    /// directory of code. Required by GPTQ and AWQ.
    #[arg(long)]
    pub calib: Option<PathBuf>,

    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,

    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,

    /// Seed for choosing the calibration windows.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Calibration sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,

    /// Also write the calibration windows used (JSON: a list of token-id lists),
    /// to reproduce the run or feed the same data to another tool.
    #[arg(long)]
    pub save_calibration: Option<PathBuf>,

    /// AWQ: calibration tokens (a fixed pseudo-random subset, spread over the
    /// set and over every position in its windows) whose output error the
    /// scale search measures; the clipping search takes 512 of them. The
    /// per-channel activation means use every token. The search runs the
    /// block it measures 21 times per smoothing group, so its cost grows with
    /// this number (2048: 8 to 15 min for the 0.5B on 2 CPU cores).
    #[arg(long, default_value_t = 2048)]
    pub awq_tokens: usize,

    /// Largest output shard, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,

    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model to evaluate: DIR, hub id, or NAME=DIR. Repeat to compare; the
    /// first is the base that gates compare against.
    #[arg(long = "model", short = 'm', required = true)]
    pub models: Vec<String>,

    /// Held-out code: an ingest output directory (its eval split), a .parquet
    /// or .jsonl dataset with a `content` column, a text file, or a directory
    /// of code. Needed by ppl, fim and latency.
    #[arg(long)]
    pub data: Option<PathBuf>,

    /// Comma-separated tasks: ppl (perplexity), fim (fill-in-the-middle exact
    /// match, edit similarity, acceptance), humaneval (pass@1, greedy, run in
    /// a sandbox), latency (64-token FIM completions: TTFT, total, tokens/s).
    #[arg(long, default_value = "ppl", value_delimiter = ',')]
    pub tasks: Vec<String>,

    /// At most N: documents for ppl, problems for humaneval (the first N),
    /// samples for fim (default 100) and completions for latency (default 20).
    #[arg(long)]
    pub limit: Option<usize>,

    /// HumanEval problems (.jsonl or .jsonl.gz; default: HumanEval.jsonl.gz in
    /// the asset cache that scripts/fetch-assets fills).
    #[arg(long)]
    pub humaneval: Option<PathBuf>,

    /// Seed of the fim and latency samples (which files, which spans).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Perplexity: tokens per window.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,

    /// Perplexity: tokens the window advances by.
    #[arg(long, default_value_t = 512)]
    pub stride: usize,

    /// Prompts generated together (fim, humaneval) and perplexity windows
    /// run together (ppl), each batch left- or right-padded to its longest
    /// (prompts are grouped by length). Latency always runs one completion
    /// at a time, as an IDE does.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub batch_size: u64,

    /// Quality gate such as 'ppl<=1.05*base', 'humaneval>=base-0.02' or
    /// 'fim_accept>=0.65' (repeatable); any failure exits 1. Metrics: ppl,
    /// humaneval, fim_exact, fim_edit_sim, fim_accept, ttft_p50_ms,
    /// ttft_p95_ms, ttft_p99_ms, latency_p50_ms, latency_p95_ms,
    /// latency_p99_ms, prefill_tok_s, decode_tok_s.
    #[arg(long)]
    pub gate: Vec<String>,

    /// Report directory (report.json, report.md, SVG figures).
    #[arg(long, short = 'o')]
    pub output: PathBuf,

    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute dtype: f32, bf16 or f16 (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,

    #[command(flatten)]
    pub quantized: QuantizedRunArgs,
}

// ---- qcoder ingest -------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DedupArg {
    /// Keep every file.
    None,
    /// Drop files whose normalised text was seen before.
    Exact,
    /// Exact, then MinHash LSH near-duplicates.
    Near,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitByArg {
    /// Whole repositories go to train or eval (no leakage between them).
    Repo,
    /// Each file is assigned on its own.
    File,
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Directories, local git repositories, git URLs (cloned with the system
    /// `git`), or dataset files (.jsonl, .jsonl.gz, .parquet with a `content`
    /// column).
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,

    /// Output directory; refused if it exists, unless --overwrite.
    #[arg(long, short = 'o', value_name = "OUT_DIR")]
    pub output: PathBuf,

    /// Replace an existing output directory (only one holding a previous
    /// ingest output, or an empty one).
    #[arg(long)]
    pub overwrite: bool,

    /// Skip files larger than this (1MB = 10^6 bytes, 1MiB = 2^20).
    #[arg(long, default_value = "1MB", value_parser = crate::data::parse_size)]
    pub max_file_size: u64,

    /// Skip files with a line longer than this many characters.
    #[arg(long, default_value_t = 1000)]
    pub max_line_length: usize,

    /// Skip files whose mean line length exceeds this.
    #[arg(long, default_value_t = 100.0)]
    pub max_mean_line_length: f64,

    /// Skip files with a smaller fraction of alphanumeric characters.
    #[arg(long, default_value_t = 0.25)]
    pub min_alnum_fraction: f64,

    /// Keep files whose header says they are generated ("DO NOT EDIT", ...).
    #[arg(long)]
    pub keep_generated: bool,

    /// Keep minified files (*.min.js, one-line bundles).
    #[arg(long)]
    pub keep_minified: bool,

    /// Keep data formats (JSON, CSV, notebooks, SVG).
    #[arg(long)]
    pub include_data: bool,

    /// Only these languages (names from the language table, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub languages: Vec<String>,

    /// A language table replacing the built-in datasets/languages.toml.
    #[arg(long, value_name = "FILE")]
    pub language_table: Option<PathBuf>,

    /// Walk hidden files and directories too (.git is always skipped).
    #[arg(long)]
    pub include_hidden: bool,

    /// Walk dependency and build directories too (node_modules, vendor,
    /// third_party, site-packages, build, dist, target, virtualenvs, ...).
    #[arg(long)]
    pub include_vendored: bool,

    /// Ignore .gitignore / .ignore files.
    #[arg(long)]
    pub no_gitignore: bool,

    /// Follow symbolic links (loops are detected and counted).
    #[arg(long)]
    pub follow_symlinks: bool,

    /// Deduplication.
    #[arg(long, value_enum, default_value_t = DedupArg::Near)]
    pub dedup: DedupArg,

    /// Jaccard similarity above which two files are near-duplicates.
    #[arg(long, default_value_t = 0.85)]
    pub near_threshold: f64,

    /// MinHash permutations (a multiple of 16).
    #[arg(long, default_value_t = 256)]
    pub num_perm: usize,

    /// Tokens per shingle for MinHash.
    #[arg(long, default_value_t = 5)]
    pub shingle_size: usize,

    /// Leave e-mail addresses in (secrets are always redacted).
    #[arg(long)]
    pub keep_emails: bool,

    /// Fraction of repositories (or files) for the eval split.
    #[arg(long, default_value_t = 0.02)]
    pub eval_fraction: f64,

    /// What the eval split is drawn by.
    #[arg(long, value_enum, default_value_t = SplitByArg::Repo)]
    pub split_by: SplitByArg,

    /// Seed of the split hash; another seed draws another split.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,

    /// Target size of one Parquet shard.
    #[arg(long, default_value = "256MB", value_parser = crate::data::parse_size)]
    pub shard_size: u64,

    /// Count tokens with this tokenizer (tokenizer.json, a model directory
    /// or a hub id) into an `n_tokens` column.
    #[arg(long)]
    pub tokenizer: Option<String>,

    /// Seconds to wait for a `git clone` of a URL input.
    #[arg(long, default_value_t = 600)]
    pub clone_timeout: u64,
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

    /// A LoRA adapter (PEFT layout, e.g. `qcoder finetune`'s OUT/adapter) to
    /// merge into the model before exporting.
    #[arg(long)]
    pub adapter: Option<PathBuf>,

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

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,

    /// Continue from the newest checkpoint in OUT/checkpoints (written by the
    /// same recipe); later steps repeat an uninterrupted run exactly.
    #[arg(long)]
    pub resume: bool,

    /// Stop after optimizer step N, as an interruption would: checkpoints
    /// written so far remain and --resume continues the run (time-boxed jobs).
    #[arg(long, value_name = "N")]
    pub stop_after: Option<usize>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model directory (HF layout) or hub id.
    #[arg(long, short = 'm')]
    pub model: String,

    /// Adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,

    /// Output model directory (must not exist, or be empty).
    #[arg(long, short = 'o')]
    pub output: PathBuf,

    /// Largest safetensors shard (e.g. 5GB, 500MB).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file (TOML): [pipeline] work_dir, [model] gguf|path, and
    /// one table per stage whose keys are that command's long flags.
    pub pipeline: PathBuf,

    /// Run this stage again even when it is up to date (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
}

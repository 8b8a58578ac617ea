//! `qcoder quantize`: GPTQ / AWQ / RTN, layer by layer.

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::inspect::human_bytes;
use super::Outcome;
use crate::cli::{ColumnOrderArg, QuantMethodArg, QuantizeArgs};
use crate::data::texts::{read_texts, Split};
use crate::device::parse_device;
use crate::model::{self, hub};
use crate::quant::calib::sample_windows;
use crate::quant::checkpoint::QuantFormat;
use crate::quant::run::{run as run_job, validate, Job};
use crate::quant::{ColumnOrder, MethodKind, QuantSpec};
use crate::tokenizer::CodeTokenizer;

/// Text read for calibration at most (the windows are cut from it).
const MAX_CALIB_BYTES: usize = 256 << 20;

pub fn run(args: QuantizeArgs) -> Result<Outcome> {
    let method = match args.method {
        QuantMethodArg::Gptq => MethodKind::Gptq,
        QuantMethodArg::Awq => MethodKind::Awq,
        QuantMethodArg::Rtn => MethodKind::Rtn,
    };
    let sym = if args.sym || args.asym {
        args.sym
    } else {
        method != MethodKind::Awq
    };
    let order = match (args.act_order, args.order) {
        (true, ColumnOrderArg::Natural | ColumnOrderArg::ActOrder) => ColumnOrder::DescAct,
        (true, ColumnOrderArg::GroupAware) => {
            bail!("--act-order contradicts --order group-aware")
        }
        (false, ColumnOrderArg::Natural) => ColumnOrder::Natural,
        (false, ColumnOrderArg::ActOrder) => ColumnOrder::DescAct,
        (false, ColumnOrderArg::GroupAware) => ColumnOrder::GroupAware,
    };
    if order != ColumnOrder::Natural && method != MethodKind::Gptq {
        bail!("--act-order and --order apply to GPTQ only");
    }
    if args.mse && method == MethodKind::Awq {
        bail!("--mse applies to GPTQ and RTN (AWQ runs its own clipping search)");
    }
    // GPTQ at 2 and 3 bits fits ranges by default; RTN stays the plain
    // min/max baseline unless asked.
    let mse = args.mse || (method == MethodKind::Gptq && !args.no_mse && args.bits <= 3);
    if !(0.0..1.0).contains(&args.damp) {
        bail!("--damp must be in [0, 1)");
    }
    let group_size = match args.group_size {
        -1 => None,
        g if g > 0 => Some(g as usize),
        g => bail!("--group-size {g}: give a positive size or -1 for one group per row"),
    };
    if order == ColumnOrder::GroupAware && group_size.is_none() {
        bail!("--order group-aware needs groups: give --group-size");
    }
    let spec = QuantSpec {
        method,
        bits: args.bits,
        group_size,
        sym,
        order,
        damp: args.damp,
        mse,
    };
    let max_shard_bytes = crate::data::parse_size(&args.max_shard_size)
        .map_err(|e| anyhow::anyhow!("--max-shard-size {}: {e}", args.max_shard_size))?;
    if args.output.exists() && !args.overwrite {
        bail!(
            "{} exists; pass --overwrite to replace it",
            args.output.display()
        );
    }
    let device = parse_device(&args.device)?;
    let dir = hub::resolve_model_dir(&args.model)?;
    let config = model::read_config(&dir)?;
    if let Some(q) = &config.quantization_config {
        let method = q
            .get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("unknown");
        bail!(
            "the model in {} is already quantized (quant_method {method}); quantize its unquantized original",
            dir.display()
        );
    }
    validate(&config, &spec)?;
    // Fail on a bad checkpoint before reading any calibration data.
    model::Checkpoint::open_dir(&dir)
        .with_context(|| format!("opening the weights in {}", dir.display()))?;

    let calibration = match (method, &args.calib) {
        (MethodKind::Rtn, None) => None,
        (_, None) => bail!(
            "--method {} needs calibration text: give --calib",
            method.name()
        ),
        (_, Some(path)) => {
            if args.samples == 0 || args.seq_len < 2 {
                bail!("--samples must be positive and --seq-len at least 2");
            }
            if args.seq_len > config.max_position_embeddings {
                bail!(
                    "--seq-len {} exceeds the model's context of {} tokens",
                    args.seq_len,
                    config.max_position_embeddings
                );
            }
            let tokenizer = CodeTokenizer::from_model_dir(&dir)?;
            let texts = read_texts(path, Split::Train, MAX_CALIB_BYTES)?;
            let docs = texts
                .iter()
                .map(|t| tokenizer.encode(t, false))
                .collect::<Result<Vec<_>, _>>()?;
            let tokens: usize = docs.iter().map(Vec::len).sum();
            let eos = tokenizer
                .token_id("<|endoftext|>")
                .or_else(|| config.eos_token_ids().first().copied());
            let needed = args.samples * args.seq_len;
            let windows = sample_windows(&docs, eos, args.samples, args.seq_len, args.seed).ok_or_else(|| {
                anyhow::anyhow!(
                    "too few calibration tokens: {} has {tokens} tokens, at least --seq-len {} are needed ({needed} for {} distinct samples)",
                    path.display(),
                    args.seq_len,
                    args.samples
                )
            })?;
            if tokens < needed {
                eprintln!(
                    "warning: {} has {tokens} tokens, fewer than --samples x --seq-len = {needed}; calibration windows overlap",
                    path.display()
                );
            }
            if let Some(path) = &args.save_calibration {
                let rows: Vec<Vec<i64>> =
                    Vec::<Vec<i64>>::try_from(&windows).context("calibration windows")?;
                std::fs::write(path, serde_json::to_string(&rows)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Some(windows)
        }
    };

    let multi = MultiProgress::new();
    let layers_bar = multi.add(ProgressBar::new(config.num_hidden_layers as u64));
    layers_bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} layers {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    layers_bar.set_prefix(format!("{} {}-bit", method.name(), args.bits));
    let step_bar = multi.add(ProgressBar::new(1));
    step_bar
        .set_style(ProgressStyle::with_template("  {msg} {pos}/{len}").expect("valid template"));

    let job = Job {
        model_dir: &dir,
        out_dir: &args.output,
        spec,
        calibration,
        device,
        batch_size: args.batch_size.max(1),
        max_shard_bytes,
        awq_rows: args.awq_tokens.max(64),
    };
    let report = run_job(&job, &layers_bar, &step_bar).with_context(|| {
        format!(
            "quantizing {} into {}",
            dir.display(),
            args.output.display()
        )
    })?;
    layers_bar.finish_and_clear();

    println!("layer  seconds  rel. output error");
    for l in &report.layers {
        println!("{:>5}  {:>7.1}  {:.3e}", l.index, l.seconds, l.rel_error);
    }
    let mean =
        report.layers.iter().map(|l| l.rel_error).sum::<f64>() / report.layers.len().max(1) as f64;
    let format = QuantFormat::config_json(&spec);
    println!(
        "{} {}-bit group {} {}{}: mean rel. error {mean:.3e}; {:.1} s; peak RSS {}",
        method.name(),
        args.bits,
        group_size.map_or("per-row".to_string(), |g| g.to_string()),
        if sym { "sym" } else { "asym" },
        match order {
            ColumnOrder::Natural => String::new(),
            o => format!(" {}", o.name()),
        } + if mse { " mse" } else { "" },
        report.seconds,
        report.peak_rss_bytes.map_or("unknown".into(), human_bytes),
    );
    println!(
        "wrote {} ({})",
        args.output.display(),
        format["quant_method"].as_str().unwrap_or("")
    );
    Ok(Outcome::Success)
}

//! `qcoder generate`: complete a prompt or fill in a middle.

use std::io::Write;

use anyhow::{Context, Result};
use serde_json::json;

use super::Outcome;
use crate::cli::{GenerateArgs, QuantizedRunArgs};
use crate::device::{parse_device, parse_kind};
use crate::infer::quantized::{quantize_head, FastPath, HeadQuant};
use crate::infer::{generate, SamplingParams};
use crate::model::{self, hub, LoadOptions};
use crate::tokenizer::CodeTokenizer;

pub fn run(args: GenerateArgs) -> Result<Outcome> {
    let device = parse_device(&args.model.device)?;
    let kind = parse_kind(args.model.dtype.as_deref(), device)?;
    if let Some(note) = crate::device::slow_cpu_dtype_note(kind, device) {
        eprintln!("{note}");
    }
    anyhow::ensure!(
        args.temperature >= 0.0 && args.temperature.is_finite(),
        "--temperature must be a non-negative number"
    );
    anyhow::ensure!(
        args.top_p > 0.0 && args.top_p <= 1.0,
        "--top-p must be in (0, 1]"
    );
    let dir = hub::resolve_model_dir(&args.model.model)?;
    let config = model::read_config(&dir)?;
    let tokenizer = CodeTokenizer::from_model_dir(&dir)?;
    let prompt = match (&args.prompt, &args.fim_prefix) {
        (Some(text), _) => tokenizer.encode(text, true)?,
        (None, Some(prefix)) => tokenizer
            .fim_prompt(prefix, args.fim_suffix.as_deref().unwrap_or(""))
            .with_context(|| format!("--fim-prefix with the tokenizer of {}", dir.display()))?,
        (None, None) => anyhow::bail!("give --prompt or --fim-prefix"),
    };
    if prompt.len() > config.max_position_embeddings {
        anyhow::bail!(
            "the prompt is {} tokens, but the model's context is {} tokens (max_position_embeddings in {})",
            prompt.len(),
            config.max_position_embeddings,
            dir.join("config.json").display()
        );
    }
    let model = load_for_inference(&dir, &config, LoadOptions { device, kind }, &args.quantized)?;
    let mut extra_stops = config.eos_token_ids();
    extra_stops.extend(model::generation_eos_ids(&dir)?);
    let stop_ids = if args.ignore_eos {
        Vec::new()
    } else {
        tokenizer.stop_ids(&extra_stops)
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };

    let mut stream = tokenizer.decode_stream();
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let mut on_token = |id: u32| {
        if args.json || write_err.is_some() {
            return;
        }
        match stream.push(id) {
            Ok(Some(text)) => {
                if let Err(e) = stdout
                    .write_all(text.as_bytes())
                    .and_then(|_| stdout.flush())
                {
                    write_err = Some(e);
                }
            }
            Ok(None) => {}
            Err(e) => eprintln!("warning: {e}"),
        }
    };
    let out = generate(
        &model,
        &prompt,
        args.max_new_tokens,
        &stop_ids,
        sampling,
        &mut on_token,
    )?;
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(Outcome::Success);
    }
    let text = tokenizer.decode(&out.tokens, false)?;
    let per_s = |n: usize, d: std::time::Duration| {
        let s = d.as_secs_f64();
        if s > 0.0 {
            n as f64 / s
        } else {
            0.0
        }
    };
    if args.json {
        let report = json!({
            "prompt_tokens": prompt.len(),
            "prompt_ids": prompt,
            "token_ids": out.tokens,
            "text": text,
            "stop_reason": out.stop.describe(),
            "prefill_ms": out.prefill.as_secs_f64() * 1e3,
            "decode_ms": out.decode.as_secs_f64() * 1e3,
            "prefill_tokens_per_s": per_s(prompt.len(), out.prefill),
            "decode_tokens_per_s": per_s(out.decode_steps, out.decode),
        });
        writeln!(stdout, "{report}").context("writing to stdout")?;
    } else {
        let rest = stream.finish()?;
        writeln!(stdout, "{rest}").context("writing to stdout")?;
        eprintln!(
            "[{} prompt tokens, {} new; stopped on {}; prefill {:.0} tok/s, decode {:.1} tok/s]",
            prompt.len(),
            out.tokens.len(),
            out.stop.describe(),
            per_s(prompt.len(), out.prefill),
            per_s(out.decode_steps, out.decode),
        );
    }
    Ok(Outcome::Success)
}

/// Loads a model for inference: a quantized checkpoint runs on the int4/int8
/// kernels with an int8 output head unless told otherwise; a layer the kernels
/// cannot run is an error naming it, or runs dequantized with
/// `--allow-dequant` (and a note saying how many and why).
pub fn load_for_inference(
    dir: &std::path::Path,
    config: &crate::model::ModelConfig,
    opts: LoadOptions,
    run: &QuantizedRunArgs,
) -> Result<crate::model::CausalLm> {
    let quantized = config.quantization_config.is_some();
    let context = || format!("loading the model in {}", dir.display());
    let cpu = !opts.device.is_cuda();
    if !quantized || run.dequantize {
        let mut model = model::load_dir(dir, opts).with_context(context)?;
        if let Some(h) = run.head {
            quantize_head(&mut model, h)
                .with_context(|| "quantizing the output head".to_string())?;
            model.own_cpu_kernels = cpu && h != HeadQuant::Keep;
        }
        return Ok(model);
    }
    let fast = FastPath::new(run.allow_dequant);
    let mut model = model::load_dir_with(dir, opts, &fast).with_context(context)?;
    if let (n @ 1.., Some(reason)) = fast.fallbacks() {
        eprintln!(
            "note: {}: {n} layers run dequantized (the int4 kernels cannot run them: {reason})",
            dir.display()
        );
    }
    quantize_head(&mut model, run.head.unwrap_or(HeadQuant::Int8))
        .with_context(|| "quantizing the output head".to_string())?;
    model.own_cpu_kernels = cpu;
    Ok(model)
}

//! `qcoder finetune recipe.toml`: every input is checked before the model is
//! loaded; then data → LoRA → training loop with eval, metrics and
//! checkpoints → adapter (PEFT layout), loss curve and, if asked, the merged
//! model.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::staging::Staged;
use super::Outcome;
use crate::cli::FinetuneArgs;
use crate::data::fim::{doc_rng, encode_all, FimSpec};
use crate::data::packing::pack;
use crate::data::repo_level::{self, group_by_repo, read_repo_files, RepoFile};
use crate::data::texts::{read_texts, Split, TextsError};
use crate::device::{parse_device, parse_kind};
use crate::lora::{Adapter, LoraConfig};
use crate::model::{self, hub, LoadOptions};
use crate::tokenizer::CodeTokenizer;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::recipe::{Recipe, TargetModules};
use crate::train::schedule::LrSchedule;
use crate::train::{plot, DataCursor, Trainer};

const METRICS: &str = "metrics.jsonl";

pub fn run(args: FinetuneArgs) -> Result<Outcome> {
    let recipe = Recipe::from_file(&args.recipe)?;
    let hash = recipe.trajectory_hash();
    let out = recipe.output.dir.clone();
    let ckpt_root = out.join("checkpoints");

    // --- Checks before any heavy work ---
    let device = parse_device(&recipe.model.device).context("[model] device")?;
    let kind = parse_kind(recipe.model.dtype.as_deref(), device).context("[model] dtype")?;
    if let Some(note) = crate::device::slow_cpu_dtype_note(kind, device) {
        eprintln!("{note}");
    }
    let fast_int8 = model::int8::fast_int8_products(device);
    if device == tch::Device::Cpu && fast_int8 && !recipe.model.int8_base {
        eprintln!(
            "note: [model] int8_base = true multiplies the frozen base in int8: 1.9x PEFT's best \
             tokens/s on a 2-core Intel Xeon with VNNI, held-out loss within 0.2% of an f32 \
             base's (recipes/README.md)"
        );
    }
    if recipe.model.int8_base && !fast_int8 {
        eprintln!(
            "note: this CPU has no AVX-512 VNNI, where libtorch multiplies int8 matrices fast: \
             [model] int8_base multiplies its int8 values as f32 matrices (same numbers, the \
             decoder's weights in half their f32 memory, no time saved; the output layer stays \
             dense)"
        );
    }
    let model_dir = hub::resolve_model_dir(&recipe.model.path)
        .with_context(|| format!("[model] path = {:?}", recipe.model.path))?;
    let config = model::read_config(&model_dir).context("[model] path")?;
    let seq_len = recipe.data.seq_len;
    if seq_len > config.max_position_embeddings {
        bail!(
            "[data] seq_len = {seq_len} is above the model's context of {} tokens (max_position_embeddings in {})",
            config.max_position_embeddings,
            model_dir.join("config.json").display()
        );
    }
    let lora = LoraConfig {
        r: recipe.lora.r,
        alpha: recipe.lora.alpha,
        dropout: recipe.lora.dropout,
        use_rslora: recipe.lora.use_rslora,
        use_dora: recipe.lora.use_dora,
        targets: match &recipe.lora.target_modules {
            TargetModules::Keyword(_) => Vec::new(),
            TargetModules::Names(names) => names.clone(),
        },
    };
    lora.check_targets().context("[lora] target_modules")?;
    if recipe.model.int8_base && lora.use_dora {
        bail!("[model] int8_base = true cannot train DoRA ([lora] use_dora = true): DoRA needs the dense base weights, which int8_base replaces");
    }
    let tok = CodeTokenizer::from_model_dir(&model_dir)?;
    let fim_spec = FimSpec {
        fim_rate: recipe.data.fim_rate,
        spm_rate: recipe.data.fim_spm_rate,
    };
    if fim_spec.fim_rate > 0.0 && tok.fim().is_none() {
        bail!(
            "[data] fim_rate = {}: the tokenizer of {} has no FIM tokens; set fim_rate = 0",
            fim_spec.fim_rate,
            model_dir.display()
        );
    }
    let eos = tok
        .token_id("<|endoftext|>")
        .or_else(|| config.eos_token_ids().first().copied())
        .context("the model has no end-of-text token (config.json eos_token_id) to separate packed documents")?;
    for p in recipe.data.train.iter().chain(&recipe.data.eval) {
        if !p.exists() {
            bail!("[data] {} does not exist", p.display());
        }
    }
    let resume = if args.resume {
        let (_, dir) = checkpoint::list(&ckpt_root).pop().with_context(|| {
            format!(
                "--resume: there is no checkpoint in {} (set [checkpoint] every to write some)",
                ckpt_root.display()
            )
        })?;
        let state = checkpoint::read_state(&dir)?;
        if state.recipe_hash != hash {
            bail!(
                "--resume: {} was written by a different recipe (model, data, lora or train settings changed); resume with the recipe that wrote it or start a new [output] dir",
                dir.display()
            );
        }
        Some((dir, state))
    } else {
        if out.join("adapter").exists() || !checkpoint::list(&ckpt_root).is_empty() {
            bail!(
                "[output] dir {} holds a previous run; pass --resume to continue it, or choose another dir",
                out.display()
            );
        }
        None
    };

    // --- Data ---
    let max_bytes = crate::data::parse_size(&recipe.data.max_bytes)
        .map_err(|e| anyhow::anyhow!("[data] max_bytes: {e}"))? as usize;
    let seed = recipe.train.seed;
    let (train_docs, repo_samples) = if recipe.data.repo_level_rate > 0.0 {
        let (f, ok) = (tok.fim(), |f: crate::tokenizer::FimTokens| {
            f.repo_name.is_some() && f.file_sep.is_some()
        });
        if !f.is_some_and(ok) {
            bail!("[data] repo_level_rate: the tokenizer of {} has no <|repo_name|> / <|file_sep|> tokens; set repo_level_rate = 0", model_dir.display());
        }
        read_with_repos(
            &tok,
            &recipe.data.train,
            max_bytes,
            recipe.data.repo_level_rate,
            seed,
        )?
    } else {
        (
            read_all(&recipe.data.train, Split::Train, max_bytes, "train")?,
            Vec::new(),
        )
    };
    let eval_docs = if recipe.data.eval.is_empty() {
        ingest_eval_splits(&recipe.data.train, max_bytes)?
    } else {
        read_all(&recipe.data.eval, Split::Eval, max_bytes, "eval")?
    };
    let t0 = Instant::now();
    let mut encoded = encode_all(&tok, &train_docs, fim_spec, seed)?;
    let n_repo_samples = repo_samples.len();
    encoded.extend(repo_samples);
    let mut train = pack(encoded, eos, seq_len, seed);
    let n_train_tokens: usize = train.tokens.len();
    if train.is_empty() {
        bail!(
            "[data] train: the {} documents hold fewer than seq_len = {seq_len} tokens; add data or lower seq_len",
            train_docs.len()
        );
    }
    let eval = if eval_docs.is_empty() {
        let n = (train.len() as f64 * recipe.data.eval_fraction).ceil() as usize;
        let n = n.min(train.len() - 1);
        train.split_off_last(n)
    } else {
        // Held-out text is scored left to right: perplexity as `qcoder eval` measures it.
        let plain = FimSpec {
            fim_rate: 0.0,
            spm_rate: 0.0,
        };
        pack(
            encode_all(&tok, &eval_docs, plain, seed)?,
            eos,
            seq_len,
            seed,
        )
    };
    let t = &recipe.train;
    let per_step = t.micro_batch * t.grad_accum;
    let total_steps = match t.max_steps {
        Some(n) => n,
        None => ((t.epochs * train.len() as f64) / per_step as f64)
            .ceil()
            .max(1.0) as usize,
    };
    let warmup = match (t.warmup_steps, t.warmup_ratio) {
        (Some(n), _) => n,
        (None, Some(r)) => (r * total_steps as f64).round() as usize,
        (None, None) => 0,
    };
    eprintln!(
        "data: {} train documents{} -> {} blocks of {seq_len} tokens ({} tokens, {:.1}s); {} eval blocks",
        train_docs.len(),
        if n_repo_samples > 0 {
            format!(" and {n_repo_samples} repository-level samples")
        } else {
            String::new()
        },
        train.len(),
        n_train_tokens,
        t0.elapsed().as_secs_f64(),
        eval.len()
    );

    // --- Model and adapter ---
    let mut model = model::load_dir(&model_dir, LoadOptions { device, kind })
        .with_context(|| format!("loading {}", model_dir.display()))?;
    if recipe.model.int8_base {
        let n = model::int8::int8_base(&mut model).context("[model] int8_base")?;
        let how = if fast_int8 {
            "multiply in int8"
        } else {
            "hold int8 weights"
        };
        eprintln!(
            "int8 base: {n} linear layers {how} (per-token activations, per-channel weights)"
        );
    }
    tch::manual_seed(seed as i64);
    let adapter = Adapter::attach(&mut model, &lora)?;
    let opt = AdamW::new(
        adapter.params(),
        AdamWConfig {
            betas: (t.betas[0], t.betas[1]),
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
    );
    eprintln!(
        "lora: r {} alpha {} on {} modules, {} trainable parameters; {} optimizer steps of {} sequences (warmup {warmup}){}",
        lora.r,
        lora.alpha,
        adapter.modules.len(),
        adapter.n_params(),
        total_steps,
        per_step,
        if t.gradient_checkpointing {
            "; gradient checkpointing"
        } else {
            ""
        },
    );
    let mut trainer = Trainer {
        adapter,
        opt,
        schedule: LrSchedule {
            kind: t.schedule,
            base_lr: t.lr,
            warmup,
            total: total_steps,
        },
        max_grad_norm: t.max_grad_norm,
        seed,
        gradient_checkpointing: t.gradient_checkpointing,
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let metrics_path = out.join(METRICS);
    let (start_step, position) = match &resume {
        Some((dir, state)) => {
            checkpoint::restore(dir, &mut trainer, state)?;
            truncate_metrics(&metrics_path, state.step)?;
            if out.join("adapter").exists() {
                std::fs::remove_dir_all(out.join("adapter"))
                    .with_context(|| format!("removing the old {}/adapter", out.display()))?;
            }
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
            (state.step, state.data_position)
        }
        None => {
            std::fs::write(&metrics_path, "")
                .with_context(|| format!("writing {}", metrics_path.display()))?;
            (0, 0)
        }
    };
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    // --- Training ---
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let bar = ProgressBar::new(total_steps as u64).with_position(start_step as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{wide_bar}] {pos}/{len} steps {msg} (ETA {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut cursor = DataCursor::new(&train, seed, position);
    let base_name = recipe.model.path.clone();
    let mut first_loss = None;
    let mut last = None;
    let (mut first_eval, mut last_eval) = (None, None);
    if start_step == 0 && recipe.eval.every > 0 {
        // The base model's eval loss: the point the curve starts from.
        if let Some(e) = trainer.eval_loss(&model, &eval, t.micro_batch, recipe.eval.max_batches)? {
            let row = json!({"step": 0, "eval_loss": e, "eval_ppl": e.exp()});
            writeln!(metrics, "{row}")
                .with_context(|| format!("writing {}", metrics_path.display()))?;
            eprintln!("step 0 eval_loss {e:.4} (ppl {:.2})", e.exp());
            first_eval = Some(e);
            last_eval = Some(e);
        }
    }
    for step in start_step..total_steps {
        let batches = cursor.next_step(t.grad_accum, t.micro_batch, device)?;
        let started = Instant::now();
        let stats = trainer.step(&model, &batches, step)?;
        let tokens = batches.len() * t.micro_batch * seq_len;
        let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64();
        let done = step + 1;
        first_loss.get_or_insert(stats.loss);
        last = Some(stats.loss);
        let is_last = done == total_steps;
        let eval_now = (recipe.eval.every > 0 && done % recipe.eval.every == 0) || is_last;
        let eval_loss = if eval_now {
            let l = trainer.eval_loss(&model, &eval, t.micro_batch, recipe.eval.max_batches)?;
            last_eval = l.or(last_eval);
            first_eval = first_eval.or(l);
            l
        } else {
            None
        };
        bar.set_message(format!(
            "loss {:.4} · {:.0} tok/s",
            stats.loss, tokens_per_s
        ));
        bar.set_position(done as u64);
        if done % t.log_every == 0 || eval_loss.is_some() || is_last {
            let mut row = json!({
                "step": done,
                "loss": stats.loss,
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "tokens_per_s": tokens_per_s,
            });
            if let Some(e) = eval_loss {
                row["eval_loss"] = json!(e);
                row["eval_ppl"] = json!(e.exp());
            }
            writeln!(metrics, "{row}")
                .with_context(|| format!("writing {}", metrics_path.display()))?;
            if !tty {
                let eval_text = eval_loss
                    .map(|e| format!(" eval_loss {e:.4} (ppl {:.2})", e.exp()))
                    .unwrap_or_default();
                eprintln!(
                    "step {done}/{total_steps} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s{eval_text}",
                    stats.loss, stats.lr, stats.grad_norm, tokens_per_s
                );
            }
        }
        if recipe.checkpoint.every > 0 && done % recipe.checkpoint.every == 0 {
            let state = TrainerState {
                step: done,
                data_position: cursor.position,
                seed,
                recipe_hash: hash.clone(),
                rng: "libtorch reseeded every optimizer step from (seed, step)".into(),
                total_steps,
            };
            checkpoint::save(
                &ckpt_root,
                &trainer,
                &state,
                &base_name,
                recipe.checkpoint.keep_last,
            )?;
        }
        if args.stop_after == Some(done) && !is_last {
            bar.finish_and_clear();
            let hint = match checkpoint::list(&ckpt_root).last() {
                Some((step, _)) => format!("--resume continues from step {step}"),
                None => "no checkpoint was written ([checkpoint] every = 0)".into(),
            };
            eprintln!("stopped after step {done} of {total_steps} (--stop-after); {hint}");
            return Ok(Outcome::Success);
        }
    }
    bar.finish_and_clear();

    // --- Outputs ---
    let adapter_dir = out.join("adapter");
    let staged = Staged::dir(&adapter_dir)?;
    trainer.adapter.save(staged.path(), &base_name)?;
    staged.commit()?;
    write_plot(&metrics_path, &out.join("loss.svg"))?;
    if recipe.output.merge {
        let merged = out.join("merged");
        if merged.exists() {
            std::fs::remove_dir_all(&merged)
                .with_context(|| format!("replacing {}", merged.display()))?;
        }
        let staged = Staged::dir(&merged)?;
        crate::lora::merge(&model_dir, &adapter_dir, staged.path(), 5_000_000_000)
            .context("merging the adapter into the base model")?;
        staged.commit()?;
    }
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    eprintln!(
        "done: loss {} -> {}, eval loss {} -> {}; adapter in {}{}",
        fmt(first_loss),
        fmt(last),
        fmt(first_eval),
        fmt(last_eval),
        adapter_dir.display(),
        if recipe.output.merge {
            format!(", merged model in {}", out.join("merged").display())
        } else {
            String::new()
        }
    );
    Ok(Outcome::Success)
}

fn read_all(paths: &[PathBuf], split: Split, max_bytes: usize, what: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for p in paths {
        let budget = max_bytes.saturating_sub(docs.iter().map(String::len).sum());
        if budget == 0 {
            break;
        }
        docs.extend(
            read_texts(p, split, budget)
                .with_context(|| format!("[data] {what}: reading {}", p.display()))?,
        );
    }
    Ok(docs)
}

/// Training files with their repositories: a `rate` fraction of the
/// repositories become one repository-level sample each (returned encoded);
/// the files of the others are returned as documents.
fn read_with_repos(
    tok: &CodeTokenizer,
    paths: &[PathBuf],
    max_bytes: usize,
    rate: f64,
    seed: u64,
) -> Result<(Vec<String>, Vec<Vec<u32>>)> {
    let mut files = Vec::new();
    for p in paths {
        let budget =
            max_bytes.saturating_sub(files.iter().map(|f: &RepoFile| f.content.len()).sum());
        if budget == 0 {
            break;
        }
        files.extend(
            read_repo_files(p, Split::Train, budget)
                .with_context(|| format!("[data] train: reading {}", p.display()))?,
        );
    }
    let (mut docs, mut samples) = (Vec::new(), Vec::new());
    for (i, (repo, files)) in group_by_repo(files).into_iter().enumerate() {
        // A stream apart from the FIM draws of the documents.
        let mut rng = doc_rng(seed ^ 0x5245_504F, i as u64);
        if repo_level::chosen(rate, files.len(), &mut rng) {
            samples.push(repo_level::encode_repo(tok, &repo, &files)?);
        } else {
            docs.extend(files.into_iter().map(|f| f.content));
        }
    }
    Ok((docs, samples))
}

/// The eval splits of the ingest output directories among the training inputs.
fn ingest_eval_splits(paths: &[PathBuf], max_bytes: usize) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for p in paths.iter().filter(|p| p.join("stats.json").is_file()) {
        match read_texts(p, Split::Eval, max_bytes) {
            Ok(d) => docs.extend(d),
            Err(TextsError::NoSplit { .. } | TextsError::Empty { .. }) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("[data] reading the eval split of {}", p.display()))
            }
        }
    }
    Ok(docs)
}

/// Drops metric rows after `step` (a resumed run rewrites them).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).with_context(|| format!("writing {}", path.display()))
}

fn write_plot(metrics: &Path, svg: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for row in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let Some(step) = row["step"].as_f64() else {
            continue;
        };
        if let Some(l) = row["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = row["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    std::fs::write(svg, plot::loss_svg(&train, &eval))
        .with_context(|| format!("writing {}", svg.display()))
}

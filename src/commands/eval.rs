//! `qcoder eval`: the same held-out code and problems through every model,
//! side by side.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::generate::load_for_inference;
use super::Outcome;
use crate::cli::EvalArgs;
use crate::data::texts::{read_texts, Split};
use crate::device::{kind_name, parse_device, parse_kind};
use crate::eval::fim::{self, FimResult, FimScores};
use crate::eval::gate::Gate;
use crate::eval::humaneval::{self, ProblemResult};
use crate::eval::latency::{self, LatencySummary};
use crate::eval::plot;
use crate::eval::ppl::{corpus_perplexity, Perplexity};
use crate::eval::sandbox::{Limits, Sandbox};
use crate::infer::quantized::Int4Linear;
use crate::model::{self, hub, LoadOptions};
use crate::tokenizer::CodeTokenizer;

const TASKS: &[&str] = &["ppl", "fim", "humaneval", "latency"];
/// Gate metrics and the task that measures each.
const METRICS: &[(&str, &str)] = &[
    ("ppl", "ppl"),
    ("humaneval", "humaneval"),
    ("fim_exact", "fim"),
    ("fim_edit_sim", "fim"),
    ("fim_accept", "fim"),
    ("ttft_p50_ms", "latency"),
    ("ttft_p95_ms", "latency"),
    ("ttft_p99_ms", "latency"),
    ("latency_p50_ms", "latency"),
    ("latency_p95_ms", "latency"),
    ("latency_p99_ms", "latency"),
    ("prefill_tok_s", "latency"),
    ("decode_tok_s", "latency"),
];
const MAX_TEXT_BYTES: usize = 64 << 20;
const DEFAULT_FIM_SAMPLES: usize = 100;
const DEFAULT_LATENCY_SAMPLES: usize = 20;

struct ModelResult {
    name: String,
    path: PathBuf,
    ppl: Option<Perplexity>,
    humaneval: Option<Vec<ProblemResult>>,
    fim: Option<(FimScores, Vec<FimResult>)>,
    latency: Option<LatencySummary>,
    seconds: f64,
}

impl ModelResult {
    fn metric(&self, name: &str) -> Option<f64> {
        let fim = self.fim.as_ref().map(|f| f.0);
        let lat = self.latency.as_ref();
        match name {
            "ppl" => self.ppl.map(|p| p.ppl()),
            "humaneval" => self.humaneval.as_deref().map(humaneval::pass_at_1),
            "fim_exact" => fim.map(|f| f.exact_match),
            "fim_edit_sim" => fim.map(|f| f.edit_similarity),
            "fim_accept" => fim.map(|f| f.accept_rate),
            "ttft_p50_ms" => lat.map(|l| l.ttft_ms.p50),
            "ttft_p95_ms" => lat.map(|l| l.ttft_ms.p95),
            "ttft_p99_ms" => lat.map(|l| l.ttft_ms.p99),
            "latency_p50_ms" => lat.map(|l| l.total_ms.p50),
            "latency_p95_ms" => lat.map(|l| l.total_ms.p95),
            "latency_p99_ms" => lat.map(|l| l.total_ms.p99),
            "prefill_tok_s" => lat.map(|l| l.prefill_tokens_per_s),
            "decode_tok_s" => lat.map(|l| l.decode_tokens_per_s),
            _ => None,
        }
    }
}

fn progress(len: u64, prefix: &str, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} {what} [{{bar:30}}] {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

pub fn run(args: EvalArgs) -> Result<Outcome> {
    for task in &args.tasks {
        if !TASKS.contains(&task.as_str()) {
            bail!("unknown task `{task}` (tasks: {})", TASKS.join(", "));
        }
    }
    let wants = |task: &str| args.tasks.iter().any(|t| t == task);
    let metric_names: Vec<&str> = METRICS.iter().map(|m| m.0).collect();
    let gates = args
        .gate
        .iter()
        .map(|g| Gate::parse(g, &metric_names))
        .collect::<Result<Vec<_>, _>>()?;
    for gate in &gates {
        let task = METRICS
            .iter()
            .find(|m| m.0 == gate.metric)
            .map_or("", |m| m.1);
        if !wants(task) {
            bail!(
                "--gate '{}' needs the task `{task}` (add it to --tasks)",
                gate.text
            );
        }
    }
    if gates.iter().any(Gate::needs_base) && args.models.len() < 2 {
        bail!("a gate relative to `base` needs at least two --model (the first is the base)");
    }
    let device = parse_device(&args.device)?;
    let kind = parse_kind(args.dtype.as_deref(), device)?;
    if let Some(note) = crate::device::slow_cpu_dtype_note(kind, device) {
        eprintln!("{note}");
    }
    let models: Vec<(String, PathBuf, model::ModelConfig)> = args
        .models
        .iter()
        .map(|spec| {
            let (name, path) = match spec.split_once('=') {
                Some((n, p)) if !n.is_empty() && !Path::new(spec).exists() => (n.to_string(), p),
                _ => (String::new(), spec.as_str()),
            };
            let dir = hub::resolve_model_dir(path)?;
            let name = if name.is_empty() {
                dir.file_name()
                    .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
            } else {
                name
            };
            let config = model::read_config(&dir)?;
            if let (Some(qc), false, false) = (
                &config.quantization_config,
                args.quantized.dequantize,
                args.quantized.allow_dequant,
            ) {
                Int4Linear::check_config(qc).map_err(|reason| {
                    anyhow::anyhow!(
                        "{}: the fast int4 path cannot run this checkpoint ({reason}); pass \
                         --allow-dequant to run its layers dequantized in f32",
                        dir.display()
                    )
                })?;
            }
            Ok((name, dir, config))
        })
        .collect::<Result<_>>()?;

    // Every input is checked before the first (slow) model load.
    let data_tasks: Vec<&str> = ["ppl", "fim", "latency"]
        .into_iter()
        .filter(|t| wants(t))
        .collect();
    let mut texts = Vec::new();
    if !data_tasks.is_empty() {
        let Some(data) = &args.data else {
            bail!("--data is needed for the tasks {}", data_tasks.join(", "));
        };
        texts = read_texts(data, Split::Eval, MAX_TEXT_BYTES)?;
        if texts.is_empty() {
            bail!("{}: the eval data is empty", data.display());
        }
    }
    let ppl_texts = &texts[..args.limit.unwrap_or(texts.len()).min(texts.len())];
    let fim_samples = if wants("fim") {
        fim::sample_spans(&texts, args.limit.unwrap_or(DEFAULT_FIM_SAMPLES), args.seed)?
    } else {
        Vec::new()
    };
    let latency_samples = if wants("latency") {
        // A seed of their own, so that --limit on fim does not move them.
        fim::sample_spans(
            &texts,
            args.limit.unwrap_or(DEFAULT_LATENCY_SAMPLES),
            args.seed.wrapping_add(1),
        )?
    } else {
        Vec::new()
    };
    let (problems, sandbox, humaneval_path) = if wants("humaneval") {
        let path = args
            .humaneval
            .clone()
            .unwrap_or_else(humaneval::default_path);
        let mut problems = humaneval::read_problems(&path)?;
        if let Some(limit) = args.limit {
            problems.truncate(limit);
        }
        let sandbox = Sandbox::new(Limits::default())?;
        (problems, Some(sandbox), Some(path))
    } else {
        (Vec::new(), None, None)
    };

    let batch = args.batch_size as usize;
    let mut results = Vec::new();
    for (name, dir, config) in &models {
        let start = std::time::Instant::now();
        let tokenizer = CodeTokenizer::from_model_dir(dir)?;
        let lm = load_for_inference(dir, config, LoadOptions { device, kind }, &args.quantized)?;
        let mut extra_stops = config.eos_token_ids();
        extra_stops.extend(model::generation_eos_ids(dir)?);
        let stop_ids = tokenizer.stop_ids(&extra_stops);
        let mut result = ModelResult {
            name: name.clone(),
            path: dir.clone(),
            ppl: None,
            humaneval: None,
            fim: None,
            latency: None,
            seconds: 0.0,
        };
        if wants("ppl") {
            let docs = ppl_texts
                .iter()
                .map(|t| tokenizer.encode(t, false))
                .collect::<Result<Vec<_>, _>>()?;
            let bar = progress(
                docs.iter().map(|d| d.len() as u64).sum(),
                name,
                "ppl tokens",
            );
            let ppl = corpus_perplexity(&lm, &docs, args.window, args.stride, batch, &mut |n| {
                bar.inc(n as u64)
            })?;
            bar.finish_and_clear();
            result.ppl = Some(ppl);
        }
        if let Some(sandbox) = &sandbox {
            let bar = progress(problems.len() as u64, name, "humaneval completions");
            let completions =
                humaneval::complete_batch(&lm, &tokenizer, &stop_ids, &problems, batch, &mut |n| {
                    bar.inc(n as u64)
                })
                .with_context(|| format!("{name}: completing humaneval"))?;
            bar.finish_and_clear();
            let bar = progress(problems.len() as u64, name, "humaneval tests");
            let mut done = Vec::with_capacity(problems.len());
            for (problem, (completion, tokens)) in problems.iter().zip(completions) {
                done.push(
                    humaneval::check_completion(sandbox, problem, &completion, tokens)
                        .with_context(|| format!("running {}", problem.task_id))?,
                );
                bar.inc(1);
            }
            bar.finish_and_clear();
            result.humaneval = Some(done);
        }
        if wants("fim") {
            let bar = progress(fim_samples.len() as u64, name, "fim");
            let completions = fim::complete_batch(
                &lm,
                &tokenizer,
                &stop_ids,
                &fim_samples,
                fim::MAX_NEW_TOKENS,
                batch,
                &mut |n| bar.inc(n as u64),
            )
            .with_context(|| format!("{name}: fim"))?;
            let done: Vec<FimResult> = fim_samples
                .iter()
                .zip(completions)
                .map(|(sample, (completion, _, _))| fim::score(sample, completion))
                .collect();
            bar.finish_and_clear();
            result.fim = Some((fim::scores(&done), done));
        }
        if wants("latency") {
            let bar = progress(latency_samples.len() as u64, name, "latency");
            result.latency = Some(
                latency::measure(&lm, &tokenizer, &latency_samples, &mut || bar.inc(1))
                    .with_context(|| format!("{name}: latency"))?,
            );
            bar.finish_and_clear();
        }
        result.seconds = start.elapsed().as_secs_f64();
        // One line per model as it finishes: batch logs have no progress bars.
        let measured: Vec<String> = METRICS
            .iter()
            .filter_map(|(metric, _)| result.metric(metric).map(|v| format!("{metric} {v:.4}")))
            .collect();
        eprintln!("{name}: {} ({:.1} s)", measured.join(", "), result.seconds);
        results.push(result);
    }

    // Gates: every model but the base for relative gates, all for absolute ones.
    let mut gate_rows = Vec::new();
    let mut failed = false;
    for gate in &gates {
        let base = results.first().and_then(|r| r.metric(&gate.metric));
        for (i, r) in results.iter().enumerate() {
            if i == 0 && gate.needs_base() {
                continue;
            }
            let value = r.metric(&gate.metric).unwrap_or(f64::NAN);
            if let Some((limit, pass)) = gate.check(value, base) {
                failed |= !pass;
                gate_rows.push(json!({"gate": gate.text, "model": r.name, "value": value, "limit": limit, "pass": pass}));
            }
        }
    }

    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let figures = figures(&results, &args.output)?;
    let report = json!({
        "data": args.data,
        "documents": texts.len(),
        "tasks": args.tasks,
        "device": crate::device::device_name(device),
        "dtype": kind_name(kind),
        "batch_size": batch,
        "ppl": wants("ppl").then(|| json!({"window": args.window, "stride": args.stride, "documents": ppl_texts.len()})),
        "fim": wants("fim").then(|| json!({
            "seed": args.seed,
            "samples": fim_samples.len(),
            "max_new_tokens": fim::MAX_NEW_TOKENS,
            "completion": "cut at the hidden span's line count (generation stops there)",
            "max_prefix_chars": fim::MAX_PREFIX_CHARS,
            "max_suffix_chars": fim::MAX_SUFFIX_CHARS,
            "accepted": "equal after trimming trailing whitespace of every line and trailing blank lines",
        })),
        "humaneval": sandbox.as_ref().map(|s| json!({
            "path": humaneval_path,
            "problems": problems.len(),
            "max_new_tokens": humaneval::MAX_NEW_TOKENS,
            "stop_sequences": humaneval::STOP_SEQUENCES,
            "sandbox": {"isolation": s.isolation(), "limits": s.limits()},
        })),
        "latency": wants("latency").then(|| json!({
            "samples": latency_samples.len(),
            "completion_tokens": latency::COMPLETION_TOKENS,
            "seed": args.seed.wrapping_add(1),
        })),
        "models": results.iter().map(|r| json!({
            "name": r.name,
            "path": r.path,
            "seconds": r.seconds,
            "ppl": r.ppl.map(|p| json!({"ppl": p.ppl(), "nll": p.nll, "tokens": p.tokens, "documents": p.documents})),
            "humaneval": r.humaneval.as_ref().map(|h| json!({
                "pass_at_1": humaneval::pass_at_1(h),
                "passed": h.iter().filter(|p| p.passed).count(),
                "problems": h.len(),
                "results": h,
            })),
            "fim": r.fim.as_ref().map(|(s, res)| json!({"scores": s, "results": res})),
            "latency": r.latency,
        })).collect::<Vec<_>>(),
        "figures": figures,
        "gates": gate_rows,
        "passed": !failed,
    });
    let md = markdown(&results, &gate_rows, &figures, &args);
    write_report(&args.output, &report, &md)?;
    print!("{md}");
    println!("report: {}", args.output.join("report.md").display());
    Ok(if failed {
        Outcome::GateFailed
    } else {
        Outcome::Success
    })
}

/// Draws the figures the results call for; returns their file names.
fn figures(results: &[ModelResult], dir: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    let mut draw = |name: &str, f: &dyn Fn(&Path) -> Result<(), plot::PlotError>| -> Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        f(&tmp)?;
        std::fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("writing {}", dir.join(name).display()))?;
        written.push(name.to_string());
        Ok(())
    };
    let series = |metrics: &[&str]| -> Vec<(String, Vec<f64>)> {
        results
            .iter()
            .map(|r| {
                let v = metrics
                    .iter()
                    .map(|m| r.metric(m).unwrap_or(f64::NAN))
                    .collect();
                (r.name.clone(), v)
            })
            .collect()
    };
    let quality: Vec<(&str, &str)> = [
        ("humaneval", "HumanEval pass@1"),
        ("fim_exact", "FIM exact match"),
        ("fim_accept", "FIM accepted"),
        ("fim_edit_sim", "FIM edit similarity"),
    ]
    .into_iter()
    .filter(|(m, _)| results.iter().any(|r| r.metric(m).is_some()))
    .collect();
    if !quality.is_empty() {
        let labels: Vec<&str> = quality.iter().map(|q| q.1).collect();
        let s = series(&quality.iter().map(|q| q.0).collect::<Vec<_>>());
        draw("quality.svg", &|p| {
            plot::grouped_bars(
                p,
                "Code quality (higher is better)",
                "score",
                Some(1.0),
                &labels,
                &s,
            )
        })?;
    }
    if results.iter().any(|r| r.ppl.is_some()) {
        let s = series(&["ppl"]);
        draw("ppl.svg", &|p| {
            plot::grouped_bars(
                p,
                "Perplexity on held-out code (lower is better)",
                "perplexity",
                None,
                &["perplexity"],
                &s,
            )
        })?;
    }
    if results.iter().any(|r| r.latency.is_some()) {
        let metrics = [
            "ttft_p50_ms",
            "ttft_p95_ms",
            "ttft_p99_ms",
            "latency_p50_ms",
            "latency_p95_ms",
            "latency_p99_ms",
        ];
        let labels = [
            "TTFT p50",
            "TTFT p95",
            "TTFT p99",
            "total p50",
            "total p95",
            "total p99",
        ];
        let s = series(&metrics);
        draw("latency.svg", &|p| {
            plot::grouped_bars(
                p,
                "Latency of 64-token FIM completions",
                "ms",
                None,
                &labels,
                &s,
            )
        })?;
        let totals: Vec<(String, Vec<f64>)> = results
            .iter()
            .filter_map(|r| {
                r.latency.as_ref().map(|l| {
                    (
                        r.name.clone(),
                        l.timings.iter().map(|t| t.total_ms).collect(),
                    )
                })
            })
            .collect();
        draw("latency_cdf.svg", &|p| {
            plot::distribution(p, "Completion time distribution (64 tokens)", "ms", &totals)
        })?;
    }
    Ok(written)
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn markdown(
    results: &[ModelResult],
    gates: &[serde_json::Value],
    figures: &[String],
    args: &EvalArgs,
) -> String {
    let mut s = String::from("# qcoder eval\n\n");
    if let Some(data) = &args.data {
        s.push_str(&format!("Data: `{}`\n\n", data.display()));
    }
    let base = results.first();
    let rel = |r: &ModelResult, m: &str, pct: bool| -> String {
        match (r.metric(m), base.and_then(|b| b.metric(m))) {
            (Some(v), Some(b)) if pct && b != 0.0 => format!("{:+.2}%", (v / b - 1.0) * 100.0),
            (Some(v), Some(b)) if !pct => format!("{:+.3}", v - b),
            _ => "-".into(),
        }
    };
    if results.iter().any(|r| r.ppl.is_some()) {
        s.push_str("## Perplexity\n\n| model | perplexity | vs base | tokens | seconds |\n|---|---|---|---|---|\n");
        for r in results {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} |\n",
                r.name,
                cell(r.metric("ppl"), 4),
                rel(r, "ppl", true),
                r.ppl.map_or("-".into(), |p| p.tokens.to_string()),
                r.seconds
            ));
        }
        s.push('\n');
    }
    if results.iter().any(|r| r.humaneval.is_some()) {
        s.push_str("## HumanEval (pass@1, greedy)\n\n| model | pass@1 | vs base | passed | timed out |\n|---|---|---|---|---|\n");
        for r in results {
            let h = r.humaneval.as_deref().unwrap_or(&[]);
            let timed_out = h
                .iter()
                .filter(|p| p.execution.verdict == crate::eval::sandbox::Verdict::TimedOut)
                .count();
            s.push_str(&format!(
                "| {} | {} | {} | {}/{} | {timed_out} |\n",
                r.name,
                cell(r.metric("humaneval"), 3),
                rel(r, "humaneval", false),
                h.iter().filter(|p| p.passed).count(),
                h.len(),
            ));
        }
        s.push('\n');
    }
    if results.iter().any(|r| r.fim.is_some()) {
        s.push_str("## Fill-in-the-middle\n\n| model | exact match | accepted | edit similarity | vs base (accepted) | samples |\n|---|---|---|---|---|---|\n");
        for r in results {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.name,
                cell(r.metric("fim_exact"), 3),
                cell(r.metric("fim_accept"), 3),
                cell(r.metric("fim_edit_sim"), 3),
                rel(r, "fim_accept", false),
                r.fim.as_ref().map_or(0, |f| f.0.samples),
            ));
        }
        s.push('\n');
    }
    if results.iter().any(|r| r.latency.is_some()) {
        s.push_str("## Latency (64-token FIM completions, batch 1)\n\n| model | TTFT p50 / p95 / p99 ms | total p50 / p95 / p99 ms | prefill tok/s | decode tok/s |\n|---|---|---|---|---|\n");
        for r in results {
            let Some(l) = &r.latency else {
                s.push_str(&format!("| {} | - | - | - | - |\n", r.name));
                continue;
            };
            s.push_str(&format!(
                "| {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {:.0} | {:.1} |\n",
                r.name,
                l.ttft_ms.p50,
                l.ttft_ms.p95,
                l.ttft_ms.p99,
                l.total_ms.p50,
                l.total_ms.p95,
                l.total_ms.p99,
                l.prefill_tokens_per_s,
                l.decode_tokens_per_s
            ));
        }
        s.push('\n');
    }
    if !gates.is_empty() {
        s.push_str(
            "## Gates\n\n| gate | model | value | limit | result |\n|---|---|---|---|---|\n",
        );
        for g in gates {
            s.push_str(&format!(
                "| `{}` | {} | {:.4} | {:.4} | {} |\n",
                g["gate"].as_str().unwrap_or(""),
                g["model"].as_str().unwrap_or(""),
                g["value"].as_f64().unwrap_or(f64::NAN),
                g["limit"].as_f64().unwrap_or(f64::NAN),
                if g["pass"].as_bool() == Some(true) {
                    "pass"
                } else {
                    "FAIL"
                }
            ));
        }
        s.push('\n');
    }
    for f in figures {
        s.push_str(&format!("![{f}]({f})\n"));
    }
    s
}

/// Writes the report files under temporary names, then renames them.
fn write_report(dir: &Path, report: &serde_json::Value, md: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, body) in [
        ("report.json", serde_json::to_string_pretty(report)? + "\n"),
        ("report.md", md.to_string()),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(body.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("writing {}", dir.join(name).display()))?;
    }
    Ok(())
}

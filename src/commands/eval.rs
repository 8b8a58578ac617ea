//! `qcoder eval`: the same held-out code through every model, side by side.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::Outcome;
use crate::cli::EvalArgs;
use crate::data::texts::{read_texts, Split};
use crate::device::{kind_name, parse_device, parse_kind};
use crate::eval::gate::Gate;
use crate::eval::ppl::{document_perplexity, Perplexity};
use crate::model::{self, hub, LoadOptions};
use crate::tokenizer::CodeTokenizer;

const TASKS: &[&str] = &["ppl"];
const METRICS: &[&str] = &["ppl"];
const MAX_TEXT_BYTES: usize = 64 << 20;

struct ModelResult {
    name: String,
    path: PathBuf,
    ppl: Option<Perplexity>,
    seconds: f64,
}

pub fn run(args: EvalArgs) -> Result<Outcome> {
    for task in &args.tasks {
        if !TASKS.contains(&task.as_str()) {
            bail!("unknown task `{task}` (tasks: {})", TASKS.join(", "));
        }
    }
    let gates = args
        .gate
        .iter()
        .map(|g| Gate::parse(g, METRICS))
        .collect::<Result<Vec<_>, _>>()?;
    if gates.iter().any(Gate::needs_base) && args.models.len() < 2 {
        bail!("a gate relative to `base` needs at least two --model (the first is the base)");
    }
    let device = parse_device(&args.device)?;
    let kind = parse_kind(args.dtype.as_deref(), device)?;
    let models: Vec<(String, PathBuf)> = args
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
            model::read_config(&dir)?;
            Ok((name, dir))
        })
        .collect::<Result<_>>()?;
    let mut texts = read_texts(&args.data, Split::Eval, MAX_TEXT_BYTES)?;
    if let Some(limit) = args.limit {
        texts.truncate(limit);
    }
    if texts.is_empty() {
        bail!("{}: the eval data is empty", args.data.display());
    }

    let mut results = Vec::new();
    for (name, dir) in &models {
        let start = std::time::Instant::now();
        let tokenizer = CodeTokenizer::from_model_dir(dir)?;
        let lm = model::load_dir(dir, LoadOptions { device, kind })
            .with_context(|| format!("loading {}", dir.display()))?;
        let mut ppl = None;
        if args.tasks.iter().any(|t| t == "ppl") {
            let docs = texts
                .iter()
                .map(|t| tokenizer.encode(t, false))
                .collect::<Result<Vec<_>, _>>()?;
            let total: u64 = docs.iter().map(|d| d.len() as u64).sum();
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix} ppl [{bar:30}] {pos}/{len} tokens {per_sec} [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(name.clone());
            let mut acc = Perplexity::default();
            for doc in &docs {
                acc.add(document_perplexity(&lm, doc, args.window, args.stride)?);
                bar.inc(doc.len() as u64);
            }
            bar.finish_and_clear();
            ppl = Some(acc);
        }
        results.push(ModelResult {
            name: name.clone(),
            path: dir.clone(),
            ppl,
            seconds: start.elapsed().as_secs_f64(),
        });
    }

    // Gates: every model but the base, or all of them for absolute gates.
    let base_ppl = results.first().and_then(|r| r.ppl.map(|p| p.ppl()));
    let mut gate_rows = Vec::new();
    let mut failed = false;
    for gate in &gates {
        for (i, r) in results.iter().enumerate() {
            if i == 0 && gate.needs_base() {
                continue;
            }
            let value = r.ppl.map(|p| p.ppl()).unwrap_or(f64::NAN);
            if let Some((limit, pass)) = gate.check(value, base_ppl) {
                failed |= !pass;
                gate_rows.push(json!({"gate": gate.text, "model": r.name, "value": value, "limit": limit, "pass": pass}));
            }
        }
    }

    let report = json!({
        "data": args.data,
        "documents": texts.len(),
        "device": crate::device::device_name(device),
        "dtype": kind_name(kind),
        "ppl": {"window": args.window, "stride": args.stride},
        "models": results.iter().map(|r| json!({
            "name": r.name,
            "path": r.path,
            "seconds": r.seconds,
            "ppl": r.ppl.map(|p| json!({"ppl": p.ppl(), "nll": p.nll, "tokens": p.tokens, "documents": p.documents})),
        })).collect::<Vec<_>>(),
        "gates": gate_rows,
        "passed": !failed,
    });
    let md = markdown(&results, &gate_rows, &args);
    write_report(&args.output, &report, &md)?;
    print!("{md}");
    println!("report: {}", args.output.join("report.md").display());
    Ok(if failed {
        Outcome::GateFailed
    } else {
        Outcome::Success
    })
}

fn markdown(results: &[ModelResult], gates: &[serde_json::Value], args: &EvalArgs) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# qcoder eval\n\nData: `{}`\n\n",
        args.data.display()
    ));
    s.push_str("| model | perplexity | vs base | tokens | seconds |\n|---|---|---|---|---|\n");
    let base = results.first().and_then(|r| r.ppl.map(|p| p.ppl()));
    for r in results {
        let (ppl, rel, tokens) = match r.ppl {
            Some(p) => (
                format!("{:.4}", p.ppl()),
                base.map_or("".into(), |b| {
                    format!("{:+.2}%", (p.ppl() / b - 1.0) * 100.0)
                }),
                p.tokens.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        s.push_str(&format!(
            "| {} | {ppl} | {rel} | {tokens} | {:.1} |\n",
            r.name, r.seconds
        ));
    }
    if !gates.is_empty() {
        s.push_str("\n| gate | model | value | limit | result |\n|---|---|---|---|---|\n");
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

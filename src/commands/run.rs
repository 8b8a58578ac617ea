//! `qcoder run pipeline.toml`: import → ingest → finetune → quantize → eval →
//! export as one resumable batch job. Each stage is the qcoder command of the
//! same name, with the stage's table as its flags and its inputs wired to the
//! earlier stages' outputs in the work directory; a stage whose inputs have
//! the same content hash as when it last finished is skipped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use super::Outcome;
use crate::cli::{Cli, Command, RunArgs};
use crate::pipeline::{
    self, fingerprint, hash_parts, hash_path, ModelSource, Pipeline, StageState,
};

/// An input of a stage: an output of an earlier stage (its recorded hash) or
/// something outside the work directory (hashed now).
enum Input {
    Stage(&'static str),
    External(String),
    /// A file the pipeline writes for the stage (the derived recipe).
    Text(String),
}

/// One stage, ready to run: its command line and what it reads and writes.
struct Step {
    name: &'static str,
    argv: Vec<String>,
    inputs: Vec<Input>,
    output: PathBuf,
    /// Files written just before the stage runs.
    files: Vec<(PathBuf, String)>,
    /// The stage continues an interrupted run of itself with `--resume` when
    /// this directory has entries.
    resume_from: Option<PathBuf>,
    /// The part of the output later stages read (default: all of it), whose
    /// content hash they depend on: the fine-tuned model, not the run's
    /// timing metrics.
    consumed: Option<PathBuf>,
}

impl Step {
    /// A stage that writes no extra files, cannot resume and whose whole
    /// output is what later stages read.
    fn new(name: &'static str, argv: Vec<String>, inputs: Vec<Input>, output: PathBuf) -> Self {
        Self {
            name,
            argv,
            inputs,
            output,
            files: Vec::new(),
            resume_from: None,
            consumed: None,
        }
    }
}

fn table_text(p: &Pipeline, name: &str) -> String {
    p.stage(name).map(|t| t.to_string()).unwrap_or_default()
}

fn plan(p: &Pipeline) -> Result<Vec<Step>> {
    let work = &p.work_dir;
    let path_str = |path: &Path| path.to_string_lossy().into_owned();
    let mut steps = Vec::new();

    // The base model: a directory (from the import stage, or given).
    let base: (String, Option<&'static str>) = match &p.model {
        ModelSource::Gguf(file) => {
            if !file.is_file() {
                bail!(
                    "{}: [model] gguf file {} does not exist",
                    p.path.display(),
                    file.display()
                );
            }
            let output = work.join("base");
            let mut argv = vec![
                "import".to_string(),
                path_str(file),
                "-o".into(),
                path_str(&output),
            ];
            argv.extend(p.stage_args("import", &["file", "output"], None, &[])?);
            steps.push(Step::new(
                "import",
                argv,
                vec![Input::External(path_str(file))],
                output.clone(),
            ));
            (path_str(&output), Some("import"))
        }
        ModelSource::Dir(dir) => {
            let local = Path::new(dir);
            if !local.exists() && (local.is_absolute() || dir.starts_with('.')) {
                bail!("{}: [model] path {dir} does not exist", p.path.display());
            }
            (dir.clone(), None)
        }
    };
    let input_of = |(path, stage): &(String, Option<&'static str>)| match stage {
        Some(s) => Input::Stage(s),
        None => Input::External(path.clone()),
    };

    let mut data: Option<(String, Option<&'static str>)> = None;
    if p.stage("ingest").is_some() {
        let output = work.join("data");
        let mut argv = vec!["ingest".to_string()];
        let args = p.stage_args("ingest", &["output", "overwrite"], Some("inputs"), &[])?;
        let sources: Vec<String> = p
            .stage("ingest")
            .and_then(|t| t.get("inputs"))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .map(|s| pipeline::expand(s, &p.path))
                    .collect()
            })
            .transpose()?
            .unwrap_or_default();
        if sources.is_empty() {
            bail!(
                "{}: [ingest] needs inputs = [\"DIR\", ...]",
                p.path.display()
            );
        }
        for source in &sources {
            let remote = source.contains("://") || source.starts_with("git@");
            if !remote && !Path::new(source).exists() {
                bail!(
                    "{}: [ingest] input {source} does not exist",
                    p.path.display()
                );
            }
        }
        argv.extend(args);
        argv.extend(["-o".to_string(), path_str(&output)]);
        steps.push(Step::new(
            "ingest",
            argv,
            sources.into_iter().map(Input::External).collect(),
            output.clone(),
        ));
        data = Some((path_str(&output), Some("ingest")));
    }

    // The model the later stages use: the fine-tuned one when there is a
    // finetune stage, else the base.
    let mut tuned = base.clone();
    if let Some(table) = p.stage("finetune") {
        let output = work.join("finetune");
        let (recipe_path, text) = finetune_recipe(p, table, &base.0, data.as_ref(), &output)?;
        let mut inputs = vec![input_of(&base), Input::Text(text.clone())];
        if let Some(d) = &data {
            inputs.push(input_of(d));
        }
        steps.push(Step {
            name: "finetune",
            argv: vec!["finetune".into(), path_str(&recipe_path)],
            inputs,
            output: output.clone(),
            files: vec![(recipe_path, text)],
            resume_from: Some(output.join("checkpoints")),
            consumed: Some(output.join("merged")),
        });
        tuned = (path_str(&output.join("merged")), Some("finetune"));
    }

    if p.stage("quantize").is_some() {
        let output = work.join("quantized");
        let mut reserved = vec!["model", "output", "overwrite"];
        let mut argv = vec![
            "quantize".to_string(),
            "--model".into(),
            tuned.0.clone(),
            "-o".into(),
            path_str(&output),
        ];
        let mut inputs = vec![input_of(&tuned)];
        if let Some(d) = &data {
            reserved.push("calib");
            argv.extend(["--calib".to_string(), d.0.clone()]);
            inputs.push(input_of(d));
        }
        argv.extend(p.stage_args("quantize", &reserved, None, &[])?);
        steps.push(Step::new("quantize", argv, inputs, output));
    }

    if p.stage("eval").is_some() {
        let output = work.join("report");
        let mut reserved = vec!["model", "output"];
        let mut argv = vec!["eval".to_string(), "-m".into(), format!("base={}", base.0)];
        let mut inputs = vec![input_of(&base)];
        if steps.iter().any(|s| s.name == "finetune") {
            argv.extend(["-m".to_string(), format!("tuned={}", tuned.0)]);
            inputs.push(Input::Stage("finetune"));
        }
        if steps.iter().any(|s| s.name == "quantize") {
            argv.extend([
                "-m".to_string(),
                format!("quantized={}", path_str(&work.join("quantized"))),
            ]);
            inputs.push(Input::Stage("quantize"));
        }
        if let Some(d) = &data {
            reserved.push("data");
            argv.extend(["--data".to_string(), d.0.clone()]);
            inputs.push(input_of(d));
        }
        argv.extend(["-o".to_string(), path_str(&output)]);
        argv.extend(p.stage_args("eval", &reserved, None, &[])?);
        steps.push(Step::new("eval", argv, inputs, output));
    }

    if let Some(table) = p.stage("export") {
        let format = table.get("format").and_then(|v| v.as_str()).unwrap_or("");
        let output = match format {
            "gguf" => {
                let ty = table.get("type").and_then(|v| v.as_str()).unwrap_or("f16");
                work.join(format!("model-{ty}.gguf"))
            }
            "safetensors" => work.join("export"),
            _ => bail!(
                "{}: [export] needs format = \"gguf\" or \"safetensors\"",
                p.path.display()
            ),
        };
        // `source = "quantized"` exports the quantize stage's checkpoint (a
        // 4-bit group-32 GPTQ model keeps its integers in Q4_0/Q4_1).
        let source = match table.get("source").map(|v| v.as_str()) {
            None | Some(Some("model")) => tuned.clone(),
            Some(Some("quantized")) if steps.iter().any(|s| s.name == "quantize") => {
                (path_str(&work.join("quantized")), Some("quantize"))
            }
            Some(Some("quantized")) => bail!(
                "{}: [export] source = \"quantized\" needs a [quantize] stage",
                p.path.display()
            ),
            _ => bail!(
                "{}: [export] source must be \"model\" or \"quantized\"",
                p.path.display()
            ),
        };
        let mut argv = vec![
            "export".to_string(),
            "--model".into(),
            source.0.clone(),
            "-o".into(),
            path_str(&output),
        ];
        argv.extend(p.stage_args("export", &["model", "output"], None, &["source"])?);
        steps.push(Step::new("export", argv, vec![input_of(&source)], output));
    }
    Ok(steps)
}

/// The recipe the finetune stage runs: `[finetune] recipe` with the other
/// tables of `[finetune]` laid over its sections (`[finetune.train]
/// max_steps = 8`), and the model, data and output wired to the pipeline's.
/// Written to `WORK/.qcoder/finetune.recipe.toml` when the stage runs.
fn finetune_recipe(
    p: &Pipeline,
    table: &toml::Table,
    base: &str,
    data: Option<&(String, Option<&'static str>)>,
    output: &Path,
) -> Result<(PathBuf, String)> {
    let file = table
        .get("recipe")
        .and_then(|v| v.as_str())
        .with_context(|| {
            format!(
                "{}: [finetune] needs recipe = \"FILE.toml\"",
                p.path.display()
            )
        })?;
    let file = PathBuf::from(pipeline::expand(file, &p.path)?);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "{} [finetune]: reading the recipe {}",
            p.path.display(),
            file.display()
        )
    })?;
    let mut recipe: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", file.display()))?;
    for (key, value) in table {
        if key == "recipe" {
            continue;
        }
        let toml::Value::Table(over) = value else {
            bail!(
                "{} [finetune] {key}: expected a table such as [finetune.train] laid over the recipe's [train]",
                p.path.display()
            );
        };
        let section = recipe
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section) = section.as_table_mut() else {
            bail!("{}: `{key}` is not a table", file.display());
        };
        for (k, v) in over {
            section.insert(k.clone(), v.clone());
        }
    }
    let absolute = |path: &Path| -> Result<String> {
        Ok(std::path::absolute(path)
            .with_context(|| format!("resolving {}", path.display()))?
            .to_string_lossy()
            .into_owned())
    };
    let mut set = |section: &str, key: &str, value: toml::Value| {
        if let Some(t) = recipe
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
        {
            t.insert(key.to_string(), value);
        }
    };
    let base_path = if Path::new(base).exists() {
        absolute(Path::new(base))?
    } else {
        base.to_string()
    };
    set("model", "path", toml::Value::String(base_path));
    if let Some((dir, _)) = data {
        let dir = absolute(Path::new(dir))?;
        set(
            "data",
            "train",
            toml::Value::Array(vec![toml::Value::String(dir)]),
        );
        // The ingest output's eval split is the held-out set.
        set("data", "eval", toml::Value::Array(Vec::new()));
    }
    set("output", "dir", toml::Value::String(absolute(output)?));
    set("output", "merge", toml::Value::Boolean(true));
    let text = toml::to_string(&recipe).context("writing the derived recipe")?;
    crate::train::recipe::Recipe::parse(&text).map_err(|msg| {
        anyhow::anyhow!(
            "{} [finetune] with the recipe {}: {msg}",
            p.path.display(),
            file.display()
        )
    })?;
    Ok((
        p.work_dir.join(".qcoder").join("finetune.recipe.toml"),
        text,
    ))
}

/// Parses a stage's command line as the command itself would, so a wrong key
/// in any stage stops the job before the first stage runs.
fn parse_stage(p: &Pipeline, name: &str, argv: &[String]) -> Result<Command> {
    let argv = std::iter::once("qcoder".to_string()).chain(argv.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(cli) => Ok(cli.command),
        Err(err) => {
            let text = err.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            bail!(
                "{} [{}]: {first} (keys of a stage table are the long flags of `qcoder {}`; see `qcoder {} --help`)",
                p.path.display(),
                name,
                name,
                name
            )
        }
    }
}

fn input_hash(p: &Pipeline, step: &Step, done: &[StageState]) -> Result<String> {
    let mut parts = vec![
        step.name.to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
        step.argv.join("\u{1f}"),
        table_text(p, step.name),
    ];
    for input in &step.inputs {
        parts.push(match input {
            Input::Stage(s) => done
                .iter()
                .find(|d| d.stage == *s)
                .map(|d| d.output_hash.clone())
                .with_context(|| format!("stage {s} has not run"))?,
            Input::External(path) if Path::new(path).exists() => {
                hash_path(Path::new(path)).with_context(|| format!("hashing {path}"))?
            }
            // A hub id or URL: its name stands for it.
            Input::External(name) => name.clone(),
            Input::Text(text) => text.clone(),
        });
    }
    Ok(hash_parts(&parts))
}

fn remove_stale(path: &Path) -> Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        return Ok(());
    }
    .with_context(|| format!("removing the stale output {}", path.display()))
}

pub fn run(args: RunArgs, threads: Option<i32>) -> Result<Outcome> {
    let p = Pipeline::read(&args.pipeline)?;
    let steps = plan(&p)?;
    if steps.is_empty() {
        bail!("{}: no stages to run", p.path.display());
    }
    let commands = steps
        .iter()
        .map(|step| parse_stage(&p, step.name, &step.argv))
        .collect::<Result<Vec<_>>>()?;
    for name in &args.force {
        if !steps.iter().any(|s| s.name == name) {
            bail!(
                "--force {name}: the pipeline has no such stage (it has: {})",
                steps.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            );
        }
    }
    std::fs::create_dir_all(&p.work_dir)
        .with_context(|| format!("creating the work directory {}", p.work_dir.display()))?;

    let total = steps.len();
    let mut done: Vec<StageState> = Vec::new();
    let mut summary = Vec::new();
    for (i, (step, command)) in steps.iter().zip(commands).enumerate() {
        let header = format!("[{}/{total}] {}", i + 1, step.name);
        let hash = input_hash(&p, step, &done)?;
        let fresh = StageState::up_to_date(&p.work_dir, step.name, &hash);
        let state = match (fresh, command) {
            (Some(state), _) if !args.force.iter().any(|s| s == step.name) => {
                eprintln!(
                    "== {header}: up to date, skipped ({})",
                    state.output.display()
                );
                summary.push((step.name, "skipped", state.seconds));
                state
            }
            (_, command) => {
                StageState::forget(&p.work_dir, step.name)?;
                // A stage that was interrupted with the same inputs continues
                // from its checkpoints; anything else starts clean.
                let marker = p
                    .work_dir
                    .join(".qcoder")
                    .join(format!("{}.running", step.name));
                let same_run = std::fs::read_to_string(&marker).is_ok_and(|h| h == hash);
                let resumable = step.resume_from.as_ref().is_some_and(|dir| {
                    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
                });
                let mut argv = step.argv.clone();
                let command = if same_run && resumable {
                    argv.push("--resume".into());
                    parse_stage(&p, step.name, &argv)?
                } else {
                    remove_stale(&step.output)?;
                    command
                };
                for (path, text) in &step.files {
                    std::fs::create_dir_all(path.parent().expect("a file in the work dir"))
                        .with_context(|| format!("creating {}", path.display()))?;
                    std::fs::write(path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                std::fs::create_dir_all(marker.parent().expect("a file in the work dir"))?;
                std::fs::write(&marker, &hash)
                    .with_context(|| format!("writing {}", marker.display()))?;
                eprintln!("== {header}: qcoder {}", argv.join(" "));
                let start = Instant::now();
                let outcome = super::dispatch(command, threads)
                    .with_context(|| format!("pipeline stage {}", step.name))?;
                let state = StageState {
                    stage: step.name.to_string(),
                    input_hash: hash,
                    output_hash: hash_path(step.consumed.as_ref().unwrap_or(&step.output))?,
                    output: step.output.clone(),
                    files: fingerprint(&step.output)?,
                    passed: outcome == Outcome::Success,
                    seconds: start.elapsed().as_secs_f64(),
                    command: argv,
                };
                state.save(&p.work_dir)?;
                let _ = std::fs::remove_file(&marker);
                summary.push((step.name, "ran", state.seconds));
                state
            }
        };
        let passed = state.passed;
        done.push(state);
        if !passed {
            eprintln!(
                "== {}: a quality gate failed (see {}); later stages do not run",
                step.name,
                step.output.display()
            );
            print_summary(&summary);
            return Ok(Outcome::GateFailed);
        }
    }
    print_summary(&summary);
    eprintln!("== outputs in {}", p.work_dir.display());
    Ok(Outcome::Success)
}

fn print_summary(summary: &[(&str, &str, f64)]) {
    eprintln!("== stage      status   seconds");
    for (name, status, seconds) in summary {
        eprintln!("   {name:<10} {status:<8} {seconds:>8.1}");
    }
}

//! `qcoder ingest INPUT... -o OUT_DIR`: resolve inputs (cloning URLs), run
//! the pipeline in a staging directory, then move it into place.
//! Also the ingest side of `qcoder inspect`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arrow_array::Array;
use indicatif::{ProgressBar, ProgressStyle};

use super::Outcome;
use crate::cli::{DedupArg, IngestArgs, SplitByArg};
use crate::data::dataset::DatasetFormat;
use crate::data::filter::FilterConfig;
use crate::data::git;
use crate::data::languages::LanguageTable;
use crate::data::pipeline::{self, DedupMode, IngestConfig, Input, Progress, SplitBy};
use crate::data::shards;
use crate::data::stats::{Stats, STATS_FILE};
use crate::data::walk::WalkOptions;
use crate::model::hub;
use crate::tokenizer::CodeTokenizer;

pub fn run(args: IngestArgs, threads: Option<i32>) -> Result<Outcome> {
    let out_dir = args.output.clone();
    check_output(&out_dir, args.overwrite)?;
    let table = match &args.language_table {
        Some(path) => LanguageTable::from_file(path)?,
        None => LanguageTable::builtin(),
    };
    let tokenizer = args.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let config = config_from(&args);
    config.validate(&table)?;

    // Clones live until the run ends; their directories go with them.
    let mut clones = Vec::new();
    let mut inputs = Vec::with_capacity(args.inputs.len());
    for input in &args.inputs {
        if git::is_url(input) {
            eprintln!("cloning {input}");
            let clone = git::clone(input, Duration::from_secs(args.clone_timeout))?;
            inputs.push(Input::Dir {
                path: clone.path.clone(),
                name: Some(clone.name.clone()),
            });
            clones.push(clone);
        } else {
            inputs.push(resolve_local(Path::new(input))?);
        }
    }

    let staging = Staging::create(&out_dir)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.map_or(0, |t| t.max(1) as usize))
        .build()
        .context("starting the worker threads")?;
    let bar = progress_bar();
    let started = std::time::Instant::now();
    let mut on_progress = |p: Progress| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{} files ({:.0}/s), {:.1} MB read ({:.1} MB/s), {} kept",
            p.files,
            p.files as f64 / secs,
            p.bytes_read as f64 / 1e6,
            p.bytes_read as f64 / 1e6 / secs,
            p.kept
        ));
    };
    let result = pool.install(|| {
        pipeline::run(
            &config,
            &table,
            tokenizer.as_ref(),
            &inputs,
            staging.path(),
            &mut on_progress,
        )
    });
    bar.finish_and_clear();
    let mut stats = result.context("ingest failed")?;
    drop(clones);

    stats.qcoder_version = env!("CARGO_PKG_VERSION").to_string();
    stats.inputs = args.inputs.clone();
    stats.config = serde_json::to_value(&config).context("recording the configuration")?;
    let stats_json = serde_json::to_string_pretty(&stats).context("serialising stats.json")?;
    let stats_path = staging.path().join(STATS_FILE);
    std::fs::write(&stats_path, stats_json + "\n")
        .with_context(|| format!("writing {}", stats_path.display()))?;
    staging.commit(&out_dir, args.overwrite)?;

    let mut out = std::io::stdout().lock();
    let printed = print_summary(&stats, &out_dir, &mut out);
    if let Err(e) = printed {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("printing the summary");
        }
    }
    for warning in &stats.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(Outcome::Success)
}

fn config_from(args: &IngestArgs) -> IngestConfig {
    IngestConfig {
        filters: FilterConfig {
            max_file_size: args.max_file_size,
            max_line_len: args.max_line_length,
            max_mean_line_len: args.max_mean_line_length,
            min_alnum_frac: args.min_alnum_fraction,
            drop_generated: !args.keep_generated,
            drop_minified: !args.keep_minified,
        },
        walk: WalkOptions {
            include_hidden: args.include_hidden,
            include_vendored: args.include_vendored,
            respect_gitignore: !args.no_gitignore,
            follow_symlinks: args.follow_symlinks,
        },
        include_data: args.include_data,
        languages: args.languages.clone(),
        dedup: match args.dedup {
            DedupArg::None => DedupMode::None,
            DedupArg::Exact => DedupMode::Exact,
            DedupArg::Near => DedupMode::Near,
        },
        near_threshold: args.near_threshold,
        num_perm: args.num_perm,
        shingle_size: args.shingle_size,
        redact_emails: !args.keep_emails,
        eval_fraction: args.eval_fraction,
        split_by: match args.split_by {
            SplitByArg::Repo => SplitBy::Repo,
            SplitByArg::File => SplitBy::File,
        },
        split_seed: args.split_seed,
        shard_bytes: args.shard_size,
    }
}

fn load_tokenizer(spec: &str) -> Result<CodeTokenizer> {
    let path = Path::new(spec);
    let tokenizer = if path.is_file() {
        CodeTokenizer::from_file(path)?
    } else if path.is_dir() {
        CodeTokenizer::from_model_dir(path)?
    } else {
        let dir = hub::resolve_model_dir(spec).with_context(|| format!("--tokenizer {spec}"))?;
        CodeTokenizer::from_model_dir(&dir)?
    };
    Ok(tokenizer)
}

fn resolve_local(path: &Path) -> Result<Input> {
    let meta = std::fs::metadata(path).with_context(|| format!("input {}", path.display()))?;
    if meta.is_dir() {
        // An unreadable input is an error; unreadable files inside it are skips.
        std::fs::read_dir(path)
            .with_context(|| format!("cannot read input directory {}", path.display()))?;
        return Ok(Input::Dir {
            path: path.to_path_buf(),
            name: None,
        });
    }
    let Some(format) = DatasetFormat::of(path) else {
        bail!(
            "input {} is a file but not a dataset (.jsonl, .jsonl.gz or .parquet); \
             to ingest source files, pass their directory",
            path.display()
        );
    };
    Ok(Input::Dataset {
        path: path.to_path_buf(),
        format,
    })
}

/// An existing OUT_DIR is refused unless --overwrite, and even then only if
/// it is empty or holds an earlier ingest output: --overwrite must never
/// delete someone's source tree.
fn check_output(out_dir: &Path, overwrite: bool) -> Result<()> {
    if !out_dir.exists() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "output directory {} already exists (pass --overwrite to replace it)",
            out_dir.display()
        );
    }
    if !out_dir.is_dir() {
        bail!("output {} exists and is not a directory", out_dir.display());
    }
    let is_empty = std::fs::read_dir(out_dir)
        .with_context(|| format!("reading {}", out_dir.display()))?
        .next()
        .is_none();
    if !is_empty && !out_dir.join(STATS_FILE).is_file() {
        bail!(
            "refusing to overwrite {}: it is not an ingest output (no {STATS_FILE})",
            out_dir.display()
        );
    }
    Ok(())
}

/// A hidden sibling of OUT_DIR that the run writes into; removed if the
/// run fails, renamed to OUT_DIR when it succeeds. A killed run leaves it
/// behind, but never a Parquet file at a final name.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(out_dir: &Path) -> Result<Self> {
        let parent = match out_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let name = out_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ingest".into());
        let path = parent.join(format!(".{name}.ingest-tmp-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn commit(mut self, out_dir: &Path, overwrite: bool) -> Result<()> {
        let old = if overwrite && out_dir.exists() {
            let old = self.path.with_file_name(
                self.path
                    .file_name()
                    .map(|n| n.to_string_lossy().replace("ingest-tmp", "ingest-old"))
                    .unwrap_or_default(),
            );
            std::fs::rename(out_dir, &old)
                .with_context(|| format!("moving the old {} aside", out_dir.display()))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&self.path, out_dir).with_context(|| {
            format!("renaming {} to {}", self.path.display(), out_dir.display())
        })?;
        self.committed = true;
        if let Some(old) = old {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing the old output {}", old.display()))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
        bar.set_style(style);
    }
    bar.set_message("walking inputs");
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The end-of-run report: per-language table, drops, secrets, splits.
pub fn print_summary(stats: &Stats, out_dir: &Path, out: &mut impl Write) -> std::io::Result<()> {
    let mb = |b: u64| b as f64 / 1e6;
    writeln!(out, "output       {}", out_dir.display())?;
    writeln!(
        out,
        "files        {} seen, {} kept, {} dropped",
        stats.files.seen, stats.files.kept, stats.files.dropped
    )?;
    writeln!(
        out,
        "bytes        {:.1} MB read, {:.1} MB kept",
        mb(stats.bytes.read),
        mb(stats.bytes.kept)
    )?;
    if let Some(total) = stats.timings_s.get("total") {
        writeln!(
            out,
            "time         {total:.2} s ({:.1} MB/s, {:.0} files/s)",
            stats.throughput.mb_per_s, stats.throughput.files_per_s
        )?;
    }
    if let Some(nd) = &stats.near_dedup {
        writeln!(
            out,
            "near-dedup   MinHash {} perms, {}-token shingles, Jaccard ≥ {} → LSH {} bands × {} rows",
            nd.num_perm, nd.shingle_size, nd.threshold, nd.bands, nd.rows
        )?;
    }
    for (name, split) in &stats.splits {
        writeln!(
            out,
            "{:<12} {} files, {:.1} MB, {} repos, {}",
            name,
            split.files,
            mb(split.bytes),
            split.repos,
            split.shards.join(", ")
        )?;
    }
    if !stats.dropped.is_empty() {
        writeln!(out, "\ndropped")?;
        for (reason, count) in &stats.dropped {
            writeln!(
                out,
                "  {reason:<22} {:>9} files {:>10.2} MB",
                count.files,
                mb(count.bytes)
            )?;
        }
    }
    let secrets: Vec<String> = stats
        .secrets
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    writeln!(
        out,
        "\nredacted     {} (in {} files)",
        if secrets.is_empty() {
            "nothing".to_string()
        } else {
            secrets.join(", ")
        },
        stats.files_with_secrets
    )?;
    if !stats.languages.is_empty() {
        let width = stats
            .languages
            .keys()
            .map(|k| k.len())
            .max()
            .unwrap_or(8)
            .max(8);
        writeln!(
            out,
            "\n{:<width$} {:>9} {:>10} {:>7} {:>9} {:>7}",
            "language", "files", "MB", "%bytes", "train", "eval"
        )?;
        let mut langs: Vec<_> = stats.languages.iter().collect();
        langs.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0)));
        for (name, l) in langs {
            writeln!(
                out,
                "{:<width$} {:>9} {:>10.2} {:>6.1}% {:>9} {:>7}",
                name,
                l.files,
                mb(l.bytes),
                100.0 * l.bytes as f64 / stats.bytes.kept.max(1) as f64,
                l.train_files,
                l.eval_files
            )?;
        }
    }
    Ok(())
}

/// `qcoder inspect OUT_DIR`: the stats and the first rows of the first shard.
pub fn inspect_dir(dir: &Path, out: &mut impl Write) -> Result<()> {
    let stats = Stats::read(&dir.join(STATS_FILE))?;
    print_summary(&stats, dir, out)?;
    for warning in &stats.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    let first = stats
        .splits
        .get("train")
        .and_then(|s| s.shards.first())
        .or_else(|| stats.splits.get("eval").and_then(|s| s.shards.first()));
    if let Some(shard) = first {
        writeln!(out)?;
        inspect_parquet(&dir.join(shard), out)?;
    }
    Ok(())
}

/// Rows shown by `inspect`, and lines of `content` shown per row.
const INSPECT_ROWS: usize = 3;
const INSPECT_LINES: usize = 4;

/// `qcoder inspect FILE.parquet`: schema, row count and the first rows.
pub fn inspect_parquet(path: &Path, out: &mut impl Write) -> Result<()> {
    let head = shards::read_head(path, INSPECT_ROWS)?;
    writeln!(
        out,
        "file         {} ({} rows, {} row groups)",
        path.display(),
        head.rows,
        head.row_groups
    )?;
    let columns: Vec<String> = head
        .schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect();
    writeln!(out, "columns      {}", columns.join(", "))?;
    let Some(batch) = head.batch else {
        return Ok(());
    };
    for row in 0..batch.num_rows() {
        writeln!(out, "\n--- row {row}")?;
        for (field, column) in head.schema.fields().iter().zip(batch.columns()) {
            let value = shards::display_value(column.as_ref(), row);
            if field.name() == "content" {
                let lines: Vec<&str> = value.lines().take(INSPECT_LINES).collect();
                writeln!(
                    out,
                    "{:<14} | {}",
                    field.name(),
                    lines.first().copied().unwrap_or("")
                )?;
                for line in lines.iter().skip(1) {
                    writeln!(out, "{:<14} | {line}", "")?;
                }
                if value.lines().count() > INSPECT_LINES {
                    writeln!(out, "{:<14} | ...", "")?;
                }
            } else if !column.is_null(row) || field.name() != "n_tokens" {
                writeln!(out, "{:<14} {value}", field.name())?;
            }
        }
    }
    Ok(())
}

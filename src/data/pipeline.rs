//! The ingest pipeline: inputs → items → (parallel) read, filter, redact,
//! hash → (in input order) dedup, split → (writer thread) Parquet shards.
//!
//! Memory is bounded by the batch size, the writer's queue and the dedup
//! indexes (hashes only): a corpus larger than RAM streams through.
//! Items are judged in parallel but dedup and split decisions are made in
//! input order, so results do not depend on the thread count.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::dataset::{DatasetError, DatasetFormat, DatasetReader};
use super::dedup::{self, ExactIndex, LshIndex, LshParams, MinHashError, MinHasher};
use super::filter::{looks_binary, DropReason, FilterConfig, TextMetrics};
use super::languages::{LanguageId, LanguageTable};
use super::secrets::{Redactor, SecretCounts, SecretKind};
use super::shards::{Row, ShardError, ShardWriter, SplitFiles};
use super::stats::{LanguageStats, NearDedupParams, SplitStats, Stats};
use super::walk::{DirWalk, FileItem, Item, RecordItem, Selection, SkipItem, WalkOptions};
use crate::tokenizer::CodeTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    MinHash(#[from] MinHashError),
    #[error("{path}: tokenizing: {msg}")]
    Tokenize { path: String, msg: String },
    #[error("--eval-fraction must be in [0, 1], got {0}")]
    EvalFraction(f64),
    #[error("--languages: unknown language {name:?} (known: {known})")]
    UnknownLanguage { name: String, known: String },
    #[error("the Parquet writer thread stopped unexpectedly")]
    WriterGone,
    #[error("starting the Parquet writer thread: {0}")]
    WriterThread(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    None,
    Exact,
    /// Exact, then MinHash LSH.
    Near,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitBy {
    Repo,
    File,
}

#[derive(Debug, Clone, Serialize)]
pub struct IngestConfig {
    pub filters: FilterConfig,
    pub walk: WalkOptions,
    pub include_data: bool,
    /// Language names to keep (all when empty).
    pub languages: Vec<String>,
    pub dedup: DedupMode,
    pub near_threshold: f64,
    pub num_perm: usize,
    pub shingle_size: usize,
    pub redact_emails: bool,
    pub eval_fraction: f64,
    pub split_by: SplitBy,
    pub split_seed: u64,
    pub shard_bytes: u64,
}

impl IngestConfig {
    /// Checks the options that could otherwise fail only after inputs were
    /// cloned or half the corpus read; returns the `--languages` ids.
    pub fn validate(&self, table: &LanguageTable) -> Result<Option<Vec<LanguageId>>, IngestError> {
        if !(0.0..=1.0).contains(&self.eval_fraction) {
            return Err(IngestError::EvalFraction(self.eval_fraction));
        }
        if self.dedup == DedupMode::Near {
            MinHasher::new(self.num_perm, self.shingle_size)?;
            LshParams::optimal(self.near_threshold, self.num_perm)?;
        }
        if self.languages.is_empty() {
            return Ok(None);
        }
        let ids = self.languages.iter().map(|name| {
            table
                .id_of(name)
                .ok_or_else(|| IngestError::UnknownLanguage {
                    name: name.clone(),
                    known: table
                        .languages()
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        });
        Ok(Some(ids.collect::<Result<Vec<_>, _>>()?))
    }
}

/// One input, resolved by the command (URLs already cloned).
#[derive(Debug, Clone)]
pub enum Input {
    Dir {
        path: PathBuf,
        name: Option<String>,
    },
    Dataset {
        path: PathBuf,
        format: DatasetFormat,
    },
}

/// Progress after each batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub files: u64,
    pub bytes_read: u64,
    pub kept: u64,
}

/// Items per parallel batch, and the bytes (by size on disk) that close a
/// batch early: enough work for every thread, little enough to bound memory.
const BATCH_ITEMS: usize = 512;
const BATCH_BYTES: u64 = 64 << 20;
/// Batches of rows queued for the writer thread.
const WRITER_QUEUE: usize = 4;
const EXAMPLES_PER_REASON: usize = 5;

/// The outcome of judging one item.
enum Judged {
    Dropped {
        reason: DropReason,
        bytes: u64,
        /// Whether `bytes` were read (and count towards throughput).
        read: bool,
        path: String,
        detail: Option<String>,
    },
    Kept(Box<Candidate>),
}

struct Candidate {
    row: Row,
    bytes_read: u64,
    exact_key: u128,
    band_keys: Option<Vec<u64>>,
    secrets: SecretCounts,
}

/// CPU time per stage, summed over threads. Measured with the thread CPU
/// clock, so a busy machine does not inflate a stage.
#[derive(Default)]
struct StageClock {
    read: AtomicU64,
    filter: AtomicU64,
    redact: AtomicU64,
    minhash: AtomicU64,
    sha256: AtomicU64,
    tokenize: AtomicU64,
}

fn lap(counter: &AtomicU64, since: &mut u64) {
    let now = thread_cpu_ns();
    counter.fetch_add(now.saturating_sub(*since), Ordering::Relaxed);
    *since = now;
}

/// CPU nanoseconds used by the calling thread.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Everything the parallel stage reads.
struct Judge<'a> {
    config: &'a IngestConfig,
    table: &'a LanguageTable,
    selection: Selection,
    redactor: Redactor,
    minhasher: Option<MinHasher>,
    lsh: Option<LshParams>,
    tokenizer: Option<&'a CodeTokenizer>,
    language_names: Vec<Arc<str>>,
    unknown_language: Arc<str>,
    clock: StageClock,
}

impl Judge<'_> {
    fn judge(&self, item: Item, scratch: &mut Vec<u32>) -> Result<Judged, IngestError> {
        match item {
            Item::Skip(SkipItem {
                reason,
                path,
                bytes,
                detail,
            }) => Ok(Judged::Dropped {
                reason,
                bytes,
                read: false,
                path,
                detail,
            }),
            Item::File(file) => self.judge_file(file, scratch),
            Item::Record(record) => self.judge_record(record, scratch),
        }
    }

    fn judge_file(&self, file: FileItem, scratch: &mut Vec<u32>) -> Result<Judged, IngestError> {
        let mut t = thread_cpu_ns();
        let path = file.abs_path.display().to_string();
        let drop = |reason, bytes, detail| {
            Ok(Judged::Dropped {
                reason,
                bytes,
                read: reason != DropReason::Unreadable,
                path: path.clone(),
                detail,
            })
        };
        let max = self.config.filters.max_file_size;
        let bytes = match read_at_most(&file.abs_path, max.saturating_add(1)) {
            Ok(b) => b,
            Err(e) => return drop(DropReason::Unreadable, 0, Some(e.to_string())),
        };
        lap(&self.clock.read, &mut t);
        let n = bytes.len() as u64;
        // The file may have changed since the walk looked at it.
        if n > max {
            return drop(DropReason::TooLarge, n, None);
        }
        if n == 0 {
            return drop(DropReason::Empty, 0, None);
        }
        if looks_binary(&bytes) {
            return drop(DropReason::Binary, n, None);
        }
        let language = match file.language {
            Some(id) => id,
            None => match self.table.by_shebang(&bytes) {
                Some(id) => {
                    if let Some(reason) = self.selection.reject_language(self.table, id) {
                        return drop(reason, n, None);
                    }
                    id
                }
                None => return drop(DropReason::UnknownLanguage, n, None),
            },
        };
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => return drop(DropReason::NonUtf8, n, None),
        };
        let language = self.language_names[language as usize].clone();
        self.judge_text(file.repo, file.rel_path, language, text, n, scratch, t)
    }

    fn judge_record(
        &self,
        record: RecordItem,
        scratch: &mut Vec<u32>,
    ) -> Result<Judged, IngestError> {
        let t = thread_cpu_ns();
        let n = record.content.len() as u64;
        let dropped = |reason| {
            Ok(Judged::Dropped {
                reason,
                bytes: n,
                read: true,
                path: format!("{}/{}", record.repo.name, record.path),
                detail: None,
            })
        };
        if n > self.config.filters.max_file_size {
            return dropped(DropReason::TooLarge);
        }
        if n == 0 {
            return dropped(DropReason::Empty);
        }
        if looks_binary(record.content.as_bytes()) {
            return dropped(DropReason::Binary);
        }
        // The dataset's own label first, then the path, then a shebang;
        // records stay even when none says (the dataset chose them).
        let file_name = record.path.rsplit('/').next().unwrap_or(&record.path);
        let id: Option<LanguageId> = record
            .language
            .as_deref()
            .and_then(|l| self.table.id_of(l))
            .or_else(|| self.table.by_path(file_name))
            .or_else(|| self.table.by_shebang(record.content.as_bytes()));
        let language: Arc<str> = match (id, &record.language) {
            (Some(id), _) => {
                if let Some(reason) = self.selection.reject_language(self.table, id) {
                    return dropped(reason);
                }
                self.language_names[id as usize].clone()
            }
            (None, _) if self.selection.languages.is_some() => {
                return dropped(DropReason::LanguageNotSelected)
            }
            (None, Some(label)) => Arc::from(label.as_str()),
            (None, None) => self.unknown_language.clone(),
        };
        self.judge_text(
            record.repo,
            record.path,
            language,
            record.content,
            n,
            scratch,
            t,
        )
    }

    /// The checks shared by files and records, on valid UTF-8 text.
    #[allow(clippy::too_many_arguments)]
    fn judge_text(
        &self,
        repo: Arc<super::walk::Repo>,
        path: String,
        language: Arc<str>,
        mut text: String,
        bytes_read: u64,
        scratch: &mut Vec<u32>,
        mut t: u64,
    ) -> Result<Judged, IngestError> {
        if text.starts_with('\u{feff}') {
            text.drain(..'\u{feff}'.len_utf8());
        }
        let file_name = path.rsplit('/').next().unwrap_or(&path);
        let mut metrics = TextMetrics::of(&text);
        if let Err(reason) = self.config.filters.check(file_name, &text, &metrics) {
            return Ok(Judged::Dropped {
                reason,
                bytes: bytes_read,
                read: true,
                path: format!("{}/{}", repo.name, path),
                detail: None,
            });
        }
        lap(&self.clock.filter, &mut t);
        let mut secrets = SecretCounts::default();
        let redacted = self.redactor.redact(&text, &mut secrets);
        let content = match redacted {
            std::borrow::Cow::Borrowed(_) => text,
            std::borrow::Cow::Owned(changed) => {
                metrics = TextMetrics::of(&changed);
                changed
            }
        };
        lap(&self.clock.redact, &mut t);
        let exact_key = if self.config.dedup == DedupMode::None {
            0
        } else {
            dedup::exact_key(&content)
        };
        let band_keys = match (&self.minhasher, &self.lsh) {
            (Some(mh), Some(lsh)) => {
                mh.shingle_hashes(&content, scratch);
                mh.signature(scratch).map(|sig| lsh.band_keys(&sig))
            }
            _ => None,
        };
        lap(&self.clock.minhash, &mut t);
        let sha256 = hex(&Sha256::digest(content.as_bytes()));
        lap(&self.clock.sha256, &mut t);
        let n_tokens = match self.tokenizer {
            Some(tok) => {
                let ids = tok
                    .encode(&content, false)
                    .map_err(|e| IngestError::Tokenize {
                        path: format!("{}/{}", repo.name, path),
                        msg: e.to_string(),
                    })?;
                lap(&self.clock.tokenize, &mut t);
                Some(ids.len() as i64)
            }
            None => None,
        };
        Ok(Judged::Kept(Box::new(Candidate {
            row: Row {
                repo: repo.name.clone(),
                path,
                language,
                license: repo.license.clone(),
                content,
                n_tokens,
                sha256,
                metrics,
            },
            bytes_read,
            exact_key,
            band_keys,
            secrets,
        })))
    }
}

/// Reads up to `limit` bytes: enough to tell a file is too large without
/// reading all of a multi-gigabyte one.
fn read_at_most(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let hint = file.metadata().map(|m| m.len().min(limit)).unwrap_or(0);
    let mut buf = Vec::with_capacity(hint as usize);
    file.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Eval,
}

/// The sequential half: dedup indexes, split, statistics.
struct Ledger {
    dedup: DedupMode,
    exact: ExactIndex,
    lsh: Option<LshIndex>,
    eval_fraction: f64,
    split_by: SplitBy,
    split_seed: u64,
    stats: Stats,
    secret_counts: SecretCounts,
    repos: [HashSet<Arc<str>>; 2],
    dedup_nanos: u64,
}

impl Ledger {
    fn split_of(&self, row: &Row) -> Split {
        let key = match self.split_by {
            SplitBy::Repo => row.repo.to_string(),
            SplitBy::File => format!("{}/{}", row.repo, row.path),
        };
        let h = twox_hash::XxHash3_64::oneshot_with_seed(self.split_seed, key.as_bytes());
        // Top 53 bits as a uniform number in [0, 1).
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.eval_fraction {
            Split::Eval
        } else {
            Split::Train
        }
    }

    fn drop(&mut self, reason: DropReason, bytes: u64, path: String, detail: Option<String>) {
        let name = reason.name().to_string();
        let count = self.stats.dropped.entry(name.clone()).or_default();
        count.files += 1;
        count.bytes += bytes;
        self.stats.files.dropped += 1;
        let examples = self.stats.drop_examples.entry(name).or_default();
        if examples.len() < EXAMPLES_PER_REASON {
            examples.push(match detail {
                Some(d) => format!("{path}: {d}"),
                None => path,
            });
        }
    }

    /// Takes one batch's judgements in input order; returns the rows to write.
    fn absorb(&mut self, judged: Vec<Judged>, progress: &mut Progress) -> (Vec<Row>, Vec<Row>) {
        let t = thread_cpu_ns();
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for j in judged {
            self.stats.files.seen += 1;
            progress.files += 1;
            match j {
                Judged::Dropped {
                    reason,
                    bytes,
                    read,
                    path,
                    detail,
                } => {
                    if read {
                        self.stats.bytes.read += bytes;
                        progress.bytes_read += bytes;
                    }
                    self.drop(reason, bytes, path, detail)
                }
                Judged::Kept(c) => {
                    self.stats.bytes.read += c.bytes_read;
                    progress.bytes_read += c.bytes_read;
                    let size = c.row.content.len() as u64;
                    let label = || format!("{}/{}", c.row.repo, c.row.path);
                    if self.dedup != DedupMode::None && self.exact.is_duplicate(c.exact_key) {
                        self.drop(DropReason::ExactDuplicate, size, label(), None);
                        continue;
                    }
                    if let (Some(lsh), Some(keys)) = (&mut self.lsh, &c.band_keys) {
                        if lsh.is_near_duplicate(keys) {
                            self.drop(DropReason::NearDuplicate, size, label(), None);
                            continue;
                        }
                    }
                    self.keep(*c, &mut train, &mut eval);
                    progress.kept += 1;
                }
            }
        }
        self.dedup_nanos += thread_cpu_ns().saturating_sub(t);
        (train, eval)
    }

    fn keep(&mut self, c: Candidate, train: &mut Vec<Row>, eval: &mut Vec<Row>) {
        let split = self.split_of(&c.row);
        let size = c.row.content.len() as u64;
        let stats = &mut self.stats;
        stats.files.kept += 1;
        stats.bytes.kept += size;
        if c.secrets.iter().any(|&n| n > 0) {
            stats.files_with_secrets += 1;
        }
        for (total, n) in self.secret_counts.iter_mut().zip(c.secrets) {
            *total += n;
        }
        let lang: &mut LanguageStats = stats
            .languages
            .entry(c.row.language.to_string())
            .or_default();
        lang.files += 1;
        lang.bytes += size;
        let (name, rows, repos) = match split {
            Split::Train => {
                lang.train_files += 1;
                ("train", train, &mut self.repos[0])
            }
            Split::Eval => {
                lang.eval_files += 1;
                ("eval", eval, &mut self.repos[1])
            }
        };
        let s: &mut SplitStats = stats.splits.entry(name.to_string()).or_default();
        s.files += 1;
        s.bytes += size;
        if !repos.contains(&c.row.repo) {
            repos.insert(c.row.repo.clone());
        }
        rows.push(c.row);
    }
}

/// What the writer thread returns: the train and eval shards and its CPU seconds.
type WriterResult = Result<(SplitFiles, SplitFiles, f64), ShardError>;

/// The writer thread: one shard writer per split.
struct Writer {
    queue: Option<SyncSender<(Split, Vec<Row>)>>,
    thread: Option<JoinHandle<WriterResult>>,
}

impl Writer {
    fn start(dir: &Path, with_tokens: bool, shard_bytes: u64) -> Result<Self, IngestError> {
        let (tx, rx) = sync_channel::<(Split, Vec<Row>)>(WRITER_QUEUE);
        let mut train = ShardWriter::new(dir, "train", with_tokens, shard_bytes);
        let mut eval = ShardWriter::new(dir, "eval", with_tokens, shard_bytes);
        let thread = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || {
                for (split, rows) in rx {
                    match split {
                        Split::Train => train.write(&rows)?,
                        Split::Eval => eval.write(&rows)?,
                    }
                }
                let files = (train.finish()?, eval.finish()?);
                // The thread only writes: its CPU time is the write stage.
                Ok((files.0, files.1, thread_cpu_ns() as f64 * 1e-9))
            });
        Ok(Writer {
            queue: Some(tx),
            thread: Some(thread.map_err(IngestError::WriterThread)?),
        })
    }

    fn send(&mut self, split: Split, rows: Vec<Row>) -> Result<(), IngestError> {
        if rows.is_empty() {
            return Ok(());
        }
        let sent = self.queue.as_ref().map(|q| q.send((split, rows)).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The thread quit: its error says why.
        match self.finish() {
            Err(e) => Err(e),
            Ok(_) => Err(IngestError::WriterGone),
        }
    }

    fn finish(&mut self) -> Result<(SplitFiles, SplitFiles, f64), IngestError> {
        self.queue = None;
        let thread = self.thread.take().ok_or(IngestError::WriterGone)?;
        match thread.join() {
            Ok(result) => Ok(result?),
            Err(_) => Err(IngestError::WriterGone),
        }
    }
}

type ItemIter<'a> = Box<dyn Iterator<Item = Result<Item, IngestError>> + Send + 'a>;

/// The next batch of items: up to `BATCH_ITEMS`, or fewer once their size
/// on disk reaches `BATCH_BYTES`; empty when the inputs are exhausted.
fn next_batch(
    items: &mut impl Iterator<Item = Result<Item, IngestError>>,
    walk_nanos: &AtomicU64,
) -> Result<Vec<Item>, IngestError> {
    let t = thread_cpu_ns();
    let mut batch = Vec::with_capacity(BATCH_ITEMS);
    let mut bytes = 0u64;
    while batch.len() < BATCH_ITEMS && bytes < BATCH_BYTES {
        let Some(item) = items.next() else { break };
        let item = item?;
        bytes += match &item {
            Item::File(f) => f.size,
            Item::Record(r) => r.content.len() as u64,
            Item::Skip(_) => 0,
        };
        batch.push(item);
    }
    walk_nanos.fetch_add(thread_cpu_ns().saturating_sub(t), Ordering::Relaxed);
    Ok(batch)
}

/// Runs the pipeline, writing shards into `staging` (which the caller
/// renames into place). Call inside the rayon pool that should do the work.
pub fn run(
    config: &IngestConfig,
    table: &LanguageTable,
    tokenizer: Option<&CodeTokenizer>,
    inputs: &[Input],
    staging: &Path,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Stats, IngestError> {
    let started = Instant::now();
    let selection = Selection {
        max_file_size: config.filters.max_file_size,
        include_data: config.include_data,
        languages: config.validate(table)?,
    };
    let (minhasher, lsh_params) = if config.dedup == DedupMode::Near {
        (
            Some(MinHasher::new(config.num_perm, config.shingle_size)?),
            Some(LshParams::optimal(config.near_threshold, config.num_perm)?),
        )
    } else {
        (None, None)
    };
    let judge = Judge {
        config,
        table,
        selection: selection.clone(),
        redactor: Redactor::new(config.redact_emails),
        minhasher,
        lsh: lsh_params,
        tokenizer,
        language_names: table
            .languages()
            .iter()
            .map(|l| Arc::from(l.name.as_str()))
            .collect(),
        unknown_language: Arc::from("unknown"),
        clock: StageClock::default(),
    };
    let mut ledger = Ledger {
        dedup: config.dedup,
        exact: ExactIndex::default(),
        lsh: lsh_params.map(LshIndex::new),
        eval_fraction: config.eval_fraction,
        split_by: config.split_by,
        split_seed: config.split_seed,
        stats: Stats::default(),
        secret_counts: SecretCounts::default(),
        repos: [HashSet::new(), HashSet::new()],
        dedup_nanos: 0,
    };
    let mut writer = Writer::start(staging, tokenizer.is_some(), config.shard_bytes)?;
    let mut progress = Progress::default();
    let walk_nanos = AtomicU64::new(0);
    let mut items = inputs.iter().flat_map(|input| -> ItemIter<'_> {
        match input {
            Input::Dir { path, name } => Box::new(
                DirWalk::new(path, name.as_deref(), &config.walk, table, &selection).map(Ok),
            ),
            Input::Dataset { path, format } => match DatasetReader::open(path, *format) {
                Ok(reader) => Box::new(reader.map(|r| r.map_err(IngestError::from))),
                Err(e) => Box::new(std::iter::once(Err(e.into()))),
            },
        }
    });
    // Walking (and dataset decoding) of the next batch overlaps judging of
    // this one; the ledger then takes the judgements in input order.
    let mut batch = next_batch(&mut items, &walk_nanos)?;
    while !batch.is_empty() {
        let (judged, next) = rayon::join(
            || -> Result<Vec<Judged>, IngestError> {
                batch
                    .into_par_iter()
                    .map_init(Vec::new, |scratch, item| judge.judge(item, scratch))
                    .collect()
            },
            || next_batch(&mut items, &walk_nanos),
        );
        let (train, eval) = ledger.absorb(judged?, &mut progress);
        writer.send(Split::Train, train)?;
        writer.send(Split::Eval, eval)?;
        on_progress(progress);
        batch = next?;
    }
    let walk_nanos = walk_nanos.into_inner();
    let (train_files, eval_files, write_s) = writer.finish()?;

    let total = started.elapsed().as_secs_f64();
    let mut stats = ledger.stats;
    for (split, files, repos) in [
        ("train", train_files, &ledger.repos[0]),
        ("eval", eval_files, &ledger.repos[1]),
    ] {
        let s = stats.splits.entry(split.to_string()).or_default();
        s.shards = files.shards;
        s.repos = repos.len() as u64;
    }
    for kind in SecretKind::ALL {
        stats
            .secrets
            .insert(kind.name().to_string(), ledger.secret_counts[kind as usize]);
    }
    stats.near_dedup = lsh_params.map(|p| NearDedupParams {
        num_perm: config.num_perm,
        shingle_size: config.shingle_size,
        threshold: config.near_threshold,
        bands: p.bands,
        rows: p.rows,
    });
    let secs = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
    let clock = &judge.clock;
    stats.timings_s = BTreeMap::from([
        ("total".to_string(), total),
        ("walk".to_string(), walk_nanos as f64 * 1e-9),
        ("read".to_string(), secs(&clock.read)),
        ("filter".to_string(), secs(&clock.filter)),
        ("redact".to_string(), secs(&clock.redact)),
        ("minhash".to_string(), secs(&clock.minhash)),
        ("sha256".to_string(), secs(&clock.sha256)),
        ("tokenize".to_string(), secs(&clock.tokenize)),
        ("dedup".to_string(), ledger.dedup_nanos as f64 * 1e-9),
        ("write".to_string(), write_s),
    ]);
    stats.throughput.files_per_s = stats.files.seen as f64 / total.max(1e-9);
    stats.throughput.mb_per_s = stats.bytes.read as f64 / 1e6 / total.max(1e-9);
    let train_repos = ledger.repos[0].len();
    let eval_repos = ledger.repos[1].len();
    if config.eval_fraction > 0.0 && stats.files.kept > 0 && eval_repos == 0 {
        let what = match (config.split_by, train_repos) {
            (SplitBy::File, _) => "every file",
            (SplitBy::Repo, 1) => "the only repository",
            (SplitBy::Repo, _) => "every repository",
        };
        stats.warnings.push(format!(
            "the eval split is empty: {what} hashed into train \
             (use --split-by file, more repositories, or another --split-seed)"
        ));
    }
    if stats.files.kept > 0 && train_repos == 0 {
        stats.warnings.push("the train split is empty: every repository hashed into eval; lower --eval-fraction or use --split-by file".into());
    }
    Ok(stats)
}

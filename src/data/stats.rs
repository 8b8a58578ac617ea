//! `stats.json`: what an ingest run read, dropped (by reason), redacted (by
//! kind) and wrote (by language and split), and how long it took.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// File name of the statistics next to the shards; its presence is what
/// marks a directory as an ingest output.
pub const STATS_FILE: &str = "stats.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub qcoder_version: String,
    pub inputs: Vec<String>,
    /// The effective options of the run.
    pub config: serde_json::Value,
    pub files: FileCounts,
    pub bytes: ByteCounts,
    /// Files not written, by reason (`filter::DropReason` names).
    pub dropped: BTreeMap<String, Count>,
    /// Up to a few paths per reason, with the error where there was one.
    pub drop_examples: BTreeMap<String, Vec<String>>,
    /// Redactions in the written files, by kind (`secrets::SecretKind` names).
    pub secrets: BTreeMap<String, u64>,
    pub files_with_secrets: u64,
    /// Written files by language.
    pub languages: BTreeMap<String, LanguageStats>,
    /// `train` and `eval`.
    pub splits: BTreeMap<String, SplitStats>,
    pub near_dedup: Option<NearDedupParams>,
    /// Wall-clock `total`; the stages (walk, read, filter, redact, minhash,
    /// sha256, tokenize, dedup, write) are CPU seconds summed over threads.
    pub timings_s: BTreeMap<String, f64>,
    pub throughput: Throughput,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct FileCounts {
    /// Every file and record met, including those skipped unread.
    pub seen: u64,
    pub kept: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ByteCounts {
    /// Bytes of text read and judged (files skipped by name are not read).
    pub read: u64,
    /// Bytes of `content` written.
    pub kept: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Count {
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LanguageStats {
    pub files: u64,
    pub bytes: u64,
    pub train_files: u64,
    pub eval_files: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SplitStats {
    pub files: u64,
    pub bytes: u64,
    pub repos: u64,
    pub shards: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct NearDedupParams {
    pub num_perm: usize,
    pub shingle_size: usize,
    pub threshold: f64,
    pub bands: usize,
    pub rows: usize,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Throughput {
    pub files_per_s: f64,
    /// `bytes.read` per wall-clock second, in 10^6 bytes.
    pub mb_per_s: f64,
}

impl Stats {
    pub fn read(path: &std::path::Path) -> Result<Self, StatsError> {
        let text = std::fs::read_to_string(path).map_err(|source| StatsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| StatsError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an ingest stats file: {source}", path.display())]
    Json {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
}

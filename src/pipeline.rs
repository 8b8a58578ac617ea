//! `qcoder run pipeline.toml`: the pieces that do not depend on any one
//! command — parsing the pipeline file, turning a stage's table into the
//! command line of the command it runs, and the content hashes that decide
//! whether a stage's outputs are up to date.
//!
//! A stage is up to date when its state file (`WORK/.qcoder/STAGE.json`)
//! records the same input hash as now and its outputs still have the sizes
//! recorded when it finished. The input hash covers the stage's table, the
//! qcoder version, and the content of every input: external files and
//! directories are hashed (XXH3-128 over paths and bytes), outputs of earlier
//! stages contribute the hash recorded when they were written. Every command
//! writes its output under a temporary name and renames it when complete, so
//! a killed job leaves either a finished output or none, and a rerun resumes
//! at the first stage that is not up to date.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_128;

use crate::settings::{self, suggest};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The stages in the order they run. Each has an optional table of the same
/// name in the pipeline file.
pub const STAGES: [&str; 6] = ["import", "ingest", "finetune", "quantize", "eval", "export"];

/// Top-level tables a pipeline file may have besides the stages.
const SECTIONS: [&str; 2] = ["pipeline", "model"];

/// A parsed pipeline file: `[pipeline]`, `[model]` and one table per stage.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub path: PathBuf,
    /// `[pipeline] work_dir`: where every stage writes (relative paths are
    /// taken from the current directory).
    pub work_dir: PathBuf,
    pub model: ModelSource,
    /// Stage name → its table, for the stages the file has.
    pub stages: BTreeMap<String, toml::Table>,
}

/// `[model]`: the base model, a GGUF file to import or a model directory / hub id.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    Dir(String),
}

fn unknown_key(path: &Path, table: &str, key: &str, valid: &[&str]) -> PipelineError {
    let hint = match suggest(key, valid) {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    };
    PipelineError::Invalid {
        path: path.to_path_buf(),
        message: format!(
            "unknown key `{key}` in {table}{hint}; valid keys: {}",
            valid.join(", ")
        ),
    }
}

/// [`settings::expand`] with the error naming the pipeline file.
pub fn expand(text: &str, path: &Path) -> Result<String, PipelineError> {
    settings::expand(text).map_err(|message| PipelineError::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

fn expect_str<'a>(
    path: &Path,
    table: &str,
    key: &str,
    value: &'a toml::Value,
) -> Result<&'a str, PipelineError> {
    value.as_str().ok_or_else(|| PipelineError::Invalid {
        path: path.to_path_buf(),
        message: format!("[{table}] {key} must be a string"),
    })
}

impl Pipeline {
    pub fn read(path: &Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PipelineError> {
        let invalid = |message: String| PipelineError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        let valid: Vec<&str> = SECTIONS.iter().chain(STAGES.iter()).copied().collect();
        for (key, value) in &doc {
            if !valid.contains(&key.as_str()) {
                return Err(unknown_key(path, "the pipeline file", key, &valid));
            }
            if !value.is_table() {
                return Err(invalid(format!("`{key}` must be a table ([{key}])")));
            }
        }
        let take = |doc: &mut toml::Table, name: &str| match doc.remove(name) {
            Some(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };

        let pipeline = take(&mut doc, "pipeline");
        let mut work_dir = None;
        for (key, value) in &pipeline {
            match key.as_str() {
                "work_dir" => {
                    work_dir = Some(PathBuf::from(expand(
                        expect_str(path, "pipeline", key, value)?,
                        path,
                    )?))
                }
                _ => return Err(unknown_key(path, "[pipeline]", key, &["work_dir"])),
            }
        }
        let work_dir = work_dir.ok_or_else(|| invalid("[pipeline] needs work_dir".into()))?;

        let model_table = take(&mut doc, "model");
        let mut model = None;
        for (key, value) in &model_table {
            let v = expand(expect_str(path, "model", key, value)?, path)?;
            let source = match key.as_str() {
                "gguf" => ModelSource::Gguf(PathBuf::from(v)),
                "path" => ModelSource::Dir(v),
                _ => return Err(unknown_key(path, "[model]", key, &["gguf", "path"])),
            };
            if model.replace(source).is_some() {
                return Err(invalid(
                    "[model] takes one of gguf or path, not both".into(),
                ));
            }
        }
        let model = model.ok_or_else(|| {
            invalid("[model] needs gguf = \"FILE.gguf\" or path = \"DIR or hub id\"".into())
        })?;
        if doc.contains_key("import") && !matches!(model, ModelSource::Gguf(_)) {
            return Err(invalid(
                "[import] applies only to a [model] gguf = \"...\" source".into(),
            ));
        }

        let stages = doc
            .into_iter()
            .map(|(k, v)| match v {
                toml::Value::Table(t) => (k, t),
                _ => unreachable!("checked above"),
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            work_dir,
            model,
            stages,
        })
    }

    pub fn stage(&self, name: &str) -> Option<&toml::Table> {
        self.stages.get(name)
    }

    /// The command-line arguments a stage's table stands for: `key = "v"` →
    /// `--key v`, `key = true` → `--key`, `false` → nothing, arrays repeat the
    /// flag, `_` in keys becomes `-`. `reserved` keys are set by the pipeline
    /// itself and refused here; `positional` names a key (an array) whose
    /// values are positional arguments; `own` keys are the pipeline's, not
    /// flags, and are left out.
    pub fn stage_args(
        &self,
        name: &str,
        reserved: &[&str],
        positional: Option<&str>,
        own: &[&str],
    ) -> Result<Vec<String>, PipelineError> {
        let invalid = |message: String| PipelineError::Invalid {
            path: self.path.clone(),
            message,
        };
        let Some(table) = self.stage(name) else {
            return Ok(Vec::new());
        };
        let mut flags = Vec::new();
        let mut positionals = Vec::new();
        for (key, value) in table {
            if own.contains(&key.as_str()) {
                continue;
            }
            if reserved.contains(&key.as_str()) {
                return Err(invalid(format!(
                    "[{name}] {key}: set by the pipeline (it wires each stage's input to the previous stage's output); remove it"
                )));
            }
            let scalar = |v: &toml::Value| -> Result<String, PipelineError> {
                match v {
                    toml::Value::String(s) => expand(s, &self.path),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    toml::Value::Float(f) => Ok(f.to_string()),
                    _ => Err(invalid(format!(
                        "[{name}] {key}: expected a string, number, boolean or array of those"
                    ))),
                }
            };
            if Some(key.as_str()) == positional {
                let items = value
                    .as_array()
                    .ok_or_else(|| invalid(format!("[{name}] {key} must be an array")))?;
                for item in items {
                    positionals.push(scalar(item)?);
                }
                continue;
            }
            let flag = format!("--{}", key.replace('_', "-"));
            match value {
                toml::Value::Boolean(true) => flags.push(flag),
                toml::Value::Boolean(false) => {}
                toml::Value::Array(items) => {
                    for item in items {
                        flags.push(flag.clone());
                        flags.push(scalar(item)?);
                    }
                }
                other => {
                    flags.push(flag);
                    flags.push(scalar(other)?);
                }
            }
        }
        positionals.extend(flags);
        Ok(positionals)
    }
}

/// Content hash of a file or a directory tree (paths relative to `path`, and
/// bytes), XXH3-128 as 32 hex digits.
pub fn hash_path(path: &Path) -> Result<String, PipelineError> {
    let mut hasher = XxHash3_128::new();
    hash_into(&mut hasher, path, Path::new(""))?;
    Ok(format!("{:032x}", hasher.finish_128()))
}

fn hash_into(hasher: &mut XxHash3_128, path: &Path, rel: &Path) -> Result<(), PipelineError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    hasher.write(rel.to_string_lossy().as_bytes());
    hasher.write(&[0]);
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map_err(io_err(path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(path))?;
        entries.sort();
        for name in entries {
            if name == ".git" {
                continue;
            }
            hash_into(hasher, &path.join(&name), &rel.join(&name))?;
        }
    } else {
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut buf = vec![0u8; 1 << 20];
        hasher.write(&meta.len().to_le_bytes());
        loop {
            let n = file.read(&mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            hasher.write(&buf[..n]);
        }
    }
    Ok(())
}

/// Hash of a list of parts (strings: table text, input hashes, ...).
pub fn hash_parts(parts: &[String]) -> String {
    let mut hasher = XxHash3_128::new();
    for p in parts {
        hasher.write(&(p.len() as u64).to_le_bytes());
        hasher.write(p.as_bytes());
    }
    format!("{:032x}", hasher.finish_128())
}

/// Relative path → size of every file under `path` (or of `path` itself): a
/// cheap check that a finished output was not changed or removed since.
pub fn fingerprint(path: &Path) -> Result<BTreeMap<String, u64>, PipelineError> {
    fn walk(path: &Path, rel: &Path, out: &mut BTreeMap<String, u64>) -> Result<(), PipelineError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).map_err(io_err(path))? {
                let name = entry.map_err(io_err(path))?.file_name();
                walk(&path.join(&name), &rel.join(&name), out)?;
            }
        } else {
            out.insert(rel.to_string_lossy().into_owned(), meta.len());
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(path, Path::new(""), &mut out)?;
    Ok(out)
}

/// What a finished stage leaves in `WORK/.qcoder/STAGE.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageState {
    pub stage: String,
    pub input_hash: String,
    /// Content hash of the output, the input hash of later stages.
    pub output_hash: String,
    pub output: PathBuf,
    pub files: BTreeMap<String, u64>,
    /// false when the stage ran but its quality gate failed (eval).
    pub passed: bool,
    pub seconds: f64,
    /// The qcoder command line the stage ran.
    pub command: Vec<String>,
}

impl StageState {
    pub fn path(work_dir: &Path, stage: &str) -> PathBuf {
        work_dir.join(".qcoder").join(format!("{stage}.json"))
    }

    /// The recorded state, when there is one that still matches `input_hash`
    /// and whose output is unchanged.
    pub fn up_to_date(work_dir: &Path, stage: &str, input_hash: &str) -> Option<Self> {
        let text = std::fs::read_to_string(Self::path(work_dir, stage)).ok()?;
        let state: Self = serde_json::from_str(&text).ok()?;
        let unchanged = state.input_hash == input_hash
            && fingerprint(&state.output).ok().as_ref() == Some(&state.files);
        unchanged.then_some(state)
    }

    pub fn save(&self, work_dir: &Path) -> Result<(), PipelineError> {
        let path = Self::path(work_dir, &self.stage);
        let dir = path.parent().expect("state path has a parent");
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("state serialises");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    pub fn forget(work_dir: &Path, stage: &str) -> Result<(), PipelineError> {
        let path = Self::path(work_dir, stage);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse(text, Path::new("p.toml"))
    }

    #[test]
    fn stage_tables_become_command_lines() {
        let p = parse(
            r#"
            [pipeline]
            work_dir = "runs/x"
            [model]
            path = "org/model"
            [ingest]
            inputs = ["a", "b"]
            dedup = "exact"
            keep_emails = true
            include_data = false
            languages = ["python", "rust"]
            eval_fraction = 0.1
            "#,
        )
        .unwrap();
        assert_eq!(p.model, ModelSource::Dir("org/model".into()));
        let args = p
            .stage_args("ingest", &["output"], Some("inputs"), &[])
            .unwrap();
        assert_eq!(
            args,
            [
                "a",
                "b",
                "--dedup",
                "exact",
                "--eval-fraction",
                "0.1",
                "--keep-emails",
                "--languages",
                "python",
                "--languages",
                "rust"
            ]
        );
    }

    #[test]
    fn typos_and_reserved_keys_are_named() {
        let err = parse("[pipeline]\nwork_dir='w'\n[model]\npath='m'\n[quantise]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`quantise`") && err.contains("did you mean `quantize`"),
            "{err}"
        );
        let p =
            parse("[pipeline]\nwork_dir='w'\n[model]\npath='m'\n[quantize]\nmodel='x'\n").unwrap();
        let err = p
            .stage_args("quantize", &["model"], None, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[quantize] model"), "{err}");
        let err = parse("[pipeline]\n[model]\npath='m'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("work_dir"), "{err}");
    }

    #[test]
    fn hashes_follow_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.py"), "x = 1\n").unwrap();
        let h1 = hash_path(dir.path()).unwrap();
        assert_eq!(h1, hash_path(dir.path()).unwrap());
        std::fs::write(dir.path().join("a.py"), "x = 2\n").unwrap();
        let h2 = hash_path(dir.path()).unwrap();
        assert_ne!(h1, h2);
        std::fs::rename(dir.path().join("a.py"), dir.path().join("b.py")).unwrap();
        assert_ne!(h2, hash_path(dir.path()).unwrap());
    }
}

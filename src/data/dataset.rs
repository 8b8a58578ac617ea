//! Dataset files as ingest inputs: `.jsonl`, `.jsonl.gz` and `.parquet` with
//! a `content` column (the field name of The Stack and most code datasets).
//! Optional columns: `repo` (or `repo_name`), `path`, `license`, `language`
//! (or `lang`). Records stream in batches; a file is never loaded whole.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde::Deserialize;

use super::filter::DropReason;
use super::walk::{dir_name, Item, RecordItem, Repo, SkipItem};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a readable Parquet file: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{}: Arrow: {source}", path.display())]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
    #[error("{}: no `content` column (columns: {columns}); a dataset input needs the file text in a string column named `content`", path.display())]
    NoContentColumn { path: PathBuf, columns: String },
    #[error("{}: column `{column}` has type {data_type}, expected a string", path.display())]
    NotString {
        path: PathBuf,
        column: String,
        data_type: DataType,
    },
    #[error("{}:{line}: {msg}", path.display())]
    BadRecord {
        path: PathBuf,
        line: u64,
        msg: String,
    },
}

/// The dataset formats, by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    Jsonl,
    JsonlGz,
    Parquet,
}

impl DatasetFormat {
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            Some(DatasetFormat::Jsonl)
        } else if name.ends_with(".jsonl.gz") || name.ends_with(".ndjson.gz") {
            Some(DatasetFormat::JsonlGz)
        } else if name.ends_with(".parquet") {
            Some(DatasetFormat::Parquet)
        } else {
            None
        }
    }
}

/// Records of one dataset file, as work items.
pub enum DatasetReader {
    Jsonl(JsonlReader),
    Parquet(ParquetReader),
}

impl DatasetReader {
    pub fn open(path: &Path, format: DatasetFormat) -> Result<Self, DatasetError> {
        Ok(match format {
            DatasetFormat::Jsonl | DatasetFormat::JsonlGz => {
                DatasetReader::Jsonl(JsonlReader::open(path, format == DatasetFormat::JsonlGz)?)
            }
            DatasetFormat::Parquet => DatasetReader::Parquet(ParquetReader::open(path)?),
        })
    }
}

impl Iterator for DatasetReader {
    type Item = Result<Item, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            DatasetReader::Jsonl(r) => r.next(),
            DatasetReader::Parquet(r) => r.next(),
        }
    }
}

/// Repository of records that name none: the dataset file's stem.
fn default_repo(path: &Path) -> Arc<Repo> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir_name(path));
    let stem = name.split('.').next().unwrap_or(&name).to_string();
    Arc::new(Repo {
        name: stem.into(),
        license: None,
    })
}

/// Keeps one `Repo` per consecutive run of records of the same repository
/// and licence, so records share it instead of allocating their own.
struct RepoCache {
    default: Arc<Repo>,
    last: Option<Arc<Repo>>,
}

impl RepoCache {
    fn get(&mut self, name: Option<&str>, license: Option<&str>) -> Arc<Repo> {
        let Some(name) = name else {
            return match license {
                None => self.default.clone(),
                Some(l) => Arc::new(Repo {
                    name: self.default.name.clone(),
                    license: Some(l.into()),
                }),
            };
        };
        if let Some(last) = &self.last {
            if &*last.name == name && last.license.as_deref() == license {
                return last.clone();
            }
        }
        let repo = Arc::new(Repo {
            name: name.into(),
            license: license.map(Arc::from),
        });
        self.last = Some(repo.clone());
        repo
    }
}

#[derive(Deserialize)]
struct JsonRecord {
    content: Option<String>,
    #[serde(alias = "repo_name")]
    repo: Option<String>,
    #[serde(alias = "file_path")]
    path: Option<String>,
    license: Option<String>,
    #[serde(alias = "lang")]
    language: Option<String>,
}

pub struct JsonlReader {
    path: PathBuf,
    lines: Box<dyn BufRead + Send>,
    line_no: u64,
    repos: RepoCache,
    buf: String,
}

impl JsonlReader {
    fn open(path: &Path, gzip: bool) -> Result<Self, DatasetError> {
        let file = File::open(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let lines: Box<dyn BufRead + Send> = if gzip {
            Box::new(BufReader::with_capacity(
                1 << 20,
                flate2::read::MultiGzDecoder::new(file),
            ))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, file))
        };
        Ok(JsonlReader {
            path: path.to_path_buf(),
            lines,
            line_no: 0,
            repos: RepoCache {
                default: default_repo(path),
                last: None,
            },
            buf: String::new(),
        })
    }

    fn next(&mut self) -> Option<Result<Item, DatasetError>> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            match self.lines.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(source) => {
                    let msg = match source.kind() {
                        std::io::ErrorKind::InvalidData => {
                            "not UTF-8 text (or a corrupt gzip stream)".to_string()
                        }
                        _ => source.to_string(),
                    };
                    return Some(Err(self.bad(msg)));
                }
            }
            if self.buf.trim().is_empty() {
                continue;
            }
            let record: JsonRecord = match serde_json::from_str(&self.buf) {
                Ok(r) => r,
                Err(e) => return Some(Err(self.bad(format!("not a valid JSON record: {e}")))),
            };
            let Some(content) = record.content else {
                return Some(Err(self.bad(
                    "record has no string field `content` (a dataset input needs the file text in `content`)".into(),
                )));
            };
            let repo = self
                .repos
                .get(record.repo.as_deref(), record.license.as_deref());
            return Some(Ok(Item::Record(RecordItem {
                repo,
                path: record
                    .path
                    .unwrap_or_else(|| format!("line-{}", self.line_no)),
                content,
                language: record.language,
            })));
        }
    }

    fn bad(&self, msg: String) -> DatasetError {
        DatasetError::BadRecord {
            path: self.path.clone(),
            line: self.line_no,
            msg,
        }
    }
}

/// Column positions in the projected batches.
struct Columns {
    content: usize,
    repo: Option<usize>,
    path: Option<usize>,
    license: Option<usize>,
    language: Option<usize>,
}

pub struct ParquetReader {
    path: PathBuf,
    batches: ParquetRecordBatchReader,
    columns: Columns,
    batch: Option<RecordBatch>,
    row: usize,
    rows_before: u64,
    repos: RepoCache,
}

/// Rows per batch: bounded so a batch of large files stays a few hundred MB.
const PARQUET_BATCH_ROWS: usize = 256;

impl ParquetReader {
    fn open(path: &Path) -> Result<Self, DatasetError> {
        let file = File::open(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let pq_err = |source| DatasetError::Parquet {
            path: path.to_path_buf(),
            source,
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq_err)?;
        let schema = builder.schema().clone();
        let find = |names: &[&str]| -> Result<Option<usize>, DatasetError> {
            let Some((i, field)) = schema
                .fields()
                .iter()
                .enumerate()
                .find(|(_, f)| names.contains(&f.name().as_str()))
            else {
                return Ok(None);
            };
            match field.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(Some(i)),
                other => Err(DatasetError::NotString {
                    path: path.to_path_buf(),
                    column: field.name().clone(),
                    data_type: other.clone(),
                }),
            }
        };
        let Some(content) = find(&["content"])? else {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(DatasetError::NoContentColumn {
                path: path.to_path_buf(),
                columns: columns.join(", "),
            });
        };
        let wanted = [
            Some(content),
            find(&["repo", "repo_name"])?,
            find(&["path", "file_path"])?,
            find(&["license"])?,
            find(&["language", "lang"])?,
        ];
        // Projection keeps root columns in schema order; map each wanted
        // column to its position among the kept ones.
        let mut kept: Vec<usize> = wanted.iter().flatten().copied().collect();
        kept.sort_unstable();
        kept.dedup();
        let position = |c: Option<usize>| c.and_then(|c| kept.iter().position(|&k| k == c));
        let columns = Columns {
            content: kept.iter().position(|&k| k == content).unwrap_or(0),
            repo: position(wanted[1]),
            path: position(wanted[2]),
            license: position(wanted[3]),
            language: position(wanted[4]),
        };
        let mask = ProjectionMask::roots(builder.parquet_schema(), kept.iter().copied());
        let batches = builder
            .with_projection(mask)
            .with_batch_size(PARQUET_BATCH_ROWS)
            .build()
            .map_err(pq_err)?;
        Ok(ParquetReader {
            path: path.to_path_buf(),
            batches,
            columns,
            batch: None,
            row: 0,
            rows_before: 0,
            repos: RepoCache {
                default: default_repo(path),
                last: None,
            },
        })
    }

    fn next(&mut self) -> Option<Result<Item, DatasetError>> {
        loop {
            if let Some(batch) = &self.batch {
                if self.row < batch.num_rows() {
                    let row = self.row;
                    self.row += 1;
                    let text =
                        |col: Option<usize>| col.and_then(|c| string_at(batch.column(c), row));
                    let path = text(self.columns.path)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("row-{}", self.rows_before + row as u64));
                    let Some(content) = text(Some(self.columns.content)) else {
                        return Some(Ok(Item::Skip(SkipItem {
                            reason: DropReason::Empty,
                            path: format!("{}: {path}", self.path.display()),
                            bytes: 0,
                            detail: Some("null content".into()),
                        })));
                    };
                    let content = content.to_string();
                    let language = text(self.columns.language).map(str::to_string);
                    let (repo, license) = (text(self.columns.repo), text(self.columns.license));
                    let repo = self.repos.get(repo, license);
                    return Some(Ok(Item::Record(RecordItem {
                        repo,
                        path,
                        content,
                        language,
                    })));
                }
                self.rows_before += batch.num_rows() as u64;
            }
            self.row = 0;
            match self.batches.next()? {
                Ok(batch) => self.batch = Some(batch),
                Err(source) => {
                    self.batch = None;
                    return Some(Err(DatasetError::Arrow {
                        path: self.path.clone(),
                        source,
                    }));
                }
            }
        }
    }
}

/// The string at `row` of a Utf8, LargeUtf8 or Utf8View column.
fn string_at(array: &dyn Array, row: usize) -> Option<&str> {
    if array.is_null(row) {
        return None;
    }
    let any = array.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        Some(a.value(row))
    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        Some(a.value(row))
    } else {
        any.downcast_ref::<StringViewArray>().map(|a| a.value(row))
    }
}

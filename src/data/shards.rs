//! The corpus on disk: Parquet shards named as Hugging Face `datasets`
//! expects (`train-00000-of-00003.parquet`), zstd-compressed, one row per
//! file. Shards are written under temporary names and renamed once the shard
//! count is known; the caller renames the whole directory into place.
//!
//! Schema (one row per source file):
//!
//! | column        | type    | meaning                                            |
//! |---------------|---------|----------------------------------------------------|
//! | repo          | string  | repository name                                    |
//! | path          | string  | path inside the repository                         |
//! | language      | string  | language from `datasets/languages.toml`            |
//! | license       | string? | SPDX id of the repository's licence, if recognised |
//! | content       | string  | the file text, secrets redacted                    |
//! | size_bytes    | int64   | UTF-8 bytes of `content`                           |
//! | n_lines       | int64   | lines of `content`                                 |
//! | n_tokens      | int64   | tokens of `content` (only with `--tokenizer`)      |
//! | sha256        | string  | hex SHA-256 of `content`                           |
//! | alnum_frac    | float64 | alphanumeric characters / characters               |
//! | max_line_len  | int64   | longest line, characters                           |
//! | mean_line_len | float64 | mean line length, characters                       |

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::filter::TextMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: writing Parquet: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("building a record batch: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
}

/// One output row.
#[derive(Debug, Clone)]
pub struct Row {
    pub repo: Arc<str>,
    pub path: String,
    pub language: Arc<str>,
    pub license: Option<Arc<str>>,
    pub content: String,
    pub n_tokens: Option<i64>,
    pub sha256: String,
    pub metrics: TextMetrics,
}

pub fn schema(with_tokens: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new("repo", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("language", DataType::Utf8, false),
        Field::new("license", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, false),
        Field::new("size_bytes", DataType::Int64, false),
        Field::new("n_lines", DataType::Int64, false),
    ];
    if with_tokens {
        fields.push(Field::new("n_tokens", DataType::Int64, false));
    }
    fields.extend([
        Field::new("sha256", DataType::Utf8, false),
        Field::new("alnum_frac", DataType::Float64, false),
        Field::new("max_line_len", DataType::Int64, false),
        Field::new("mean_line_len", DataType::Float64, false),
    ]);
    Arc::new(Schema::new(fields))
}

fn to_batch(schema: &SchemaRef, rows: &[Row]) -> Result<RecordBatch, ShardError> {
    let strings = |f: &dyn Fn(&Row) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let ints = |f: &dyn Fn(&Row) -> i64| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Int64Array>())
    };
    let floats = |f: &dyn Fn(&Row) -> f64| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Float64Array>())
    };
    let mut columns = vec![
        strings(&|r| Some(&r.repo)),
        strings(&|r| Some(&r.path)),
        strings(&|r| Some(&r.language)),
        strings(&|r| r.license.as_deref()),
        strings(&|r| Some(&r.content)),
        ints(&|r| r.content.len() as i64),
        ints(&|r| r.metrics.n_lines as i64),
    ];
    if schema.field_with_name("n_tokens").is_ok() {
        columns.push(ints(&|r| r.n_tokens.unwrap_or(0)));
    }
    columns.extend([
        strings(&|r| Some(&r.sha256)),
        floats(&|r| r.metrics.alnum_frac),
        ints(&|r| r.metrics.max_line_len as i64),
        floats(&|r| r.metrics.mean_line_len),
    ]);
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn writer_properties() -> WriterProperties {
    let unique = |name: &str| ColumnPath::from(name);
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_created_by(format!("qcoder {}", env!("CARGO_PKG_VERSION")))
        // Dictionaries only pay off on the repeating columns.
        .set_dictionary_enabled(false)
        .set_column_dictionary_enabled(unique("repo"), true)
        .set_column_dictionary_enabled(unique("language"), true)
        .set_column_dictionary_enabled(unique("license"), true)
        // min/max of file texts would bloat the footer and serve no query.
        .set_column_statistics_enabled(unique("content"), EnabledStatistics::None)
        .set_column_statistics_enabled(unique("sha256"), EnabledStatistics::None)
        .set_column_statistics_enabled(unique("path"), EnabledStatistics::None)
        .set_max_row_group_row_count(Some(100_000))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .build()
}

/// Row groups are closed at this many buffered (encoded) bytes, bounding
/// the writer's memory whatever the shard size (and keeping groups small
/// enough for readers that load one group at a time).
const ROW_GROUP_BYTES: usize = 128 << 20;

/// Shards of one split (`train`, `eval`) in a staging directory.
pub struct ShardWriter {
    dir: PathBuf,
    split: String,
    schema: SchemaRef,
    shard_bytes: u64,
    current: Option<(PathBuf, ArrowWriter<File>)>,
    finished: Vec<PathBuf>,
    rows: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: &str, with_tokens: bool, shard_bytes: u64) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            schema: schema(with_tokens),
            shard_bytes: shard_bytes.max(1),
            current: None,
            finished: Vec::new(),
            rows: 0,
        }
    }

    /// Appends rows, starting a new shard whenever the current one reaches
    /// the shard size. Rows go in chunks of about a quarter shard, so shard
    /// sizes hold even when a whole batch would overshoot them.
    pub fn write(&mut self, rows: &[Row]) -> Result<(), ShardError> {
        let chunk_bytes = (self.shard_bytes / 4).clamp(1, 16 << 20);
        let mut start = 0;
        while start < rows.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < rows.len() && (end == start || bytes < chunk_bytes) {
                bytes += rows[end].content.len() as u64;
                end += 1;
            }
            self.write_chunk(&rows[start..end])?;
            start = end;
        }
        Ok(())
    }

    fn write_chunk(&mut self, rows: &[Row]) -> Result<(), ShardError> {
        let batch = to_batch(&self.schema, rows)?;
        let (path, writer) = self.open_shard()?;
        writer.write(&batch).map_err(|source| ShardError::Parquet {
            path: path.clone(),
            source,
        })?;
        let size = writer.bytes_written() as u64 + writer.in_progress_size() as u64;
        self.rows += rows.len() as u64;
        if size >= self.shard_bytes {
            self.close_shard()?;
        }
        Ok(())
    }

    fn open_shard(&mut self) -> Result<&mut (PathBuf, ArrowWriter<File>), ShardError> {
        let current = match self.current.take() {
            Some(current) => current,
            None => {
                let n = self.finished.len();
                let path = self
                    .dir
                    .join(format!(".{}-{n:05}.parquet.partial", self.split));
                let file = File::create(&path).map_err(|source| ShardError::Io {
                    path: path.clone(),
                    source,
                })?;
                let writer =
                    ArrowWriter::try_new(file, self.schema.clone(), Some(writer_properties()))
                        .map_err(|source| ShardError::Parquet {
                            path: path.clone(),
                            source,
                        })?;
                (path, writer)
            }
        };
        Ok(self.current.insert(current))
    }

    fn close_shard(&mut self) -> Result<(), ShardError> {
        if let Some((path, writer)) = self.current.take() {
            writer.close().map_err(|source| ShardError::Parquet {
                path: path.clone(),
                source,
            })?;
            self.finished.push(path);
        }
        Ok(())
    }

    /// Closes the last shard and gives every shard its final name
    /// `{split}-{i:05}-of-{n:05}.parquet`. A split without rows still gets
    /// one empty shard, so readers always find the schema.
    pub fn finish(mut self) -> Result<SplitFiles, ShardError> {
        if self.finished.is_empty() && self.current.is_none() {
            self.open_shard()?;
        }
        self.close_shard()?;
        let n = self.finished.len();
        let mut names = Vec::with_capacity(n);
        for (i, tmp) in self.finished.iter().enumerate() {
            let name = format!("{}-{i:05}-of-{n:05}.parquet", self.split);
            let path = self.dir.join(&name);
            std::fs::rename(tmp, &path).map_err(|source| ShardError::Io { path, source })?;
            names.push(name);
        }
        Ok(SplitFiles {
            rows: self.rows,
            shards: names,
        })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitFiles {
    pub rows: u64,
    pub shards: Vec<String>,
}

/// The first rows of a Parquet file, for `inspect`.
pub struct Head {
    pub schema: SchemaRef,
    pub rows: i64,
    pub row_groups: usize,
    pub batch: Option<RecordBatch>,
}

pub fn read_head(path: &Path, n_rows: usize) -> Result<Head, ShardError> {
    let file = File::open(path).map_err(|source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let pq_err = |source| ShardError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq_err)?;
    let metadata = builder.metadata().clone();
    let schema = builder.schema().clone();
    let mut reader = builder
        .with_batch_size(n_rows.max(1))
        .with_limit(n_rows)
        .build()
        .map_err(pq_err)?;
    let batch = reader.next().transpose()?;
    Ok(Head {
        schema,
        rows: metadata.file_metadata().num_rows(),
        row_groups: metadata.num_row_groups(),
        batch,
    })
}

/// A cell as text: strings, integers and floats; other types by name.
pub fn display_value(column: &dyn Array, row: usize) -> String {
    if column.is_null(row) {
        return "null".into();
    }
    match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(row).to_string(),
        DataType::LargeUtf8 => column.as_string::<i64>().value(row).to_string(),
        DataType::Utf8View => column.as_string_view().value(row).to_string(),
        DataType::Int64 => column.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::Int32 => column.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::UInt64 => column.as_primitive::<UInt64Type>().value(row).to_string(),
        DataType::UInt32 => column.as_primitive::<UInt32Type>().value(row).to_string(),
        DataType::Float64 => format!("{:.4}", column.as_primitive::<Float64Type>().value(row)),
        DataType::Float32 => format!("{:.4}", column.as_primitive::<Float32Type>().value(row)),
        other => format!("<{other}>"),
    }
}

//! Documents for calibration and evaluation, from whatever the user has: an
//! ingest output directory (its train or eval split), a dataset file
//! (`.parquet`, `.jsonl`, `.jsonl.gz` with a `content` column), a plain text
//! file, or a directory of code.

use std::path::{Path, PathBuf};

use super::dataset::{DatasetError, DatasetFormat, DatasetReader};
use super::walk::Item;

/// Which split of an ingest output directory to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train-",
            Split::Eval => "eval-",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TextsError {
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{}: this ingest output has no {split} split ({split}-*.parquet); ingest with a larger --eval-fraction or --split-by file", path.display())]
    NoSplit { path: PathBuf, split: &'static str },
    #[error("{}: no text found (expected an ingest output directory, a .parquet/.jsonl dataset with a `content` column, text files, or a directory of code)", path.display())]
    Empty { path: PathBuf },
}

/// Reads up to `max_bytes` of documents from `path`.
pub fn read_texts(path: &Path, split: Split, max_bytes: usize) -> Result<Vec<String>, TextsError> {
    let mut docs = Vec::new();
    let mut budget = max_bytes;
    if path.is_dir() && path.join("stats.json").is_file() {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| TextsError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| n.starts_with(split.prefix()) && n.ends_with(".parquet"))
            })
            .collect();
        shards.sort();
        if shards.is_empty() {
            return Err(TextsError::NoSplit {
                path: path.to_path_buf(),
                split: split.prefix().trim_end_matches('-'),
            });
        }
        for shard in shards {
            read_dataset(&shard, DatasetFormat::Parquet, &mut docs, &mut budget)?;
        }
    } else {
        collect(path, &mut docs, &mut budget)?;
    }
    if docs.is_empty() {
        return Err(TextsError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(docs)
}

fn read_dataset(
    path: &Path,
    format: DatasetFormat,
    docs: &mut Vec<String>,
    budget: &mut usize,
) -> Result<(), TextsError> {
    for item in DatasetReader::open(path, format)? {
        if *budget == 0 {
            break;
        }
        if let Item::Record(record) = item? {
            push(docs, budget, record.content);
        }
    }
    Ok(())
}

/// The entries of a directory that are not hidden (`.name`), sorted, so a
/// walk reads files in the same order on every machine.
pub(crate) fn visible_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    entries.sort();
    Ok(entries)
}

fn collect(path: &Path, docs: &mut Vec<String>, budget: &mut usize) -> Result<(), TextsError> {
    let io = |source| TextsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if *budget == 0 {
        return Ok(());
    }
    if path.is_dir() {
        for entry in visible_entries(path).map_err(io)? {
            collect(&entry, docs, budget)?;
        }
        return Ok(());
    }
    if let Some(format) = DatasetFormat::of(path) {
        return read_dataset(path, format, docs, budget);
    }
    let bytes = std::fs::read(path).map_err(io)?;
    // Binary files are not text; skip them.
    if let Ok(text) = String::from_utf8(bytes) {
        if !text.contains('\0') {
            push(docs, budget, text);
        }
    }
    Ok(())
}

fn push(docs: &mut Vec<String>, budget: &mut usize, mut doc: String) {
    if *budget == 0 || doc.is_empty() {
        return;
    }
    if doc.len() > *budget {
        let mut cut = *budget;
        while !doc.is_char_boundary(cut) {
            cut -= 1;
        }
        doc.truncate(cut);
    }
    *budget -= doc.len();
    docs.push(doc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_jsonl_text_and_directories_within_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(
            d.join("a.jsonl"),
            "{\"content\": \"x = 1\"}\n\n{\"content\": \"y = 2\"}\n",
        )
        .unwrap();
        std::fs::create_dir(d.join("src")).unwrap();
        std::fs::write(d.join("src/m.py"), "def f():\n    pass\n").unwrap();
        std::fs::write(d.join("src/blob.bin"), [0u8, 159, 146, 150]).unwrap();
        std::fs::write(d.join(".hidden"), "secret").unwrap();
        let docs = read_texts(d, Split::Train, 1 << 20).unwrap();
        assert_eq!(docs, vec!["x = 1", "y = 2", "def f():\n    pass\n"]);
        let cut = read_texts(d, Split::Train, 7).unwrap();
        assert_eq!(cut.concat().len(), 7);
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(matches!(
            read_texts(&empty, Split::Eval, 100),
            Err(TextsError::Empty { .. })
        ));
    }

    #[test]
    fn ingest_dir_without_the_split_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("stats.json"), "{}").unwrap();
        let err = read_texts(tmp.path(), Split::Eval, 100).unwrap_err();
        assert!(err.to_string().contains("no eval split"), "{err}");
    }
}

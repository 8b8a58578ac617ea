//! Repository-level samples, the format of Qwen2.5-Coder's repo-level
//! pretraining: the files of one repository in a single sample,
//!
//! ```text
//! <|repo_name|>{repo}
//! <|file_sep|>{path}
//! {code}
//! <|file_sep|>{path}
//! {code}
//! ```
//!
//! so the model learns to use code from other files of the same repository.

use std::path::Path;

use rand::Rng;

use super::dataset::{DatasetFormat, DatasetReader};
use super::texts::{Split, TextsError};
use super::walk::Item;
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// One file with the repository it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    pub repo: String,
    pub path: String,
    pub content: String,
}

/// Files with their repository and path, up to `max_bytes` of content:
/// records of an ingest output directory (its `split`) or a .parquet/.jsonl
/// dataset (repository and path columns; the file stem when absent); a
/// directory of code is one repository named after the directory.
pub fn read_repo_files(
    path: &Path,
    split: Split,
    max_bytes: usize,
) -> Result<Vec<RepoFile>, TextsError> {
    let mut files = Vec::new();
    let mut budget = max_bytes;
    let io = |source| TextsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() && path.join("stats.json").is_file() {
        let prefix = match split {
            Split::Train => "train-",
            Split::Eval => "eval-",
        };
        let mut shards: Vec<_> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".parquet"))
            })
            .collect();
        shards.sort();
        for shard in shards {
            read_dataset(&shard, DatasetFormat::Parquet, &mut files, &mut budget)?;
        }
    } else if let Some(format) = DatasetFormat::of(path) {
        read_dataset(path, format, &mut files, &mut budget)?;
    } else if path.is_dir() {
        let repo = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "repo".into());
        walk(path, path, &repo, &mut files, &mut budget)?;
    } else {
        walk(
            path,
            path.parent().unwrap_or(Path::new(".")),
            "repo",
            &mut files,
            &mut budget,
        )?;
    }
    if files.is_empty() {
        return Err(TextsError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(files)
}

fn push(files: &mut Vec<RepoFile>, budget: &mut usize, file: RepoFile) {
    if *budget == 0 || file.content.is_empty() || file.content.len() > *budget {
        *budget = 0;
        return;
    }
    *budget -= file.content.len();
    files.push(file);
}

fn read_dataset(
    path: &Path,
    format: DatasetFormat,
    files: &mut Vec<RepoFile>,
    budget: &mut usize,
) -> Result<(), TextsError> {
    for item in DatasetReader::open(path, format)? {
        if *budget == 0 {
            break;
        }
        if let Item::Record(r) = item? {
            let file = RepoFile {
                repo: r.repo.name.to_string(),
                path: r.path,
                content: r.content,
            };
            push(files, budget, file);
        }
    }
    Ok(())
}

fn walk(
    path: &Path,
    root: &Path,
    repo: &str,
    files: &mut Vec<RepoFile>,
    budget: &mut usize,
) -> Result<(), TextsError> {
    let io = |source| TextsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if *budget == 0 {
        return Ok(());
    }
    if path.is_dir() {
        for entry in super::texts::visible_entries(path).map_err(io)? {
            walk(&entry, root, repo, files, budget)?;
        }
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(io)?;
    if let Ok(content) = String::from_utf8(bytes) {
        if !content.contains('\0') {
            let rel = path.strip_prefix(root).unwrap_or(path);
            let file = RepoFile {
                repo: repo.to_string(),
                path: rel.to_string_lossy().into_owned(),
                content,
            };
            push(files, budget, file);
        }
    }
    Ok(())
}

/// Files grouped by repository, repositories in order of first appearance.
pub fn group_by_repo(files: Vec<RepoFile>) -> Vec<(String, Vec<RepoFile>)> {
    let mut groups: Vec<(String, Vec<RepoFile>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for f in files {
        let i = *index.entry(f.repo.clone()).or_insert_with(|| {
            groups.push((f.repo.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(f);
    }
    groups
}

/// Whether repository `index` becomes one repo-level sample (at `rate`;
/// only repositories with at least two files).
pub fn chosen(rate: f64, n_files: usize, rng: &mut impl Rng) -> bool {
    n_files >= 2 && rng.random::<f64>() < rate
}

/// The token ids of one repository-level sample (no EOS; packing adds it).
pub fn encode_repo(
    tok: &CodeTokenizer,
    repo: &str,
    files: &[RepoFile],
) -> Result<Vec<u32>, TokenizerError> {
    let fim = tok.fim().ok_or(TokenizerError::NoFim)?;
    let (Some(repo_name), Some(file_sep)) = (fim.repo_name, fim.file_sep) else {
        return Err(TokenizerError::NoFim);
    };
    let mut ids = vec![repo_name];
    ids.extend(tok.encode(&format!("{repo}\n"), false)?);
    for (i, f) in files.iter().enumerate() {
        ids.push(file_sep);
        let mut text = format!("{}\n{}", f.path, f.content);
        if i + 1 < files.len() && !text.ends_with('\n') {
            text.push('\n');
        }
        ids.extend(tok.encode(&text, false)?);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_is_one_repo_and_samples_have_the_qwen_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("proj");
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        std::fs::write(root.join("pkg/a.py"), "x = 1").unwrap();
        std::fs::write(root.join("b.py"), "y = 2\n").unwrap();
        let files = read_repo_files(&root, Split::Train, 1 << 20).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["b.py", "pkg/a.py"]);
        let groups = group_by_repo(files);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].0, "proj");

        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
        let tok = CodeTokenizer::from_model_dir(&dir).unwrap();
        let f = tok.fim().unwrap();
        let ids = encode_repo(&tok, "proj", &groups[0].1).unwrap();
        let mut want = vec![f.repo_name.unwrap()];
        want.extend(tok.encode("proj\n", false).unwrap());
        want.push(f.file_sep.unwrap());
        want.extend(tok.encode("b.py\ny = 2\n", false).unwrap());
        want.push(f.file_sep.unwrap());
        want.extend(tok.encode("pkg/a.py\nx = 1", false).unwrap());
        assert_eq!(ids, want);
    }
}

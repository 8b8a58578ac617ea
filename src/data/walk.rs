//! Walking a directory tree into work items: which files to read, which to
//! skip (and why) before reading them, and which repository each belongs to.
//!
//! The walk is sequential and sorted by file name, so the order of items,
//! and with it every "keep the first" decision downstream, is deterministic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::filter::DropReason;
use super::languages::{LanguageId, LanguageTable};
use super::license;

/// Directory names skipped unless `--include-vendored`: dependencies and
/// build output, which are someone else's code or no one's. Python virtual
/// environments are recognised by their `pyvenv.cfg` instead of a name, since
/// `venv` is also a package name (the standard library has one).
pub const VENDORED_DIRS: &[&str] = &[
    "node_modules",
    "bower_components",
    "jspm_packages",
    "vendor",
    "vendors",
    "third_party",
    "third-party",
    "thirdparty",
    "3rdparty",
    "site-packages",
    "dist-packages",
    "__pycache__",
    ".tox",
    ".nox",
    ".eggs",
    "dist",
    "build",
    "target",
    "obj",
    "Pods",
    "Carthage",
    "DerivedData",
];

#[derive(Debug, Clone, Serialize)]
pub struct WalkOptions {
    pub include_hidden: bool,
    pub include_vendored: bool,
    pub respect_gitignore: bool,
    pub follow_symlinks: bool,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions {
            include_hidden: false,
            include_vendored: false,
            respect_gitignore: true,
            follow_symlinks: false,
        }
    }
}

/// A repository: the unit of the train/eval split.
#[derive(Debug, PartialEq, Eq)]
pub struct Repo {
    pub name: Arc<str>,
    /// SPDX id, when its licence file was recognised.
    pub license: Option<Arc<str>>,
}

/// One unit of work, in input order.
pub enum Item {
    /// A file to read and judge.
    File(FileItem),
    /// A record from a dataset file, content already in memory.
    Record(RecordItem),
    /// Dropped before reading.
    Skip(SkipItem),
}

pub struct FileItem {
    pub repo: Arc<Repo>,
    pub rel_path: String,
    pub abs_path: PathBuf,
    pub size: u64,
    /// `None`: the name did not say, read the shebang.
    pub language: Option<LanguageId>,
}

pub struct RecordItem {
    pub repo: Arc<Repo>,
    pub path: String,
    pub content: String,
    /// Language named by the dataset, if it has such a column.
    pub language: Option<String>,
}

pub struct SkipItem {
    pub reason: DropReason,
    pub path: String,
    pub bytes: u64,
    /// What went wrong, for unreadable paths.
    pub detail: Option<String>,
}

/// What a walk decides before reading a file.
#[derive(Debug, Clone)]
pub struct Selection {
    pub max_file_size: u64,
    pub include_data: bool,
    /// Only these languages, if set.
    pub languages: Option<Vec<LanguageId>>,
}

impl Selection {
    /// Why a file of this language is not wanted, if it is not.
    pub fn reject_language(&self, table: &LanguageTable, id: LanguageId) -> Option<DropReason> {
        if let Some(only) = &self.languages {
            if !only.contains(&id) {
                return Some(DropReason::LanguageNotSelected);
            }
        }
        if table.get(id).data && !self.include_data {
            return Some(DropReason::DataFormat);
        }
        None
    }
}

/// A depth-first, name-sorted walk of one input directory.
pub struct DirWalk<'a> {
    inner: ignore::Walk,
    table: &'a LanguageTable,
    selection: &'a Selection,
    follow_symlinks: bool,
    /// Repositories enclosing the current entry, outermost first.
    repos: Vec<(PathBuf, Arc<Repo>)>,
}

impl<'a> DirWalk<'a> {
    /// `name` overrides the repository name of `root` (a cloned URL's name
    /// rather than its temporary directory's).
    pub fn new(
        root: &Path,
        name: Option<&str>,
        options: &WalkOptions,
        table: &'a LanguageTable,
        selection: &'a Selection,
    ) -> Self {
        let include_vendored = options.include_vendored;
        let mut builder = ignore::WalkBuilder::new(root);
        builder
            .hidden(!options.include_hidden)
            .git_ignore(options.respect_gitignore)
            .git_exclude(options.respect_gitignore)
            .ignore(options.respect_gitignore)
            .git_global(false)
            .parents(false)
            .require_git(false)
            .follow_links(options.follow_symlinks)
            .sort_by_file_name(|a, b| a.cmp(b))
            .filter_entry(move |entry| {
                let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
                let name = entry.file_name();
                let skip = is_dir
                    && entry.depth() > 0
                    && (name == ".git"
                        || (!include_vendored
                            && (VENDORED_DIRS.iter().any(|v| name == *v)
                                || entry.path().join("pyvenv.cfg").is_file())));
                !skip
            });
        let root_name = name.map(str::to_string).unwrap_or_else(|| dir_name(root));
        let root_repo = Arc::new(Repo {
            name: root_name.into(),
            license: license::detect_in_dir(root).map(Arc::from),
        });
        DirWalk {
            inner: builder.build(),
            table,
            selection,
            follow_symlinks: options.follow_symlinks,
            repos: vec![(root.to_path_buf(), root_repo)],
        }
    }

    fn repo_for(&mut self, path: &Path) -> (PathBuf, Arc<Repo>) {
        while self.repos.len() > 1 && !path.starts_with(&self.repos[self.repos.len() - 1].0) {
            self.repos.pop();
        }
        let (root, repo) = &self.repos[self.repos.len() - 1];
        (root.clone(), repo.clone())
    }

    fn item(&mut self, entry: ignore::DirEntry) -> Option<Item> {
        let path = entry.path();
        let Some(file_type) = entry.file_type() else {
            // Only stdin has no file type; walks never yield it.
            return None;
        };
        if file_type.is_dir() {
            // A nested git checkout is a repository of its own.
            if entry.depth() > 0 && path.join(".git").exists() {
                self.repo_for(path);
                let repo = Arc::new(Repo {
                    name: dir_name(path).into(),
                    license: license::detect_in_dir(path).map(Arc::from),
                });
                self.repos.push((path.to_path_buf(), repo));
            }
            return None;
        }
        let (root, repo) = self.repo_for(path);
        let rel_path = path
            .strip_prefix(&root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let skip = |reason, bytes, detail: Option<String>| {
            Some(Item::Skip(SkipItem {
                reason,
                path: path.display().to_string(),
                bytes,
                detail,
            }))
        };
        if file_type.is_symlink() && !self.follow_symlinks {
            return skip(DropReason::Symlink, 0, None);
        }
        if !file_type.is_file() {
            return skip(DropReason::SpecialFile, 0, None);
        }
        let size = match entry.metadata() {
            Ok(m) => m.len(),
            Err(e) => return skip(DropReason::Unreadable, 0, Some(e.to_string())),
        };
        let file_name = entry.file_name().to_string_lossy();
        let language = self.table.by_path(&file_name);
        if language.is_none() && !LanguageTable::may_have_shebang(&file_name) {
            return skip(DropReason::UnknownLanguage, size, None);
        }
        if let Some(reason) = language.and_then(|id| self.selection.reject_language(self.table, id))
        {
            return skip(reason, size, None);
        }
        if size == 0 {
            return skip(DropReason::Empty, 0, None);
        }
        if size > self.selection.max_file_size {
            return skip(DropReason::TooLarge, size, None);
        }
        Some(Item::File(FileItem {
            repo,
            rel_path,
            abs_path: path.to_path_buf(),
            size,
            language,
        }))
    }
}

impl Iterator for DirWalk<'_> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            match self.inner.next()? {
                Ok(entry) => {
                    if let Some(item) = self.item(entry) {
                        return Some(item);
                    }
                }
                Err(err) => return Some(Item::Skip(skip_for_walk_error(&err))),
            }
        }
    }
}

fn skip_for_walk_error(err: &ignore::Error) -> SkipItem {
    let (path, is_loop) = describe(err);
    SkipItem {
        reason: if is_loop {
            DropReason::SymlinkLoop
        } else {
            DropReason::Unreadable
        },
        path: path.map(|p| p.display().to_string()).unwrap_or_default(),
        bytes: 0,
        detail: Some(err.to_string()),
    }
}

/// The path an error is about and whether it is a symlink loop.
fn describe(err: &ignore::Error) -> (Option<&Path>, bool) {
    match err {
        ignore::Error::Loop { child, .. } => (Some(child.as_path()), true),
        ignore::Error::WithPath { path, err } => {
            let (inner, is_loop) = describe(err);
            (inner.or(Some(path.as_path())), is_loop)
        }
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            describe(err)
        }
        ignore::Error::Partial(errs) => errs.first().map(describe).unwrap_or((None, false)),
        _ => (None, false),
    }
}

/// The last component of a directory path, resolving `.` and `..`.
pub fn dir_name(path: &Path) -> String {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| resolved.display().to_string())
}

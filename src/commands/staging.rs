//! Outputs are built under a temporary name beside their final path and
//! renamed into place only when complete, so an interrupted or failed command
//! never leaves a half-written file or directory at the path the user gave.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A file or directory being written at `tmp`, destined for `dest`. Dropped
/// without [`Staged::commit`], it removes what it wrote.
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    is_dir: bool,
    committed: bool,
}

fn tmp_name(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .with_context(|| format!("{} has no file name", dest.display()))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Missing parents are created, as `mkdir -p` would (a fresh cache or
    // run directory is the common case, not a typo).
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating directory {}", parent.display()))?;
    Ok(parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

impl Staged {
    /// A directory for `dest`, which must not exist or be an empty directory.
    pub fn dir(dest: &Path) -> Result<Self> {
        if dest.exists() {
            let empty = dest.is_dir()
                && std::fs::read_dir(dest)
                    .with_context(|| format!("reading {}", dest.display()))?
                    .next()
                    .is_none();
            anyhow::ensure!(
                empty,
                "{} already exists and is not an empty directory",
                dest.display()
            );
        }
        let tmp = tmp_name(dest)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            is_dir: true,
            committed: false,
        })
    }

    /// A file for `dest` (replaced if it exists).
    pub fn file(dest: &Path) -> Result<Self> {
        anyhow::ensure!(!dest.is_dir(), "{} is a directory", dest.display());
        Ok(Self {
            tmp: tmp_name(dest)?,
            dest: dest.to_path_buf(),
            is_dir: false,
            committed: false,
        })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn commit(mut self) -> Result<()> {
        if self.is_dir && self.dest.is_dir() {
            // Checked empty in `dir`; rename cannot replace a directory.
            std::fs::remove_dir(&self.dest)
                .with_context(|| format!("replacing {}", self.dest.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.dest.display())
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = if self.is_dir {
                std::fs::remove_dir_all(&self.tmp)
            } else {
                std::fs::remove_file(&self.tmp)
            };
        }
    }
}

/// A progress bar over bytes with rate and ETA (hidden when stderr is not a
/// terminal).
pub fn progress(total_bytes: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total_bytes);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{wide_bar}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Writes pretty JSON to `dir/name`.
pub fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).context("serialising JSON")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

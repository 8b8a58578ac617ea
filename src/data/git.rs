//! Git URLs as inputs: a shallow clone with the system `git` into a
//! temporary directory, removed when the returned guard drops.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot clone {url}: the `git` program is not available ({source})")]
    NoGit { url: String, source: std::io::Error },
    #[error("cannot clone {url}: creating a temporary directory: {source}")]
    TempDir { url: String, source: std::io::Error },
    #[error("cannot clone {url}: {reason}")]
    CloneFailed { url: String, reason: String },
    #[error("cannot clone {url}: no answer within {seconds} s (is the network reachable?)")]
    Timeout { url: String, seconds: u64 },
}

/// Whether an input names a remote repository rather than a local path.
pub fn is_url(input: &str) -> bool {
    ["https://", "http://", "git://", "ssh://", "file://"]
        .iter()
        .any(|p| input.starts_with(p))
        || (input.starts_with("git@") && input.contains(':'))
}

/// The repository name of a URL: its last path component without `.git`.
pub fn repo_name(url: &str) -> String {
    let trimmed = url.trim_end_matches('/').trim_end_matches(".git");
    trimmed
        .rsplit(['/', ':'])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("repo")
        .to_string()
}

/// A clone that lives as long as this value.
pub struct ClonedRepo {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub name: String,
}

/// `git clone --depth 1 URL` into a temporary directory, non-interactive
/// (no credential prompts) and killed after `timeout`.
pub fn clone(url: &str, timeout: Duration) -> Result<ClonedRepo, GitError> {
    let dir = tempfile::Builder::new()
        .prefix("qcoder-clone-")
        .tempdir()
        .map_err(|source| GitError::TempDir {
            url: url.to_string(),
            source,
        })?;
    let name = repo_name(url);
    let path = dir.path().join(&name);
    run_clone(url, &path, timeout)?;
    Ok(ClonedRepo {
        _dir: dir,
        path,
        name,
    })
}

fn run_clone(url: &str, dest: &Path, timeout: Duration) -> Result<(), GitError> {
    let mut child = Command::new("git")
        .args(["clone", "--depth", "1", "--quiet", "--no-tags", "--"])
        .arg(url)
        .arg(dest)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env(
            "GIT_SSH_COMMAND",
            "ssh -o BatchMode=yes -o ConnectTimeout=20",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| GitError::NoGit {
            url: url.to_string(),
            source,
        })?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > timeout => {
                // Kill the clone we started; its partial directory goes with the temp dir.
                let _ = child.kill();
                let _ = child.wait();
                return Err(GitError::Timeout {
                    url: url.to_string(),
                    seconds: timeout.as_secs(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(GitError::CloneFailed {
                    url: url.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| GitError::CloneFailed {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let message = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let unreachable = [
        "Could not resolve host",
        "Failed to connect",
        "Connection timed out",
        "Network is unreachable",
        "Could not read from remote repository",
        "unable to access",
    ]
    .iter()
    .any(|m| stderr.contains(m));
    let reason = if unreachable {
        format!("cannot reach the remote (no network access?): {message}")
    } else {
        format!("git clone failed ({}): {message}", output.status)
    };
    Err(GitError::CloneFailed {
        url: url.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_names() {
        assert!(is_url("https://github.com/org/repo.git"));
        assert!(is_url("git@github.com:org/repo.git"));
        assert!(!is_url("./src"));
        assert!(!is_url("/home/me/git@work"));
        assert_eq!(repo_name("https://github.com/org/repo.git"), "repo");
        assert_eq!(repo_name("git@github.com:org/my-repo"), "my-repo");
        assert_eq!(repo_name("https://host/org/repo/"), "repo");
    }
}

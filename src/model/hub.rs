//! Resolves a model argument to a local directory: either a path, or a hub id
//! `org/name[@revision]` looked up in (and downloaded into) the cache that the
//! Python `huggingface_hub` uses, so both tools share one copy.
//!
//! Cache location, as `huggingface_hub` computes it: `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`. `HF_HUB_OFFLINE=1` never touches the network.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("'{spec}' is not a local directory and not a hub id of the form org/name[@revision]")]
    BadSpec { spec: String },
    #[error("model path {} does not exist", path.display())]
    NoSuchPath { path: PathBuf },
    #[error("'{spec}' is not a local directory, and it is not in the Hugging Face cache at {} (HF_HUB_OFFLINE is set, so the hub was not asked)", cache.display())]
    NotCached { spec: String, cache: PathBuf },
    #[error("'{spec}' is not a local directory, and the Hugging Face hub could not be reached ({reason}); looked for a cached copy in {} and found none", cache.display())]
    Unreachable {
        spec: String,
        reason: String,
        cache: PathBuf,
    },
    #[error("downloading {file} of {spec} from the Hugging Face hub: {reason}")]
    Download {
        spec: String,
        file: String,
        reason: String,
    },
}

/// A parsed hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// Parses `org/name[@revision]` (or a legacy `name[@revision]`).
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| valid_part(p)) {
            return None;
        }
        Some(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    fn folder(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }

    /// The snapshot directory of this revision if the cache has its config.
    pub fn cached_snapshot(&self, cache: &Path) -> Option<PathBuf> {
        let folder = self.folder(cache);
        let is_sha =
            self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit());
        let commit = if is_sha {
            self.revision.clone()
        } else {
            std::fs::read_to_string(folder.join("refs").join(&self.revision))
                .ok()?
                .trim()
                .to_string()
        };
        let snapshot = folder.join("snapshots").join(commit);
        snapshot.join("config.json").is_file().then_some(snapshot)
    }
}

/// The hub cache directory `huggingface_hub` would use.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = env("HF_HOME") {
        return home.join("hub");
    }
    let base = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("huggingface").join("hub")
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Returns a local directory holding the model named by `spec`.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf, HubError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let looks_like_path = spec.starts_with('/')
        || spec.starts_with('.')
        || spec.starts_with('~')
        || spec.matches('/').count() > 1;
    if looks_like_path {
        return Err(HubError::NoSuchPath {
            path: path.to_path_buf(),
        });
    }
    let id = HubId::parse(spec).ok_or_else(|| HubError::BadSpec {
        spec: spec.to_string(),
    })?;
    let cache = cache_dir();
    if offline() {
        return id.cached_snapshot(&cache).ok_or(HubError::NotCached {
            spec: spec.to_string(),
            cache,
        });
    }
    download(spec, &id, &cache)
}

fn download(spec: &str, id: &HubId, cache: &Path) -> Result<PathBuf, HubError> {
    let unreachable = |reason: String| HubError::Unreachable {
        spec: spec.to_string(),
        reason,
        cache: cache.to_path_buf(),
    };
    let api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .with_retries(1)
        .build()
        .map_err(|e| unreachable(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let config = match repo.get("config.json") {
        Ok(path) => path,
        Err(e) => {
            // Offline by accident: a cached snapshot is as good as the hub's.
            if let Some(snapshot) = id.cached_snapshot(cache) {
                eprintln!(
                    "warning: the hub could not be reached ({e}); using the cached copy in {}",
                    snapshot.display()
                );
                return Ok(snapshot);
            }
            return Err(unreachable(e.to_string()));
        }
    };
    let fetch = |file: &str| {
        repo.get(file).map_err(|e| HubError::Download {
            spec: spec.to_string(),
            file: file.to_string(),
            reason: e.to_string(),
        })
    };
    match repo.get(super::weights::INDEX_FILE) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| HubError::Download {
                spec: spec.to_string(),
                file: super::weights::INDEX_FILE.into(),
                reason: e.to_string(),
            })?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| HubError::Download {
                    spec: spec.to_string(),
                    file: super::weights::INDEX_FILE.into(),
                    reason: e.to_string(),
                })?;
            let mut shards: Vec<&str> = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                fetch(shard)?;
            }
        }
        Err(_) => {
            fetch(super::weights::SINGLE_FILE)?;
        }
    }
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let _ = repo.get(optional);
    }
    Ok(config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids() {
        assert_eq!(
            HubId::parse("Qwen/Qwen2.5-Coder-0.5B@v1"),
            Some(HubId {
                repo: "Qwen/Qwen2.5-Coder-0.5B".into(),
                revision: "v1".into()
            })
        );
        assert_eq!(HubId::parse("gpt2").unwrap().revision, "main");
        assert_eq!(HubId::parse("a/b/c"), None);
        assert_eq!(HubId::parse("a/"), None);
        assert_eq!(HubId::parse("a/b@"), None);
        assert_eq!(HubId::parse("a b/c"), None);
    }

    #[test]
    fn finds_snapshots_by_ref_and_by_sha() {
        let tmp = tempfile::tempdir().unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let folder = tmp.path().join("models--org--m");
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::create_dir_all(folder.join("snapshots").join(sha)).unwrap();
        std::fs::write(folder.join("refs/main"), sha).unwrap();
        std::fs::write(folder.join("snapshots").join(sha).join("config.json"), "{}").unwrap();
        let by_ref = HubId::parse("org/m").unwrap().cached_snapshot(tmp.path());
        let by_sha = HubId::parse(&format!("org/m@{sha}"))
            .unwrap()
            .cached_snapshot(tmp.path());
        assert_eq!(by_ref, by_sha);
        assert!(by_ref.unwrap().ends_with(sha));
        assert!(HubId::parse("org/m@dev")
            .unwrap()
            .cached_snapshot(tmp.path())
            .is_none());
    }
}

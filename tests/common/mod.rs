//! Helpers shared by the integration tests: real assets, the reference
//! Python venv, and running the qcoder binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tiny committed model of `tests/fixtures/models/`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

/// Fetches (or finds in the cache) a real asset through `scripts/fetch-assets`.
pub fn asset(name: &str) -> PathBuf {
    let out = Command::new(root().join("scripts/fetch-assets"))
        .arg(name)
        .output()
        .expect("running scripts/fetch-assets");
    assert!(
        out.status.success(),
        "scripts/fetch-assets {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("fetch-assets printed no path for {name}: {stdout}"));
    PathBuf::from(&line[name.len() + 1..])
}

/// The project venv's Python (with gguf, transformers, numpy).
pub fn python() -> PathBuf {
    let venv = root().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Runs a Python script of `tests/python/` and parses its JSON output.
pub fn python_json(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> serde_json::Value {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/python").join(script));
    for a in args {
        cmd.arg(a.as_ref());
    }
    let out = cmd.output().expect("running python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed invalid JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs the qcoder binary; prints its output if it fails unexpectedly.
pub fn qcoder(args: &[&dyn AsRef<std::ffi::OsStr>], cwd: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcoder"));
    cmd.current_dir(cwd);
    for a in args {
        cmd.arg(a.as_ref());
    }
    cmd.output().expect("running qcoder")
}

pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs qcoder and asserts success.
pub fn qcoder_ok(args: &[&dyn AsRef<std::ffi::OsStr>], cwd: &Path) -> Output {
    let out = qcoder(args, cwd);
    assert!(out.status.success(), "qcoder failed:\n{}", show(&out));
    out
}

/// A cache directory for expensive test products (imported real models),
/// outside git: `$QCODER_ASSETS/../test-cache` by default.
pub fn test_cache(name: &str) -> PathBuf {
    let base = std::env::var_os("QCODER_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("qcoder/assets")
        });
    let dir = base.join("test-cache").join(name);
    std::fs::create_dir_all(&dir).expect("creating the test cache");
    dir
}

/// Imports a real GGUF asset once per qcoder build and returns the HF
/// directory. The directory is cached outside git (keyed by the binary's size
/// and mtime) and shared by every test binary: the Qwen import writes 2.5 GB,
/// and a copy per test once filled CI's disk. Read it, never write into it.
pub fn imported(asset: &str) -> PathBuf {
    // Tests run in parallel threads; one import at a time.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gguf = self::asset(asset);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_qcoder"));
    let meta = std::fs::metadata(&bin).unwrap();
    let stamp = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cache = test_cache("import");
    let key = format!("{asset}-{}-{stamp}", meta.len());
    let dir = cache.join(&key);
    if !dir.join("model.safetensors").exists() {
        // Older builds' imports of this asset are stale: drop them.
        for entry in std::fs::read_dir(&cache).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{asset}-")) && name != key {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        qcoder_ok(&[&"import", &gguf, &"-o", &dir], &cache);
    }
    dir
}

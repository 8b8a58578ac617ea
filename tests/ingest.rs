//! `qcoder ingest` end to end, against the built binary: near-dedup recall
//! and precision on a generated corpus with planted duplicates, secrets
//! absent from the output, the Parquet read back by pyarrow, git inputs,
//! dataset inputs, and bad inputs (clear error or counted skip, never a
//! crash, never a Parquet file at a final name after a kill).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use arrow_array::cast::AsArray;
use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

// ---- helpers ---------------------------------------------------------------

fn qcoder() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qcoder"))
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ingest(args: &[&str]) -> Output {
    qcoder()
        .arg("ingest")
        .args(args)
        .output()
        .expect("running qcoder")
}

fn ingest_ok(args: &[&str]) -> Output {
    let out = ingest(args);
    assert!(
        out.status.success(),
        "qcoder ingest {args:?} failed\n{}",
        show(&out)
    );
    out
}

/// Runs ingest expecting exit code 2 and a message containing every `needles`.
fn ingest_fails(args: &[&str], needles: &[&str]) -> Output {
    let out = ingest(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2 for {args:?}\n{}",
        show(&out)
    );
    assert!(!stderr.contains("panicked"), "{}", show(&out));
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}\n{}",
            show(&out)
        );
    }
    out
}

fn stats(out_dir: &Path) -> serde_json::Value {
    let text = fs::read_to_string(out_dir.join("stats.json")).expect("stats.json");
    serde_json::from_str(&text).expect("stats.json is JSON")
}

fn dropped(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["dropped"][reason]["files"].as_u64().unwrap_or(0)
}

fn write(path: &Path, content: impl AsRef<[u8]>) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, content).unwrap();
}

/// Every row of every shard: (split, repo, path, content).
#[derive(Debug, Clone)]
struct OutRow {
    split: String,
    repo: String,
    path: String,
    content: String,
    license: Option<String>,
}

fn read_output(out_dir: &Path) -> Vec<OutRow> {
    let mut names: Vec<String> = fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    names.sort();
    let mut rows = Vec::new();
    for name in names {
        let split = name.split('-').next().unwrap().to_string();
        let file = fs::File::open(out_dir.join(&name)).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch: RecordBatch = batch.unwrap();
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap()
                    .as_string::<i32>()
                    .clone()
            };
            let (repo, path, content, license) =
                (col("repo"), col("path"), col("content"), col("license"));
            for i in 0..batch.num_rows() {
                rows.push(OutRow {
                    split: split.clone(),
                    repo: repo.value(i).to_string(),
                    path: path.value(i).to_string(),
                    content: content.value(i).to_string(),
                    license: (!arrow_array::Array::is_null(&license, i))
                        .then(|| license.value(i).to_string()),
                });
            }
        }
    }
    rows
}

/// splitmix64: a deterministic generator for the test corpora.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Code-like text: Python-shaped lines over a large random vocabulary, so
/// two generated files share (almost) no 5-token shingle.
struct CodeGen {
    rng: Rng,
    vocab: Vec<String>,
}

impl CodeGen {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let vocab = (0..20_000)
            .map(|_| {
                let len = 5 + rng.below(6);
                (0..len)
                    .map(|_| (b'a' + rng.below(26) as u8) as char)
                    .collect()
            })
            .collect();
        CodeGen { rng, vocab }
    }
    fn word(&mut self) -> String {
        let i = self.rng.below(self.vocab.len());
        self.vocab[i].clone()
    }
    fn line(&mut self) -> String {
        let (a, b, c) = (self.word(), self.word(), self.word());
        let n = self.rng.below(1000);
        match self.rng.below(6) {
            0 => format!("def {a}({b}, {c}):"),
            1 => format!("    {a} = {b}.{c}({n})"),
            2 => format!("    return {a} + {b} * {n}"),
            3 => format!("    if {a} > {b}:"),
            4 => format!("        {a}.append({b}, {c})"),
            _ => format!("    # {a} {b} {c}"),
        }
    }
    fn file(&mut self, lines: usize) -> Vec<String> {
        (0..lines).map(|_| self.line()).collect()
    }
}

fn join(lines: &[String]) -> String {
    lines.join("\n") + "\n"
}

fn tokens(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| !t.is_empty())
        .collect()
}

fn jaccard(a: &str, b: &str) -> f64 {
    let shingles = |t: &str| -> HashSet<Vec<String>> {
        let toks = tokens(t);
        toks.windows(5)
            .map(|w| w.iter().map(|s| s.to_string()).collect())
            .collect()
    };
    let (sa, sb) = (shingles(a), shingles(b));
    sa.intersection(&sb).count() as f64 / sa.union(&sb).count() as f64
}

fn running_as_root() -> bool {
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid() == 0
}

// ---- near-dedup -------------------------------------------------------------

/// 400 distinct files; 60 exact copies (some with CRLF and trailing blanks);
/// 150 near-duplicates (1–2 small edits each); 60 "hard negatives" that share
/// half or three quarters of their lines with an original (Jaccard about
/// 0.33 or 0.6, below the 0.85 threshold). Originals come first
/// (the first input), so they are the representatives that must stay.
#[test]
fn near_dedup_recall_and_precision_on_planted_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let originals = tmp.path().join("a_originals");
    let copies = tmp.path().join("b_copies");
    let mut gen = CodeGen::new(42);
    let mut base: Vec<Vec<String>> = Vec::new();
    for i in 0..400 {
        let n_lines = 60 + gen.rng.below(60);
        let lines = gen.file(n_lines);
        write(
            &originals.join(format!("m{:03}/f{i:03}.py", i % 7)),
            join(&lines),
        );
        base.push(lines);
    }
    let mut planted_exact = BTreeSet::new();
    for (i, lines) in base.iter().enumerate().take(60) {
        let mut text = join(lines);
        if i % 2 == 0 {
            text = text.replace('\n', "  \r\n");
        }
        let name = format!("exact/e{i:03}.py");
        write(&copies.join(&name), text);
        planted_exact.insert(name);
    }
    let mut planted_near = BTreeMap::new();
    for k in 0..150 {
        let i = 60 + k;
        let mut lines = base[i].clone();
        let mut edits = 0;
        // Two edits can cancel (insert a line, delete it): edit until different.
        while edits < 1 + k % 2 || lines == base[i] {
            edits += 1;
            let at = gen.rng.below(lines.len());
            match gen.rng.below(3) {
                // Rename one identifier on a line.
                0 => {
                    let w = gen.word();
                    let line = lines[at].clone();
                    let victim = tokens(&line)
                        .into_iter()
                        .find(|t| t.len() > 3)
                        .unwrap_or("x")
                        .to_string();
                    lines[at] = line.replacen(&victim, &w, 1);
                }
                // Insert a comment line.
                1 => {
                    let comment = format!("    # {} {}", gen.word(), gen.word());
                    lines.insert(at, comment);
                }
                // Delete a line.
                _ => {
                    lines.remove(at);
                }
            }
        }
        let text = join(&lines);
        let name = format!("near/n{k:03}.py");
        planted_near.insert(name.clone(), jaccard(&text, &join(&base[i])));
        write(&copies.join(&name), text);
    }
    let mut hard_negatives = BTreeSet::new();
    for k in 0..60 {
        let i = 210 + k;
        let keep = base[i].len() * (1 + k % 2) / 4 + base[i].len() / 4;
        let mut lines = base[i][..keep].to_vec();
        lines.extend(gen.file(base[i].len() - keep));
        let name = format!("other/h{k:03}.py");
        write(&copies.join(&name), join(&lines));
        hard_negatives.insert(name);
    }

    let out_dir = tmp.path().join("out");
    let (orig, copy, out) = (
        originals.to_str().unwrap(),
        copies.to_str().unwrap(),
        out_dir.to_str().unwrap(),
    );
    ingest_ok(&[orig, copy, "-o", out, "--threads", "2"]);
    let rows = read_output(&out_dir);
    let kept: HashSet<(String, String)> = rows
        .iter()
        .map(|r| (r.repo.clone(), r.path.clone()))
        .collect();
    let is_kept = |repo: &str, path: &str| kept.contains(&(repo.to_string(), path.to_string()));

    // Every original is a representative and stays.
    let originals_lost: Vec<usize> = (0..400)
        .filter(|i| !is_kept("a_originals", &format!("m{:03}/f{i:03}.py", i % 7)))
        .collect();
    assert!(
        originals_lost.is_empty(),
        "originals dropped: {originals_lost:?}"
    );
    let exact_kept: Vec<&String> = planted_exact
        .iter()
        .filter(|p| is_kept("b_copies", p))
        .collect();
    assert!(exact_kept.is_empty(), "exact copies kept: {exact_kept:?}");
    let s = stats(&out_dir);
    assert_eq!(dropped(&s, "exact_duplicate"), planted_exact.len() as u64);

    let near_found = planted_near
        .keys()
        .filter(|p| !is_kept("b_copies", p))
        .count();
    let negatives_dropped: Vec<&String> = hard_negatives
        .iter()
        .filter(|p| !is_kept("b_copies", p))
        .collect();
    let near_dropped = dropped(&s, "near_duplicate");
    let recall = near_found as f64 / planted_near.len() as f64;
    // Everything dropped as a near-duplicate that was not planted as one
    // (originals and hard negatives) is a false positive.
    let precision = near_found as f64 / near_dropped.max(1) as f64;
    let j: Vec<f64> = planted_near.values().copied().collect();
    let j_min = j.iter().copied().fold(1.0, f64::min);
    let j_mean = j.iter().sum::<f64>() / j.len() as f64;
    println!(
        "near-dedup: planted {} (Jaccard min {j_min:.3}, mean {j_mean:.3}), found {near_found}, \
         dropped as near-duplicates {near_dropped}, hard negatives dropped {}: recall {recall:.3}, precision {precision:.3}",
        planted_near.len(),
        negatives_dropped.len()
    );
    assert!(recall >= 0.95, "recall {recall:.3}");
    assert!(precision >= 0.99, "precision {precision:.3}");
    assert!(
        negatives_dropped.is_empty(),
        "hard negatives dropped: {negatives_dropped:?}"
    );

    // Deterministic: one thread keeps exactly the same files.
    let out1 = tmp.path().join("out1");
    ingest_ok(&[orig, copy, "-o", out1.to_str().unwrap(), "--threads", "1"]);
    let mut a: Vec<(String, String)> = kept.into_iter().collect();
    let mut b: Vec<(String, String)> = read_output(&out1)
        .into_iter()
        .map(|r| (r.repo, r.path))
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "kept sets differ between --threads 2 and --threads 1");
}

// ---- secrets ---------------------------------------------------------------

#[test]
fn planted_secrets_never_reach_the_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("svc");
    let secrets: &[(&str, &str)] = &[
        (
            "private_key",
            "MIIEowIBAAKCAQEA7yn3bRHQ5FHMQ3sDwO0x0ZC5VYV2t4zkq0gq4RkPUNPlantedKeyBody",
        ),
        ("aws_access_key", "AKIAQ3PLANTEDKEY7XYZ"),
        ("github_token", "ghp_PlantedGithubToken0123456789abcdefABCD"),
        ("gitlab_token", "glpat-PlantedGitlab12345678"),
        ("slack_token", "xoxb-2048-PlantedSlackToken99"),
        (
            "jwt",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwbGFudGVkIn0.c2lnbmF0dXJlUGxhbnRlZDEyMw",
        ),
        ("assignment", "pL4nt3d!Passw0rd#9x"),
        ("email", "planted.person@corp-mail.io"),
    ];
    let body = |s: &str| -> String {
        format!(
            "import os\n\n\ndef connect(host, port):\n    client = Client(host, port)\n    client.open()\n    return client\n\n# {s}\n"
        )
    };
    write(
        &src.join("keys.py"),
        format!(
            "{}KEY = '''\n-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----\n'''\n",
            body("key"),
            secrets[0].1
        ),
    );
    write(
        &src.join("aws.py"),
        format!("{}AWS_ACCESS_KEY_ID = \"{}\"\n", body("aws"), secrets[1].1),
    );
    write(
        &src.join("gh.py"),
        format!("{}GH = \"{}\"\n", body("gh"), secrets[2].1),
    );
    write(
        &src.join("gl.py"),
        format!("{}GL = \"{}\"\n", body("gl"), secrets[3].1),
    );
    write(
        &src.join("slack.py"),
        format!("{}SLACK = \"{}\"\n", body("slack"), secrets[4].1),
    );
    write(
        &src.join("auth.py"),
        format!(
            "{}headers = {{'Authorization': 'Bearer {}'}}\n",
            body("jwt"),
            secrets[5].1
        ),
    );
    write(
        &src.join("db.py"),
        format!("{}DB_PASSWORD = \"{}\"\n", body("db"), secrets[6].1),
    );
    write(
        &src.join("authors.py"),
        format!(
            "{}__author__ = \"Planted Person <{}>\"\n",
            body("mail"),
            secrets[7].1
        ),
    );
    let out_dir = tmp.path().join("out");
    ingest_ok(&[
        src.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--dedup",
        "exact",
    ]);

    let rows = read_output(&out_dir);
    assert_eq!(rows.len(), 8, "all eight files are written");
    let all: String = rows
        .iter()
        .map(|r| r.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for (kind, secret) in secrets {
        assert!(
            !all.contains(secret),
            "{kind} secret {secret:?} is in the output"
        );
    }
    // Nothing of the key block survives, not even its armour.
    assert!(!all.contains("BEGIN RSA PRIVATE KEY"));
    assert!(all.contains("<SECRET>") && all.contains("<EMAIL>"));
    let s = stats(&out_dir);
    for (kind, _) in secrets {
        assert!(
            s["secrets"][kind].as_u64().unwrap_or(0) >= 1,
            "stats.secrets.{kind} not counted: {}",
            s["secrets"]
        );
    }
    assert_eq!(s["files_with_secrets"].as_u64(), Some(8));
}

// ---- read back with pyarrow ---------------------------------------------------

fn venv_python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup --test",
        python.display()
    );
    python
}

const PYARROW_CHECK: &str = r#"
import hashlib, json, os, re, sys
import pyarrow.parquet as pq
from tokenizers import Tokenizer

out, tok_path = sys.argv[1], sys.argv[2]
stats = json.load(open(os.path.join(out, "stats.json")))
tok = Tokenizer.from_file(tok_path)
names = sorted(os.listdir(out))
assert not [n for n in names if n.startswith(".") or n.endswith(".partial")], names
expected_columns = ["repo", "path", "language", "license", "content", "size_bytes", "n_lines",
                    "n_tokens", "sha256", "alnum_frac", "max_line_len", "mean_line_len"]
kept_bytes = 0
langs = {}
for split in ("train", "eval"):
    shards = [n for n in names if n.startswith(split + "-")]
    assert shards == stats["splits"][split]["shards"], (shards, stats["splits"][split])
    for i, n in enumerate(shards):
        assert re.fullmatch(rf"{split}-{i:05d}-of-{len(shards):05d}\.parquet", n), n
    rows = 0
    for n in shards:
        f = pq.ParquetFile(os.path.join(out, n))
        assert f.schema_arrow.names == expected_columns, f.schema_arrow.names
        for rg in range(f.metadata.num_row_groups):
            for c in range(f.metadata.num_columns):
                assert f.metadata.row_group(rg).column(c).compression == "ZSTD"
        t = f.read()
        assert str(t.schema.field("content").type) == "string"
        assert str(t.schema.field("size_bytes").type) == "int64"
        for r in t.to_pylist():
            data = r["content"].encode()
            assert r["size_bytes"] == len(data)
            assert r["sha256"] == hashlib.sha256(data).hexdigest()
            assert r["n_lines"] == len(r["content"].splitlines()), (r["path"], r["n_lines"])
            assert r["max_line_len"] == max(len(l) for l in r["content"].splitlines())
            assert abs(r["mean_line_len"] - sum(len(l) for l in r["content"].splitlines()) / r["n_lines"]) < 1e-9
            assert r["n_tokens"] == len(tok.encode(r["content"], add_special_tokens=False).ids), r["path"]
            kept_bytes += len(data)
            langs[r["language"]] = langs.get(r["language"], 0) + 1
        rows += t.num_rows
    assert rows == stats["splits"][split]["files"], (split, rows, stats["splits"][split])
assert kept_bytes == stats["bytes"]["kept"], (kept_bytes, stats["bytes"])
assert langs == {k: v["files"] for k, v in stats["languages"].items()}, (langs, stats["languages"])
assert stats["files"]["kept"] == sum(langs.values())
print("pyarrow check ok:", {s: stats["splits"][s]["files"] for s in ("train", "eval")}, "shards",
      {s: len(stats["splits"][s]["shards"]) for s in ("train", "eval")})
"#;

#[test]
fn pyarrow_reads_what_stats_json_says() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("proj");
    let mut gen = CodeGen::new(7);
    for i in 0..120 {
        write(
            &src.join(format!("pkg{}/mod{i}.py", i % 5)),
            join(&gen.file(30 + i % 20)),
        );
    }
    for i in 0..20 {
        let body: Vec<String> = gen.file(20).iter().map(|l| format!("// {l}")).collect();
        write(
            &src.join(format!("web/w{i}.js")),
            format!("function f{i}() {{\n{}\n}}\n", body.join("\n")),
        );
    }
    write(&src.join("crlf.py"), "x = 1\r\ny = 2\r\n");
    write(
        &src.join("README.md"),
        "# Project\n\nSome words about it.\n",
    );
    let out_dir = tmp.path().join("out");
    let tokenizer =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tokenizer.json");
    ingest_ok(&[
        src.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--split-by",
        "file",
        "--eval-fraction",
        "0.2",
        "--shard-size",
        "40KB",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
    ]);
    let s = stats(&out_dir);
    assert!(
        s["splits"]["train"]["shards"].as_array().unwrap().len() > 1,
        "--shard-size makes several shards"
    );
    assert!(s["splits"]["eval"]["files"].as_u64().unwrap() > 0);
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(PYARROW_CHECK)
        .arg(&out_dir)
        .arg(&tokenizer)
        .output()
        .unwrap();
    assert!(out.status.success(), "pyarrow check failed\n{}", show(&out));
    println!("{}", String::from_utf8_lossy(&out.stdout));

    // inspect: the directory and a shard.
    let out = qcoder().arg("inspect").arg(&out_dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text.contains("language") && text.contains("Python") && text.contains("--- row 0"),
        "{}",
        show(&out)
    );
    let shard = out_dir.join(s["splits"]["train"]["shards"][0].as_str().unwrap());
    let out = qcoder().arg("inspect").arg(&shard).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("columns      repo: Utf8"),
        "{}",
        show(&out)
    );
}

// ---- git and dataset inputs -------------------------------------------------------

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}\n{}", show(&out));
}

#[test]
fn git_repositories_local_and_by_url() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("widget");
    let mut gen = CodeGen::new(3);
    write(&repo.join("LICENSE"), "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy\n");
    write(&repo.join("src/main.py"), join(&gen.file(30)));
    write(
        &repo.join("src/util.rs"),
        format!("// util\n{}", join(&gen.file(30)).replace('#', "//")),
    );
    write(
        &repo.join("scripts/run"),
        format!(
            "#!/usr/bin/env bash\n{}",
            "echo building the widget now\n".repeat(5)
        ),
    );
    write(&repo.join(".gitignore"), "secret_build/\n");
    write(&repo.join("secret_build/gen.py"), join(&gen.file(30)));
    write(
        &repo.join("node_modules/dep/index.js"),
        "module.exports = function dependency() { return 1; };\n",
    );
    write(&repo.join(".hidden/tool.py"), join(&gen.file(30)));
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "init"]);

    let out_dir = tmp.path().join("out");
    ingest_ok(&[repo.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]);
    let rows = read_output(&out_dir);
    let paths: BTreeSet<&str> = rows.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        BTreeSet::from(["scripts/run", "src/main.py", "src/util.rs"]),
        "{rows:#?}"
    );
    assert!(rows
        .iter()
        .all(|r| r.repo == "widget" && r.license.as_deref() == Some("MIT")));

    // The same repository as a URL goes through `git clone`.
    let url = format!("file://{}", repo.display());
    let out_url = tmp.path().join("out-url");
    ingest_ok(&[&url, "-o", out_url.to_str().unwrap()]);
    let by_url = read_output(&out_url);
    let url_paths: BTreeSet<&str> = by_url.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(url_paths, paths);
    assert!(by_url.iter().all(|r| r.repo == "widget"));
}

#[test]
fn dataset_inputs_keep_repo_and_path() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gen = CodeGen::new(11);
    let mut lines = String::new();
    for i in 0..6 {
        let record = serde_json::json!({
            "repo": format!("org/r{}", i % 2),
            "path": format!("src/f{i}.py"),
            "content": join(&gen.file(25)),
            "license": "Apache-2.0",
        });
        lines.push_str(&record.to_string());
        lines.push('\n');
    }
    let gz_path = tmp.path().join("part.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        fs::File::create(&gz_path).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut gz, lines.as_bytes()).unwrap();
    gz.finish().unwrap();
    let plain = tmp.path().join("more.jsonl");
    write(
        &plain,
        format!(
            "{}\n",
            serde_json::json!({"content": join(&gen.file(25)), "path": "x.rs"})
        ),
    );

    let out_dir = tmp.path().join("out");
    ingest_ok(&[
        gz_path.to_str().unwrap(),
        plain.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    let rows = read_output(&out_dir);
    assert_eq!(rows.len(), 7);
    let f3 = rows
        .iter()
        .find(|r| r.path == "src/f3.py")
        .expect("src/f3.py");
    assert_eq!(
        (f3.repo.as_str(), f3.license.as_deref()),
        ("org/r1", Some("Apache-2.0"))
    );
    let x = rows.iter().find(|r| r.path == "x.rs").expect("x.rs");
    assert_eq!(
        x.repo, "more",
        "records without a repo belong to the file's stem"
    );

    // A Parquet dataset: our own output is one.
    let shard = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("train-")
        })
        .unwrap();
    let again = tmp.path().join("again");
    ingest_ok(&[
        shard.to_str().unwrap(),
        "-o",
        again.to_str().unwrap(),
        "--eval-fraction",
        "0",
    ]);
    let rows_again = read_output(&again);
    let train_rows = rows.iter().filter(|r| r.split == "train").count();
    assert_eq!(rows_again.len(), train_rows);
    let again: HashSet<(&str, &str)> = rows_again
        .iter()
        .map(|r| (r.repo.as_str(), r.path.as_str()))
        .collect();
    assert!(rows
        .iter()
        .filter(|r| r.split == "train")
        .all(|r| again.contains(&(r.repo.as_str(), r.path.as_str()))));
}

// ---- bad inputs -----------------------------------------------------------------

#[test]
fn bad_files_are_counted_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("messy");
    let mut gen = CodeGen::new(5);
    write(&src.join("good.py"), join(&gen.file(30)));
    write(
        &src.join("latin1.py"),
        b"# caf\xe9 = 1\nx = 'na\xefve'\n".as_slice(),
    );
    write(&src.join("empty.py"), "");
    write(
        &src.join("blob.py"),
        b"\x7fELF\x00\x01\x02binary".as_slice(),
    );
    // A 5 GB file that takes no disk: sparse.
    let huge = fs::File::create(src.join("huge.py")).unwrap();
    huge.set_len(5 << 30).unwrap();
    // A symlink loop and a symlink to a file.
    std::os::unix::fs::symlink(".", src.join("loop")).unwrap();
    std::os::unix::fs::symlink("good.py", src.join("alias.py")).unwrap();
    // A FIFO: reading it would block forever.
    let fifo = src.join("pipe.py");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    write(&src.join("data/table.csv"), "a,b\n1,2\n");

    let out_dir = tmp.path().join("out");
    let out = ingest_ok(&[src.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]);
    let s = stats(&out_dir);
    let expect = [
        ("non_utf8", 1),
        ("empty", 1),
        ("binary", 1),
        ("too_large", 1),
        ("symlink", 2),
        ("special_file", 1),
        ("data_format", 1),
    ];
    for (reason, n) in expect {
        assert_eq!(
            dropped(&s, reason),
            n,
            "{reason}: {}\n{}",
            s["dropped"],
            show(&out)
        );
    }
    assert_eq!(s["files"]["kept"].as_u64(), Some(1));

    // Following links: the loop is detected and counted, the alias read.
    let out_follow = tmp.path().join("out-follow");
    ingest_ok(&[
        src.to_str().unwrap(),
        "-o",
        out_follow.to_str().unwrap(),
        "--follow-symlinks",
    ]);
    let s = stats(&out_follow);
    assert_eq!(dropped(&s, "symlink_loop"), 1, "{}", s["dropped"]);
    assert_eq!(
        dropped(&s, "exact_duplicate"),
        1,
        "alias.py duplicates good.py: {}",
        s["dropped"]
    );
}

#[test]
fn permission_denied_is_a_counted_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("locked");
    let mut gen = CodeGen::new(9);
    write(&src.join("open.py"), join(&gen.file(30)));
    write(&src.join("secret.py"), join(&gen.file(30)));
    write(&src.join("private/inner.py"), join(&gen.file(30)));
    fs::set_permissions(src.join("secret.py"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads anything: run the binary as `nobody` so permissions bite.
    let mut cmd = if running_as_root() {
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(src.join("open.py"), fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_qcoder"),
        ]);
        c
    } else {
        qcoder()
    };
    let out_dir = tmp.path().join("out");
    let out = cmd
        .arg("ingest")
        .arg(&src)
        .arg("-o")
        .arg(&out_dir)
        .output()
        .unwrap();
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let s = stats(&out_dir);
    assert_eq!(
        dropped(&s, "unreadable"),
        2,
        "{}\n{}",
        s["dropped"],
        show(&out)
    );
    let examples = s["drop_examples"]["unreadable"].to_string();
    assert!(
        examples.contains("secret.py") && examples.contains("private"),
        "{examples}"
    );
    assert!(examples.contains("ermission denied"), "{examples}");
    assert_eq!(s["files"]["kept"].as_u64(), Some(1));

    // An unreadable input directory itself is an error, not an empty corpus.
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o000)).unwrap();
    if running_as_root() {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_qcoder"),
                "ingest",
            ])
            .arg(src.join("private"))
            .arg("-o")
            .arg(tmp.path().join("out2"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot read input directory"),
            "{}",
            show(&out)
        );
    } else {
        ingest_fails(
            &[
                src.join("private").to_str().unwrap(),
                "-o",
                tmp.path().join("out2").to_str().unwrap(),
            ],
            &["cannot read input directory"],
        );
    }
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let out = t("out");

    // A Parquet dataset without a `content` column, named in the error.
    let no_content = tmp.path().join("nocontent.parquet");
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
        "text",
        arrow_schema::DataType::Utf8,
        false,
    )]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![std::sync::Arc::new(arrow_array::StringArray::from(vec![
            "print(1)",
        ]))],
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(fs::File::create(&no_content).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    ingest_fails(
        &[no_content.to_str().unwrap(), "-o", &out],
        &["nocontent.parquet", "no `content` column", "text"],
    );
    assert!(!Path::new(&out).exists(), "no output after a failed run");

    // JSON Lines: a record without `content`, and a line that is not JSON.
    write(
        &tmp.path().join("a.jsonl"),
        "{\"content\": \"x = 1\\n\"}\n{\"text\": \"y\"}\n",
    );
    ingest_fails(&[&t("a.jsonl"), "-o", &out], &["a.jsonl:2", "content"]);
    write(
        &tmp.path().join("b.jsonl"),
        "{\"content\": \"x\"}\nnot json\n",
    );
    ingest_fails(
        &[&t("b.jsonl"), "-o", &out],
        &["b.jsonl:2", "not a valid JSON record"],
    );
    write(&tmp.path().join("c.jsonl.gz"), "this is not gzip");
    ingest_fails(&[&t("c.jsonl.gz"), "-o", &out], &["c.jsonl.gz"]);

    // A git URL that cannot be cloned (there is no network here).
    ingest_fails(
        &["https://git.invalid/team/repo.git", "-o", &out],
        &[
            "cannot clone https://git.invalid/team/repo.git",
            "cannot reach",
        ],
    );

    // Missing inputs, files that are not datasets, bad flags.
    ingest_fails(&[&t("missing"), "-o", &out], &["missing"]);
    write(&tmp.path().join("notes.txt"), "hello");
    ingest_fails(
        &[&t("notes.txt"), "-o", &out],
        &["notes.txt", "not a dataset"],
    );
    let src = tmp.path().join("src");
    write(&src.join("a.py"), "x = 1\n");
    let src = src.to_str().unwrap();
    ingest_fails(
        &[src, "-o", &out, "--languages", "Klingon"],
        &["Klingon", "known:"],
    );
    ingest_fails(
        &[src, "-o", &out, "--eval-fraction", "1.5"],
        &["--eval-fraction"],
    );
    ingest_fails(&[src, "-o", &out, "--num-perm", "100"], &["--num-perm"]);
    ingest_fails(
        &[src, "-o", &out, "--near-threshold", "1"],
        &["--near-threshold"],
    );
    ingest_fails(
        &[src, "-o", &out, "--max-file-size", "lots"],
        &["not a size"],
    );

    // Existing output: refused without --overwrite; --overwrite only replaces
    // an ingest output, never another directory.
    ingest_ok(&[src, "-o", &out]);
    ingest_fails(&[src, "-o", &out], &["already exists", "--overwrite"]);
    ingest_ok(&[src, "-o", &out, "--overwrite"]);
    ingest_fails(
        &[src, "-o", src, "--overwrite"],
        &["refusing to overwrite", "not an ingest output"],
    );
    assert!(Path::new(src).join("a.py").exists());
}

/// A run killed mid-way leaves no Parquet file at a final name. The second
/// input is a FIFO nobody writes to, so the run stalls after the first
/// batches of the directory have gone to the writer; the test kills it there.
#[test]
fn killed_run_leaves_no_final_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big");
    let mut gen = CodeGen::new(13);
    // Three batches of files: the walk of the next batch overlaps judging
    // of the current one, so the FIFO (read after the third batch) stalls
    // the run only once the first batch has reached the writer.
    for i in 0..1300 {
        write(
            &src.join(format!("d{}/f{i}.py", i % 10)),
            join(&gen.file(20)),
        );
    }
    let fifo = tmp.path().join("stall.jsonl");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let parent = tmp.path().join("outputs");
    fs::create_dir(&parent).unwrap();
    let out_dir = parent.join("corpus");
    let mut child = qcoder()
        .arg("ingest")
        .arg(&src)
        .arg(&fifo)
        .arg("-o")
        .arg(&out_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a shard in progress in the staging directory.
    let staged = |parent: &Path| -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in fs::read_dir(parent).unwrap().flatten() {
            if entry.path().is_dir() {
                found.extend(
                    fs::read_dir(entry.path())
                        .unwrap()
                        .flatten()
                        .map(|e| e.path()),
                );
            }
        }
        found
    };
    let mut waited = 0;
    while !staged(&parent)
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".partial"))
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ingest ended before it stalled on the FIFO"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        waited += 1;
        assert!(waited < 6000, "no shard appeared in 120 s");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out_dir.exists(), "the output directory appeared");
    let finals: Vec<PathBuf> = staged(&parent)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert!(
        finals.is_empty(),
        "final-named Parquet files after a kill: {finals:?}"
    );
    let leftovers: Vec<String> = fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leftovers.iter().all(|n| n.starts_with('.')),
        "only the hidden staging directory remains: {leftovers:?}"
    );
}

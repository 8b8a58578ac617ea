//! `qcoder eval --tasks fim,humaneval,latency` through the binary on the tiny
//! fixture models: the report carries every model's numbers side by side,
//! the figures are drawn, gates over the new metrics decide the exit code, and
//! bad input exits 2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{qcoder, show};

fn fixture(name: &str) -> PathBuf {
    common::root().join("tests/fixtures/models").join(name)
}

fn data(dir: &Path) -> PathBuf {
    let path = dir.join("heldout.jsonl");
    let docs = [
        "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
        "import os\nprint(os.getcwd())\n",
    ];
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::json!({ "content": d }).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Two small problems in the HumanEval format.
fn problems(dir: &Path) -> PathBuf {
    let path = dir.join("problems.jsonl");
    let p = |id: &str, prompt: &str, sol: &str, test: &str, entry: &str| {
        serde_json::json!({"task_id": id, "prompt": prompt, "canonical_solution": sol,
            "test": test, "entry_point": entry})
        .to_string()
    };
    let lines = [
        p(
            "T/0",
            "def one():\n",
            "    return 1\n",
            "def check(c):\n    assert c() == 1\n",
            "one",
        ),
        p(
            "T/1",
            "def two():\n",
            "    return 2\n",
            "def check(c):\n    assert c() == 2\n",
            "two",
        ),
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn eval(args: &[&str], cwd: &Path) -> Output {
    // One thread: the fixture models are tiny, and on a busy 2-core machine
    // two libtorch threads per step mostly wait for each other.
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"--threads", &"1", &"eval", &"--device", &"cpu"];
    for a in args {
        all.push(a);
    }
    qcoder(&all, cwd)
}

#[test]
fn fim_humaneval_latency_report() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let problems = problems(tmp.path());
    let base = format!("base={}", fixture("qwen2").display());
    let other = format!("other={}", fixture("qwen2-swa").display());
    let out = tmp.path().join("report");
    let run = |tasks: &str, limit: &str, gate: &str| {
        eval(
            &[
                "-m",
                &base,
                "-m",
                &other,
                "--data",
                data.to_str().unwrap(),
                "--humaneval",
                problems.to_str().unwrap(),
                "--tasks",
                tasks,
                "--limit",
                limit,
                "--gate",
                gate,
                "-o",
                out.to_str().unwrap(),
            ],
            tmp.path(),
        )
    };
    let ok = run("fim,humaneval,latency", "2", "fim_accept>=0");
    assert_eq!(ok.status.code(), Some(0), "{}", show(&ok));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        let h = &m["humaneval"];
        assert_eq!(h["problems"], 2, "{m}");
        let pass = h["pass_at_1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&pass));
        let fim = &m["fim"]["scores"];
        assert_eq!(fim["samples"], 2);
        for k in ["exact_match", "accept_rate", "edit_similarity"] {
            let v = fim[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{k} = {v}");
        }
        let lat = &m["latency"];
        assert_eq!(lat["samples"], 2);
        for t in lat["timings"].as_array().unwrap() {
            assert_eq!(
                t["new_tokens"], 64,
                "every latency sample makes 64 tokens: {t}"
            );
        }
        let (p50, p99) = (
            lat["total_ms"]["p50"].as_f64().unwrap(),
            lat["total_ms"]["p99"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99);
        assert!(lat["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    // Both models saw the same FIM samples.
    let spans = |m: &serde_json::Value| {
        m["fim"]["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["middle"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(spans(&models[0]), spans(&models[1]));
    let sandbox = &report["humaneval"]["sandbox"]["isolation"];
    assert_eq!(sandbox["seccomp"], true, "{sandbox}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## HumanEval",
        "## Fill-in-the-middle",
        "## Latency",
        "| base |",
        "| other |",
    ] {
        assert!(md.contains(needle), "{needle} missing from\n{md}");
    }
    for svg in ["quality.svg", "latency.svg", "latency_cdf.svg"] {
        let body = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(body.contains("<svg") && body.contains("base"), "{svg}");
        assert!(md.contains(&format!("]({svg})")));
    }

    // Relative and absolute gates over the new metrics: a bar no model clears.
    let fail = run("humaneval", "1", "humaneval>=base+2");
    assert_eq!(fail.status.code(), Some(1), "{}", show(&fail));
    assert!(String::from_utf8_lossy(&fail.stdout).contains("FAIL"));
    let fail = run("latency", "1", "latency_p99_ms<0.001");
    assert_eq!(fail.status.code(), Some(1), "{}", show(&fail));
}

#[test]
fn bad_eval_input_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let m = fixture("qwen2");
    let out = tmp.path().join("r");
    let no_split = tmp.path().join("ingested");
    std::fs::create_dir(&no_split).unwrap();
    std::fs::write(no_split.join("stats.json"), "{}").unwrap();
    let missing = tmp.path().join("nope/HumanEval.jsonl.gz");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--data", data.to_str().unwrap(), "--tasks", "ppl,mbpp"],
            "unknown task `mbpp`",
        ),
        (vec!["--tasks", "fim"], "--data is needed"),
        (
            vec!["--data", no_split.to_str().unwrap(), "--tasks", "fim"],
            "no eval split",
        ),
        (
            vec![
                "--tasks",
                "humaneval",
                "--humaneval",
                missing.to_str().unwrap(),
            ],
            "HumanEval data not found",
        ),
        (
            vec![
                "--data",
                data.to_str().unwrap(),
                "--tasks",
                "fim",
                "--gate",
                "humaneval>=0.5",
            ],
            "needs the task `humaneval`",
        ),
        (
            vec![
                "--data",
                data.to_str().unwrap(),
                "--tasks",
                "fim",
                "--gate",
                "fim_accept>=base*2",
            ],
            "--gate 'fim_accept>=base*2'",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["-m", m.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(extra);
        let o = eval(&args, tmp.path());
        assert_eq!(o.status.code(), Some(2), "{}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "expected `{needle}`:\n{}",
            show(&o)
        );
    }
}

/// A checkpoint the int4 kernels cannot run (3 bits) is refused before any
/// model loads, naming the model and the flag; with `--allow-dequant` it runs
/// dequantized, with a note, and gives the same perplexity as `--dequantize`
/// (with the same dense output head).
#[test]
fn fast_path_refusal_and_allow_dequant() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let base = fixture("qwen2");
    let q3 = tmp.path().join("q3");
    let quant = common::qcoder(
        &[
            &"--threads",
            &"1",
            &"quantize",
            &"-m",
            &base,
            &"-o",
            &q3,
            &"--method",
            &"rtn",
            &"--bits",
            &"3",
            &"--group-size",
            &"32",
        ],
        tmp.path(),
    );
    assert!(quant.status.success(), "{}", show(&quant));
    let out = tmp.path().join("r");
    let run = |flags: &[&str]| {
        let mut args = vec![
            "-m",
            base.to_str().unwrap(),
            "-m",
            q3.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--tasks",
            "ppl",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(flags);
        eval(&args, tmp.path())
    };
    let refused = run(&[]);
    assert_eq!(refused.status.code(), Some(2), "{}", show(&refused));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("q3") && err.contains("3 bits") && err.contains("--allow-dequant"),
        "{}",
        show(&refused)
    );
    assert!(!out.exists(), "a refused eval wrote {}", out.display());

    let ppl = |o: &Output| -> f64 {
        assert!(o.status.success(), "{}", show(o));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        report["models"][1]["ppl"]["ppl"].as_f64().unwrap()
    };
    // The dense head, as --dequantize has it (the fast path's default head is int8).
    let allowed = run(&["--allow-dequant", "--head", "keep"]);
    assert!(
        String::from_utf8_lossy(&allowed.stderr).contains("run dequantized"),
        "{}",
        show(&allowed)
    );
    let a = ppl(&allowed);
    std::fs::remove_dir_all(&out).unwrap();
    let b = ppl(&run(&["--dequantize"]));
    assert!(
        a.is_finite() && a == b,
        "--allow-dequant {a} vs --dequantize {b}"
    );
}

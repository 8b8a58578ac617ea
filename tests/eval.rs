//! `qcoder eval` through the binary: report files, gates and exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn qcoder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcoder"))
        .args(args)
        .output()
        .expect("running qcoder")
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn data(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("heldout.jsonl");
    let docs = [
        "def add(a, b):\n    return a + b\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n",
        "import os\nprint(os.getcwd())\n",
    ];
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::json!({ "content": d }).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn report_and_gates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let (a, b) = (fixture("qwen2"), fixture("qwen2-swa"));
    let base = format!("base={}", a.display());
    let other = format!("other={}", b.display());
    let out_dir = tmp.path().join("report");
    let run = |gate: &str| {
        qcoder(&[
            "eval",
            "-m",
            &base,
            "-m",
            &other,
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
            "--window",
            "16",
            "--stride",
            "8",
            "--gate",
            gate,
            "-o",
            out_dir.to_str().unwrap(),
        ])
    };
    let pass = run("ppl<=1000000");
    assert_eq!(pass.status.code(), Some(0), "{}", show(&pass));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    let ppl = models[0]["ppl"]["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{report}");
    assert_eq!(
        models[0]["ppl"]["tokens"], models[1]["ppl"]["tokens"],
        "same data for every model"
    );
    assert!(std::fs::read_to_string(out_dir.join("report.md"))
        .unwrap()
        .contains("| base |"));

    // A gate that cannot hold: exit 1, and the report says which.
    let fail = run("ppl<0.5*base");
    assert_eq!(fail.status.code(), Some(1), "{}", show(&fail));
    assert!(String::from_utf8_lossy(&fail.stdout).contains("FAIL"));
}

#[test]
fn bad_eval_input_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let m = fixture("qwen2");
    let out = tmp.path().join("r");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "-m",
            m.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        qcoder(&a)
    };
    for (extra, needle) in [
        (&["--tasks", "mmlu"][..], "unknown task `mmlu`"),
        (&["--gate", "ppl<=1.1*base"][..], "at least two --model"),
        (&["--gate", "acc>3"][..], "unknown metric `acc`"),
    ] {
        let o = args(extra);
        assert_eq!(o.status.code(), Some(2), "{}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{}",
            show(&o)
        );
    }
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let o = qcoder(&[
        "eval",
        "-m",
        m.to_str().unwrap(),
        "--data",
        empty.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no text found"),
        "{}",
        show(&o)
    );
}

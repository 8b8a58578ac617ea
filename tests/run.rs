//! `qcoder run pipeline.toml` through the binary on the tiny Qwen2 fixture:
//! every stage runs once, a second run skips them all, a changed input reruns
//! the stages downstream of it, and bad pipeline files stop before any work.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{fixture, show};

/// A small code tree: a few Python files, enough for a train and an eval split.
fn code_tree(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..12 {
        let text = format!(
            "def f{i}(x):\n    \"\"\"Adds {i}.\"\"\"\n    total = x + {i}\n    for k in range({i}):\n        total += k * x\n    return total\n\n\nclass C{i}:\n    def __init__(self):\n        self.v = f{i}({i})\n"
        );
        std::fs::write(dir.join(format!("mod{i}.py")), text).unwrap();
    }
}

fn pipeline(dir: &Path, gate: &str) -> PathBuf {
    let text = format!(
        r#"
[pipeline]
work_dir = "work"

[model]
path = "{model}"

[ingest]
inputs = ["code"]
split_by = "file"
eval_fraction = 0.3
dedup = "exact"

[finetune]
recipe = "recipe.toml"

[finetune.train]
max_steps = 3

[quantize]
method = "gptq"
bits = 4
group_size = 32
samples = 4
seq_len = 32

[eval]
tasks = ["ppl"]
window = 64
stride = 32
gate = ["{gate}"]

[export]
format = "gguf"
type = "q8_0"
"#,
        model = fixture("qwen2").display()
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    // The pipeline sets the recipe's model, data and output.
    let recipe = r#"
[model]
path = "set-by-the-pipeline"

[data]
train = []
seq_len = 32
fim_rate = 0.5

[lora]
r = 4
alpha = 8
target_modules = "all-linear"

[train]
lr = 1e-2
warmup_steps = 1
max_steps = 50
micro_batch = 2
seed = 7

[eval]
every = 2
max_batches = 2

[output]
dir = "set-by-the-pipeline"
"#;
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
    path
}

fn stages_that_ran(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("   "))
        .filter(|l| l.split_whitespace().nth(1) == Some("ran"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn runs_every_stage_then_resumes_from_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    code_tree(&dir.join("code"));
    pipeline(dir, "ppl<=1.5*base");

    let out = qcoder(dir, &["run", "pipeline.toml"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        stages_that_ran(&out),
        ["ingest", "finetune", "quantize", "eval", "export"],
        "{}",
        show(&out)
    );
    let work = dir.join("work");
    // The recipe's max_steps = 50, overridden by [finetune.train].
    let metrics = std::fs::read_to_string(work.join("finetune/metrics.jsonl")).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().rfind(|l| l.contains("\"loss\"")).unwrap()).unwrap();
    assert_eq!(last["step"], 3, "{metrics}");
    assert!(work.join("finetune/adapter/adapter_config.json").is_file());
    assert!(work.join("finetune/merged/config.json").is_file());
    assert!(work.join("data/stats.json").is_file());
    assert!(work.join("quantized/quantize_config.json").is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("report/report.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = report["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "tuned", "quantized"], "{report}");
    let gguf = work.join("model-q8_0.gguf");
    assert_eq!(&std::fs::read(&gguf).unwrap()[..4], b"GGUF");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join(".qcoder/quantize.json")).unwrap())
            .unwrap();
    assert_eq!(state["command"][0], "quantize", "{state}");

    // Nothing changed: nothing runs.
    let out = qcoder(dir, &["run", "pipeline.toml"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(stages_that_ran(&out).is_empty(), "{}", show(&out));

    // A new file in the corpus changes the data, hence every later stage.
    std::fs::write(
        dir.join("code/extra.py"),
        "def extra(y):\n    return [v * 2 for v in range(y)]\n",
    )
    .unwrap();
    let out = qcoder(dir, &["run", "pipeline.toml"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        stages_that_ran(&out),
        ["ingest", "finetune", "quantize", "eval", "export"],
        "{}",
        show(&out)
    );

    // A stage's output removed by hand is rebuilt.
    std::fs::remove_file(&gguf).unwrap();
    let out = qcoder(dir, &["run", "pipeline.toml"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stages_that_ran(&out), ["export"], "{}", show(&out));

    // --force reruns a stage that is up to date.
    let out = qcoder(dir, &["run", "pipeline.toml", "--force", "eval"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stages_that_ran(&out), ["eval"], "{}", show(&out));

    // Later stages depend on the fine-tuned model's content, not on the run's
    // timings: a rerun that trains the same weights changes nothing after it.
    let out = qcoder(dir, &["run", "pipeline.toml", "--force", "finetune"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stages_that_ran(&out), ["finetune"], "{}", show(&out));
}

#[test]
fn a_failed_gate_stops_the_job_with_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    code_tree(&dir.join("code"));
    // A 4-bit model is never 50% better than its base.
    pipeline(dir, "ppl<=0.5*base");
    let out = qcoder(dir, &["run", "pipeline.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(!dir.join("work/model-q8_0.gguf").exists(), "{}", show(&out));
    // The verdict is remembered: rerunning does not sneak past the gate.
    let out = qcoder(dir, &["run", "pipeline.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stages_that_ran(&out).is_empty(), "{}", show(&out));
}

#[test]
fn bad_pipeline_files_stop_before_any_stage_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    code_tree(&dir.join("code"));
    let good = std::fs::read_to_string(pipeline(dir, "ppl<=1.5*base")).unwrap();
    let cases: [(&str, String, &str); 6] = [
        (
            "misspelled section",
            good.replace("[quantize]", "[quantise]"),
            "did you mean `quantize`",
        ),
        (
            "misspelled flag",
            good.replace("group_size = 32", "grop_size = 32"),
            "[quantize]",
        ),
        (
            "key the pipeline sets",
            good.replace("[eval]\n", "[eval]\ndata = \"x\"\n"),
            "[eval] data",
        ),
        (
            "missing model",
            good.replace("[model]\npath", "[model]\npaht"),
            "unknown key `paht`",
        ),
        (
            "misspelled recipe key",
            good.replace("max_steps = 3", "max_stepz = 3"),
            "did you mean `max_steps`",
        ),
        (
            "missing input",
            good.replace("inputs = [\"code\"]", "inputs = [\"nowhere\"]"),
            "nowhere",
        ),
    ];
    for (what, text, needle) in cases {
        std::fs::write(dir.join("bad.toml"), text).unwrap();
        let out = qcoder(dir, &["run", "bad.toml"]);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{what}: {}", show(&out));
        assert!(
            !dir.join("work/.qcoder").exists(),
            "{what}: a stage ran: {}",
            show(&out)
        );
    }
}

fn qcoder(dir: &Path, args: &[&str]) -> Output {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    common::qcoder(&args, dir)
}

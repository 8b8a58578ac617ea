//! `qcoder export --format safetensors`: sharded HF directories that
//! transformers loads unchanged, with logits equal to qcoder's own on the
//! exported directory.

mod common;

use std::path::Path;

use qcoder::model::{self, LoadOptions};
use tch::{Device, Kind, Tensor};

fn qcoder_logits(dir: &Path, ids: &[i64]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let m = model::load_dir(
        dir,
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    m.forward(&Tensor::from_slice(ids).unsqueeze(0), None)
        .unwrap()
        .get(0)
}

#[test]
fn sharded_exports_load_in_transformers_with_qcoders_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen2", "qwen3", "llama"] {
        let model = common::root().join("tests/fixtures/models").join(name);
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap())
                .unwrap();
        let ids: Vec<i64> = reference["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        for (dtype, torch_dtype) in [("f32", "torch.float32"), ("bf16", "torch.bfloat16")] {
            let out = tmp.path().join(format!("{name}-{dtype}"));
            common::qcoder_ok(
                &[
                    &"export",
                    &"--model",
                    &model,
                    &"--format",
                    &"safetensors",
                    &"--dtype",
                    &dtype,
                    &"--max-shard-size",
                    &"100KB",
                    &"-o",
                    &out,
                ],
                tmp.path(),
            );
            let shards: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
                .collect();
            assert!(
                shards.len() > 1,
                "{name}: expected several shards, got {shards:?}"
            );
            assert!(out.join("model.safetensors.index.json").is_file());
            let raw = tmp.path().join(format!("{name}-{dtype}.logits"));
            let info = common::python_json(
                "hf_logits.py",
                &[&out, &raw, &serde_json::to_string(&ids).unwrap()],
            );
            assert_eq!(
                info["dtype"], torch_dtype,
                "{name}: dtype transformers loaded"
            );
            let shape: Vec<i64> = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let bytes = std::fs::read(&raw).unwrap();
            let theirs = Tensor::from_data_size(&bytes, &shape, Kind::Float);
            let ours = qcoder_logits(&out, &ids);
            let diff = (&ours - &theirs).abs().max().double_value(&[]);
            println!(
                "{name} {dtype}: {} shards, max |Δlogit| qcoder vs transformers = {diff:.2e}",
                shards.len()
            );
            assert!(diff <= 1e-4, "{name} {dtype}: max |Δlogit| {diff:e}");
        }
    }
}

/// `export --adapter` merges a PEFT adapter first: the same weights as
/// `qcoder merge`, and not the base's.
#[test]
fn export_with_an_adapter_equals_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::fixture("qwen2");
    let adapter = common::root().join("tests/fixtures/lora/init");
    let exported = tmp.path().join("exported");
    let merged = tmp.path().join("merged");
    let cwd = tmp.path();
    let (b, a, e, m) = (&base, &adapter, &exported, &merged);
    common::qcoder_ok(
        &[
            &"export",
            &"-m",
            b,
            &"--adapter",
            a,
            &"--format",
            &"safetensors",
            &"--dtype",
            &"f32",
            &"-o",
            e,
        ],
        cwd,
    );
    common::qcoder_ok(&[&"merge", &"-m", b, &"--adapter", a, &"-o", m], cwd);
    let ids = [1i64, 7, 42, 99, 3, 250];
    let (le, lm, lb) = (
        qcoder_logits(e, &ids),
        qcoder_logits(m, &ids),
        qcoder_logits(b, &ids),
    );
    assert_eq!(
        (&le - &lm).abs().max().double_value(&[]),
        0.0,
        "export --adapter differs from merge"
    );
    assert!(
        (&le - &lb).abs().max().double_value(&[]) > 1e-3,
        "the adapter changed nothing"
    );
    // No temporary merge directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

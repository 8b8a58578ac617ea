//! The real `qcoder` binary on good and bad input: every bad input exits 2
//! with a message naming the file, tensor or field, and never panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn qcoder(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcoder"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running qcoder")
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts exit code 2, no panic, and that stderr mentions every needle.
fn assert_error(out: &Output, needles: &[&str]) {
    let text = show(out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panic: {text}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "backtrace hint: {text}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {text}");
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

/// A temp copy of a fixture model.
fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&fixture(name), &dir);
    (tmp, dir)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

fn generate_json(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let out = qcoder(&args, &[]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
}

#[test]
fn generate_prints_json_with_ids_text_and_speed() {
    let dir = fixture("qwen2");
    let v = generate_json(
        &dir,
        &["--prompt", "def add(a, b):\n", "--max-new-tokens", "8"],
    );
    let ids = v["token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 8, "{v}");
    assert!(v["text"].is_string());
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["prompt_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn fim_prompt_uses_the_fim_tokens() {
    let dir = fixture("qwen3");
    let v = generate_json(
        &dir,
        &[
            "--fim-prefix",
            "def f(x):\n    ",
            "--fim-suffix",
            "\n    return y\n",
            "--max-new-tokens",
            "4",
        ],
    );
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let id_of = |t: &str| {
        tok["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["content"] == t)
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let prompt: Vec<u64> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(prompt[0], id_of("<|fim_prefix|>"));
    assert_eq!(*prompt.last().unwrap(), id_of("<|fim_middle|>"));
    assert!(prompt.contains(&id_of("<|fim_suffix|>")));
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let dir = fixture("llama");
    let args = [
        "--prompt",
        "import os\n",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
    ];
    let run = |seed: &str| {
        let mut a = args.to_vec();
        a.extend(["--seed", seed]);
        generate_json(&dir, &a)["token_ids"].clone()
    };
    assert_eq!(run("3"), run("3"));
}

#[test]
fn plain_output_streams_the_completion() {
    let dir = fixture("qwen2");
    let out = qcoder(
        &[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            "x = ",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", show(&out));
    let json = generate_json(&dir, &["-p", "x = ", "--max-new-tokens", "6"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim_end_matches('\n'),
        json["text"].as_str().unwrap().trim_end_matches('\n')
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("tok/s"));
}

#[test]
fn inspect_describes_a_sharded_model() {
    let dir = fixture("llama");
    let out = qcoder(&["inspect", dir.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "LlamaForCausalLM",
        "2 layers",
        "model-00001-of-00003.safetensors",
        "model.layers.1.mlp.down_proj.weight",
        "f16",
        "tied",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let single = fixture("qwen2").join("model.safetensors");
    let out = qcoder(&["inspect", single.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("model.layers.0.self_attn.q_proj.bias"));
}

#[test]
fn missing_config_is_named() {
    let (_tmp, dir) = scratch("qwen2");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["no config.json", dir.to_str().unwrap()]);
}

#[test]
fn malformed_config_is_named() {
    let (_tmp, dir) = scratch("qwen2");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"qwen2\", ").unwrap();
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["config.json", "EOF"]);
}

#[test]
fn config_missing_a_field_is_named() {
    let (_tmp, dir) = scratch("qwen2");
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["config.json", "hidden_size"]);
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let (_tmp, dir) = scratch("qwen2");
    edit_config(&dir, |c| c["model_type"] = "gpt_neox".into());
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["gpt_neox", "qwen2, qwen3, llama, mistral"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = scratch("qwen2");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.down_proj.weight")
        .collect();
    let data = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, data).unwrap();
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["model.layers.1.mlp.down_proj.weight", "missing"]);
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let (_tmp, dir) = scratch("qwen2");
    edit_config(&dir, |c| c["intermediate_size"] = 96.into());
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(
        &out,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "[96, 64]",
        ],
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let (_tmp, dir) = scratch("qwen2");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["model.safetensors", "truncated or corrupt"]);
}

#[test]
fn corrupt_safetensors_header_is_reported() {
    let (_tmp, dir) = scratch("qwen2");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn missing_shard_is_named() {
    let (_tmp, dir) = scratch("llama");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["model-00002-of-00003.safetensors"]);
}

#[test]
fn missing_tokenizer_is_named() {
    let (_tmp, dir) = scratch("qwen2");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let out = qcoder(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"], &[]);
    assert_error(&out, &["tokenizer.json", dir.to_str().unwrap()]);
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let (_tmp, dir) = scratch("qwen2");
    edit_config(&dir, |c| c["max_position_embeddings"] = 8.into());
    let prompt = "def f(x):\n    return x * 2 + 1  # a comment that is long enough\n".repeat(3);
    let out = qcoder(
        &["generate", "-m", dir.to_str().unwrap(), "-p", &prompt],
        &[],
    );
    assert_error(
        &out,
        &[
            "prompt is",
            "context is 8 tokens",
            "max_position_embeddings",
        ],
    );
}

#[test]
fn cuda_where_there_is_none() {
    if tch::Cuda::is_available() {
        return; // only meaningful on a machine without a GPU
    }
    let dir = fixture("qwen2");
    let out = qcoder(
        &[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            "x",
            "--device",
            "cuda",
        ],
        &[],
    );
    assert_error(&out, &["--device cuda", "no CUDA device"]);
    let out = qcoder(
        &[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            "x",
            "--device",
            "tpu",
        ],
        &[],
    );
    assert_error(&out, &["--device 'tpu'"]);
}

#[test]
fn bad_dtype_is_named() {
    let dir = fixture("qwen2");
    let out = qcoder(
        &[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            "x",
            "--dtype",
            "int3",
        ],
        &[],
    );
    assert_error(&out, &["--dtype 'int3'"]);
}

#[test]
fn fim_on_a_tokenizer_without_fim_tokens() {
    let (_tmp, dir) = scratch("qwen2");
    let path = dir.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for t in tok["added_tokens"].as_array_mut().unwrap() {
        let c = t["content"].as_str().unwrap().replace("fim", "xim");
        t["content"] = c.into();
    }
    std::fs::write(&path, tok.to_string()).unwrap();
    let out = qcoder(
        &["generate", "-m", dir.to_str().unwrap(), "--fim-prefix", "a"],
        &[],
    );
    assert_error(&out, &["fill-in-the-middle"]);
}

/// A minimal Python `huggingface_hub` cache with one snapshot of a fixture.
fn hub_cache(repo: &str, model: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let sha = "3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a";
    let folder = home
        .path()
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), sha).unwrap();
    copy_dir(&fixture(model), &folder.join("snapshots").join(sha));
    home
}

#[test]
fn hub_ids_resolve_from_the_shared_cache_offline() {
    let home = hub_cache("tiny-org/tiny-qwen", "qwen2");
    let hf_home = home.path().to_str().unwrap();
    let out = qcoder(
        &[
            "generate",
            "-m",
            "tiny-org/tiny-qwen",
            "-p",
            "x = ",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        &[("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(out.status.success(), "{}", show(&out));
    let out = qcoder(
        &["generate", "-m", "tiny-org/absent", "-p", "x"],
        &[("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")],
    );
    assert_error(
        &out,
        &[
            "tiny-org/absent",
            "HF_HUB_OFFLINE",
            &format!("{hf_home}/hub"),
        ],
    );
}

#[test]
fn unreachable_hub_says_so_and_names_the_cache() {
    let home = hub_cache("tiny-org/tiny-qwen", "qwen2");
    let hf_home = home.path().to_str().unwrap();
    // Port 9 (discard) on loopback refuses connections: a hub that cannot be reached.
    let env = [("HF_HOME", hf_home), ("HF_ENDPOINT", "http://127.0.0.1:9")];
    let out = qcoder(&["generate", "-m", "tiny-org/not-cached", "-p", "x"], &env);
    assert_error(&out, &["could not be reached", &format!("{hf_home}/hub")]);
    // A cached model still works when the hub is unreachable.
    let out = qcoder(
        &[
            "generate",
            "-m",
            "tiny-org/tiny-qwen",
            "-p",
            "x",
            "--max-new-tokens",
            "2",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn nonexistent_local_path_is_named() {
    let out = qcoder(&["generate", "-m", "./no/such/model", "-p", "x"], &[]);
    assert_error(&out, &["./no/such/model", "does not exist"]);
}

/// `libtorch_cuda.so` must stay a NEEDED library whenever the installed
/// libtorch has it; otherwise CUDA is invisible on GPU machines (tch-rs #980).
#[test]
fn binary_keeps_libtorch_cuda_linked() {
    let libtorch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".libtorch/lib");
    if !libtorch.join("libtorch_cuda.so").exists() {
        println!("installed libtorch has no CUDA library; nothing to check");
        return;
    }
    let out = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_qcoder")])
        .output()
        .expect("readelf (binutils) is needed for this test");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains("Shared library: [libtorch_cuda.so]"),
        "libtorch_cuda.so is not NEEDED:\n{dynamic}"
    );
    assert!(
        dynamic.contains("RUNPATH") || dynamic.contains("RPATH"),
        "no rpath:\n{dynamic}"
    );
}

#[test]
fn binary_runs_without_ld_library_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_qcoder"))
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
}

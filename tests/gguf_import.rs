//! `qcoder import` on the real GGUF files: the imported Qwen2.5-Coder-0.5B
//! fills in the Fibonacci loop, the imported SmolLM2 (llama, permuted q/k)
//! knows Paris, and the tokenizer rebuilt from `tokenizer.ggml.*` encodes code
//! exactly as Qwen's own `tokenizer.json` does. Bad GGUF input exits 2 with a
//! message and leaves no output directory.

mod common;

use std::path::Path;

use qcoder::tokenizer::CodeTokenizer;

fn generate_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"generate", &"--model", &dir];
    for a in args {
        all.push(a);
    }
    all.push(&"--json");
    let out = common::qcoder_ok(&all, dir);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{}", common::show(&out)))
}

#[test]
fn imported_qwen_coder_fills_in_fibonacci() {
    let dir = common::imported("qwen-coder-gguf");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // Facts of this file (../shared/ASSETS.md): separate output.weight,
    // rope base 1e6, rms eps 1e-6, 24 layers, 14/2 heads.
    assert_eq!(config["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["rope_theta"], 1e6);
    assert_eq!(config["rms_norm_eps"], 1e-6);
    assert_eq!(config["num_hidden_layers"], 24);
    assert_eq!(config["num_key_value_heads"], 2);
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    let eos: Vec<u64> = generation["eos_token_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        eos.contains(&151645) && eos.contains(&151643),
        "eos {eos:?}"
    );

    let out = generate_json(
        &dir,
        &[
            "--fim-prefix",
            "def fibonacci(n):\n    ",
            "--fim-suffix",
            "\n    return a\n",
            "--max-new-tokens",
            "32",
        ],
    );
    let text = out["text"].as_str().unwrap();
    println!("middle: {text:?}");
    for part in ["a, b = 0, 1", "for _ in range(n):", "a, b = b, a + b"] {
        assert!(text.contains(part), "middle {text:?} lacks {part:?}");
    }
    assert!(text.starts_with("a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b"));
}

#[test]
fn imported_smollm2_knows_paris() {
    let dir = common::imported("smollm2-gguf");
    let out = generate_json(
        &dir,
        &[
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "3",
        ],
    );
    let text = out["text"].as_str().unwrap();
    println!("continuation: {text:?}");
    assert!(text.starts_with(" Paris"), "continuation {text:?}");
}

#[test]
fn rebuilt_qwen_tokenizer_encodes_like_qwen_tokenizer_json() {
    let dir = common::imported("qwen-coder-gguf");
    let ours = CodeTokenizer::from_model_dir(&dir).unwrap();
    let reference = CodeTokenizer::from_model_dir(&common::asset("qwen3-tokenizer")).unwrap();
    let samples = [
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n\tprintln!(\"{v:?}\");\n}\n",
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 12345678); return 0; }\r\n",
        "SELECT id, name FROM users WHERE created_at >= '2024-01-01' ORDER BY id DESC;",
        "    // naïve café — déjà vu ✓ 日本語のコメント 😀\n\n\n   \t  trailing   ",
        "x=1;y=22;z=333;w=4444  # it's, we'll, I'd, they're, I'M\n",
        "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|file_sep|>src/lib.rs<|repo_name|>qcoder",
    ];
    for s in samples {
        let a = ours.encode(s, false).unwrap();
        let b = reference.encode(s, false).unwrap();
        assert_eq!(a, b, "ids differ for {s:?}");
        assert!(a.iter().all(|&id| id <= 151664));
        assert_eq!(ours.decode(&a, false).unwrap(), s);
    }
    assert_eq!(ours.fim(), reference.fim());
    assert_eq!(
        ours.stop_ids(&[]),
        reference
            .stop_ids(&[])
            .into_iter()
            .filter(|&i| i <= 151664)
            .collect::<Vec<_>>()
    );
}

/// Writes `bytes` as a .gguf file, runs `qcoder import` on it and checks for
/// exit code 2, a message containing `expect`, and no output directory.
fn rejects(bytes: &[u8], expect: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let out_dir = tmp.path().join("out");
    let out = common::qcoder(&[&"import", &path, &"-o", &out_dir], tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", common::show(&out));
    assert!(
        stderr.contains(expect),
        "stderr lacks {expect:?}:\n{}",
        common::show(&out)
    );
    assert!(
        stderr.contains("bad.gguf"),
        "message does not name the file:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out_dir.exists(), "output directory left behind");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn bad_gguf_files_exit_2_with_a_message() {
    let real = std::fs::read(common::asset("smollm2-gguf")).unwrap();
    rejects(b"GGML\x03\0\0\0", "not a GGUF file");
    rejects(
        b"GGUF\x07\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        "version 7",
    );
    rejects(&real[..real.len() / 2], "beyond the end of the file");
    rejects(&real[..5000], "which cannot fit in the");
    rejects(&real[..12], "file is truncated: tensor count at byte 8");
    // A tensor count of 2^60 in an otherwise real header.
    let mut huge = real.clone();
    huge[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    rejects(&huge, "tensor count");
    // Change general.architecture ("llama", the first string value) to an
    // architecture qcoder does not convert.
    let mut arch = real.clone();
    let at = arch.windows(5).position(|w| w == b"llama").unwrap();
    arch[at..at + 5].copy_from_slice(b"gemma");
    rejects(&arch, "architecture `gemma` is not supported");
}

#[test]
fn inspect_shows_what_gguf_py_reads() {
    let path = common::asset("smollm2-gguf");
    let reference = common::python_json("gguf_ref.py", &[&"read", &path]);
    let tmp = tempfile::tempdir().unwrap();
    let out = common::qcoder_ok(&[&"inspect", &path], tmp.path());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    for (key, entry) in reference["metadata"].as_object().unwrap() {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(key.as_str()))
            .unwrap_or_else(|| panic!("key {key} not listed:\n{text}"));
        if let Some(n) = entry.get("len") {
            assert!(
                line.contains(&format!("({n} items)")) || n.as_u64() <= Some(8),
                "{line}"
            );
        }
    }
    for t in reference["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("tensor {name} not listed"));
        assert_eq!(line.split_whitespace().nth(1), t["type"].as_str(), "{line}");
    }
}

//! The tokenizer against Python `tokenizers`: the real Qwen3 tokenizer
//! (fetched by scripts/fetch-assets) gives the same ids for code and FIM text as
//! the reference ids in tests/fixtures/qwen3_tokenizer_ref.json, and both merge
//! encodings of tokenizer.json load.

use std::path::{Path, PathBuf};
use std::process::Command;

use qcoder::tokenizer::CodeTokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fetches (or finds in the cache) a registry asset and returns its path.
fn asset(name: &str) -> PathBuf {
    let out = Command::new(root().join("scripts/fetch-assets"))
        .arg(name)
        .output()
        .expect("running scripts/fetch-assets");
    assert!(
        out.status.success(),
        "scripts/fetch-assets {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    PathBuf::from(line.split_whitespace().nth(1).expect("NAME PATH line"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn real_qwen3_tokenizer_matches_python_tokenizers() {
    let dir = asset("qwen3-tokenizer");
    let tok = CodeTokenizer::from_model_dir(&dir).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/qwen3_tokenizer_ref.json")).unwrap(),
    )
    .unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, ids(&case["ids"]), "case {}", case["name"]);
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            text,
            "round trip of {}",
            case["name"]
        );
    }
    // The FIM prompt built from ids equals the tokenised FIM string.
    let parts = &reference["fim_parts"];
    let fim = tok
        .fim_prompt(
            parts["prefix"].as_str().unwrap(),
            parts["suffix"].as_str().unwrap(),
        )
        .unwrap();
    let fim_case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "fim")
        .unwrap();
    assert_eq!(fim, ids(&fim_case["ids"]));
}

#[test]
fn real_qwen3_special_and_fim_ids() {
    let tok = CodeTokenizer::from_model_dir(&asset("qwen3-tokenizer")).unwrap();
    let fim = tok.fim().expect("Qwen has FIM tokens");
    assert_eq!(
        (fim.prefix, fim.middle, fim.suffix),
        (151659, 151660, 151661)
    );
    assert_eq!(
        (fim.pad, fim.repo_name, fim.file_sep),
        (Some(151662), Some(151663), Some(151664))
    );
    assert_eq!(tok.token_id("<|endoftext|>"), Some(151643));
    assert_eq!(tok.token_id("<|im_end|>"), Some(151645));
    let stops = tok.stop_ids(&[]);
    for id in [151643, 151645, 151662] {
        assert!(stops.contains(&id), "{id} not a stop token: {stops:?}");
    }
}

fn merges_form(path: &Path) -> &'static str {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    if v["model"]["merges"][0].is_string() {
        "string"
    } else {
        "pair"
    }
}

#[test]
fn both_merges_encodings_load_and_agree() {
    let legacy = root().join("tests/fixtures/models/qwen2/tokenizer.json");
    let pairs = root().join("tests/fixtures/tokenizer/tokenizer.json");
    assert_eq!(merges_form(&legacy), "string");
    assert_eq!(merges_form(&pairs), "pair");
    let a = CodeTokenizer::from_file(&legacy).unwrap();
    let b = CodeTokenizer::from_file(&pairs).unwrap();
    let text = "def heappush(heap, item):\n    heap.append(item)\n";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert!(
        a.encode(text, true).unwrap().len() < text.len(),
        "merges were applied"
    );
}

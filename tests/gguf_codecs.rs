//! qcoder's block decoders against llama.cpp's own Python package: every
//! tensor of both real GGUF files (Qwen2.5-Coder-0.5B Q4_K_M: Q4_K, Q5_0,
//! Q6_K, Q8_0, F32; SmolLM2-135M Q4_1: Q4_1, Q8_0, F32), decoded by qcoder and
//! by `gguf.quants.dequantize`, must hash to the same sha256 — bit-for-bit
//! equality of all values.

mod common;

use qcoder::gguf::GgufFile;
use sha2::{Digest, Sha256};

fn check_file(asset: &str) {
    let path = common::asset(asset);
    let reference = common::python_json("gguf_ref.py", &[&"hashes", &path]);
    let reference = reference.as_object().expect("an object of tensors");
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(file.header.tensors.len(), reference.len(), "tensor count");
    let mut types = std::collections::BTreeMap::new();
    for t in &file.header.tensors {
        let r = &reference[&t.name];
        assert_eq!(r["type"].as_str(), Some(t.ty.name()), "{}: type", t.name);
        let values = file.decode(t).unwrap_or_else(|e| panic!("{e}"));
        let mut hasher = Sha256::new();
        for v in &values {
            hasher.update(v.to_le_bytes());
        }
        let ours = format!("{:x}", hasher.finalize());
        assert_eq!(
            Some(ours.as_str()),
            r["sha256"].as_str(),
            "{}: {} values decoded from {} differ from gguf.quants.dequantize",
            t.name,
            values.len(),
            t.ty
        );
        *types.entry(t.ty.name()).or_insert(0) += 1;
    }
    println!(
        "{asset}: all {} tensors bit-identical; by type {types:?}",
        reference.len()
    );
}

#[test]
fn qwen_coder_q4_k_m_decodes_like_gguf_py() {
    check_file("qwen-coder-gguf");
}

#[test]
fn smollm2_q4_1_decodes_like_gguf_py() {
    check_file("smollm2-gguf");
}

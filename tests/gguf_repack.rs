//! A GPTQ checkpoint exported to GGUF keeps its integers: with 4 bits and
//! groups of 32 consecutive columns, every quantized linear decodes from the
//! GGUF to exactly the checkpoint's dequantized weights (Q4_0, symmetric) or
//! to them up to the f16 rounding of the offset (Q4_1, asymmetric); other
//! geometries are re-rounded and the export says so.

use std::path::Path;
use std::process::Output;

mod common;
use common::{fixture, show};

use qcoder::gguf::GgufFile;
use qcoder::model::{read_config, Checkpoint};
use qcoder::quant::checkpoint::{read_linear, QuantFormat};

fn quantize(model: &Path, out: &Path, extra: &[&str]) {
    let calib = out.with_extension("txt");
    let text = "def add(a, b):\n    return a + b\n\nclass Stack:\n    pass\n".repeat(40);
    std::fs::write(&calib, text).unwrap();
    let mut args = vec![
        "quantize",
        "-m",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--group-size",
        "32",
    ];
    args.extend_from_slice(extra);
    let run = qcoder(&args);
    assert!(run.status.success(), "{}", show(&run));
}

fn export(model: &Path, ty: &str, out: &Path) -> String {
    let run = qcoder(&[
        "export",
        "-m",
        model.to_str().unwrap(),
        "--format",
        "gguf",
        "--type",
        ty,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", show(&run));
    String::from_utf8_lossy(&run.stderr).into_owned()
}

const LINEARS: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Largest |GGUF − checkpoint| over every quantized linear, with rows put
/// back in HF order for llama's permuted q/k (`unpermute`).
fn max_difference(quantized: &Path, gguf: &Path, unpermute: bool) -> (f32, f32) {
    let config = read_config(quantized).unwrap();
    let format = QuantFormat::from_config(&config).unwrap().unwrap();
    let ckpt = Checkpoint::open_dir(quantized).unwrap();
    let file = GgufFile::open(gguf).unwrap();
    let (mut worst, mut largest) = (0f32, 0f32);
    for layer in 0..config.num_hidden_layers {
        for (hf, gg) in LINEARS {
            let prefix = format!("model.layers.{layer}.{hf}");
            let info = file.tensor(&format!("blk.{layer}.{gg}.weight")).unwrap();
            let shape = info.torch_shape();
            let (out_f, in_f) = (shape[0], shape[1]);
            let q = read_linear(&ckpt, &prefix, format, in_f, out_f, false).unwrap();
            let want = Vec::<f32>::try_from(&q.dequantize().contiguous().view(-1)).unwrap();
            let mut got = file.decode(info).unwrap();
            if unpermute && (gg == "attn_q" || gg == "attn_k") {
                let heads = if gg == "attn_q" {
                    config.num_attention_heads
                } else {
                    config.n_kv_heads()
                };
                got = qcoder::gguf::hf::unpermute_qk(&got, in_f, heads);
            }
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((a - b).abs());
                largest = largest.max(b.abs());
            }
        }
    }
    (worst, largest)
}

#[test]
fn symmetric_gptq_becomes_q4_0_with_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, unpermute) in [("qwen2", false), ("llama", true)] {
        let quantized = tmp.path().join(format!("{name}-gptq"));
        quantize(&fixture(name), &quantized, &[]);
        let gguf = tmp.path().join(format!("{name}.gguf"));
        let log = export(&quantized, "q4_0", &gguf);
        assert!(log.contains("repacked"), "{log}");
        assert!(!log.contains("rounded again"), "{log}");
        assert_eq!(
            max_difference(&quantized, &gguf, unpermute).0,
            0.0,
            "{name}"
        );
    }
}

#[test]
fn asymmetric_gptq_becomes_q4_1_and_other_geometries_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let quantized = tmp.path().join("asym");
    quantize(&fixture("qwen2"), &quantized, &["--asym"]);
    let gguf = tmp.path().join("asym.gguf");
    let log = export(&quantized, "q4_1", &gguf);
    assert!(!log.contains("rounded again"), "{log}");
    // Only m = −s·z is rounded to f16, by at most half an ulp: 2⁻¹¹·|m|, and
    // |m| = s·z is at most the largest |weight| of its block.
    let (worst, largest) = max_difference(&quantized, &gguf, false);
    assert!(
        worst <= largest * 2f32.powi(-11) * 1.01,
        "{worst} vs {largest}"
    );

    // Q4_0 cannot hold an asymmetric grid, act-order groups are not blocks:
    // both are exported by rounding again, and the log says why.
    let log = export(&quantized, "q4_0", &tmp.path().join("asym-q4_0.gguf"));
    assert!(
        log.contains("rounded again") && log.contains("zero point"),
        "{log}"
    );
    let act = tmp.path().join("act");
    quantize(&fixture("qwen2"), &act, &["--act-order"]);
    let log = export(&act, "q4_0", &tmp.path().join("act.gguf"));
    assert!(log.contains("act-order"), "{log}");
}

fn qcoder(args: &[&str]) -> Output {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    common::qcoder(&args, Path::new("."))
}

//! `qcoder quantize` end to end on a tiny model: every method and bit width
//! writes a checkpoint whose integers an independent Python unpacker (the
//! AutoGPTQ / AutoAWQ conventions, scripts/check/dequantize.py) turns into
//! exactly the weights qcoder reads back; the checkpoints load for
//! generation; bad input exits 2 with a message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qcoder::model::weights::ShardedWriter;
use qcoder::model::{read_config, Checkpoint};
use qcoder::quant::checkpoint::{read_linear, QuantFormat};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

/// Calibration text: a slice of the Python standard library on this machine.
fn calib_dir() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("json")
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

fn quantize(model: &str, out: &Path, extra: &[&str]) -> Output {
    let calib = calib_dir();
    let mut args = vec![
        "quantize",
        "--model",
        model,
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    qcoder(&args)
}

/// Writes every linear as qcoder dequantizes it, for the Python check.
fn dump_dequantized(dir: &Path, out: &Path) {
    let config = read_config(dir).unwrap();
    let format = QuantFormat::from_config(&config).unwrap().unwrap();
    let ckpt = Checkpoint::open_dir(dir).unwrap();
    let h = config.hidden_size;
    let attn = config.num_attention_heads * config.head_dim();
    let kv = config.n_kv_heads() * config.head_dim();
    let f = config.intermediate_size;
    let tmp = tempfile::tempdir().unwrap();
    let mut writer = ShardedWriter::new(tmp.path(), u64::MAX);
    for i in 0..config.num_hidden_layers {
        for (name, in_f, out_f) in [
            ("self_attn.q_proj", h, attn),
            ("self_attn.k_proj", h, kv),
            ("self_attn.v_proj", h, kv),
            ("self_attn.o_proj", attn, h),
            ("mlp.gate_proj", h, f),
            ("mlp.up_proj", h, f),
            ("mlp.down_proj", f, h),
        ] {
            let prefix = format!("model.layers.{i}.{name}");
            let q = read_linear(&ckpt, &prefix, format, in_f, out_f, false).unwrap();
            writer
                .add(format!("{prefix}.weight"), &q.dequantize())
                .unwrap();
        }
    }
    let files = writer.finish().unwrap();
    std::fs::copy(&files[0], out).unwrap();
}

fn python_agrees(dir: &Path) {
    let ours = dir.with_extension("deq.safetensors");
    dump_dequantized(dir, &ours);
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/check/dequantize.py"))
        .arg(dir)
        .arg(&ours)
        .output()
        .expect("the project venv (scripts/setup --test)");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn every_method_and_width_matches_the_reference_unpacking() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen2");
    let cases: &[(&str, &[&str])] = &[
        (
            "gptq4-g32-act",
            &[
                "--method",
                "gptq",
                "--bits",
                "4",
                "--group-size",
                "32",
                "--act-order",
            ],
        ),
        (
            "gptq3-g32-asym",
            &[
                "--method",
                "gptq",
                "--bits",
                "3",
                "--group-size",
                "32",
                "--asym",
            ],
        ),
        (
            "gptq2-rowwise",
            &["--method", "gptq", "--bits", "2", "--group-size", "-1"],
        ),
        (
            "rtn8-g64",
            &["--method", "rtn", "--bits", "8", "--group-size", "64"],
        ),
        (
            "awq4-g32",
            &["--method", "awq", "--bits", "4", "--group-size", "32"],
        ),
    ];
    for (name, args) in cases {
        let out_dir = tmp.path().join(name);
        let out = quantize(model.to_str().unwrap(), &out_dir, args);
        assert!(out.status.success(), "{name}: {}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("rel. output error"),
            "{name}: no error table\n{stdout}"
        );
        python_agrees(&out_dir);
        // The checkpoint loads and generates (widths other than 4 bits run
        // dequantized, which the fast path does only when asked).
        let gen = qcoder(&[
            "generate",
            "-m",
            out_dir.to_str().unwrap(),
            "-p",
            "def f(x):",
            "--max-new-tokens",
            "4",
            "--json",
            "--device",
            "cpu",
            "--allow-dequant",
        ]);
        assert!(gen.status.success(), "{name}: {}", show(&gen));
    }
}

#[test]
fn calibrated_gptq_beats_rtn_at_three_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen2");
    let mean_error = |args: &[&str], name: &str| -> f64 {
        let out = quantize(model.to_str().unwrap(), &tmp.path().join(name), args);
        assert!(out.status.success(), "{}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let line = stdout
            .lines()
            .find(|l| l.contains("mean rel. error"))
            .expect("summary line");
        line.split("mean rel. error ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .and_then(|s| s.parse().ok())
            .expect("a number")
    };
    let gptq = mean_error(
        &["--method", "gptq", "--bits", "3", "--group-size", "32"],
        "gptq",
    );
    let rtn = mean_error(
        &["--method", "rtn", "--bits", "3", "--group-size", "32"],
        "rtn",
    );
    println!("3-bit mean relative layer error: gptq {gptq:.3e}, rtn {rtn:.3e}");
    assert!(gptq < rtn, "gptq {gptq} not below rtn {rtn}");
}

/// The range search is on by default for GPTQ at 2 and 3 bits only; the
/// summary line names it when it ran.
#[test]
fn range_search_is_the_default_for_low_bit_gptq_only() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen2");
    let cases: &[(&[&str], bool)] = &[
        (&["--method", "gptq", "--bits", "3"], true),
        (&["--method", "gptq", "--bits", "2"], true),
        (&["--method", "gptq", "--bits", "3", "--no-mse"], false),
        (&["--method", "gptq", "--bits", "4"], false),
        (&["--method", "gptq", "--bits", "4", "--mse"], true),
        (&["--method", "rtn", "--bits", "3"], false),
        (&["--method", "rtn", "--bits", "3", "--mse"], true),
    ];
    for (i, (args, searched)) in cases.iter().enumerate() {
        let mut args = args.to_vec();
        args.extend(["--group-size", "32"]);
        let out = quantize(
            model.to_str().unwrap(),
            &tmp.path().join(format!("q{i}")),
            &args,
        );
        assert!(out.status.success(), "{args:?}: {}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("mean rel. error"))
            .expect("summary line");
        assert_eq!(line.contains(" mse:"), *searched, "{args:?}: {line}");
    }
}

fn assert_error(out: &Output, needles: &[&str]) {
    let text = show(out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{text}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {text}");
    }
}

#[test]
fn bad_quantize_input_is_refused_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen2");
    let m = model.to_str().unwrap();
    let out = tmp.path().join("out");
    // 48 does not divide the 64-wide attention nor the 128-wide MLP input.
    assert_error(
        &quantize(m, &out, &["--group-size", "48"]),
        &["--group-size 48", "64 inputs", "32, 64"],
    );
    assert_error(
        &quantize(
            m,
            &out,
            &["--method", "awq", "--bits", "3", "--group-size", "32"],
        ),
        &["awq does not support 3-bit"],
    );
    // Options that do not fit together.
    for (args, needle) in [
        (
            &[
                "--act-order",
                "--order",
                "group-aware",
                "--group-size",
                "32",
            ][..],
            "--act-order contradicts --order group-aware",
        ),
        (
            &["--order", "group-aware", "--group-size", "-1"][..],
            "--order group-aware needs groups",
        ),
        (
            &["--method", "awq", "--mse", "--group-size", "32"][..],
            "--mse applies to GPTQ and RTN",
        ),
        (
            &["--mse", "--no-mse", "--group-size", "32"][..],
            "cannot be used with",
        ),
    ] {
        assert_error(&quantize(m, &out, args), &[needle]);
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    // Too little calibration text for one window.
    let small = tmp.path().join("small.txt");
    std::fs::write(&small, "x = 1\n").unwrap();
    let o = qcoder(&[
        "quantize",
        "-m",
        m,
        "--calib",
        small.to_str().unwrap(),
        "--seq-len",
        "64",
        "--group-size",
        "32",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_error(&o, &["too few calibration tokens", "small.txt"]);
    // GPTQ without calibration data.
    let o = qcoder(&[
        "quantize",
        "-m",
        m,
        "--group-size",
        "32",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_error(&o, &["needs calibration text", "--calib"]);
    assert!(!out.exists(), "nothing written on refusal");
    // An already quantized model.
    let q = tmp.path().join("q");
    assert!(quantize(m, &q, &["--method", "rtn", "--group-size", "32"])
        .status
        .success());
    assert_error(
        &quantize(q.to_str().unwrap(), &out, &["--group-size", "32"]),
        &["already quantized"],
    );
    // An existing output.
    assert_error(
        &quantize(m, &q, &["--method", "rtn", "--group-size", "32"]),
        &["exists", "--overwrite"],
    );
}

/// The int4 fast path computes what the dequantized f32 reference computes:
/// the same greedy tokens, logits within 1e-3 (the kernels accumulate in
/// their own blocked order; per layer the difference is ~1e-6 relative, see
/// `infer::quantized` tests, and two layers of a tiny model amplify it little).
#[test]
fn fast_int4_path_matches_the_dequantized_reference() {
    use qcoder::infer::quantized::FastPath;
    use qcoder::infer::{generate, SamplingParams};
    use qcoder::model::{load_dir, load_dir_with, LoadOptions};
    use tch::{Device, Kind, Tensor};

    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [
        (
            "gptq-act",
            &[
                "--method",
                "gptq",
                "--bits",
                "4",
                "--group-size",
                "32",
                "--act-order",
            ][..],
        ),
        (
            "awq",
            &["--method", "awq", "--bits", "4", "--group-size", "32"][..],
        ),
    ] {
        let dir = tmp.path().join(name);
        let out = quantize(fixture("qwen2").to_str().unwrap(), &dir, extra);
        assert!(out.status.success(), "{}", show(&out));
        let opts = LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        };
        let reference = load_dir(&dir, opts).unwrap();
        let fast_path = FastPath::new(false);
        let fast = load_dir_with(&dir, opts, &fast_path).unwrap();
        assert!(
            fast.layers[0].mlp.down_proj.dense_weight().is_none(),
            "{name}: not on the int4 kernels"
        );
        let prompt: Vec<i64> = (0..24).map(|i| (i * 37 % 480 + 10) as i64).collect();
        let input = Tensor::from_slice(&prompt).unsqueeze(0);
        let _guard = tch::no_grad_guard();
        let a = reference.forward(&input, None).unwrap();
        let b = fast.forward(&input, None).unwrap();
        let diff = (&a - &b).abs().max().double_value(&[]);
        println!("{name}: max |Δlogit| fast vs dequantized = {diff:.2e}");
        assert!(diff < 1e-3, "{name}: {diff}");
        // Decode (one row at a time) runs the int4 kernels, which multiply
        // with the activations rounded to int8 per block of 32 (as llama.cpp
        // does). For a block of roughly normal activations the step is
        // ~2.5σ/127 and the rounding error uniform within ±step/2, so one
        // product is off by ~0.6% RMS of its size; a token's path through
        // the fixture's two layers crosses nine products in sequence (q/k/v,
        // o, gate/up and down per layer, then the head), so the logits may
        // differ by ~√9·0.6% ≈ 2% RMS of their spread (a bound of 3%), and
        // by a few times that at the worst vocabulary entry. Teacher-forced on the reference's greedy
        // tokens, the fast path must pick the same token wherever the
        // reference's top-two margin exceeds twice that step's largest
        // difference.
        let ids: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
        let tokens = generate(
            &reference,
            &ids,
            16,
            &[],
            SamplingParams::default(),
            &mut |_| {},
        )
        .unwrap()
        .tokens;
        let mut caches = [
            reference.new_cache(1, 64).unwrap(),
            fast.new_cache(1, 64).unwrap(),
        ];
        let mut feed: Vec<i64> = prompt.clone();
        let (mut worst, mut decided) = (0f64, 0);
        let mut rms = 0f64;
        for (step, &next) in tokens.iter().enumerate() {
            let input = Tensor::from_slice(&feed).unsqueeze(0);
            let [ca, cb] = &mut caches;
            let la = reference.forward_last(&input, Some(ca)).unwrap().get(0);
            let lb = fast.forward_last(&input, Some(cb)).unwrap().get(0);
            let diff = (&la - &lb).abs().max().double_value(&[]);
            let spread = la.std(true).double_value(&[]);
            worst = worst.max(diff / spread);
            let step_rms = (&la - &lb).square().mean(None).sqrt().double_value(&[]);
            rms = rms.max(step_rms / spread);
            let top = la.topk(2, 0, true, true).0;
            let margin = top.double_value(&[0]) - top.double_value(&[1]);
            if margin > 2.0 * diff {
                decided += 1;
                assert_eq!(
                    lb.argmax(0, false).int64_value(&[]),
                    i64::from(next),
                    "{name}: step {step}: margin {margin:.2e}, |Δ| {diff:.2e}"
                );
            }
            feed = vec![i64::from(next)];
        }
        println!(
            "{name}: decode |Δlogit| / std: RMS {rms:.2e}, max {worst:.2e}; {decided}/16 steps decided"
        );
        assert!(rms < 3e-2, "{name}: RMS {rms}");
        assert!(worst < 0.15, "{name}: max {worst}");
        assert!(
            decided >= 8,
            "{name}: only {decided} steps had a clear winner"
        );
    }
}

/// The batch-1 decode step on raw slices (every linear on the int4 CPU
/// kernels) against libtorch's path on the same model: token by token with
/// the KV cache versus one uncached forward of the whole prompt, whose few
/// rows go through the same kernels row by row. Every architecture of the
/// fixtures (Qwen2 with q/k/v biases, Qwen3's q/k norms, Llama, a sliding
/// window shorter than the prompt, act-order's input permutation).
///
/// Tolerance: both paths do the same f32 arithmetic up to the summation
/// order inside norms, softmax and attention (~1e-6 relative); but each
/// product rounds its input to int8 per block of 32, and an input that
/// moved by one f32 ulp can round to the neighbouring step, changing that
/// product by up to one step (~0.4% of the block's largest activation)
/// times the weights. Measured: well under 1e-3 of the logits' spread on
/// these fixtures; the bound asserted is 1e-2.
#[test]
fn raw_decode_step_matches_the_libtorch_path() {
    use qcoder::infer::quantized::FastPath;
    use qcoder::model::{load_dir_with, LoadOptions};
    use tch::{Device, Kind, Tensor};

    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
    };
    let _guard = tch::no_grad_guard();
    for (fixture_name, extra) in [
        ("qwen2", &["--method", "rtn"][..]),
        ("qwen3", &["--method", "rtn"][..]),
        ("llama", &["--method", "rtn"][..]),
        ("qwen2-swa", &["--method", "rtn"][..]),
        ("qwen2", &["--method", "gptq", "--act-order"][..]),
    ] {
        let dir = tmp.path().join(format!("{fixture_name}-{}", extra.len()));
        let mut args = vec!["--bits", "4", "--group-size", "32"];
        args.extend_from_slice(extra);
        let out = quantize(fixture(fixture_name).to_str().unwrap(), &dir, &args);
        assert!(out.status.success(), "{}", show(&out));
        let fast_path = FastPath::new(false);
        let model = load_dir_with(&dir, opts, &fast_path).unwrap();
        assert!(
            model.decodes_on_slices(),
            "{fixture_name}: not on the raw path"
        );
        let prompt: Vec<i64> = (0..12).map(|i| (i * 53 % 400 + 7) as i64).collect();
        let n = prompt.len() as i64;
        let whole = model
            .forward(&Tensor::from_slice(&prompt).view([1, n]), None)
            .unwrap()
            .view([n, -1]);
        let mut cache = model.new_cache(1, 32).unwrap();
        let stepped: Vec<Tensor> = prompt
            .iter()
            .map(|&t| {
                model
                    .forward(&Tensor::from_slice(&[t]).view([1, 1]), Some(&mut cache))
                    .unwrap()
                    .view([1, -1])
            })
            .collect();
        let stepped = Tensor::cat(&stepped, 0);
        let spread = (whole.max() - whole.min()).double_value(&[]);
        let diff = (&stepped - &whole).abs().max().double_value(&[]) / spread;
        println!("{fixture_name} {extra:?}: max |Δlogit| / spread = {diff:.2e}");
        assert!(diff < 1e-2, "{fixture_name} {extra:?}: {diff}");
    }
}

//! The decoder against transformers' own numbers (tests/fixtures/models/*,
//! written by scripts/gen_fixtures.py): f32 logits within 1e-4 over a 32-token
//! prompt, the same 16 greedy tokens, and the same results with and without the
//! KV cache.

use std::path::PathBuf;

use qcoder::infer::{generate, generate_batch_until, SamplingParams, StopReason};
use qcoder::model::{self, CausalLm, Checkpoint, LoadOptions};
use tch::{Device, Kind, Tensor};

const MODELS: &[&str] = &["qwen2", "qwen2-swa", "qwen3", "llama", "mistral"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

struct Reference {
    prompt: Vec<i64>,
    greedy: Vec<u32>,
    logits: Tensor,
}

fn reference(name: &str) -> Reference {
    let dir = fixture(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids = |key: &str| -> Vec<i64> {
        meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    let logits = Checkpoint::open(&dir.join("reference.safetensors"))
        .unwrap()
        .tensor_any_shape("logits", Kind::Float, Device::Cpu)
        .unwrap();
    Reference {
        prompt: ids("prompt_ids"),
        greedy: ids("greedy_tokens").into_iter().map(|t| t as u32).collect(),
        logits,
    }
}

fn load(name: &str) -> CausalLm {
    model::load_dir(
        &fixture(name),
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        },
    )
    .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn logits_match_transformers() {
    let _guard = tch::no_grad_guard();
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let input = Tensor::from_slice(&r.prompt).unsqueeze(0);
        let logits = model.forward(&input, None).unwrap().get(0);
        assert_eq!(logits.size(), r.logits.size(), "{name}");
        let diff = max_abs_diff(&logits, &r.logits);
        println!("{name}: max |Δlogit| = {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: max |Δlogit| = {diff:e} > 1e-4");
    }
}

#[test]
fn kv_cache_gives_the_same_logits() {
    let _guard = tch::no_grad_guard();
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let n = r.prompt.len() as i64;
        let input = Tensor::from_slice(&r.prompt).unsqueeze(0);
        let full = model.forward(&input, None).unwrap().get(0);
        // A 20-token prefill, a 7-token chunk, then one token at a time.
        let mut cache = model.new_cache(1, r.prompt.len()).unwrap();
        let mut pieces = Vec::new();
        let mut start = 0;
        for len in [20, 7].into_iter().chain(std::iter::repeat(1)) {
            if start >= n {
                break;
            }
            let chunk = input.narrow(1, start, len.min(n - start));
            pieces.push(model.forward(&chunk, Some(&mut cache)).unwrap().get(0));
            start += len;
        }
        assert_eq!(cache.len(), r.prompt.len());
        let cached = Tensor::cat(&pieces, 0);
        let diff = max_abs_diff(&cached, &full);
        println!("{name}: cached vs uncached max |Δ| = {diff:.2e}");
        assert!(
            diff <= 1e-5,
            "{name}: cached vs uncached differ by {diff:e}"
        );
    }
}

#[test]
fn greedy_tokens_match_transformers_with_and_without_cache() {
    let _guard = tch::no_grad_guard();
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let prompt: Vec<u32> = r.prompt.iter().map(|&t| t as u32).collect();
        let out = generate(
            &model,
            &prompt,
            r.greedy.len(),
            &[],
            SamplingParams::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            out.tokens, r.greedy,
            "{name}: greedy tokens with the KV cache"
        );

        // Without a cache: re-run the whole sequence every step.
        let mut seq = r.prompt.clone();
        let mut tokens = Vec::new();
        for _ in 0..r.greedy.len() {
            let logits = model
                .forward(&Tensor::from_slice(&seq).unsqueeze(0), None)
                .unwrap();
            let next = logits
                .get(0)
                .get(seq.len() as i64 - 1)
                .argmax(-1, false)
                .int64_value(&[]);
            tokens.push(next as u32);
            seq.push(next);
        }
        assert_eq!(tokens, r.greedy, "{name}: greedy tokens without a cache");
    }
}

/// Prompts of different lengths generated in one left-padded batch give
/// each row what it gives alone: last-position logits within 1e-4 after
/// the padded prefill and after decode steps, and the same greedy tokens;
/// a row that its caller stops early ends there while the others go on.
/// (qwen2-swa's 8-token window is narrower than the padding of the short
/// rows, so windowed padded masks are covered too.)
#[test]
fn batched_generation_matches_one_prompt_at_a_time() {
    let _guard = tch::no_grad_guard();
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let base: Vec<u32> = r.prompt.iter().map(|&t| t as u32).collect();
        let prompts: Vec<Vec<u32>> = vec![
            base.clone(),
            base[3..8].to_vec(),
            base[10..27].iter().rev().copied().collect(),
            vec![base[1]],
        ];
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();

        // The padded prefill and three decode steps, logits row by row.
        let longest = prompts[0].len();
        let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        let mut cache = model.new_padded_cache(&pads, longest + 3).unwrap();
        let mut ids = vec![0i64; prompts.len() * longest];
        for (row, p) in prompts.iter().enumerate() {
            for (j, &t) in p.iter().enumerate() {
                ids[row * longest + pads[row] + j] = t as i64;
            }
        }
        let input = Tensor::from_slice(&ids).view([prompts.len() as i64, longest as i64]);
        let mut batched = vec![model.forward_last(&input, Some(&mut cache)).unwrap()];
        let steps: [[i64; 4]; 3] = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]];
        for step in steps {
            let input = Tensor::from_slice(&step).view([4, 1]);
            batched.push(model.forward_last(&input, Some(&mut cache)).unwrap());
        }
        for (row, p) in prompts.iter().enumerate() {
            let mut cache = model.new_cache(1, p.len() + 3).unwrap();
            let ids: Vec<i64> = p.iter().map(|&t| t as i64).collect();
            let input = Tensor::from_slice(&ids).unsqueeze(0);
            let mut alone = vec![model.forward_last(&input, Some(&mut cache)).unwrap()];
            for step in steps {
                let input = Tensor::from_slice(&[step[row]]).view([1, 1]);
                alone.push(model.forward_last(&input, Some(&mut cache)).unwrap());
            }
            for (k, (b, a)) in batched.iter().zip(&alone).enumerate() {
                let diff = max_abs_diff(&b.get(row as i64), &a.get(0));
                assert!(diff <= 1e-4, "{name} row {row} pass {k}: |Δlogit| {diff:e}");
            }
        }

        // Greedy generation; the caller stops row 2 after its third token.
        let mut seen = [0usize; 4];
        let out = generate_batch_until(
            &model,
            &rows,
            12,
            &[],
            SamplingParams::default(),
            &mut |row, _| {
                seen[row] += 1;
                row == 2 && seen[row] == 3
            },
        )
        .unwrap();
        assert_eq!(out.len(), prompts.len());
        for (row, p) in prompts.iter().enumerate() {
            let alone =
                generate(&model, p, 12, &[], SamplingParams::default(), &mut |_| {}).unwrap();
            let want = if row == 2 {
                assert_eq!(out[row].stop, StopReason::Caller, "{name} row {row}");
                &alone.tokens[..3]
            } else {
                assert_eq!(out[row].stop, StopReason::MaxTokens, "{name} row {row}");
                &alone.tokens[..]
            };
            assert_eq!(out[row].tokens, want, "{name} row {row}");
            assert_eq!(seen[row], want.len(), "{name} row {row}");
        }
    }
}

#[test]
fn stop_tokens_end_generation() {
    let _guard = tch::no_grad_guard();
    let model = load("qwen2");
    let r = reference("qwen2");
    let prompt: Vec<u32> = r.prompt.iter().map(|&t| t as u32).collect();
    let stop = r.greedy[3];
    let out = generate(
        &model,
        &prompt,
        16,
        &[stop],
        SamplingParams::default(),
        &mut |_| {},
    )
    .unwrap();
    let first = r.greedy.iter().position(|&t| t == stop).unwrap();
    assert_eq!(out.tokens, r.greedy[..first].to_vec());
    assert_eq!(out.stop, qcoder::infer::StopReason::StopToken(stop));
}

#[test]
fn bf16_runs_close_to_f32() {
    let _guard = tch::no_grad_guard();
    let model = model::load_dir(
        &fixture("qwen3"),
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::BFloat16,
        },
    )
    .unwrap();
    let r = reference("qwen3");
    let input = Tensor::from_slice(&r.prompt).unsqueeze(0);
    let logits = model
        .forward(&input, None)
        .unwrap()
        .get(0)
        .to_kind(Kind::Float);
    let diff = max_abs_diff(&logits, &r.logits);
    let scale = r.logits.abs().max().double_value(&[]);
    // bf16 keeps 8 bits of mantissa; two layers of it stay within a few percent.
    assert!(diff / scale < 0.05, "bf16 relative error {}", diff / scale);
}

/// A layer walked group by group (as quantization calibrates) gives every
/// linear input `linear_inputs` gives and exactly `forward`'s output, with
/// down_proj's input kept or recomputed.
#[test]
fn layer_walk_matches_forward_exactly() {
    use qcoder::model::decoder::{DecoderLayer, LinearInput, Positional};
    for name in MODELS {
        let dir = fixture(name);
        let config = model::read_config(&dir).unwrap();
        let ckpt = Checkpoint::open_dir(&dir).unwrap();
        let opts = LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        };
        let layer = DecoderLayer::load(&config, &ckpt, 0, opts).unwrap();
        let positional = Positional::new(&config, &dir.join("config.json"), opts).unwrap();
        let ctx = positional.context(2, 12, 0);
        tch::manual_seed(3);
        let x = Tensor::randn(
            [2, 12, config.hidden_size as i64],
            (Kind::Float, Device::Cpu),
        );
        let stages = [
            LinearInput::Qkv,
            LinearInput::O,
            LinearInput::GateUp,
            LinearInput::Down,
        ];
        let expected = layer.linear_inputs(&x, &ctx, &stages);
        for keep in [true, false] {
            let mut walk = layer.walk(&x);
            for (k, stage) in stages.iter().enumerate() {
                if k > 0 {
                    layer.advance(&mut walk, &ctx, keep);
                }
                assert_eq!(walk.at, *stage);
                assert!(
                    layer.walk_input(&walk).equal(&expected[k]),
                    "{name} {stage:?} keep {keep}"
                );
            }
            assert!(
                layer.finish(walk).equal(&layer.forward(&x, &ctx, None)),
                "{name}: output, keep {keep}"
            );
        }
    }
}

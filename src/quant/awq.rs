//! AWQ (Lin et al., arXiv 2306.00978), following AutoAWQ
//! (`awq/quantize/quantizer.py`): for each group of linears that share an
//! input, search a per-input-channel scale `s = x̄^α / w̄^(1−α)` over a grid of
//! 20 exponents on the output error of the block they feed, multiply their
//! input columns by `s` and divide the op before them (a norm or a linear) by
//! `s`, then search a clipping threshold per output row and group, then round
//! to the nearest on the grid.
//!
//! Two departures from AutoAWQ, both measured on the real 0.5B at 4 bits
//! (BENCHMARKS.md): the identity (no scaling) is a candidate beside the 20
//! exponents, so the search never does worse than RTN on the block it
//! measures (the imported model's weights already sit near a 4-bit grid,
//! which any rescaling leaves); and the block's error is measured on a
//! subset of the calibration tokens (`--awq-tokens`, spread over every
//! position of the sequences, see `calib::spread_rows`), while x̄ uses them
//! all.
//!
//! Which op feeds which linears, and where the error is measured, is the
//! table `SCALE_GROUPS` below; it is the same for Qwen2, Qwen3 and Llama.

use tch::{Kind, Tensor};

use super::calib::{Recorded, Want};
use super::rtn::rtn_matrix;
use super::{
    set_dense_weight, Grid, LayerCalibration, Method, MethodKind, QuantError, QuantSpec,
    QuantizedLayer,
};
use crate::model::decoder::DecoderLayer;

/// The op whose output is the scaled linears' input: the scale's inverse is
/// folded into it.
#[derive(Debug, Clone, Copy)]
enum Prev {
    InputNorm,
    PostAttentionNorm,
    /// Output rows of a linear.
    Linear(&'static str),
}

/// Where a candidate scale's error is measured.
#[derive(Debug, Clone, Copy)]
enum Inspect {
    /// self_attn(input_layernorm(x)) on whole calibration sequences.
    Attention,
    /// The MLP on the captured inputs of gate/up.
    Mlp,
    /// The single linear on its captured inputs.
    Linear(&'static str),
}

struct ScaleGroup {
    prev: Prev,
    linears: &'static [&'static str],
    inspect: Inspect,
}

/// AutoAWQ's smoothing pairs for Llama-family decoder layers
/// (`awq/models/llama.py`, `qwen2.py`: `get_layers_for_scaling`).
const SCALE_GROUPS: &[ScaleGroup] = &[
    ScaleGroup {
        prev: Prev::InputNorm,
        linears: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        inspect: Inspect::Attention,
    },
    // Only when v_proj has as many outputs as o_proj has inputs (no
    // grouped-query attention), as AutoAWQ.
    ScaleGroup {
        prev: Prev::Linear("self_attn.v_proj"),
        linears: &["self_attn.o_proj"],
        inspect: Inspect::Linear("self_attn.o_proj"),
    },
    ScaleGroup {
        prev: Prev::PostAttentionNorm,
        linears: &["mlp.gate_proj", "mlp.up_proj"],
        inspect: Inspect::Mlp,
    },
    ScaleGroup {
        prev: Prev::Linear("mlp.up_proj"),
        linears: &["mlp.down_proj"],
        inspect: Inspect::Linear("mlp.down_proj"),
    },
];

/// Linears whose clipping is not searched ("due to qk bmm, it is hard to clip
/// precisely", AutoAWQ `_search_best_clip`).
const NO_CLIP: &[&str] = &["self_attn.q_proj", "self_attn.k_proj"];

#[derive(Debug, Clone, Copy)]
pub struct Awq {
    /// Exponent grid of the scale search.
    pub n_grid: i64,
    /// Clipping thresholds tried: max·(1 − i/n_grid) for i < max_shrink·n_grid.
    pub max_shrink: f64,
    /// Rows (tokens) used by the clipping search (AutoAWQ: 512).
    pub clip_rows: usize,
}

impl Default for Awq {
    fn default() -> Self {
        Self {
            n_grid: 20,
            max_shrink: 0.5,
            clip_rows: 512,
        }
    }
}

fn dense<'a>(
    layer: &'a mut DecoderLayer,
    name: &str,
) -> &'a mut Box<dyn crate::model::linear::Linear> {
    layer
        .linears_mut()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, slot)| slot)
        .expect("names come from LAYER_LINEARS")
}

fn weight_of(layer: &mut DecoderLayer, name: &str) -> Tensor {
    dense(layer, name)
        .dense_weight()
        .expect("quantization runs on dense layers")
        .shallow_clone()
}

impl Method for Awq {
    fn kind(&self) -> MethodKind {
        MethodKind::Awq
    }

    fn quantize_layer(
        &self,
        layer: &mut DecoderLayer,
        calib: &LayerCalibration<'_>,
        spec: &QuantSpec,
    ) -> Result<QuantizedLayer, QuantError> {
        let _guard = tch::no_grad_guard();
        let grid = spec.grid();
        if let Some(bar) = calib.steps {
            bar.set_length((SCALE_GROUPS.len() * 2) as u64);
        }
        // Inputs of every linear, captured once on the float layer.
        let firsts: Vec<&str> = SCALE_GROUPS.iter().map(|g| g.linears[0]).collect();
        let mut recorded = calib.capture(
            layer,
            &firsts,
            Want {
                hessian: false,
                inputs: calib.max_input_rows,
            },
        )?;
        // Whole sequences for the attention block, up to the same token budget.
        let mut budget = calib.max_input_rows as i64;
        let attn_inputs: Vec<&Tensor> = calib
            .inputs
            .iter()
            .take_while(|x| {
                let fits = budget > 0;
                budget -= x.size()[0] * x.size()[1];
                fits
            })
            .collect();

        for (group, rec) in SCALE_GROUPS.iter().zip(recorded.iter_mut()) {
            if let Prev::Linear(prev) = group.prev {
                let pw = weight_of(layer, prev);
                let lw = weight_of(layer, group.linears[0]);
                if pw.size()[0] != lw.size()[1] {
                    // Grouped-query attention: v_proj's outputs are fewer
                    // than o_proj's inputs, so v_proj cannot absorb a scale
                    // per o_proj input (AutoAWQ skips the pair too).
                    continue;
                }
            }
            let scales = self.search_scale(layer, group, rec, &attn_inputs, calib, spec, &grid)?;
            apply_scale(layer, group, &scales);
            calib.step(&format!("scale {}", group.linears.join("+")));
            // Later searches (clipping) see the scaled inputs, as AutoAWQ.
            rec.inputs = rec.inputs.iter().map(|x| x / &scales).collect();
        }

        let mut out = Vec::new();
        for (group, rec) in SCALE_GROUPS.iter().zip(&recorded) {
            let x = rec.kept_inputs();
            for &name in group.linears {
                let w = weight_of(layer, name);
                let w = match (&x, NO_CLIP.contains(&name)) {
                    (Some(x), false) => self.clip(&w, x, spec, &grid),
                    _ => w.to_kind(Kind::Float),
                };
                let mut q = rtn_matrix(&w, spec);
                let slot = dense(layer, name);
                q.bias = slot.bias().map(|b| b.to_kind(Kind::Float));
                let kind = slot.dense_weight().map_or(Kind::Float, |w| w.kind());
                set_dense_weight(slot, q.dequantize().to_kind(kind));
                out.push((name, q));
            }
            calib.step(&format!("clip {}", group.linears.join("+")));
        }
        Ok(QuantizedLayer {
            linears: out,
            outputs: None,
        })
    }
}

impl Awq {
    /// The best per-channel scale for one group (AutoAWQ `_search_best_scale`
    /// with `duo_scaling`).
    #[allow(clippy::too_many_arguments)]
    fn search_scale(
        &self,
        layer: &mut DecoderLayer,
        group: &ScaleGroup,
        rec: &Recorded,
        attn_inputs: &[&Tensor],
        calib: &LayerCalibration<'_>,
        spec: &QuantSpec,
        grid: &Grid,
    ) -> Result<Tensor, QuantError> {
        let x_mean = rec.abs_mean().ok_or_else(|| QuantError::NonFinite {
            what: "calibration inputs (none captured)",
            layer: calib.layer_name.clone(),
        })?;
        let originals: Vec<Tensor> = group.linears.iter().map(|n| weight_of(layer, n)).collect();
        let stacked = Tensor::cat(
            &originals
                .iter()
                .map(|w| w.to_kind(Kind::Float))
                .collect::<Vec<_>>(),
            0,
        );
        let (rows, cols) = stacked.size2()?;
        let gs = spec.group_for(cols as usize) as i64;
        let normed = stacked.abs().view([-1, gs]);
        let normed = &normed / (normed.amax(1, true) + 1e-6);
        let w_mean = normed.view([rows, cols]).mean_dim(0, false, Kind::Float);

        let kept = rec.kept_inputs();
        let run = |layer: &mut DecoderLayer| -> Tensor {
            match group.inspect {
                Inspect::Attention => Tensor::cat(
                    &attn_inputs
                        .iter()
                        .map(|x| {
                            layer
                                .attention_block(x, calib.ctx)
                                .reshape([-1, cols_out(x)])
                        })
                        .collect::<Vec<_>>(),
                    0,
                ),
                Inspect::Mlp => layer.mlp.forward(kept.as_ref().expect("inputs kept")),
                Inspect::Linear(name) => {
                    dense(layer, name).forward(kept.as_ref().expect("inputs kept"))
                }
            }
        };
        let reference = run(layer);
        let mut best: Option<(f64, Tensor)> = None;
        // AutoAWQ's 20 exponents (with duo scaling even α = 0 rescales, by
        // 1/w̄), then no scaling at all: on weights that already sit on a
        // 4-bit grid (a model imported from a quantized GGUF), any rescaling
        // moves them off it and the identity can be the best choice; with
        // it among the candidates the search never does worse than RTN on
        // the block it measures.
        let candidates = (0..self.n_grid)
            .map(|i| {
                let ratio = i as f64 / self.n_grid as f64;
                let s = (x_mean.pow_tensor_scalar(ratio)
                    / (w_mean.pow_tensor_scalar(1.0 - ratio) + 1e-4))
                    .clamp_min(1e-4);
                &s / (s.max() * s.min()).sqrt()
            })
            .chain(std::iter::once(x_mean.ones_like()));
        for s in candidates {
            for (name, w) in group.linears.iter().zip(&originals) {
                let scaled = w.to_kind(Kind::Float) * &s;
                let fq = fake_quantize_groups(&scaled, gs, grid) / &s;
                set_dense_weight(dense(layer, name), fq.to_kind(w.kind()));
            }
            let loss = (run(layer) - &reference)
                .to_kind(Kind::Float)
                .square()
                .mean(Kind::Float)
                .double_value(&[]);
            if loss.is_finite() && best.as_ref().is_none_or(|(b, _)| loss < *b) {
                best = Some((loss, s));
            }
        }
        for (name, w) in group.linears.iter().zip(originals) {
            set_dense_weight(dense(layer, name), w);
        }
        best.map(|(_, s)| s).ok_or_else(|| QuantError::NonFinite {
            what: "every AWQ scale candidate's loss",
            layer: format!("{}.{}", calib.layer_name, group.linears.join("+")),
        })
    }

    /// Per-(row, group) clipping threshold minimising the group's output
    /// error on sample inputs (AutoAWQ `_compute_best_clip`); returns the
    /// clipped weight.
    fn clip(&self, w: &Tensor, x: &Tensor, spec: &QuantSpec, grid: &Grid) -> Tensor {
        let w = w.to_kind(Kind::Float);
        let (rows, cols) = w.size2().expect("a weight matrix");
        let gs = spec.group_for(cols as usize) as i64;
        let groups = cols / gs;
        let n = x.size()[0];
        let step = (n / self.clip_rows as i64).max(1);
        let x = x.slice(0, 0, n, step).to_kind(Kind::Float);
        let tokens = x.size()[0];
        // (groups, tokens, gs) and (groups, gs, rows): each group's share of
        // every output, as one batched matmul.
        let xg = x.view([tokens, groups, gs]).transpose(0, 1);
        let wg = w.view([rows, groups, gs]).permute([1, 2, 0]);
        let reference = xg.bmm(&wg);
        let max0 = w.view([rows, groups, gs]).abs().amax(2, true); // (rows, groups, 1)
        let mut best_max = max0.copy();
        let mut best_err =
            Tensor::full([rows, groups, 1], f64::INFINITY, (Kind::Float, w.device()));
        let steps = (self.max_shrink * self.n_grid as f64) as i64;
        for i in 0..steps {
            let max_val = &max0 * (1.0 - i as f64 / self.n_grid as f64);
            let clipped = w
                .view([rows, groups, gs])
                .clamp_tensor(Some(-&max_val), Some(max_val.shallow_clone()));
            let fq = fake_quantize_groups(&clipped.view([rows, cols]), gs, grid);
            let out = xg.bmm(&fq.view([rows, groups, gs]).permute([1, 2, 0]));
            // (groups, rows) mean over tokens -> (rows, groups, 1)
            let err = (out - &reference)
                .square()
                .mean_dim(1, false, Kind::Float)
                .transpose(0, 1)
                .unsqueeze(-1);
            let better = err.lt_tensor(&best_err);
            best_err = err.where_self(&better, &best_err);
            best_max = max_val.where_self(&better, &best_max);
        }
        w.view([rows, groups, gs])
            .clamp_tensor(Some(-&best_max), Some(best_max.shallow_clone()))
            .view([rows, cols])
    }
}

fn cols_out(x: &Tensor) -> i64 {
    *x.size().last().expect("hidden axis")
}

/// Round trip of each `gs`-wide group of every row through the grid.
fn fake_quantize_groups(w: &Tensor, gs: i64, grid: &Grid) -> Tensor {
    let shape = w.size();
    let blocks = w.reshape([-1, gs]);
    let (s, z) = grid.params(&blocks);
    grid.fake_quantize(&blocks, &s, &z).view(shape.as_slice())
}

/// Folds `scales` into the layer: columns of the group's linears × s, the
/// feeding op ÷ s (AutoAWQ `apply_scale`).
fn apply_scale(layer: &mut DecoderLayer, group: &ScaleGroup, scales: &Tensor) {
    match group.prev {
        Prev::InputNorm => {
            let w = &layer.input_layernorm.weight;
            layer.input_layernorm.weight = (w.to_kind(Kind::Float) / scales).to_kind(w.kind());
        }
        Prev::PostAttentionNorm => {
            let w = &layer.post_attention_layernorm.weight;
            layer.post_attention_layernorm.weight =
                (w.to_kind(Kind::Float) / scales).to_kind(w.kind());
        }
        Prev::Linear(name) => {
            let slot = dense(layer, name);
            let w = slot.dense_weight().expect("dense").shallow_clone();
            let bias = slot
                .bias()
                .map(|b| (b.to_kind(Kind::Float) / scales).to_kind(b.kind()));
            let scaled = (w.to_kind(Kind::Float) / scales.unsqueeze(1)).to_kind(w.kind());
            *slot = Box::new(crate::model::linear::DenseLinear::new(scaled, bias));
        }
    }
    for name in group.linears {
        let slot = dense(layer, name);
        let w = slot.dense_weight().expect("dense").shallow_clone();
        set_dense_weight(slot, (w.to_kind(Kind::Float) * scales).to_kind(w.kind()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::{LoadOptions, Positional};
    use crate::model::{read_config, Checkpoint};
    use tch::Device;

    /// A layer whose weights already sit on the 4-bit grid (as a model
    /// imported from a quantized GGUF does) comes back unchanged: the
    /// identity is among the scale candidates and loses nothing, clipping
    /// starts from no clipping, and every rescaling would move the weights
    /// off the grid. Without the identity candidate AWQ changed them.
    #[test]
    fn weights_on_the_grid_come_back_unchanged() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(3);
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
        let config = read_config(&dir).unwrap();
        let ckpt = Checkpoint::open_dir(&dir).unwrap();
        let opts = LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
        };
        let spec = QuantSpec {
            method: MethodKind::Awq,
            bits: 4,
            group_size: Some(32),
            sym: false,
            order: super::super::ColumnOrder::Natural,
            damp: 0.0,
            mse: false,
        };
        let mut layer = DecoderLayer::load(&config, &ckpt, 0, opts).unwrap();
        let mut on_grid = Vec::new();
        for (name, slot) in layer.linears_mut() {
            // RTN's fixed point: a weight RTN gives back unchanged (one
            // round trip is not always one: where the f16 scale leaves a
            // level unused, a second pass fits a finer grid).
            let mut w = slot.dense_weight().unwrap().shallow_clone();
            for pass in 0.. {
                let again = rtn_matrix(&w, &spec).dequantize();
                if again.equal(&w) {
                    break;
                }
                assert!(pass < 5, "{name}: RTN has no fixed point in reach");
                w = again;
            }
            set_dense_weight(slot, w.shallow_clone());
            on_grid.push((name, w));
        }
        let hidden = config.hidden_size as i64;
        let inputs = vec![Tensor::randn([2, 16, hidden], (Kind::Float, Device::Cpu))];
        let positional = Positional::new(&config, &dir.join("config.json"), opts).unwrap();
        let ctx = positional.context(1, 16, 0);
        let steps = indicatif::ProgressBar::hidden();
        let calib = LayerCalibration {
            inputs: &inputs,
            ctx: &ctx,
            layer_name: "model.layers.0".into(),
            max_input_rows: 4096,
            steps: Some(&steps),
        };
        let out = Awq::default()
            .quantize_layer(&mut layer, &calib, &spec)
            .unwrap();
        assert_eq!(out.linears.len(), on_grid.len());
        // Scale searches for q/k/v, gate/up and up → down (v → o is skipped
        // under grouped-query attention), then four clipping steps.
        assert_eq!(steps.position(), 3 + 4);
        for (name, q) in &out.linears {
            let (_, w) = on_grid.iter().find(|(n, _)| n == name).unwrap();
            let diff = (q.dequantize() - w).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: moved by {diff}");
        }
    }
}

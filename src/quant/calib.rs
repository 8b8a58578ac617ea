//! Calibration: text → token samples, and the statistics of what each linear
//! layer reads while the calibration set runs through a decoder layer.

use tch::{Kind, Tensor};

use super::{LayerCalibration, QuantError};
use crate::model::decoder::{DecoderLayer, LayerWalk, LinearInput, StepContext};

/// Cuts `samples` windows of `seq_len` tokens from the token stream of the
/// documents (each ending with `eos`), at positions drawn from `seed`.
/// Returns (samples, seq_len) int64, or `None` when there are too few tokens.
pub fn sample_windows(
    docs: &[Vec<u32>],
    eos: Option<u32>,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Option<Tensor> {
    let mut stream: Vec<i64> = Vec::new();
    for doc in docs {
        stream.extend(doc.iter().map(|&t| t as i64));
        if let Some(eos) = eos {
            stream.push(eos as i64);
        }
    }
    if stream.len() < seq_len || samples == 0 {
        return None;
    }
    let span = stream.len() - seq_len;
    let mut rows = Vec::with_capacity(samples * seq_len);
    // Non-overlapping windows when the stream is long enough, otherwise
    // seeded random starts (SplitMix64).
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(state)
    };
    let disjoint = stream.len() / seq_len >= samples;
    let mut starts: Vec<usize> = if disjoint {
        // Shuffle the disjoint windows and keep `samples` of them.
        let mut all: Vec<usize> = (0..stream.len() / seq_len).map(|k| k * seq_len).collect();
        for i in (1..all.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            all.swap(i, j);
        }
        all.truncate(samples);
        all
    } else {
        (0..samples)
            .map(|_| (next() % (span as u64 + 1)) as usize)
            .collect()
    };
    starts.sort_unstable();
    for s in starts {
        rows.extend_from_slice(&stream[s..s + seq_len]);
    }
    Some(Tensor::from_slice(&rows).view([samples as i64, seq_len as i64]))
}

/// SplitMix64's output function: a well-spread hash of `z`.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Indices (within the `n` rows starting at global row `first`) of a
/// pseudo-random one-in-`stride` subset of the calibration rows, the same on
/// every run. Every `stride`-th row would keep the same positions of every
/// sequence whenever `stride` divides the sequence length, e.g. position 0
/// in 1 of 16 kept rows for 128 × 512 tokens at a 2048-row budget, 32 times
/// its share. Position 0 is the attention sink: in Qwen2.5-Coder-0.5B its
/// down_proj input has 25 to 160 times the squared norm of the other tokens'
/// in layers 2, 3 and 21–23, so AWQ's searches fitted that one token.
fn spread_rows(first: i64, n: i64, stride: i64) -> Vec<i64> {
    (0..n)
        .filter(|j| stride <= 1 || mix64((first + j) as u64).is_multiple_of(stride as u64))
        .collect()
}

/// What a probe accumulates.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Σ xᵀx over all rows, f32 (in, in): only the tiles on and above the
    /// diagonal (see [`gram_add`]); [`Recorded::hessian`] mirrors the rest.
    xtx: Option<Tensor>,
    /// Mean |x| per input channel numerator (Σ |x|), f32 (in).
    pub abs_sum: Option<Tensor>,
    /// Rows seen.
    pub rows: i64,
    /// Kept input rows (up to the cap), f32 (rows, in).
    pub inputs: Vec<Tensor>,
    kept_rows: i64,
}

impl Recorded {
    /// GPTQ's Hessian proxy `H = 2 XᵀX / n`.
    pub fn hessian(&self) -> Option<Tensor> {
        let n = self.rows.max(1) as f64;
        self.xtx.as_ref().map(|s| mirror_tiles(s) * (2.0 / n))
    }

    pub fn abs_mean(&self) -> Option<Tensor> {
        let n = self.rows.max(1) as f64;
        self.abs_sum.as_ref().map(|s| s / n)
    }

    pub fn kept_inputs(&self) -> Option<Tensor> {
        (!self.inputs.is_empty()).then(|| Tensor::cat(&self.inputs, 0))
    }
}

/// Which statistics to record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want {
    pub hessian: bool,
    /// Keep up to this many input rows, a pseudo-random subset spread over
    /// the whole calibration set and every position in its sequences.
    pub inputs: usize,
}

impl Recorded {
    /// Adds the rows of `x` (..., in).
    fn record(&mut self, x: &Tensor, want: Want, stride: i64) {
        let in_f = *x.size().last().expect("linear input has a feature axis");
        let rows = x.reshape([-1, in_f]).to_kind(Kind::Float);
        let n = rows.size()[0];
        if want.hessian {
            let acc = self
                .xtx
                .get_or_insert_with(|| Tensor::zeros([in_f, in_f], (Kind::Float, rows.device())));
            gram_add(acc, &rows);
        }
        let abs = rows.abs().sum_dim_intlist(0, false, Kind::Float);
        self.abs_sum = Some(match self.abs_sum.take() {
            Some(acc) => acc + abs,
            None => abs,
        });
        if want.inputs > 0 && self.kept_rows < want.inputs as i64 {
            let index = spread_rows(self.rows, n, stride);
            let index = Tensor::from_slice(&index).to_device(rows.device());
            let picked = rows.index_select(0, &index);
            let room = want.inputs as i64 - self.kept_rows;
            let picked = picked.narrow(0, 0, picked.size()[0].min(room));
            self.kept_rows += picked.size()[0];
            self.inputs.push(picked.copy());
        }
        self.rows += n;
    }
}

/// Largest down_proj input (all calibration rows × intermediate size, f32)
/// a [`CalibrationWalk`] keeps; above it the input is computed twice instead.
const MAX_KEPT_MLP_HIDDEN_BYTES: i64 = 2 << 30;

/// The calibration set part-way through one decoder layer: each linear
/// group's input is computed once, from the groups before it as already
/// quantized, and the layer's output comes from the last stage. Running
/// forward passes from the layer's input for every group instead would cost
/// about twice the compute.
pub struct CalibrationWalk {
    walks: Vec<LayerWalk>,
    keep_mlp_hidden: bool,
}

impl CalibrationWalk {
    /// The linear input the walk stands at.
    pub fn at(&self) -> LinearInput {
        self.walks.first().map_or(LinearInput::Qkv, |w| w.at)
    }

    /// Statistics of the current group's input over all calibration rows.
    pub fn record(&self, layer: &DecoderLayer, want: Want) -> Recorded {
        let mut rec = Recorded::default();
        tch::no_grad(|| {
            for walk in &self.walks {
                rec.record(&layer.walk_input(walk), want, 1);
            }
        });
        rec
    }

    /// On to the next group, through the layer's linears as they are now.
    pub fn advance(&mut self, layer: &DecoderLayer, ctx: &StepContext) {
        let keep = self.keep_mlp_hidden;
        tch::no_grad(|| {
            for walk in &mut self.walks {
                layer.advance(walk, ctx, keep);
            }
        });
    }

    /// The layer's outputs (the next layer's inputs); the walk must stand at
    /// down_proj.
    pub fn finish(self, layer: &DecoderLayer) -> Vec<Tensor> {
        tch::no_grad(|| self.walks.into_iter().map(|w| layer.finish(w)).collect())
    }
}

/// Widest column tile of [`gram_add`]'s blocked product.
const GRAM_TILE: i64 = 1024;

/// Column tiles of a d-wide Gram matrix: (start, width) of each.
fn gram_tiles(d: i64) -> Vec<(i64, i64)> {
    let k = ((d + GRAM_TILE - 1) / GRAM_TILE).max(1);
    let tile = (d + k - 1) / k;
    (0..k).map(|i| (i * tile, tile.min(d - i * tile))).collect()
}

/// `acc += XᵀX` for `rows` (n, d), on the tiles on and above the diagonal
/// only. XᵀX is symmetric, so a wide input is cut into k column tiles and
/// k(k+1)/2 of the k² tile products are computed, accumulated in place
/// (BLAS writes into the strided tile; no temporary): for down_proj's 4864
/// inputs (k = 5) 60% of the full product's work, calibration's largest
/// single cost. [`mirror_tiles`] fills in the rest.
fn gram_add(acc: &mut Tensor, rows: &Tensor) {
    let tiles = gram_tiles(rows.size()[1]);
    for (i, &(a0, an)) in tiles.iter().enumerate() {
        let a_t = rows.narrow(1, a0, an).transpose(0, 1);
        for &(b0, bn) in &tiles[i..] {
            let _ = acc
                .narrow(0, a0, an)
                .narrow(1, b0, bn)
                .addmm_(&a_t, &rows.narrow(1, b0, bn));
        }
    }
}

/// The full symmetric matrix from [`gram_add`]'s upper tiles.
fn mirror_tiles(acc: &Tensor) -> Tensor {
    let out = acc.copy();
    let tiles = gram_tiles(acc.size()[0]);
    for (i, &(a0, an)) in tiles.iter().enumerate() {
        for &(b0, bn) in &tiles[i + 1..] {
            out.narrow(0, b0, bn)
                .narrow(1, a0, an)
                .copy_(&acc.narrow(0, a0, an).narrow(1, b0, bn).transpose(0, 1));
        }
    }
    out
}

impl LayerCalibration<'_> {
    /// Total calibration rows (tokens).
    pub fn rows(&self) -> i64 {
        self.inputs.iter().map(|x| x.size()[0] * x.size()[1]).sum()
    }

    /// Runs the calibration set through `layer` as far as the inputs of the
    /// linears `names` (as in `LAYER_LINEARS`) and records them.
    pub fn capture(
        &self,
        layer: &DecoderLayer,
        names: &[&str],
        want: Want,
    ) -> Result<Vec<Recorded>, QuantError> {
        let wanted = names
            .iter()
            .map(|n| {
                LinearInput::of(n).ok_or_else(|| QuantError::NonFinite {
                    what: "an unknown linear name",
                    layer: format!("{}.{n}", self.layer_name),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let total = self.rows().max(1);
        let stride = if want.inputs > 0 {
            (total / want.inputs as i64).max(1)
        } else {
            1
        };
        let mut recorded: Vec<Recorded> = names.iter().map(|_| Recorded::default()).collect();
        tch::no_grad(|| {
            for x in self.inputs {
                for (rec, input) in recorded
                    .iter_mut()
                    .zip(layer.linear_inputs(x, self.ctx, &wanted))
                {
                    rec.record(&input, want, stride);
                }
            }
        });
        Ok(recorded)
    }

    /// Starts walking the calibration set through `layer` one linear group at
    /// a time (true-sequential quantization, see [`CalibrationWalk`]).
    pub fn walk(&self, layer: &DecoderLayer) -> CalibrationWalk {
        let ffn = layer.mlp.down_proj.in_features();
        let bytes = self.rows() * ffn * 4;
        CalibrationWalk {
            walks: tch::no_grad(|| self.inputs.iter().map(|x| layer.walk(x)).collect()),
            keep_mlp_hidden: bytes <= MAX_KEPT_MLP_HIDDEN_BYTES,
        }
    }

    /// Runs the layer over the calibration set: the next layer's inputs.
    pub fn outputs(&self, layer: &DecoderLayer) -> Vec<Tensor> {
        tch::no_grad(|| {
            self.inputs
                .iter()
                .map(|x| layer.forward(x, self.ctx, None))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_gram_equals_the_full_product() {
        for d in [7, 1024, 1025, 2500] {
            let x = Tensor::randn([64, d], (Kind::Float, tch::Device::Cpu));
            let full = x.transpose(0, 1).matmul(&x);
            let mut acc = Tensor::zeros([d, d], (Kind::Float, tch::Device::Cpu));
            gram_add(&mut acc, &x.narrow(0, 0, 40));
            gram_add(&mut acc, &x.narrow(0, 40, 24));
            let ours = mirror_tiles(&acc);
            let err = (&ours - &full).abs().max().double_value(&[]);
            let scale = full.abs().max().double_value(&[]);
            // Same dot products, possibly summed in another order.
            assert!(err <= 1e-5 * scale, "d {d}: {err} vs {scale}");
        }
    }

    /// Kept rows cover every position of the calibration sequences at about
    /// its share, not the same few positions of each (every 32nd row put
    /// position 0 in 1 of 16 kept rows, stride 32 dividing the length 512),
    /// and are drawn from the whole set, the same on every run.
    #[test]
    fn kept_rows_spread_over_positions() {
        let (samples, seq, batch, budget) = (64i64, 512i64, 8i64, 2048usize);
        let stride = samples * seq / budget as i64;
        let want = Want {
            hessian: false,
            inputs: budget,
        };
        let keep = || {
            let mut rec = Recorded::default();
            for first in (0..samples).step_by(batch as usize) {
                // Two features: the row's position and its sample.
                let opts = (Kind::Float, tch::Device::Cpu);
                let pos = Tensor::arange(seq, opts)
                    .view([1, seq, 1])
                    .repeat([batch, 1, 1]);
                let sample = Tensor::arange_start(first, first + batch, opts)
                    .view([batch, 1, 1])
                    .repeat([1, seq, 1]);
                rec.record(&Tensor::cat(&[pos, sample], 2), want, stride);
            }
            assert_eq!(rec.rows, samples * seq);
            rec.kept_inputs().unwrap()
        };
        let kept = keep();
        assert!(kept.equal(&keep()), "the same rows on every run");
        let n = kept.size()[0];
        assert!(
            (budget as i64 * 9 / 10..=budget as i64).contains(&n),
            "{n} rows kept"
        );
        let positions: Vec<f32> = Vec::try_from(kept.select(1, 0).contiguous()).unwrap();
        let at_zero = positions.iter().filter(|&&p| p == 0.0).count();
        // About n / 512 = 4 (binomial); every 32nd row would give n / 16.
        assert!(at_zero <= 12, "{at_zero} of {n} kept rows at position 0");
        let aligned = positions
            .iter()
            .filter(|&&p| p as i64 % stride == 0)
            .count();
        assert!(
            aligned * 10 < n as usize,
            "{aligned} of {n} at multiples of the stride"
        );
        let last_sample = kept.select(1, 1).max().double_value(&[]);
        assert!(
            last_sample >= (samples - 2) as f64,
            "last sample kept: {last_sample}"
        );
    }

    #[test]
    fn windows_are_deterministic_and_in_range() {
        let docs: Vec<Vec<u32>> = (0..10)
            .map(|d| (0..100).map(|t| d * 1000 + t).collect())
            .collect();
        let a = sample_windows(&docs, Some(7), 4, 50, 1).unwrap();
        let b = sample_windows(&docs, Some(7), 4, 50, 1).unwrap();
        assert!(a.equal(&b));
        assert_eq!(a.size(), vec![4, 50]);
        let c = sample_windows(&docs, Some(7), 4, 50, 2).unwrap();
        assert!(!a.equal(&c), "seed changes the sample");
        assert!(sample_windows(&docs, None, 4, 5000, 1).is_none());
    }
}

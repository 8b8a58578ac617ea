//! GPTQ (Frantar et al., arXiv 2210.17323), following the reference
//! implementation (IST-DASLab/gptq `gptq.py`, `GPTQ.fasterquant`): dead
//! columns zeroed, optional act-order, dampening, the upper Cholesky factor of
//! H⁻¹, blocks of 128 columns with lazy batch updates, per-group grids fitted
//! when a group starts.
//!
//! Layer by layer and "true sequential" as GPTQModel does it: q/k/v first
//! (one Hessian, one pass over the rows of all three), then o_proj on the
//! outputs of the quantized attention, then gate/up, then down_proj.

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use super::calib::Want;
use super::{
    set_dense_weight, ColumnOrder, LayerCalibration, Method, MethodKind, QuantError, QuantSpec,
    QuantizedLayer, QuantizedLinear,
};
use crate::model::decoder::DecoderLayer;
use crate::model::decoder::LinearInput;

/// Linears that share an input, in the order they are quantized.
pub const SEQUENTIAL_GROUPS: &[&[&str]] = &[
    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    &["self_attn.o_proj"],
    &["mlp.gate_proj", "mlp.up_proj"],
    &["mlp.down_proj"],
];

const BLOCK: i64 = 128;
/// Rows per rayon task in a block's column loop.
const ROWS_PER_TASK: usize = 64;
/// Extra dampening tried, in fractions of the mean diagonal, when Cholesky fails.
const DAMP_STEP: f64 = 0.01;
const DAMP_RETRIES: usize = 20;

pub struct Gptq;

impl Method for Gptq {
    fn kind(&self) -> MethodKind {
        MethodKind::Gptq
    }

    fn quantize_layer(
        &self,
        layer: &mut DecoderLayer,
        calib: &LayerCalibration<'_>,
        spec: &QuantSpec,
    ) -> Result<QuantizedLayer, QuantError> {
        let mut out = Vec::new();
        if let Some(bar) = calib.steps {
            bar.set_length(SEQUENTIAL_GROUPS.len() as u64);
        }
        let mut walk = calib.walk(layer);
        for (k, group) in SEQUENTIAL_GROUPS.iter().enumerate() {
            if k > 0 {
                walk.advance(layer, calib.ctx);
            }
            assert_eq!(Some(walk.at()), LinearInput::of(group[0]));
            let recorded = walk.record(
                layer,
                Want {
                    hessian: true,
                    inputs: 0,
                },
            );
            let h = recorded.hessian().ok_or_else(|| QuantError::NonFinite {
                what: "the Hessian (no calibration rows)",
                layer: calib.layer_name.clone(),
            })?;
            drop(recorded);
            // All linears of a group share H: quantize their stacked rows in one pass.
            let mut weights = Vec::new();
            let mut biases = Vec::new();
            for (name, slot) in layer.linears_mut() {
                if group.contains(&name) {
                    let w = slot
                        .dense_weight()
                        .expect("quantization runs on dense layers");
                    weights.push((name, w.to_kind(Kind::Float)));
                    biases.push(slot.bias().map(|b| b.to_kind(Kind::Float)));
                }
            }
            let stacked = Tensor::cat(&weights.iter().map(|(_, w)| w).collect::<Vec<_>>(), 0);
            let label = format!("{}.{}", calib.layer_name, group.join("+"));
            let q = quantize_matrix(&stacked, &h, spec, &label)?;
            let mut row = 0;
            for ((name, w), bias) in weights.into_iter().zip(biases) {
                let rows = w.size()[0];
                let part = QuantizedLinear {
                    bits: q.bits,
                    group_size: q.group_size,
                    q: q.q.narrow(0, row, rows),
                    scales: q.scales.narrow(1, row, rows),
                    zeros: q.zeros.narrow(1, row, rows),
                    g_idx: q.g_idx.shallow_clone(),
                    bias,
                };
                row += rows;
                for (n, slot) in layer.linears_mut() {
                    if n == name {
                        set_dense_weight(slot, part.dequantize().to_kind(w.kind()));
                    }
                }
                out.push((name, part));
            }
            calib.step(&group.join("+"));
        }
        Ok(QuantizedLayer {
            linears: out,
            outputs: Some(walk.finish(layer)),
        })
    }
}

/// GPTQ on one weight matrix `w` (rows, cols) with Hessian `h` (cols, cols).
pub fn quantize_matrix(
    w: &Tensor,
    h: &Tensor,
    spec: &QuantSpec,
    label: &str,
) -> Result<QuantizedLinear, QuantError> {
    let _guard = tch::no_grad_guard();
    let device = w.device();
    let (rows, cols) = w.size2()?;
    let group = spec.group_for(cols as usize) as i64;
    let grid = spec.grid();
    let mut w = w.to_kind(Kind::Float).copy();
    let mut h = h.to_kind(Kind::Float).copy();
    if w.isfinite().logical_not().any().int64_value(&[]) != 0 {
        return Err(QuantError::NonFinite {
            what: "the weights",
            layer: label.into(),
        });
    }
    if h.isfinite().logical_not().any().int64_value(&[]) != 0 {
        return Err(QuantError::NonFinite {
            what: "the Hessian",
            layer: label.into(),
        });
    }

    // Dead inputs (never active in calibration): weight 0, unit diagonal.
    let diag = h.diagonal(0, 0, 1);
    let dead = diag.eq(0.0);
    let _ = h.diagonal(0, 0, 1).masked_fill_(&dead, 1.0);
    let _ = w.masked_fill_(&dead.unsqueeze(0).expand([rows, cols], false), 0.0);

    let perm = column_permutation(&h.diagonal(0, 0, 1), spec.order, group);
    if let Some(perm) = &perm {
        w = w.index_select(1, perm);
        h = h.index_select(0, perm).index_select(1, perm);
    }

    let hinv = upper_cholesky_of_inverse(&h, spec.damp, label)?;

    let q_ints = Tensor::zeros([rows, cols], (Kind::Float, device));
    let mut scales: Vec<Tensor> = Vec::new();
    let mut zeros: Vec<Tensor> = Vec::new();
    let mut current: (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
    if spec.group_size.is_none() {
        let (s, z) = grid.params(&w);
        current = (to_vec(&s), to_vec(&z));
        scales.push(s);
        zeros.push(z);
    }
    let maxq = grid.maxq() as f32;
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + BLOCK).min(cols);
        let count = i2 - i1;
        // As the reference, a group's grid is fitted on W as it was before
        // this block started; fit every group that starts in the block now.
        let mut starts: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
        if spec.group_size.is_some() {
            let mut col = i1 + (group - i1 % group) % group;
            while col < i2 {
                let (s, z) = grid.params(&w.narrow(1, col, group.min(cols - col)));
                starts.push(((col - i1) as usize, to_vec(&s), to_vec(&z)));
                scales.push(s);
                zeros.push(z);
                col += group;
            }
        }
        // The block's grids from its first column on: the one in force
        // when it starts, then each group that starts inside it.
        let mut segments: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
        if starts.first().is_none_or(|(at, _, _)| *at > 0) {
            segments.push((0, current.0.clone(), current.1.clone()));
        }
        segments.extend(starts);
        if let Some((_, s, z)) = segments.last() {
            current = (s.clone(), z.clone());
        }
        // Row-major (rows, count): rows are independent in GPTQ (each row's
        // error moves only along that row), so each thread runs whole rows
        // through the block's columns, one hand-off per block instead of
        // two per column. Per element the same operations in the same order
        // as column by column, so the result is the same to the bit.
        let (n, r) = (count as usize, rows as usize);
        let mut block = to_vec(&w.narrow(1, i1, count));
        let hinv1 = to_vec(&hinv.narrow(0, i1, count).narrow(1, i1, count));
        let mut ints = vec![0f32; block.len()];
        let mut errs = vec![0f32; block.len()];
        block
            .par_chunks_mut(n)
            .zip(ints.par_chunks_mut(n))
            .zip(errs.par_chunks_mut(n))
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row, ((x, q_out), e_out))| {
                let mut seg = 0;
                for i in 0..n {
                    if segments.get(seg + 1).is_some_and(|(at, _, _)| *at == i) {
                        seg += 1;
                    }
                    let (sc, zp) = (segments[seg].1[row], segments[seg].2[row]);
                    let d = hinv1[i * n + i];
                    let v = x[i];
                    // clamp(round(w / s) + z, 0, maxq), ties to even as torch.round
                    let q = ((v / sc).round_ties_even() + zp).clamp(0.0, maxq);
                    q_out[i] = q;
                    let e = (v - sc * (q - zp)) / d;
                    e_out[i] = e;
                    // Later columns of the block absorb this column's error.
                    for (x, h) in x[i + 1..]
                        .iter_mut()
                        .zip(&hinv1[i * n + i + 1..(i + 1) * n])
                    {
                        if *h != 0.0 {
                            *x -= e * h;
                        }
                    }
                }
            });
        debug_assert_eq!(r * n, block.len());
        let from = |v: Vec<f32>| Tensor::from_slice(&v).view([rows, count]).to_device(device);
        q_ints.narrow(1, i1, count).copy_(&from(ints));
        if i2 < cols {
            let err1 = from(errs);
            let update = err1.matmul(&hinv.narrow(0, i1, count).narrow(1, i2, cols - i2));
            let _ = w.narrow(1, i2, cols - i2).g_sub_(&update);
        }
        i1 = i2;
    }

    let n_groups = scales.len() as i64;
    let mut scales = Tensor::cat(&scales, 1).transpose(0, 1).contiguous(); // (groups, rows)
    let mut zeros = Tensor::cat(&zeros, 1).transpose(0, 1).contiguous();
    let position_group = super::natural_g_idx(cols, group, device);
    let (q_ints, g_idx) = match (&perm, spec.order) {
        (None, _) | (Some(_), ColumnOrder::Natural) => (q_ints, position_group),
        (Some(perm), ColumnOrder::DescAct) => {
            let inverse = perm.argsort(0, false);
            (
                q_ints.index_select(1, &inverse),
                position_group.index_select(0, &inverse),
            )
        }
        (Some(perm), ColumnOrder::GroupAware) => {
            // The k-th group quantized is the stored group perm[k·group]/group:
            // put the grids back in stored order; g_idx stays trivial.
            let visited = perm
                .slice(0, 0, None, group)
                .divide_scalar_mode(group, "floor");
            let back = visited.argsort(0, false);
            scales = scales.index_select(0, &back);
            zeros = zeros.index_select(0, &back);
            (
                q_ints.index_select(1, &perm.argsort(0, false)),
                super::natural_g_idx(cols, group, device),
            )
        }
    };
    debug_assert_eq!(n_groups, (cols + group - 1) / group);
    Ok(QuantizedLinear {
        bits: spec.bits,
        group_size: group as usize,
        q: q_ints.to_kind(Kind::Int64),
        scales,
        zeros: zeros.to_kind(Kind::Int64),
        g_idx,
        bias: None,
    })
}

/// The column permutation `p` (position → stored column) for `order`, or
/// `None` for the stored order.
///
/// Group-aware ordering follows GPTQModel's `gar.py` (`compute_local_perms`,
/// `compute_global_perm` with its default "max" metric): within each group of
/// `group` consecutive columns, decreasing diagonal; groups by decreasing
/// largest diagonal, ties in stored order.
fn column_permutation(diag: &Tensor, order: ColumnOrder, group: i64) -> Option<Tensor> {
    match order {
        ColumnOrder::Natural => None,
        ColumnOrder::DescAct => Some(diag.argsort(0, true)),
        ColumnOrder::GroupAware => {
            let cols = diag.size()[0];
            assert_eq!(
                cols % group,
                0,
                "groups divide the columns (checked at validation)"
            );
            let (values, local) = diag.view([cols / group, group]).sort_stable(true, 1, true);
            let groups = values.select(1, 0).argsort_stable(true, 0, true);
            let base = Tensor::arange_start_step(0, cols, group, (Kind::Int64, diag.device()));
            Some(
                (local + base.unsqueeze(1))
                    .index_select(0, &groups)
                    .view(-1),
            )
        }
    }
}

/// A tensor's values as f32 on the host (row-major).
fn to_vec(t: &Tensor) -> Vec<f32> {
    let t = t
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
        .contiguous()
        .view(-1);
    Vec::<f32>::try_from(&t).expect("an f32 CPU tensor converts to a Vec")
}

/// The upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), in f32
/// as the reference. λ starts at `damp` × mean(diag H) and grows by 0.01 ×
/// mean(diag H) while the factorisation fails.
///
/// Computed without forming the inverse: with J the exchange matrix and
/// J H J = L′L′ᵀ, R = J L′ J is upper triangular with H = R Rᵀ, hence
/// H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹. One Cholesky and one triangular solve, instead
/// of the reference's Cholesky, `cholesky_inverse` and second Cholesky (the
/// same U to rounding; LAPACK's potri is also very slow on CPU).
fn upper_cholesky_of_inverse(h: &Tensor, damp: f64, label: &str) -> Result<Tensor, QuantError> {
    let n = h.size()[0];
    let h = h.to_kind(Kind::Float);
    let mean_diag = h.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]);
    let eye = Tensor::eye(n, (Kind::Float, h.device()));
    let mut frac = damp;
    for _ in 0..=DAMP_RETRIES {
        let damped = &h + &eye * (frac * mean_diag);
        let (l_flipped, info) = damped.flip([0, 1]).linalg_cholesky_ex(false, false);
        if info.int64_value(&[]) == 0 {
            let r = l_flipped.flip([0, 1]);
            let u = r.linalg_solve_triangular(&eye, true, true, false);
            if u.isfinite().all().int64_value(&[]) != 0 {
                if frac > damp {
                    eprintln!(
                        "note: {label}: the Hessian needed dampening {frac:.2} (not {damp:.2}) of its mean diagonal to factorise"
                    );
                }
                return Ok(u);
            }
        }
        frac += DAMP_STEP;
    }
    Err(QuantError::Singular {
        layer: label.into(),
        damp: frac,
    })
}

/// Output error of quantized weights in GPTQ's trace form,
/// `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` with ΔW = W − Ŵ: the relative squared error of
/// the layer's outputs on the calibration inputs.
pub fn relative_output_error(w: &Tensor, w_hat: &Tensor, h: &Tensor) -> f64 {
    let h = h.to_kind(Kind::Double);
    let w = w.to_kind(Kind::Double);
    let delta = &w - w_hat.to_kind(Kind::Double);
    let num = (delta.matmul(&h) * &delta)
        .sum(Kind::Double)
        .double_value(&[]);
    let den = (w.matmul(&h) * &w).sum(Kind::Double).double_value(&[]);
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::rtn::rtn_matrix;
    use tch::Device;

    fn correlated_inputs(n: i64, d: i64) -> Tensor {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        // Strongly correlated, unequally scaled channels: where GPTQ's error
        // feedback pays off.
        let mix = Tensor::randn([d, d], opts) * 0.3 + Tensor::eye(d, opts);
        let scale = Tensor::linspace(0.1, 3.0, d, opts);
        Tensor::randn([n, d], opts).matmul(&mix) * scale
    }

    fn spec(bits: u32, group: Option<usize>, act_order: bool) -> QuantSpec {
        QuantSpec {
            method: MethodKind::Gptq,
            bits,
            group_size: group,
            sym: false,
            order: if act_order {
                ColumnOrder::DescAct
            } else {
                ColumnOrder::Natural
            },
            damp: 0.01,
            mse: false,
        }
    }

    #[test]
    fn gptq_beats_rtn_on_output_error() {
        let x = correlated_inputs(2048, 128);
        let h = x.transpose(0, 1).matmul(&x) * (2.0 / 2048.0);
        let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu)) * 0.05;
        for (bits, group, act) in [
            (4, Some(32), ColumnOrder::Natural),
            (3, Some(32), ColumnOrder::DescAct),
            (3, Some(32), ColumnOrder::GroupAware),
            (4, None, ColumnOrder::Natural),
            (2, Some(64), ColumnOrder::DescAct),
        ] {
            let mut s = spec(bits, group, false);
            s.order = act;
            let g = quantize_matrix(&w, &h, &s, "test").unwrap();
            let r = rtn_matrix(&w, &s);
            let eg = relative_output_error(&w, &g.dequantize(), &h);
            let er = relative_output_error(&w, &r.dequantize(), &h);
            println!("bits {bits} group {group:?} {act:?}: gptq {eg:.3e} rtn {er:.3e}");
            assert!(eg < er, "GPTQ {eg} not below RTN {er} at {bits} bits");
        }
    }

    #[test]
    fn act_order_g_idx_groups_columns_by_rank() {
        let x = correlated_inputs(512, 64);
        let h = x.transpose(0, 1).matmul(&x) * (2.0 / 512.0);
        let w = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
        let q = quantize_matrix(&w, &h, &spec(4, Some(16), true), "t").unwrap();
        assert_eq!(q.groups(), 4);
        assert!(!q.has_trivial_g_idx());
        // Each group still holds exactly group_size columns.
        let counts = q.g_idx.bincount::<Tensor>(None, 4);
        assert!(counts.equal(&Tensor::from_slice(&[16i64, 16, 16, 16])));
        // The most active column is in group 0.
        let top = h.diagonal(0, 0, 1).argmax(0, false).int64_value(&[]);
        assert_eq!(q.g_idx.int64_value(&[top]), 0);
    }

    #[test]
    fn group_aware_permutation_keeps_groups_whole() {
        // Groups of 3: maxima 5, 9, 3 (the last group's tie stays in order).
        let diag = Tensor::from_slice(&[1f32, 5., 2., 0., 9., 4., 3., 3., 1.]);
        let p = column_permutation(&diag, ColumnOrder::GroupAware, 3).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&p).unwrap(),
            [4, 5, 3, 1, 2, 0, 6, 7, 8]
        );
        assert!(column_permutation(&diag, ColumnOrder::Natural, 3).is_none());
    }

    /// With a diagonal Hessian no column's error reaches another, so GPTQ is
    /// round-to-nearest in any order: the integers, grids and g_idx must come
    /// back in stored order exactly as RTN has them (for act-order, RTN of
    /// the columns sorted by the diagonal, whose groups act-order forms).
    #[test]
    fn every_order_is_rtn_under_a_diagonal_hessian() {
        let d = 96;
        let diag = Tensor::rand([d], (Kind::Float, Device::Cpu)) + 0.1;
        let h = Tensor::diag_embed(&diag, 0, 0, 1);
        let w = Tensor::randn([24, d], (Kind::Float, Device::Cpu));
        for order in [
            ColumnOrder::Natural,
            ColumnOrder::GroupAware,
            ColumnOrder::DescAct,
        ] {
            let mut s = spec(4, Some(32), false);
            s.order = order;
            let g = quantize_matrix(&w, &h, &s, "t").unwrap();
            if order == ColumnOrder::DescAct {
                let perm = diag.argsort(0, true);
                let r = rtn_matrix(&w.index_select(1, &perm), &s);
                let back = r.dequantize().index_select(1, &perm.argsort(0, false));
                assert!(!g.has_trivial_g_idx());
                assert!(g.dequantize().equal(&back), "act-order: dequantized");
                continue;
            }
            let r = rtn_matrix(&w, &s);
            assert!(g.has_trivial_g_idx(), "{order:?}");
            assert!(g.q.equal(&r.q), "{order:?}: integers");
            assert!(g.scales.equal(&r.scales), "{order:?}: scales");
            assert!(g.zeros.equal(&r.zeros), "{order:?}: zeros");
        }
    }

    /// The flip-and-solve factor equals the reference's
    /// cholesky(cholesky_inverse(cholesky(H)), upper=True).
    #[test]
    fn inverse_factor_matches_the_reference_composition() {
        let x = correlated_inputs(256, 48).to_kind(Kind::Double);
        let h = x.transpose(0, 1).matmul(&x) / 256.0;
        let lambda = 0.01 * h.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]);
        let damped = &h + Tensor::eye(48, (Kind::Double, Device::Cpu)) * lambda;
        let reference = damped
            .linalg_cholesky(false)
            .cholesky_inverse(false)
            .linalg_cholesky(true);
        let ours = upper_cholesky_of_inverse(&h, 0.01, "t")
            .unwrap()
            .to_kind(Kind::Double);
        let rel = (&ours - &reference).abs().max().double_value(&[])
            / reference.abs().max().double_value(&[]);
        assert!(rel < 1e-4, "relative difference {rel}");
    }

    #[test]
    fn singular_hessian_is_damped_or_named() {
        let w = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        // Rank-1 Hessian: dampening makes it positive definite.
        let v = Tensor::randn([16, 1], (Kind::Float, Device::Cpu));
        let h = v.matmul(&v.transpose(0, 1));
        assert!(quantize_matrix(&w, &h, &spec(4, Some(8), false), "t").is_ok());
        // A negative definite one cannot be fixed.
        let bad = -Tensor::eye(16, (Kind::Float, Device::Cpu));
        match quantize_matrix(&w, &bad, &spec(4, Some(8), false), "model.layers.3.mlp") {
            Err(QuantError::Singular { layer, .. }) => assert_eq!(layer, "model.layers.3.mlp"),
            other => panic!("expected Singular, got {other:?}"),
        }
    }
}

//! GPTQ (Frantar et al., arXiv 2210.17323), following the reference
//! implementation (IST-DASLab/gptq `gptq.py`, `GPTQ.fasterquant`): dead
//! columns zeroed, optional act-order, dampening, the upper Cholesky factor of
//! H⁻¹, blocks of 128 columns with lazy batch updates, per-group grids fitted
//! when a group starts.
//!
//! Layer by layer and "true sequential" as GPTQModel does it: q/k/v first
//! (one Hessian, one pass over the rows of all three), then o_proj on the
//! outputs of the quantized attention, then gate/up, then down_proj.

use tch::{Kind, Tensor};

use super::calib::Want;
use super::{
    set_dense_weight, LayerCalibration, Method, MethodKind, QuantError, QuantSpec, QuantizedLinear,
};
use crate::model::decoder::DecoderLayer;

/// Linears that share an input, in the order they are quantized.
pub const SEQUENTIAL_GROUPS: &[&[&str]] = &[
    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    &["self_attn.o_proj"],
    &["mlp.gate_proj", "mlp.up_proj"],
    &["mlp.down_proj"],
];

const BLOCK: i64 = 128;
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
    ) -> Result<Vec<(&'static str, QuantizedLinear)>, QuantError> {
        let mut out = Vec::new();
        if let Some(bar) = calib.steps {
            bar.set_length(SEQUENTIAL_GROUPS.len() as u64);
        }
        for group in SEQUENTIAL_GROUPS {
            let recorded = calib.capture(
                layer,
                &group[..1],
                Want {
                    hessian: true,
                    inputs: 0,
                },
            )?;
            let h = recorded[0].hessian().ok_or_else(|| QuantError::NonFinite {
                what: "the Hessian (no calibration rows)",
                layer: calib.layer_name.clone(),
            })?;
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
        Ok(out)
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
    let mut h = h.to_kind(Kind::Double).copy();
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

    let perm = spec.act_order.then(|| h.diagonal(0, 0, 1).argsort(0, true));
    if let Some(perm) = &perm {
        w = w.index_select(1, perm);
        h = h.index_select(0, perm).index_select(1, perm);
    }

    let hinv = upper_cholesky_of_inverse(&h, spec.damp, label)?.to_kind(Kind::Float);

    let q_ints = Tensor::zeros([rows, cols], (Kind::Float, device));
    let mut scales: Vec<Tensor> = Vec::new();
    let mut zeros: Vec<Tensor> = Vec::new();
    let (mut scale, mut zero) = (Tensor::new(), Tensor::new());
    if spec.group_size.is_none() {
        let (s, z) = grid.params(&w);
        scales.push(s.shallow_clone());
        zeros.push(z.shallow_clone());
        (scale, zero) = (s, z);
    }
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + BLOCK).min(cols);
        let count = i2 - i1;
        let w1 = w.narrow(1, i1, count).copy();
        let err1 = Tensor::zeros([rows, count], (Kind::Float, device));
        let hinv1 = hinv.narrow(0, i1, count).narrow(1, i1, count);
        for i in 0..count {
            let col = i1 + i;
            if spec.group_size.is_some() && col % group == 0 {
                // As the reference: the grid is fitted on W, which holds this
                // block's columns as they were before the block started.
                let (s, z) = grid.params(&w.narrow(1, col, group.min(cols - col)));
                scales.push(s.shallow_clone());
                zeros.push(z.shallow_clone());
                (scale, zero) = (s, z);
            }
            let wc = w1.narrow(1, i, 1); // (rows, 1)
            let q = grid.quantize(&wc, &scale, &zero);
            let dq = super::Grid::dequantize(&q, &scale, &zero);
            q_ints.narrow(1, col, 1).copy_(&q);
            let d = hinv1.double_value(&[i, i]);
            let err = (&wc - &dq) / d;
            let tail = count - i;
            let update = err.matmul(&hinv1.narrow(0, i, 1).narrow(1, i, tail));
            let _ = w1.narrow(1, i, tail).g_sub_(&update);
            err1.narrow(1, i, 1).copy_(&err);
        }
        if i2 < cols {
            let update = err1.matmul(&hinv.narrow(0, i1, count).narrow(1, i2, cols - i2));
            let _ = w.narrow(1, i2, cols - i2).g_sub_(&update);
        }
        i1 = i2;
    }

    let n_groups = scales.len() as i64;
    let scales = Tensor::cat(&scales, 1).transpose(0, 1).contiguous(); // (groups, rows)
    let zeros = Tensor::cat(&zeros, 1).transpose(0, 1).contiguous();
    let position_group = super::natural_g_idx(cols, group, device);
    let (q_ints, g_idx) = match &perm {
        Some(perm) => {
            let inverse = perm.argsort(0, false);
            (
                q_ints.index_select(1, &inverse),
                position_group.index_select(0, &inverse),
            )
        }
        None => (q_ints, position_group),
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

/// The upper Cholesky factor of (H + λI)⁻¹, computed in f64. λ starts at
/// `damp` × mean(diag H) and grows by 0.01 × mean(diag H) while the
/// factorisation fails.
fn upper_cholesky_of_inverse(h: &Tensor, damp: f64, label: &str) -> Result<Tensor, QuantError> {
    let n = h.size()[0];
    let mean_diag = h.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]);
    let eye = Tensor::eye(n, (Kind::Double, h.device()));
    let mut frac = damp;
    for _ in 0..=DAMP_RETRIES {
        let damped = h + &eye * (frac * mean_diag);
        let (l, info) = damped.linalg_cholesky_ex(false, false);
        if info.int64_value(&[]) == 0 {
            let inverse = l.cholesky_inverse(false);
            let (u, info) = inverse.linalg_cholesky_ex(true, false);
            if info.int64_value(&[]) == 0 {
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
            act_order,
            damp: 0.01,
        }
    }

    #[test]
    fn gptq_beats_rtn_on_output_error() {
        let x = correlated_inputs(2048, 128);
        let h = x.transpose(0, 1).matmul(&x) * (2.0 / 2048.0);
        let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu)) * 0.05;
        for (bits, group, act) in [
            (4, Some(32), false),
            (3, Some(32), true),
            (4, None, false),
            (2, Some(64), true),
        ] {
            let s = spec(bits, group, act);
            let g = quantize_matrix(&w, &h, &s, "test").unwrap();
            let r = rtn_matrix(&w, &s);
            let eg = relative_output_error(&w, &g.dequantize(), &h);
            let er = relative_output_error(&w, &r.dequantize(), &h);
            println!("bits {bits} group {group:?} act {act}: gptq {eg:.3e} rtn {er:.3e}");
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

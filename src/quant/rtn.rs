//! Round-to-nearest: every group's grid fitted on its own weights, no
//! calibration. The baseline the calibrated methods must beat, with the same
//! group and zero-point conventions.

use tch::{Kind, Tensor};

use super::{
    set_dense_weight, LayerCalibration, Method, MethodKind, QuantError, QuantSpec, QuantizedLayer,
    QuantizedLinear,
};
use crate::model::decoder::DecoderLayer;

pub struct Rtn;

impl Method for Rtn {
    fn kind(&self) -> MethodKind {
        MethodKind::Rtn
    }

    fn quantize_layer(
        &self,
        layer: &mut DecoderLayer,
        _calib: &LayerCalibration<'_>,
        spec: &QuantSpec,
    ) -> Result<QuantizedLayer, QuantError> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::new();
        for (name, slot) in layer.linears_mut() {
            let w = slot
                .dense_weight()
                .expect("quantization runs on dense layers");
            let mut q = rtn_matrix(w, spec);
            q.bias = slot.bias().map(|b| b.to_kind(Kind::Float));
            let kind = w.kind();
            set_dense_weight(slot, q.dequantize().to_kind(kind));
            out.push((name, q));
        }
        Ok(QuantizedLayer {
            linears: out,
            outputs: None,
        })
    }
}

/// RTN of a (rows, cols) matrix with contiguous groups along the columns.
pub fn rtn_matrix(w: &Tensor, spec: &QuantSpec) -> QuantizedLinear {
    let _guard = tch::no_grad_guard();
    let w = w.to_kind(Kind::Float);
    let (_, cols) = w.size2().expect("a weight matrix");
    let group = spec.group_for(cols as usize) as i64;
    let grid = spec.grid();
    let n_groups = (cols + group - 1) / group;
    let mut q = Vec::with_capacity(n_groups as usize);
    let mut scales = Vec::with_capacity(n_groups as usize);
    let mut zeros = Vec::with_capacity(n_groups as usize);
    for g in 0..n_groups {
        let block = w.narrow(1, g * group, group.min(cols - g * group));
        let (s, z) = grid.params(&block);
        q.push(grid.quantize(&block, &s, &z));
        scales.push(s);
        zeros.push(z);
    }
    let device = w.device();
    QuantizedLinear {
        bits: spec.bits,
        group_size: group as usize,
        q: Tensor::cat(&q, 1).to_kind(Kind::Int64),
        scales: Tensor::cat(&scales, 1).transpose(0, 1).contiguous(),
        zeros: Tensor::cat(&zeros, 1)
            .transpose(0, 1)
            .contiguous()
            .to_kind(Kind::Int64),
        g_idx: super::natural_g_idx(cols, group, device),
        bias: None,
    }
}

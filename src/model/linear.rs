//! The one interface every linear layer of the decoder sits behind, so the
//! model never branches on how a layer is stored (dense now; LoRA-wrapped and
//! int4-packed layers implement the same trait).

use tch::Tensor;

use crate::infer::cpu_kernels::{int4_gemv_stacked, Int4Matrix, MatVec};

pub trait Linear: std::fmt::Debug + Send {
    /// `x`: (..., in_features) -> (..., out_features).
    fn forward(&self, x: &Tensor) -> Tensor;
    fn in_features(&self) -> i64;
    fn out_features(&self) -> i64;
    /// The dense weight (out_features, in_features), when the layer has one.
    fn dense_weight(&self) -> Option<&Tensor>;
    fn bias(&self) -> Option<&Tensor>;
    /// Whether `forward` is exactly `x · dense_weightᵀ + bias` (no adapter,
    /// no quantization), so that a caller may run that product itself.
    fn is_plain_dense(&self) -> bool {
        false
    }
    /// Whether [`Linear::matvec`] runs: layers with a CPU kernel for one
    /// vector (the int4 fast path), which the batch-1 decode step calls
    /// without going through libtorch.
    fn has_matvec(&self) -> bool {
        false
    }
    /// `y = W·x + b` for one f32 vector `x` (in_features) into `y`
    /// (out_features), when `has_matvec`.
    fn matvec(&self, _x: &[f32], _y: &mut [f32]) {
        unreachable!("matvec called on a layer without one (check has_matvec)")
    }
    /// The CPU int4 matrix and the bias when [`Linear::matvec`] is exactly
    /// that product plus the bias (no reordering of the input), so that
    /// [`matvec_stacked`] can run layers sharing an input as one product.
    fn int4_cpu(&self) -> Option<(&Int4Matrix, Option<&[f32]>)> {
        None
    }
    /// The frozen int8 product when `forward` without a gradient is exactly
    /// that product plus the bias (`[model] int8_base`'s output layer), so
    /// that the training loss may run it itself.
    fn int8_logits(&self) -> Option<&super::int8::Int8Product> {
        None
    }
}

/// `y = [L₁(x); L₂(x); …]` for layers with [`Linear::has_matvec`] that
/// share the input `x` (q/k/v, gate/up), their outputs one after another
/// in `y`: one stacked int4 product (one activation quantization, one
/// hand-off to the thread team) when every layer is an int4 CPU product of
/// the same input size and group, else one `matvec` per layer.
pub fn matvec_stacked(layers: &[&dyn Linear], x: &[f32], y: &mut [f32]) {
    let stacked: Option<Vec<_>> = layers.iter().map(|l| l.int4_cpu()).collect();
    if let Some(stacked) = stacked.filter(|s| s.iter().all(|(m, _)| m.stacks_with(s[0].0))) {
        let mats: Vec<&Int4Matrix> = stacked.iter().map(|&(m, _)| m).collect();
        int4_gemv_stacked(&mats, x, y);
        let mut rest = y;
        for (m, bias) in stacked {
            let (out, tail) = rest.split_at_mut(m.rows());
            if let Some(bias) = bias {
                for (y, b) in out.iter_mut().zip(bias) {
                    *y += b;
                }
            }
            rest = tail;
        }
        return;
    }
    let mut rest = y;
    for layer in layers {
        let (out, tail) = rest.split_at_mut(layer.out_features() as usize);
        layer.matvec(x, out);
        rest = tail;
    }
}

/// `y = x Wᵀ + b`, as `torch.nn.Linear`.
#[derive(Debug)]
pub struct DenseLinear {
    /// (out_features, in_features)
    pub weight: Tensor,
    /// (out_features)
    pub bias: Option<Tensor>,
}

impl DenseLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Linear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
    fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
    fn dense_weight(&self) -> Option<&Tensor> {
        Some(&self.weight)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn is_plain_dense(&self) -> bool {
        true
    }
}

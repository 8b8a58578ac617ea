//! The one interface every linear layer of the decoder sits behind, so the
//! model never branches on how a layer is stored (dense now; LoRA-wrapped and
//! int4-packed layers implement the same trait).

use tch::Tensor;

pub trait Linear: std::fmt::Debug + Send {
    /// `x`: (..., in_features) -> (..., out_features).
    fn forward(&self, x: &Tensor) -> Tensor;
    fn in_features(&self) -> i64;
    fn out_features(&self) -> i64;
    /// The dense weight (out_features, in_features), when the layer has one.
    fn dense_weight(&self) -> Option<&Tensor>;
    fn bias(&self) -> Option<&Tensor>;
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
}

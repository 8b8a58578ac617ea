//! Weight quantization: RTN, GPTQ and AWQ behind one trait, calibrated layer
//! by layer on the user's own code, written in the GPTQ and AWQ checkpoint
//! formats that transformers, GPTQModel and vLLM load.

pub mod awq;
pub mod calib;
pub mod checkpoint;
pub mod gptq;
pub mod grid;
pub mod pack;
pub mod rtn;
pub mod run;

use tch::{Kind, Tensor};

use crate::model::decoder::{DecoderLayer, StepContext};
use crate::model::ModelError;

pub use grid::Grid;

/// Which algorithm chooses the integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    Rtn,
    Gptq,
    Awq,
}

impl MethodKind {
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Rtn => "rtn",
            MethodKind::Gptq => "gptq",
            MethodKind::Awq => "awq",
        }
    }

    /// Bit widths each method supports (AWQ's GEMM format is 4-bit only).
    pub fn supported_bits(self) -> &'static [u32] {
        match self {
            MethodKind::Rtn | MethodKind::Gptq => &[2, 3, 4, 8],
            MethodKind::Awq => &[4],
        }
    }
}

/// The order GPTQ quantizes a matrix's input columns in. Columns quantized
/// early pass their error on to the columns after them, so the most active
/// inputs (largest Hessian diagonal, i.e. mean squared activation) go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColumnOrder {
    /// As stored.
    #[default]
    Natural,
    /// All columns by decreasing Hessian diagonal ("act-order", `desc_act`):
    /// a group then holds scattered columns, so the checkpoint needs `g_idx`.
    DescAct,
    /// Group-aware reordering (GAR; Gafni et al., CVPRW 2025, arXiv
    /// 2505.14638; GPTQModel's default): each group keeps its own columns,
    /// sorted by decreasing diagonal, and the groups go by decreasing largest
    /// diagonal. `g_idx` stays trivial, so the fast kernels still apply.
    GroupAware,
}

impl ColumnOrder {
    pub fn name(self) -> &'static str {
        match self {
            ColumnOrder::Natural => "natural",
            ColumnOrder::DescAct => "act-order",
            ColumnOrder::GroupAware => "group-aware",
        }
    }
}

/// Everything that decides how weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    pub method: MethodKind,
    pub bits: u32,
    /// Input columns per scale/zero group; `None` = one group per row.
    pub group_size: Option<usize>,
    pub sym: bool,
    /// GPTQ: the order the input columns are quantized in.
    pub order: ColumnOrder,
    /// GPTQ: dampening as a fraction of the mean Hessian diagonal.
    pub damp: f64,
    /// GPTQ and RTN: fit each group's range by least squared rounding error
    /// (see `Grid::params`) instead of min/max.
    pub mse: bool,
}

impl QuantSpec {
    pub fn grid(&self) -> Grid {
        Grid {
            bits: self.bits,
            sym: self.sym,
            search: self.mse,
        }
    }

    /// Group size for a layer with `in_features` inputs.
    pub fn group_for(&self, in_features: usize) -> usize {
        self.group_size.unwrap_or(in_features)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("--group-size {group} does not divide the {in_features} inputs of {layer}; valid group sizes near it: {suggest}")]
    GroupSize {
        layer: String,
        group: usize,
        in_features: usize,
        suggest: String,
    },
    #[error("{method} does not support {bits}-bit weights (supported: {supported})")]
    Bits {
        method: &'static str,
        bits: u32,
        supported: String,
    },
    #[error("the Hessian of {layer} is not positive definite even with dampening {damp:.3} of its mean diagonal; too little or degenerate calibration data?")]
    Singular { layer: String, damp: f64 },
    #[error("non-finite values in {what} of {layer}")]
    NonFinite { what: &'static str, layer: String },
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// One linear layer in integer form, before packing: the neutral
/// representation every method produces and every format packs.
#[derive(Debug)]
pub struct QuantizedLinear {
    pub bits: u32,
    pub group_size: usize,
    /// (out, in) integers in `[0, 2^bits)`, original column order: int64
    /// from the quantizers, uint8 as read from a checkpoint. Users widen
    /// them or subtract the int64 `zeros` (which promotes), never subtract
    /// two uint8 tensors.
    pub q: Tensor,
    /// (groups, out), f32 holding f16-representable values.
    pub scales: Tensor,
    /// (groups, out) zero points, int64.
    pub zeros: Tensor,
    /// (in) group of each input column, int64.
    pub g_idx: Tensor,
    /// (out), f32.
    pub bias: Option<Tensor>,
}

impl QuantizedLinear {
    pub fn out_features(&self) -> i64 {
        self.q.size()[0]
    }
    pub fn in_features(&self) -> i64 {
        self.q.size()[1]
    }
    pub fn groups(&self) -> i64 {
        self.scales.size()[0]
    }

    /// Whether `g_idx` is the plain `i / group_size` (no act-order permutation).
    pub fn has_trivial_g_idx(&self) -> bool {
        natural_g_idx(
            self.in_features(),
            self.group_size as i64,
            self.g_idx.device(),
        )
        .equal(&self.g_idx)
    }

    /// `W[o, i] = scales[g_idx[i], o] * (q[o, i] - zeros[g_idx[i], o])` in f32.
    pub fn dequantize(&self) -> Tensor {
        let scales = self.scales.index_select(0, &self.g_idx).transpose(0, 1); // (out, in)
        let zeros = self.zeros.index_select(0, &self.g_idx).transpose(0, 1);
        scales * (&self.q - zeros).to_kind(Kind::Float)
    }
}

/// `g_idx` without act-order: column i is in group `i / group_size`.
pub fn natural_g_idx(in_features: i64, group_size: i64, device: tch::Device) -> Tensor {
    Tensor::arange(in_features, (Kind::Int64, device)).floor_divide_scalar(group_size)
}

/// Drives calibration data through one decoder layer; methods call it to
/// capture what they need (Hessians or inputs of given linears).
pub struct LayerCalibration<'a> {
    /// Residual-stream inputs of the layer, in batches of (batch, seq, hidden).
    pub inputs: &'a [Tensor],
    pub ctx: &'a StepContext,
    /// Name of the layer (`model.layers.{i}`), for messages.
    pub layer_name: String,
    /// Cap on stored input rows per linear for methods that keep inputs (AWQ).
    pub max_input_rows: usize,
    /// Advanced once per linear group a method finishes.
    pub steps: Option<&'a indicatif::ProgressBar>,
}

impl LayerCalibration<'_> {
    /// Reports progress inside the layer.
    pub fn step(&self, what: &str) {
        if let Some(bar) = self.steps {
            bar.set_message(what.to_string());
            bar.inc(1);
        }
    }
}

/// A quantization algorithm. It may change the float layer (AWQ folds its
/// scales into norms and linears) and returns the integer form of each of
/// the seven linears, named as in `decoder::LAYER_LINEARS`. On return the
/// layer's linears hold the dequantized weights, so the caller can run the
/// quantized layer to produce the next layer's inputs.
pub trait Method {
    fn kind(&self) -> MethodKind;
    fn quantize_layer(
        &self,
        layer: &mut DecoderLayer,
        calib: &LayerCalibration<'_>,
        spec: &QuantSpec,
    ) -> Result<QuantizedLayer, QuantError>;
}

/// What a method made of one decoder layer.
pub struct QuantizedLayer {
    /// The quantized linears, named as in `LAYER_LINEARS` (the layer's own
    /// linears are replaced by their dequantized weights).
    pub linears: Vec<(&'static str, QuantizedLinear)>,
    /// The quantized layer's outputs on the calibration inputs, when the
    /// method computed them on its way (GPTQ's walk); otherwise the job runs
    /// the layer.
    pub outputs: Option<Vec<tch::Tensor>>,
}

pub fn method_for(kind: MethodKind) -> Box<dyn Method> {
    match kind {
        MethodKind::Rtn => Box::new(rtn::Rtn),
        MethodKind::Gptq => Box::new(gptq::Gptq),
        MethodKind::Awq => Box::new(awq::Awq::default()),
    }
}

/// Valid group sizes close to `group` for `in_features` (divisors that are
/// multiples of 32, GPTQ kernels' granularity).
pub fn suggest_group_sizes(in_features: usize, group: usize) -> String {
    let mut divisors: Vec<usize> = (1..=in_features / 32)
        .map(|k| k * 32)
        .filter(|d| in_features.is_multiple_of(*d))
        .collect();
    divisors.sort_by_key(|d| (*d as i64 - group as i64).abs());
    let picks: Vec<String> = divisors.iter().take(3).map(|d| d.to_string()).collect();
    if picks.is_empty() {
        "none that is a multiple of 32; use per-row grouping".into()
    } else {
        picks.join(", ")
    }
}

/// Replaces a linear's weight with a dense one (keeping its bias).
pub(crate) fn set_dense_weight(slot: &mut Box<dyn crate::model::linear::Linear>, weight: Tensor) {
    let bias = slot.bias().map(|b| b.shallow_clone());
    *slot = Box::new(crate::model::linear::DenseLinear::new(weight, bias));
}

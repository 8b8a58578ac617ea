//! The fast path for quantized checkpoints: linear layers that keep their
//! weights as integers and multiply with libtorch's weight-only kernels, so
//! decoding never materialises a dequantized weight.
//!
//! * 4-bit: `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` (CUDA) on
//!   the layout `_convert_weight_to_int4pack[_for_cpu]` makes. The kernels
//!   dequantize as `(q - 8) * scale + zero'`, so a GPTQ/AWQ zero point z
//!   becomes `zero' = scale * (8 - z)`. Groups must be contiguous: an
//!   act-order checkpoint's columns (and every input) are permuted once so
//!   its groups are (`g_idx` sorted).
//! * 8-bit per output channel: `_weight_int8pack_mm`, for the output head,
//!   which otherwise dominates decoding (151,936 x 896 for Qwen2.5-Coder).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::model::decoder::{Dequantize, LoadOptions, QuantizedLayers};
use crate::model::linear::Linear;
use crate::model::{CausalLm, ModelError};
use crate::quant::rtn::rtn_matrix;
use crate::quant::{MethodKind, QuantSpec, QuantizedLinear};

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("the int4 kernels take 4-bit weights; this layer has {bits} bits")]
    Bits { bits: u32 },
    #[error("the int4 kernels take group sizes 32, 64, 128 or 256; this layer has {group}")]
    Group { group: usize },
    #[error("the int4 kernels need the output size to be a multiple of 16 (CPU) or 8 (CUDA) and the input size a multiple of the group; this layer is {out_features}x{in_features}")]
    Shape { out_features: i64, in_features: i64 },
    #[error("act-order groups of unequal size (g_idx has a group of {size} columns, not {group})")]
    Groups { size: i64, group: usize },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A 4-bit linear layer on libtorch's int4 kernels.
#[derive(Debug)]
pub struct Int4Linear {
    packed: Tensor,
    /// (groups, out, 2): scale and zero′ per group and output, in `kind`.
    scales_zeros: Tensor,
    group_size: i64,
    in_features: i64,
    out_features: i64,
    /// Input column order that makes the groups contiguous (act-order).
    perm: Option<Tensor>,
    bias: Option<Tensor>,
    /// Activation dtype the kernel runs in.
    kind: Kind,
    /// On CPU, the integers again as bytes (one per weight, in the original
    /// column order) for inputs of many rows: libtorch's CPU int4 kernel is
    /// built for decode (a few rows) and is far slower than a dense matrix
    /// product on a long prompt, so prefill and perplexity windows dequantize
    /// the layer on the fly (a transient dense weight, one layer at a time).
    prefill: Option<QuantizedLinear>,
}

/// Rows (tokens) from which a CPU forward dequantizes instead of using the
/// int4 kernel.
const PREFILL_ROWS: i64 = 16;

/// Inner K tiles of the packed layout (torch's default for these kernels).
const INNER_K_TILES: i64 = 2;

impl Int4Linear {
    pub fn new(q: &QuantizedLinear, device: Device, kind: Kind) -> Result<Self, FastPathError> {
        if q.bits != 4 {
            return Err(FastPathError::Bits { bits: q.bits });
        }
        let group = q.group_size;
        if ![32, 64, 128, 256].contains(&group) {
            return Err(FastPathError::Group { group });
        }
        let (out_f, in_f) = (q.out_features(), q.in_features());
        let n_align = if device.is_cuda() { 8 } else { 16 };
        if out_f % n_align != 0 || in_f % group as i64 != 0 || in_f % (INNER_K_TILES * 16) != 0 {
            return Err(FastPathError::Shape {
                out_features: out_f,
                in_features: in_f,
            });
        }
        // Permute columns so every group is contiguous, in group order.
        let (ints, perm) = if q.has_trivial_g_idx() {
            (q.q.shallow_clone(), None)
        } else {
            let counts = q.g_idx.bincount::<Tensor>(None, q.groups());
            let sizes: Vec<i64> = Vec::<i64>::try_from(&counts)?;
            if let Some(&size) = sizes.iter().find(|&&s| s != group as i64) {
                return Err(FastPathError::Groups { size, group });
            }
            let perm = q.g_idx.argsort(0, false).to_kind(Kind::Int64);
            (q.q.index_select(1, &perm), Some(perm.to_device(device)))
        };
        let packed = if device.is_cuda() {
            // The CUDA converter takes two nibbles per byte, high nibble first.
            let even = ints.slice(1, 0, in_f, 2);
            let odd = ints.slice(1, 1, in_f, 2);
            let bytes = (even * 16 + odd).to_kind(Kind::Uint8).to_device(device);
            bytes.f_internal_convert_weight_to_int4pack(INNER_K_TILES)?
        } else {
            ints.to_kind(Kind::Int)
                .f_internal_convert_weight_to_int4pack_for_cpu(INNER_K_TILES)?
        };
        let scales = q.scales.to_kind(Kind::Float); // (groups, out)
        let zeros = &scales * (8.0 - q.zeros.to_kind(Kind::Float));
        let scales_zeros = Tensor::stack(&[scales, zeros], 2)
            .to_kind(kind)
            .to_device(device)
            .contiguous();
        Ok(Self {
            packed,
            scales_zeros,
            group_size: group as i64,
            in_features: in_f,
            out_features: out_f,
            perm,
            bias: q.bias.as_ref().map(|b| b.to_kind(kind).to_device(device)),
            kind,
            prefill: (!device.is_cuda()).then(|| QuantizedLinear {
                bits: q.bits,
                group_size: q.group_size,
                q: q.q.to_kind(Kind::Uint8),
                scales: q.scales.to_kind(Kind::Float),
                zeros: q.zeros.shallow_clone(),
                g_idx: q.g_idx.shallow_clone(),
                bias: None,
            }),
        })
    }
}

impl Linear for Int4Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let rows = x.reshape([-1, self.in_features]);
        if let Some(source) = &self.prefill {
            if rows.size()[0] >= PREFILL_ROWS {
                let weight = source.dequantize().to_kind(x.kind());
                let bias = self.bias.as_ref().map(|b| b.to_kind(x.kind()));
                return x.linear(&weight, bias.as_ref());
            }
        }
        let rows = match &self.perm {
            Some(perm) => rows.index_select(1, perm),
            None => rows,
        };
        let input_kind = x.kind();
        let rows = rows.to_kind(self.kind);
        let out = if rows.device().is_cuda() {
            rows.internal_weight_int4pack_mm(&self.packed, self.group_size, &self.scales_zeros)
        } else {
            rows.internal_weight_int4pack_mm_for_cpu(
                &self.packed,
                self.group_size,
                &self.scales_zeros,
            )
        };
        let out = match &self.bias {
            Some(b) => out + b,
            None => out,
        };
        *shape.last_mut().expect("linear input has a feature axis") = self.out_features;
        out.to_kind(input_kind).reshape(shape)
    }
    fn in_features(&self) -> i64 {
        self.in_features
    }
    fn out_features(&self) -> i64 {
        self.out_features
    }
    fn dense_weight(&self) -> Option<&Tensor> {
        None
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// Weight-only int8 with one scale per output row (symmetric, RTN): the
/// output head of the fast path.
#[derive(Debug)]
pub struct Int8Linear {
    /// (out, in) int8
    weight: Tensor,
    /// (out), in `kind`
    scales: Tensor,
    bias: Option<Tensor>,
    kind: Kind,
}

impl Int8Linear {
    /// Quantizes a dense (out, in) weight.
    pub fn from_dense(weight: &Tensor, bias: Option<&Tensor>, kind: Kind) -> Self {
        let _guard = tch::no_grad_guard();
        let w = weight.to_kind(Kind::Float);
        let scales = (w.abs().amax(1, true) / 127.0).clamp_min(1e-12);
        let q = (&w / &scales)
            .round()
            .clamp(-127.0, 127.0)
            .to_kind(Kind::Int8);
        Self {
            weight: q,
            scales: scales.squeeze_dim(1).to_kind(kind),
            bias: bias.map(|b| b.to_kind(kind)),
            kind,
        }
    }

    /// The weight as the kernel sees it, for tests.
    pub fn dequantized(&self) -> Tensor {
        self.weight.to_kind(Kind::Float) * self.scales.to_kind(Kind::Float).unsqueeze(1)
    }
}

impl Linear for Int8Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let in_f = *shape.last().expect("linear input has a feature axis");
        let input_kind = x.kind();
        let rows = x.reshape([-1, in_f]).to_kind(self.kind);
        // Many rows on CPU: a dense product beats the decode kernel (as Int4Linear).
        let out = if rows.size()[0] >= PREFILL_ROWS && !rows.device().is_cuda() {
            let weight = self.weight.to_kind(self.kind) * self.scales.unsqueeze(1);
            rows.matmul(&weight.transpose(0, 1))
        } else {
            rows.internal_weight_int8pack_mm(&self.weight, &self.scales)
        };
        let out = match &self.bias {
            Some(b) => out + b,
            None => out,
        };
        *shape.last_mut().expect("feature axis") = self.weight.size()[0];
        out.to_kind(input_kind).reshape(shape)
    }
    fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
    fn dense_weight(&self) -> Option<&Tensor> {
        None
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// Loading policy of the fast path: every 4-bit linear on the int4 kernels;
/// a layer they cannot run is an error, or dequantized when `allow_dequant`.
#[derive(Debug, Default)]
pub struct FastPath {
    pub allow_dequant: bool,
    dequantized: AtomicUsize,
    first_reason: Mutex<Option<String>>,
}

impl FastPath {
    pub fn new(allow_dequant: bool) -> Self {
        Self {
            allow_dequant,
            ..Default::default()
        }
    }

    /// How many layers fell back to dense weights, and why the first did.
    pub fn fallbacks(&self) -> (usize, Option<String>) {
        let reason = self.first_reason.lock().map(|r| r.clone()).unwrap_or(None);
        (self.dequantized.load(Ordering::Relaxed), reason)
    }
}

impl QuantizedLayers for FastPath {
    fn build(
        &self,
        name: &str,
        q: QuantizedLinear,
        opts: LoadOptions,
    ) -> Result<Box<dyn Linear>, ModelError> {
        match Int4Linear::new(&q, opts.device, opts.kind) {
            Ok(layer) => Ok(Box::new(layer)),
            Err(FastPathError::Torch(e)) => Err(ModelError::Torch(e)),
            Err(reason) if self.allow_dequant => {
                if self.dequantized.fetch_add(1, Ordering::Relaxed) == 0 {
                    if let Ok(mut first) = self.first_reason.lock() {
                        *first = Some(format!("{name}: {reason}"));
                    }
                }
                Dequantize.build(name, q, opts)
            }
            Err(reason) => Err(ModelError::FastPath {
                layer: name.to_string(),
                reason: reason.to_string(),
            }),
        }
    }
}

/// How the fast path stores the output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadQuant {
    /// As in the checkpoint.
    Keep,
    /// int8, one scale per vocabulary row.
    Int8,
    /// int4, groups of 32 (RTN, asymmetric).
    Int4,
}

/// Replaces a dense output head with an integer one. The embedding table
/// (tied or not) stays as it is: lookups read one row per token.
pub fn quantize_head(model: &mut CausalLm, head: HeadQuant) -> Result<(), FastPathError> {
    let Some(weight) = model.lm_head.dense_weight().map(Tensor::shallow_clone) else {
        return Ok(());
    };
    let bias = model.lm_head.bias().map(Tensor::shallow_clone);
    let kind = model.kind();
    model.lm_head = match head {
        HeadQuant::Keep => return Ok(()),
        HeadQuant::Int8 => Box::new(Int8Linear::from_dense(&weight, bias.as_ref(), kind)),
        HeadQuant::Int4 => {
            let spec = QuantSpec {
                method: MethodKind::Rtn,
                bits: 4,
                group_size: Some(32),
                sym: false,
                act_order: false,
                damp: 0.0,
            };
            let mut q = rtn_matrix(&weight, &spec);
            q.bias = bias.map(|b| b.to_kind(Kind::Float));
            Box::new(Int4Linear::new(&q, model.device(), kind)?)
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq::quantize_matrix;
    use crate::quant::{rtn::rtn_matrix, MethodKind, QuantSpec};

    fn spec(act_order: bool) -> QuantSpec {
        QuantSpec {
            method: MethodKind::Gptq,
            bits: 4,
            group_size: Some(32),
            sym: false,
            act_order,
            damp: 0.01,
        }
    }

    /// The kernel computes with exactly the dequantized weights (f32), on a
    /// few rows (the int4 kernel) and on many (the dense prefill path).
    #[test]
    fn int4_matches_the_dequantized_weight() {
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([48, 128], opts);
        let calib = Tensor::randn([5, 128], opts);
        let h = calib.transpose(0, 1).matmul(&calib) + Tensor::eye(128, opts);
        for q in [
            rtn_matrix(&w, &spec(false)),
            quantize_matrix(&w, &h, &spec(true), "t").unwrap(),
        ] {
            let layer = Int4Linear::new(&q, Device::Cpu, Kind::Float).unwrap();
            for rows in [5, PREFILL_ROWS + 7] {
                let x = Tensor::randn([rows, 128], opts);
                let reference = x.matmul(&q.dequantize().transpose(0, 1));
                let got = layer.forward(&x.view([1, rows, 128]));
                assert_eq!(got.size(), vec![1, rows, 48]);
                let diff = (got.view([rows, 48]) - &reference)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(
                    diff < 1e-4,
                    "max |Δ| {diff} ({rows} rows, act-order: {})",
                    !q.has_trivial_g_idx()
                );
            }
        }
    }

    #[test]
    fn int4_refuses_what_the_kernel_cannot_run() {
        let w = Tensor::randn([8, 64], (Kind::Float, Device::Cpu));
        let q = rtn_matrix(&w, &spec(false));
        assert!(matches!(
            Int4Linear::new(&q, Device::Cpu, Kind::Float),
            Err(FastPathError::Shape { .. })
        ));
        let mut s = spec(false);
        s.bits = 3;
        let q = rtn_matrix(&Tensor::randn([16, 64], (Kind::Float, Device::Cpu)), &s);
        assert!(matches!(
            Int4Linear::new(&q, Device::Cpu, Kind::Float),
            Err(FastPathError::Bits { bits: 3 })
        ));
    }

    #[test]
    fn int8_head_is_close_to_dense() {
        let w = Tensor::randn([64, 32], (Kind::Float, Device::Cpu));
        let layer = Int8Linear::from_dense(&w, None, Kind::Float);
        for rows in [3, PREFILL_ROWS + 5] {
            let x = Tensor::randn([rows, 32], (Kind::Float, Device::Cpu));
            let exact = x.matmul(&layer.dequantized().transpose(0, 1));
            let got = layer.forward(&x);
            assert!(
                (&got - &exact).abs().max().double_value(&[]) < 1e-4,
                "{rows} rows"
            );
            let dense = x.matmul(&w.transpose(0, 1));
            let rel = ((&got - &dense).norm().double_value(&[])) / dense.norm().double_value(&[]);
            assert!(rel < 0.01, "int8 head relative error {rel}");
        }
    }
}

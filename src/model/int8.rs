//! Frozen base layers whose matrix products run in int8, for LoRA training
//! (`[model] int8_base = true`).
//!
//! A LoRA step multiplies by each frozen base weight twice: `x·Wᵀ` forward
//! and `dy·W` for the input gradient (no weight gradient). Both run here as
//! int8 × int8 → int32 products (`torch._int_mm`: VNNI on x86 CPUs, tensor
//! cores on CUDA), with the activation or gradient quantized per row (per
//! token) on the fly, and the weight quantized once, per output channel for
//! the forward and per input channel for the backward, so every scale
//! factors out of its dot product. This is SwitchBack (Wortsman et al.
//! 2023) without its 16-bit weight gradient, which a frozen base does not
//! need. The autograd function is in `int8_linear.cpp`.
//!
//! Two int8 copies of a weight take half the memory of the f32 weight they
//! replace. The numbers differ from an f32 base the way a bf16 base's do,
//! but less (BENCHMARKS.md, `scripts/bench/int8_accuracy.py`). Not for
//! inference: use `qcoder quantize`, whose int4 kernels are built for decode.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::linear::Linear;
use super::{CausalLm, ModelError};

extern "C" {
    fn qcoder_int8_linear(
        x: *const C_tensor,
        w_fwd: *const C_tensor,
        s_fwd: *const C_tensor,
        w_bwd: *const C_tensor,
        s_bwd: *const C_tensor,
        bias: *const C_tensor,
    ) -> *mut C_tensor;
    fn qcoder_int8_quantize_rows(
        x: *const C_tensor,
        q: *mut *mut C_tensor,
        scale: *mut *mut C_tensor,
    ) -> c_int;
    fn qcoder_int8_mm_out(
        out: *const C_tensor,
        x: *const C_tensor,
        w: *const C_tensor,
        w_scale: *const C_tensor,
    ) -> c_int;
    fn qcoder_grad_enabled() -> c_int;
    fn qcoder_int8_cpu_fast() -> c_int;
    #[cfg(test)]
    fn qcoder_int8_test_path(path: c_int);
    fn qcoder_int8_last_error() -> *const c_char;
}

fn last_error() -> String {
    // SAFETY: a NUL-terminated string owned by the C++ side's thread-local,
    // valid until the next failing call on this thread.
    unsafe { CStr::from_ptr(qcoder_int8_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether libtorch multiplies int8 matrices fast on this device: on CUDA,
/// and on x86 CPUs with AVX-512 VNNI. Elsewhere the CPU's `_int_mm` is a
/// plain loop, so the same int8 values are multiplied as f32 matrices
/// (`int8_linear.cpp`): the numbers of an int8 base, the speed of an f32
/// one, and the decoder's weights still in half their f32 memory.
pub fn fast_int8_products(device: tch::Device) -> bool {
    // SAFETY: reads a flag computed once from CPUID.
    device.is_cuda() || unsafe { qcoder_int8_cpu_fast() } != 0
}

/// Symmetric per-row int8 quantization of a 2-D float tensor: the int8
/// values and the (rows, 1) f32 scales, `x ≈ q · scale`.
pub fn quantize_rows(x: &Tensor) -> Result<(Tensor, Tensor), tch::TchError> {
    let mut q = std::ptr::null_mut();
    let mut scale = std::ptr::null_mut();
    // SAFETY: `x` is a live tensor; on success both out-pointers hold fresh
    // `torch::Tensor*` that the returned `Tensor`s own and free.
    unsafe {
        if qcoder_int8_quantize_rows(x.as_ptr(), &mut q, &mut scale) != 0 {
            return Err(tch::TchError::Torch(last_error()));
        }
        Ok((Tensor::from_ptr(q), Tensor::from_ptr(scale)))
    }
}

/// One int8 product with a frozen weight: `x·M` for a (k, n) matrix M
/// stored quantized per column (n), so that each column's scale factors out
/// of its dot products. M is Wᵀ for the forward product (per output
/// channel) or W for the input gradient (per input channel).
#[derive(Debug)]
pub struct Int8Product {
    /// (k, n) int8.
    values: Tensor,
    /// (1, n) f32.
    scales: Tensor,
}

impl Int8Product {
    /// For `x·Wᵀ`, W (out_features, in_features).
    pub fn forward_of(weight: &Tensor) -> Result<Self, tch::TchError> {
        Self::columns_of(&weight.f_tr()?)
    }

    /// For `g·W`, W (out_features, in_features).
    pub fn input_grad_of(weight: &Tensor) -> Result<Self, tch::TchError> {
        Self::columns_of(weight)
    }

    /// M (k, n) quantized per column.
    fn columns_of(m: &Tensor) -> Result<Self, tch::TchError> {
        tch::no_grad(|| {
            let (values, scales) = quantize_rows(&m.f_tr()?)?;
            Ok(Self {
                values: values.f_tr()?.f_contiguous()?,
                scales: scales.f_tr()?.f_contiguous()?,
            })
        })
    }

    /// k.
    pub fn rows(&self) -> i64 {
        self.values.size()[0]
    }

    /// n.
    pub fn cols(&self) -> i64 {
        self.values.size()[1]
    }

    /// `out` (r, n) = x·M for x (r, k), without autograd; `out` any float
    /// buffer (written in place fastest when contiguous f32).
    pub fn mm_into(&self, out: &Tensor, x: &Tensor) -> Result<(), tch::TchError> {
        // SAFETY: every pointer is a live tensor for the duration of the
        // call; the C++ side writes into `out`'s storage only.
        let failed = unsafe {
            qcoder_int8_mm_out(
                out.as_ptr(),
                x.as_ptr(),
                self.values.as_ptr(),
                self.scales.as_ptr(),
            )
        };
        if failed != 0 {
            return Err(tch::TchError::Torch(last_error()));
        }
        Ok(())
    }

    /// M as the product sees it, (k, n) f32.
    pub fn dequantized(&self) -> Tensor {
        self.values.to_kind(Kind::Float) * &self.scales
    }
}

/// `y = x·Wᵀ + b` with both products in int8 (module docs); frozen.
#[derive(Debug)]
pub struct Int8Linear {
    forward: Int8Product,
    input_grad: Int8Product,
    bias: Option<Tensor>,
}

impl Int8Linear {
    /// Quantizes a dense (out_features, in_features) weight.
    pub fn from_dense(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self, tch::TchError> {
        Ok(Self {
            forward: Int8Product::forward_of(weight)?,
            input_grad: Int8Product::input_grad_of(weight)?,
            bias: bias.map(|b| b.detach()),
        })
    }

    /// The int8 product, or libtorch's message.
    pub fn f_forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let (f, g) = (&self.forward, &self.input_grad);
        let bias = self.bias.as_ref().map_or(std::ptr::null(), Tensor::as_ptr);
        // SAFETY: every pointer is a live tensor for the duration of the
        // call (or null for no bias); a non-null result is a fresh
        // `torch::Tensor*` owned by the returned `Tensor`.
        unsafe {
            let y = qcoder_int8_linear(
                x.as_ptr(),
                f.values.as_ptr(),
                f.scales.as_ptr(),
                g.values.as_ptr(),
                g.scales.as_ptr(),
                bias,
            );
            if y.is_null() {
                return Err(tch::TchError::Torch(last_error()));
            }
            Ok(Tensor::from_ptr(y))
        }
    }
}

/// Panics with libtorch's message: shapes were checked against the config
/// at load, so an int8 product only fails on a bug or an out-of-memory, as
/// `Tensor::linear` would.
fn or_panic(y: Result<Tensor, tch::TchError>, layer: &dyn Linear) -> Tensor {
    y.unwrap_or_else(|e| {
        panic!(
            "int8 linear ({} -> {}): {e}",
            layer.in_features(),
            layer.out_features()
        )
    })
}

impl Linear for Int8Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        or_panic(self.f_forward(x), self)
    }
    fn in_features(&self) -> i64 {
        self.forward.rows()
    }
    fn out_features(&self) -> i64 {
        self.forward.cols()
    }
    fn dense_weight(&self) -> Option<&Tensor> {
        None
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// The output layer under `int8_base`: logits from the int8 product, the
/// input gradient from the dense weight (which a tied head shares with the
/// embedding, so it costs no memory). A 152k-way softmax gradient is mostly
/// probabilities far below 1/127 of its largest entry, which per-row int8
/// would round to zero; the logits lose nothing comparable.
#[derive(Debug)]
pub struct Int8Head {
    logits: Int8Product,
    /// (vocab, hidden), the base's dtype.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Int8Head {
    pub fn from_dense(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self, tch::TchError> {
        Ok(Self {
            logits: Int8Product::forward_of(weight)?,
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
        })
    }

    fn f_forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        // SAFETY: reads a thread-local flag of libtorch.
        if x.requires_grad() && unsafe { qcoder_grad_enabled() } != 0 {
            // Outside the training loss (which runs the products itself),
            // a gradient through the head takes the dense path.
            return x.f_linear(&self.weight, self.bias.as_ref());
        }
        let mut shape = x.size();
        let hidden = *shape.last().unwrap_or(&0);
        *shape.last_mut().expect("inputs have a feature dimension") = self.logits.cols();
        let rows = x.f_reshape([-1, hidden])?;
        let out = Tensor::f_empty(
            [rows.size()[0], self.logits.cols()],
            (Kind::Float, x.device()),
        )?;
        self.logits.mm_into(&out, &rows)?;
        let out = match &self.bias {
            Some(b) => out.f_add(b)?,
            None => out,
        };
        out.f_to_kind(x.kind())?.f_reshape(shape)
    }
}

impl Linear for Int8Head {
    fn forward(&self, x: &Tensor) -> Tensor {
        or_panic(self.f_forward(x), self)
    }
    fn in_features(&self) -> i64 {
        self.logits.rows()
    }
    fn out_features(&self) -> i64 {
        self.logits.cols()
    }
    fn dense_weight(&self) -> Option<&Tensor> {
        Some(&self.weight)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn int8_logits(&self) -> Option<&Int8Product> {
        Some(&self.logits)
    }
}

/// Replaces every dense linear layer of the decoder with its [`Int8Linear`]
/// and a dense output layer with its [`Int8Head`]; returns how many. The
/// decoder's dense weights are dropped. Where int8 products are not fast
/// ([`fast_int8_products`]) the output layer stays dense: its int8 copy
/// saves no memory (the dense weight stays for the input gradient), and
/// multiplying it as f32 would convert a vocabulary-sized matrix each step.
pub fn int8_base(model: &mut CausalLm) -> Result<usize, ModelError> {
    let mut replaced = 0;
    let head_device = model.lm_head.dense_weight().map(Tensor::device);
    if model.lm_head.is_plain_dense() && head_device.is_some_and(fast_int8_products) {
        let head = &model.lm_head;
        let weight = head
            .dense_weight()
            .expect("a plain dense layer has a weight");
        let int8 = Int8Head::from_dense(weight, head.bias())
            .map_err(|e| tch::TchError::Torch(format!("int8 base, lm_head: {e}")))?;
        model.lm_head = Box::new(int8);
        replaced += 1;
    }
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (name, slot) in layer.linears_mut() {
            if !slot.is_plain_dense() {
                continue;
            }
            let weight = slot
                .dense_weight()
                .expect("a plain dense layer has a weight");
            let int8 = Int8Linear::from_dense(weight, slot.bias()).map_err(|e| {
                tch::TchError::Torch(format!("int8 base, model.layers.{i}.{name}: {e}"))
            })?;
            *slot = Box::new(int8);
            replaced += 1;
        }
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).norm().double_value(&[]) / b.norm().double_value(&[])
    }

    #[test]
    fn quantize_rows_is_symmetric_per_row() {
        let x =
            Tensor::from_slice(&[1.0f32, -2.0, 0.5, 0.0, 0.0, 0.0, 3.0, 1.5, -0.75]).view([3, 3]);
        let (q, s) = quantize_rows(&x).unwrap();
        assert_eq!(q.kind(), Kind::Int8);
        assert_eq!(s.size(), [3, 1]);
        let q: Vec<i8> = Vec::try_from(q.flatten(0, -1)).unwrap();
        assert_eq!(q, [64, -127, 32, 0, 0, 0, 127, 64, -32]);
        let s: Vec<f32> = Vec::try_from(s.flatten(0, -1)).unwrap();
        assert!((s[0] - 2.0 / 127.0).abs() < 1e-9 && (s[2] - 3.0 / 127.0).abs() < 1e-9);
        assert!(s[1] > 0.0, "an all-zero row gets a positive scale, not 0/0");
    }

    /// The forward product and the input gradient equal the same int8
    /// arithmetic written out in f64, and stay within int8 rounding of the
    /// f32 layer.
    #[test]
    fn products_match_their_definition_and_the_dense_layer() {
        tch::manual_seed(3);
        let (rows, in_f, out_f) = (37i64, 48, 40);
        let w = Tensor::randn([out_f, in_f], (Kind::Float, tch::Device::Cpu)) * 0.05;
        let b = Tensor::randn([out_f], (Kind::Float, tch::Device::Cpu));
        let layer = Int8Linear::from_dense(&w, Some(&b)).unwrap();
        let x =
            Tensor::randn([rows, in_f], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let y = layer.forward(&x.view([1, rows, in_f]));
        assert_eq!(y.size(), [1, rows, out_f]);
        let dy = Tensor::randn([1, rows, out_f], (Kind::Float, tch::Device::Cpu));
        (&y * &dy).sum(Kind::Float).backward();
        let dx = x.grad();

        let f64_of = |t: &Tensor| t.to_kind(Kind::Double);
        let (xq, sx) = quantize_rows(&x.detach()).unwrap();
        let (wq, sw) = quantize_rows(&w).unwrap();
        let want_y =
            f64_of(&xq).matmul(&f64_of(&wq).tr()) * f64_of(&sx) * f64_of(&sw).tr() + f64_of(&b);
        let (gq, sg) = quantize_rows(&dy.view([rows, out_f])).unwrap();
        let (wtq, swt) = quantize_rows(&w.tr().contiguous()).unwrap();
        let want_dx = f64_of(&gq).matmul(&f64_of(&wtq).tr()) * f64_of(&sg) * f64_of(&swt).tr();
        assert!(rel(&f64_of(&y.view([rows, out_f])), &want_y) < 1e-6);
        assert!(rel(&f64_of(&dx), &want_dx) < 1e-6);

        let dense_y = x.detach().linear(&w, Some(&b));
        let dense_dx = dy.view([rows, out_f]).matmul(&w);
        assert!(rel(&y.view([rows, out_f]).detach(), &dense_y) < 0.02);
        assert!(rel(&dx, &dense_dx) < 0.02);
        assert!(rel(&layer.forward.dequantized(), &w.tr()) < 0.01);
        assert!(rel(&layer.input_grad.dequantized(), &w) < 0.01);
    }

    /// A bf16 activation comes back in bf16, with its gradient.
    #[test]
    fn keeps_the_activation_dtype() {
        let w = Tensor::randn([16, 24], (Kind::Float, tch::Device::Cpu));
        let layer = Int8Linear::from_dense(&w, None).unwrap();
        let x = Tensor::randn([20, 24], (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true);
        let y = layer.forward(&x);
        assert_eq!(y.kind(), Kind::BFloat16);
        y.sum(Kind::Float).backward();
        assert_eq!(x.grad().kind(), Kind::BFloat16);
        assert_eq!(x.grad().size(), [20, 24]);
    }

    /// The tensor-op path (what CUDA runs, with its padding of short inputs
    /// to 17 rows) and the f32 products of a CPU without fast int8 products
    /// give the numbers of this CPU's automatic choice: the same int8
    /// values, the scales applied (or the sums rounded) in another order.
    #[test]
    fn every_product_path_gives_the_same_numbers() {
        tch::manual_seed(5);
        let w = Tensor::randn([40, 24], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([40], (Kind::Float, tch::Device::Cpu));
        let layer = Int8Linear::from_dense(&w, Some(&b)).unwrap();
        let head = Int8Head::from_dense(&w, None).unwrap();
        for rows in [5i64, 33] {
            let x0 = Tensor::randn([rows, 24], (Kind::Float, tch::Device::Cpu));
            let dy = Tensor::randn([rows, 40], (Kind::Float, tch::Device::Cpu));
            let run = |path: c_int| {
                // SAFETY: sets a thread-local flag of the C++ side.
                unsafe { qcoder_int8_test_path(path) };
                let x = x0.copy().set_requires_grad(true);
                let y = layer.forward(&x);
                (&y * &dy).sum(Kind::Float).backward();
                let logits = tch::no_grad(|| head.forward(&x0));
                let (q, s) = quantize_rows(&x0).unwrap();
                unsafe { qcoder_int8_test_path(0) };
                (y.detach(), x.grad(), logits, q, s)
            };
            let (y1, g1, l1, q1, s1) = run(0);
            for path in [1, 2] {
                let (y2, g2, l2, q2, s2) = run(path);
                assert!(
                    q1.equal(&q2) && s1.equal(&s2),
                    "path {path}, {rows} rows: quantization differs"
                );
                for (a, b) in [(&y1, &y2), (&g1, &g2), (&l1, &l2)] {
                    assert!(rel(a, b) < 1e-6, "path {path}, {rows} rows: {}", rel(a, b));
                }
            }
        }
    }
}

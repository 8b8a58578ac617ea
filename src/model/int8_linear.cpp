// A frozen linear layer whose two products run in int8 (see src/model/int8.rs):
//   forward   y  = (Q(x) · Wq_fwdᵀ) ∘ (s_x ⊗ s_w)      + bias
//   backward  dx = (Q(dy) · Wq_bwd)  ∘ (s_dy ⊗ s_w')
// with Q(·) symmetric per-row (per-token) int8 quantization of the activation
// or gradient, Wq_fwd quantized per output channel and Wq_bwd per input
// channel. No weight gradient: the base is frozen (LoRA). This is the
// SwitchBack scheme (Wortsman et al. 2023, "Stable and low-precision training
// for large-scale vision-language models") without its 16-bit weight gradient.
//
// libtorch has no way to declare an autograd function from Rust, so this file
// is the one piece of C++ in qcoder, built by build.rs against the same
// libtorch as tch. Tensors cross the boundary as tch's `C_tensor` pointers
// (`torch::Tensor*`); exceptions never do: they become a null result and a
// message for `qcoder_int8_last_error`.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace {

thread_local std::string last_error;

// Which way the CPU multiplies: kAuto takes libtorch's int8 product
// (`_int_mm`) where it is fast, f32 products of the int8 values elsewhere;
// tests force the other two ways on any CPU. kTensorOps is the path CUDA
// takes (with its row padding).
enum class Path { kAuto = 0, kTensorOps = 1, kF32Products = 2 };
thread_local Path test_path = Path::kAuto;

// libtorch multiplies int8 matrices with oneDNN on x86 CPUs with AVX-512
// VNNI (AMX CPUs have it too): about 4x its f32 products on a 2-core Xeon.
// Without VNNI `_int_mm` falls back to a plain loop, 3 GOP/s on an AVX2 AMD
// EPYC against 110-170 GFLOP/s in f32: there the same int8 values are
// multiplied as f32 matrices instead (products of two int8 values are exact
// in f32, only the sums round), which costs about what an f32 base does.
bool cpu_int8_fast() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool fast = __builtin_cpu_supports("avx512vnni");
  return fast;
#else
  return false;
#endif
}

bool f32_products(const at::Tensor& a) {
  return a.is_cpu() && (test_path == Path::kF32Products || (test_path == Path::kAuto && !cpu_int8_fast()));
}

// The CPU loops below are built for AVX-512, AVX2 and plain x86-64, the
// version picked at load time (GCC/Clang function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__)
#define QCODER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QCODER_CLONES
#endif

QCODER_CLONES float row_absmax(const float* x, int64_t n) {
  float m = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

QCODER_CLONES void row_quantize(const float* x, int64_t n, float inv_scale, int8_t* q) {
  // Adding and subtracting 1.5·2²³ rounds to the nearest integer, ties to
  // even (as torch.round), for |v| < 2²²; here |v| ≤ 127. Vectorizes on any
  // x86 (no SSE4.1 round instruction needed). Built with -ffp-contract=off so
  // that the product is rounded to f32 first, as in the tensor version.
  constexpr float kRound = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    float r = (x[i] * inv_scale + kRound) - kRound;
    q[i] = static_cast<int8_t>(static_cast<int32_t>(r));
  }
}

// acc (n int32) -> the same memory as n floats: acc · row_scale · col_scale
// (+ bias). In place: each element is read before it is written, and the
// file is built with -fno-strict-aliasing.
QCODER_CLONES void row_dequantize(int32_t* acc, int64_t n, float row_scale, const float* col_scale,
                                  const float* bias) {
  float* y = reinterpret_cast<float*>(acc);
  if (bias) {
    for (int64_t j = 0; j < n; ++j)
      y[j] = static_cast<float>(acc[j]) * row_scale * col_scale[j] + bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = static_cast<float>(acc[j]) * row_scale * col_scale[j];
  }
}

// Rows per task of at::parallel_for: about 64 KiB of floats.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1)); }

float scale_of(float absmax) { return std::max(absmax / 127.0f, 1e-30f); }

// y (n f32, in place) · row_scale · col_scale (+ bias).
QCODER_CLONES void row_rescale(float* y, int64_t n, float row_scale, const float* col_scale,
                               const float* bias) {
  if (bias) {
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] * row_scale * col_scale[j] + bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] * row_scale * col_scale[j];
  }
}

// (rows, cols) float -> (int8 values, per-row f32 scales (rows, 1)):
// x ≈ q · scale, scale = max|row| / 127, q = round(x / scale).
std::pair<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in) {
  if (x_in.is_cpu() && test_path != Path::kTensorOps) {
    auto x = x_in.to(at::kFloat).contiguous();
    auto rows = x.size(0), cols = x.size(1);
    auto q = at::empty({rows, cols}, x.options().dtype(at::kChar));
    auto scale = at::empty({rows, 1}, x.options());
    const float* xp = x.data_ptr<float>();
    int8_t* qp = q.data_ptr<int8_t>();
    float* sp = scale.data_ptr<float>();
    at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        sp[r] = scale_of(row_absmax(xp + r * cols, cols));
        row_quantize(xp + r * cols, cols, 1.0f / sp[r], qp + r * cols);
      }
    });
    return {q, scale};
  }
  auto x = x_in.to(at::kFloat);
  auto scale = x.abs().amax({-1}, /*keepdim=*/true).div_(127.0).clamp_min_(1e-30);
  auto q = at::mul(x, scale.reciprocal()).round_().to(at::kChar);
  return {q, scale};
}

// a (rows, k) int8 · b (k, n) int8 -> (rows, n) int32. CUDA's kernel wants
// more than 16 rows: fewer are padded with zero rows.
at::Tensor int_mm(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kMinCudaRows = 17;
  if ((a.is_cuda() || test_path == Path::kTensorOps) && a.size(0) < kMinCudaRows) {
    auto padded = at::zeros({kMinCudaRows, a.size(1)}, a.options());
    padded.narrow(0, 0, a.size(0)).copy_(a);
    return at::_int_mm(padded, b).narrow(0, 0, a.size(0));
  }
  return at::_int_mm(a, b);
}

// out (rows, n) = a (rows, k) int8 · b (k, n) int8, times the rows' and the
// columns' scales, plus the bias if defined. `out` may be of any float dtype.
void scaled_int_mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& row_scale,
                        const at::Tensor& b, const at::Tensor& col_scale, const at::Tensor& bias) {
  bool f32 = f32_products(a);
  if (test_path == Path::kTensorOps ||
      !(a.is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous())) {
    auto acc = f32 ? at::mm(a.to(at::kFloat), b.to(at::kFloat)) : int_mm(a, b);
    auto y = at::mul(acc, at::mul(row_scale, col_scale));
    if (bias.defined()) y.add_(bias);
    out.copy_(y);
    return;
  }
  // One (rows, n) buffer: the int32 (or f32) products, then the scaled
  // floats in place.
  auto rows = a.size(0), n = b.size(1);
  if (f32) {
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
  } else {
    auto acc = out.view(at::kInt);
    at::_int_mm_out(acc, a, b);
  }
  auto rs = row_scale.contiguous();
  auto cs = col_scale.contiguous();
  auto bs = bias.defined() ? bias.to(at::kFloat).contiguous() : bias;
  void* yp = out.data_ptr();
  const float* rp = rs.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  const float* bp = bs.defined() ? bs.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (f32) {
        row_rescale(static_cast<float*>(yp) + r * n, n, rp[r], cp, bp);
      } else {
        row_dequantize(static_cast<int32_t*>(yp) + r * n, n, rp[r], cp, bp);
      }
    }
  });
}

at::Tensor scaled_int_mm(const at::Tensor& a, const at::Tensor& row_scale, const at::Tensor& b,
                         const at::Tensor& col_scale, const at::Tensor& bias) {
  auto y = at::empty({a.size(0), b.size(1)}, row_scale.options().dtype(at::kFloat));
  scaled_int_mm_into(y, a, row_scale, b, col_scale, bias);
  return y;
}

struct Int8Linear : public torch::autograd::Function<Int8Linear> {
  // x (..., in); w_fwd (in, out) int8, s_fwd (1, out); w_bwd (out, in) int8,
  // s_bwd (1, in); bias (out), or empty for none (an undefined tensor is
  // not a valid input of an autograd function).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w_fwd, const at::Tensor& s_fwd,
                            const at::Tensor& w_bwd, const at::Tensor& s_bwd,
                            const at::Tensor& bias) {
    auto in_features = w_fwd.size(0);
    auto out_features = w_fwd.size(1);
    auto x2 = x.reshape({-1, in_features}).contiguous();
    auto [xq, sx] = quantize_rows(x2);
    auto y = scaled_int_mm(xq, sx, w_fwd, s_fwd, bias.numel() > 0 ? bias : at::Tensor());
    ctx->save_for_backward({w_bwd, s_bwd});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    auto out_shape = x.sizes().vec();
    out_shape.back() = out_features;
    // `_unsafe_view`: the result is not a view for autograd, so callers may
    // modify it in place (a custom function's view output may not be).
    return at::_unsafe_view(y.to(x.scalar_type()), out_shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& w_bwd = saved[0];
    const auto& s_bwd = saved[1];
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const auto& dy = grads[0];
    auto out_features = w_bwd.size(0);
    auto in_features = w_bwd.size(1);
    auto dy2 = dy.reshape({-1, out_features}).contiguous();
    auto [gq, sg] = quantize_rows(dy2);
    auto dx = scaled_int_mm(gq, sg, w_bwd, s_bwd, at::Tensor());
    auto in_shape = dy.sizes().vec();
    in_shape.back() = in_features;
    return {at::_unsafe_view(dx.to(dtype), in_shape), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Returns a new `torch::Tensor*` (owned by the caller, freed by tch's
// `at_free`), or null with the message in `qcoder_int8_last_error`.
at::Tensor* qcoder_int8_linear(const at::Tensor* x, const at::Tensor* w_fwd,
                               const at::Tensor* s_fwd, const at::Tensor* w_bwd,
                               const at::Tensor* s_bwd, const at::Tensor* bias) {
  try {
    at::Tensor b = bias ? *bias : at::empty({0}, w_fwd->options().dtype(at::kFloat));
    return new at::Tensor(Int8Linear::apply(*x, *w_fwd, *s_fwd, *w_bwd, *s_bwd, b));
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

// Per-row int8 quantization of a 2-D float tensor: the values into `*q` and
// the (rows, 1) f32 scales into `*scale` (both new, owned by the caller).
int qcoder_int8_quantize_rows(const at::Tensor* x, at::Tensor** q, at::Tensor** scale) {
  try {
    auto [values, scales] = quantize_rows(x->contiguous());
    *q = new at::Tensor(values);
    *scale = new at::Tensor(scales);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// `*out` (rows, n) = Q(x) · w · scales for x (rows, k) float, w (k, n) int8
// and w_scale (1, n): the product of an int8 weight without autograd, into a
// caller's buffer (the training loss's output layer). 0, or 1 with the
// message in `qcoder_int8_last_error`.
int qcoder_int8_mm_out(at::Tensor* out, const at::Tensor* x, const at::Tensor* w,
                       const at::Tensor* w_scale) {
  try {
    auto [xq, sx] = quantize_rows(*x);
    scaled_int_mm_into(*out, xq, sx, *w, *w_scale, at::Tensor());
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// Tests: this thread's CPU work from now on takes the given path (0 the
// automatic choice, 1 the tensor-op path CUDA takes, 2 f32 products).
void qcoder_int8_test_path(int path) { test_path = static_cast<Path>(path); }

// 1 when libtorch multiplies int8 matrices fast on this CPU (see above).
int qcoder_int8_cpu_fast() { return cpu_int8_fast() ? 1 : 0; }

// Whether autograd records operations on this thread (not inside no_grad).
int qcoder_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

const char* qcoder_int8_last_error() { return last_error.c_str(); }
}

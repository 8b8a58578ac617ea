//! Next-token cross-entropy over a 152k vocabulary without materialising the
//! f32 logits of the whole batch: the hidden states are cut from the graph,
//! the output projection + loss run (and backpropagate) one chunk of tokens
//! at a time into the detached copy, and the accumulated gradient is then
//! pushed through the decoder in one backward pass. Peak extra memory is one
//! chunk's logits instead of (tokens × vocab × 4 bytes).
//!
//! For a plain dense, frozen output layer (the LoRA case) the chunk's loss
//! and gradient are computed directly, without autograd, in two buffers
//! allocated once per call: logits by one product into the buffer, the
//! softmax written over them in place, the one-hot subtracted, and the
//! gradient of the chunk's inputs by a second product written straight into
//! its rows of the input gradient. The same arithmetic as
//! `cross_entropy` + backward (softmax − one-hot, scaled), without a fresh
//! (tokens × vocab) allocation per chunk, so the chunks can be tall enough
//! for the matrix products to run at full speed.

use tch::{Kind, Reduction, Tensor};

use crate::model::int8::Int8Product;
use crate::model::linear::Linear;

/// Most tokens per chunk of logits for a vocabulary of `vocab`: as many as
/// keep one chunk's f32 logits under 128 MiB, rounded down to a multiple of
/// 16 (208 tokens for Qwen's 152k; a 511-token block then runs as three
/// chunks of 171). Measured on a 2-core Intel AVX-512 CPU in f32 (MKL,
/// `scripts/bench/matmul_shapes.py`): the output projection and its input
/// gradient run at about 150–160 GFLOP/s at 51 rows (the earlier 30 MiB
/// chunks), 190 at 96, 210–215 at 128, 220–235 at 256; the loss's buffers add
/// about 100 MiB (plus a bf16 copy for a bf16 head) to the peak.
pub fn chunk_tokens(vocab: i64) -> i64 {
    const BUDGET: i64 = 128 << 20;
    ((BUDGET / (vocab.max(1) * 4)) / 16 * 16).clamp(16, 4096)
}

/// Summed next-token loss of `hidden` (batch, seq, hidden) against `ids`
/// (batch, seq), and the number of predicted tokens. With `backward_scale`,
/// also backpropagates `scale · loss` into whatever `hidden` depends on.
pub fn next_token_loss(
    lm_head: &dyn Linear,
    hidden: &Tensor,
    ids: &Tensor,
    backward_scale: Option<f64>,
    chunk: i64,
) -> Result<(f64, i64), tch::TchError> {
    let (b, s, h) = hidden.size3()?;
    let n = b * (s - 1);
    // (batch·(seq-1), hidden): position t predicts token t+1.
    let inputs = hidden.f_narrow(1, 0, s - 1)?.f_reshape([n, h])?;
    let labels = ids
        .f_narrow(1, 1, s - 1)?
        .f_reshape([n])?
        .f_to_device(hidden.device())?;
    let products = match (lm_head.int8_logits(), lm_head.dense_weight()) {
        (Some(logits), Some(w)) => Some(HeadProducts::Int8 { logits, weight: w }),
        (None, Some(w)) if lm_head.is_plain_dense() && !w.requires_grad() => {
            Some(HeadProducts::Dense(w))
        }
        _ => None,
    };
    if let Some(products) = products {
        return direct_loss(
            &products,
            lm_head.bias(),
            &inputs,
            &labels,
            backward_scale,
            chunk,
        )
        .map(|total| (total, n));
    }
    let detached = match backward_scale {
        Some(_) => inputs.detach().set_requires_grad(true),
        None => inputs.shallow_clone(),
    };
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = lm_head
            .forward(&detached.f_narrow(0, start, len)?)
            .f_to_kind(Kind::Float)?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(
            &labels.f_narrow(0, start, len)?,
            None,
            Reduction::Sum,
            -100,
            0.0,
        )?;
        total += loss.f_double_value(&[])?;
        if let Some(scale) = backward_scale {
            (loss * scale).f_backward()?;
        }
        start += len;
    }
    if backward_scale.is_some() && inputs.requires_grad() {
        let grad = detached.grad();
        let kind = inputs_kind_sum(&grad);
        (inputs * grad).f_sum(kind)?.f_backward()?;
    }
    Ok((total, n))
}

/// The products of a frozen output layer, run by [`direct_loss`].
enum HeadProducts<'a> {
    /// (vocab, hidden), in the head's dtype.
    Dense(&'a Tensor),
    /// `[model] int8_base`: f32 logits from the int8 product, the input
    /// gradient from the dense (vocab, hidden) weight.
    Int8 {
        logits: &'a Int8Product,
        weight: &'a Tensor,
    },
}

impl HeadProducts<'_> {
    fn vocab(&self) -> i64 {
        match self {
            Self::Dense(w) => w.size()[0],
            Self::Int8 { logits, .. } => logits.cols(),
        }
    }

    /// The dtype of the logits the forward product writes.
    fn logits_kind(&self, input_kind: Kind) -> Kind {
        match self {
            Self::Dense(_) => input_kind,
            Self::Int8 { .. } => Kind::Float,
        }
    }

    /// `out` (rows, vocab) = x·Wᵀ.
    fn logits_into(&self, out: &Tensor, x: &Tensor) -> Result<(), tch::TchError> {
        match self {
            Self::Dense(w) => x.f_mm_out(out, &w.tr()).map(drop),
            Self::Int8 { logits, .. } => logits.mm_into(out, x),
        }
    }

    /// `out` (rows, hidden) = g·W.
    fn input_grad_into(&self, out: &Tensor, g: &Tensor) -> Result<(), tch::TchError> {
        match self {
            Self::Dense(w) | Self::Int8 { weight: w, .. } => {
                g.f_to_kind(w.kind())?.f_mm_out(out, w).map(drop)
            }
        }
    }
}

/// [`next_token_loss`] for a frozen dense or int8 head: `inputs` (n, hidden)
/// and `labels` (n), returns the summed loss (and backpropagates when
/// `backward_scale` is set).
fn direct_loss(
    head: &HeadProducts,
    bias: Option<&Tensor>,
    inputs: &Tensor,
    labels: &Tensor,
    backward_scale: Option<f64>,
    chunk: i64,
) -> Result<f64, tch::TchError> {
    let (n, _) = inputs.size2()?;
    let vocab = head.vocab();
    let x = inputs.detach();
    let kind = head.logits_kind(x.kind());
    let device = x.device();
    // Chunks of equal height (171, 171, 169 rather than 208, 208, 95): the
    // products run faster the taller the chunk.
    let chunk = chunk.max(1);
    let chunks = ((n + chunk - 1) / chunk).max(1);
    let rows = ((n + chunks - 1) / chunks).max(1);
    let logits_buf = Tensor::f_empty([rows, vocab], (kind, device))?;
    // The loss in f32 whatever the head's dtype (as transformers upcasts).
    let f32_buf = match kind {
        Kind::Float | Kind::Double => None,
        _ => Some(Tensor::f_empty([rows, vocab], (Kind::Float, device))?),
    };
    let backward = match backward_scale {
        Some(scale) if inputs.requires_grad() => Some((scale, Tensor::f_empty_like(&x)?)),
        _ => None,
    };
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let xc = x.f_narrow(0, start, len)?;
        let lab = labels.f_narrow(0, start, len)?.f_unsqueeze(1)?;
        let mut logits = logits_buf.f_narrow(0, 0, len)?;
        head.logits_into(&logits, &xc)?;
        if let Some(b) = bias {
            let _ = logits.f_add_(b)?;
        }
        let mut lf = match &f32_buf {
            Some(buf) => {
                let mut f = buf.f_narrow(0, 0, len)?;
                f.f_copy_(&logits)?;
                f
            }
            None => logits.shallow_clone(),
        };
        // loss_i = logsumexp(logits_i) − logits_i[label_i], computed in place
        // over the buffer (`Tensor::logsumexp` allocates a (len × vocab)
        // temporary: fresh pages, zeroed by the kernel, on every chunk):
        // m = max_j logits_ij, e = exp(logits − m), loss_i = ln Σ_j e_ij −
        // (logits_i[label_i] − m).
        let max = lf.f_amax([1i64], true)?;
        let _ = lf.f_sub_(&max)?;
        let picked = lf.f_gather(1, &lab, false)?;
        let _ = lf.f_exp_()?;
        let sum = lf.f_sum_dim_intlist(&[1i64][..], true, lf.kind())?;
        total += (sum.f_log()? - picked)
            .f_sum(Kind::Double)?
            .f_double_value(&[])?;
        if let Some((scale, grad)) = &backward {
            // scale · (softmax − one-hot), in place: e · (scale / Σe), then
            // −scale at each label.
            let _ = lf.f_mul_(&sum.f_reciprocal()?.f_mul_scalar(*scale)?)?;
            let _ = lf.f_scatter_add_(
                1,
                &lab,
                &Tensor::f_full([len, 1], -*scale, (lf.kind(), device))?,
            )?;
            // The input gradient in the head's dtype, as autograd would
            // cast it back through the upcast.
            if f32_buf.is_some() {
                logits.f_copy_(&lf)?;
            } else {
                logits = lf;
            }
            head.input_grad_into(&grad.f_narrow(0, start, len)?, &logits)?;
        }
        start += len;
    }
    if let Some((_, grad)) = backward {
        let kind = inputs_kind_sum(&grad);
        (inputs * grad).f_sum(kind)?.f_backward()?;
    }
    Ok(total)
}

fn inputs_kind_sum(grad: &Tensor) -> Kind {
    match grad.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::DenseLinear;
    use tch::Device;

    #[test]
    fn chunked_equals_full_loss_and_gradient() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([11, 5], opts);
        let head = DenseLinear::new(w.shallow_clone(), None);
        let ids = Tensor::randint(11, [2, 7], (Kind::Int64, Device::Cpu));
        let mut x = Tensor::randn([2, 7, 5], opts).set_requires_grad(true);
        let hidden = &x * 1.5;
        let (sum, n) = next_token_loss(&head, &hidden, &ids, Some(1.0 / 12.0), 5).unwrap();
        assert_eq!(n, 12);
        let g_chunked = x.grad().copy();
        x.zero_grad();
        let logits = (&x * 1.5).narrow(1, 0, 6).matmul(&w.tr()).reshape([12, 11]);
        let full = logits.cross_entropy_loss::<Tensor>(
            &ids.narrow(1, 1, 6).reshape([12]),
            None,
            Reduction::Mean,
            -100,
            0.0,
        );
        full.backward();
        assert!((sum / 12.0 - full.double_value(&[])).abs() < 1e-5);
        assert!(g_chunked.allclose(&x.grad(), 1e-5, 1e-6, false));
    }

    /// The direct path (frozen dense head) and autograd's (a head whose
    /// weight trains) give the same loss and input gradient, in f32 and with
    /// a bf16 head (f32 loss, bf16 products), with a bias and ragged chunks.
    #[test]
    fn direct_path_matches_autograd() {
        tch::manual_seed(2);
        for kind in [Kind::Float, Kind::BFloat16] {
            let opts = (Kind::Float, Device::Cpu);
            let w = Tensor::randn([37, 8], opts).to_kind(kind);
            let bias = Tensor::randn([37], opts).to_kind(kind);
            let ids = Tensor::randint(37, [3, 9], (Kind::Int64, Device::Cpu));
            let x0 = Tensor::randn([3, 9, 8], opts).to_kind(kind);
            let run = |head: &DenseLinear| {
                let mut x = x0.copy().set_requires_grad(true);
                let hidden = &x * 2.0;
                let (sum, n) = next_token_loss(head, &hidden, &ids, Some(0.5), 7).unwrap();
                let g = x.grad().to_kind(Kind::Float);
                x.zero_grad();
                (sum, n, g)
            };
            let frozen = DenseLinear::new(w.copy(), Some(bias.copy()));
            assert!(frozen.is_plain_dense() && !frozen.weight.requires_grad());
            let trained = DenseLinear::new(w.copy().set_requires_grad(true), Some(bias.copy()));
            let (s1, n1, g1) = run(&frozen);
            let (s2, n2, g2) = run(&trained);
            assert_eq!((n1, n2), (24, 24));
            assert!(trained.weight.grad().defined(), "autograd path taken");
            let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
            assert!((s1 - s2).abs() < tol * s2.abs(), "{kind:?}: {s1} vs {s2}");
            let err = (&g1 - &g2).abs().max().double_value(&[]);
            let scale = g2.abs().max().double_value(&[]);
            assert!(
                err <= tol * scale,
                "{kind:?}: gradient off by {err} (max {scale})"
            );
            // Evaluation (no backward) gives the same sum, up to f32 rounding:
            // its chunks have other row counts, and a CPU matrix product may
            // round differently for another shape (seen on AVX2: 1e-8 relative).
            let (s3, _) =
                tch::no_grad(|| next_token_loss(&frozen, &(&x0 * 2.0), &ids, None, 5)).unwrap();
            assert!(
                (s3 - s1).abs() < 1e-6 * s1.abs().max(1.0),
                "{kind:?}: {s3} vs {s1}"
            );
        }
    }

    /// `[model] int8_base`'s output layer: the loss of the int8 logits, and
    /// the input gradient through the dense weight, as autograd gives them
    /// for `logits = x·Wᵀ + b + (int8 logits − x·Wᵀ − b)` held constant.
    #[test]
    fn int8_head_loss_and_gradient_match_their_definition() {
        use crate::model::int8::Int8Head;
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([37, 8], opts);
        let bias = Tensor::randn([37], opts);
        let ids = Tensor::randint(37, [3, 9], (Kind::Int64, Device::Cpu));
        let x0 = Tensor::randn([3, 9, 8], opts);
        let head = Int8Head::from_dense(&w, Some(&bias)).unwrap();
        assert!(head.int8_logits().is_some() && !head.is_plain_dense());

        let x = x0.copy().set_requires_grad(true);
        let (sum, n) = next_token_loss(&head, &(&x * 2.0), &ids, Some(0.5), 7).unwrap();
        assert_eq!(n, 24);
        let got_grad = x.grad();

        let x = x0.copy().set_requires_grad(true);
        let inputs = (&x * 2.0).narrow(1, 0, 8).reshape([24, 8]);
        let int8_logits = tch::no_grad(|| head.forward(&inputs));
        let dense = inputs.linear(&w, Some(&bias));
        assert!((&int8_logits - &dense).abs().max().double_value(&[]) > 0.0);
        let logits = &dense + (&int8_logits - &dense).detach();
        let labels = ids.narrow(1, 1, 8).reshape([24]);
        let want = logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, 0.0);
        (&want * 0.5).backward();
        let want = want.double_value(&[]);
        assert!((sum - want).abs() < 1e-5 * want.abs(), "{sum} vs {want}");
        let err = (&got_grad - x.grad()).abs().max().double_value(&[]);
        assert!(
            err <= 1e-5 * x.grad().abs().max().double_value(&[]),
            "gradient off by {err}"
        );
    }
}

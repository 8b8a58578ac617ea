//! Next-token cross-entropy over a 152k vocabulary without materialising the
//! f32 logits of the whole batch: the hidden states are cut from the graph,
//! the output projection + loss run (and backpropagate) one chunk of tokens
//! at a time into the detached copy, and the accumulated gradient is then
//! pushed through the decoder in one backward pass. Peak extra memory is one
//! chunk's logits instead of (tokens × vocab × 4 bytes).

use tch::{Kind, Reduction, Tensor};

use crate::model::linear::Linear;

/// Tokens per chunk of logits for a vocabulary of `vocab`: as many as keep
/// one chunk's f32 logits under 30 MiB (51 tokens for Qwen's 152k), below
/// glibc's largest mmap threshold, so that every chunk's buffers are
/// recycled from the heap instead of page-faulted anew (see
/// `device::keep_freed_memory`), and the loss adds little to the peak. The
/// output projection stays compute-bound at this height (measured: 51-token
/// chunks as fast as 512-token ones on a 2-core AVX-512 CPU in bf16).
pub fn chunk_tokens(vocab: i64) -> i64 {
    const BUDGET: i64 = 30 << 20;
    (BUDGET / (vocab.max(1) * 4)).clamp(16, 4096)
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
}

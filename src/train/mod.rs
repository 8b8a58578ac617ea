//! LoRA fine-tuning: the recipe, AdamW, learning-rate schedules, the
//! chunked next-token loss, the step itself and checkpoints for exact resume.
//!
//! Determinism: the data order is a function of the seed and the block
//! cursor, and libtorch's generator (LoRA dropout) is reseeded from
//! `(seed, step)` at the start of every optimizer step. A checkpoint
//! therefore needs only the adapter, the AdamW moments and the step to make a
//! resumed run repeat an uninterrupted one exactly.

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod recipe;
pub mod schedule;

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::data::packing::{epoch_order, Blocks};
use crate::lora::{Adapter, LoraError};
use crate::model::CausalLm;
use optim::AdamW;
use schedule::LrSchedule;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("step {step}: the loss is {loss} (not finite); stopping. The last good checkpoint (if any) is kept; lower [train] lr or raise warmup")]
    NonFinite { step: usize, loss: f64 },
    #[error("{}: {msg}", path.display())]
    Checkpoint {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean next-token loss over all tokens of the step.
    pub loss: f64,
    pub lr: f64,
    /// Total gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: i64,
}

/// The libtorch seed of optimizer step `step`.
pub fn step_seed(seed: u64, step: usize) -> i64 {
    (seed.wrapping_mul(1_000_003).wrapping_add(step as u64) & (i64::MAX as u64)) as i64
}

pub struct Trainer {
    pub adapter: Adapter,
    pub opt: AdamW,
    pub schedule: LrSchedule,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Recompute each layer's activations in the backward pass instead of
    /// keeping them (see `CausalLm::checkpointed_backward`).
    pub gradient_checkpointing: bool,
}

/// The libtorch seed of decoder layer `layer` of micro-batch `micro` in a
/// step seeded `step_seed`, with gradient checkpointing: both forwards of a
/// layer draw the same dropout masks.
fn layer_seed(step_seed: i64, micro: usize, layer: usize) -> i64 {
    let mixed = (step_seed as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((micro as u64) << 20 | layer as u64);
    (mixed & (i64::MAX as u64)) as i64
}

impl Trainer {
    /// Optimizer step `step` (0-based) over `micro_batches` (each (batch, seq) ids),
    /// accumulating gradients; the loss is the mean over every predicted token.
    pub fn step(
        &mut self,
        model: &CausalLm,
        micro_batches: &[Tensor],
        step: usize,
    ) -> Result<StepStats, TrainError> {
        tch::manual_seed(step_seed(self.seed, step));
        self.adapter.set_training(true);
        let tokens: i64 = micro_batches
            .iter()
            .map(|b| {
                let s = b.size();
                s[0] * (s[1] - 1)
            })
            .sum();
        let scale = 1.0 / tokens as f64;
        let mut total = 0.0;
        let seed = step_seed(self.seed, step);
        for (micro, ids) in micro_batches.iter().enumerate() {
            let head_loss = |hidden: &Tensor| {
                loss::next_token_loss(
                    model.lm_head.as_ref(),
                    hidden,
                    ids,
                    Some(scale),
                    loss::chunk_tokens(model.lm_head.out_features()),
                )
                .map(|(sum, _)| sum)
            };
            total += if self.gradient_checkpointing {
                model.checkpointed_backward(
                    ids,
                    &|layer| tch::manual_seed(layer_seed(seed, micro, layer)),
                    &mut |hidden| Ok(head_loss(hidden)?),
                )?
            } else {
                head_loss(&model.forward_hidden(ids, None)?)?
            };
        }
        let loss = total / tokens as f64;
        if !loss.is_finite() {
            self.opt.zero_grad();
            return Err(TrainError::NonFinite {
                step: step + 1,
                loss,
            });
        }
        let grad_norm = self.opt.grad_norm();
        if !grad_norm.is_finite() {
            self.opt.zero_grad();
            return Err(TrainError::NonFinite {
                step: step + 1,
                loss: grad_norm,
            });
        }
        if self.max_grad_norm > 0.0 {
            self.opt.clip_grad_norm(self.max_grad_norm, grad_norm);
        }
        let lr = self.schedule.lr(step);
        self.opt.step(lr);
        self.opt.zero_grad();
        Ok(StepStats {
            loss,
            lr,
            grad_norm,
            tokens,
        })
    }

    /// Mean next-token loss over up to `max_batches` batches of `blocks`, dropout off.
    pub fn eval_loss(
        &self,
        model: &CausalLm,
        blocks: &Blocks,
        micro_batch: usize,
        max_batches: usize,
    ) -> Result<Option<f64>, TrainError> {
        if blocks.is_empty() {
            return Ok(None);
        }
        self.adapter.set_training(false);
        let (mut total, mut n) = (0.0, 0i64);
        tch::no_grad(|| -> Result<(), TrainError> {
            let indices: Vec<usize> = (0..blocks.len()).collect();
            for chunk in indices.chunks(micro_batch).take(max_batches.max(1)) {
                let ids = batch_tensor(blocks, chunk, model.device())?;
                let hidden = model.forward_hidden(&ids, None)?;
                let (sum, count) = loss::next_token_loss(
                    model.lm_head.as_ref(),
                    &hidden,
                    &ids,
                    None,
                    loss::chunk_tokens(model.lm_head.out_features()),
                )?;
                total += sum;
                n += count;
            }
            Ok(())
        })?;
        Ok(Some(total / n as f64))
    }
}

/// Blocks `indices` as a (len, seq_len) int64 tensor on `device`.
pub fn batch_tensor(
    blocks: &Blocks,
    indices: &[usize],
    device: Device,
) -> Result<Tensor, tch::TchError> {
    let mut ids: Vec<i64> = Vec::with_capacity(indices.len() * blocks.seq_len);
    for &i in indices {
        ids.extend(blocks.block(i).iter().map(|&t| t as i64));
    }
    Tensor::f_from_slice(&ids)?
        .f_view([indices.len() as i64, blocks.seq_len as i64])?
        .f_to_device(device)
}

/// Where the run is in the data: a cursor over blocks across epochs, each
/// epoch in its own seeded order.
pub struct DataCursor<'a> {
    blocks: &'a Blocks,
    seed: u64,
    /// Blocks consumed so far.
    pub position: u64,
    orders: HashMap<u64, Vec<usize>>,
}

impl<'a> DataCursor<'a> {
    pub fn new(blocks: &'a Blocks, seed: u64, position: u64) -> Self {
        Self {
            blocks,
            seed,
            position,
            orders: HashMap::new(),
        }
    }

    /// The next `n` block indices.
    pub fn take(&mut self, n: usize) -> Vec<usize> {
        let len = self.blocks.len() as u64;
        (0..n)
            .map(|_| {
                let (epoch, i) = (self.position / len, self.position % len);
                self.position += 1;
                self.orders.retain(|e, _| *e + 1 >= epoch);
                let order = self
                    .orders
                    .entry(epoch)
                    .or_insert_with(|| epoch_order(len as usize, self.seed, epoch));
                order[i as usize]
            })
            .collect()
    }

    /// `micro_batches` batches of `micro_batch` blocks each, as tensors.
    pub fn next_step(
        &mut self,
        micro_batches: usize,
        micro_batch: usize,
        device: Device,
    ) -> Result<Vec<Tensor>, tch::TchError> {
        (0..micro_batches)
            .map(|_| {
                let idx = self.take(micro_batch);
                batch_tensor(self.blocks, &idx, device)
            })
            .collect()
    }
}

/// The kind LoRA weights and optimizer state are kept in, whatever the base.
pub const TRAINABLE_KIND: Kind = Kind::Float;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_crosses_epochs_deterministically() {
        let blocks = Blocks {
            seq_len: 2,
            tokens: (0..10).collect(),
        };
        let mut a = DataCursor::new(&blocks, 5, 0);
        let first: Vec<usize> = a.take(12);
        let mut epoch0 = first[..5].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, vec![0, 1, 2, 3, 4]);
        let mut b = DataCursor::new(&blocks, 5, 7);
        assert_eq!(b.take(5), first[7..12].to_vec());
    }
}

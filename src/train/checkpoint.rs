//! `OUT/checkpoints/step-N/`: the adapter (a complete PEFT adapter), the
//! AdamW moments and `trainer_state.json` (step, data position, seed, the
//! recipe's trajectory hash). Written under a temporary name and renamed, so
//! a crash never leaves a half-written checkpoint under a final name.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{TrainError, Trainer};
use crate::lora::{self, ADAPTER_WEIGHTS};
use crate::model::Checkpoint;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Training blocks consumed.
    pub data_position: u64,
    pub seed: u64,
    pub recipe_hash: String,
    /// How libtorch's generator is driven (it is reseeded every step, so
    /// there is no generator state to save).
    pub rng: String,
    pub total_steps: usize,
}

fn err(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

pub fn dir_name(step: usize) -> String {
    format!("step-{step}")
}

/// Completed checkpoints in `root` (OUT/checkpoints), oldest first.
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Saves a checkpoint and keeps only the newest `keep_last`.
pub fn save(
    root: &Path,
    trainer: &Trainer,
    state: &TrainerState,
    base_model: &str,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(root).map_err(|e| err(root, e.to_string()))?;
    let dest = root.join(dir_name(state.step));
    let tmp = root.join(format!(".{}.tmp", dir_name(state.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| err(&tmp, e.to_string()))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e.to_string()))?;
    trainer.adapter.save(&tmp, base_model)?;
    lora::save_tensors(&tmp.join(OPTIMIZER_FILE), &trainer.opt.state_tensors())?;
    let text = serde_json::to_string_pretty(state).map_err(|e| err(&tmp, e.to_string()))?;
    std::fs::write(tmp.join(STATE_FILE), text + "\n").map_err(|e| err(&tmp, e.to_string()))?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| err(&dest, e.to_string()))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| err(&dest, e.to_string()))?;
    let all = list(root);
    if all.len() > keep_last {
        for (_, old) in &all[..all.len() - keep_last] {
            std::fs::remove_dir_all(old).map_err(|e| err(old, e.to_string()))?;
        }
    }
    Ok(dest)
}

pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| err(&path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(&path, e.to_string()))
}

/// Restores adapter weights and optimizer moments from `dir`.
pub fn restore(dir: &Path, trainer: &mut Trainer, state: &TrainerState) -> Result<(), TrainError> {
    if !dir.join(ADAPTER_WEIGHTS).is_file() {
        return Err(err(dir, "no adapter_model.safetensors"));
    }
    trainer.adapter.load_weights(dir)?;
    let path = dir.join(OPTIMIZER_FILE);
    let ckpt = Checkpoint::open(&path)?;
    trainer
        .opt
        .load_state(state.step as u64, |name| {
            ckpt.tensor_any_shape(name, tch::Kind::Float, tch::Device::Cpu)
                .ok()
        })
        .map_err(|msg| err(&path, msg))
}

//! `qcoder export`: a model directory as GGUF or as sharded safetensors.

use anyhow::Result;

use super::Outcome;
use crate::cli::ExportArgs;

pub fn run(_args: ExportArgs) -> Result<Outcome> {
    anyhow::bail!("export is not implemented yet")
}

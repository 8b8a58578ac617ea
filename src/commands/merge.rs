//! `qcoder merge`: a LoRA adapter folded into its base model.

use anyhow::{Context, Result};

use super::staging::Staged;
use super::Outcome;
use crate::cli::MergeArgs;
use crate::model::hub;

pub fn run(args: MergeArgs) -> Result<Outcome> {
    let max_shard = crate::data::parse_size(&args.max_shard_size)
        .map_err(|e| anyhow::anyhow!("--max-shard-size {}: {e}", args.max_shard_size))?;
    let base = hub::resolve_model_dir(&args.model)?;
    // Check the adapter before writing anything.
    crate::lora::AdapterConfigFile::read(&args.adapter)?;
    let staged = Staged::dir(&args.output)?;
    let summary = crate::lora::merge(&base, &args.adapter, staged.path(), max_shard)
        .with_context(|| format!("merging {} into {}", args.adapter.display(), base.display()))?;
    staged.commit()?;
    eprintln!(
        "merged {} LoRA modules into {} -> {}",
        summary.merged_modules,
        base.display(),
        args.output.display()
    );
    Ok(Outcome::Success)
}

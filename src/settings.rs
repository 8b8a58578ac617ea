//! Helpers for the files users write by hand (pipeline files, recipes):
//! environment variables in paths, and the valid key nearest a misspelled one.

/// The closest of `candidates` to `key`, when it is close enough to be a
/// typo: a few edits away, or one a prefix of the other (`max_step`).
pub fn suggest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(key, c), *c))
        .filter(|(d, c)| {
            *d <= (c.len().max(key.len()) / 3).max(2) || key.starts_with(c) || c.starts_with(key)
        })
        .min()
        .map(|(_, c)| c)
}

/// Expands a leading `~/` and `${VAR}` / `${VAR:-default}` anywhere.
pub fn expand(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    if let Some(tail) = rest.strip_prefix("~/") {
        let home = std::env::var("HOME")
            .map_err(|_| format!("`{text}` starts with ~ but HOME is not set"))?;
        out.push_str(&home);
        out.push('/');
        rest = tail;
    }
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in `{text}`"))?;
        let spec = &after[..end];
        let (name, default) = match spec.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (spec, None),
        };
        match (std::env::var(name), default) {
            (Ok(v), _) if !v.is_empty() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            _ => return Err(format!("`{text}` uses ${{{name}}}, which is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand() {
        std::env::set_var("QCODER_TEST_EXPAND", "/data");
        assert_eq!(expand("${QCODER_TEST_EXPAND}/x").unwrap(), "/data/x");
        assert_eq!(expand("${QCODER_TEST_UNSET_VAR:-d}/y").unwrap(), "d/y");
        assert!(expand("${QCODER_TEST_UNSET_VAR}").is_err());
        assert_eq!(expand("plain").unwrap(), "plain");
    }

    #[test]
    fn typos_find_their_key() {
        assert_eq!(suggest("quantise", &["quantize", "eval"]), Some("quantize"));
        assert_eq!(suggest("zzz", &["quantize", "eval"]), None);
    }
}

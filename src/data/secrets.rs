//! Secret and PII redaction, run on every text before it is written.
//!
//! Patterns follow the providers' documented token formats (the same ones
//! gitleaks and GitHub secret scanning use) and BigCode's PII pipeline for
//! e-mail addresses. A match is replaced by [`SECRET_PLACEHOLDER`] or
//! [`EMAIL_PLACEHOLDER`] and counted by kind.

use std::borrow::Cow;

use regex::Regex;
use serde::Serialize;

pub const SECRET_PLACEHOLDER: &str = "<SECRET>";
pub const EMAIL_PLACEHOLDER: &str = "<EMAIL>";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    PrivateKey,
    AwsAccessKey,
    GithubToken,
    GitlabToken,
    SlackToken,
    GoogleApiKey,
    StripeKey,
    Jwt,
    /// `password = "…"`, `api_key: '…'` and the like, with a high-entropy value.
    Assignment,
    Email,
}

impl SecretKind {
    pub const ALL: [SecretKind; 10] = [
        SecretKind::PrivateKey,
        SecretKind::AwsAccessKey,
        SecretKind::GithubToken,
        SecretKind::GitlabToken,
        SecretKind::SlackToken,
        SecretKind::GoogleApiKey,
        SecretKind::StripeKey,
        SecretKind::Jwt,
        SecretKind::Assignment,
        SecretKind::Email,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SecretKind::PrivateKey => "private_key",
            SecretKind::AwsAccessKey => "aws_access_key",
            SecretKind::GithubToken => "github_token",
            SecretKind::GitlabToken => "gitlab_token",
            SecretKind::SlackToken => "slack_token",
            SecretKind::GoogleApiKey => "google_api_key",
            SecretKind::StripeKey => "stripe_key",
            SecretKind::Jwt => "jwt",
            SecretKind::Assignment => "assignment",
            SecretKind::Email => "email",
        }
    }
}

/// Counts per [`SecretKind`], indexed like [`SecretKind::ALL`].
pub type SecretCounts = [u64; SecretKind::ALL.len()];

/// The minimum Shannon entropy (bits per character) of a value assigned to a
/// `password`/`secret`/`token` name before it is treated as a secret.
/// Random base64/hex keys sit above 3.5; identifiers, placeholders such as
/// `changeme` and most English phrases sit below 3.
const MIN_ASSIGNMENT_ENTROPY: f64 = 3.0;
const MIN_ASSIGNMENT_LEN: usize = 8;

struct Rule {
    kind: SecretKind,
    matcher: Matcher,
    /// A cheap test; the matcher only runs on texts that pass it.
    prefilter: Prefilter,
}

enum Matcher {
    /// Replace each match.
    Regex(Regex),
    /// Replace the value of `NAME = "value"` where NAME holds a secret word;
    /// see [`assignment_values`].
    Assignment,
}

enum Prefilter {
    None,
    Literal(&'static [u8]),
}

impl Prefilter {
    fn may_match(&self, text: &[u8]) -> bool {
        match self {
            Prefilter::None => true,
            Prefilter::Literal(needle) => memchr::memmem::find(text, needle).is_some(),
        }
    }
}

pub struct Redactor {
    rules: Vec<Rule>,
    redact_emails: bool,
}

impl Redactor {
    pub fn new(redact_emails: bool) -> Self {
        // The patterns are constants checked by the unit tests.
        let literal = |needle: &'static str| Prefilter::Literal(needle.as_bytes());
        let rule = |kind, pattern: &str, prefilter| Rule {
            kind,
            // ASCII word boundaries keep every pattern on the fast DFA engines.
            matcher: Matcher::Regex(
                Regex::new(&pattern.replace(r"\b", r"(?-u:\b)"))
                    .unwrap_or_else(|e| panic!("secret pattern {kind:?}: {e}")),
            ),
            prefilter,
        };
        let rules = vec![
            rule(
                SecretKind::PrivateKey,
                r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----[\s\S]*?(-----END[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|\z)",
                literal("PRIVATE KEY"),
            ),
            rule(
                SecretKind::AwsAccessKey,
                r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b",
                Prefilter::None,
            ),
            rule(
                SecretKind::GithubToken,
                r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})\b",
                Prefilter::None,
            ),
            rule(
                SecretKind::GitlabToken,
                r"\bglpat-[A-Za-z0-9_\-]{20,}",
                literal("glpat-"),
            ),
            rule(
                SecretKind::SlackToken,
                r"\bxox[abposr]-[A-Za-z0-9\-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/_\-]+",
                Prefilter::None,
            ),
            rule(
                SecretKind::GoogleApiKey,
                r"\bAIza[0-9A-Za-z_\-]{35}\b",
                literal("AIza"),
            ),
            rule(
                SecretKind::StripeKey,
                r"\b[rs]k_(?:live|test)_[0-9A-Za-z]{20,}\b",
                Prefilter::None,
            ),
            rule(
                SecretKind::Jwt,
                r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
                literal("eyJ"),
            ),
            Rule {
                kind: SecretKind::Assignment,
                matcher: Matcher::Assignment,
                prefilter: Prefilter::None,
            },
            rule(
                SecretKind::Email,
                r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b",
                literal("@"),
            ),
        ];
        Redactor {
            rules,
            redact_emails,
        }
    }

    /// Replaces every secret in `text`; borrows when there is none.
    pub fn redact<'a>(&self, text: &'a str, counts: &mut SecretCounts) -> Cow<'a, str> {
        let mut current: Cow<'a, str> = Cow::Borrowed(text);
        for rule in &self.rules {
            if rule.kind == SecretKind::Email && !self.redact_emails {
                continue;
            }
            if !rule.prefilter.may_match(current.as_bytes()) {
                continue;
            }
            if let Some(replaced) = rule.apply(&current, counts) {
                current = Cow::Owned(replaced);
            }
        }
        current
    }
}

impl Rule {
    fn apply(&self, text: &str, counts: &mut SecretCounts) -> Option<String> {
        let placeholder = match self.kind {
            SecretKind::Email => EMAIL_PLACEHOLDER,
            _ => SECRET_PLACEHOLDER,
        };
        let spans: Vec<(usize, usize)> = match &self.matcher {
            Matcher::Regex(regex) => regex
                .find_iter(text)
                .map(|m| (m.start(), m.end()))
                .collect(),
            Matcher::Assignment => assignment_values(text),
        };
        let mut out: Option<String> = None;
        let mut last = 0;
        for (start, end) in spans {
            if !self.accepts(&text[start..end]) {
                continue;
            }
            let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
            out.push_str(&text[last..start]);
            out.push_str(placeholder);
            last = end;
            counts[self.kind as usize] += 1;
        }
        let mut out = out?;
        out.push_str(&text[last..]);
        Some(out)
    }

    fn accepts(&self, value: &str) -> bool {
        match self.kind {
            SecretKind::Assignment => looks_random(value),
            SecretKind::Email => !is_example_address(value),
            _ => true,
        }
    }
}

/// Words that make a name secret-bearing (ASCII case-insensitive).
const SECRET_NAME_WORDS: &[&[u8]] = &[
    b"password",
    b"passwd",
    b"pwd",
    b"secret",
    b"token",
    b"apikey",
    b"api_key",
    b"accesskey",
    b"access_key",
    b"privatekey",
    b"private_key",
    b"authkey",
    b"auth_key",
    b"credential",
];

/// Byte spans of the values in `NAME = "value"`, `NAME: 'value'`,
/// `"NAME": "value"`, `NAME := "value"`, `NAME => "value"` (an optional
/// `b`/`r`/`u` string prefix allowed) where NAME, a run of
/// `[A-Za-z0-9_.-]`, contains one of [`SECRET_NAME_WORDS`] and the value is
/// a quoted run without whitespace or quotes. The same language as the regex
/// `(?i)(password|...)[a-z0-9_.-]*["']?\s*(:=|=>|=|:)\s*[bru]?["']([^"'\s]+)["']`,
/// matched from each quote backwards: quotes are found with memchr, so the
/// text is not run through a case-insensitive automaton byte by byte.
fn assignment_values(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let is_quote = |c: u8| c == b'"' || c == b'\'';
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(offset) = memchr::memchr2(b'"', b'\'', &b[from..]) {
        let open = from + offset;
        from = open + 1;
        let mut end = open + 1;
        while end < b.len() && !is_quote(b[end]) && !b[end].is_ascii_whitespace() {
            end += 1;
        }
        if end == open + 1 || end >= b.len() || !is_quote(b[end]) {
            continue;
        }
        if assigned_to_secret_name(b, open) {
            spans.push((open + 1, end));
            from = end + 1;
        }
    }
    spans
}

/// Whether the quote at `open` ends `NAME ["']? \s* (= | : | := | =>) \s* [bru]?`
/// with a secret-bearing NAME.
fn assigned_to_secret_name(b: &[u8], open: usize) -> bool {
    let skip_space = |mut i: usize| {
        while i > 0 && b[i - 1].is_ascii_whitespace() {
            i -= 1;
        }
        i
    };
    let mut i = open;
    if i > 0 && matches!(b[i - 1].to_ascii_lowercase(), b'b' | b'r' | b'u') {
        i -= 1;
    }
    i = skip_space(i);
    match i.checked_sub(1).map(|j| b[j]) {
        Some(b'=') => {
            i -= 1;
            if i > 0 && b[i - 1] == b':' {
                i -= 1;
            }
        }
        Some(b'>') if i >= 2 && b[i - 2] == b'=' => i -= 2,
        Some(b':') => i -= 1,
        _ => return false,
    }
    i = skip_space(i);
    if i > 0 && (b[i - 1] == b'"' || b[i - 1] == b'\'') {
        i -= 1;
    }
    let name_end = i;
    while i > 0 && (b[i - 1].is_ascii_alphanumeric() || matches!(b[i - 1], b'_' | b'.' | b'-')) {
        i -= 1;
    }
    let name = &b[i..name_end];
    SECRET_NAME_WORDS
        .iter()
        .any(|w| name.windows(w.len()).any(|win| win.eq_ignore_ascii_case(w)))
}

/// A value worth redacting: long enough, letters and digits mixed, high
/// entropy, and not a template reference (`${VAR}`, `{{ var }}`, `%(name)s`,
/// `<placeholder>`), which is also what an already redacted value looks like.
/// Values without a digit are kept: they are almost always identifiers,
/// paths or prose, while generated keys and tokens nearly always hold digits.
fn looks_random(value: &str) -> bool {
    let template = value.contains("${")
        || value.contains("{{")
        || value.contains("%(")
        || value.starts_with('$')
        || (value.starts_with('<') && value.ends_with('>'));
    value.len() >= MIN_ASSIGNMENT_LEN
        && !template
        && value.bytes().any(|b| b.is_ascii_digit())
        && value.bytes().any(|b| b.is_ascii_alphabetic())
        && shannon_entropy(value) >= MIN_ASSIGNMENT_ENTROPY
}

/// Documentation addresses (RFC 2606 domains) carry no personal data.
fn is_example_address(address: &str) -> bool {
    let domain = address
        .rsplit('@')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    ["example.com", "example.org", "example.net", "localhost"]
        .iter()
        .any(|d| domain == *d || domain.ends_with(&format!(".{d}")))
}

/// Bits per character of the value's character distribution.
pub fn shannon_entropy(s: &str) -> f64 {
    let mut freq = [0u32; 256];
    for b in s.bytes() {
        freq[b as usize] += 1;
    }
    let n = s.len() as f64;
    freq.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(text: &str) -> (String, SecretCounts) {
        let mut counts = SecretCounts::default();
        let out = Redactor::new(true).redact(text, &mut counts).into_owned();
        (out, counts)
    }

    #[test]
    fn each_kind_is_found_and_replaced() {
        let cases: &[(&str, SecretKind)] = &[
            ("key = '''\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----\n'''", SecretKind::PrivateKey),
            ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA", SecretKind::PrivateKey),
            ("aws_id = AKIAIOSFODNN7EXAMPLE;", SecretKind::AwsAccessKey),
            ("tok ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 end", SecretKind::GithubToken),
            ("GITLAB glpat-xYz12AbCdEfGhIjKlMnOp", SecretKind::GitlabToken),
            ("SLACK=xoxb-123456789012-abcdefghijkl", SecretKind::SlackToken),
            ("maps AIzaSyA1234567890abcdefghijklmnopqrstuv", SecretKind::GoogleApiKey),
            ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", SecretKind::StripeKey),
            ("auth eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", SecretKind::Jwt),
            ("DB_PASSWORD = \"x9$Kq2!vLp7#Rt\"", SecretKind::Assignment),
            ("config = {'api_key': 'f3a9c2e17b4d8a0e'}", SecretKind::Assignment),
            ("# Author: Jane Doe <jane.doe@corp-mail.io>", SecretKind::Email),
        ];
        for (text, kind) in cases {
            let (out, counts) = redact(text);
            assert!(
                counts[*kind as usize] >= 1,
                "{kind:?} not found in {text:?} -> {out:?}"
            );
            let placeholder = if *kind == SecretKind::Email {
                EMAIL_PLACEHOLDER
            } else {
                SECRET_PLACEHOLDER
            };
            assert!(out.contains(placeholder), "{text:?} -> {out:?}");
        }
    }

    #[test]
    fn ordinary_code_is_left_alone() {
        let texts = [
            "password = \"changeme\"",           // low entropy
            "token = tokenize(line)",            // not a string literal
            "secret = \"${SECRET_FROM_ENV}\"",   // a template reference
            "TOKEN_TYPES = ('name', 'op')",      // short values
            "mail = 'someone@example.com'",      // documentation domain
            "x = a @ b.T",                       // matrix product
            "def token(self): return self._tok", // no assignment of a literal
        ];
        for text in texts {
            let (out, counts) = redact(text);
            assert_eq!(out, text);
            assert_eq!(counts.iter().sum::<u64>(), 0, "{text}");
        }
    }

    #[test]
    fn assignment_keeps_the_name_and_counts_each_value() {
        let (out, counts) = redact("a_secret = 'Zx81Qw72Er63'\nb_token: \"Mn5Bv4Cx3Lk2\"\n");
        assert_eq!(out, "a_secret = '<SECRET>'\nb_token: \"<SECRET>\"\n");
        assert_eq!(counts[SecretKind::Assignment as usize], 2);
    }

    /// The hand-written matcher finds what the regex it documents finds.
    #[test]
    fn assignment_matcher_agrees_with_its_regex() {
        let regex = Regex::new(
            r#"(?i)(?:password|passwd|pwd|secret|token|api_?key|access_?key|private_?key|auth_?key|credential)[a-z0-9_.\-]*["']?\s*(?::=|=>|=|:)\s*[bru]?["']([^"'\s]+)["']"#,
        )
        .unwrap();
        let texts = [
            "DB_PASSWORD = \"abc\"",
            "db.password=r'x1'",
            "if password == \"abc\": pass",
            "{'Api_Key': 'v', \"authKey\" : \"w\"}",
            "token := \"t\"; SECRET => 'u'",
            "my_token_file = \"two words\"",
            "name = \"token\"",
            "password = \"\"",
            "password\n  =\n  b\"multi\"",
            "x = 'a' + password + 'b'",
            "credentials: \"c\" 'd'",
        ];
        for text in texts {
            let expected: Vec<(usize, usize)> = regex
                .captures_iter(text)
                .filter_map(|c| c.get(1))
                .map(|m| (m.start(), m.end()))
                .collect();
            assert_eq!(assignment_values(text), expected, "{text:?}");
        }
    }

    #[test]
    fn emails_can_be_kept() {
        let mut counts = SecretCounts::default();
        let text = "# bob@corp.io";
        assert_eq!(Redactor::new(false).redact(text, &mut counts), text);
    }

    #[test]
    fn entropy() {
        assert_eq!(shannon_entropy("aaaa"), 0.0);
        assert!((shannon_entropy("abcd") - 2.0).abs() < 1e-12);
    }
}

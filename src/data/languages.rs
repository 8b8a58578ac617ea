//! The language table (`datasets/languages.toml`): file name, extension or
//! shebang → language. The built-in table is compiled in; `--language-table`
//! replaces it with a file in the same format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The table shipped with qcoder.
pub const BUILTIN_TABLE: &str = include_str!("../../datasets/languages.toml");

#[derive(Debug, thiserror::Error)]
pub enum LanguageTableError {
    #[error("reading language table {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("language table {origin}: {msg}")]
    Parse { origin: String, msg: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    language: Vec<LanguageEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LanguageEntry {
    name: String,
    #[serde(default)]
    extensions: Vec<String>,
    #[serde(default)]
    filenames: Vec<String>,
    #[serde(default)]
    shebangs: Vec<String>,
    #[serde(default)]
    data: bool,
}

/// Index into [`LanguageTable::languages`].
pub type LanguageId = u16;

#[derive(Debug, Clone)]
pub struct Language {
    pub name: String,
    /// A data format (JSON, CSV, ...), skipped unless asked for.
    pub data: bool,
}

#[derive(Debug, Clone)]
pub struct LanguageTable {
    languages: Vec<Language>,
    by_extension: HashMap<String, LanguageId>,
    by_filename: HashMap<String, LanguageId>,
    by_interpreter: HashMap<String, LanguageId>,
    /// Longest extension in the table, in dots ("d.ts" has one).
    max_extension_dots: usize,
}

impl LanguageTable {
    pub fn builtin() -> Self {
        // The built-in table is tested below; a parse failure is a build bug.
        Self::parse(BUILTIN_TABLE, "built-in").unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn from_file(path: &Path) -> Result<Self, LanguageTableError> {
        let text = std::fs::read_to_string(path).map_err(|source| LanguageTableError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, LanguageTableError> {
        let parse_err = |msg: String| LanguageTableError::Parse {
            origin: origin.to_string(),
            msg,
        };
        let file: TableFile = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut table = LanguageTable {
            languages: Vec::with_capacity(file.language.len()),
            by_extension: HashMap::new(),
            by_filename: HashMap::new(),
            by_interpreter: HashMap::new(),
            max_extension_dots: 0,
        };
        for entry in file.language {
            if entry.name.trim().is_empty() {
                return Err(parse_err("a [[language]] has an empty name".into()));
            }
            if table.languages.iter().any(|l| l.name == entry.name) {
                return Err(parse_err(format!(
                    "language {:?} is listed twice",
                    entry.name
                )));
            }
            let id = LanguageId::try_from(table.languages.len())
                .map_err(|_| parse_err("too many languages".into()))?;
            let claim = |map: &mut HashMap<String, LanguageId>, key: String, what: &str| match map
                .insert(key.clone(), id)
            {
                Some(prev) if prev != id => Err(parse_err(format!(
                    "{what} {key:?} belongs to both {:?} and {:?}",
                    table.languages[prev as usize].name, entry.name
                ))),
                _ => Ok(()),
            };
            for ext in &entry.extensions {
                let ext = ext.trim_start_matches('.').to_ascii_lowercase();
                table.max_extension_dots = table.max_extension_dots.max(ext.matches('.').count());
                claim(&mut table.by_extension, ext, "extension")?;
            }
            for name in &entry.filenames {
                claim(&mut table.by_filename, name.clone(), "file name")?;
            }
            for interp in &entry.shebangs {
                claim(&mut table.by_interpreter, interp.clone(), "shebang")?;
            }
            table.languages.push(Language {
                name: entry.name,
                data: entry.data,
            });
        }
        Ok(table)
    }

    pub fn languages(&self) -> &[Language] {
        &self.languages
    }

    pub fn get(&self, id: LanguageId) -> &Language {
        &self.languages[id as usize]
    }

    pub fn id_of(&self, name: &str) -> Option<LanguageId> {
        self.languages
            .iter()
            .position(|l| l.name.eq_ignore_ascii_case(name))
            .map(|i| i as LanguageId)
    }

    /// Language from the file name alone (exact name, then extension).
    pub fn by_path(&self, file_name: &str) -> Option<LanguageId> {
        if let Some(&id) = self.by_filename.get(file_name) {
            return Some(id);
        }
        // Try the longest compound extension first: "x.d.ts" → "d.ts", "ts".
        let lower = file_name.to_ascii_lowercase();
        let dots: Vec<usize> = lower.match_indices('.').map(|(i, _)| i).collect();
        let first = dots.len().saturating_sub(self.max_extension_dots + 1);
        for &dot in &dots[first..] {
            // A leading dot is a hidden file's name, not an extension.
            if dot == 0 {
                continue;
            }
            if let Some(&id) = self.by_extension.get(&lower[dot + 1..]) {
                return Some(id);
            }
        }
        None
    }

    /// Whether a name has no extension the table could match, so that a
    /// shebang is worth reading.
    pub fn may_have_shebang(file_name: &str) -> bool {
        !file_name.trim_start_matches('.').contains('.')
    }

    /// Language from a `#!` first line, if the text starts with one.
    pub fn by_shebang(&self, head: &[u8]) -> Option<LanguageId> {
        let line = head.strip_prefix(b"#!")?;
        let end = memchr::memchr(b'\n', line).unwrap_or(line.len());
        let line = std::str::from_utf8(&line[..end]).ok()?;
        let mut words = line.split_whitespace();
        let mut program = words.next()?.rsplit('/').next()?;
        if program == "env" {
            // `#!/usr/bin/env -S python3 -u`: skip env's own options.
            program = words.find(|w| !w.starts_with('-') && !w.contains('='))?;
        }
        if let Some(&id) = self.by_interpreter.get(program) {
            return Some(id);
        }
        let unversioned = program.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
        self.by_interpreter.get(unversioned).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_parses_and_is_broad() {
        let table = LanguageTable::builtin();
        let code = table.languages().iter().filter(|l| !l.data).count();
        assert!(code >= 30, "only {code} code languages");
    }

    #[test]
    fn extensions_filenames_and_shebangs() {
        let t = LanguageTable::builtin();
        let name = |id: Option<LanguageId>| id.map(|id| t.get(id).name.as_str());
        assert_eq!(name(t.by_path("main.rs")), Some("Rust"));
        assert_eq!(name(t.by_path("Main.JAVA")), Some("Java"));
        assert_eq!(name(t.by_path("index.d.ts")), Some("TypeScript"));
        assert_eq!(name(t.by_path("a.b.c.py")), Some("Python"));
        assert_eq!(name(t.by_path("Makefile")), Some("Makefile"));
        assert_eq!(name(t.by_path("CMakeLists.txt")), Some("CMake"));
        assert_eq!(name(t.by_path("notes.txt")), None);
        assert_eq!(name(t.by_path(".py")), None);
        assert_eq!(
            name(t.by_shebang(b"#!/usr/bin/env python3.11\nprint()")),
            Some("Python")
        );
        assert_eq!(
            name(t.by_shebang(b"#!/usr/bin/env -S node --foo\n")),
            Some("JavaScript")
        );
        assert_eq!(name(t.by_shebang(b"#!/bin/bash -e\n")), Some("Shell"));
        assert_eq!(name(t.by_shebang(b"#!/usr/bin/perl -w")), Some("Perl"));
        assert_eq!(name(t.by_shebang(b"# not a shebang")), None);
        assert!(t.get(t.by_path("x.json").unwrap()).data);
    }

    #[test]
    fn conflicting_tables_are_rejected() {
        let text = r#"
            [[language]]
            name = "A"
            extensions = ["x"]
            [[language]]
            name = "B"
            extensions = [".X"]
        "#;
        let err = LanguageTable::parse(text, "test").unwrap_err().to_string();
        assert!(
            err.contains("\"x\" belongs to both \"A\" and \"B\""),
            "{err}"
        );
        let err = LanguageTable::parse("[[language]]\nname = \"A\"\nextension = []", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("extension"), "{err}");
    }
}

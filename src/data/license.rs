//! Best-effort SPDX id of a repository's licence from its LICENSE/COPYING
//! file: an explicit `SPDX-License-Identifier:` line wins, otherwise the
//! first table entry whose phrases all occur in the text (case and
//! whitespace folded). Anything else is reported as unknown (`None`).

use std::path::Path;

/// File names looked for at a repository root, in order.
const LICENSE_FILES: &[&str] = &[
    "LICENSE",
    "LICENSE.md",
    "LICENSE.txt",
    "LICENSE.rst",
    "LICENCE",
    "LICENCE.md",
    "LICENCE.txt",
    "COPYING",
    "COPYING.md",
    "COPYING.txt",
    "license",
    "license.md",
    "license.txt",
    "LICENSE-MIT",
    "LICENSE-APACHE",
];

/// (SPDX id, phrases that must all occur). The GNU family is matched by the
/// title-and-date line of each licence, since many other licence files
/// mention the GPL in passing (Python's does); more specific entries come
/// first (BSD-3 contains BSD-2's clauses).
const SIGNATURES: &[(&str, &[&str])] = &[
    ("PSF-2.0", &["python software foundation license version 2"]),
    ("AGPL-3.0", &["gnu affero general public license version 3, 19 november 2007"]),
    ("LGPL-3.0", &["gnu lesser general public license version 3, 29 june 2007"]),
    ("LGPL-2.1", &["gnu lesser general public license version 2.1, february 1999"]),
    ("LGPL-2.0", &["gnu library general public license version 2, june 1991"]),
    ("GPL-3.0", &["gnu general public license version 3, 29 june 2007"]),
    ("GPL-2.0", &["gnu general public license version 2, june 1991"]),
    ("Apache-2.0", &["apache license", "version 2.0"]),
    ("MPL-2.0", &["mozilla public license", "2.0"]),
    ("EPL-2.0", &["eclipse public license", "v 2.0"]),
    ("EPL-1.0", &["eclipse public license", "v 1.0"]),
    ("BSL-1.0", &["boost software license", "version 1.0"]),
    ("Unlicense", &["this is free and unencumbered software released into the public domain"]),
    ("CC0-1.0", &["cc0 1.0 universal"]),
    ("WTFPL", &["do what the fuck you want to public license"]),
    ("0BSD", &["permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is hereby granted", "the software is provided \"as is\" and the author disclaims all warranties"]),
    ("ISC", &["permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is hereby granted", "copyright notice and this permission notice appear in all copies"]),
    ("MIT", &["permission is hereby granted, free of charge, to any person obtaining a copy"]),
    ("BSD-3-Clause", &["redistribution and use in source and binary forms", "neither the name"]),
    ("BSD-3-Clause", &["redistribution and use in source and binary forms", "the names of its contributors may not be used"]),
    ("BSD-2-Clause", &["redistribution and use in source and binary forms"]),
    ("Zlib", &["this software is provided 'as-is', without any express or implied warranty", "altered source versions must be plainly marked"]),
];

/// The licence of the repository rooted at `root`, if a licence file there
/// names one we recognise. Unreadable files count as no licence.
pub fn detect_in_dir(root: &Path) -> Option<String> {
    LICENSE_FILES.iter().find_map(|name| {
        let path = root.join(name);
        let meta = std::fs::metadata(&path).ok()?;
        // Licence texts are small; do not read a huge file that shares the name.
        if !meta.is_file() || meta.len() > 256 * 1024 {
            return None;
        }
        let text = std::fs::read(&path).ok()?;
        detect(&String::from_utf8_lossy(&text))
    })
}

/// SPDX id of a licence text.
pub fn detect(text: &str) -> Option<String> {
    for line in text.lines().take(50) {
        if let Some(rest) = line.split("SPDX-License-Identifier:").nth(1) {
            let id = rest.trim().trim_end_matches("*/").trim();
            if !id.is_empty() {
                return Some(id.to_string());
            }
        }
    }
    let folded = fold(text);
    SIGNATURES
        .iter()
        .find(|(_, phrases)| phrases.iter().all(|p| folded.contains(&fold(p))))
        .map(|(id, _)| id.to_string())
}

/// Lower-case with every run of whitespace (and comment-box characters
/// such as `#`, `*`, `//` at line starts) made one space.
fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c| c == '#' || c == '*' || c == '/');
        if word.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_licences() {
        let mit = "MIT License\n\nCopyright (c) 2024 Someone\n\nPermission is hereby granted, free of charge, to any\nperson obtaining a copy of this software";
        assert_eq!(detect(mit).as_deref(), Some("MIT"));
        let apache = "                                 Apache License\n                           Version 2.0, January 2004";
        assert_eq!(detect(apache).as_deref(), Some("Apache-2.0"));
        let lgpl = "  GNU LESSER GENERAL PUBLIC LICENSE\n  Version 3, 29 June 2007\n ... GNU General Public License ...";
        assert_eq!(detect(lgpl).as_deref(), Some("LGPL-3.0"));
        let bsd3 = "Redistribution and use in source and binary forms, with or without\nmodification... 3. Neither the name of the copyright holder";
        assert_eq!(detect(bsd3).as_deref(), Some("BSD-3-Clause"));
        let bsd2 =
            "Redistribution and use in source and binary forms, with or without modification";
        assert_eq!(detect(bsd2).as_deref(), Some("BSD-2-Clause"));
        assert_eq!(
            detect("// SPDX-License-Identifier: MIT OR Apache-2.0\n").as_deref(),
            Some("MIT OR Apache-2.0")
        );
        assert_eq!(detect("All rights reserved."), None);
    }

    #[test]
    fn python_stdlib_licence_is_psf() {
        let text = "previously distributed under the GNU General Public License (GPL), version 2\n\nPYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n";
        assert_eq!(detect(text).as_deref(), Some("PSF-2.0"));
    }
}

//! `docs/architecture.md` says where each concept lives and which crate depends on
//! which: both must stay true as the code moves (the doc once named a file that did
//! not exist, and drew a layer picture `cargo tree` did not show).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const CRATES: [&str; 5] = [
    "migration-core",
    "migration-serde",
    "migration-kvm",
    "migration-testkit",
    "migration-cli",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn doc() -> String {
    std::fs::read_to_string(root().join("docs/architecture.md")).expect("docs/architecture.md")
}

/// `a/{b,c}.rs` → `a/b.rs`, `a/c.rs`.
fn expand(pattern: &str) -> Vec<String> {
    match (pattern.find('{'), pattern.find('}')) {
        (Some(open), Some(close)) if open < close => pattern[open + 1..close]
            .split(',')
            .flat_map(|alt| {
                expand(&format!(
                    "{}{alt}{}",
                    &pattern[..open],
                    &pattern[close + 1..]
                ))
            })
            .collect(),
        _ => vec![pattern.to_owned()],
    }
}

/// Whether `path` exists; a `*` in the last component matches any file name with the
/// given suffix (`migration-testkit/guests/*.S`).
fn exists(path: &str) -> bool {
    let full = root().join(path);
    match full.file_name().and_then(|n| n.to_str()) {
        Some(name) if name.contains('*') => {
            let (prefix, suffix) = name.split_once('*').unwrap_or((name, ""));
            std::fs::read_dir(full.parent().expect("parent"))
                .map(|entries| {
                    entries.flatten().any(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with(prefix) && n.ends_with(suffix)
                    })
                })
                .unwrap_or(false)
        }
        _ => full.exists(),
    }
}

#[test]
fn every_file_the_architecture_doc_names_exists() {
    let doc = doc();
    let mut named = 0;
    let mut missing = Vec::new();
    // Paths are in backticks and start with a crate directory.
    for span in doc.split('`').skip(1).step_by(2) {
        if !CRATES.iter().any(|c| span.starts_with(&format!("{c}/"))) {
            continue;
        }
        for path in expand(span) {
            named += 1;
            if !exists(&path) {
                missing.push(path);
            }
        }
    }
    assert!(
        named > 30,
        "only {named} paths found: did the doc's format change?"
    );
    assert!(
        missing.is_empty(),
        "named in docs/architecture.md but missing: {missing:?}"
    );
}

/// The workspace crates in `crate`'s `[dependencies]` (not dev-dependencies).
fn workspace_dependencies(krate: &str) -> BTreeSet<String> {
    let toml = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).expect("Cargo.toml");
    let mut in_deps = false;
    let mut deps = BTreeSet::new();
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
        } else if in_deps {
            // `name.workspace = true` or `name = { workspace = true, … }`.
            let key = line
                .split(|c: char| c == '.' || c == '=' || c.is_whitespace())
                .next()
                .unwrap_or("");
            if let Some(name) = CRATES.iter().find(|c| **c == key) {
                deps.insert((*name).to_owned());
            }
        }
    }
    deps
}

/// The workspace crates in `text`, named in full (`migration-kvm`).
fn named_crates(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
        .filter(|w| CRATES.contains(w))
        .map(str::to_owned)
        .collect()
}

/// The workspace crates the doc's table says `krate` depends on (the cell after the
/// crate's name).
fn table_dependencies(doc: &str, krate: &str) -> BTreeSet<String> {
    let row = doc
        .lines()
        .find(|l| l.starts_with(&format!("| `{krate}` |")))
        .unwrap_or_else(|| panic!("no table row for {krate}"));
    named_crates(row.split('|').nth(2).expect("depends-on cell"))
}

/// The workspace crates the doc's picture draws `krate` pointing to
/// (`migration-kvm ──▶ serde, core`: short names).
fn picture_dependencies(doc: &str, krate: &str) -> BTreeSet<String> {
    let line = doc
        .lines()
        .find(|l| l.starts_with(krate) && l.contains('▶'))
        .unwrap_or_else(|| panic!("no arrow from {krate} in the picture"));
    let targets = line.split('▶').nth(1).expect("arrow");
    targets
        .split(|c: char| !c.is_ascii_alphanumeric())
        .map(|w| format!("migration-{w}"))
        .filter(|c| CRATES.contains(&c.as_str()))
        .collect()
}

#[test]
fn the_architecture_docs_layers_are_the_manifests() {
    let doc = doc();
    for krate in CRATES {
        let manifest = workspace_dependencies(krate);
        assert_eq!(
            table_dependencies(&doc, krate),
            manifest,
            "docs/architecture.md's table row for {krate} vs its Cargo.toml [dependencies]"
        );
        assert_eq!(
            picture_dependencies(&doc, krate),
            manifest,
            "docs/architecture.md's picture for {krate} vs its Cargo.toml [dependencies]"
        );
    }
}

//! The crate's layers, kept by a test rather than by prose.
//!
//! llm-pool is one crate whose modules form layers: the HTTP host over the pool, the pool over
//! the request's preparation, that over the engine, the engine over the text layer, the text
//! layer over the models, the models over our kernels (docs/ARCHITECTURE.md). A lower layer
//! never names a higher one. This test reads every source file's `crate::` paths (code, not
//! comments) and fails on any reference that a module's row of [`BELOW`] does not allow.
//!
//! Why a test and not a workspace of crates: the layers share one error type and one set of
//! public re-exports, which crates would split into a dozen manifests, and a workspace would
//! rebuild differently in CI's cold builds. The test gives the same guarantee (CI fails on a
//! new upward import) and says which line broke it. A new top-level module fails too until
//! it is given a row.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module and the layers right below it; a module may name those and, through
/// them, everything below them. The stack, top to bottom: server, pool, request, engine, text,
/// models, kernels; beside it, configuration (for the request and the layers above) and
/// metrics (for the pool and above); under all, the foundations.
const BELOW: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("resources", &[]),
    ("device", &["error"]),
    ("config", &["device", "resources"]),
    ("metrics", &["config"]),
    ("kernels", &["error"]),
    ("models", &["kernels", "device", "resources"]),
    ("text", &["models"]),
    ("engine", &["text"]),
    ("request", &["engine", "config"]),
    ("pool", &["request", "metrics"]),
    ("server", &["pool"]),
];

/// Every module `module` may name: the layers below it, and theirs, down to the foundations.
/// `None` for a module without a row.
fn allowed(module: &str) -> Option<BTreeSet<&'static str>> {
    let below = |m: &str| BELOW.iter().find(|(name, _)| *name == m).map(|(_, b)| *b);
    let mut found = BTreeSet::new();
    let mut todo: Vec<&'static str> = below(module)?.to_vec();
    while let Some(m) = todo.pop() {
        if found.insert(m) {
            todo.extend(below(m).unwrap_or(&[]));
        }
    }
    Some(found)
}

/// The crate root's re-exports (`pub use error::{Error, Result};` in lib.rs): `crate::Error`
/// names the `error` module.
fn root_items(lib: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    for line in lib.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end_matches(';');
        let Some((module, names)) = path.split_once("::") else {
            continue;
        };
        for name in names.trim_matches(|c| c == '{' || c == '}').split(',') {
            let name = name.split(" as ").last().unwrap_or(name).trim();
            if !name.is_empty() {
                items.push((name.to_string(), module.to_string()));
            }
        }
    }
    items
}

fn lib_source() -> String {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    std::fs::read_to_string(lib).expect("reading src/lib.rs")
}

/// One reference a module's row does not allow.
#[derive(Debug, PartialEq)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// The code of a line: without its comment (`//`, `///`, `//!`) and without the contents of
/// its string literals.
fn code_of(line: &str) -> String {
    let mut code = String::with_capacity(line.len());
    let mut in_string = false;
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                // An escape: skip the backslash and the character it escapes.
                let mut escaped = rest.chars();
                escaped.next();
                escaped.next();
                rest = escaped.as_str();
                continue;
            }
            if c == '"' {
                in_string = false;
                code.push('"');
            }
        } else if rest.starts_with("'\"'") || rest.starts_with("'\\\"'") {
            // The character literals '"' and '\"' open no string.
            let end = rest[1..].find('\'').map_or(rest.len(), |i| i + 2);
            rest = &rest[end..];
            continue;
        } else if rest.starts_with("//") {
            break;
        } else {
            in_string = c == '"';
            code.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    code
}

/// The top-level modules a piece of code names through `crate::`: `crate::pool::Pool`,
/// `$crate::models::X`, and each item of `crate::{engine::X, text::Y}`.
fn named_modules(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        // `pub(crate)` has no `::`; an identifier such as `my_crate::` is not ours.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Items of a group at depth 0, each up to its first `::`.
            let mut depth = 0;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                    _ => item.push(c),
                }
            }
            items.push(item);
            for item in items {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

/// The references in one file of module `from` that its row does not allow. A block comment
/// (`/* */`) is rare enough in this crate to be read as code.
fn check_source(
    file: &str,
    from: &str,
    source: &str,
    root: &[(String, String)],
) -> Result<Vec<Violation>, String> {
    let allowed = allowed(from).ok_or_else(|| {
        format!("{file}: module `{from}` has no row in tests/layers.rs BELOW; give it one")
    })?;
    let mut violations = Vec::new();
    for (i, line) in source.lines().enumerate() {
        for name in named_modules(&code_of(line)) {
            let to = root
                .iter()
                .find(|(item, _)| *item == name)
                .map_or(name, |(_, module)| module.clone());
            if to != from && !allowed.contains(to.as_str()) {
                violations.push(Violation {
                    file: file.to_string(),
                    line: i + 1,
                    from: from.to_string(),
                    to,
                });
            }
        }
    }
    Ok(violations)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("reading src/").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_names_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let root = root_items(&lib_source());
    let mut violations = Vec::new();
    let mut modules = BTreeSet::new();
    for path in &files {
        let relative = path.strip_prefix(&src).expect("under src/");
        let first = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name");
        // lib.rs is the crate's face (it names every module); main.rs is the binary, which
        // reaches the library through `llm_pool::`, not `crate::`.
        if matches!(first, "lib.rs" | "main.rs") {
            continue;
        }
        let module = first.trim_end_matches(".rs");
        modules.insert(module.to_string());
        let source = std::fs::read_to_string(path).expect("reading a source file");
        let file = format!("src/{}", relative.display());
        violations
            .extend(check_source(&file, module, &source, &root).unwrap_or_else(|e| panic!("{e}")));
    }
    // Every row names a module that exists, so a renamed module cannot leave a stale row.
    for (name, _) in BELOW {
        assert!(modules.contains(*name), "BELOW names `{name}`, not in src/");
    }
    let report: Vec<String> = violations
        .iter()
        .map(|v| {
            format!(
                "{}:{}: `{}` names `{}`, a layer it may not use",
                v.file, v.line, v.from, v.to
            )
        })
        .collect();
    assert!(
        report.is_empty(),
        "upward or sideways imports (move the item to the layer that owns it):\n{}",
        report.join("\n")
    );
}

#[test]
fn an_upward_import_fails_the_check() {
    // A model file reaching up into the pool, in each form a path can take.
    let source = "use crate::error::Result;\n\
                  use crate::pool::Pool;\n\
                  use crate::{kernels::QuantizedWeight, engine::GenerateParams};\n\
                  fn f() { let _ = crate::server::serve; }\n\
                  macro_rules! m { () => { $crate::request::Limits } }\n";
    let found = check_source(
        "src/models/x.rs",
        "models",
        source,
        &root_items(&lib_source()),
    )
    .unwrap();
    let names: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.to.as_str())).collect();
    assert_eq!(
        names,
        [(2, "pool"), (3, "engine"), (4, "server"), (5, "request")]
    );
}

#[test]
fn comments_strings_and_lookalikes_are_not_imports() {
    let source = "//! See [`crate::pool::Pool`].\n\
                  /// Uses [`crate::server`] docs.\n\
                  pub(crate) fn f() -> &'static str { \"crate::pool\" } // crate::engine\n\
                  let q = '\"'; // crate::engine\n\
                  use other_crate::pool;\n\
                  use crate::{self as me, kernels};\n\
                  fn g() -> crate::Result<()> { Ok(()) }\n";
    let root = root_items(&lib_source());
    assert_eq!(
        check_source("src/models/x.rs", "models", source, &root),
        Ok(vec![])
    );
}

#[test]
fn a_module_without_a_row_is_an_error() {
    let e = check_source("src/gateway.rs", "gateway", "use crate::pool::Pool;\n", &[]).unwrap_err();
    assert!(e.contains("no row"), "{e}");
}

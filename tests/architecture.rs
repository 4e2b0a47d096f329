//! The library's structure, checked: the `crate::` paths in `src/` (code and unit tests, not
//! comments) between its modules (a file or a folder right under `src/`) must follow the layering
//! ARCHITECTURE.md draws, and form no circle.
//!
//! - **core** (the vocabulary: backend, live state, outcome, errors, provider shapes, body, the
//!   attempt context) imports only core;
//! - a **layer** imports only core: never a sibling layer;
//! - a **composition** (`stack`) imports core and layers;
//! - the **fuzz** entry points may import anything.
//!
//! A new module must be placed in one of the tiers below, so the structure stays a decision.
//! Run alone: `cargo test --test architecture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each module of `src/`, bottom to top, with its tier. Within core, a module may import only
/// modules listed above it here: the order is the core's own layering.
const MODULES: &[(&str, Tier)] = &[
    ("rng", Tier::Core),
    ("outcome", Tier::Core),
    ("error", Tier::Core),
    ("ready", Tier::Core),
    ("client", Tier::Core),
    ("provider", Tier::Core),
    ("classify", Tier::Core),
    ("state", Tier::Core),
    ("credential", Tier::Core),
    ("backend", Tier::Core),
    ("waitlist", Tier::Core),
    ("attempt", Tier::Core),
    ("body", Tier::Core),
    ("boxed", Tier::Core),
    ("auth", Tier::Layer),
    ("balance", Tier::Layer),
    ("circuit_breaker", Tier::Layer),
    ("endpoint", Tier::Layer),
    ("fallback", Tier::Layer),
    ("retry", Tier::Layer),
    ("shared", Tier::Layer),
    ("timeout", Tier::Layer),
    ("translate", Tier::Layer),
    ("stack", Tier::Composition),
    ("fuzz", Tier::Hook),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Core,
    Layer,
    Composition,
    Hook,
}

/// `path` with comments removed (line comments, doc comments, block comments); string
/// literals are kept, which is harmless here (no `crate::` inside one names a module).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let (mut i, mut in_str) = (0, false);
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            out.push(c as char);
            if c == b'\\' && i + 1 < bytes.len() {
                out.push(bytes[i + 1] as char);
                i += 2;
                continue;
            }
            in_str = c != b'"';
            i += 1;
        } else if text[i..].starts_with("'\"'") {
            // The quote character (`b'"'`) opens no string.
            out.push_str("'\"'");
            i += 3;
        } else if c == b'"' {
            in_str = true;
            out.push('"');
            i += 1;
        } else if text[i..].starts_with("//") {
            i += text[i..].find('\n').unwrap_or(text.len() - i);
        } else if text[i..].starts_with("/*") {
            i += text[i..].find("*/").map_or(text.len() - i, |e| e + 2);
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

/// The top-level modules named by `crate::` paths in `code`, grouped imports included
/// (`use crate::{a::X, b::{Y, Z}}`); a name the crate root re-exports (`crate::Backend`) counts
/// as its module, by `roots`.
fn imports_of(code: &str, roots: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // The first path segment of each item at the top level of the braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.extend(first_segment(&group[start..i], roots));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.extend(first_segment(&group[start..i], roots));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.extend(first_segment(after, roots));
        }
        rest = after;
    }
    found
}

fn first_segment(path: &str, roots: &BTreeMap<String, String>) -> Option<String> {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if let Some(module) = roots.get(&name) {
        return Some(module.clone());
    }
    (!name.is_empty() && name.starts_with(|c: char| c.is_ascii_lowercase()) && name != "self")
        .then_some(name)
}

/// The names `src/lib.rs` re-exports (`pub use backend::Backend;`), each with its module.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end_matches(';');
        if let (Some((module, _)), Some((_, name))) =
            (path.split_once("::"), path.rsplit_once("::"))
        {
            out.insert(name.to_string(), module.to_string());
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file of `src/` belongs to (`src/balance/strategy.rs` → `balance`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_string())
}

/// Every module's imports of other modules, with the files that make each edge.
fn edges() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let roots = root_reexports(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        let shown = file.strip_prefix(root).unwrap().display().to_string();
        let entry = edges.entry(module.clone()).or_default();
        for target in imports_of(&code, &roots) {
            if target != module {
                entry.entry(target).or_default().insert(shown.clone());
            }
        }
    }
    edges
}

/// What is wrong with the structure, one line each; empty when it is as drawn.
fn violations(edges: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Vec<String> {
    let place: BTreeMap<&str, (usize, Tier)> = MODULES
        .iter()
        .enumerate()
        .map(|(i, (name, tier))| (*name, (i, *tier)))
        .collect();
    let mut wrong = Vec::new();
    for module in edges.keys() {
        if !place.contains_key(module.as_str()) {
            wrong.push(format!(
                "module `{module}` is in no tier: place it in MODULES in tests/architecture.rs (and in ARCHITECTURE.md)"
            ));
        }
    }
    for (name, _) in MODULES {
        if !edges.contains_key(*name) {
            wrong.push(format!(
                "`{name}` is in MODULES (tests/architecture.rs) but not in src/: remove it there and in ARCHITECTURE.md"
            ));
        }
    }
    for (from, targets) in edges {
        let Some(&(from_at, from_tier)) = place.get(from.as_str()) else {
            continue;
        };
        for (to, files) in targets {
            let Some(&(to_at, to_tier)) = place.get(to.as_str()) else {
                wrong.push(format!(
                    "`{from}` imports `{to}`, which is not a module of src/"
                ));
                continue;
            };
            let why = match (from_tier, to_tier) {
                (Tier::Core, Tier::Core) if to_at > from_at => {
                    Some("a core module imports one above it in the core's order")
                }
                (Tier::Core, t) if t != Tier::Core => Some("core imports a layer or above"),
                (Tier::Layer, Tier::Layer) => Some("a layer imports a sibling layer"),
                (Tier::Layer, t) if t > Tier::Layer => Some("a layer imports a composition"),
                (Tier::Composition, Tier::Hook) => Some("a composition imports the fuzz hooks"),
                _ => None,
            };
            if let Some(why) = why {
                let files: Vec<&str> = files.iter().map(String::as_str).collect();
                wrong.push(format!("{why}: `{from}` -> `{to}` ({})", files.join(", ")));
            }
        }
    }
    wrong.extend(circles(edges));
    wrong
}

/// Every circle of imports (strongly connected components of more than one module).
fn circles(edges: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Vec<String> {
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in edges.get(&m).into_iter().flat_map(|t| t.keys()) {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let mut out = BTreeSet::new();
    for module in edges.keys() {
        let mut circle: Vec<&String> = reaches(module)
            .iter()
            .filter_map(|other| {
                (other != module && reaches(other).contains(module))
                    .then(|| edges.get_key_value(other).map(|(k, _)| k))
                    .flatten()
            })
            .collect();
        if !circle.is_empty() {
            circle.push(module);
            circle.sort();
            let names: Vec<&str> = circle.iter().map(|s| s.as_str()).collect();
            out.insert(format!("import circle: {}", names.join(", ")));
        }
    }
    out.into_iter().collect()
}

#[test]
fn the_library_s_modules_import_only_downwards_and_form_no_circle() {
    let wrong = violations(&edges());
    assert!(
        wrong.is_empty(),
        "the library's structure broke its rules (ARCHITECTURE.md):\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_check_catches_an_upward_import_a_sibling_layer_and_a_circle() {
    let mut edges = edges();
    let mut add = |from: &str, to: &str| {
        edges
            .entry(from.into())
            .or_default()
            .entry(to.into())
            .or_default()
            .insert("(added by this test)".into());
    };
    add("state", "balance");
    add("retry", "endpoint");
    add("rng", "error");
    let wrong = violations(&edges).join("\n");
    assert!(
        wrong.contains("core imports a layer or above: `state` -> `balance`"),
        "{wrong}"
    );
    assert!(
        wrong.contains("a layer imports a sibling layer: `retry` -> `endpoint`"),
        "{wrong}"
    );
    assert!(
        wrong.contains("a core module imports one above it"),
        "{wrong}"
    );
    assert!(wrong.contains("import circle"), "{wrong}");
}

#[test]
fn grouped_and_inline_crate_paths_are_read_and_comments_are_not() {
    let code = code_of(
        "use crate::{a::X, b::{Y, Z}, Backend};\n// crate::c::W\n/// [x](crate::d)\nfn f() { crate::e::f(); }",
    );
    let roots = root_reexports("pub use backend::Backend;\npub use error::BoxError;");
    let found: Vec<String> = imports_of(&code, &roots).into_iter().collect();
    assert_eq!(found, ["a", "b", "backend", "e"]);
}

//! The product crate's shape, held: no import circle among its modules.
//! A module is a top-level file or directory of `shared/src`; an import is
//! any `crate::<module>` path in its code (tests beside the code aside). A
//! circle means neither side can be read, changed or tested without the
//! other, as `ports` importing the reconciler's message type once tied
//! eight files together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::moto::workspace_root;

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("dir") {
            rust_files(&entry.expect("entry").path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "tests.rs") {
        out.push(path.to_path_buf());
    }
}

/// The code of a file without its `#[cfg(test)] mod tests` block.
fn product_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source");
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Every module named after `crate::`, in paths and in `use crate::{a, b::c}` groups.
fn imported(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            names.insert(ident(item.trim()));
        } else {
            names.insert(ident(rest));
        }
    }
    names
}

/// Modules of `shared/src` and the others each imports.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = workspace_root().join("shared/src");
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("shared/src") {
        let path = entry.expect("entry").path();
        let name = path.file_stem().expect("name").to_string_lossy().into_owned();
        if name == "lib" {
            continue;
        }
        rust_files(&path, files.entry(name).or_default());
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, paths)| {
            let uses = paths
                .iter()
                .flat_map(|p| imported(&product_code(p)))
                .filter(|m| modules.contains(m) && m != module)
                .collect();
            (module.clone(), uses)
        })
        .collect()
}

/// A circle through `from`, if one exists: the path back to it.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![(from.to_string(), vec![from.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((module, path)) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next == from {
                let mut found = path.clone();
                found.push(from.to_string());
                return Some(found);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_import_circle_among_the_product_modules() {
    let graph = module_graph();
    assert!(graph.len() > 15 && graph["reconcile"].contains("ports"), "the graph was read: {graph:?}");
    let circles: Vec<String> = graph.keys().filter_map(|m| circle(&graph, m)).map(|c| c.join(" -> ")).collect();
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn the_circle_check_sees_a_circle() {
    let mut graph = module_graph();
    graph.get_mut("ports").expect("ports").insert("reconcile".into());
    assert!(circle(&graph, "ports").is_some_and(|c| c.contains(&"reconcile".to_string())));
    assert_eq!(
        imported("use crate::{a::B, c, d::{e, f}};\nlet x = crate::g::h();"),
        ["a", "c", "d", "g"].map(String::from).into()
    );
}

/// Every source file of the product and of the test kit has its line in
/// the architecture page's file map, so the map cannot silently fall behind.
#[test]
fn every_source_file_is_in_the_file_map() {
    let root = workspace_root();
    let map = std::fs::read_to_string(root.join("docs/architecture.md")).expect("docs/architecture.md");
    let mut missing = Vec::new();
    for crate_src in ["shared/src", "testkit/src"] {
        let src = root.join(crate_src);
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let relative = file.strip_prefix(&src).expect("inside").to_string_lossy().into_owned();
            let name = file.file_name().expect("name").to_string_lossy().into_owned();
            if !map.contains(&format!("`{relative}`")) && !map.contains(&format!("`{name}`")) {
                missing.push(format!("{crate_src}/{relative}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in docs/architecture.md's file map: {missing:?}");
}

/// No product function silences clippy's argument count: a function that
/// needs many arguments takes a struct that names them.
#[test]
fn no_product_function_silences_the_argument_count() {
    let mut files = Vec::new();
    rust_files(&workspace_root().join("shared/src"), &mut files);
    let silenced: Vec<String> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).expect("source").contains("allow(clippy::too_many_arguments)"))
        .map(|f| f.display().to_string())
        .collect();
    assert!(silenced.is_empty(), "{silenced:?}");
}

/// Cloud and job states are enums (`states.rs`, `JobState`): outside the
/// adapters that parse AWS's replies, no state is compared as a string.
#[test]
fn no_state_is_compared_as_a_string_outside_the_adapters() {
    let src = workspace_root().join("shared/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let patterns = [
        ".state == \"",
        ".state != \"",
        ".status == \"",
        ".status != \"",
        "state.as_str()",
        "status.as_str()",
        "status.as_deref()",
        "state.as_deref()",
    ];
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(src.join("aws")) && !f.ends_with("states.rs")) {
        for (number, line) in product_code(file).lines().enumerate() {
            if patterns.iter().any(|p| line.contains(p)) {
                found.push(format!("{}:{}: {}", file.display(), number + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "states compared as strings:\n{}", found.join("\n"));
}

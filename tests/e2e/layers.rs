//! The library's folders are its layers (see `src/lib.rs`): dependencies between top-level
//! modules point one way. This test fails on any cycle among them, naming it. Test code (a
//! `#[cfg(test)]` module, a `*_tests.rs` file) may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its non-test code names as `crate::…`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let tops: BTreeSet<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "main.rs" && n != "lib.rs" && n != "cli")
        .map(|n| n.trim_end_matches(".rs").to_owned())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for top in &tops {
        let mut files = Vec::new();
        collect(&src.join(top), &mut files);
        collect(&src.join(format!("{top}.rs")), &mut files);
        let names = graph.entry(top.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let code = without_test_modules(&text);
            // In a top-level module's root file, `super::` is the crate.
            let root =
                file == src.join(format!("{top}.rs")) || file == src.join(top).join("mod.rs");
            let prefixes: &[&str] = if root {
                &["crate::", "super::"]
            } else {
                &["crate::"]
            };
            for prefix in prefixes {
                for (i, _) in code.match_indices(prefix) {
                    for name in named(&code[i + prefix.len()..]) {
                        if tops.contains(&name) && name != *top {
                            names.insert(name);
                        }
                    }
                }
            }
        }
    }
    graph
}

/// The text before the file's test module (`#[cfg(test)]` on a `mod`, perhaps after a
/// `#[path]`); a `#[cfg(test)]` on a single item is kept, so it can only add edges.
fn without_test_modules(text: &str) -> &str {
    for (i, _) in text.match_indices("#[cfg(test)]") {
        let mut rest = text[i + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("#[path") {
            rest = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        }
        if rest.starts_with("mod ") {
            return &text[..i];
        }
    }
    text
}

/// The first path segments after `crate::`: one name, or each name of a `{a, b::c}` group.
fn named(rest: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)];
    };
    // Top-level items of the group: split on commas outside nested braces.
    let (mut depth, mut start, mut out) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.push(ident(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(ident(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

fn collect(path: &Path, files: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            collect(&entry.unwrap().path(), files);
        }
    } else if path.is_file()
        && path.extension().is_some_and(|e| e == "rs")
        && !path.to_string_lossy().ends_with("_tests.rs")
    {
        files.push(path.to_owned());
    }
}

/// A cycle through `from`, if there is one: the path back to it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![(from.to_owned(), vec![from.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == from {
                let mut path = path.clone();
                path.push(next.clone());
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut path = path.clone();
                path.push(next.clone());
                stack.push((next.clone(), path));
            }
        }
    }
    None
}

#[test]
fn no_top_level_module_imports_one_that_imports_it_back() {
    let graph = imports(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.len() > 5, "no modules found: {graph:?}");
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle(&graph, m))
        .map(|c| c.join(" → "))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn grouped_imports_are_read() {
    assert_eq!(named("clock::utc;"), ["clock"]);
    assert_eq!(
        named("{clock, config::{Config, Renew}, daemon};"),
        ["clock", "config", "daemon"]
    );
}

/// The checker sees a cycle where there is one.
#[test]
fn a_cycle_is_found() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        cycle(&graph, "a").map(|c| c.join(" ")),
        Some("a b c a".to_owned())
    );
    assert_eq!(cycle(&graph, "d"), None);
}

//! The workspace keeps its shape: layered crates, each standing on its own.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Layer of each crate: a crate may depend only on crates of a lower layer.
const LAYERS: &[(&str, u32)] = &[
    ("nofuss-tensor", 0),
    ("nofuss-backbone", 1),
    ("nofuss-losses", 1),
    ("nofuss-data", 1),
    ("nofuss-eval", 1),
    ("nofuss", 2),
];

fn manifest(dir: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap()
}

#[test]
fn no_crate_depends_on_a_crate_above_or_beside_it() {
    for &(name, layer) in LAYERS {
        let m = manifest(&root().join("crates").join(name));
        assert_eq!(m["package"]["name"].as_str(), Some(name));
        for section in ["dependencies", "dev-dependencies"] {
            let Some(deps) = m.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for dep in deps.keys() {
                if let Some(&(_, dep_layer)) = LAYERS.iter().find(|(n, _)| n == dep) {
                    assert!(
                        dep_layer < layer,
                        "{name} (layer {layer}) depends on {dep} (layer {dep_layer}) in [{section}]"
                    );
                }
            }
        }
    }
}

#[test]
fn every_workspace_crate_is_in_the_layer_map() {
    let mut found: Vec<String> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    found.sort();
    let mut listed: Vec<String> = LAYERS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed, "update LAYERS and docs/ARCHITECTURE.md");
}

#[test]
fn every_library_crate_has_docs_examples_and_tests() {
    let arch = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md exists");
    for &(name, _) in LAYERS {
        let dir = root().join("crates").join(name);
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(
            lib.starts_with("//!"),
            "{name}: src/lib.rs must open with a crate doc comment"
        );
        assert!(
            lib.contains("```"),
            "{name}: the crate doc should show an example"
        );
        let has_unit_tests = walk(&dir.join("src"))
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|s| s.contains("#[cfg(test)]")));
        assert!(
            has_unit_tests || dir.join("tests").is_dir(),
            "{name}: no tests"
        );
        if name != "nofuss" {
            let examples = walk(&dir.join("examples"));
            assert!(!examples.is_empty(), "{name}: no examples/");
            // What crates.io shows: a README whose example compiles (a doctest of lib.rs).
            let readme = std::fs::read_to_string(dir.join("README.md"))
                .unwrap_or_else(|_| panic!("{name}: no README.md"));
            assert!(
                readme.starts_with(&format!("# {name}\n")) && readme.contains("```rust"),
                "{name}: README.md should open with the crate's name and show a Rust example"
            );
            assert!(
                lib.contains("#[cfg(doctest)]") && lib.contains("include_str!(\"../README.md\")"),
                "{name}: src/lib.rs should compile the README's example as a doctest"
            );
        }
        let m = manifest(&dir);
        assert!(
            m["package"].get("description").is_some(),
            "{name}: no description"
        );
        assert!(
            arch.contains(name),
            "docs/ARCHITECTURE.md does not mention {name}"
        );
    }
}

#[test]
fn the_readme_quick_start_is_two_commands() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("cargo run --release -p nofuss -- train"));
    assert!(readme.contains("cargo test --workspace"));
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.contains("cargo test --workspace"),
        ".ci/run must run the README's test command"
    );
}

#[test]
fn embedded_fonts_carry_their_licences() {
    let fonts = root().join("data/fonts");
    let names: Vec<String> = std::fs::read_dir(&fonts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for f in names.iter().filter(|n| n.ends_with(".ttf")) {
        let family = if f.starts_with("DejaVu") {
            "DejaVu"
        } else {
            "Liberation"
        };
        assert!(
            names.contains(&format!("LICENSE-{family}.txt")),
            "{f} has no licence file"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

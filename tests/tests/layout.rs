//! `docs/LAYOUT.md` is the source tree as it is: every Rust file of the workspace
//! (and of `fuzz/`), with the first line of its module documentation. This test
//! regenerates it and fails when the committed file differs; run it with
//! `VIO_BLESS=1` to write the new one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Directories whose `.rs` files are listed, relative to the repository root.
const ROOTS: [&str; 13] = [
    "virtio-core/src",
    "hypervisor/src",
    "transport-shared-page/src",
    "transport-descriptors/src",
    "transport-grant/src",
    "backend-host/src",
    "drivers-blk/src",
    "drivers-net/src",
    "transport-vhost-user/src",
    "isolation/src",
    "tests/src",
    "fuzz/src",
    "fuzz/fuzz_targets",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the package lives in the repository")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first line of a file's `//!` documentation, or what stands in for it.
fn summary(text: &str) -> String {
    text.lines()
        .map(str::trim_start)
        .find(|l| l.starts_with("//!") && l.len() > 3)
        .map(|l| l.trim_start_matches("//!").trim().to_string())
        .unwrap_or_else(|| "(no module documentation)".into())
}

fn render() -> String {
    let root = repo();
    let mut out = String::from(
        "# Source layout\n\n\
         Every Rust file, with the first line of its module documentation. Generated from\n\
         the tree by `tests/tests/layout.rs`, which fails when this file is out of date;\n\
         `VIO_BLESS=1 cargo test -p vio --test layout` rewrites it. Where each kind of\n\
         thing belongs, and why, is in [`ARCHITECTURE.md`](ARCHITECTURE.md).\n",
    );
    for dir in ROOTS {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        let _ = write!(out, "\n## `{dir}/`\n\n| file | what it holds |\n|---|---|\n");
        for f in files {
            let rel = f.strip_prefix(root.join(dir)).expect("under its root");
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let _ = writeln!(
                out,
                "| `{}` | {} |",
                rel.display(),
                summary(&text).replace('|', "\\|")
            );
        }
    }
    out
}

#[test]
fn docs_layout_is_the_tree_as_it_is() {
    let path = repo().join("docs/LAYOUT.md");
    let want = render();
    if std::env::var_os("VIO_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write docs/LAYOUT.md");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/LAYOUT.md is out of date: run `VIO_BLESS=1 cargo test -p vio --test layout`"
    );
}

#[test]
fn summaries_take_the_first_doc_line() {
    assert_eq!(summary("// x\n//! First.\n//! Second.\n"), "First.");
    assert_eq!(summary("//!\n//! After a blank.\n"), "After a blank.");
    assert_eq!(summary("fn main() {}\n"), "(no module documentation)");
}

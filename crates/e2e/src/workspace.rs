//! Paths inside the workspace: its root, its target directory, the log directory.

use std::path::PathBuf;

/// The workspace root (two levels above this crate's manifest).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(|crates| crates.parent())
        .map(PathBuf::from)
        .unwrap_or(manifest)
}

/// The Cargo target directory: `$CARGO_TARGET_DIR` when set (relative paths are taken from
/// the workspace root), else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        }
        _ => root().join("target"),
    }
}

/// Where serial logs and other per-test files go: `<target>/e2e-logs`.
pub fn log_dir() -> PathBuf {
    target_dir().join("e2e-logs")
}

/// The `cargo` program to run for builds: the one running this test when known.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .filter(|c| !c.is_empty())
        .map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

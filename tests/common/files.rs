//! Files the tests write (daemon config files) and read (the shipped operator
//! files of this repository).

use std::path::{Path, PathBuf};

/// A config file with `text` in a fresh temp dir (kept alive by the returned guard).
pub fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tunneld.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.display().to_string();
    (dir, path)
}

/// `relative` inside this repository (`dist/...`, `grafana/...`), wherever the
/// tests run from.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The text of the repository file `relative`; panics naming it when unreadable.
pub fn read_repo_file(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

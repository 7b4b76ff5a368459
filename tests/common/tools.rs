//! Finding the outside tools some tests drive (chromium, promtool, systemd-analyze).
//!
//! A developer machine may lack them, so a test that needs one skips — loudly, on
//! stderr — when it is missing. CI sets `CI_REQUIRE_TOOLS=1`, which turns a
//! missing tool into a failure so CI never skips silently.

use std::path::PathBuf;

/// Returns the path of `name` (searched on `PATH`, then the usual bin dirs), or `None`
/// after printing a SKIPPED banner. Panics instead when `CI_REQUIRE_TOOLS=1`.
pub fn external_tool(name: &str, test: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let found = path_dirs
        .iter()
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].iter().map(PathBuf::from).collect::<Vec<_>>().iter())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    if found.is_some() {
        return found;
    }
    if std::env::var("CI_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: required tool `{name}` not found and CI_REQUIRE_TOOLS=1");
    }
    eprintln!("\n*** SKIPPED {test}: `{name}` is not installed (CI installs it; set CI_REQUIRE_TOOLS=1 to make this fatal) ***\n");
    None
}

//! Finding the outside tools some tests drive (chromium, promtool, systemd-analyze).
//!
//! A developer machine may lack them, so a test that needs one skips — loudly, on
//! stderr — when it is missing. CI sets `CI_REQUIRE_TOOLS=1`, which turns a
//! missing tool into a failure so CI never skips silently.

use std::path::PathBuf;

/// Returns the path of `name` (searched on `PATH`, then the usual bin dirs), or `None`
/// after printing a SKIPPED banner. Panics instead when `CI_REQUIRE_TOOLS=1`.
pub fn external_tool(name: &str, test: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        skip_or_fail(test, &format!("`{name}`"));
    }
    found
}

/// The path of `name` on `PATH` or in the usual bin dirs, quietly.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    path_dirs
        .iter()
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].iter().map(PathBuf::from).collect::<Vec<_>>().iter())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Prints a SKIPPED banner for `test`, which lacks `missing` — or panics when
/// `CI_REQUIRE_TOOLS=1`, so CI never skips.
pub fn skip_or_fail(test: &str, missing: &str) {
    if std::env::var("CI_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: requires {missing}, which is not available here, and CI_REQUIRE_TOOLS=1");
    }
    eprintln!("\n*** SKIPPED {test}: requires {missing} (CI provides it; set CI_REQUIRE_TOOLS=1 to make this fatal) ***\n");
}

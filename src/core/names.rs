//! Names that travel between the roles, the API, metric labels and the log.

/// The client whose secret is `server.secret`: the one a single-client setup has.
pub(crate) const DEFAULT_CLIENT: &str = "default";

/// Why a client name is not acceptable, or `None`: 1–64 characters of
/// `[a-z0-9_-]` beginning with a letter or digit, so a name is safe in a label,
/// a log line, a URL and a file name — and on a command line, where `-x` or
/// `--force` would read as an option.
pub(crate) fn invalid_client_name(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 64 {
        return Some(format!("a client name has 1 to 64 characters; {:?} has {}", name, name.chars().count()));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
        return Some(format!("client name {name:?} may only contain a-z, 0-9, '_' and '-'"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Some(format!("client name {name:?} must begin with a letter or digit"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_names_are_short_lowercase_words() {
        for good in ["default", "office", "home-lab_2", "a", "9lives", "a-", &"x".repeat(64)] {
            assert_eq!(invalid_client_name(good), None, "{good}");
        }
        for bad in ["", "Office", "home lab", "ü", "a/b", "a.b", &"x".repeat(65), "-", "--force", "_x", "-v"] {
            assert!(invalid_client_name(bad).is_some(), "{bad}");
        }
    }
}

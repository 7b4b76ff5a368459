//! Secrets — the tunnel secrets and the API token — as a type that cannot be
//! logged or printed by accident: its `Debug` is masked, and the value comes out
//! only through [`Secret::expose`], where a reader sees it being used.

use serde::{Deserialize, Serialize};

/// A secret string. Serializes as the plain value (the configuration and the
/// state database store it); `Debug` shows whether it is set, never what it is.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the few places that must use it (HMAC, comparing a
    /// presented token, writing it where it belongs).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_string())
    }
}

/// Compared in constant time, like every secret here.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        tokens_equal(&self.0, &other.0)
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(unset)" } else { "Secret(********)" })
    }
}

/// Constant-time equality for tokens compared outside HMAC.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// `url` with its credentials hidden, for logs and `check-config`: scheme, host
/// and port stay (they say where deliveries go), while user info, path and query
/// are masked, since webhook receivers carry their keys in any of the three
/// (`user:password@`, Slack-style `/services/T0/B0/KEY`, `?key=`).
pub fn redacted_url(url: &str) -> String {
    const MASK: &str = "********";
    let Some((scheme, rest)) = url.split_once("://") else { return MASK.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("{MASK}@{host}"),
        None => authority.to_string(),
    };
    let tail = if tail.is_empty() || tail == "/" { tail.to_string() } else { format!("/{MASK}") };
    format!("{scheme}://{host}{tail}")
}

/// The only line of `file` into `secret`, or why not (for the caller to put
/// behind the key it came from).
pub(crate) fn read_secret_file_into(secret: &mut Secret, file: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(format!("{} is empty (the secret is its first line)", file.display()));
    }
    if text.lines().skip(1).any(|l| !l.trim().is_empty()) {
        return Err(format!("{} has more than one line (the secret is its only line)", file.display()));
    }
    *secret = Secret::new(line);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_where_they_go_and_hide_their_keys() {
        assert_eq!(redacted_url("http://hooks.example:8080/"), "http://hooks.example:8080/");
        assert_eq!(redacted_url("http://hooks.example"), "http://hooks.example");
        assert_eq!(redacted_url("http://alice:pw@hooks.example/in?key=k1"), "http://********@hooks.example/********");
        assert_eq!(redacted_url("http://hooks.example?key=k1"), "http://hooks.example/********");
        assert_eq!(redacted_url("http://a@b@hooks.example/services/T0/B0/KEY"), "http://********@hooks.example/********");
        assert_eq!(redacted_url("not a url"), "********");
    }

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2-hunter2-hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(********)");
        assert_eq!(format!("{:?}", Secret::default()), "Secret(unset)");
        assert_eq!(secret.expose(), "hunter2-hunter2-hunter2");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"hunter2-hunter2-hunter2\"");
    }
}

//! Secrets: compared in constant time.

/// Constant-time equality for tokens compared outside HMAC.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

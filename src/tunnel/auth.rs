//! The tunnel's authentication: a random challenge answered with
//! HMAC-SHA256(secret, nonce ‖ binding), where the binding is the TLS session's
//! exporter value (empty on a plain tunnel), so an answer is worthless on any
//! other session. Answers are compared in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A fresh random challenge (hex).
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn mac(secret: &str, nonce: &str, binding: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(nonce.as_bytes());
    mac.update(binding);
    mac
}

/// The client's answer to a challenge.
pub fn sign(secret: &str, nonce: &str, binding: &[u8]) -> String {
    hex::encode(mac(secret, nonce, binding).finalize().into_bytes())
}

/// Checks a client's answer in constant time.
pub fn verify(secret: &str, nonce: &str, binding: &[u8], answer_hex: &str) -> bool {
    let Ok(answer) = hex::decode(answer_hex) else {
        return false;
    };
    mac(secret, nonce, binding).verify_slice(&answer).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_round_trip_and_rejection() {
        let nonce = new_nonce();
        let answer = sign("s3cret", &nonce, b"session a");
        assert!(verify("s3cret", &nonce, b"session a", &answer));
        assert!(!verify("s3cret", &nonce, b"session b", &answer), "bound to the session");
        assert!(!verify("other", &nonce, b"session a", &answer));
        assert!(!verify("s3cret", &new_nonce(), b"session a", &answer));
        assert!(!verify("s3cret", &nonce, b"session a", "zz-not-hex"));
    }
}

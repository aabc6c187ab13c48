//! Replay nonces (RFC 8555, section 6.5).
//!
//! A nonce is 8 bytes of expiry time, 12 random bytes and a 12-byte
//! HMAC-SHA256 tag over both under a key every node shares through the
//! store, so any node can tell a nonce it or another node issued from one
//! never issued, without a write. Use at most once is enforced by the
//! caller, which records each accepted nonce in the store.

use ring::hmac;

use crate::problem::{Problem, ProblemType};

const EXPIRY_LEN: usize = 8;
const RANDOM_LEN: usize = 12;
const TAG_LEN: usize = 12;
const NONCE_LEN: usize = EXPIRY_LEN + RANDOM_LEN + TAG_LEN;

pub struct NonceKey {
    key: hmac::Key,
}

impl NonceKey {
    pub fn new(secret: &[u8]) -> NonceKey {
        NonceKey { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// Issues a nonce that expires at `expires_unix`.
    pub fn issue(&self, expires_unix: i64) -> String {
        let mut bytes = [0u8; NONCE_LEN];
        bytes[..EXPIRY_LEN].copy_from_slice(&expires_unix.to_be_bytes());
        rand::fill(&mut bytes[EXPIRY_LEN..EXPIRY_LEN + RANDOM_LEN]);
        let tag = hmac::sign(&self.key, &bytes[..EXPIRY_LEN + RANDOM_LEN]);
        bytes[EXPIRY_LEN + RANDOM_LEN..].copy_from_slice(&tag.as_ref()[..TAG_LEN]);
        crate::b64::encode(&bytes)
    }

    /// Checks that `nonce` was issued with this key and has not expired,
    /// and returns its expiry. Whether it was used before is not checked.
    pub fn check(&self, nonce: &str, now_unix: i64) -> Result<i64, Problem> {
        let bytes = crate::b64::decode("nonce", nonce).map_err(|_| bad_nonce(nonce, "is not base64url"))?;
        if bytes.len() != NONCE_LEN {
            return Err(bad_nonce(nonce, "was not issued by this server"));
        }
        let tag = hmac::sign(&self.key, &bytes[..EXPIRY_LEN + RANDOM_LEN]);
        if !equal_in_constant_time(&tag.as_ref()[..TAG_LEN], &bytes[EXPIRY_LEN + RANDOM_LEN..]) {
            return Err(bad_nonce(nonce, "was not issued by this server"));
        }
        let mut expiry = [0u8; EXPIRY_LEN];
        expiry.copy_from_slice(&bytes[..EXPIRY_LEN]);
        let expires_unix = i64::from_be_bytes(expiry);
        if expires_unix <= now_unix {
            return Err(bad_nonce(nonce, "has expired"));
        }
        Ok(expires_unix)
    }
}

fn equal_in_constant_time(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

pub fn bad_nonce(nonce: &str, reason: &str) -> Problem {
    let shown: String = nonce.chars().take(64).collect();
    Problem::new(ProblemType::BadNonce, format!("nonce {shown:?} {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_nonce_checks_until_expiry() {
        let key = NonceKey::new(b"0123456789abcdef0123456789abcdef");
        let nonce = key.issue(1_000);
        assert_eq!(key.check(&nonce, 999).expect("valid"), 1_000);
        let expired = key.check(&nonce, 1_000).expect_err("expired");
        assert!(expired.is(ProblemType::BadNonce), "{expired}");
        assert!(expired.detail.contains("has expired"), "{expired}");
    }

    #[test]
    fn nonce_from_another_key_or_altered_is_refused() {
        let key = NonceKey::new(b"first key first key first key 00");
        let other = NonceKey::new(b"other key other key other key 00");
        let nonce = other.issue(1_000);
        let refused = key.check(&nonce, 0).expect_err("other key");
        assert!(refused.detail.contains(&nonce), "{refused}");

        let mut altered = key.issue(1_000).into_bytes();
        altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).expect("ascii");
        assert!(key.check(&altered, 0).is_err());
        assert!(key.check("short", 0).expect_err("short").is(ProblemType::BadNonce));
    }
}

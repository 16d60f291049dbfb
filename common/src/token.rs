//! Join tokens (`DPLY1.<sha256 of CA cert>.<secret>`) and the small secret-handling helpers
//! shared with API tokens.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};

const PREFIX: &str = "DPLY1";
const SECRET_BYTES: usize = 32;
const HEX_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token must start with \"DPLY1.\"")]
    WrongPrefix,
    #[error("join token must have the form DPLY1.<CA fingerprint>.<secret>")]
    WrongShape,
    #[error("join token CA fingerprint must be 64 hex characters (a SHA-256)")]
    BadFingerprint,
    #[error("join token secret must be 64 hex characters")]
    BadSecret,
}

/// What a new node needs to join: the CA fingerprint to pin and the secret to present.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// 64 lowercase hex characters.
    pub ca_fingerprint: String,
    /// 64 lowercase hex characters.
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl JoinToken {
    /// A token for the CA with `ca_fingerprint` and a fresh 256-bit secret.
    pub fn new(ca_fingerprint: String) -> JoinToken {
        JoinToken { ca_fingerprint, secret: random_hex(SECRET_BYTES) }
    }

    /// Parses `DPLY1.<64 hex>.<64 hex>`, ignoring surrounding whitespace. Hex is accepted in
    /// either case and stored lowercase.
    pub fn parse(s: &str) -> Result<JoinToken, TokenError> {
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('.')).ok_or(TokenError::WrongPrefix)?;
        let (fingerprint, secret) = rest.split_once('.').ok_or(TokenError::WrongShape)?;
        if !is_hex_of_len(fingerprint, HEX_LEN) {
            return Err(TokenError::BadFingerprint);
        }
        if !is_hex_of_len(secret, HEX_LEN) {
            // Also catches a fourth dot-separated part.
            return Err(TokenError::BadSecret);
        }
        Ok(JoinToken { ca_fingerprint: fingerprint.to_ascii_lowercase(), secret: secret.to_ascii_lowercase() })
    }

    /// The hash that is stored in place of the secret.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}", self.ca_fingerprint, self.secret)
    }
}

fn is_hex_of_len(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Lowercase hex SHA-256 of a secret; only this is ever stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()))
}

/// `bytes` random bytes from the system CSPRNG, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        // The OS generator failing leaves no safe way to make a secret.
        .expect("system random number generator failed");
    hex::encode(buf)
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> String {
        "ab".repeat(32)
    }

    #[test]
    fn display_and_parse_round_trip() {
        let token = JoinToken::new(fp());
        let text = token.to_string();
        assert!(text.starts_with("DPLY1."));
        assert_eq!(text.len(), 5 + 1 + 64 + 1 + 64);
        assert_eq!(JoinToken::parse(&text).unwrap(), token);
        assert_eq!(JoinToken::parse(&format!("  {text}\n")).unwrap(), token);
        assert_eq!(JoinToken::parse(&text.to_ascii_uppercase()).unwrap(), token);
    }

    #[test]
    fn secrets_are_fresh_and_hex() {
        let a = JoinToken::new(fp());
        let b = JoinToken::new(fp());
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), 64);
        assert!(a.secret.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert!(!format!("{a:?}").contains(&a.secret));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        let secret = "cd".repeat(32);
        let cases = [
            (format!("DPLY2.{}.{secret}", fp()), TokenError::WrongPrefix),
            (format!("{}.{secret}", fp()), TokenError::WrongPrefix),
            (String::new(), TokenError::WrongPrefix),
            (format!("DPLY1{}.{secret}", fp()), TokenError::WrongPrefix),
            (format!("DPLY1.{}", fp()), TokenError::WrongShape),
            (format!("DPLY1.{}.{secret}", "ab".repeat(31)), TokenError::BadFingerprint),
            (format!("DPLY1.{}.{secret}", "zz".repeat(32)), TokenError::BadFingerprint),
            (format!("DPLY1.{}.{}", fp(), "cd".repeat(31)), TokenError::BadSecret),
            (format!("DPLY1.{}.{}", fp(), "g".repeat(64)), TokenError::BadSecret),
            (format!("DPLY1.{}.{secret}.extra", fp()), TokenError::BadSecret),
            (format!("DPLY1.{}.", fp()), TokenError::BadSecret),
        ];
        for (input, expected) in cases {
            assert_eq!(JoinToken::parse(&input), Err(expected.clone()), "{input}");
        }
        let messages =
            [TokenError::WrongPrefix, TokenError::WrongShape, TokenError::BadFingerprint, TokenError::BadSecret]
                .map(|e| e.to_string());
        for (i, m) in messages.iter().enumerate() {
            assert!(!messages[..i].contains(m), "duplicate message {m}");
        }
    }

    #[test]
    fn secret_hash_is_sha256_hex() {
        assert_eq!(hash_secret("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let token = JoinToken::new(fp());
        assert_eq!(token.secret_hash(), hash_secret(&token.secret));
    }

    #[test]
    fn random_hex_has_requested_length() {
        assert_eq!(random_hex(0), "");
        assert_eq!(random_hex(16).len(), 32);
        assert_ne!(random_hex(16), random_hex(16));
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"Secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
    }
}

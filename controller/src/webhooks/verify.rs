//! Is a delivery authentic? GitHub's HMAC signature and GitLab's (or the deploy hook's) token, both
//! compared in constant time so that response times say nothing about the secret.
//!
//! An empty secret or expected token never validates: it would mean "not configured", and accepting
//! it would let anyone sign (an HMAC under an empty key is no secret) or send an empty header.

use ring::hmac;

/// The prefix of GitHub's `X-Hub-Signature-256` header value.
const SHA256_PREFIX: &str = "sha256=";

/// Whether `header` (the value of `X-Hub-Signature-256`: `sha256=` and 64 hex digits) is the
/// HMAC-SHA256 of `body` under `secret`. A malformed header is simply not valid.
pub fn github_signature_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    match parse_signature(header) {
        Some(tag) => signed_by(secret, body, &tag),
        None => false,
    }
}

/// The `X-Hub-Signature-256` value GitHub would send for `body` signed with `secret`.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), body);
    format!("{SHA256_PREFIX}{}", hex::encode(tag.as_ref()))
}

/// Whether the token a delivery `given` (GitLab's `X-Gitlab-Token`, the deploy hook's token) is the
/// `expected` one. The time taken depends on the two lengths, never on the contents.
pub fn token_valid(expected: &[u8], given: &[u8]) -> bool {
    // Comparing HMACs rather than the tokens: `ring::hmac::verify` compares in constant time, and
    // tokens of different lengths need no early exit. The key need not be secret for that.
    const COMPARISON_KEY: &[u8] = b"deployer webhook token comparison";
    if expected.is_empty() {
        return false;
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, COMPARISON_KEY);
    let expected_tag = hmac::sign(&key, expected);
    hmac::verify(&key, given, expected_tag.as_ref()).is_ok()
}

/// The index of the first of `secrets` that signed `body` as `header` says, if any. Every secret is
/// checked whatever the outcome, so the time taken does not tell which one matched (the caller holds
/// the default secret, the project's own, and those being rotated out).
pub fn which_secret(secrets: &[Vec<u8>], body: &[u8], header: &str) -> Option<usize> {
    // The header is the sender's, so rejecting a malformed one early reveals nothing about secrets.
    let tag = parse_signature(header)?;
    let mut first = None;
    for (index, secret) in secrets.iter().enumerate() {
        let valid = signed_by(secret, body, &tag);
        first = first.or(valid.then_some(index));
    }
    first
}

/// The index of the first of `secrets` equal to the token `given`, checking every one whatever the
/// outcome (as [`which_secret`] does for signatures).
pub fn which_token(secrets: &[Vec<u8>], given: &[u8]) -> Option<usize> {
    let mut first = None;
    for (index, secret) in secrets.iter().enumerate() {
        let valid = token_valid(secret, given);
        first = first.or(valid.then_some(index));
    }
    first
}

/// The 32 bytes of a `sha256=<64 hex digits>` header value, or None if it is anything else.
fn parse_signature(header: &str) -> Option<[u8; 32]> {
    let digits = header.strip_prefix(SHA256_PREFIX)?;
    let mut tag = [0u8; 32];
    hex::decode_to_slice(digits, &mut tag).ok()?;
    Some(tag)
}

fn signed_by(secret: &[u8], body: &[u8], tag: &[u8; 32]) -> bool {
    !secret.is_empty() && hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), body, tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // GitHub's documented example ("Validating webhook deliveries").
    const DOC_SECRET: &[u8] = b"It's a Secret to Everybody";
    const DOC_BODY: &[u8] = b"Hello, World!";
    const DOC_SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_documented_example_is_signed_and_verified() {
        assert_eq!(github_signature(DOC_SECRET, DOC_BODY), DOC_SIGNATURE);
        assert!(github_signature_valid(DOC_SECRET, DOC_BODY, DOC_SIGNATURE));
    }

    #[test]
    fn a_signature_of_another_body_or_under_another_secret_is_rejected() {
        assert!(!github_signature_valid(DOC_SECRET, b"Hello, World?", DOC_SIGNATURE));
        assert!(!github_signature_valid(b"It's a Secret to Nobody", DOC_BODY, DOC_SIGNATURE));
        let mut flipped = DOC_SIGNATURE.to_string();
        flipped.replace_range(flipped.len() - 1.., "f");
        assert!(!github_signature_valid(DOC_SECRET, DOC_BODY, &flipped));
    }

    #[test]
    fn malformed_signature_headers_are_rejected_without_panicking() {
        let digits = &DOC_SIGNATURE[SHA256_PREFIX.len()..];
        let malformed = [
            String::new(),
            "sha256=".to_string(),
            digits.to_string(),
            format!("sha1={digits}"),
            format!("SHA256={digits}"),
            format!(" sha256={digits}"),
            format!("sha256={digits} "),
            format!("sha256={}", &digits[..63]),
            format!("sha256={digits}0"),
            format!("sha256={digits}00"),
            format!("sha256={}zz", &digits[..62]),
            format!("sha256={}é", &digits[..62]),
            "sha256=ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé".to_string(),
        ];
        for header in &malformed {
            assert!(!github_signature_valid(DOC_SECRET, DOC_BODY, header), "{header:?} was accepted");
        }
    }

    #[test]
    fn upper_case_hex_digits_are_accepted() {
        let upper = format!("sha256={}", DOC_SIGNATURE[SHA256_PREFIX.len()..].to_uppercase());
        assert!(github_signature_valid(DOC_SECRET, DOC_BODY, &upper));
    }

    #[test]
    fn an_empty_secret_validates_nothing() {
        let signed_without_secret = github_signature(b"", DOC_BODY);
        assert!(!github_signature_valid(b"", DOC_BODY, &signed_without_secret));
        assert_eq!(which_secret(&[Vec::new()], DOC_BODY, &signed_without_secret), None);
    }

    #[test]
    fn tokens_match_only_when_identical() {
        assert!(token_valid(b"s3cret-token", b"s3cret-token"));
        assert!(!token_valid(b"s3cret-token", b"s3cret-tokeN"));
        assert!(!token_valid(b"s3cret-token", b"s3cret-toke"));
        assert!(!token_valid(b"s3cret-token", b"s3cret-token "));
        assert!(!token_valid(b"s3cret-token", b""));
        assert!(!token_valid(b"", b""), "an unset token must not accept an empty header");
        assert!(!token_valid(b"", b"anything"));
    }

    #[test]
    fn which_token_finds_the_first_secret_it_equals() {
        let secrets = vec![b"old-token".to_vec(), b"new-token".to_vec(), b"new-token".to_vec()];
        assert_eq!(which_token(&secrets, b"new-token"), Some(1));
        assert_eq!(which_token(&secrets, b"old-token"), Some(0));
        assert_eq!(which_token(&secrets, b"other"), None);
        assert_eq!(which_token(&[], b"new-token"), None);
    }

    #[test]
    fn which_secret_finds_the_first_secret_that_signed() {
        let secrets = vec![b"default".to_vec(), DOC_SECRET.to_vec(), b"previous".to_vec(), DOC_SECRET.to_vec()];
        assert_eq!(which_secret(&secrets, DOC_BODY, DOC_SIGNATURE), Some(1));
        let by_previous = github_signature(b"previous", DOC_BODY);
        assert_eq!(which_secret(&secrets, DOC_BODY, &by_previous), Some(2));
        assert_eq!(which_secret(&secrets[..1], DOC_BODY, DOC_SIGNATURE), None);
        assert_eq!(which_secret(&[], DOC_BODY, DOC_SIGNATURE), None);
        assert_eq!(which_secret(&secrets, DOC_BODY, "sha256=not-hex"), None);
        assert_eq!(which_secret(&secrets, b"tampered", DOC_SIGNATURE), None);
    }
}

//! GitHub App authentication: a JWT signed with the app's key (RS256) finds the app's
//! installation on a repository and buys an installation token, kept until shortly before it
//! expires.

use std::collections::HashMap;

use http::Method;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use super::github::{with_github_headers, Repo};
use super::{request, GitHost, GitHostError};

/// The JWT is dated a minute back, as GitHub advises, against clock drift.
const JWT_BACKDATE: Duration = Duration::seconds(60);
/// GitHub refuses JWTs that expire more than 10 minutes ahead.
const JWT_LIFETIME: Duration = Duration::minutes(9);
/// An installation token (valid one hour) is replaced this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::minutes(5);

pub(super) struct AppAuth {
    app_id: String,
    key: RsaKeyPair,
    rng: SystemRandom,
    /// Held while a token is bought, so concurrent calls buy one, not one each.
    cache: tokio::sync::Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// `owner/name` (lowercase: GitHub's names are case-insensitive) → installation ID.
    installations: HashMap<String, u64>,
    tokens: HashMap<u64, InstallationToken>,
}

struct InstallationToken {
    token: String,
    refresh_at: OffsetDateTime,
}

#[derive(Deserialize)]
struct Installation {
    id: u64,
}

#[derive(Deserialize)]
struct AccessToken {
    token: String,
    expires_at: String,
}

impl AppAuth {
    pub(super) fn new(app_id: String, private_key_pem: &str) -> Result<AppAuth, GitHostError> {
        let app_id = app_id.trim().to_owned();
        if app_id.is_empty() || !app_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(GitHostError::InvalidAppCredentials(format!(
                "the app ID {app_id:?} is neither a GitHub App ID nor a client ID"
            )));
        }
        Ok(AppAuth { app_id, key: parse_key(private_key_pem)?, rng: SystemRandom::new(), cache: Default::default() })
    }

    pub(super) fn app_id(&self) -> &str {
        &self.app_id
    }

    /// A token of the app's installation on `repo`: the cached one, or a new one.
    pub(super) async fn installation_token(&self, host: &GitHost, repo: &Repo<'_>) -> Result<String, GitHostError> {
        let key = cache_key(repo);
        let mut cache = self.cache.lock().await;
        let now = OffsetDateTime::now_utc();
        if let Some(token) = cache.installations.get(&key).and_then(|id| cache.tokens.get(id)) {
            if now < token.refresh_at {
                return Ok(token.token.clone());
            }
        }

        let installation = match cache.installations.get(&key) {
            Some(id) => *id,
            None => {
                let path = host.http.endpoint(&format!("/repos/{}/{}/installation", repo.owner, repo.name));
                let mut req = request(Method::GET, &path, None);
                with_github_headers(req.headers_mut(), &self.jwt()?)?;
                let not_found =
                    ". The GitHub App is not installed on this repository, or the repository does not exist";
                let (answer, call) = host.call("find the GitHub App's installation", req, not_found).await?;
                let installation: Installation = host.decode(&call, &answer)?;
                cache.installations.insert(key, installation.id);
                installation.id
            }
        };

        let path = host.http.endpoint(&format!("/app/installations/{installation}/access_tokens"));
        let mut req = request(Method::POST, &path, None);
        with_github_headers(req.headers_mut(), &self.jwt()?)?;
        let (answer, call) = host.call("create an installation access token", req, "").await?;
        let access: AccessToken = host.decode(&call, &answer)?;
        let expires_at =
            OffsetDateTime::parse(&access.expires_at, &Rfc3339).map_err(|e| GitHostError::UnexpectedAnswer {
                call: call.clone(),
                host: host.http.host().to_owned(),
                reason: format!("expires_at {:?} is not an RFC 3339 time: {e}", access.expires_at),
            })?;
        tracing::debug!(installation, %expires_at, "GitHub App installation token created");
        let token = access.token.clone();
        cache.tokens.insert(
            installation,
            InstallationToken { token: access.token, refresh_at: expires_at - TOKEN_REFRESH_MARGIN },
        );
        Ok(token)
    }

    /// Drops the token used for `repo` after GitHub refused it (revoked, or the app uninstalled).
    pub(super) async fn forget_token(&self, repo: &Repo<'_>) {
        let mut cache = self.cache.lock().await;
        if let Some(id) = cache.installations.remove(&cache_key(repo)) {
            cache.tokens.remove(&id);
        }
    }

    /// The app's JWT: RS256, `iss` the app ID (a number) or client ID (a string).
    fn jwt(&self) -> Result<String, GitHostError> {
        let now = OffsetDateTime::now_utc();
        let issuer = match self.app_id.parse::<u64>() {
            Ok(id) => Value::from(id),
            Err(_) => Value::from(self.app_id.as_str()),
        };
        let header = json!({ "alg": "RS256", "typ": "JWT" });
        let claims = json!({
            "iat": (now - JWT_BACKDATE).unix_timestamp(),
            "exp": (now + JWT_LIFETIME).unix_timestamp(),
            "iss": issuer,
        });
        let signing_input =
            format!("{}.{}", base64url(header.to_string().as_bytes()), base64url(claims.to_string().as_bytes()));
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, signing_input.as_bytes(), &mut signature)
            .map_err(|_| GitHostError::InvalidAppCredentials("signing the JWT failed".to_owned()))?;
        Ok(format!("{signing_input}.{}", base64url(&signature)))
    }
}

fn cache_key(repo: &Repo<'_>) -> String {
    format!("{}/{}", repo.owner, repo.name).to_ascii_lowercase()
}

/// The app's RSA key, PKCS#1 (as GitHub hands it out) or PKCS#8. A key passed through an
/// environment variable with its newlines written as `\n` is accepted too.
fn parse_key(pem: &str) -> Result<RsaKeyPair, GitHostError> {
    let invalid = |reason: &str| GitHostError::InvalidAppCredentials(format!("the private key {reason}"));
    let pem = if !pem.contains('\n') && pem.contains("\\n") { pem.replace("\\n", "\n") } else { pem.to_owned() };
    let key = PrivateKeyDer::from_pem_slice(pem.trim().as_bytes())
        .map_err(|_| invalid("is not a PEM private key (-----BEGIN RSA PRIVATE KEY-----)"))?;
    let parsed = match &key {
        PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
        _ => return Err(invalid("is not an RSA key")),
    };
    parsed.map_err(|e| invalid(&format!("cannot be used for RS256: {e}")))
}

/// Base64url without padding (RFC 7515's encoding of JWT parts).
fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((bits >> (18 - 6 * i)) & 0x3f) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc_4648_without_padding() {
        let cases: [(&[u8], &str); 8] = [
            (b"", ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff, 0xfe], "-__-"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64url(input), expected, "{input:?}");
        }
    }

    #[test]
    fn keys_that_are_not_rsa_pem_are_refused() {
        for bad in ["", "not a key", "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"] {
            let err = AppAuth::new("12345".to_owned(), bad).err().expect("refused");
            assert!(matches!(err, GitHostError::InvalidAppCredentials(_)), "{err:?}");
            assert!(err.to_string().contains("private key"), "{err}");
        }
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let err = AppAuth::new("12345".to_owned(), &ec).err().expect("an EC key is refused");
        assert!(err.to_string().contains("RS256"), "{err}");
    }

    #[test]
    fn app_ids_are_checked() {
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let err = AppAuth::new("12 34".to_owned(), &ec).err().expect("refused");
        assert!(err.to_string().contains("app ID"), "{err}");
    }
}

//! Client-side TLS to a controller: the server is trusted by the cluster CA (or, while joining,
//! by the CA's pinned fingerprint) and by its controller identity, never by the name dialed.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as ring_provider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::pki::{fingerprint_of_der, identity_of_cert_der, pem_encode_cert, Identity, PkiError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("no certificate found in PEM input")]
    NoCertificate,
    #[error("no private key found in PEM input")]
    NoPrivateKey,
    #[error("CA fingerprint must be 64 hex characters (a SHA-256)")]
    InvalidFingerprint,
    #[error("CA certificate cannot be used as a trust anchor")]
    InvalidCa(#[source] webpki::Error),
    #[error("TLS configuration failed")]
    Config(#[source] rustls::Error),
}

/// How a client decides to trust the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerTrust {
    /// The cluster CA cert (PEM) is known.
    Ca(String),
    /// Only the CA's sha256 fingerprint is known (a join token). The server must present its
    /// chain [leaf, CA]; the verifier finds the chain cert whose sha256 equals the pin, uses it
    /// as the only trust anchor and verifies the leaf against it. A server whose chain has no
    /// such cert is refused before any application data is sent.
    Fingerprint(String),
}

/// Why a server that presented a well-formed certificate was still refused.
#[derive(Debug, thiserror::Error)]
enum PeerRefused {
    #[error("no certificate in the server's chain matches the pinned CA fingerprint")]
    PinNotInChain,
    #[error("server certificate identity is not acceptable")]
    Identity(#[source] PkiError),
    #[error("server identity {0} is not a controller")]
    NotAController(Identity),
}

impl From<PeerRefused> for rustls::Error {
    fn from(e: PeerRefused) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// rustls ClientConfig (ring provider, TLS 1.2 and 1.3, ALPN h2) that accepts only a server
/// whose certificate chains to the trust anchor, is valid now, has EKU serverAuth and carries a
/// controller identity. The name or address the client dialed is not checked: the identity
/// replaces it. `client_identity`: `Some((cert_chain_pem, key_pem))` for mutual TLS.
pub fn controller_client_config(
    trust: &ServerTrust,
    client_identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(ring_provider::default_provider());
    let verifier = ControllerVerifier {
        anchor: match trust {
            ServerTrust::Ca(pem) => Anchor::Ca(
                certs_from_pem(pem)?
                    .iter()
                    .map(|der| webpki::anchor_from_trusted_cert(der).map(|a| a.to_owned()).map_err(TlsError::InvalidCa))
                    .collect::<Result<_, _>>()?,
            ),
            ServerTrust::Fingerprint(fp) => Anchor::Pin(normalize_fingerprint(fp)?),
        },
        algorithms: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client_identity {
        Some((chain_pem, key_pem)) => builder
            .with_client_auth_cert(certs_from_pem(chain_pem)?, key_from_pem(key_pem)?)
            .map_err(TlsError::Config)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The cert in `chain` whose SHA-256 is `fingerprint`, as PEM: after a handshake under
/// [`ServerTrust::Fingerprint`] this is the cluster CA the joining node should keep.
pub fn pinned_ca_from_chain(chain: &[CertificateDer<'_>], fingerprint: &str) -> Option<String> {
    let pin = normalize_fingerprint(fingerprint).ok()?;
    chain.iter().find(|der| fingerprint_of_der(der) == pin).map(|der| pem_encode_cert(der))
}

/// All CERTIFICATE blocks of a PEM string, in order (at least one).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) of a PEM string.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey,
        e => TlsError::Pem(e.to_string()),
    })
}

/// Installs ring as the process-wide rustls provider; a provider already installed is kept.
pub fn install_crypto_provider() {
    let _ = ring_provider::default_provider().install_default();
}

fn normalize_fingerprint(fp: &str) -> Result<String, TlsError> {
    let fp = fp.trim();
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::InvalidFingerprint);
    }
    Ok(fp.to_ascii_lowercase())
}

#[derive(Debug)]
enum Anchor {
    Ca(Vec<TrustAnchor<'static>>),
    Pin(String),
}

#[derive(Debug)]
struct ControllerVerifier {
    anchor: Anchor,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned;
        let anchors: &[TrustAnchor<'_>] = match &self.anchor {
            Anchor::Ca(anchors) => anchors,
            Anchor::Pin(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|der| fingerprint_of_der(der) == *pin)
                    .ok_or(PeerRefused::PinNotInChain)?;
                pinned = [webpki::anchor_from_trusted_cert(ca).map_err(webpki_error)?];
                &pinned
            }
        };
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        match identity_of_cert_der(end_entity).map_err(PeerRefused::Identity)? {
            Identity::Controller(_) => Ok(ServerCertVerified::assertion()),
            other => Err(PeerRefused::NotAController(other).into()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Maps the chain-verification failures that have a TLS meaning to rustls's own variants, so the
/// right alert is sent; the rest keep webpki's description.
fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let cert_error = match e {
        W::BadDer | W::BadDerTime | W::TrailingData(_) => CertificateError::BadEncoding,
        W::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        W::CertNotValidYet { time, not_before } => CertificateError::NotValidYetContext { time, not_before },
        W::InvalidCertValidity => CertificateError::Expired,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::UnsupportedSignatureAlgorithmContext(cx) => CertificateError::UnsupportedSignatureAlgorithmContext {
            signature_algorithm_id: cx.signature_algorithm_id,
            supported_algorithms: cx.supported_algorithms,
        },
        W::UnsupportedSignatureAlgorithmForPublicKeyContext(cx) => {
            CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext {
                signature_algorithm_id: cx.signature_algorithm_id,
                public_key_algorithm_id: cx.public_key_algorithm_id,
            }
        }
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{generate_key_and_csr, ClusterCa};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, ServerConfig};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A leaf for `identity` signed by `ca`: (cert PEM, key PEM).
    fn leaf(ca: &ClusterCa, identity: Identity) -> (String, String) {
        let (key, csr) = generate_key_and_csr().unwrap();
        (ca.sign_csr(&csr, &identity, &[], DAY).unwrap(), key)
    }

    fn server_config(
        ca: &ClusterCa,
        identity: Identity,
        tls12_only: bool,
        require_client_cert: bool,
    ) -> Arc<ServerConfig> {
        let (cert, key) = leaf(ca, identity);
        let chain = certs_from_pem(&format!("{cert}{}", ca.cert_pem())).unwrap();
        assert_eq!(chain.len(), 2);
        let provider = Arc::new(ring_provider::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] =
            if tls12_only { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions).unwrap();
        let builder = if require_client_cert {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(certs_from_pem(ca.cert_pem()).unwrap());
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap(),
            )
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key_from_pem(&key).unwrap()).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    struct Outcome {
        /// The server's chain as the client saw it, or why the client failed.
        client: Result<Vec<CertificateDer<'static>>, std::io::Error>,
        /// What the server read from the client, if its handshake completed.
        server_read: Option<Vec<u8>>,
        client_identity_seen_by_server: Option<Identity>,
        version: Option<rustls::ProtocolVersion>,
    }

    /// Runs one handshake over an in-memory pipe; on success the client sends "ping" and
    /// waits for "pong" (so neither side hangs up while the other still writes).
    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await.ok()?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|der| identity_of_cert_der(der).unwrap());
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            tls.write_all(b"pong").await.ok()?;
            tls.flush().await.ok()?;
            Some((buf.to_vec(), peer))
        };
        let client_side = async move {
            // The dialed name is deliberately unrelated to anything in the certificate.
            let name = ServerName::try_from("unrelated.example").unwrap();
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
            let chain = conn.peer_certificates().unwrap_or_default().to_vec();
            let version = conn.protocol_version();
            tls.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"pong");
            Ok((chain, version))
        };
        let (server_result, client_result) = tokio::join!(server_side, client_side);
        let (client, version) = match client_result {
            Ok((chain, version)) => (Ok(chain), version),
            Err(e) => (Err(e), None),
        };
        let (server_read, client_identity_seen_by_server) = match server_result {
            Some((read, peer)) => (Some(read), peer),
            None => (None, None),
        };
        Outcome { client, server_read, client_identity_seen_by_server, version }
    }

    /// The rustls certificate error behind a failed client handshake.
    fn certificate_error(outcome: &Outcome) -> CertificateError {
        let err = outcome.client.as_ref().expect_err("handshake should fail");
        match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(e)) => e.clone(),
            _ => panic!("not a certificate error: {err}"),
        }
    }

    /// Asserts the client refused the server for `why` and the server got no application data.
    fn assert_refused_by_verifier(outcome: &Outcome, why: fn(&PeerRefused) -> bool) {
        match certificate_error(outcome) {
            CertificateError::Other(OtherError(e)) => {
                let refused = e.downcast_ref::<PeerRefused>().expect("a PeerRefused");
                assert!(why(refused), "refused for another reason: {refused}");
            }
            other => panic!("refused for another reason: {other:?}"),
        }
        assert_eq!(outcome.server_read, None, "server received application data");
    }

    /// Asserts the leaf did not chain to the trusted CA. Every cluster CA has the same subject,
    /// so webpki finds the candidate issuer by name and fails on its signature.
    fn assert_chain_refused(outcome: &Outcome) {
        let err = certificate_error(outcome);
        assert!(
            matches!(err, CertificateError::BadSignature | CertificateError::UnknownIssuer),
            "refused for another reason: {err:?}"
        );
        assert_eq!(outcome.server_read, None, "server received application data");
    }

    #[tokio::test]
    async fn ca_trust_accepts_a_controller() {
        let ca = ClusterCa::generate().unwrap();
        let server = server_config(&ca, Identity::Controller(7), false, false);
        let client = controller_client_config(&ServerTrust::Ca(ca.cert_pem().to_string()), None).unwrap();
        let outcome = handshake(server, client).await;
        assert!(outcome.client.is_ok(), "{:?}", outcome.client.err());
        assert_eq!(outcome.version, Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(outcome.server_read.as_deref(), Some(&b"ping"[..]));
    }

    #[tokio::test]
    async fn ca_trust_works_over_tls12() {
        let ca = ClusterCa::generate().unwrap();
        let server = server_config(&ca, Identity::Controller(7), true, false);
        let client = controller_client_config(&ServerTrust::Ca(ca.cert_pem().to_string()), None).unwrap();
        let outcome = handshake(server, client).await;
        assert!(outcome.client.is_ok(), "{:?}", outcome.client.err());
        assert_eq!(outcome.version, Some(rustls::ProtocolVersion::TLSv1_2));
        assert_eq!(outcome.server_read.as_deref(), Some(&b"ping"[..]));
    }

    #[tokio::test]
    async fn pinned_fingerprint_accepts_and_yields_the_ca() {
        let ca = ClusterCa::generate().unwrap();
        let server = server_config(&ca, Identity::Controller(1), false, false);
        // A pin is accepted in upper case too, as a user might paste it.
        let trust = ServerTrust::Fingerprint(ca.fingerprint().to_ascii_uppercase());
        let client = controller_client_config(&trust, None).unwrap();
        let outcome = handshake(server, client).await;
        let chain = outcome.client.expect("handshake");
        assert_eq!(outcome.server_read.as_deref(), Some(&b"ping"[..]));
        let ca_pem = pinned_ca_from_chain(&chain, &ca.fingerprint()).unwrap();
        assert_eq!(ca_pem, ca.cert_pem());
        assert_eq!(pinned_ca_from_chain(&chain, &"00".repeat(32)), None);
    }

    #[tokio::test]
    async fn wrong_pin_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let server = server_config(&ca, Identity::Controller(1), false, false);
        let client = controller_client_config(&ServerTrust::Fingerprint(other.fingerprint()), None).unwrap();
        let outcome = handshake(server, client).await;
        assert_refused_by_verifier(&outcome, |r| matches!(r, PeerRefused::PinNotInChain));
    }

    #[tokio::test]
    async fn pin_on_a_chain_without_the_ca_is_refused() {
        // A server of another CA that forwards our CA's certificate in its chain still fails:
        // the leaf must verify against the pinned certificate.
        let ca = ClusterCa::generate().unwrap();
        let rogue = ClusterCa::generate().unwrap();
        let (cert, key) = leaf(&rogue, Identity::Controller(1));
        let chain = certs_from_pem(&format!("{cert}{}", ca.cert_pem())).unwrap();
        let server = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(ring_provider::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key_from_pem(&key).unwrap())
                .unwrap(),
        );
        let client = controller_client_config(&ServerTrust::Fingerprint(ca.fingerprint()), None).unwrap();
        let outcome = handshake(server, client).await;
        assert_chain_refused(&outcome);
    }

    #[tokio::test]
    async fn server_of_another_ca_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let server = server_config(&other, Identity::Controller(1), false, false);
        let client = controller_client_config(&ServerTrust::Ca(ca.cert_pem().to_string()), None).unwrap();
        let outcome = handshake(server, client).await;
        assert_chain_refused(&outcome);
    }

    #[tokio::test]
    async fn agent_identity_is_not_a_controller() {
        let ca = ClusterCa::generate().unwrap();
        for trust in [ServerTrust::Ca(ca.cert_pem().to_string()), ServerTrust::Fingerprint(ca.fingerprint())] {
            let server = server_config(&ca, Identity::Agent("a1".into()), false, false);
            let client = controller_client_config(&trust, None).unwrap();
            let outcome = handshake(server, client).await;
            assert_refused_by_verifier(&outcome, |r| matches!(r, PeerRefused::NotAController(_)));
        }
    }

    #[tokio::test]
    async fn mutual_tls_presents_the_client_identity() {
        let ca = ClusterCa::generate().unwrap();
        let server = server_config(&ca, Identity::Controller(1), false, true);
        let (agent_cert, agent_key) = leaf(&ca, Identity::Agent("n1".into()));
        let trust = ServerTrust::Ca(ca.cert_pem().to_string());

        let client = controller_client_config(&trust, Some((&agent_cert, &agent_key))).unwrap();
        let outcome = handshake(server.clone(), client).await;
        assert!(outcome.client.is_ok(), "{:?}", outcome.client.err());
        assert_eq!(outcome.client_identity_seen_by_server, Some(Identity::Agent("n1".into())));
        assert_eq!(outcome.server_read.as_deref(), Some(&b"ping"[..]));

        // Without a client certificate the server refuses to talk.
        let client = controller_client_config(&trust, None).unwrap();
        let outcome = handshake(server, client).await;
        assert_eq!(outcome.server_read, None);
    }

    #[test]
    fn bad_inputs_are_reported() {
        assert!(matches!(
            controller_client_config(&ServerTrust::Fingerprint("abc".into()), None),
            Err(TlsError::InvalidFingerprint)
        ));
        assert!(matches!(
            controller_client_config(&ServerTrust::Ca(String::new()), None),
            Err(TlsError::NoCertificate)
        ));
        let ca = ClusterCa::generate().unwrap();
        assert!(matches!(key_from_pem(ca.cert_pem()), Err(TlsError::NoPrivateKey)));
        assert!(key_from_pem(ca.key_pem()).is_ok());
        assert!(matches!(certs_from_pem(ca.key_pem()), Err(TlsError::NoCertificate)));
        install_crypto_provider();
        install_crypto_provider();
    }
}

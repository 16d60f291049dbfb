//! The cluster's certificate authority and the identities it certifies.
//!
//! Every controller and agent is known by a SPIFFE-style URI in its certificate's subject
//! alternative names (`spiffe://deployer/controller/<id>`, `spiffe://deployer/agent/<id>`);
//! the CA decides that identity when it signs, whatever the CSR asked for.

use std::fmt;
use std::net::IpAddr;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The SPIFFE trust domain of every deployer identity.
pub const TRUST_DOMAIN: &str = "deployer";

const CA_COMMON_NAME: &str = "Deployer cluster CA";
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// Leaf certificates start a little in the past so that clock skew between nodes does not
/// make a fresh certificate "not yet valid".
/// How far before issuance a certificate's notBefore is set, to tolerate clock skew.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);
const MAX_AGENT_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid deployer identity URI {uri:?}: {reason}")]
    InvalidIdentityUri { uri: String, reason: &'static str },
    #[error("could not generate a key or certificate")]
    Generate(#[source] rcgen::Error),
    #[error("the system random number generator failed")]
    Random,
    #[error("invalid PEM")]
    Pem(#[source] pem::PemError),
    #[error("no CERTIFICATE block found in PEM input")]
    NoCertificate,
    #[error("certificate could not be parsed: {0}")]
    InvalidCertificate(String),
    #[error("private key could not be parsed")]
    InvalidKey(#[source] rcgen::Error),
    #[error("the CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("the certificate is not a CA certificate")]
    NotACa,
    #[error("CSR could not be parsed: {0}")]
    InvalidCsr(String),
    #[error("CSR signature is invalid")]
    CsrSignatureInvalid,
    #[error("CSR public key is not supported")]
    UnsupportedCsrKey(#[source] rcgen::Error),
    #[error("invalid DNS name {0:?} for a certificate")]
    InvalidDnsName(String),
    #[error("certificate validity is out of range")]
    ValidityOutOfRange,
    #[error("could not sign the certificate")]
    Sign(#[source] rcgen::Error),
    #[error("certificate has no deployer identity")]
    NoIdentity,
    #[error("certificate has more than one deployer identity")]
    SeveralIdentities,
}

/// Who a certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A controller, by its Raft node id.
    Controller(u64),
    /// An agent, by its id (`[a-z0-9-]{1,64}`).
    Agent(String),
}

impl Identity {
    /// The identity's URI, e.g. `spiffe://deployer/controller/42`.
    pub fn uri(&self) -> String {
        match self {
            Identity::Controller(id) => format!("spiffe://{TRUST_DOMAIN}/controller/{id}"),
            Identity::Agent(id) => format!("spiffe://{TRUST_DOMAIN}/agent/{id}"),
        }
    }

    /// Parses an identity URI strictly: exact scheme and trust domain, exactly two path
    /// segments, a canonical decimal u64 for a controller, `[a-z0-9-]{1,64}` for an agent.
    pub fn parse_uri(uri: &str) -> Result<Identity, PkiError> {
        let invalid = |reason| PkiError::InvalidIdentityUri { uri: uri.to_string(), reason };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(|| invalid("scheme must be spiffe://"))?;
        let path = rest
            .strip_prefix(TRUST_DOMAIN)
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(|| invalid("trust domain must be \"deployer\""))?;
        let (kind, id) = path.split_once('/').ok_or_else(|| invalid("path must be /controller/<id> or /agent/<id>"))?;
        if id.contains('/') {
            return Err(invalid("path has extra segments"));
        }
        match kind {
            "controller" => {
                let n: u64 = id.parse().map_err(|_| invalid("controller id must be a decimal u64"))?;
                // Only the canonical spelling, so one identity has exactly one URI.
                if n.to_string() != id {
                    return Err(invalid("controller id must be a decimal u64"));
                }
                Ok(Identity::Controller(n))
            }
            "agent" => {
                if !is_valid_agent_id(id) {
                    return Err(invalid("agent id must be 1 to 64 of [a-z0-9-]"));
                }
                Ok(Identity::Agent(id.to_string()))
            }
            _ => Err(invalid("path must be /controller/<id> or /agent/<id>")),
        }
    }

    pub fn is_controller(&self) -> bool {
        matches!(self, Identity::Controller(_))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

fn is_valid_agent_id(id: &str) -> bool {
    (1..=MAX_AGENT_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The cluster CA: its certificate and private key.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("fingerprint", &self.fingerprint()).field("key", &"[redacted]").finish()
    }
}

impl ClusterCa {
    /// A new self-signed ECDSA P-256 CA, valid for ten years, that may sign leaves only.
    pub fn generate() -> Result<ClusterCa, PkiError> {
        ClusterCa::generate_named(CA_COMMON_NAME)
    }

    /// Like [`ClusterCa::generate`], with another common name (the ingress CA is a CA of its
    /// own, so that no web certificate is ever signed by the CA cluster members trust).
    pub fn generate_named(common_name: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
        let cert_der = cert.der().to_vec();
        let key_pem = key.serialize_pem();
        Ok(ClusterCa { cert_pem: cert.pem(), key_pem, cert_der, issuer: Issuer::new(params, key) })
    }

    /// Loads a CA from its certificate and PKCS#8 private key; checks that the certificate is
    /// a CA and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let cert_der = first_cert_der(cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::InvalidKey)?;
        {
            let cert = parse_cert(&cert_der)?;
            if !cert.is_ca() {
                return Err(PkiError::NotACa);
            }
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(PkiError::KeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
        Ok(ClusterCa { cert_pem: pem_encode_cert(&cert_der), key_pem: key_pem.to_string(), cert_der, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Lowercase hex SHA-256 of the CA certificate's DER, as carried in join tokens.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_der(&self.cert_der)
    }

    /// Signs a CSR for `identity`: the subject/SANs asked for in the CSR are IGNORED; the
    /// certificate gets exactly one URI SAN = identity.uri(), plus the DNS SANs passed in
    /// `dns_names` (an entry that parses as an IP address becomes an IP SAN), EKU
    /// serverAuth+clientAuth, not a CA, validity now-5min .. now+validity. The CSR
    /// signature must verify.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        dns_names: &[String],
        validity: std::time::Duration,
    ) -> Result<String, PkiError> {
        let public_key = verified_csr_public_key(csr_pem)?;

        let mut sans = Vec::with_capacity(1 + dns_names.len());
        sans.push(SanType::URI(Ia5String::try_from(identity.uri()).map_err(PkiError::Sign)?));
        for name in dns_names {
            sans.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    Ia5String::try_from(name.as_str()).map_err(|_| PkiError::InvalidDnsName(name.clone()))?,
                ),
            });
        }

        let validity = time::Duration::try_from(validity).map_err(|_| PkiError::ValidityOutOfRange)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.uri());
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - BACKDATE;
        params.not_after = now.checked_add(validity).ok_or(PkiError::ValidityOutOfRange)?;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;

        let cert = params.signed_by(&public_key, &self.issuer).map_err(PkiError::Sign)?;
        Ok(cert.pem())
    }
}

impl ClusterCa {
    /// A web server certificate for `dns_names` with a fresh ECDSA P-256 key: serverAuth only,
    /// no identity URI (it can never pass as a cluster member). Returns (cert_pem, key_pem).
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        validity: std::time::Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
        let mut sans = Vec::with_capacity(dns_names.len());
        for name in dns_names {
            let name = Ia5String::try_from(name.as_str()).map_err(|_| PkiError::InvalidDnsName(name.clone()))?;
            sans.push(SanType::DnsName(name));
        }
        let validity = time::Duration::try_from(validity).map_err(|_| PkiError::ValidityOutOfRange)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns_names.first().map(String::as_str).unwrap_or("deployer"));
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - BACKDATE;
        params.not_after = now.checked_add(validity).ok_or(PkiError::ValidityOutOfRange)?;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(PkiError::Sign)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Parses a CSR, checks its self-signature and returns only its public key: nothing else the
/// requester asked for is trusted.
fn verified_csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, PkiError> {
    let block = pem::parse(csr_pem).map_err(PkiError::Pem)?;
    if block.tag() != "CERTIFICATE REQUEST" {
        return Err(PkiError::InvalidCsr(format!("expected a CERTIFICATE REQUEST PEM block, found {:?}", block.tag())));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(block.contents()).map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::InvalidCsr("trailing data after the CSR".into()));
    }
    csr.verify_signature().map_err(|_| PkiError::CsrSignatureInvalid)?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw).map_err(PkiError::UnsupportedCsrKey)
}

/// New ECDSA P-256 key and a CSR for it. Returns (key_pem, csr_pem).
pub fn generate_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
    let mut params = CertificateParams::default();
    // The CA replaces the subject anyway; don't leak rcgen's placeholder name.
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(PkiError::Generate)?;
    let csr_pem = csr.pem().map_err(PkiError::Generate)?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Lowercase hex SHA-256 of the first certificate in `cert_pem`.
pub fn fingerprint_of_pem(cert_pem: &str) -> Result<String, PkiError> {
    Ok(fingerprint_of_der(&first_cert_der(cert_pem)?))
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The single spiffe://deployer/... URI SAN of a DER certificate (error if none or several).
pub fn identity_of_cert_der(der: &[u8]) -> Result<Identity, PkiError> {
    let cert = parse_cert(der)?;
    let san = cert.subject_alternative_name().map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    let mut spiffe_uris = san.iter().flat_map(|ext| ext.value.general_names.iter()).filter_map(|name| match name {
        // Any spiffe URI counts, so a look-alike cannot hide next to a real identity.
        GeneralName::URI(uri) if uri.get(..9).is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://")) => {
            Some(*uri)
        }
        _ => None,
    });
    let uri = spiffe_uris.next().ok_or(PkiError::NoIdentity)?;
    if spiffe_uris.next().is_some() {
        return Err(PkiError::SeveralIdentities);
    }
    Identity::parse_uri(uri)
}

/// notAfter of the first certificate in a PEM string.
pub fn not_after_pem(cert_pem: &str) -> Result<OffsetDateTime, PkiError> {
    not_after_der(&first_cert_der(cert_pem)?)
}

/// (notBefore, notAfter) of the first certificate in a PEM string.
pub fn validity_pem(cert_pem: &str) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let der = first_cert_der(cert_pem)?;
    let cert = parse_cert(&der)?;
    Ok((cert.validity().not_before.to_datetime(), cert.validity().not_after.to_datetime()))
}

/// notAfter of a DER certificate.
pub fn not_after_der(der: &[u8]) -> Result<OffsetDateTime, PkiError> {
    Ok(parse_cert(der)?.validity().not_after.to_datetime())
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::InvalidCertificate("trailing data after the certificate".into()));
    }
    Ok(cert)
}

fn first_cert_der(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    pem::parse_many(cert_pem)
        .map_err(PkiError::Pem)?
        .into_iter()
        .find(|block| block.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .ok_or(PkiError::NoCertificate)
}

pub(crate) fn pem_encode_cert(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A random positive 127-bit serial, so renewals with the same key never collide.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).map_err(|_| PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn csr_asking_for(uri: &str, cn: &str) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = vec![
            SanType::URI(Ia5String::try_from(uri).unwrap()),
            SanType::DnsName(Ia5String::try_from("evil.example").unwrap()),
        ];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap();
        (key.serialize_pem(), csr.pem().unwrap())
    }

    fn cert_der(pem: &str) -> Vec<u8> {
        first_cert_der(pem).unwrap()
    }

    #[test]
    fn identity_uris_round_trip() {
        for id in [
            Identity::Controller(0),
            Identity::Controller(42),
            Identity::Controller(u64::MAX),
            Identity::Agent("a1".into()),
            Identity::Agent("web-01-x".into()),
            Identity::Agent("a".repeat(64)),
        ] {
            assert_eq!(Identity::parse_uri(&id.uri()).unwrap(), id);
        }
        assert_eq!(Identity::Controller(42).uri(), "spiffe://deployer/controller/42");
        assert_eq!(Identity::Agent("n1".into()).uri(), "spiffe://deployer/agent/n1");
        assert!(Identity::Controller(1).is_controller());
        assert!(!Identity::Agent("x".into()).is_controller());
    }

    #[test]
    fn identity_parse_is_strict() {
        for bad in [
            "spiffe://other/controller/1",
            "spiffe://deployer.evil/controller/1",
            "spiffe://deployerx/controller/1",
            "https://deployer/controller/1",
            "SPIFFE://deployer/controller/1",
            "spiffe://deployer/controller/1/extra",
            "spiffe://deployer/agent/a1/",
            "spiffe://deployer/controller/",
            "spiffe://deployer/controller/abc",
            "spiffe://deployer/controller/-1",
            "spiffe://deployer/controller/+1",
            "spiffe://deployer/controller/01",
            "spiffe://deployer/controller/18446744073709551616",
            "spiffe://deployer/agent/",
            "spiffe://deployer/agent/UPPER",
            "spiffe://deployer/agent/a_b",
            "spiffe://deployer/agent/a.b",
            "spiffe://deployer/agent/a1?x=y",
            "spiffe://deployer/builder/a1",
            "spiffe://deployer/controller",
            "spiffe://deployer",
        ] {
            assert!(Identity::parse_uri(bad).is_err(), "{bad} was accepted");
        }
        let long = format!("spiffe://deployer/agent/{}", "a".repeat(65));
        assert!(Identity::parse_uri(&long).is_err());
        let err = Identity::parse_uri("spiffe://other/controller/1").unwrap_err();
        assert!(err.to_string().contains("trust domain"), "{err}");
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = ClusterCa::generate().unwrap();
        let again = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(fingerprint_of_pem(ca.cert_pem()).unwrap(), ca.fingerprint());
        assert_eq!(ca.fingerprint().len(), 64);
        assert!(ca.fingerprint().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        // The reloaded CA signs certificates that chain to the original certificate.
        let (_, csr) = generate_key_and_csr().unwrap();
        let leaf = again.sign_csr(&csr, &Identity::Controller(3), &[], DAY).unwrap();
        let leaf_der = cert_der(&leaf);
        let (_, parsed) = X509Certificate::from_der(&leaf_der).unwrap();
        let (_, ca_parsed) = X509Certificate::from_der(ca.cert_der()).unwrap();
        parsed.verify_signature(Some(ca_parsed.public_key())).unwrap();
    }

    #[test]
    fn ca_certificate_has_the_promised_shape() {
        let ca = ClusterCa::generate().unwrap();
        let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert!(cert.subject().to_string().contains(CA_COMMON_NAME));
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let lifetime = cert.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
        assert!(lifetime > time::Duration::days(3649));
    }

    #[test]
    fn from_pem_rejects_a_foreign_key() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        assert!(matches!(ClusterCa::from_pem(ca.cert_pem(), other.key_pem()), Err(PkiError::KeyMismatch)));
    }

    #[test]
    fn from_pem_rejects_a_leaf() {
        let ca = ClusterCa::generate().unwrap();
        let (key, csr) = generate_key_and_csr().unwrap();
        let leaf = ca.sign_csr(&csr, &Identity::Controller(1), &[], DAY).unwrap();
        assert!(matches!(ClusterCa::from_pem(&leaf, &key), Err(PkiError::NotACa)));
    }

    #[test]
    fn sign_csr_ignores_what_the_csr_asks_for() {
        let ca = ClusterCa::generate().unwrap();
        let (_, csr) = csr_asking_for("spiffe://deployer/controller/1", "controller-1");
        let agent = Identity::Agent("a1".into());
        let pem = ca.sign_csr(&csr, &agent, &["node1.internal".into(), "10.0.0.7".into()], DAY).unwrap();
        let der = cert_der(&pem);
        assert_eq!(identity_of_cert_der(&der).unwrap(), agent);

        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        assert!(!cert.subject().to_string().contains("controller-1"));
        let names = &cert.subject_alternative_name().unwrap().unwrap().value.general_names;
        let uris: Vec<_> = names.iter().filter(|n| matches!(n, GeneralName::URI(_))).collect();
        assert_eq!(uris.len(), 1);
        assert!(names.contains(&GeneralName::DNSName("node1.internal")));
        assert!(!names.contains(&GeneralName::DNSName("evil.example")));
        assert!(names.contains(&GeneralName::IPAddress(&[10, 0, 0, 7])));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    }

    #[test]
    fn sign_csr_sets_validity_window() {
        let ca = ClusterCa::generate().unwrap();
        let (_, csr) = generate_key_and_csr().unwrap();
        let before = OffsetDateTime::now_utc();
        let pem = ca.sign_csr(&csr, &Identity::Agent("a1".into()), &[], Duration::from_secs(3600)).unwrap();
        let der = cert_der(&pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let nb = cert.validity().not_before.to_datetime();
        let na = not_after_pem(&pem).unwrap();
        assert!(nb <= before - time::Duration::minutes(4));
        assert!(na >= before + time::Duration::minutes(59));
        assert!(na <= before + time::Duration::minutes(61));
    }

    #[test]
    fn tampered_csr_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let (_, csr_pem) = csr_asking_for("spiffe://deployer/agent/a1", "agent-a1");
        let block = pem::parse(&csr_pem).unwrap();
        let mut der = block.contents().to_vec();
        // Change a byte of the requested common name ("agent-a1" -> "agent-b1").
        let pos = der.windows(8).position(|w| w == b"agent-a1").expect("CN in CSR");
        der[pos + 6] = b'b';
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca.sign_csr(&tampered, &Identity::Agent("a1".into()), &[], DAY).unwrap_err();
        assert!(matches!(err, PkiError::CsrSignatureInvalid), "{err}");
        assert_eq!(err.to_string(), "CSR signature is invalid");

        assert!(ca.sign_csr("not a csr", &Identity::Agent("a1".into()), &[], DAY).is_err());
        assert!(matches!(
            ca.sign_csr(ca.cert_pem(), &Identity::Agent("a1".into()), &[], DAY),
            Err(PkiError::InvalidCsr(_))
        ));
    }

    #[test]
    fn certificate_without_identity_is_reported() {
        let ca = ClusterCa::generate().unwrap();
        assert!(matches!(identity_of_cert_der(ca.cert_der()), Err(PkiError::NoIdentity)));
        assert_eq!(PkiError::NoIdentity.to_string(), "certificate has no deployer identity");
    }

    #[test]
    fn certificate_with_several_identities_is_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(Ia5String::try_from("spiffe://deployer/agent/a1").unwrap()),
            SanType::URI(Ia5String::try_from("spiffe://deployer/controller/1").unwrap()),
        ];
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(identity_of_cert_der(cert.der()), Err(PkiError::SeveralIdentities)));
    }

    #[test]
    fn certificate_with_foreign_spiffe_identity_is_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from("spiffe://other/controller/1").unwrap())];
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(identity_of_cert_der(cert.der()), Err(PkiError::InvalidIdentityUri { .. })));
    }

    #[test]
    fn fingerprint_of_pem_needs_a_certificate() {
        let (key, _) = generate_key_and_csr().unwrap();
        assert!(matches!(fingerprint_of_pem(&key), Err(PkiError::NoCertificate)));
    }
}

//! Pebble, Let's Encrypt's ACME test server, on loopback for tests: `pebble` with
//! `pebble-challtestsrv` as its DNS (every name resolves to 127.0.0.1) on free ports.

use std::net::{TcpListener as StdTcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub struct Pebble {
    pub dir: tempfile::TempDir,
    pub acme_port: u16,
    pub management_port: u16,
    pub dns_port: u16,
    /// The test CA that signed Pebble's own HTTPS certificate.
    pub https_ca_pem: String,
    pub https: TlsConnector,
    pub pebble: Daemon,
    pub dns: Daemon,
}

impl Pebble {
    pub async fn start(http01_port: u16) -> Pebble {
        let pebble_bin = installed("pebble");
        let challtestsrv_bin = installed("pebble-challtestsrv");
        let dir = tempfile::tempdir().unwrap();

        let (https_ca_pem, cert_pem, key_pem) = https_certificate();
        std::fs::write(dir.path().join("cert.pem"), cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), key_pem).unwrap();
        let (acme_port, management_port, tls_alpn_port, dns_management_port) =
            (free_tcp_port(), free_tcp_port(), free_tcp_port(), free_tcp_port());
        let dns_port = free_udp_and_tcp_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http01_port,
                "tlsPort": tls_alpn_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();

        // Only the mock DNS is needed: the test answers HTTP-01 itself. No AAAA records, so
        // Pebble dials the IPv4 address the test listens on.
        let dns = Daemon::spawn(
            Command::new(challtestsrv_bin).args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{dns_management_port}"),
            ]),
            &dir.path().join("challtestsrv.log"),
        );
        let https = tls_connector(&https_ca_pem);
        let pebble = Pebble::spawn_pebble(&pebble_bin, dir.path(), dns_port);
        let mut pebble = Pebble { dir, acme_port, management_port, dns_port, https_ca_pem, https, pebble, dns };
        pebble.wait_ready().await;
        pebble
    }

    pub fn spawn_pebble(bin: &Path, dir: &Path, dns_port: u16) -> Daemon {
        Daemon::spawn(
            Command::new(bin)
                .arg("-config")
                .arg(dir.join("pebble.json"))
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                // No random 0-15 s sleep before validating; no rejected good nonces; no
                // authorization reuse, so every order is validated.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0"),
            &dir.join("pebble.log"),
        )
    }

    pub async fn restart(&mut self) {
        self.pebble.stop();
        self.pebble = Pebble::spawn_pebble(&installed("pebble"), self.dir.path(), self.dns_port);
        self.wait_ready().await;
    }

    /// Polls Pebble's directory and the mock DNS until both answer.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let directory = https_get(&self.https, self.acme_port, "/dir").await;
            let dns = dns_answers(self.dns_port);
            if matches!(directory, Ok((200, _))) && dns {
                return;
            }
            self.pebble.assert_running();
            self.dns.assert_running();
            assert!(
                Instant::now() < deadline,
                "Pebble not ready within 15 s (directory: {directory:?}, DNS answers: {dns})\n{}\n{}",
                self.pebble.log(),
                self.dns.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ACME directory's URL.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The root Pebble issues under (a fresh one each run), from its management interface.
    pub async fn issuing_root_pem(&self) -> String {
        match https_get(&self.https, self.management_port, "/roots/0").await {
            Ok((200, body)) => body,
            other => panic!("cannot fetch Pebble's root: {other:?}"),
        }
    }
}

/// A child process killed when dropped.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(command: &mut Command, log: &Path) -> Daemon {
        let name = command.get_program().to_string_lossy().into_owned();
        let out = std::fs::File::create(log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon { name, child, log: log.to_owned() }
    }

    pub fn log(&self) -> String {
        format!("--- {} ---\n{}", self.name, std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status})\n{}", self.name, self.log());
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The path of an installed program; fails the test (never skips it) when it is missing.
pub fn installed(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{program}` is not installed: the ACME tests run Pebble, Let's Encrypt's test server; \
                 install the Debian package `pebble` (apt-get install pebble)"
            )
        })
}

/// A test CA and, signed by it, the certificate Pebble serves its API with: (CA, cert, key) PEM.
pub fn https_certificate() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "Deployer ACME test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

pub fn tls_connector(roots_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A one-shot HTTP/1.0 GET over TLS to 127.0.0.1: (status, body).
pub async fn https_get(tls: &TlsConnector, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut stream = tls.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes()).await?;
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response).await {
        // A server that closes without TLS close_notify has still sent its whole answer.
        if e.kind() != std::io::ErrorKind::UnexpectedEof || response.is_empty() {
            return Err(e);
        }
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// True when the mock DNS answers an A query for app.example.test.
pub fn dns_answers(port: u16) -> bool {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // Header: id 0x1234, recursion desired, one question; then the name, type A, class IN.
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["app", "example", "test"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    if socket.send_to(&query, ("127.0.0.1", port)).is_err() {
        return false;
    }
    let mut answer = [0u8; 512];
    matches!(socket.recv(&mut answer), Ok(n) if n >= 12 && answer[..2] == [0x12, 0x34] && answer[7] > 0)
}

pub fn free_tcp_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A port free for both UDP and TCP: the mock DNS listens on both.
pub fn free_udp_and_tcp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

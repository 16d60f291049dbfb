//! The ACME client against a real Pebble (Let's Encrypt's test server) on loopback.
//!
//! Each test starts its own `pebble` and `pebble-challtestsrv` (whose mock DNS answers
//! 127.0.0.1 for every name) on free ports, and serves the HTTP-01 answers itself.

use std::collections::HashMap;
use std::net::{TcpListener as StdTcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deployer_controller::acme::{needs_renewal, AcmeClient, AcmeConfig, AcmeError, ChallengeBoard, Issued};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn issues_a_certificate_that_verifies_against_pebbles_root_and_reuses_the_account() {
    let board = TestBoard::new(Answer::Right);
    let challenges = ChallengeServer::start(&board).await;
    let pebble = Pebble::start(challenges.port).await;
    let config = pebble.acme_config(Some("ops@example.test"));

    let (client, credentials) = AcmeClient::connect(&config, None).await.expect("account created");
    let domain = "app.example.test".to_owned();
    let issued = client.issue(std::slice::from_ref(&domain), &board, ISSUE_TIMEOUT).await.expect("certificate issued");

    let root = pebble.issuing_root_pem().await;
    assert_serves_tls(&issued, &root, &domain).await;
    assert!(
        tls_handshake(&issued, &root, "other.example.test").await.is_err(),
        "the certificate must not be accepted for a name it does not carry"
    );
    let now = unix_now();
    assert!(issued.not_before_unix <= now && now < issued.not_after_unix, "{issued:?}");
    assert!(!needs_renewal(issued.not_before_unix, issued.not_after_unix, now));
    assert!(board.is_empty(), "every challenge is withdrawn after issuance");
    assert_eq!(board.withdrawn().len(), 1, "one challenge published and withdrawn");

    // The stored credentials bring back the same account, which can order again.
    let (reloaded, reloaded_credentials) =
        AcmeClient::connect(&config, Some(&credentials)).await.expect("account loaded from credentials");
    assert_eq!(reloaded.account_id(), client.account_id());
    assert_eq!(reloaded_credentials, credentials, "nothing new to store");

    let domains = vec!["api.example.test".to_owned(), "www.example.test".to_owned()];
    let issued = reloaded.issue(&domains, &board, ISSUE_TIMEOUT).await.expect("certificate for two names issued");
    for domain in &domains {
        assert_serves_tls(&issued, &root, domain).await;
    }
    assert!(board.is_empty());
}

#[tokio::test]
async fn a_wrong_key_authorization_fails_naming_the_domain() {
    let board = TestBoard::new(Answer::Wrong);
    let challenges = ChallengeServer::start(&board).await;
    let pebble = Pebble::start(challenges.port).await;
    let (client, _) = AcmeClient::connect(&pebble.acme_config(None), None).await.expect("account created");

    let started = Instant::now();
    let err = client.issue(&["bad.example.test".to_owned()], &board, ISSUE_TIMEOUT).await.expect_err("must fail");

    assert!(started.elapsed() < ISSUE_TIMEOUT, "failed after {:?}", started.elapsed());
    match &err {
        AcmeError::ChallengeFailed { domain, reason } => {
            assert_eq!(domain, "bad.example.test");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a failed challenge, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("bad.example.test"), "{message}");
    assert!(board.is_empty());
    assert_eq!(board.withdrawn().len(), 1);
}

#[tokio::test]
async fn a_board_that_never_publishes_times_out_and_withdraws() {
    let board = TestBoard::new(Answer::Never);
    let challenges = ChallengeServer::start(&board).await;
    let pebble = Pebble::start(challenges.port).await;
    let (client, _) = AcmeClient::connect(&pebble.acme_config(None), None).await.expect("account created");

    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = client.issue(&["slow.example.test".to_owned()], &board, timeout).await.expect_err("must time out");

    assert!(started.elapsed() < timeout + Duration::from_secs(2), "gave up after {:?}", started.elapsed());
    assert!(matches!(err, AcmeError::TimedOut { .. }), "{err:?}");
    assert!(err.to_string().contains("slow.example.test"), "{err}");
    assert_eq!(board.withdrawn().len(), 1, "the challenge being published is withdrawn");
}

#[tokio::test]
async fn a_server_that_forgot_the_account_gets_a_new_one() {
    let board = TestBoard::new(Answer::Right);
    let challenges = ChallengeServer::start(&board).await;
    let mut pebble = Pebble::start(challenges.port).await;
    let config = pebble.acme_config(None);
    let (_, credentials) = AcmeClient::connect(&config, None).await.expect("account created");

    // Pebble keeps nothing across restarts: the stored account is unknown to the new instance.
    pebble.restart().await;
    let (renewed, renewed_credentials) =
        AcmeClient::connect(&config, Some(&credentials)).await.expect("a new account replaces the lost one");

    assert_ne!(renewed_credentials, credentials, "the new account's credentials are to be stored");
    let again = AcmeClient::connect(&config, Some(&renewed_credentials)).await.expect("new credentials load");
    assert_eq!(again.0.account_id(), renewed.account_id());
    renewed.issue(&["new.example.test".to_owned()], &board, ISSUE_TIMEOUT).await.expect("the new account orders");
}

// ---- The challenge board and the HTTP server that answers Pebble's HTTP-01 requests ----

#[derive(Clone, Copy)]
enum Answer {
    Right,
    Wrong,
    /// `publish` never returns.
    Never,
}

#[derive(Clone)]
struct TestBoard {
    answer: Answer,
    served: Arc<Mutex<HashMap<String, String>>>,
    withdrawn: Arc<Mutex<Vec<String>>>,
}

impl TestBoard {
    fn new(answer: Answer) -> TestBoard {
        TestBoard { answer, served: Arc::default(), withdrawn: Arc::default() }
    }

    fn is_empty(&self) -> bool {
        self.served.lock().unwrap().is_empty()
    }

    fn withdrawn(&self) -> Vec<String> {
        self.withdrawn.lock().unwrap().clone()
    }
}

impl ChallengeBoard for TestBoard {
    async fn publish(&self, token: &str, key_authorization: &str) {
        let value = match self.answer {
            Answer::Right => key_authorization.to_owned(),
            Answer::Wrong => format!("{token}.not-the-account-thumbprint"),
            Answer::Never => return std::future::pending().await,
        };
        self.served.lock().unwrap().insert(token.to_owned(), value);
    }

    async fn withdraw(&self, token: &str) {
        self.served.lock().unwrap().remove(token);
        self.withdrawn.lock().unwrap().push(token.to_owned());
    }
}

/// Answers `GET /.well-known/acme-challenge/<token>` from the board; stops when dropped.
struct ChallengeServer {
    port: u16,
    task: JoinHandle<()>,
}

impl ChallengeServer {
    async fn start(board: &TestBoard) -> ChallengeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = board.served.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(answer_challenge(stream, served.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        ChallengeServer { port, task }
    }
}

impl Drop for ChallengeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer_challenge(mut stream: TcpStream, served: Arc<Mutex<HashMap<String, String>>>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let request = String::from_utf8_lossy(&request);
    let path =
        request.lines().next().and_then(|line| line.strip_prefix("GET ")).and_then(|rest| rest.split(' ').next());
    let answer = path
        .and_then(|path| path.strip_prefix("/.well-known/acme-challenge/"))
        .and_then(|token| served.lock().unwrap().get(token).cloned());
    let response = match answer {
        Some(body) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// ---- Pebble and its mock DNS ----

struct Pebble {
    dir: tempfile::TempDir,
    acme_port: u16,
    management_port: u16,
    dns_port: u16,
    /// The test CA that signed Pebble's own HTTPS certificate.
    https_ca_pem: String,
    https: TlsConnector,
    pebble: Daemon,
    dns: Daemon,
}

impl Pebble {
    async fn start(http01_port: u16) -> Pebble {
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

    fn spawn_pebble(bin: &Path, dir: &Path, dns_port: u16) -> Daemon {
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

    async fn restart(&mut self) {
        self.pebble.stop();
        self.pebble = Pebble::spawn_pebble(&installed("pebble"), self.dir.path(), self.dns_port);
        self.wait_ready().await;
    }

    /// Polls Pebble's directory and the mock DNS until both answer.
    async fn wait_ready(&mut self) {
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

    fn acme_config(&self, contact_email: Option<&str>) -> AcmeConfig {
        AcmeConfig {
            directory_url: format!("https://127.0.0.1:{}/dir", self.acme_port),
            contact_email: contact_email.map(str::to_owned),
            trusted_roots_pem: Some(self.https_ca_pem.clone()),
        }
    }

    /// The root Pebble issues under (a fresh one each run), from its management interface.
    async fn issuing_root_pem(&self) -> String {
        match https_get(&self.https, self.management_port, "/roots/0").await {
            Ok((200, body)) => body,
            other => panic!("cannot fetch Pebble's root: {other:?}"),
        }
    }
}

/// A child process killed when dropped.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(command: &mut Command, log: &Path) -> Daemon {
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

    fn log(&self) -> String {
        format!("--- {} ---\n{}", self.name, std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status})\n{}", self.name, self.log());
        }
    }

    fn stop(&mut self) {
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
fn installed(program: &str) -> PathBuf {
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
fn https_certificate() -> (String, String, String) {
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

fn tls_connector(roots_pem: &str) -> TlsConnector {
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
async fn https_get(tls: &TlsConnector, port: u16, path: &str) -> std::io::Result<(u16, String)> {
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
fn dns_answers(port: u16) -> bool {
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

fn free_tcp_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A port free for both UDP and TCP: the mock DNS listens on both.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

// ---- What a browser would see ----

/// A TLS server holding the issued chain and key accepts a client that trusts only Pebble's
/// root and asks for `domain`: the chain verifies, names the domain, and the key matches.
async fn assert_serves_tls(issued: &Issued, root_pem: &str, domain: &str) {
    if let Err(e) = tls_handshake(issued, root_pem, domain).await {
        panic!("a client trusting Pebble's root rejects the certificate for {domain}: {e}");
    }
}

async fn tls_handshake(issued: &Issued, root_pem: &str, domain: &str) -> std::io::Result<()> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    assert!(chain.len() >= 2, "leaf and intermediate expected, got {} certificates", chain.len());
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the key matches the certificate");
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let connector = tls_connector(root_pem);

    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(domain.to_owned()).unwrap();
    let server = async move {
        let mut stream = acceptor.accept(server_io).await?;
        stream.write_all(b"ok").await?;
        stream.shutdown().await
    };
    let client = async move {
        let mut stream = connector.connect(name, client_io).await?;
        let mut greeting = [0u8; 2];
        stream.read_exact(&mut greeting).await?;
        assert_eq!(&greeting, b"ok");
        Ok::<_, std::io::Error>(())
    };
    let (server, client) = tokio::join!(server, client);
    client?;
    server
}

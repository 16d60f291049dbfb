//! The ACME client against a real Pebble (Let's Encrypt's test server) on loopback.
//!
//! Each test starts its own `pebble` and `pebble-challtestsrv` (whose mock DNS answers
//! 127.0.0.1 for every name) on free ports, and serves the HTTP-01 answers itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deployer_controller::acme::{needs_renewal, AcmeClient, AcmeConfig, AcmeError, ChallengeBoard, Issued};
use deployer_tests::pebble::{tls_connector, Pebble};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn issues_a_certificate_that_verifies_against_pebbles_root_and_reuses_the_account() {
    let board = TestBoard::new(Answer::Right);
    let challenges = ChallengeServer::start(&board).await;
    let pebble = Pebble::start(challenges.port).await;
    let config = acme_config(&pebble, Some("ops@example.test"));

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
    let (client, _) = AcmeClient::connect(&acme_config(&pebble, None), None).await.expect("account created");

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
    let (client, _) = AcmeClient::connect(&acme_config(&pebble, None), None).await.expect("account created");

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
    let config = acme_config(&pebble, None);
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

fn acme_config(pebble: &Pebble, contact_email: Option<&str>) -> AcmeConfig {
    AcmeConfig {
        directory_url: format!("https://127.0.0.1:{}/dir", pebble.acme_port),
        contact_email: contact_email.map(str::to_owned),
        trusted_roots_pem: Some(pebble.https_ca_pem.clone()),
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

//! The controllers' gRPC port speaks mutual TLS: the Raft service (and the cluster service's
//! forwarded writes) answer only a client that presents a controller identity signed by the
//! cluster's own CA. Each refusal is checked next to a positive control that sends the very same
//! request with a genuine controller certificate and reaches Raft.

use std::sync::Arc;
use std::time::Duration;

use deployer_common::pki::{generate_key_and_csr, ClusterCa, Identity};
use deployer_common::seal::ClusterKey;
use deployer_common::tls::{controller_client_config, ServerTrust};
use deployer_proto::cluster::cluster_client::ClusterClient;
use deployer_proto::cluster::ProposeRequest;
use deployer_proto::raft::raft_client::RaftClient;
use deployer_proto::raft::RaftRequest;
use deployer_tests::{grpc_channel, Cluster};
use serde_json::{json, Value};
use sqlx::Connection;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A one-node cluster and what an intruder (or a test) can get from its data dir.
struct Target {
    cluster: Cluster,
    /// The cluster CA certificate, so the client can verify the server.
    ca_pem: String,
    node_id: u64,
}

impl Target {
    async fn start() -> Target {
        deployer_common::tls::install_crypto_provider();
        let cluster = Cluster::start(1, &[]).await.expect("start a controller");
        let ca_pem = std::fs::read_to_string(cluster.nodes[0].dir.join("tls/ca.pem")).expect("read tls/ca.pem");
        let view = cluster.cluster_view(0).await.expect("cluster view");
        let node_id = view["nodes"][0]["id"].as_u64().expect("node id");
        Target { cluster, ca_pem, node_id }
    }

    fn addr(&self) -> String {
        self.cluster.nodes[0].grpc_addr()
    }

    /// The cluster CA with its private key, unsealed from the node's state database with the
    /// cluster key from its keyring: what a holder of a copied data dir would have.
    async fn cluster_ca(&self) -> ClusterCa {
        let dir = &self.cluster.nodes[0].dir;
        let key = ClusterKey::load(&dir.join("keyring")).expect("load keyring");
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("state.db")).read_only(true);
        let mut db = sqlx::SqliteConnection::connect_with(&options).await.expect("open state.db");
        let sealed: Vec<u8> = sqlx::query_scalar("SELECT ca_key_sealed FROM cluster WHERE id = 1")
            .fetch_one(&mut db)
            .await
            .expect("read the sealed CA key");
        db.close().await.expect("close state.db");
        let key_pem = String::from_utf8(key.open(&sealed, b"ca-key").expect("unseal the CA key")).expect("utf-8");
        ClusterCa::from_pem(&self.ca_pem, &key_pem).expect("load the cluster CA")
    }

    /// A client TLS configuration that trusts the cluster CA and presents `client`, if any.
    fn tls(&self, client: Option<&ClientCert>) -> Arc<rustls::ClientConfig> {
        controller_client_config(
            &ServerTrust::Ca(self.ca_pem.clone()),
            client.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
        )
        .expect("client TLS config")
    }

    /// A vote request from a past term: Raft answers it (refusing the vote) without any effect
    /// on the cluster.
    fn stale_vote(&self) -> RaftRequest {
        let payload = json!({
            "vote": { "leader_id": { "term": 0, "node_id": self.node_id }, "committed": false },
            "last_log_id": null,
        });
        RaftRequest { payload: serde_json::to_vec(&payload).expect("json") }
    }

    async fn vote(&self, client: Option<&ClientCert>) -> Result<Value, tonic::Status> {
        let channel = grpc_channel(&self.addr(), self.tls(client)).expect("channel");
        let reply = RaftClient::new(channel).vote(self.stale_vote()).await?.into_inner();
        Ok(serde_json::from_slice(&reply.payload).expect("the Raft reply is JSON"))
    }
}

struct ClientCert {
    cert_pem: String,
    key_pem: String,
}

fn issue(ca: &ClusterCa, identity: &Identity) -> ClientCert {
    let (key_pem, csr_pem) = generate_key_and_csr().expect("key and CSR");
    let cert_pem = ca.sign_csr(&csr_pem, identity, &[], DAY).expect("sign");
    ClientCert { cert_pem, key_pem }
}

/// The positive control: a controller certificate from the cluster CA is served, and the stale
/// vote gets Raft's own answer (a refused vote), so the refusals below are about identity only.
#[tokio::test(flavor = "multi_thread")]
async fn a_controller_certificate_from_the_cluster_ca_reaches_raft() {
    let target = Target::start().await;
    let ca = target.cluster_ca().await;
    let peer = issue(&ca, &Identity::Controller(target.node_id + 1));

    let answer = target.vote(Some(&peer)).await.expect("a genuine controller is served");

    assert_eq!(answer["Ok"]["vote_granted"], false, "Raft refuses a vote from a past term: {answer}");
    assert!(
        answer["Ok"]["vote"]["leader_id"]["term"].as_u64() >= Some(1),
        "Raft answers with its current vote: {answer}"
    );
}

/// No client certificate: the TLS layer lets the connection through (a joining node has none
/// yet), and the Raft service answers Unauthenticated.
#[tokio::test(flavor = "multi_thread")]
async fn raft_refuses_a_client_without_a_certificate() {
    let target = Target::start().await;

    let status = target.vote(None).await.expect_err("no certificate must be refused");

    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("client certificate"), "the refusal says why: {status:?}");
}

/// A controller certificate (even for the node's own id) from another CA: the server's TLS
/// verifier rejects it during the handshake and closes the connection with an alert, so no
/// request reaches any service. Through tonic that is a transport error (its code, Unknown,
/// Cancelled or Unavailable, depends on when the alert lands), never a service's answer; on a
/// raw TLS connection the alert itself is visible.
#[tokio::test(flavor = "multi_thread")]
async fn raft_refuses_a_certificate_from_another_ca() {
    let target = Target::start().await;
    let other_ca = ClusterCa::generate().expect("another CA");
    let impostor = issue(&other_ca, &Identity::Controller(target.node_id));

    let status = target.vote(Some(&impostor)).await.expect_err("a foreign CA must be refused");
    let from_transport = std::error::Error::source(&status).is_some_and(|e| e.is::<tonic::transport::Error>());
    assert!(from_transport, "the connection is dropped, not answered by a service: {status:?}");

    let alert = tls_alert(&target.addr(), target.tls(Some(&impostor))).await;
    // Both CAs have the same subject name, so the server's verifier finds the cluster CA as
    // issuer and the signature check fails: rustls sends DecryptError (UnknownCA or
    // BadCertificate for other foreign chains).
    assert!(
        ["DecryptError", "UnknownCA", "BadCertificate"]
            .iter()
            .any(|a| alert.contains(&format!("received fatal alert: {a}"))),
        "the server refuses the certificate with a TLS alert: {alert}"
    );
}

/// Completes a TLS handshake (from the client's side) and reads: the error the server's alert
/// produces, as text.
async fn tls_alert(addr: &str, config: Arc<rustls::ClientConfig>) -> String {
    use tokio::io::AsyncReadExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("controller").expect("name");
    let mut tls = match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return e.to_string(),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Ok(Ok(n)) => panic!("the server sent {n} bytes to a client with a foreign certificate"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("the server neither refused nor answered the foreign certificate"),
    }
}

/// A certificate from the cluster's own CA but with an agent identity: TLS accepts it, the Raft
/// service refuses it (PermissionDenied), and so does the cluster service, which would
/// otherwise let an agent commit commands: nothing is written.
#[tokio::test(flavor = "multi_thread")]
async fn raft_and_forwarded_writes_refuse_an_agent_identity() {
    let target = Target::start().await;
    let ca = target.cluster_ca().await;
    let agent = issue(&ca, &Identity::Agent("intruder".into()));

    let status = target.vote(Some(&agent)).await.expect_err("an agent must be refused by Raft");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("spiffe://deployer/agent/intruder") && status.message().contains("not a controller"),
        "the refusal names the identity: {status:?}"
    );

    let command = json!({"type": "create_project", "id": "p-intruder", "name": "intruder", "created_at": 0});
    let channel = grpc_channel(&target.addr(), target.tls(Some(&agent))).expect("channel");
    let status = ClusterClient::new(channel)
        .propose(ProposeRequest { command: serde_json::to_vec(&command).expect("json") })
        .await
        .expect_err("an agent must not propose commands");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(
        target.cluster.project_names(0).await.expect("list projects"),
        Vec::<String>::new(),
        "the refused command wrote nothing"
    );
}

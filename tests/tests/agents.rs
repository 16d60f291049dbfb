//! Agents as their operators see them: real `deployer-agent` processes join a real controller
//! cluster with a token, show up `ready` with metrics, follow the leader when it dies, go `down`
//! when killed and come back, stay out once revoked, and renew their certificates; every way
//! of knocking on the door without the right to is refused with a clear error.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use deployer_common::pki::{self, Identity};
use deployer_common::tls::{controller_client_config, ServerTrust};
use deployer_common::token::JoinToken;
use deployer_proto::agent::agent_client::AgentClient;
use deployer_proto::agent::agent_message::Body as AgentBody;
use deployer_proto::agent::{AgentMessage, Hello, JoinRequest};
use deployer_tests::{busybox_image, grpc_channel, wait_for, Agent, Cluster};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(30);

/// Short liveness settings, so that the tests see `down` quickly.
const FAST: &[&str] = &["--agent-ttl-s", "4", "--agent-disconnect-grace-s", "2"];

fn agent_id(agent: &Agent) -> String {
    let state: Value = serde_json::from_slice(&std::fs::read(agent.dir.join("agent.json")).expect("agent.json"))
        .expect("agent.json is JSON");
    state["agent_id"].as_str().expect("agent_id").to_string()
}

async fn agents(cluster: &Cluster, node: usize) -> Option<Vec<Value>> {
    let (status, body) = cluster.api.get(&format!("{}/api/v1/agents", cluster.nodes[node].url())).await.ok()?;
    (status == 200).then(|| body.as_array().cloned()).flatten()
}

/// Waits until node `node` lists agent `id` in a state that satisfies `want`, and returns it.
async fn wait_agent(cluster: &Cluster, node: usize, id: &str, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("agent {id} to be {what} on node {node}"), SETTLE, || async {
        agents(cluster, node).await?.into_iter().find(|a| a["id"] == id && want(a))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\ncontroller log:\n{}", cluster.nodes[node].log_text()))
}

fn is_ready_with_metrics(a: &Value) -> bool {
    a["status"] == "ready"
        && a["connected"] == true
        && a["metrics"]["memory_total_bytes"].as_u64().unwrap_or(0) > 0
        && a["metrics"]["disk_total_bytes"].as_u64().unwrap_or(0) > 0
}

fn start_agent(cluster: &Cluster, name: &str, controller: &str, token: Option<&str>, extra: &[&str]) -> Agent {
    let mut agent = Agent::new(cluster.root.join(name));
    let mut args = vec!["--controller".to_string(), format!("https://{controller}"), "--hostname".into(), name.into()];
    if let Some(token) = token {
        args.extend(["--token".to_string(), token.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    agent.start(&args).expect("start agent");
    agent
}

#[tokio::test]
async fn agents_join_report_follow_the_leader_go_down_and_stay_out_once_revoked() {
    let mut cluster = Cluster::start(3, FAST).await.expect("3-node cluster");
    let token = cluster.agent_token().await.expect("agent token");
    let leader = cluster.leader().await.expect("leader");
    let follower = (leader + 1) % 3;

    // Both dial a follower first: it redirects them to the leader.
    let via = cluster.nodes[follower].grpc_addr();
    let mut a = start_agent(&cluster, "host-a", &via, Some(&token), &["--labels", "zone=a,disk=ssd"]);
    let mut b = start_agent(&cluster, "host-b", &via, Some(&token), &["--labels", "zone=b"]);
    let (ida, idb) = (
        wait_for("agent a's identity", SETTLE, || async { a.dir.join("agent.json").exists().then(|| agent_id(&a)) })
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", a.log_text())),
        wait_for("agent b's identity", SETTLE, || async { b.dir.join("agent.json").exists().then(|| agent_id(&b)) })
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", b.log_text())),
    );
    assert_ne!(ida, idb, "two agents, two identities");

    // Every node lists both, ready, with what they told and non-zero metrics.
    for node in 0..3 {
        let listed = wait_agent(&cluster, node, &ida, "ready with metrics", is_ready_with_metrics).await;
        assert_eq!(listed["hostname"], "host-a");
        assert_eq!(listed["labels"]["zone"], "a");
        assert_eq!(listed["labels"]["disk"], "ssd");
        assert!(listed["capacity"]["cpu_millis"].as_u64().unwrap_or(0) >= 1000, "{listed}");
        assert!(listed["capacity"]["memory_bytes"].as_u64().unwrap_or(0) > 0, "{listed}");
        wait_agent(&cluster, node, &idb, "ready with metrics", is_ready_with_metrics).await;
    }
    // The key is private; the identity is the agent's own.
    let key_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(a.dir.join("tls/agent.key")).unwrap().permissions());
    assert_eq!(key_mode & 0o077, 0, "agent.key must be readable by its owner only");
    let cert = std::fs::read_to_string(a.dir.join("tls/agent.crt")).unwrap();
    let der = deployer_common::tls::certs_from_pem(&cert).unwrap();
    assert_eq!(pki::identity_of_cert_der(der[0].as_ref()).unwrap(), Identity::Agent(ida.clone()));

    // kill -9 of the leader: both agents find the new leader and stay ready.
    cluster.nodes[leader].kill9();
    let survivor = (0..3).find(|&i| i != leader).unwrap();
    let before = wait_agent(&cluster, survivor, &ida, "listed after the failover", |_| true).await;
    let last_seen_before = before["last_seen"].as_str().unwrap_or_default().to_string();
    for id in [&ida, &idb] {
        wait_agent(&cluster, survivor, id, "in session with the new leader", |v| {
            is_ready_with_metrics(v) && v["last_seen"].as_str().unwrap_or_default() > last_seen_before.as_str()
        })
        .await;
    }
    cluster.nodes[leader].start(&[]).expect("restart the old leader");

    // One agent killed goes down within the TTL; restarted (no token needed), it is ready again.
    a.kill9();
    let started = std::time::Instant::now();
    wait_agent(&cluster, survivor, &ida, "down", |v| v["status"] == "down").await;
    assert!(started.elapsed() < Duration::from_secs(4 + 2 + 10), "down within TTL (+ slack): {:?}", started.elapsed());
    let b_now = wait_agent(&cluster, survivor, &idb, "still listed", |_| true).await;
    assert_eq!(b_now["status"], "ready", "the other agent is unaffected");
    // It dials an address where nothing listens: the controllers it learned from its sessions
    // (kept in agent.json) get it back in.
    let mut a = start_agent(&cluster, "host-a", "127.0.0.1:1", None, &["--labels", "zone=a,disk=ssd"]);
    wait_agent(&cluster, survivor, &ida, "ready again", is_ready_with_metrics).await;
    // The leader keeps a short history of each agent's metrics.
    let (status, one) =
        cluster.api.get(&format!("{}/api/v1/agents/{ida}", cluster.nodes[survivor].url())).await.expect("show agent");
    assert_eq!(status, 200, "{one}");
    assert!(!one["history"].as_array().expect("history").is_empty(), "{one}");

    // Revoke b: its session ends at once, the process exits with a clear error, it is no longer
    // listed, and its old identity cannot come back.
    let b_copy = cluster.root.join("host-b-copy");
    copy_dir(&b.dir, &b_copy);
    let status =
        cluster.api.delete(&format!("{}/api/v1/agents/{idb}", cluster.nodes[survivor].url())).await.expect("revoke");
    assert_eq!(status, 204);
    let exit = b.wait_exit(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", b.log_text()));
    assert_eq!(exit.code(), Some(77), "a revoked agent exits with EX_NOPERM:\n{}", b.log_text());
    assert!(b.log_text().contains("revoked"), "{}", b.log_text());
    let listed = agents(&cluster, survivor).await.expect("list");
    assert!(listed.iter().all(|v| v["id"] != idb.as_str()), "a revoked agent is not listed: {listed:?}");
    let status = cluster
        .api
        .delete(&format!("{}/api/v1/agents/{idb}", cluster.nodes[survivor].url()))
        .await
        .expect("revoke again");
    assert_eq!(status, 404, "revoking twice: unknown agent");

    let mut ghost = Agent::new(b_copy);
    ghost.start(&["--controller".into(), format!("https://{via}")]).unwrap();
    let exit = ghost.wait_exit(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}\n{}", ghost.log_text()));
    assert_eq!(exit.code(), Some(77), "the revoked identity is refused:\n{}", ghost.log_text());
    assert!(ghost.log_text().contains("revoked"), "{}", ghost.log_text());

    // The remaining agent kept its session throughout.
    wait_agent(&cluster, survivor, &ida, "ready", is_ready_with_metrics).await;
    a.kill9();
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(status.success());
}

/// Runs an agent that must fail, and returns (exit code, its output).
fn refused_run(cluster: &Cluster, name: &str, args: &[String]) -> (Option<i32>, String) {
    let mut agent = Agent::new(cluster.root.join(name));
    agent.start(args).unwrap();
    let status = agent.wait_exit(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    (status.code(), agent.log_text())
}

#[tokio::test]
async fn wrong_tokens_foreign_cas_and_forged_requests_are_refused() {
    let cluster = Cluster::start(1, &[]).await.expect("cluster");
    let grpc = cluster.nodes[0].grpc_addr();
    let controller = format!("https://{grpc}");
    let good = cluster.agent_token().await.unwrap();
    let parsed = JoinToken::parse(&good).unwrap();
    let run = |token: String| vec!["--controller".to_string(), controller.clone(), "--token".to_string(), token];

    // A secret the cluster never issued.
    let unknown = format!("DPLY1.{}.{}", parsed.ca_fingerprint, "ab".repeat(32));
    let (code, log) = refused_run(&cluster, "unknown", &run(unknown));
    assert_eq!(code, Some(77), "{log}");
    assert!(log.contains("not known"), "{log}");

    // A controller token is not an agent token.
    let controller_token = cluster.join_token().await.unwrap();
    let (code, log) = refused_run(&cluster, "wrong-kind", &run(controller_token));
    assert_eq!(code, Some(77), "{log}");
    assert!(log.contains("not an agent token"), "{log}");

    // Revoked and expired tokens.
    let url = format!("{}/api/v1/cluster/tokens", cluster.nodes[0].url());
    let (status, created) = cluster.api.post(&url, &serde_json::json!({"kind": "agent"})).await.unwrap();
    assert_eq!(status, 201);
    let revoked_id = created["id"].as_str().unwrap();
    assert_eq!(cluster.api.delete(&format!("{url}/{revoked_id}")).await.unwrap(), 204);
    let (code, log) = refused_run(&cluster, "revoked-token", &run(created["token"].as_str().unwrap().into()));
    assert_eq!(code, Some(77), "{log}");
    assert!(log.contains("revoked"), "{log}");
    let (status, short) = cluster.api.post(&url, &serde_json::json!({"kind": "agent", "ttl_s": 1})).await.unwrap();
    assert_eq!(status, 201, "{short}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, log) = refused_run(&cluster, "expired-token", &run(short["token"].as_str().unwrap().into()));
    assert_eq!(code, Some(77), "{log}");
    assert!(log.contains("expired"), "{log}");

    // A token pinning another CA: the TLS handshake fails, so no CSR is ever sent.
    let foreign = format!("DPLY1.{}.{}", "cd".repeat(32), parsed.secret);
    let (code, log) = refused_run(&cluster, "foreign-ca", &run(foreign));
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains("fingerprint"), "the error names the pin mismatch: {log}");

    // Malformed token and no token at all on an empty data dir.
    let (code, log) = refused_run(&cluster, "malformed", &run("DPLY1.nope".into()));
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("invalid --token"), "{log}");
    let (code, log) = refused_run(&cluster, "no-token", &["--controller".to_string(), controller.clone()]);
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("--token"), "{log}");

    // No Docker engine: a clear error and EX_UNAVAILABLE, not a hang.
    let mut args = run(good.clone());
    args.extend(["--docker-host".to_string(), "unix:///nonexistent/docker.sock".to_string()]);
    let (code, log) = refused_run(&cluster, "no-docker", &args);
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains("cannot reach the Docker engine at unix:///nonexistent/docker.sock"), "{log}");

    // Nothing above registered an agent.
    assert_eq!(agents(&cluster, 0).await.unwrap(), Vec::<Value>::new());

    // A CSR asking for a controller identity gets an agent certificate all the same.
    deployer_common::tls::install_crypto_provider();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names =
        vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from("spiffe://deployer/controller/1").unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let tls = controller_client_config(&ServerTrust::Fingerprint(parsed.ca_fingerprint.clone()), None).unwrap();
    let mut client = AgentClient::new(grpc_channel(&grpc, tls).unwrap());
    let reply = client
        .join(JoinRequest {
            token_secret: parsed.secret.clone(),
            csr_pem: csr,
            hostname: "forger".into(),
            labels: Default::default(),
        })
        .await
        .expect("the join itself is allowed")
        .into_inner();
    let der = deployer_common::tls::certs_from_pem(&reply.cert_pem).unwrap();
    assert_eq!(pki::identity_of_cert_der(der[0].as_ref()).unwrap(), Identity::Agent(reply.agent_id.clone()));

    // That agent's certificate opens a session, but only a hello may come first, and an
    // oversized message ends the session, while the controller keeps serving.
    let agent_tls =
        controller_client_config(&ServerTrust::Ca(reply.ca_pem.clone()), Some((&reply.cert_pem, &key.serialize_pem())))
            .unwrap();
    let mut client = AgentClient::new(grpc_channel(&grpc, agent_tls.clone()).unwrap());
    let heartbeat_first = AgentMessage { body: Some(AgentBody::Heartbeat(Default::default())) };
    let mut stream = client.session(tokio_stream::iter([heartbeat_first])).await.expect("session opens").into_inner();
    let err = stream.message().await.expect_err("a session must start with a hello");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hello"), "{err:?}");

    let huge = AgentMessage {
        body: Some(AgentBody::Hello(Hello { hostname: "h".repeat(2 * 1024 * 1024), ..Default::default() })),
    };
    let mut client = AgentClient::new(grpc_channel(&grpc, agent_tls.clone()).unwrap());
    let refused = match client.session(tokio_stream::iter([huge])).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.expect_err("an oversized message is refused"),
    };
    assert!(
        matches!(
            refused.code(),
            tonic::Code::ResourceExhausted
                | tonic::Code::OutOfRange
                | tonic::Code::Internal
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        ),
        "{refused:?}"
    );

    // Bytes that are no protobuf at all end that session with an error, nothing more.
    let mut raw = tonic::client::Grpc::new(grpc_channel(&grpc, agent_tls.clone()).unwrap());
    raw.ready().await.unwrap();
    let garbage = tonic::Request::new(tokio_stream::iter([vec![0xff_u8; 64]]));
    let path = http::uri::PathAndQuery::from_static("/deployer.agent.v1.Agent/Session");
    let refused = match raw.streaming(garbage, path, RawCodec).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.expect_err("garbage is refused"),
    };
    assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}");
    assert!(refused.message().contains("decode"), "{refused:?}");

    // A session without any client certificate is refused.
    let tls = controller_client_config(&ServerTrust::Ca(reply.ca_pem.clone()), None).unwrap();
    let mut client = AgentClient::new(grpc_channel(&grpc, tls).unwrap());
    let hello = AgentMessage { body: Some(AgentBody::Hello(Hello { hostname: "x".into(), ..Default::default() })) };
    let err = client.session(tokio_stream::iter([hello])).await.expect_err("no certificate, no session");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // Through all of that the controller kept serving: a real agent joins and is ready.
    let mut agent = start_agent(&cluster, "real", &grpc, Some(&good), &[]);
    let id = wait_for("the real agent's identity", SETTLE, || async {
        agent.dir.join("agent.json").exists().then(|| agent_id(&agent))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    wait_agent(&cluster, 0, &id, "ready", is_ready_with_metrics).await;
    agent.kill9();
}

#[tokio::test]
async fn certificates_are_renewed_over_the_session_before_they_expire() {
    // Certificates live 6 s: renewed after 4 s, again and again.
    let cluster = Cluster::start(1, &["--agent-cert-ttl-s", "6"]).await.expect("cluster");
    let grpc = cluster.nodes[0].grpc_addr();
    let token = cluster.agent_token().await.unwrap();
    let mut agent = start_agent(&cluster, "renewing", &grpc, Some(&token), &["--heartbeat-ms", "500"]);
    let cert_path = agent.dir.join("tls/agent.crt");
    // agent.json is written last, once the whole identity is in place.
    let id = wait_for("the agent's identity", SETTLE, || async {
        agent.dir.join("agent.json").exists().then(|| agent_id(&agent))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    let first = pki::not_after_pem(&std::fs::read_to_string(&cert_path).unwrap()).unwrap();

    // Wait until well past the first certificate's expiry: it must have been replaced.
    let renewed = wait_for("a renewed certificate", SETTLE, || async {
        let c = std::fs::read_to_string(&cert_path).ok()?;
        let not_after = pki::not_after_pem(&c).ok()?;
        (not_after > first + time::Duration::seconds(4)).then_some(not_after)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    let key = std::fs::read_to_string(agent.dir.join("tls/agent.key")).unwrap();
    let cert = std::fs::read_to_string(&cert_path).unwrap();
    let der = deployer_common::tls::certs_from_pem(&cert).unwrap();
    assert_eq!(pki::identity_of_cert_der(der[0].as_ref()).unwrap(), Identity::Agent(id.clone()));
    assert!(!key.is_empty());
    while time::OffsetDateTime::now_utc() < first + time::Duration::seconds(1) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first certificate has expired; the agent is still ready...
    wait_agent(&cluster, 0, &id, "ready", is_ready_with_metrics).await;
    // ...and a restart connects with the renewed one (the old one would be refused).
    agent.kill9();
    let mut agent = start_agent(&cluster, "renewing", &grpc, None, &["--heartbeat-ms", "500"]);
    let restarted_at = time::OffsetDateTime::now_utc();
    wait_agent(&cluster, 0, &id, "back after a restart", |v| {
        is_ready_with_metrics(v)
            && v["last_seen"]
                .as_str()
                .and_then(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
                .is_some_and(|t| t > restarted_at)
    })
    .await;
    assert!(renewed > first);
    assert!(agent.log_text().contains("installed a renewed certificate"), "{}", agent.log_text());
    agent.kill9();
}

#[tokio::test]
async fn managed_containers_report_their_usage_and_others_are_left_alone() {
    let image = busybox_image().expect("busybox image");
    let cluster = Cluster::start(1, &[]).await.expect("cluster");
    let grpc = cluster.nodes[0].grpc_addr();
    let token = cluster.agent_token().await.unwrap();
    let mut agent = start_agent(&cluster, "docker-host", &grpc, Some(&token), &[]);
    let id = wait_for("the agent's identity", SETTLE, || async {
        agent.dir.join("agent.json").exists().then(|| agent_id(&agent))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));

    let name = format!("deployer-test-{}", &id[id.len() - 12..]);
    let foreign = format!("{name}-foreign");
    let run = |name: &str, labels: &[String]| {
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d", "--rm", "--name", name]);
        for l in labels {
            cmd.args(["--label", l]);
        }
        let out = cmd.args([image.as_str(), "sleep", "120"]).output().expect("docker run");
        assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(
        &name,
        &[
            "deployer.managed=true".into(),
            format!("deployer.agent={id}"),
            "deployer.project=shop".into(),
            "deployer.service=web".into(),
        ],
    );
    // Managed, but by another agent: not ours to report.
    run(&foreign, &["deployer.managed=true".into(), "deployer.agent=someone-else".into()]);
    let cleanup = || {
        let _ = Command::new("docker").args(["rm", "-f", &name, &foreign]).output();
    };

    let listed = wait_agent(&cluster, 0, &id, "reporting its container", |v| {
        v["containers"].as_array().is_some_and(|c| c.iter().any(|c| c["name"] == name.as_str()))
    })
    .await;
    let containers = listed["containers"].as_array().unwrap();
    cleanup();
    assert_eq!(containers.len(), 1, "only this agent's container: {containers:?}");
    let c = &containers[0];
    assert_eq!(c["project"], "shop");
    assert_eq!(c["service"], "web");
    assert!(c["memory_used_bytes"].as_u64().unwrap_or(0) > 0, "{c}");
    assert!(c["cpu_percent"].as_f64().is_some(), "{c}");
    agent.kill9();
}

#[tokio::test]
async fn dev_mode_runs_a_local_agent() {
    let dir = tempfile::tempdir().unwrap();
    let http = deployer_tests::free_port();
    let grpc = deployer_tests::free_port();
    let log = dir.path().join("dev.log");
    let mut child = Command::new(deployer_tests::binary("deployer-controller"))
        .args(["dev", "--http", &format!("127.0.0.1:{http}"), "--grpc", &format!("127.0.0.1:{grpc}")])
        .current_dir(dir.path())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("dev.err")).unwrap())
        .spawn()
        .unwrap();
    let token_path = dir.path().join(".deployer/admin-token");
    let token = wait_for("the admin token", SETTLE, || async {
        std::fs::read_to_string(&token_path).ok().map(|t| t.trim().to_string())
    })
    .await
    .unwrap();
    let api = deployer_tests::Api::new(&token);
    let listed = wait_for("the in-process agent to be ready", SETTLE, || async {
        let (status, body) = api.get(&format!("http://127.0.0.1:{http}/api/v1/agents")).await.ok()?;
        let agents = body.as_array()?.clone();
        (status == 200 && agents.len() == 1 && is_ready_with_metrics(&agents[0])).then_some(agents)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", std::fs::read_to_string(dir.path().join("dev.err")).unwrap_or_default()));
    assert!(dir.path().join(".deployer/agent/tls/agent.crt").exists());
    assert_eq!(listed.len(), 1);
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "dev mode stops cleanly on SIGTERM: {status:?}");

    // Without a Docker engine, dev mode says so and exits with EX_UNAVAILABLE.
    let out = Command::new(deployer_tests::binary("deployer-controller"))
        .args(["dev", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--docker-host", "unix:///nonexistent.sock"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-agent"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Sends and receives raw bytes as gRPC messages: a client that speaks no protobuf.
struct RawCodec;

struct RawCoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }

    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl tonic::codec::Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

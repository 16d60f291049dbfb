//! The deploy path as a user sees it, against the real Docker engine: a git repository served
//! by `git daemon` on loopback (or a tarball upload) becomes a running, hardened container that
//! answers HTTP; failures say why and leave the previous release serving; logs and events
//! arrive over the WebSockets in order; an agent or a leader killed mid-deployment loses
//! nothing and runs nothing twice.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use deployer_tests::deploy::*;
use deployer_tests::{busybox_image, free_port, wait_for};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn ws_connect(
    url: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("websocket");
    socket
}

/// Every JSON message of a WebSocket until the server closes it (or `timeout`), and the close code.
async fn ws_read_all(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    timeout: Duration,
    mut stop: impl FnMut(&Value) -> bool,
) -> (Vec<Value>, Option<u16>) {
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next()).await;
        match next {
            Err(_) => return (messages, None),
            Ok(None) => return (messages, None),
            Ok(Some(Err(e))) => panic!("websocket error: {e}"),
            Ok(Some(Ok(Message::Text(text)))) => {
                let value: Value = serde_json::from_str(&text).expect("JSON message");
                let done = stop(&value);
                messages.push(value);
                if done {
                    return (messages, None);
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => return (messages, frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn container_of(deployment: &str) -> String {
    let out = docker(&["ps", "-q", "--filter", &format!("label=deployer.deployment={deployment}")]);
    let ids: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(ids.len(), 1, "one container for deployment {deployment}: {out}");
    ids[0].to_string()
}

#[tokio::test]
async fn a_git_service_deploys_hardened_and_failures_leave_it_serving() {
    let setup = Setup::start(1, 1, &[]).await;
    let repos = setup.cluster.root.join("repos");
    let repo = repos.join("app");
    make_repo(&repo, &setup.base, "hello from v1\n");
    let daemon = GitDaemon::start(&repos).await;
    let secret = "s3cr3t-deploy-value-41";
    let service = setup
        .create_service(json!({
            "name": "web",
            "source": {"git": {"url": daemon.url("app"), "branch": "main"}},
            "port": 8080,
            "env": {"GREETING": "hi"},
            "secrets": {"API_KEY": secret},
            "health_check": {"path": "/", "timeout_s": 5},
        }))
        .await;
    let token = setup.cluster.api.token.clone();

    // Events of the project, from before the deployment is asked for.
    let mut events =
        ws_connect(&setup.ws_url(&format!("/api/v1/ws/projects/{}/deployments", setup.project_id)), &token).await;

    let first = setup.deploy(&service, json!({})).await;
    let id = first["id"].as_str().unwrap().to_string();
    let done = setup.finished(&id).await;
    assert_eq!(done["status"], "running", "{done}\n{}", setup.diagnostics());
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["commit"].as_str().unwrap().len(), 40, "{done}");
    assert_eq!(done["image"], format!("deployer/{}/web:{id}", setup.project));
    let url = done["url"].as_str().expect("url").to_string();
    assert_eq!(page(&url).await, "hello from v1\n");

    // Every hardening default, as Docker reports it.
    let container = container_of(&id);
    let inspect: Value = serde_json::from_str(&docker(&["inspect", &container])).unwrap();
    let c = &inspect[0];
    assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true);
    assert_eq!(c["HostConfig"]["CapDrop"], json!(["ALL"]));
    assert!(c["HostConfig"]["SecurityOpt"].to_string().contains("no-new-privileges"), "{}", c["HostConfig"]);
    assert_eq!(c["Config"]["User"], "65534:65534");
    assert_eq!(c["HostConfig"]["Memory"], 512 << 20);
    assert_eq!(c["HostConfig"]["NanoCpus"], 500_000_000);
    assert_eq!(c["HostConfig"]["PidsLimit"], 256);
    assert!(c["HostConfig"]["Tmpfs"]["/tmp"].is_string(), "{}", c["HostConfig"]);
    assert_eq!(c["Config"]["Labels"]["deployer.managed"], "true");
    assert_eq!(c["Config"]["Labels"]["deployer.deployment"], id);
    assert_eq!(c["Config"]["Labels"]["deployer.project"], setup.project_id);
    assert!(c["NetworkSettings"]["Networks"][format!("deployer-{}", setup.project_id)].is_object());
    let env = c["Config"]["Env"].to_string();
    assert!(env.contains("GREETING=hi") && env.contains(&format!("API_KEY={secret}")), "{env}");

    // The log lines, in order, over the WebSocket (the deployment has ended: all of them, then a
    // normal close), the same as the API's.
    let mut socket = ws_connect(&setup.ws_url(&format!("/api/v1/ws/deployments/{id}/logs")), &token).await;
    let (lines, close) = ws_read_all(&mut socket, Duration::from_secs(10), |_| false).await;
    assert_eq!(close, Some(1000));
    let stored = setup.logs(&id).await;
    assert_eq!(lines.len(), stored.len());
    for (live, kept) in lines.iter().zip(&stored) {
        assert_eq!(live["message"], kept["message"]);
        for key in ["level", "message", "timestamp", "phase", "step"] {
            assert!(live.get(key).is_some(), "{key} in {live}");
        }
    }
    let messages: Vec<&str> = stored.iter().map(|l| l["message"].as_str().unwrap()).collect();
    let position = |needle: &str| {
        messages.iter().position(|m| m.contains(needle)).unwrap_or_else(|| panic!("{needle:?} in {messages:#?}"))
    };
    assert!(position("scheduled on agent") < position("cloning"));
    assert!(position("cloning") < position("Step 1/"));
    assert!(position("Step 1/") < position("is healthy"));
    assert!(position("is healthy") < position("deployment running"));
    assert!(!messages.iter().any(|m| m.contains(secret)), "the secret is in the logs");
    for node in &setup.cluster.nodes {
        assert!(!node.log_text().contains(secret), "the secret is in the controller's log");
    }
    for agent in &setup.agents {
        assert!(!agent.log_text().contains(secret), "the secret is in the agent's log");
    }

    // The project's events: started, then progress, then completed, for this deployment.
    let (seen, _) = ws_read_all(&mut events, Duration::from_secs(10), |e| e["type"] == "deployment.completed").await;
    let kinds: Vec<&str> =
        seen.iter().filter(|e| e["deploymentId"] == id.as_str()).map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"deployment.started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"deployment.completed"), "{kinds:?}");
    assert!(kinds.contains(&"deployment.progress"), "{kinds:?}");
    let streamed_lines: usize = seen
        .iter()
        .filter(|e| e["deploymentId"] == id.as_str())
        .map(|e| e["data"]["logs"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(streamed_lines, stored.len(), "every line once in the project's events");
    let _ = events.send(Message::Close(None)).await;

    // A build that fails: the deployment fails with the step, v1 keeps serving.
    write_app(&repo, &setup.base, "v2\n", "RUN /bin/false\n");
    commit(&repo, "broken build");
    let broken = setup.deploy(&service, json!({})).await;
    let broken = setup.finished(broken["id"].as_str().unwrap()).await;
    assert_eq!(broken["status"], "failed", "{broken}");
    assert!(broken["error"].as_str().unwrap().contains("RUN /bin/false"), "{broken}");
    assert_eq!(broken["attempt"], 1, "a build error is not retried: {broken}");
    assert_eq!(page(&url).await, "hello from v1\n");

    // An app that never answers its health check: failed with the reason, v1 keeps serving.
    std::fs::write(
        repo.join("Dockerfile"),
        format!("FROM {}\nCMD [\"/bin/busybox\", \"sleep\", \"3600\"]\n", setup.base),
    )
    .unwrap();
    commit(&repo, "never healthy");
    let silent = setup.deploy(&service, json!({})).await;
    let silent_id = silent["id"].as_str().unwrap().to_string();
    let silent = setup.finished(&silent_id).await;
    assert_eq!(silent["status"], "failed", "{silent}");
    assert!(silent["error"].as_str().unwrap().contains("no healthy answer"), "{silent}");
    assert_eq!(page(&url).await, "hello from v1\n");
    assert_eq!(docker(&["ps", "-q", "--filter", &format!("label=deployer.deployment={silent_id}")]).trim(), "");

    // A branch that does not exist.
    let nope = setup.deploy(&service, json!({"ref": "nope"})).await;
    let nope = setup.finished(nope["id"].as_str().unwrap()).await;
    assert_eq!(nope["status"], "failed");
    assert!(nope["error"].as_str().unwrap().contains("nope"), "{nope}");

    // A good v2 replaces v1: v1's container stops, v1 is superseded.
    write_app(&repo, &setup.base, "hello from v2\n", "");
    commit(&repo, "v2");
    let second = setup.deploy(&service, json!({"ref": "main"})).await;
    let second = setup.finished(second["id"].as_str().unwrap()).await;
    assert_eq!(second["status"], "running", "{second}");
    assert_eq!(page(second["url"].as_str().unwrap()).await, "hello from v2\n");
    assert_eq!(setup.deployment(&id).await.unwrap()["status"], "superseded");
    // v1 stops once v2 answers (after its grace to finish its requests).
    wait_for("v1's container to stop", Duration::from_secs(20), || async {
        docker(&["ps", "-q", "--filter", &format!("label=deployer.deployment={id}")]).trim().is_empty().then_some(())
    })
    .await
    .unwrap();

    // Rollback: v1's image runs again, without a build, on the agent that built it.
    let rollback_url = format!("{}/api/v1/projects/{}/services/{service}/rollback", setup.url(), setup.project_id);
    let (status, back) = setup.cluster.api.post(&rollback_url, &json!({})).await.unwrap();
    assert_eq!(status, 201, "{back}");
    assert_eq!(back["source"], "rollback");
    assert_eq!(back["ref"], id.as_str(), "the default target is the release before the current one");
    let back = setup.finished(back["id"].as_str().unwrap()).await;
    assert_eq!(back["status"], "running", "{back}\n{}", setup.diagnostics());
    assert_eq!(back["image"], done["image"]);
    assert_eq!(page(back["url"].as_str().unwrap()).await, "hello from v1\n");
    let rollback_logs = setup.logs(back["id"].as_str().unwrap()).await;
    assert!(!rollback_logs.iter().any(|l| l["phase"] == "build"), "no build: {rollback_logs:#?}");
    // Forward again, naming the release; and targets that cannot be run again.
    let second_id = second["id"].as_str().unwrap();
    let (status, forward) = setup.cluster.api.post(&rollback_url, &json!({"deployment_id": second_id})).await.unwrap();
    assert_eq!(status, 201, "{forward}");
    let forward = setup.finished(forward["id"].as_str().unwrap()).await;
    assert_eq!(page(forward["url"].as_str().unwrap()).await, "hello from v2\n");
    let (status, body) = setup.cluster.api.post(&rollback_url, &json!({"deployment_id": silent_id})).await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("never ran healthy"), "{body}");
    let (status, body) = setup.cluster.api.post(&rollback_url, &json!({"deployment_id": "nope"})).await.unwrap();
    assert_eq!(status, 422, "{body}");

    // An app that crashes once it runs: Docker restarts it, and the crash is in its log.
    std::fs::write(
        repo.join("Dockerfile"),
        format!(
            "FROM {}\nCOPY index.html /www/index.html\nCMD [\"/bin/sh\", \"-c\", \
             \"/bin/busybox httpd -f -p 8080 -h /www & /bin/busybox sleep 3; exit 3\"]\n",
            setup.base
        ),
    )
    .unwrap();
    commit(&repo, "crashes");
    let crashing = setup.deploy(&service, json!({})).await;
    let crashing_id = crashing["id"].as_str().unwrap().to_string();
    let crashing = setup.finished(&crashing_id).await;
    assert_eq!(crashing["status"], "running", "{crashing}");
    let crashed = wait_for("the crash in the deployment's log", Duration::from_secs(30), || async {
        let logs = setup.logs(&crashing_id).await;
        logs.iter()
            .any(|l| {
                let m = l["message"].as_str().unwrap_or("");
                m.contains("exited with code 3") && m.contains("restarts it") && l["level"] == "warn"
            })
            .then_some(())
    })
    .await;
    if let Err(e) = crashed {
        panic!("{e:#}\n{:#?}", setup.logs(&crashing_id).await);
    }

    // The listing: newest first.
    let list_url = format!("{}/api/v1/projects/{}/services/{service}/deployments", setup.url(), setup.project_id);
    let (status, list) = setup.cluster.api.get(&list_url).await.unwrap();
    assert_eq!(status, 200);
    let statuses: Vec<&str> = list.as_array().unwrap().iter().map(|d| d["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["running", "superseded", "superseded", "superseded", "failed", "failed", "failed", "superseded"]
    );
}

/// A `.tar.gz` with the symlinks `links` (path, target) first, then the files `entries`.
fn tarball(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, target) in links {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_link_name(target).unwrap();
        header.set_mode(0o777);
        let name = &mut header.as_gnu_mut().unwrap().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        builder.append(&header, &[][..]).unwrap();
    }
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // Written raw: the builder refuses `..` and absolute paths, which these tests need.
        let name = &mut header.as_gnu_mut().unwrap().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[tokio::test]
async fn uploads_deploy_and_hostile_tarballs_fail_without_writing_outside() {
    let setup = Setup::start(1, 1, &["--max-upload-bytes", "1000000"]).await;
    let service = setup
        .create_service(json!({"name": "up", "source": {"upload": {}}, "port": 8080, "health_check": {"timeout_s": 5}}))
        .await;
    let upload_url = format!("{}/api/v1/projects/{}/services/{service}/upload", setup.url(), setup.project_id);
    let api = &setup.cluster.api;
    let upload_url = &upload_url;
    let upload = |body: Vec<u8>| async move {
        let r = api
            .client
            .post(upload_url)
            .bearer_auth(&api.token)
            .header("content-type", "application/gzip")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let dockerfile = format!(
        "FROM {}\nCOPY index.html /www/index.html\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
        setup.base
    );

    // A good tarball runs.
    let (status, body) =
        upload(tarball(&[("Dockerfile", dockerfile.as_bytes()), ("index.html", b"uploaded\n")], &[])).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["source"], "upload");
    let done = setup.finished(body["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "running", "{done}\n{}", setup.diagnostics());
    assert_eq!(page(done["url"].as_str().unwrap()).await, "uploaded\n");

    // Refused at the door: not gzip, too large, and deploy on an upload service.
    let (status, body) = upload(b"this is not a tarball at all".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("gzip"), "{body}");
    let (status, body) = upload(vec![0x1f; 1_100_000]).await;
    assert_eq!(status, 413, "{body}");
    let deploy_url = format!("{}/api/v1/projects/{}/services/{service}/deploy", setup.url(), setup.project_id);
    let (status, body) = api.post(&deploy_url, &json!({})).await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("upload"), "{body}");

    // Hostile tarballs: each deployment fails naming the cause; nothing lands outside its dir.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dot-dot", tarball(&[("Dockerfile", dockerfile.as_bytes()), ("../escaped", b"x")], &[]), "escaped"),
        ("absolute", tarball(&[("/tmp/deployer-absolute-escape", b"x")], &[]), "deployer-absolute-escape"),
        ("link out", tarball(&[("Dockerfile", dockerfile.as_bytes())], &[("evil", "/etc")]), "evil"),
        ("through a link", tarball(&[("a/x", b"x")], &[("a", "..")]), "a"),
    ];
    for (case, body, needle) in cases {
        let (status, answer) = upload(body).await;
        assert_eq!(status, 201, "{case}: {answer}");
        let d = setup.finished(answer["id"].as_str().unwrap()).await;
        assert_eq!(d["status"], "failed", "{case}: {d}");
        let error = d["error"].as_str().unwrap();
        assert!(error.contains(needle), "{case}: {error}");
        assert_eq!(d["attempt"], 1, "{case}: a hostile tarball is not retried");
    }
    assert!(!Path::new("/tmp/deployer-absolute-escape").exists());
    let sources = setup.storage(0).join("sources");
    assert!(!sources.join("escaped").exists() && !setup.storage(0).join("escaped").exists());
    for entry in std::fs::read_dir(&sources).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(name.len() >= 36, "only deployment directories and their markers in sources/: {name}");
    }
    // The agent is healthy, and the good release still serves.
    let (_, agents) = api.get(&format!("{}/api/v1/agents", setup.url())).await.unwrap();
    assert_eq!(agents[0]["status"], "ready");
    assert_eq!(page(done["url"].as_str().unwrap()).await, "uploaded\n");
}

#[tokio::test]
async fn bad_deploy_requests_are_refused_with_reasons() {
    let setup = Setup::start(1, 0, &[]).await;
    let api = &setup.cluster.api;
    let base = format!("{}/api/v1/projects/{}/services", setup.url(), setup.project_id);
    for (url, why) in [
        ("ssh://git@example.com/repo.git", "ssh"),
        ("git@example.com:repo.git", "git URL"),
        ("ftp://example.com/repo.git", "git URL"),
        ("https://user:pass@example.com/repo.git", "GIT_PASSWORD"),
    ] {
        let (status, body) = api.post(&base, &json!({"name": "x", "source": {"git": {"url": url}}})).await.unwrap();
        assert_eq!(status, 422, "{url}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(why), "{url}: {body}");
    }
    let service =
        setup.create_service(json!({"name": "web", "source": {"git": {"url": "https://example.com/x.git"}}})).await;
    let deploy = format!("{base}/{service}/deploy");
    let (status, body) =
        api.post(&format!("{base}/00000000-0000-0000-0000-000000000000/deploy"), &json!({})).await.unwrap();
    assert_eq!(status, 404, "{body}");
    let (status, body) = api.post(&deploy, &json!({"ref": "bad ref"})).await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("ref"), "{body}");
    let (status, body) = api.post(&deploy, &json!({"reff": "main"})).await.unwrap();
    assert_eq!(status, 422, "{body}");
    let r = api
        .client
        .post(&deploy)
        .bearer_auth(&api.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (status, _) = api.get(&format!("{}/api/v1/deployments/nope", setup.url())).await.unwrap();
    assert_eq!(status, 404);
    // No agent: the deployment fails with the scheduler's reason instead of waiting forever.
    let d = setup.deploy(&service, json!({})).await;
    let d = setup.finished(d["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "failed");
    assert!(d["error"].as_str().unwrap().contains("cannot schedule"), "{d}");
}

/// A Dockerfile whose build takes a few seconds, so a test can act while it runs.

#[tokio::test]
async fn an_agent_killed_mid_build_hands_the_deployment_to_another() {
    let mut setup = Setup::start(1, 2, FAST).await;
    let service = setup.slow_service("slow", 8).await;
    let id = setup.deploy(&service, json!({})).await["id"].as_str().unwrap().to_string();
    let (first_agent, index) = setup.building(&id).await;
    setup.agents[index].kill9();

    let done = setup.finished(&id).await;
    assert_eq!(done["status"], "running", "{done}\n{}", setup.diagnostics());
    assert_eq!(done["attempt"], 2, "{done}");
    assert_ne!(done["agent_id"], first_agent.as_str());
    assert_eq!(page(done["url"].as_str().unwrap()).await, "slow but sure\n");
    let logs = setup.logs(&id).await;
    assert!(logs.iter().any(|l| l["message"].as_str().unwrap().contains("went down")), "{logs:#?}");
}

#[tokio::test]
async fn a_deployment_survives_its_leader_being_killed_and_runs_once() {
    let mut setup = Setup::start(3, 1, &[]).await;
    let service = setup.slow_service("web", 6).await;
    let id = setup.deploy(&service, json!({})).await["id"].as_str().unwrap().to_string();
    setup.building(&id).await;
    let leader = setup.cluster.leader().await.unwrap();
    // A follower that stays up streams the log too, from its own copy of the state.
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let follower_ws = format!(
        "{}/api/v1/ws/deployments/{id}/logs",
        setup.cluster.nodes[follower].url().replacen("http://", "ws://", 1)
    );
    let mut socket = ws_connect(&follower_ws, &setup.cluster.api.token).await;
    setup.cluster.nodes[leader].kill9();
    let (streamed, close) = ws_read_all(&mut socket, DEPLOY_TIMEOUT, |_| false).await;
    assert_eq!(close, Some(1000), "the stream ends with the deployment");

    let done = setup.finished(&id).await;
    assert_eq!(done["status"], "running", "{done}\n{}", setup.diagnostics());
    assert_eq!(done["attempt"], 1, "the same attempt finished: {done}");
    container_of(&id);
    // Every line once: a line sent again after the leader change is kept once.
    let logs = setup.logs(&id).await;
    let mut steps: Vec<&str> =
        logs.iter().map(|l| l["message"].as_str().unwrap()).filter(|m| m.starts_with("Step ")).collect();
    let total = steps.len();
    steps.dedup();
    assert_eq!(steps.len(), total, "{logs:#?}");
    assert!(total >= 3, "{logs:#?}");
    let streamed: Vec<&str> = streamed.iter().map(|l| l["message"].as_str().unwrap()).collect();
    let stored: Vec<&str> = logs.iter().map(|l| l["message"].as_str().unwrap()).collect();
    assert_eq!(streamed, stored, "the follower streamed every line once, in order");
    assert_eq!(page(done["url"].as_str().unwrap()).await, "slow but sure\n");
}

#[tokio::test]
async fn the_queue_runs_in_order_within_its_limit_and_one_release_per_service_at_a_time() {
    let setup = Setup::start(1, 1, &["--max-concurrent-deployments", "1"]).await;
    let services = [setup.slow_service("first", 3).await, setup.slow_service("second", 3).await];
    let a = setup.deploy(&services[0], json!({})).await["id"].as_str().unwrap().to_string();
    let b = setup.deploy(&services[1], json!({})).await["id"].as_str().unwrap().to_string();
    // While the first builds, the other waits: the limit is one at a time.
    wait_for("the first deployment to build", Duration::from_secs(30), || async {
        (setup.deployment(&a).await?["status"] == "building").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(setup.deployment(&b).await.unwrap()["status"], "queued");
    // Two more of the first service (asked for once the first is under way, or they would
    // replace it while it waits too): the newer replaces the older while both wait.
    let a2 = setup.deploy(&services[0], json!({})).await["id"].as_str().unwrap().to_string();
    let a3 = setup.deploy(&services[0], json!({})).await["id"].as_str().unwrap().to_string();
    assert_eq!(setup.deployment(&a2).await.unwrap()["status"], "superseded");
    let done_a = setup.finished(&a).await;
    let done_b = setup.finished(&b).await;
    let done_a3 = setup.finished(&a3).await;
    for d in [&done_a, &done_b, &done_a3] {
        assert_eq!(d["status"], "running", "{d}\n{}", setup.diagnostics());
    }
    // In order: each started after the one before it ended.
    let at = |d: &Value, key: &str| d[key].as_str().unwrap().to_string();
    assert!(at(&done_b, "started_at") >= at(&done_a, "finished_at"), "{done_a}\n{done_b}");
    assert!(at(&done_a3, "started_at") >= at(&done_b, "finished_at"), "{done_b}\n{done_a3}");
    assert_eq!(setup.deployment(&a).await.unwrap()["status"], "superseded");
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff_then_fail() {
    let setup = Setup::start(1, 1, &["--deploy-retry-base-s", "1"]).await;
    // Nothing listens on port 1: the clone fails the way a network outage does.
    let service =
        setup.create_service(json!({"name": "flaky", "source": {"git": {"url": "git://127.0.0.1:1/app.git"}}})).await;
    let d = setup.deploy(&service, json!({})).await;
    let id = d["id"].as_str().unwrap().to_string();
    let done = setup.finished(&id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["attempt"], 4, "the first attempt and 3 retries: {done}");
    let messages: Vec<String> =
        setup.logs(&id).await.iter().map(|l| l["message"].as_str().unwrap().to_string()).collect();
    for wait in [1, 2, 4] {
        assert!(messages.iter().any(|m| m.contains(&format!("retrying in {wait} s"))), "{messages:#?}");
    }
}

/// Dev mode and everything it runs, stopped and removed when dropped.
struct DevMode {
    dev: Child,
    dir: tempfile::TempDir,
    project: String,
    url: String,
    token: String,
}

impl DevMode {
    /// Runs `deployer ARGS` against dev mode, from the repository root: (success, stdout, stderr).
    async fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let (url, token) = (self.url.clone(), self.token.clone());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(deployer_tests::binary("deployer"))
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
                .args(&args)
                .env("DEPLOYER_URL", url)
                .env("DEPLOYER_TOKEN", token)
                .env("DEPLOYER_CONFIG", "/nonexistent/deployer-config.json")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dev.log")).unwrap_or_default()
    }
}

impl Drop for DevMode {
    fn drop(&mut self) {
        let _ = self.dev.kill();
        let _ = self.dev.wait();
        let agent: Value = std::fs::read(self.dir.path().join("state/agent/agent.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if let Some(id) = agent["agent_id"].as_str() {
            let filter = format!("label=deployer.agent={id}");
            for c in docker(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
                docker(&["rm", "-f", c]);
            }
            for n in docker(&["network", "ls", "-q", "--filter", &filter]).split_whitespace() {
                docker(&["network", "rm", n]);
            }
        }
        let images = docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
        for image in images.lines().filter(|i| i.starts_with(&format!("deployer/{}/", self.project))) {
            docker(&["rmi", "-f", image]);
        }
    }
}

/// Where `deployer` said a deployment runs.
fn running_at(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.split("is running at ").nth(1))
        .unwrap_or_else(|| panic!("where it answers: {stdout}"))
        .trim()
        .to_string()
}

/// The README's first command, the example, and the CLI's deploy commands as people run them.
#[tokio::test]
async fn dev_mode_deploys_the_example_with_one_command_and_the_cli_follows() {
    busybox_image().expect("busybox-static");
    let dir = tempfile::Builder::new().prefix("deployer-dev-").tempdir().unwrap();
    let (http, grpc) = (free_port(), free_port());
    let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
    let dev = Command::new(deployer_tests::binary("deployer-controller"))
        .args(["dev", "--data-dir"])
        .arg(dir.path().join("state"))
        .args(["--http", &format!("127.0.0.1:{http}"), "--grpc", &format!("127.0.0.1:{grpc}")])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // Its own project name, so that nothing here meets a developer's own dev mode on this engine.
    let mut mode = DevMode {
        dev,
        dir,
        project: format!("t{}", &uuid_like()[..12]),
        url: format!("http://127.0.0.1:{http}"),
        token: String::new(),
    };
    let token_path = mode.dir.path().join("state").join("admin-token");
    mode.token = wait_for("dev mode's admin token", Duration::from_secs(30), || {
        let t = std::fs::read_to_string(&token_path).ok();
        async move { t }
    })
    .await
    .unwrap()
    .trim()
    .to_string();
    let project = mode.project.clone();

    // One command: project, service, upload, build, run; it prints where the page answers.
    let (ok, stdout, stderr) = mode.cli(&["up", "examples/hello", "--project", &project]).await;
    assert!(ok, "deployer up failed:\n{stdout}\n{stderr}\n{}", mode.log());
    assert!(stdout.contains("Step 1/"), "the build streams: {stdout}");
    assert!(page(&running_at(&stdout)).await.contains("Hello from Deployer"));

    let (_, projects, _) = mode.cli(&["-o", "json", "projects", "list"]).await;
    let projects: Value = serde_json::from_str(&projects).unwrap();
    let pid = projects.as_array().unwrap().iter().find(|p| p["name"] == project.as_str()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, services, _) = mode.cli(&["-o", "json", "services", "list", &pid]).await;
    let services: Value = serde_json::from_str(&services).unwrap();
    let sid = services[0]["id"].as_str().unwrap().to_string();

    // Nothing to roll back to yet: a clear error and a failing exit status.
    let (ok, _, stderr) = mode.cli(&["rollback", &pid, &sid]).await;
    assert!(!ok && stderr.contains("no earlier deployment"), "{stderr}");
    // A second release, then back to the first: followed to the end, exit 0, where it answers.
    let (ok, stdout, stderr) = mode.cli(&["deploy", &pid, &sid, "--upload", "examples/hello"]).await;
    assert!(ok, "{stdout}\n{stderr}");
    running_at(&stdout);
    let (ok, stdout, stderr) = mode.cli(&["rollback", &pid, &sid]).await;
    assert!(ok, "{stdout}\n{stderr}");
    assert!(page(&running_at(&stdout)).await.contains("Hello from Deployer"));

    let (ok, table, _) = mode.cli(&["deployments", "list", &pid, &sid]).await;
    assert!(ok);
    assert_eq!(table.lines().filter(|l| l.contains("running")).count(), 1, "{table}");
    assert_eq!(table.lines().filter(|l| l.contains("superseded")).count(), 2, "{table}");
    let (_, list, _) = mode.cli(&["-o", "json", "deployments", "list", &pid, &sid]).await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let first = list.as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_string();
    let (ok, lines, _) = mode.cli(&["logs", &first]).await;
    assert!(ok && lines.contains("Step 1/") && lines.contains("is healthy"), "{lines}");
}

#[tokio::test]
async fn an_agent_only_cut_off_mid_build_abandons_its_attempt_when_it_returns() {
    let setup = Setup::start(1, 2, FAST).await;
    let service = setup.slow_service("slow", 8).await;
    let id = setup.deploy(&service, json!({})).await["id"].as_str().unwrap().to_string();
    let (first, index) = setup.building(&id).await;
    // Frozen, not dead: the cluster sees it go down and moves the deployment.
    let pid = setup.agents[index].pid().unwrap().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    wait_for("the deployment to move", Duration::from_secs(30), || async {
        (setup.deployment(&id).await?["attempt"] == 2).then_some(())
    })
    .await
    .unwrap();
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());

    let done = setup.finished(&id).await;
    assert_eq!(done["status"], "running", "{done}\n{}", setup.diagnostics());
    let second = done["agent_id"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    // The returning agent is told its attempt went elsewhere: it removes what it started, and
    // one instance of the deployment runs, on the agent that finished it.
    let owners = wait_for("one instance of the deployment", Duration::from_secs(40), || async {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=deployer.deployment={id}"),
            "--format",
            "{{.Label \"deployer.agent\"}}",
        ]);
        let owners: Vec<String> = out.lines().map(str::to_string).collect();
        (owners.len() == 1).then_some(owners)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", setup.diagnostics()));
    assert_eq!(owners, [second]);
    let log = setup.agents[index].log_text();
    assert!(log.contains("moved to another agent: abandoned"), "{log}");
}

//! Bad input gets a clear 4xx in the `{"error":{"code","message"}}` shape and writes nothing:
//! request bodies, project names, bearer tokens and ids on the HTTP API, and wrong, expired,
//! revoked or mis-pinned join tokens given to a real joining controller.

use std::collections::BTreeSet;
use std::time::Duration;

use deployer_tests::{answer, wait_for, Api, Cluster, Controller};
use serde_json::{json, Value};

/// Asserts an error answer: its status, its stable code, a message that contains `says`, and
/// nothing else in the body.
#[track_caller]
fn assert_error(answer: &(u16, Value), status: u16, code: &str, says: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "status of {body}");
    let obj = body.as_object().unwrap_or_else(|| panic!("error body is a JSON object: {body}"));
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["error"], "error body has only \"error\": {body}");
    assert_eq!(body["error"]["code"], code, "error code in {body}");
    let message = body["error"]["message"].as_str().unwrap_or_else(|| panic!("error message is a string: {body}"));
    assert!(message.contains(says), "error message {message:?} should say {says:?}");
}

fn projects_url(node: &Controller) -> String {
    format!("{}/api/v1/projects", node.url())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_project_bodies_are_refused_and_nothing_is_half_written() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let url = projects_url(&cluster.nodes[0]);
    let api = &cluster.api;
    let json_type = "application/json";

    // Malformed JSON: 400.
    for body in ["{", "{\"name\": }", "not json", ""] {
        let a = api.post_raw(&url, json_type, body).await.unwrap();
        assert_error(&a, 400, "bad_request", "malformed JSON");
    }
    // Well-formed JSON of the wrong shape: 422.
    for body in [json!({"name": 5}), json!({"name": null}), json!({}), json!({"name": "ok", "owner": "x"})] {
        let a = api.post(&url, &body).await.unwrap();
        assert_error(&a, 422, "validation_failed", "invalid request body");
    }
    let a = api.post(&url, &json!({"name": "ok", "owner": "x"})).await.unwrap();
    assert_error(&a, 422, "validation_failed", "unknown field `owner`");
    // Not declared as JSON: 415.
    let a = api.post_raw(&url, "text/plain", r#"{"name":"plain"}"#).await.unwrap();
    assert_error(&a, 415, "unsupported_media_type", "Content-Type: application/json");
    // Larger than 64 KiB, even though it is otherwise a valid request: 413.
    let huge = serde_json::to_vec(&json!({ "name": "a".repeat(70 * 1024) })).unwrap();
    let a = api.post_raw(&url, json_type, huge).await.unwrap();
    assert_error(&a, 413, "payload_too_large", "larger than 65536 bytes");

    // Names must be DNS labels; each refusal names the rule broken.
    let too_long = "a".repeat(41);
    for (name, rule) in [
        ("", "1 to 40 characters"),
        (too_long.as_str(), "1 to 40 characters"),
        ("UPPER", "only lowercase letters, digits and '-'"),
        ("a_b", "only lowercase letters, digits and '-'"),
        ("a.b", "only lowercase letters, digits and '-'"),
        ("-a", "start and end with a letter or digit"),
        ("a-", "start and end with a letter or digit"),
    ] {
        let a = cluster.create_project(0, name).await.unwrap();
        assert_error(&a, 422, "validation_failed", rule);
    }

    // Valid names, including the longest allowed; the same name twice is a conflict.
    let longest = "b".repeat(40);
    let valid = ["web", "my-app-2", "7", longest.as_str()];
    for name in valid {
        let (status, body) = cluster.create_project(0, name).await.unwrap();
        assert_eq!(status, 201, "{name}: {body}");
        assert_eq!(body["name"], name);
    }
    let a = cluster.create_project(0, "web").await.unwrap();
    assert_error(&a, 409, "conflict", "\"web\" already exists");

    let listed: BTreeSet<String> = cluster.project_names(0).await.unwrap().into_iter().collect();
    let expected: BTreeSet<String> = valid.iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, expected, "only the valid projects exist, each once");
}

/// A JSON array is not the object the API documents, even when its elements would fill the
/// object's fields in order (serde's derive accepts that form unless told otherwise).
#[tokio::test(flavor = "multi_thread")]
async fn a_json_array_in_place_of_the_object_is_422_and_writes_nothing() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let node = &cluster.nodes[0];
    let tokens_url = format!("{}/api/v1/cluster/tokens", node.url());

    let a = cluster.api.post(&projects_url(node), &json!(["arrayed"])).await.unwrap();
    assert_error(&a, 422, "validation_failed", "");
    let a = cluster.api.post(&tokens_url, &json!(["controller", 60])).await.unwrap();
    assert_error(&a, 422, "validation_failed", "");

    assert_eq!(cluster.project_names(0).await.unwrap(), Vec::<String>::new(), "no project was created");
    let (status, tokens) = cluster.api.get(&tokens_url).await.unwrap();
    assert_eq!((status, tokens), (200, json!([])), "no join token was created");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_a_valid_bearer_token_are_401_and_write_nothing() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let node = &cluster.nodes[0];
    let url = projects_url(node);
    let client = &cluster.api.client;
    let body = json!({"name": "sneaky"});

    let a = answer(client.get(&url)).await.unwrap();
    assert_error(&a, 401, "unauthorized", "Authorization: Bearer <token>");
    let a = answer(client.post(&url).json(&body)).await.unwrap();
    assert_error(&a, 401, "unauthorized", "Authorization: Bearer <token>");
    let a = answer(client.post(&url).header("Authorization", "Basic YWRtaW46YWRtaW4=").json(&body)).await.unwrap();
    assert_error(&a, 401, "unauthorized", "must be \"Bearer <token>\"");
    let a = answer(client.post(&url).header("Authorization", "Bearer ").json(&body)).await.unwrap();
    assert_error(&a, 401, "unauthorized", "must be \"Bearer <token>\"");

    let wrong = Api::new("dpl_0000000000000000000000000000000000000000000000000000000000000000");
    let a = wrong.post(&url, &body).await.unwrap();
    assert_error(&a, 401, "unauthorized", "not valid");
    let a = wrong.get(&format!("{}/api/v1/cluster", node.url())).await.unwrap();
    assert_error(&a, 401, "unauthorized", "not valid");
    let a = wrong.post(&format!("{}/api/v1/cluster/tokens", node.url()), &json!({"kind": "controller"})).await.unwrap();
    assert_error(&a, 401, "unauthorized", "not valid");

    // Health needs no token; the admin token still works; nothing was written.
    let (status, health) = answer(client.get(format!("{}/api/v1/health", node.url()))).await.unwrap();
    assert_eq!((status, health), (200, json!({"status": "ok"})));
    assert_eq!(cluster.project_names(0).await.unwrap(), Vec::<String>::new());
    let (status, tokens) = cluster.api.get(&format!("{}/api/v1/cluster/tokens", node.url())).await.unwrap();
    assert_eq!((status, tokens), (200, json!([])), "no join token was created");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ids_and_routes_are_404() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let node = &cluster.nodes[0];
    let api = &cluster.api;
    let missing = "00000000-0000-4000-8000-000000000000";

    let a = api.get(&format!("{}/{missing}", projects_url(node))).await.unwrap();
    assert_error(&a, 404, "not_found", missing);
    let r = api.client.delete(format!("{}/{missing}", projects_url(node))).bearer_auth(&api.token);
    assert_error(&answer(r).await.unwrap(), 404, "not_found", missing);
    let r = api.client.delete(format!("{}/api/v1/cluster/tokens/{missing}", node.url())).bearer_auth(&api.token);
    assert_error(&answer(r).await.unwrap(), 404, "not_found", missing);
    let a = api.get(&format!("{}/api/v1/no-such-thing", node.url())).await.unwrap();
    assert_error(&a, 404, "not_found", "no such route");

    // A project that does exist is found by its id, and deleting it twice is a 404 the second time.
    let (status, created) = cluster.create_project(0, "exists").await.unwrap();
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, shown) = api.get(&format!("{}/{id}", projects_url(node))).await.unwrap();
    assert_eq!((status, &shown["name"]), (200, &json!("exists")));
    assert_eq!(api.delete(&format!("{}/{id}", projects_url(node))).await.unwrap(), 204);
    let r = api.client.delete(format!("{}/{id}", projects_url(node))).bearer_auth(&api.token);
    assert_error(&answer(r).await.unwrap(), 404, "not_found", id);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_join_token_requests_are_422_and_create_nothing() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let url = format!("{}/api/v1/cluster/tokens", cluster.nodes[0].url());
    let api = &cluster.api;

    let a = api.post(&url, &json!({"kind": "bogus"})).await.unwrap();
    assert_error(&a, 422, "validation_failed", "kind must be \"controller\" or \"agent\"");
    for ttl in [json!(0), json!(31 * 24 * 3600)] {
        let a = api.post(&url, &json!({"kind": "controller", "ttl_s": ttl})).await.unwrap();
        assert_error(&a, 422, "validation_failed", "ttl_s must be between 1 and");
    }
    for body in [json!({"kind": "controller", "ttl_s": -1}), json!({"kind": "controller", "ttl_s": "1h"}), json!({})] {
        let a = api.post(&url, &body).await.unwrap();
        assert_error(&a, 422, "validation_failed", "invalid request body");
    }
    let a = api.post_raw(&url, "application/json", "{\"kind\":").await.unwrap();
    assert_error(&a, 400, "bad_request", "malformed JSON");

    let (status, tokens) = api.get(&url).await.unwrap();
    assert_eq!((status, tokens), (200, json!([])), "no join token was created");
}

/// What a refused joining controller left behind.
struct RefusedJoin {
    /// The `error: ...` line it printed as it exited.
    error: String,
    joiner: Controller,
}

/// Starts a new controller joining node 0 with `token` and waits for it to give up.
async fn join_refused(cluster: &Cluster, name: &str, token: &str) -> RefusedJoin {
    let mut joiner = Controller::new(cluster.root.join(name));
    let peer = format!("https://{}", cluster.nodes[0].grpc_addr());
    joiner.start(&["--join".into(), peer, "--token".into(), token.into()]).expect("spawn the joining controller");
    let status = joiner.wait_exit(Duration::from_secs(30)).expect("a refused join ends the process");
    let output = joiner.log_text();
    assert!(
        status.code().is_some_and(|c| c != 0),
        "a refused join exits with an error code (not 0, not a signal): {status:?}\n{output}"
    );
    for file in ["node.json", "keyring", "tls/node.pem", "tls/node.key"] {
        assert!(!joiner.dir.join(file).exists(), "a refused join must not write {file}\n{output}");
    }
    let error = output
        .lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("the refused join says why as it exits: {status:?}\n{output}"))
        .to_string();
    RefusedJoin { error, joiner }
}

async fn create_join_token(cluster: &Cluster, body: Value) -> Value {
    let url = format!("{}/api/v1/cluster/tokens", cluster.nodes[0].url());
    let (status, token) = cluster.api.post(&url, &body).await.unwrap();
    assert_eq!(status, 201, "{token}");
    token
}

/// The cluster still has its single voter and issued no certificate.
async fn assert_unchanged(cluster: &Cluster) {
    let view = cluster.cluster_view(0).await.unwrap();
    assert_eq!(view["nodes"].as_array().map(Vec::len), Some(1), "membership unchanged: {view}");
    let log = cluster.nodes[0].log_text();
    assert!(!log.contains("issued a controller certificate"), "no certificate was issued:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn joining_with_a_wrong_secret_is_refused() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let token = create_join_token(&cluster, json!({"kind": "controller"})).await;
    let token = token["token"].as_str().unwrap();
    // Right CA fingerprint, a secret this cluster never issued.
    let (prefix, _secret) = token.rsplit_once('.').unwrap();
    let forged = format!("{prefix}.{}", "5e".repeat(32));

    let refused = join_refused(&cluster, "joiner", &forged).await;

    assert!(
        refused.error.contains("refused to let this node join: the join token is not known to this cluster"),
        "{}",
        refused.error
    );
    assert_unchanged(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn joining_with_an_expired_token_is_refused() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let token = create_join_token(&cluster, json!({"kind": "controller", "ttl_s": 1})).await;
    let expires_at = time::OffsetDateTime::parse(
        token["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("expires_at is RFC 3339");
    wait_for("the join token to expire", Duration::from_secs(10), || async {
        (time::OffsetDateTime::now_utc() > expires_at).then_some(())
    })
    .await
    .unwrap();

    let refused = join_refused(&cluster, "joiner", token["token"].as_str().unwrap()).await;

    assert!(refused.error.contains("the join token expired at"), "{}", refused.error);
    assert_unchanged(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn joining_with_a_revoked_token_is_refused() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let token = create_join_token(&cluster, json!({"kind": "controller"})).await;
    let id = token["id"].as_str().unwrap();
    let tokens_url = format!("{}/api/v1/cluster/tokens", cluster.nodes[0].url());
    assert_eq!(cluster.api.delete(&format!("{tokens_url}/{id}")).await.unwrap(), 204);
    let (_, listed) = cluster.api.get(&tokens_url).await.unwrap();
    assert!(listed[0]["revoked_at"].is_string(), "the token is listed as revoked: {listed}");

    let refused = join_refused(&cluster, "joiner", token["token"].as_str().unwrap()).await;

    assert!(refused.error.contains("the join token has been revoked"), "{}", refused.error);
    assert_unchanged(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn joining_as_a_controller_with_an_agent_token_is_refused() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let token = create_join_token(&cluster, json!({"kind": "agent"})).await;
    assert_eq!(token["kind"], "agent", "{token}");

    let refused = join_refused(&cluster, "joiner", token["token"].as_str().unwrap()).await;

    assert!(refused.error.contains("the join token is not a controller token"), "{}", refused.error);
    assert_unchanged(&cluster).await;
}

/// A token whose fingerprint names another CA: the joining side refuses the controller's
/// certificate during the TLS handshake, before it sends the secret. The secret is valid, so had
/// it reached the controller, a certificate would have been issued (and logged); afterwards the
/// same secret with the right fingerprint still joins, which shows it was never consumed.
#[tokio::test(flavor = "multi_thread")]
async fn joining_with_a_token_for_another_ca_is_refused_before_the_secret_is_sent() {
    let mut cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let token = create_join_token(&cluster, json!({"kind": "controller"})).await;
    let token = token["token"].as_str().unwrap().to_string();
    let parts: Vec<&str> = token.split('.').collect();
    let other_ca = deployer_common::pki::ClusterCa::generate().unwrap();
    let mispinned = format!("{}.{}.{}", parts[0], other_ca.fingerprint(), parts[2]);

    let refused = join_refused(&cluster, "joiner", &mispinned).await;

    assert!(
        refused.error.contains("does not match the token's CA fingerprint"),
        "the error names the fingerprint: {}",
        refused.error
    );
    assert_unchanged(&cluster).await;

    // The control: the same secret, pinned to the right CA, joins.
    let mut joiner = refused.joiner;
    joiner
        .start(&["--join".into(), format!("https://{}", cluster.nodes[0].grpc_addr()), "--token".into(), token])
        .expect("spawn the joining controller");
    cluster.nodes.push(joiner);
    cluster.wait_voters(2).await.expect("the correctly pinned token joins");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_join_token_is_refused_before_dialing() {
    let cluster = Cluster::start(1, &[]).await.expect("start a controller");

    let refused = join_refused(&cluster, "joiner", "DPLY1.not-a-fingerprint.secret").await;

    assert!(refused.error.contains("invalid --token"), "{}", refused.error);
    assert_unchanged(&cluster).await;
}

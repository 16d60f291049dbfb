//! Who may do what, as users see it: users log in, projects have owners and collaborators with
//! roles, API tokens act as their user within their scopes, and every change lands in the audit
//! log. A project a user may not see answers 404; an action beyond a role or scope answers 403.

use std::collections::BTreeMap;
use std::time::Duration;

use deployer_tests::Cluster;
use reqwest::Method;
use serde_json::{json, Value};

/// How a request authenticates.
#[derive(Clone)]
enum Auth {
    Bearer(String),
    Cookie(String),
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    async fn call(&self, auth: &Auth, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        request = match auth {
            Auth::Bearer(t) => request.bearer_auth(t),
            Auth::Cookie(c) => request.header("cookie", format!("deployer_session={c}")),
        };
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn status(&self, auth: &Auth, method: Method, path: &str, body: Option<Value>) -> u16 {
        self.call(auth, method, path, body).await.0
    }

    /// Logs in and returns the session cookie's value.
    async fn login(&self, email: &str, password: &str) -> String {
        let response = self
            .http
            .post(format!("{}/api/v1/auth/login", self.base))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login");
        assert_eq!(response.status().as_u16(), 200, "login of {email}");
        let cookie = response.headers().get("set-cookie").expect("a session cookie").to_str().unwrap().to_string();
        for flag in ["HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(cookie.contains(flag), "the session cookie must be {flag}: {cookie}");
        }
        let value = cookie.split(';').next().unwrap().strip_prefix("deployer_session=").expect("cookie name");
        value.to_string()
    }
}

const PASSWORD: &str = "correct horse battery";

/// What, how, where, with which body, and the status expected for each role in turn.
type Case<'a> = (&'a str, Method, &'a str, Option<Value>, [u16; 6]);

#[tokio::test]
async fn roles_scopes_sessions_and_the_audit_log() {
    let cluster = Cluster::start(1, &[]).await.expect("cluster");
    let c = Client { base: cluster.nodes[0].url(), http: reqwest::Client::new() };
    let first_admin = Auth::Bearer(cluster.api.token.clone());

    // Users, made by the cluster's first admin token.
    let mut ids = BTreeMap::new();
    for (name, admin) in [
        ("root", true),
        ("owner", false),
        ("admin", false),
        ("dev", false),
        ("viewer", false),
        ("outsider", false),
        ("extra", false),
    ] {
        let email = format!("{name}@example.com");
        let (status, body) = c
            .call(
                &first_admin,
                Method::POST,
                "/api/v1/users",
                Some(json!({"email": email, "password": PASSWORD, "admin": admin})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["email"], email);
        assert!(body.get("password").is_none() && body.get("password_hash").is_none(), "{body}");
        ids.insert(name, body["id"].as_str().unwrap().to_string());
    }
    let (status, body) = c
        .call(
            &first_admin,
            Method::POST,
            "/api/v1/users",
            Some(json!({"email": "OWNER@example.com", "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, 409, "emails are unique whatever their case: {body}");
    let (status, body) =
        c.call(&first_admin, Method::POST, "/api/v1/users", Some(json!({"email": "x@y.z", "password": "short"}))).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("password"), "{body}");

    let mut who = BTreeMap::new();
    for name in ["root", "owner", "admin", "dev", "viewer", "outsider"] {
        who.insert(name, Auth::Cookie(c.login(&format!("{name}@example.com"), PASSWORD).await));
    }
    let (status, me) = c.call(&who["dev"], Method::GET, "/api/v1/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(me["user"]["email"], "dev@example.com");
    assert_eq!(me["cluster_admin"], false);

    // The owner makes a project and gives each collaborator a role.
    let (status, project) =
        c.call(&who["owner"], Method::POST, "/api/v1/projects", Some(json!({"name": "shop"}))).await;
    assert_eq!(status, 201, "{project}");
    let pid = project["id"].as_str().unwrap().to_string();
    for (name, role) in [("admin", "admin"), ("dev", "developer"), ("viewer", "viewer")] {
        let (status, body) = c
            .call(
                &who["owner"],
                Method::POST,
                &format!("/api/v1/projects/{pid}/collaborators"),
                Some(json!({"email": format!("{name}@example.com"), "role": role})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    // The role matrix: each role against each route.
    let project_path = format!("/api/v1/projects/{pid}");
    let collaborators = format!("{project_path}/collaborators");
    let add_extra = json!({"email": "extra@example.com", "role": "viewer"});
    let remove_extra = format!("{collaborators}/{}", ids["extra"]);
    let audit = format!("/api/v1/audit?project_id={pid}");
    // A service and one deployment of it (no agent runs here: it waits in the queue).
    let (status, service) = c
        .call(
            &who["owner"],
            Method::POST,
            &format!("{project_path}/services"),
            Some(json!({"name": "web", "source": {"image": "registry.example.com/web:1"}})),
        )
        .await;
    assert_eq!(status, 201, "{service}");
    let service_path = format!("{project_path}/services/{}", service["id"].as_str().unwrap());
    let deploy = format!("{service_path}/deploy");
    let (status, first) = c.call(&who["owner"], Method::POST, &deploy, Some(json!({}))).await;
    assert_eq!(status, 201, "{first}");
    let deployment = format!("/api/v1/deployments/{}", first["id"].as_str().unwrap());
    let deployment_logs = format!("{deployment}/logs");
    let (upload, rollback, deployments) =
        (format!("{service_path}/upload"), format!("{service_path}/rollback"), format!("{service_path}/deployments"));
    //                       root owner admin dev viewer outsider
    let matrix: Vec<Case> = vec![
        ("show project", Method::GET, &project_path, None, [200, 200, 200, 200, 200, 404]),
        ("list collaborators", Method::GET, &collaborators, None, [200, 200, 200, 200, 200, 404]),
        ("add collaborator", Method::POST, &collaborators, Some(add_extra.clone()), [201, 201, 201, 403, 403, 404]),
        ("project audit", Method::GET, &audit, None, [200, 200, 200, 403, 403, 404]),
        ("whole audit", Method::GET, "/api/v1/audit", None, [200, 403, 403, 403, 403, 403]),
        ("deploy", Method::POST, &deploy, Some(json!({})), [201, 201, 201, 201, 403, 404]),
        // Allowed callers get past the role check to the body's own error: not a tarball.
        ("upload", Method::POST, &upload, Some(json!({})), [400, 400, 400, 400, 403, 404]),
        // Allowed callers learn there is nothing to roll back to yet.
        ("rollback", Method::POST, &rollback, Some(json!({})), [409, 409, 409, 409, 403, 404]),
        ("list deployments", Method::GET, &deployments, None, [200, 200, 200, 200, 200, 404]),
        ("show deployment", Method::GET, &deployment, None, [200, 200, 200, 200, 200, 404]),
        ("deployment logs", Method::GET, &deployment_logs, None, [200, 200, 200, 200, 200, 404]),
        ("list users", Method::GET, "/api/v1/users", None, [200, 403, 403, 403, 403, 403]),
        (
            "join token",
            Method::POST,
            "/api/v1/cluster/tokens",
            Some(json!({"kind": "agent"})),
            [201, 403, 403, 403, 403, 403],
        ),
    ];
    let roles = ["root", "owner", "admin", "dev", "viewer", "outsider"];
    for (what, method, path, body, expected) in &matrix {
        for (i, role) in roles.iter().enumerate() {
            let status = c.status(&who[role], method.clone(), path, body.clone()).await;
            assert_eq!(status, expected[i], "{what} as {role}");
        }
    }
    // Removing a collaborator: re-added before each attempt.
    for (i, role) in roles.iter().enumerate() {
        assert_eq!(c.status(&who["owner"], Method::POST, &collaborators, Some(add_extra.clone())).await, 201);
        let status = c.status(&who[role], Method::DELETE, &remove_extra, None).await;
        assert_eq!(status, [204, 204, 204, 403, 403, 404][i], "remove collaborator as {role}");
    }
    // Nobody grants a role above their own.
    let (status, body) = c
        .call(&who["admin"], Method::POST, &collaborators, Some(json!({"email": "extra@example.com", "role": "owner"})))
        .await;
    assert_eq!(status, 403, "{body}");
    // Listings show only what the caller may see.
    let (_, listed) = c.call(&who["outsider"], Method::GET, "/api/v1/projects", None).await;
    assert_eq!(listed, json!([]));
    let (_, listed) = c.call(&who["viewer"], Method::GET, "/api/v1/projects", None).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    // Only the owner deletes the project (tried last).
    for role in ["admin", "dev", "viewer"] {
        assert_eq!(c.status(&who[role], Method::DELETE, &project_path, None).await, 403, "delete as {role}");
    }
    assert_eq!(c.status(&who["outsider"], Method::DELETE, &project_path, None).await, 404);

    // API tokens act as their user, within their scopes, and expire or get revoked.
    let (status, read_token) = c
        .call(&who["owner"], Method::POST, "/api/v1/tokens", Some(json!({"name": "ci-read", "scopes": ["read"]})))
        .await;
    assert_eq!(status, 201, "{read_token}");
    let read = Auth::Bearer(read_token["token"].as_str().unwrap().to_string());
    let (_, me) = c.call(&read, Method::GET, "/api/v1/me", None).await;
    assert_eq!(me["user"]["email"], "owner@example.com");
    assert_eq!(me["scopes"], json!(["read"]));
    assert_eq!(c.status(&read, Method::GET, &project_path, None).await, 200);
    let (status, body) = c.call(&read, Method::POST, &collaborators, Some(add_extra.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("\"write\" scope"), "{body}");
    assert_eq!(c.status(&read, Method::DELETE, &project_path, None).await, 403);
    let (status, body) =
        c.call(&read, Method::POST, "/api/v1/tokens", Some(json!({"name": "wider", "scopes": ["write"]}))).await;
    assert_eq!(status, 403, "a token cannot mint a wider one: {body}");
    let (status, body) =
        c.call(&who["owner"], Method::POST, "/api/v1/tokens", Some(json!({"name": "x", "scopes": ["root"]}))).await;
    assert_eq!(status, 422, "{body}");
    let (status, short) = c
        .call(
            &who["owner"],
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "short", "scopes": ["read"], "expires_in_s": 1})),
        )
        .await;
    assert_eq!(status, 201, "{short}");
    let short = Auth::Bearer(short["token"].as_str().unwrap().to_string());
    assert_eq!(c.status(&short, Method::GET, "/api/v1/me", None).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = c.call(&short, Method::GET, "/api/v1/me", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
    let (_, tokens) = c.call(&who["owner"], Method::GET, "/api/v1/tokens", None).await;
    let names: Vec<&str> = tokens.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "the owner sees their own tokens only: {tokens}");
    assert!(tokens.as_array().unwrap().iter().all(|t| t.get("token").is_none() && t.get("token_hash").is_none()));
    let read_id = read_token["id"].as_str().unwrap();
    assert_eq!(c.status(&who["dev"], Method::DELETE, &format!("/api/v1/tokens/{read_id}"), None).await, 404);
    assert_eq!(c.status(&who["owner"], Method::DELETE, &format!("/api/v1/tokens/{read_id}"), None).await, 204);
    let (status, body) = c.call(&read, Method::GET, "/api/v1/me", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");

    // The owner deletes the project; then logs out, and the session is over.
    assert_eq!(c.status(&who["owner"], Method::DELETE, &project_path, None).await, 204);
    assert_eq!(c.status(&who["root"], Method::GET, &project_path, None).await, 404);
    let response = c
        .http
        .post(format!("{}/api/v1/auth/logout", c.base))
        .header(
            "cookie",
            match &who["owner"] {
                Auth::Cookie(v) => format!("deployer_session={v}"),
                _ => unreachable!(),
            },
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    assert!(response.headers().get("set-cookie").unwrap().to_str().unwrap().contains("Max-Age=0"));
    let (status, _) = c.call(&who["owner"], Method::GET, "/api/v1/me", None).await;
    assert_eq!(status, 401, "a logged-out session is refused");

    // Every change is in the audit log: who, what, on which target, from where.
    let (status, log) = c.call(&who["root"], Method::GET, "/api/v1/audit?limit=1000", None).await;
    assert_eq!(status, 200, "{log}");
    let entries = log.as_array().unwrap();
    let has = |actor: &str, action: &str, target: &str| {
        entries.iter().any(|e| e["actor"] == actor && e["action"] == action && e["target"] == target)
    };
    assert!(has("token:admin", "user.create", "owner@example.com"), "{log}");
    assert!(has("user:owner@example.com", "project.create", "shop"), "{log}");
    assert!(has("user:owner@example.com", "collaborator.set", "dev@example.com:developer"), "{log}");
    assert!(has("user:admin@example.com", "collaborator.remove", &ids["extra"]), "{log}");
    assert!(has("user:owner@example.com", "token.create", "ci-read"), "{log}");
    assert!(has("user:owner@example.com", "token.revoke", read_id), "{log}");
    assert!(has(
        "user:root@example.com",
        "join_token.create",
        entries.iter().find(|e| e["action"] == "join_token.create").unwrap()["target"].as_str().unwrap()
    ));
    assert!(has("user:owner@example.com", "project.delete", "shop"), "{log}");
    assert!(entries.iter().all(|e| e["source"] == "127.0.0.1"), "{log}");
    // Logins and logouts are recorded by session id (never its secret).
    let by =
        |actor: &str, action: &str| entries.iter().filter(|e| e["actor"] == actor && e["action"] == action).count();
    assert!(by("user:owner@example.com", "auth.login") >= 1, "{log}");
    assert_eq!(by("user:owner@example.com", "auth.logout"), 1, "{log}");
    // Refused calls wrote nothing: the developer only logged in and deployed (all it may do here).
    let dev: Vec<&str> = entries
        .iter()
        .filter(|e| e["actor"] == "user:dev@example.com")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(dev, ["deployment.create", "auth.login"], "{log}");
    let seqs: Vec<i64> = entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "newest first: {seqs:?}");
}

#[tokio::test]
async fn failed_logins_are_slowed_then_refused() {
    let cluster = Cluster::start(1, &[]).await.expect("cluster");
    let c = Client { base: cluster.nodes[0].url(), http: reqwest::Client::new() };
    let admin = Auth::Bearer(cluster.api.token.clone());
    let body = json!({"email": "someone@example.com", "password": PASSWORD});
    assert_eq!(c.status(&admin, Method::POST, "/api/v1/users", Some(body)).await, 201);
    let attempt = |password: &'static str| {
        let http = c.http.clone();
        let url = format!("{}/api/v1/auth/login", c.base);
        async move {
            let started = std::time::Instant::now();
            let r = http
                .post(url)
                .json(&json!({"email": "someone@example.com", "password": password}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), started.elapsed())
        }
    };
    // An unknown email is refused like a wrong password.
    let r = c
        .http
        .post(format!("{}/api/v1/auth/login", c.base))
        .json(&json!({"email": "nobody@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let text = r.text().await.unwrap();
    assert!(text.contains("wrong email or password"), "{text}");

    let (status, first) = attempt("wrong password 1").await;
    assert_eq!(status, 401);
    let mut last = first;
    // Ten failures from this address in all (the unknown email counts too).
    for _ in 2..=9 {
        let (status, took) = attempt("wrong password n").await;
        assert_eq!(status, 401);
        last = took;
    }
    assert!(last > first + Duration::from_millis(500), "later failures answer slower: {first:?} then {last:?}");
    // Locked now, even with the right password.
    let (status, _) = attempt(PASSWORD).await;
    assert_eq!(status, 429);
}

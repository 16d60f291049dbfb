//! Git webhooks as GitHub and GitLab send them (payloads in their documented formats, signed
//! as they sign them) against a real cluster, agent and Docker engine: a push deploys the
//! matching service and only it, at the pushed commit; a forged or missing signature deploys
//! nothing; a redelivery deploys nothing twice; a project's own secret replaces the default for
//! it; a service's deploy hook works for CI systems.

use std::path::Path;
use std::process::Command;

use deployer_tests::deploy::*;
use ring::hmac;
use serde_json::{json, Value};

const SECRET: &str = "the-default-webhook-secret";

fn sign(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

fn head(repo: &Path) -> String {
    let out = Command::new("git").current_dir(repo).args(["rev-parse", "HEAD"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// GitHub's push payload (trimmed to the fields a receiver reads, with their real nesting).
fn github_push(git_url: &str, branch: &str, after: &str) -> Vec<u8> {
    let https = git_url.replacen("git://", "https://", 1);
    serde_json::to_vec(&json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000001",
        "after": after,
        "created": false,
        "deleted": false,
        "forced": false,
        "repository": {
            "id": 1296269,
            "name": "web",
            "full_name": "acme/web",
            "private": false,
            "html_url": https,
            "clone_url": format!("{https}.git"),
            "git_url": format!("{git_url}.git"),
            "ssh_url": "git@example.invalid:acme/web.git",
            "default_branch": "main"
        },
        "pusher": {"name": "dev", "email": "dev@example.com"},
        "head_commit": {"id": after, "message": "change", "timestamp": "2026-11-26T10:00:00Z"}
    }))
    .unwrap()
}

fn gitlab_push(git_url: &str, branch: &str, after: &str) -> Vec<u8> {
    let http = git_url.replacen("git://", "http://", 1);
    serde_json::to_vec(&json!({
        "object_kind": "push",
        "event_name": "push",
        "before": "0000000000000000000000000000000000000001",
        "after": after,
        "ref": format!("refs/heads/{branch}"),
        "checkout_sha": after,
        "user_username": "dev",
        "project_id": 15,
        "project": {
            "id": 15,
            "name": "web",
            "path_with_namespace": "acme/web",
            "web_url": http,
            "git_http_url": format!("{http}.git"),
            "git_ssh_url": "git@example.invalid:acme/web.git",
            "default_branch": "main"
        },
        "commits": [{"id": after, "message": "change"}],
        "total_commits_count": 1
    }))
    .unwrap()
}

struct Hooks {
    setup: Setup,
    client: reqwest::Client,
}

impl Hooks {
    async fn github(&self, event: &str, delivery: &str, body: &[u8], signature: Option<String>) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("{}/webhooks/github", self.setup.url()))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn gitlab(&self, uuid: &str, body: &[u8], token: &str) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}/webhooks/gitlab", self.setup.url()))
            .header("content-type", "application/json")
            .header("x-gitlab-event", "Push Hook")
            .header("x-gitlab-event-uuid", uuid)
            .header("x-gitlab-token", token)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn deployments(&self, service: &str) -> Vec<Value> {
        let url =
            format!("{}/api/v1/projects/{}/services/{service}/deployments", self.setup.url(), self.setup.project_id);
        let (status, body) = self.setup.cluster.api.get(&url).await.unwrap();
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }
}

#[tokio::test]
async fn a_signed_push_deploys_the_matching_service_at_its_commit_and_nothing_else() {
    let setup = Setup::start(1, 1, &["--webhook-secret", SECRET, "--webhook-max-bytes", "65536"]).await;
    let repos = setup.cluster.root.join("repos");
    let web = repos.join("web");
    make_repo(&web, &setup.base, "web v1\n");
    let other = repos.join("other");
    make_repo(&other, &setup.base, "other\n");
    let daemon = GitDaemon::start(&repos).await;
    let service = |name: &str, repo: &str, branch: &str| json!({"name": name, "source": {"git": {"url": daemon.url(repo), "branch": branch}}, "port": 8080});
    let web_id = setup.create_service(service("web", "web", "main")).await;
    let staging_id = setup.create_service(service("staging", "web", "dev")).await;
    let other_id = setup.create_service(service("other", "other", "main")).await;
    let hooks = Hooks { setup, client: reqwest::Client::new() };

    // A new commit on main, announced by GitHub.
    std::fs::write(web.join("index.html"), "web v2\n").unwrap();
    commit(&web, "v2");
    let c2 = head(&web);
    let body = github_push(&daemon.url("web"), "main", &c2);

    // Nothing is parsed, nothing deployed without the right signature.
    let (status, answer) = hooks.github("push", "d-1", &body, None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = hooks.github("push", "d-1", &body, Some(sign("not-the-secret", &body))).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = hooks.github("push", "d-1", b"{not json", Some(sign(SECRET, b"{not json"))).await;
    assert_eq!(status, 400, "{answer}");
    let big = vec![b' '; 70_000];
    let (status, _) = hooks.github("push", "d-big", &big, Some(sign(SECRET, &big))).await;
    assert_eq!(status, 413);
    assert!(hooks.deployments(&web_id).await.is_empty(), "nothing deployed yet");

    // The signed push: only `web` (this repository, this branch) deploys, at the pushed commit.
    let (status, answer) = hooks.github("push", "d-1", &body, Some(sign(SECRET, &body))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("deployed")), "{answer}");
    let ids = answer["deployments"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 1, "{answer}");
    let done = hooks.setup.finished(ids[0].as_str().unwrap()).await;
    assert_eq!(done["status"], "running", "{done:#}\n{}", hooks.setup.diagnostics());
    assert_eq!(done["commit"], c2.as_str());
    assert_eq!(done["service_id"], web_id.as_str());
    assert_eq!(page(done["url"].as_str().unwrap()).await, "web v2\n");
    assert!(hooks.deployments(&staging_id).await.is_empty(), "another branch");
    assert!(hooks.deployments(&other_id).await.is_empty(), "another repository");

    // GitHub redelivers it: nothing twice.
    let (status, answer) = hooks.github("push", "d-1", &body, Some(sign(SECRET, &body))).await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("duplicate")), "{answer}");
    assert_eq!(hooks.deployments(&web_id).await.len(), 1);

    // Ping, other events, a repository nobody deploys, a tag: answered, ignored.
    let ping = serde_json::to_vec(&json!({"zen": "Keep it logically awesome.", "hook_id": 1})).unwrap();
    assert_eq!(hooks.github("ping", "d-2", &ping, Some(sign(SECRET, &ping))).await.0, 200);
    let star = serde_json::to_vec(&json!({"action": "created", "repository": {"full_name": "acme/web"}})).unwrap();
    let (status, answer) = hooks.github("star", "d-3", &star, Some(sign(SECRET, &star))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("ignored")), "{answer}");
    let elsewhere = github_push("git://git.example.invalid/acme/unknown", "main", &c2);
    let (status, answer) = hooks.github("push", "d-4", &elsewhere, Some(sign(SECRET, &elsewhere))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("ignored")), "{answer}");
    assert_eq!(hooks.deployments(&web_id).await.len(), 1);

    // GitLab: the token, then the same event UUID again.
    let gl = gitlab_push(&daemon.url("other"), "main", &head(&other));
    let (status, answer) = hooks.gitlab("uuid-1", &gl, "wrong-token").await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = hooks.gitlab("uuid-1", &gl, SECRET).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("deployed")), "{answer}");
    let (status, answer) = hooks.gitlab("uuid-1", &gl, SECRET).await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("duplicate")), "{answer}");
    assert_eq!(hooks.deployments(&other_id).await.len(), 1);

    // A preview made by hand for a branch follows that branch's pushes.
    let url = format!("{}/api/v1/projects/{}/previews", hooks.setup.url(), hooks.setup.project_id);
    let (status, made) = hooks.setup.cluster.api.post(&url, &json!({"branch": "hotfix"})).await.unwrap();
    assert_eq!(status, 201, "{made}");
    let fix = "1234567890abcdef1234567890abcdef12345678";
    let body = github_push(&daemon.url("web"), "hotfix", fix);
    let (status, answer) = hooks.github("push", "d-5", &body, Some(sign(SECRET, &body))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("deployed")), "{answer}");
    let mut previewed = Vec::new();
    for id in answer["deployments"].as_array().unwrap() {
        let (_, d) = hooks
            .setup
            .cluster
            .api
            .get(&format!("{}/api/v1/deployments/{}", hooks.setup.url(), id.as_str().unwrap()))
            .await
            .unwrap();
        previewed.push((
            d["preview"].as_str().unwrap_or("").to_string(),
            d["service_id"].as_str().unwrap().to_string(),
            d["ref"].as_str().unwrap_or("").to_string(),
        ));
    }
    previewed.sort();
    let mut expected = vec![
        ("hotfix".to_string(), web_id.clone(), fix.to_string()),
        ("hotfix".to_string(), staging_id.clone(), fix.to_string()),
        ("hotfix".to_string(), other_id.clone(), "main".to_string()),
    ];
    expected.sort();
    assert_eq!(previewed, expected, "every service of the project, the pushed repository's at the pushed commit");
}

#[tokio::test]
async fn a_project_secret_replaces_the_default_and_deploy_hooks_serve_ci() {
    let setup = Setup::start(1, 1, &["--webhook-secret", SECRET]).await;
    let service = setup
        .create_service(
            json!({"name": "api", "source": {"git": {"url": "git://git.example.invalid/acme/api"}}, "port": 8080}),
        )
        .await;
    let url = setup.url();
    let hooks = Hooks { setup, client: reqwest::Client::new() };
    let body = github_push("git://git.example.invalid/acme/api", "main", "0123456789abcdef0123456789abcdef01234567");

    // The project takes a secret of its own: the default one no longer deploys it.
    let secret_url = format!("{url}/api/v1/projects/{}/webhook-secret", hooks.setup.project_id);
    let api = &hooks.setup.cluster.api;
    let r = api.client.put(&secret_url).bearer_auth(&api.token).json(&json!({"secret": "short"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let first = "project-secret-number-one";
    let r = api.client.put(&secret_url).bearer_auth(&api.token).json(&json!({"secret": first})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (status, answer) = hooks.github("push", "p-1", &body, Some(sign(SECRET, &body))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("ignored")), "{answer}");
    assert!(hooks.deployments(&service).await.is_empty());
    let (status, answer) = hooks.github("push", "p-2", &body, Some(sign(first, &body))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("deployed")), "{answer}");
    // Rotated: the new one works, and the old one for its grace period.
    let second = "project-secret-number-two";
    let r = api.client.put(&secret_url).bearer_auth(&api.token).json(&json!({"secret": second})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (_, answer) = hooks.github("push", "p-3", &body, Some(sign(second, &body))).await;
    assert_eq!(answer["outcome"], "deployed", "{answer}");
    let (_, answer) = hooks.github("push", "p-4", &body, Some(sign(first, &body))).await;
    assert_eq!(answer["outcome"], "deployed", "the old secret in its grace: {answer}");
    assert_eq!(hooks.deployments(&service).await.len(), 3);

    // A deploy hook for CI: a secret shown once, a token or a signature, idempotent by delivery.
    let hook_url = format!("{url}/api/v1/projects/{}/services/{service}/deploy-hook", hooks.setup.project_id);
    let (status, hook) = api.post(&hook_url, &json!({})).await.unwrap();
    assert_eq!(status, 201, "{hook}");
    let path = hook["path"].as_str().unwrap();
    let hook_secret = hook["secret"].as_str().unwrap();
    let call = |token: Option<&str>, delivery: Option<&str>, body: &'static str| {
        let mut request = hooks.client.post(format!("{url}{path}")).body(body);
        if let Some(token) = token {
            request = request.header("x-deployer-token", token);
        }
        if let Some(delivery) = delivery {
            request = request.header("x-deployer-delivery", delivery);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(call(None, None, "").await.0, 401);
    assert_eq!(call(Some("wrong"), None, "").await.0, 401);
    let (status, answer) = call(Some(hook_secret), Some("ci-run-7"), r#"{"ref": "main"}"#).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("deployed")), "{answer}");
    let (status, answer) = call(Some(hook_secret), Some("ci-run-7"), r#"{"ref": "main"}"#).await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("duplicate")), "{answer}");
    let signed = hooks
        .client
        .post(format!("{url}{path}"))
        .header("x-hub-signature-256", sign(hook_secret, b"{}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status().as_u16(), 202);
    let (status, answer) = call(Some(hook_secret), None, r#"{"ref": "--upload-pack=x"}"#).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(hooks.deployments(&service).await.len(), 5);

    // Previews turned off for the project: a pull request opens none; on again, it does.
    let settings = format!("{url}/api/v1/projects/{}/previews/settings", hooks.setup.project_id);
    let set = |enabled: bool| {
        let request = api.client.put(&settings).bearer_auth(&api.token).json(&json!({"enabled": enabled}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(set(false).await, 204);
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    let pr = github_pull_request("git://git.example.invalid/acme/api", "opened", 4, "topic", sha, false);
    let (status, answer) = hooks.github("pull_request", "p-5", &pr, Some(sign(second, &pr))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("ignored")), "{answer}");
    let previews = format!("{url}/api/v1/projects/{}/previews", hooks.setup.project_id);
    let (_, list) = api.get(&previews).await.unwrap();
    assert_eq!(list, json!([]), "previews are off");
    assert_eq!(set(true).await, 204);
    let (_, answer) = hooks.github("pull_request", "p-6", &pr, Some(sign(second, &pr))).await;
    assert_eq!(answer["outcome"], "deployed", "{answer}");
    let (_, list) = api.get(&previews).await.unwrap();
    assert_eq!(list[0]["key"], "pr-4", "{list:#}");
}

/// GitHub's pull_request payload (trimmed to what a receiver reads, with the real nesting).
fn github_pull_request(git_url: &str, action: &str, number: u64, branch: &str, sha: &str, merged: bool) -> Vec<u8> {
    let https = git_url.replacen("git://", "https://", 1);
    let repo = json!({
        "id": 1296269,
        "name": "web",
        "full_name": "acme/web",
        "html_url": https,
        "clone_url": format!("{https}.git"),
        "git_url": format!("{git_url}.git"),
        "ssh_url": "git@example.invalid:acme/web.git",
        "default_branch": "main"
    });
    serde_json::to_vec(&json!({
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "state": if action == "closed" { "closed" } else { "open" },
            "title": "Add a login page",
            "merged": merged,
            "head": {"label": format!("acme:{branch}"), "ref": branch, "sha": sha, "repo": repo.clone()},
            "base": {"label": "acme:main", "ref": "main", "sha": "0000000000000000000000000000000000000002", "repo": repo.clone()}
        },
        "repository": repo,
        "sender": {"login": "dev"}
    }))
    .unwrap()
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.email=dev@example.com", "-c", "user.name=Dev"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

async fn preview(hooks: &Hooks, key: &str) -> Option<Value> {
    let url = format!("{}/api/v1/projects/{}/previews", hooks.setup.url(), hooks.setup.project_id);
    let (_, list) = hooks.setup.cluster.api.get(&url).await.ok()?;
    list.as_array()?.iter().find(|p| p["key"] == key).cloned()
}

/// What is left of a preview on this host: its containers, its deployments' images and sources.
fn leftovers(hooks: &Hooks, key: &str, deployments: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    let containers = docker(&["ps", "-aq", "--filter", &format!("label=deployer.preview={key}")]);
    left.extend(containers.split_whitespace().map(|c| format!("container {c}")));
    let images = docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    for d in deployments {
        left.extend(images.lines().filter(|i| i.ends_with(&format!(":{d}"))).map(|i| format!("image {i}")));
        let source = hooks.setup.storage(0).join("sources").join(d);
        if source.exists() {
            left.push(format!("source {}", source.display()));
        }
    }
    left
}

async fn port(hooks: &Hooks) -> u16 {
    let (_, agents) = hooks.setup.cluster.api.get(&format!("{}/api/v1/agents", hooks.setup.url())).await.unwrap();
    agents[0]["ingress"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap()
}

async fn get_host(host: &str, port: u16) -> (u16, String) {
    let client =
        reqwest::Client::builder().resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port))).build().unwrap();
    let r = client.get(format!("http://{host}:{port}/")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_pull_request_gets_a_preview_that_follows_its_pushes_and_is_gone_when_it_closes() {
    let setup = Setup::start(1, 1, &["--webhook-secret", SECRET]).await;
    let repos = setup.cluster.root.join("repos");
    let web = repos.join("web");
    make_repo(&web, &setup.base, "main\n");
    let daemon = GitDaemon::start(&repos).await;
    let service =
        setup.create_service(json!({"name": "web", "source": {"git": {"url": daemon.url("web")}}, "port": 8080})).await;
    let main = setup.deploy(&service, json!({})).await;
    assert_eq!(setup.finished(main["id"].as_str().unwrap()).await["status"], "running");
    let hooks = Hooks { setup, client: reqwest::Client::new() };
    let port = port(&hooks).await;
    let project = hooks.setup.project.clone();
    let main_host = format!("web-{project}.localhost");
    let preview_host = format!("web-{project}-pr-7.localhost");

    // Opened: the branch's head answers at the preview's host; the service's own release too.
    git(&web, &["checkout", "-q", "-b", "feature/login"]);
    std::fs::write(web.join("index.html"), "feature v1\n").unwrap();
    commit(&web, "feature v1");
    let body = github_pull_request(&daemon.url("web"), "opened", 7, "feature/login", &head(&web), false);
    let (status, answer) = hooks.github("pull_request", "pr-1", &body, Some(sign(SECRET, &body))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("deployed")), "{answer}");
    let mut deployments: Vec<String> =
        answer["deployments"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    let first = hooks.setup.finished(&deployments[0]).await;
    assert_eq!(first["status"], "running", "{first:#}\n{}", hooks.setup.diagnostics());
    assert_eq!(first["preview"], "pr-7");
    assert_eq!(first["url"], format!("http://{preview_host}:{port}"));
    assert_eq!(get_host(&preview_host, port).await, (200, "feature v1\n".to_string()));
    assert_eq!(get_host(&main_host, port).await, (200, "main\n".to_string()));
    let shown = preview(&hooks, "pr-7").await.expect("the preview is listed");
    assert_eq!(shown["status"], "active", "{shown:#}");
    assert_eq!(shown["hosts"][0], preview_host.as_str());

    // Synchronize: the new head replaces the preview's release, and only it.
    std::fs::write(web.join("index.html"), "feature v2\n").unwrap();
    commit(&web, "feature v2");
    let body = github_pull_request(&daemon.url("web"), "synchronize", 7, "feature/login", &head(&web), false);
    let (_, answer) = hooks.github("pull_request", "pr-2", &body, Some(sign(SECRET, &body))).await;
    assert_eq!(answer["outcome"], "deployed", "{answer}");
    let second = answer["deployments"][0].as_str().unwrap().to_string();
    assert_eq!(hooks.setup.finished(&second).await["status"], "running");
    deployments.push(second);
    assert_eq!(get_host(&preview_host, port).await, (200, "feature v2\n".to_string()));
    assert_eq!(get_host(&main_host, port).await, (200, "main\n".to_string()));

    // Closed (merged): the preview's host stops answering and nothing of it is left.
    let body = github_pull_request(&daemon.url("web"), "closed", 7, "feature/login", &head(&web), true);
    let (_, answer) = hooks.github("pull_request", "pr-3", &body, Some(sign(SECRET, &body))).await;
    assert_eq!(answer["outcome"], "destroyed", "{answer}");
    deployer_tests::wait_for("the preview's host to stop answering", std::time::Duration::from_secs(10), || async {
        (get_host(&preview_host, port).await.0 == 404).then_some(())
    })
    .await
    .unwrap();
    let destroyed =
        deployer_tests::wait_for("the preview to be destroyed", std::time::Duration::from_secs(30), || async {
            (preview(&hooks, "pr-7").await?["status"] == "destroyed").then_some(())
        })
        .await;
    if let Err(e) = destroyed {
        panic!("{e:#}: {:#}\n{}", preview(&hooks, "pr-7").await.unwrap_or_default(), hooks.setup.diagnostics());
    }
    assert_eq!(leftovers(&hooks, "pr-7", &deployments), Vec::<String>::new());
    assert_eq!(get_host(&main_host, port).await, (200, "main\n".to_string()), "the service's own release serves on");
    assert!(hooks.setup.storage(0).join("sources").join(main["id"].as_str().unwrap()).exists());
}

#[tokio::test]
async fn a_forgotten_preview_expires_and_is_torn_down() {
    let setup = Setup::start(1, 1, &["--preview-ttl-s", "3"]).await;
    let repos = setup.cluster.root.join("repos");
    let web = repos.join("web");
    make_repo(&web, &setup.base, "main\n");
    git(&web, &["checkout", "-q", "-b", "try-this"]);
    std::fs::write(web.join("index.html"), "trying\n").unwrap();
    commit(&web, "try");
    let service = setup
        .create_service(
            json!({"name": "web", "source": {"git": {"url": format!("file://{}", web.display())}}, "port": 8080}),
        )
        .await;
    let hooks = Hooks { setup, client: reqwest::Client::new() };
    let url = format!("{}/api/v1/projects/{}/previews", hooks.setup.url(), hooks.setup.project_id);
    let (status, body) = hooks.setup.cluster.api.post(&url, &json!({"branch": "Try This!"})).await.unwrap();
    assert_eq!(status, 422, "not a branch name: {body}");
    let (status, made) = hooks.setup.cluster.api.post(&url, &json!({"branch": "try-this"})).await.unwrap();
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["key"], "try-this");
    let deployments = hooks.deployments(&service).await;
    assert_eq!(deployments.len(), 1, "{deployments:#?}");
    let id = deployments[0]["id"].as_str().unwrap().to_string();
    let _ = hooks.setup.finished(&id).await;
    let port = port(&hooks).await;
    let host = format!("web-{}-try-this.localhost", hooks.setup.project);
    // It may already have expired (3 s): either it answers, or it is on its way out.
    let (status, _) = get_host(&host, port).await;
    assert!(status == 200 || status == 404, "{status}");
    deployer_tests::wait_for("the preview to expire and be destroyed", std::time::Duration::from_secs(40), || async {
        (preview(&hooks, "try-this").await?["status"] == "destroyed").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", hooks.setup.diagnostics()));
    assert_eq!(get_host(&host, port).await.0, 404);
    assert_eq!(leftovers(&hooks, "try-this", &[id]), Vec::<String>::new());
}

/// A request the fake git host received.
#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A stand-in for GitHub's REST API on loopback: records every request and answers as GitHub
/// does (201 with the created object; an empty list of comments).
async fn fake_github() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, path) =
                        (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        stream.read_line(&mut h).await.unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((n, v)) = h.split_once(':') {
                            headers.push((n.trim().to_lowercase(), v.trim().to_string()));
                        }
                    }
                    let length: usize =
                        headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let answer =
                        if method == "GET" { "[]".to_string() } else { json!({"id": 1, "url": "x"}).to_string() };
                    let status = if method == "GET" { "200 OK" } else { "201 Created" };
                    record.lock().unwrap().push(Recorded { method, path, headers, body });
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if stream.get_mut().write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn a_previews_status_and_where_it_answers_go_back_to_the_pull_request() {
    let (api_port, seen) = fake_github().await;
    let api = format!("http://127.0.0.1:{api_port}");
    let setup =
        Setup::start(1, 1, &["--webhook-secret", SECRET, "--github-token", "ghp_test_token", "--github-api-url", &api])
            .await;
    let repos = setup.cluster.root.join("repos");
    let web = repos.join("web");
    make_repo(&web, &setup.base, "main\n");
    git(&web, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(web.join("index.html"), "feature\n").unwrap();
    commit(&web, "feature");
    let sha = head(&web);
    let daemon = GitDaemon::start(&repos).await;
    setup.create_service(json!({"name": "web", "source": {"git": {"url": daemon.url("web")}}, "port": 8080})).await;
    let hooks = Hooks { setup, client: reqwest::Client::new() };
    let body = github_pull_request(&daemon.url("web"), "opened", 9, "feature", &sha, false);
    let (_, answer) = hooks.github("pull_request", "s-1", &body, Some(sign(SECRET, &body))).await;
    let id = answer["deployments"][0].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
    let done = hooks.setup.finished(&id).await;
    assert_eq!(done["status"], "running", "{done:#}");
    let url = done["url"].as_str().unwrap().to_string();

    let requests =
        deployer_tests::wait_for("a success status and a comment", std::time::Duration::from_secs(15), || {
            let seen = seen.clone();
            async move {
                let requests = seen.lock().unwrap().clone();
                let success = requests.iter().any(|r| r.body["state"] == "success");
                let comment = requests.iter().any(|r| r.path.ends_with("/issues/9/comments") && r.method == "POST");
                (success && comment).then_some(requests)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}: {:#?}\n{}", seen.lock().unwrap(), hooks.setup.diagnostics()));
    let statuses: Vec<&Recorded> =
        requests.iter().filter(|r| r.path == format!("/repos/acme/web/statuses/{sha}")).collect();
    assert_eq!(statuses.iter().map(|r| r.body["state"].as_str().unwrap()).collect::<Vec<_>>(), ["pending", "success"]);
    for r in &statuses {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("authorization"), Some("Bearer ghp_test_token"));
        assert_eq!(r.header("accept"), Some("application/vnd.github+json"));
        assert!(r.header("user-agent").is_some_and(|u| !u.is_empty()));
        assert_eq!(r.body["context"], "deployer/web (pr-9)");
    }
    assert_eq!(statuses[1].body["target_url"], url.as_str());
    let comment = requests.iter().find(|r| r.method == "POST" && r.path.ends_with("/issues/9/comments")).unwrap();
    assert!(comment.body["body"].as_str().unwrap().contains(&url), "{:#}", comment.body);
}

#[tokio::test]
async fn a_teardown_that_cannot_finish_says_why_and_finishes_once_the_agent_is_back() {
    let mut setup = Setup::start(1, 1, &["--webhook-secret", SECRET]).await;
    let repos = setup.cluster.root.join("repos");
    let web = repos.join("web");
    make_repo(&web, &setup.base, "main\n");
    git(&web, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(web.join("index.html"), "feature\n").unwrap();
    commit(&web, "feature");
    let sha = head(&web);
    let daemon = GitDaemon::start(&repos).await;
    setup.create_service(json!({"name": "web", "source": {"git": {"url": daemon.url("web")}}, "port": 8080})).await;
    let url = setup.url();
    let client = reqwest::Client::new();
    let send = |body: Vec<u8>, delivery: &'static str| {
        let request = client
            .post(format!("{url}/webhooks/github"))
            .header("x-github-event", "pull_request")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sign(SECRET, &body))
            .body(body);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let answer = send(github_pull_request(&daemon.url("web"), "opened", 3, "feature", &sha, false), "t-1").await;
    let id = answer["deployments"][0].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
    assert_eq!(setup.finished(&id).await["status"], "running");

    // The agent that runs it goes away; the request is closed meanwhile.
    setup.agents[0].kill9();
    let answer = send(github_pull_request(&daemon.url("web"), "closed", 3, "feature", &sha, false), "t-2").await;
    assert_eq!(answer["outcome"], "destroyed", "{answer}");
    let previews = format!("{url}/api/v1/projects/{}/previews", setup.project_id);
    let api = setup.cluster.api.clone();
    let stuck =
        deployer_tests::wait_for("the teardown to say what is left", std::time::Duration::from_secs(30), || {
            let (api, previews) = (api.clone(), previews.clone());
            async move {
                let (_, list) = api.get(&previews).await.ok()?;
                let p = list.as_array()?.iter().find(|p| p["key"] == "pr-3")?.clone();
                (p["status"] == "destroying" && p["teardown_error"].is_string()).then_some(p)
            }
        })
        .await
        .unwrap();
    assert!(stuck["teardown_error"].as_str().unwrap().contains("not connected"), "{stuck:#}");
    assert!(!docker(&["ps", "-aq", "--filter", "label=deployer.preview=pr-3"]).trim().is_empty(), "still there");

    // Back: the teardown finishes, and nothing of the preview is left.
    let controller = setup.cluster.nodes[0].grpc_addr();
    setup.agents[0].start(&[format!("--controller=https://{controller}"), "--allow-local-git".into()]).unwrap();
    deployer_tests::wait_for("the teardown to finish", std::time::Duration::from_secs(60), || {
        let (api, previews) = (api.clone(), previews.clone());
        async move {
            let (_, list) = api.get(&previews).await.ok()?;
            (list.as_array()?.iter().find(|p| p["key"] == "pr-3")?["status"] == "destroyed").then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", setup.diagnostics()));
    assert_eq!(docker(&["ps", "-aq", "--filter", "label=deployer.preview=pr-3"]).trim(), "");
    assert!(!setup.storage(0).join("sources").join(&id).exists());
}

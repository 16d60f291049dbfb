//! What the platform adds to a deployment: the time from the deploy call to a healthy container
//! for a small app, against doing the same by hand in the same run: `docker build`, `docker run`,
//! then polling the page until it answers.
//!
//! A third side is push-to-deploy: from a signed GitHub push webhook for a new commit to the new
//! page answering at the service's host name through the ingress (issue 7's webhook-to-live).
//!
//! Both sides build the same Dockerfile from a context that changed since the last build (the
//! page carries the iteration number), so both rebuild the same layers. Run with
//! `cargo build --release --bins && cargo bench -p deployer-tests --bench deploy`. Prints the
//! medians and the difference.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deployer_tests::{busybox_image, wait_for, Agent, Cluster};
use serde_json::json;

const ITERATIONS: usize = 7;
const SECRET: &str = "bench-webhook-secret";

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program).current_dir(dir).args(args).stderr(Stdio::inherit()).output().expect(program);
    assert!(out.status.success(), "{program} {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git(dir: &Path, args: &[&str]) {
    let mut all = vec!["-c", "user.email=bench@example.com", "-c", "user.name=Bench"];
    all.extend_from_slice(args);
    run(dir, "git", &all);
}

fn write_app(dir: &Path, base: &str, page: &str) {
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY index.html /www/index.html\n\
             CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("index.html"), page).unwrap();
}

async fn answers(client: &reqwest::Client, url: &str, page: &str) -> bool {
    match client.get(url).send().await {
        Ok(r) => r.text().await.is_ok_and(|body| body == page),
        Err(_) => false,
    }
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let base = busybox_image().expect("busybox image");
    let cluster = Cluster::start(1, &["--webhook-secret", SECRET]).await.expect("cluster");
    let token = cluster.agent_token().await.unwrap();
    let mut agent = Agent::new(cluster.root.join("agent"));
    agent
        .start(&[
            "--controller".into(),
            format!("https://{}", cluster.nodes[0].grpc_addr()),
            "--token".into(),
            token,
            "--allow-local-git".into(),
        ])
        .unwrap();
    let url = cluster.nodes[0].url();
    let api = cluster.api.clone();
    wait_for("the agent", Duration::from_secs(30), || {
        let (api, url) = (api.clone(), url.clone());
        async move {
            let (_, body) = api.get(&format!("{url}/api/v1/agents")).await.ok()?;
            (body.as_array()?.iter().any(|a| a["status"] == "ready")).then_some(())
        }
    })
    .await
    .unwrap();
    let project = format!("bench{}", std::process::id());
    let (_, p) = api.post(&format!("{url}/api/v1/projects"), &json!({"name": project})).await.unwrap();
    let project_id = p["id"].as_str().unwrap().to_string();
    let repos = cluster.root.join("repos");
    let repo = repos.join("web");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    write_app(&repo, &base, "start");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "start"]);
    let daemon = deployer_tests::deploy::GitDaemon::start(&repos).await;
    let spec = json!({
        "name": "web",
        "source": {"git": {"url": daemon.url("web")}},
        "port": 8080,
        "health_check": {"timeout_s": 30},
    });
    let (status, s) = api.post(&format!("{url}/api/v1/projects/{project_id}/services"), &spec).await.unwrap();
    assert_eq!(status, 201, "{s}");
    let service_id = s["id"].as_str().unwrap().to_string();
    let hand = cluster.root.join("hand");
    std::fs::create_dir_all(&hand).unwrap();
    // Deployments answer at `<service>-<project>.localhost`, through the agent's ingress.
    let http = deployer_tests::web_client();

    let mut platform = Vec::new();
    let mut webhook = Vec::new();
    let mut by_hand = Vec::new();
    for i in 0..ITERATIONS {
        // The platform: deploy call to a running deployment whose page answers.
        let page = format!("platform {i}\n");
        write_app(&repo, &base, &page);
        git(&repo, &["commit", "-qam", &format!("v{i}")]);
        let start = Instant::now();
        let (status, d) = api
            .post(&format!("{url}/api/v1/projects/{project_id}/services/{service_id}/deploy"), &json!({}))
            .await
            .unwrap();
        assert_eq!(status, 201, "{d}");
        let id = d["id"].as_str().unwrap().to_string();
        let deployed_url = loop {
            let (_, d) = api.get(&format!("{url}/api/v1/deployments/{id}")).await.unwrap();
            match d["status"].as_str() {
                Some("running") => break d["url"].as_str().unwrap().to_string(),
                Some("failed") => panic!("the deployment failed: {d}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        assert!(answers(&http, &deployed_url, &page).await);
        platform.push(start.elapsed());

        // Push to deploy: the signed webhook of a new commit, until its page answers at the host.
        let page = format!("pushed {i}\n");
        write_app(&repo, &base, &page);
        git(&repo, &["commit", "-qam", &format!("push {i}")]);
        let sha = run(&repo, "git", &["rev-parse", "HEAD"]);
        let body = serde_json::to_vec(&json!({
            "ref": "refs/heads/main",
            "after": sha,
            "deleted": false,
            "repository": {"full_name": "bench/web", "git_url": format!("{}.git", daemon.url("web")), "default_branch": "main"}
        }))
        .unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
        let signature = format!("sha256={}", hex::encode(ring::hmac::sign(&key, &body).as_ref()));
        let start = Instant::now();
        let answer = api
            .client
            .post(format!("{url}/webhooks/github"))
            .header("x-github-event", "push")
            .header("x-github-delivery", format!("bench-{i}"))
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 202);
        while !answers(&http, &deployed_url, &page).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        webhook.push(start.elapsed());

        // By hand: the same build and run with the docker CLI, then poll until the page answers.
        let page = format!("by hand {i}\n");
        write_app(&hand, &base, &page);
        let name = format!("deployer-bench-hand-{}-{i}", std::process::id());
        let tag = format!("deployer-bench-hand:{}-{i}", std::process::id());
        let start = Instant::now();
        run(&hand, "docker", &["build", "-q", "-t", &tag, "."]);
        run(&hand, "docker", &["run", "-d", "--name", &name, "-p", "127.0.0.1::8080", &tag]);
        let port = run(&hand, "docker", &["port", &name, "8080/tcp"]);
        let hand_url = format!("http://{}", port.lines().next().unwrap());
        while !answers(&http, &hand_url, &page).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        by_hand.push(start.elapsed());
        run(&hand, "docker", &["rm", "-f", &name]);
        run(&hand, "docker", &["rmi", "-f", &tag]);
        eprintln!("iteration {i}: platform {:?}, webhook {:?}, by hand {:?}", platform[i], webhook[i], by_hand[i]);
    }
    let (p, w, h) = (median(platform), median(webhook), median(by_hand));
    println!("deploy call -> healthy container, median of {ITERATIONS}:");
    println!("  platform: {p:?}");
    println!(
        "  push webhook -> new page at the service's host: {w:?} ({:+.0} ms against by hand; target: under +1000 ms)",
        w.as_secs_f64() * 1000.0 - h.as_secs_f64() * 1000.0
    );
    println!("  by hand (docker build + docker run + poll): {h:?}");
    println!(
        "  the platform adds {:+.0} ms (ratio {:.2}); target: at most +1000 ms",
        p.as_secs_f64() * 1000.0 - h.as_secs_f64() * 1000.0,
        p.as_secs_f64() / h.as_secs_f64()
    );
    drop(agent);
    let containers =
        run(Path::new("."), "docker", &["ps", "-aq", "--filter", &format!("label=deployer.project={project_id}")]);
    for c in containers.split_whitespace() {
        run(Path::new("."), "docker", &["rm", "-f", c]);
    }
    let images = run(Path::new("."), "docker", &["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    for image in images.lines().filter(|i| i.starts_with(&format!("deployer/{project}/"))) {
        run(Path::new("."), "docker", &["rmi", "-f", image]);
    }
    let _ = Command::new("docker").args(["network", "rm", &format!("deployer-{project_id}")]).output();
}

//! Fixtures of the deploy-path tests: git repositories of a small busybox app, `git daemon`,
//! and a cluster with agents and one project that cleans up after itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{busybox_image, free_port, wait_for, Agent, Cluster};

pub const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);

/// Short liveness settings, so a killed agent is `down` quickly.
pub const FAST: &[&str] = &["--agent-ttl-s", "4", "--agent-disconnect-grace-s", "2"];

pub fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.email=dev@example.com", "-c", "user.name=Dev"])
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("git");
    assert!(status.success(), "git {args:?}");
}

/// A git repository with a Dockerfile that serves `page` with busybox httpd on port 8080.
pub fn make_repo(dir: &Path, base: &str, page: &str) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    write_app(dir, base, page, "");
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "first"]);
}

pub fn write_app(dir: &Path, base: &str, page: &str, extra_step: &str) {
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base}\n{extra_step}COPY index.html /www/index.html\n\
             CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("index.html"), page).unwrap();
}

pub fn commit(dir: &Path, message: &str) {
    git(dir, &["commit", "-qam", message]);
}

/// `git daemon` exporting every repository under `base`, on loopback.
pub struct GitDaemon {
    pub child: Child,
    pub port: u16,
}

impl GitDaemon {
    pub async fn start(base: &Path) -> GitDaemon {
        let port = free_port();
        let child = Command::new("git")
            .args(["daemon", "--export-all", "--reuseaddr", "--listen=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon");
        wait_for("git daemon to listen", Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
        })
        .await
        .unwrap();
        GitDaemon { child, port }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster, agents, and one project; removes every container, network and image of the
/// project when dropped.
pub struct Setup {
    pub cluster: Cluster,
    pub agents: Vec<Agent>,
    pub project_id: String,
    pub project: String,
    pub base: String,
}

impl Setup {
    pub async fn start(controllers: usize, agents: usize, controller_args: &[&str]) -> Setup {
        Setup::start_with(controllers, agents, controller_args, &[]).await
    }

    /// Like [`Setup::start`], with more arguments for every agent.
    pub async fn start_with(
        controllers: usize,
        agents: usize,
        controller_args: &[&str],
        agent_args: &[String],
    ) -> Setup {
        let base = busybox_image().expect("busybox image");
        let cluster = Cluster::start(controllers, controller_args).await.expect("cluster");
        let token = cluster.agent_token().await.expect("agent token");
        let mut started = Vec::new();
        for i in 0..agents {
            let name = format!("agent{i}");
            let mut agent = Agent::new(cluster.root.join(&name));
            let controller = cluster.nodes[0].grpc_addr();
            agent
                .start(
                    &[
                        "--controller".into(),
                        format!("https://{controller}"),
                        "--token".into(),
                        token.clone(),
                        "--hostname".into(),
                        name,
                        "--allow-local-git".into(),
                    ]
                    .into_iter()
                    .chain(agent_args.iter().cloned())
                    .collect::<Vec<String>>(),
                )
                .expect("start agent");
            started.push(agent);
        }
        let url = cluster.nodes[0].url();
        let api = cluster.api.clone();
        wait_for("the agents to be ready", Duration::from_secs(30), || {
            let (api, url) = (api.clone(), url.clone());
            async move {
                let (_, body) = api.get(&format!("{url}/api/v1/agents")).await.ok()?;
                let ready = body.as_array()?.iter().filter(|a| a["status"] == "ready").count();
                (ready == agents).then_some(())
            }
        })
        .await
        .unwrap();
        let project = format!("p{}", &uuid_like()[..10]);
        let (status, body) =
            cluster.api.post(&format!("{url}/api/v1/projects"), &json!({"name": project})).await.unwrap();
        assert_eq!(status, 201, "{body}");
        let project_id = body["id"].as_str().unwrap().to_string();
        Setup { cluster, agents: started, project_id, project, base }
    }

    pub fn url(&self) -> String {
        self.cluster.any_running_url().unwrap()
    }

    pub async fn create_service(&self, spec: Value) -> String {
        let url = format!("{}/api/v1/projects/{}/services", self.url(), self.project_id);
        let (status, body) = self.cluster.api.post(&url, &spec).await.unwrap();
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn deploy(&self, service: &str, body: Value) -> Value {
        let url = format!("{}/api/v1/projects/{}/services/{service}/deploy", self.url(), self.project_id);
        let (status, answer) = self.cluster.api.post(&url, &body).await.unwrap();
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["status"], "queued");
        answer
    }

    pub async fn deployment(&self, id: &str) -> Option<Value> {
        let (status, body) = self.cluster.api.get(&format!("{}/api/v1/deployments/{id}", self.url())).await.ok()?;
        (status == 200).then_some(body)
    }

    /// Waits until the deployment has ended, and returns it.
    pub async fn finished(&self, id: &str) -> Value {
        let result = wait_for(&format!("deployment {id} to end"), DEPLOY_TIMEOUT, || async {
            let d = self.deployment(id).await?;
            matches!(d["status"].as_str(), Some("running" | "failed" | "cancelled" | "superseded")).then_some(d)
        })
        .await;
        result.unwrap_or_else(|e| panic!("{e:#}\n{}", self.diagnostics()))
    }

    pub async fn logs(&self, id: &str) -> Vec<Value> {
        let (status, body) =
            self.cluster.api.get(&format!("{}/api/v1/deployments/{id}/logs", self.url())).await.unwrap();
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }

    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            out += &format!("--- controller {i}\n{}\n", tail(&node.log_text(), 60));
        }
        for (i, agent) in self.agents.iter().enumerate() {
            out += &format!("--- agent {i}\n{}\n", tail(&agent.log_text(), 60));
        }
        out
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.url().replacen("http://", "ws://", 1))
    }

    /// A service built from a local repository whose build takes `seconds` (a `RUN sleep`).
    pub async fn slow_service(&self, name: &str, seconds: u32) -> String {
        let repo = self.cluster.root.join("repos").join(name);
        make_repo(&repo, &self.base, "x");
        slow_app(&repo, &self.base, seconds);
        commit(&repo, "slow");
        let url = format!("file://{}", repo.display());
        self.create_service(json!({"name": name, "source": {"git": {"url": url}}, "port": 8080})).await
    }

    /// Waits until deployment `id` is building past its first step; returns its agent's id and
    /// that agent's index in `agents`.
    pub async fn building(&self, id: &str) -> (String, usize) {
        let d = wait_for("the build to start", Duration::from_secs(30), || async {
            let d = self.deployment(id).await?;
            let logs = self.logs(id).await;
            (d["status"] == "building" && logs.iter().any(|l| l["message"].as_str().unwrap_or("").contains("Step 2/")))
                .then_some(d)
        })
        .await
        .unwrap();
        let agent = d["agent_id"].as_str().unwrap().to_string();
        let index = self
            .agents
            .iter()
            .position(|a| std::fs::read_to_string(a.dir.join("agent.json")).unwrap().contains(&agent))
            .unwrap();
        (agent, index)
    }

    /// The agent directory's project storage.
    pub fn storage(&self, agent: usize) -> PathBuf {
        self.agents[agent].dir.join("projects").join(&self.project_id)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill9();
        }
        let filter = format!("label=deployer.project={}", self.project_id);
        let containers = docker(&["ps", "-aq", "--filter", &filter]);
        for c in containers.split_whitespace() {
            docker(&["rm", "-f", c]);
        }
        docker(&["network", "rm", &format!("deployer-{}", self.project_id)]);
        let images = docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
        for image in images.lines().filter(|i| i.starts_with(&format!("deployer/{}/", self.project))) {
            docker(&["rmi", "-f", image]);
        }
    }
}

pub fn docker(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

/// The body of `GET url`.
pub async fn page(url: &str) -> String {
    crate::web_client().get(url).send().await.expect("GET the deployment's url").text().await.unwrap()
}

pub fn slow_app(dir: &Path, base: &str, seconds: u32) {
    write_app(dir, base, "slow but sure\n", &format!("RUN /bin/busybox sleep {seconds}\n"));
}

//! Harness for end-to-end tests and benchmarks: real `deployer-controller` processes on loopback,
//! free ports, temporary data dirs.
//!
//! The binaries are taken from the cargo target dir next to the running test (build them first
//! with `cargo build --bins`), or from `DEPLOYER_CONTROLLER_BIN`.

pub mod deploy;
pub mod pebble;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// Path of a workspace binary, next to the test executable (`target/<profile>/deps/..`).
pub fn binary(name: &str) -> PathBuf {
    let env = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: run `cargo build --bins` first (or set {env})", path.display());
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// One controller process and its data dir.
pub struct Controller {
    pub dir: PathBuf,
    pub http_port: u16,
    pub grpc_port: u16,
    pub extra_args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Controller {
    pub fn new(dir: PathBuf) -> Controller {
        let log = dir.with_extension("log");
        Controller { dir, http_port: free_port(), grpc_port: free_port(), extra_args: Vec::new(), child: None, log }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// Starts `serve` with `args` appended (e.g. `--join`, `--token`).
    pub fn start(&mut self, args: &[String]) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(binary("deployer-controller"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--http")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--grpc")
            .arg(format!("127.0.0.1:{}", self.grpc_port))
            .args(&self.extra_args)
            .args(args)
            .env("DEPLOYER_LOG", std::env::var("DEPLOYER_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawn deployer-controller")?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id, while the process started by this handle has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("not running") };
        Command::new("kill").arg("-TERM").arg(c.id().to_string()).status()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("controller did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself (e.g. a refused join) and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("not running") };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("controller still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("admin-token"))?.trim().to_string())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One `deployer-agent run` process and its data dir.
pub struct Agent {
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    pub fn new(dir: PathBuf) -> Agent {
        let log = dir.with_extension("log");
        Agent { dir, child: None, log }
    }

    /// Starts `deployer-agent run --data-dir DIR` with `args` (e.g. `--controller`, `--token`)
    /// and a one-second heartbeat unless `args` sets one.
    pub fn start(&mut self, args: &[String]) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(binary("deployer-agent"));
        command.arg("run").arg("--data-dir").arg(&self.dir).args(args);
        if !args.iter().any(|a| a == "--heartbeat-ms") {
            command.args(["--heartbeat-ms", "1000"]);
        }
        // Several agents share this host: each ingress takes free ports on loopback.
        if !args.iter().any(|a| a == "--ingress-http") {
            command.args(["--ingress-http", "127.0.0.1:0"]);
        }
        if !args.iter().any(|a| a == "--ingress-https") {
            command.args(["--ingress-https", "127.0.0.1:0"]);
        }
        let child = command
            .env("DEPLOYER_LOG", std::env::var("DEPLOYER_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("DEPLOYER_JOIN_TOKEN")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawn deployer-agent")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("not running") };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("agent still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP client for the API with a bearer token.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub token: String,
}

impl Api {
    pub fn new(token: &str) -> Api {
        Api {
            client: reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("client"),
            token: token.to_string(),
        }
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<(u16, Value)> {
        let r = self.client.get(url).bearer_auth(&self.token).send().await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    pub async fn post(&self, url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self.client.post(url).bearer_auth(&self.token).json(body).send().await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    pub async fn patch(&self, url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self.client.patch(url).bearer_auth(&self.token).json(body).send().await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    pub async fn delete(&self, url: &str) -> anyhow::Result<u16> {
        let r = self.client.delete(url).bearer_auth(&self.token).send().await?;
        Ok(r.status().as_u16())
    }

    /// POSTs `body` as is (malformed or oversized JSON, another content type), with the token.
    pub async fn post_raw(
        &self,
        url: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<(u16, Value)> {
        answer(
            self.client
                .post(url)
                .bearer_auth(&self.token)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }
}

/// Sends a request built by the caller (e.g. with no or another `Authorization` header) and
/// returns its status and JSON body (`Null` if the body is not JSON).
pub async fn answer(request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
    let r = request.send().await?;
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A cluster of controllers in one temp dir. Node 0 bootstraps; the others join with a token.
pub struct Cluster {
    pub nodes: Vec<Controller>,
    pub api: Api,
    pub root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts `n` controllers with `extra_args` each and waits until all are voters.
    pub async fn start(n: usize, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let tmp = tempfile::Builder::new().prefix("deployer-e2e-").tempdir()?;
        let root = tmp.path().to_path_buf();
        let mut first = Controller::new(root.join("node0"));
        first.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        first.start(&[])?;
        let token = wait_for("the admin token", Duration::from_secs(20), || {
            let t = first.admin_token().ok();
            async move { t }
        })
        .await
        .with_context(|| format!("node0 did not bootstrap; its output:\n{}", first.log_text()))?;
        let api = Api::new(&token);
        let mut cluster = Cluster { nodes: vec![first], api, root, _tmp: Some(tmp) };
        cluster.wait_voters(1).await?;
        for i in 1..n {
            cluster.add_node(i).await?;
        }
        cluster.wait_voters(n).await?;
        cluster.wait_serving(n).await?;
        Ok(cluster)
    }

    /// Waits until every running node itself answers its cluster view with `n` voters and a
    /// leader. Being listed as a voter by the leader is not enough: a node authenticates API
    /// tokens against its own copy of the state, which may still lag behind (it answers 401 to
    /// the admin token until it has applied the entry that created it).
    pub async fn wait_serving(&self, n: usize) -> anyhow::Result<()> {
        wait_for(&format!("every node to serve with {n} voters"), Duration::from_secs(60), || async {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                let v = self.cluster_view(i).await.ok()?;
                let voters = v["nodes"].as_array()?.iter().filter(|n| n["voter"] == true).count();
                if voters != n || v["leader_id"].is_null() {
                    return None;
                }
            }
            Some(())
        })
        .await
    }

    /// Keeps the data dirs after the test (for debugging a failure).
    pub fn keep_files(&mut self) {
        if let Some(tmp) = self._tmp.take() {
            let _ = tmp.keep();
        }
    }

    pub async fn join_token(&self) -> anyhow::Result<String> {
        self.token_of_kind("controller").await
    }

    pub async fn agent_token(&self) -> anyhow::Result<String> {
        self.token_of_kind("agent").await
    }

    async fn token_of_kind(&self, kind: &str) -> anyhow::Result<String> {
        let url = format!("{}/api/v1/cluster/tokens", self.any_running_url()?);
        let (status, body) = self.api.post(&url, &serde_json::json!({"kind": kind})).await?;
        if status != 201 {
            bail!("token creation answered {status}: {body}");
        }
        Ok(body["token"].as_str().unwrap_or_default().to_string())
    }

    /// Starts node `i` (a new data dir) joining through node 0 or any running node.
    pub async fn add_node(&mut self, i: usize) -> anyhow::Result<()> {
        let token = self.join_token().await?;
        let peer = self.nodes.iter().find(|n| n.child.is_some()).map(|n| n.grpc_addr()).context("no running node")?;
        let mut node = Controller::new(self.root.join(format!("node{i}")));
        node.extra_args = self.nodes[0].extra_args.clone();
        node.start(&["--join".into(), format!("https://{peer}"), "--token".into(), token])?;
        self.nodes.push(node);
        Ok(())
    }

    pub fn any_running_url(&self) -> anyhow::Result<String> {
        self.nodes.iter().find(|n| n.child.is_some()).map(|n| n.url()).context("no running node")
    }

    /// `GET /api/v1/cluster` from node `i`.
    pub async fn cluster_view(&self, i: usize) -> anyhow::Result<Value> {
        let (status, body) = self.api.get(&format!("{}/api/v1/cluster", self.nodes[i].url())).await?;
        if status != 200 {
            bail!("cluster view answered {status}: {body}");
        }
        Ok(body)
    }

    /// Waits until a running node reports `n` voters and a leader.
    pub async fn wait_voters(&self, n: usize) -> anyhow::Result<()> {
        wait_for(&format!("{n} voters"), Duration::from_secs(60), || async {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                if let Ok(v) = self.cluster_view(i).await {
                    let voters = v["nodes"].as_array().map(|a| a.iter().filter(|n| n["voter"] == true).count());
                    if voters == Some(n) && !v["leader_id"].is_null() {
                        return Some(());
                    }
                }
            }
            None
        })
        .await
    }

    /// Index (in `nodes`) of the node that the running nodes agree is leader.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        wait_for("a leader", Duration::from_secs(30), || async {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                let Ok(v) = self.cluster_view(i).await else { continue };
                let Some(leader_id) = v["leader_id"].as_u64() else { continue };
                let addr = v["nodes"].as_array()?.iter().find(|n| n["id"].as_u64() == Some(leader_id))?["addr"]
                    .as_str()?
                    .to_string();
                if let Some(j) = self.nodes.iter().position(|n| n.grpc_addr() == addr && n.child.is_some()) {
                    return Some(j);
                }
            }
            None
        })
        .await
    }

    pub async fn create_project(&self, i: usize, name: &str) -> anyhow::Result<(u16, Value)> {
        self.api.post(&format!("{}/api/v1/projects", self.nodes[i].url()), &serde_json::json!({ "name": name })).await
    }

    /// Project names as node `i` lists them.
    pub async fn project_names(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let (status, body) = self.api.get(&format!("{}/api/v1/projects?limit=1000", self.nodes[i].url())).await?;
        if status != 200 {
            bail!("listing projects answered {status}: {body}");
        }
        Ok(body
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["name"].as_str().map(String::from)).collect())
            .unwrap_or_default())
    }
}

/// Files under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(p);
                }
            }
        }
    }
    found
}

/// A lazily connecting gRPC channel to a controller's `--grpc` address (`host:port`) over the
/// given rustls configuration, e.g. `deployer_common::tls::controller_client_config` with or
/// without a client certificate. The server is verified by that configuration (cluster CA and
/// identity), not by the dialed name, as the controllers do between themselves.
pub fn grpc_channel(
    addr: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> anyhow::Result<tonic::transport::Channel> {
    // Our connector does the TLS, so tonic gets an http:// URI and must not add its own.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15));
    Ok(endpoint.connect_with_connector_lazy(TlsConnector { config: tls }))
}

#[derive(Clone)]
struct TlsConnector {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
            let host = uri.host().ok_or_else(|| invalid("address has no host"))?.to_string();
            let port = uri.port_u16().ok_or_else(|| invalid("address has no port"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let name = rustls::pki_types::ServerName::try_from(host).map_err(|_| invalid("bad host"))?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A local image with busybox (from Debian's `busybox-static`) as its whole root filesystem:
/// no registry is reachable, so tests make their own. Imported once per machine.
pub fn busybox_image() -> anyhow::Result<String> {
    const IMAGE: &str = "deployer-test/busybox:1";
    let exists =
        Command::new("docker").args(["image", "inspect", IMAGE]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if exists.is_ok_and(|s| s.success()) {
        return Ok(IMAGE.to_string());
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox not found: install Debian's busybox-static (scripts/test does)");
    }
    let root = tempfile::tempdir()?;
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(busybox, bin.join("busybox"))?;
    for applet in ["sh", "sleep", "cat", "ls", "echo", "httpd", "wget"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    std::fs::create_dir_all(root.path().join("tmp"))?;
    let tar = root.path().with_extension("tar");
    let status = Command::new("tar").arg("-C").arg(root.path()).arg("-cf").arg(&tar).arg(".").status()?;
    if !status.success() {
        bail!("tar failed");
    }
    let out = Command::new("docker").arg("import").arg(&tar).arg(IMAGE).output()?;
    let _ = std::fs::remove_file(&tar);
    if !out.status.success() {
        bail!("docker import failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(IMAGE.to_string())
}

/// An HTTP client for what the ingress serves: `*.localhost` resolves to loopback (as it does in
/// curl and browsers, though not through the C library here), other names as usual.
pub fn web_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .dns_resolver(std::sync::Arc::new(LocalhostResolver))
        .build()
        .expect("client")
}

struct LocalhostResolver;

impl reqwest::dns::Resolve for LocalhostResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_string();
        Box::pin(async move {
            if name == "localhost" || name.ends_with(".localhost") {
                let addrs: reqwest::dns::Addrs =
                    Box::new(std::iter::once(std::net::SocketAddr::from(([127, 0, 0, 1], 0))));
                return Ok(addrs);
            }
            let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let addrs: reqwest::dns::Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

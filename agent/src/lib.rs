//! The Deployer agent: one per Docker host. It joins the cluster with a token, keeps one
//! mutual-TLS session with the controller leader, and reports host and container metrics.

pub mod devimage;
pub mod docker;
pub mod identity;
pub mod ingress;
pub mod metrics;
pub mod routing;
pub mod runtime;
pub mod session;
pub mod source;
pub mod tasks;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use identity::Paths;

/// Everything `deployer-agent run` needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// gRPC address of a controller: `https://HOST:PORT`.
    pub controller: String,
    /// Join token; needed only on the first start.
    pub token: Option<String>,
    pub data_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// Reported host name (default: the kernel's).
    pub hostname: Option<String>,
    /// Docker engine address (default: `DOCKER_HOST`, else the local socket).
    pub docker_host: Option<String>,
    pub heartbeat_interval: Duration,
    /// Root of the deployments' sources and results (default: the data dir).
    pub storage: Option<PathBuf>,
    /// Whether `file://` git URLs may be cloned (dev mode; never on a shared host).
    pub allow_file_git: bool,
    /// Where the ingress listens.
    pub ingress: routing::IngressConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Docker(String),
    #[error("{0}")]
    Identity(String),
    /// The cluster said no (a bad token, a refused CSR).
    #[error("{0}")]
    Refused(String),
    /// This agent was revoked.
    #[error("{0}")]
    Revoked(String),
    #[error("{0}")]
    Unreachable(String),
}

impl AgentError {
    /// sysexits-style exit codes, so a service manager can tell the cases apart.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => 64,      // EX_USAGE
            AgentError::Docker(_) => 69,      // EX_UNAVAILABLE
            AgentError::Unreachable(_) => 69, // EX_UNAVAILABLE
            AgentError::Identity(_) => 74,    // EX_IOERR
            AgentError::Refused(_) => 77,     // EX_NOPERM
            AgentError::Revoked(_) => 77,     // EX_NOPERM
        }
    }
}

/// The host name the kernel reports.
pub fn kernel_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs the agent until `shutdown` resolves: connects to Docker, joins on first start, then
/// keeps a session with the leader.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    deployer_common::tls::install_crypto_provider();
    if !config.controller.starts_with("https://") {
        return Err(AgentError::Config(format!(
            "--controller must look like https://HOST:PORT (a controller's gRPC address), not {:?}",
            config.controller
        )));
    }
    if config.heartbeat_interval < Duration::from_millis(100) {
        return Err(AgentError::Config("the heartbeat interval must be at least 100 ms".into()));
    }
    if let Some(token) = &config.token {
        deployer_common::token::JoinToken::parse(token)
            .map_err(|e| AgentError::Config(format!("invalid --token: {e}")))?;
    }
    let docker = docker::connect(config.docker_host.as_deref(), Duration::from_secs(5))
        .await
        .map_err(|e| AgentError::Docker(e.to_string()))?;
    let docker_version = docker.version().await.unwrap_or_default();
    tracing::info!(docker = %docker_version, "connected to the Docker engine");

    let paths = Paths { dir: config.data_dir.clone() };
    let hostname = config.hostname.clone().unwrap_or_else(kernel_hostname);
    let (credentials, state) = match paths.load()? {
        Some(found) => {
            tracing::info!(agent = %found.0.agent_id, "resuming with the identity in {}", paths.dir.display());
            found
        }
        None => {
            let token = config.token.as_deref().ok_or_else(|| {
                AgentError::Config(format!(
                    "{} holds no agent identity yet: pass --token (an agent join token) to join the cluster",
                    paths.dir.display()
                ))
            })?;
            let joined = identity::join(&paths, &config.controller, token, &hostname, &config.labels).await?;
            tracing::info!(agent = %joined.0.agent_id, "joined the cluster");
            joined
        }
    };
    let storage = config.storage.clone().unwrap_or_else(|| config.data_dir.clone());
    let (stop_ingress, ingress_stopped) = tokio::sync::watch::channel(false);
    let ingress = routing::Ingress::start(
        &config.ingress,
        docker.clone(),
        credentials.agent_id.clone(),
        &paths.dir,
        ingress_stopped,
    )
    .await?;
    let tasks = tasks::Tasks::new(tasks::TaskContext {
        docker: docker.clone(),
        agent_id: credentials.agent_id.clone(),
        storage,
        allow_file_git: config.allow_file_git,
        ingress: ingress.clone(),
    });
    let watcher = tokio::spawn(tasks.clone().watch_crashes());
    let result = session::run(
        session::Session {
            paths: paths.clone(),
            credentials,
            state,
            first_controller: config.controller.clone(),
            hostname,
            labels: config.labels.clone(),
            heartbeat_interval: config.heartbeat_interval,
            docker,
            docker_version,
            tasks,
            ingress,
        },
        shutdown,
    )
    .await;
    watcher.abort();
    let _ = stop_ingress.send(true);
    if let Err(AgentError::Revoked(message)) = &result {
        return match paths.retire() {
            Ok(aside) => Err(AgentError::Revoked(format!(
                "{message}. Its identity was moved to {}; to bring this host back, run again with a new agent token (--token)",
                aside.display()
            ))),
            Err(e) => Err(AgentError::Revoked(format!("{message} ({e})"))),
        };
    }
    result
}

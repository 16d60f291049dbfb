use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use deployer_controller::acme::AcmeConfig;
use deployer_controller::agents::AgentSettings;
use deployer_controller::deploy::DeploySettings;
use deployer_controller::ingress::IngressSettings;
use deployer_controller::node::DevAgent;
use deployer_controller::raft::RaftTuning;
use deployer_controller::{serve, ServeConfig};
use tokio::net::TcpListener;

/// mimalloc rather than glibc's allocator: malloc and free took about a tenth of the leader's
/// CPU under write load (perf, 64 clients), for the many short-lived buffers of each request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Deployer controller: control plane, API and scheduler.
#[derive(Parser)]
#[command(name = "deployer-controller", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a controller node: bootstrap a cluster on an empty data dir, join one with --join and
    /// --token, or resume from the data dir.
    Serve(ServeArgs),
    /// One controller node on this machine under ./.deployer, for development.
    Dev(DevArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Where this node keeps its Raft log, state, keys and certificates.
    #[arg(long, env = "DEPLOYER_DATA_DIR")]
    data_dir: PathBuf,
    /// HTTP API listen address.
    #[arg(long, env = "DEPLOYER_HTTP_ADDR", default_value = "127.0.0.1:7700")]
    http: SocketAddr,
    /// gRPC (mutual TLS) listen address, for controllers and agents.
    #[arg(long, env = "DEPLOYER_GRPC_ADDR", default_value = "127.0.0.1:7701")]
    grpc: SocketAddr,
    /// Address peers use to reach this node's gRPC port (default: the listen address).
    #[arg(long, env = "DEPLOYER_ADVERTISE_GRPC")]
    advertise_grpc: Option<String>,
    /// Address clients use to reach this node's HTTP API (default: the listen address).
    #[arg(long, env = "DEPLOYER_ADVERTISE_HTTP")]
    advertise_http: Option<String>,
    /// gRPC address of a member to join, as https://HOST:PORT.
    #[arg(long, env = "DEPLOYER_JOIN", requires = "token")]
    join: Option<String>,
    /// Controller join token (DPLY1.<ca fingerprint>.<secret>), from POST /api/v1/cluster/tokens.
    #[arg(long, env = "DEPLOYER_JOIN_TOKEN")]
    token: Option<String>,
    #[command(flatten)]
    tuning: TuningArgs,
    #[command(flatten)]
    agents: AgentArgs,
    #[command(flatten)]
    deploys: DeployArgs,
    #[command(flatten)]
    ingress: IngressArgs,
}

#[derive(Args, Clone)]
struct DeployArgs {
    /// Deployment attempts in progress at once, cluster-wide.
    #[arg(long, env = "DEPLOYER_MAX_CONCURRENT_DEPLOYMENTS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    max_concurrent_deployments: u64,
    /// Times a failed attempt is tried again (transient failures: Docker or network errors).
    #[arg(long, env = "DEPLOYER_DEPLOY_RETRIES", default_value_t = 3)]
    deploy_retries: u32,
    /// Seconds before the first retry; doubled for each one after.
    #[arg(long, env = "DEPLOYER_DEPLOY_RETRY_BASE_S", default_value_t = 2)]
    deploy_retry_base_s: u64,
    /// Seconds a new instance may take to pass its health check (a service's own
    /// `health_check.timeout_s` wins).
    #[arg(long, env = "DEPLOYER_HEALTH_TIMEOUT_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    health_timeout_s: u64,
    /// Deployments whose sources, images and uploads are kept per service.
    #[arg(long, env = "DEPLOYER_KEEP_DEPLOYMENTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    keep_deployments: u32,
    /// Largest source upload, bytes.
    #[arg(long, env = "DEPLOYER_MAX_UPLOAD_BYTES", default_value_t = 256 << 20)]
    max_upload_bytes: u64,
    /// Secret of the git webhooks (GitHub's signature, GitLab's token) of every project that has
    /// no secret of its own.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Seconds a replaced webhook or deploy hook secret stays valid.
    #[arg(long, env = "DEPLOYER_WEBHOOK_GRACE_S", default_value_t = 24 * 3600)]
    webhook_grace_s: u64,
    /// Largest webhook body, bytes.
    #[arg(long, env = "DEPLOYER_WEBHOOK_MAX_BYTES", default_value_t = 5 << 20)]
    webhook_max_bytes: usize,
    /// Seconds without a push after which a preview environment is destroyed.
    #[arg(long, env = "DEPLOYER_PREVIEW_TTL_S", default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    preview_ttl_s: u64,
    /// A GitHub token to set commit statuses and comment on pull requests with.
    #[arg(long, env = "GITHUB_TOKEN", hide_env_values = true)]
    github_token: Option<String>,
    /// A GitHub App to do it as instead (with --github-app-private-key, its PEM key).
    #[arg(long, env = "GITHUB_APP_ID")]
    github_app_id: Option<String>,
    #[arg(long, env = "GITHUB_APP_PRIVATE_KEY", hide_env_values = true, requires = "github_app_id")]
    github_app_private_key: Option<String>,
    /// GitHub's API (GitHub Enterprise: https://HOST/api/v3).
    #[arg(long, env = "DEPLOYER_GITHUB_API_URL", default_value = "https://api.github.com")]
    github_api_url: String,
    /// A GitLab access token to set commit statuses and comment on merge requests with.
    #[arg(long, env = "GITLAB_ACCESS_TOKEN", hide_env_values = true)]
    gitlab_access_token: Option<String>,
    /// The GitLab instance.
    #[arg(long, env = "DEPLOYER_GITLAB_URL", default_value = "https://gitlab.com")]
    gitlab_url: String,
}

#[derive(Args, Clone)]
struct IngressArgs {
    /// Services answer at <service>-<project>.<base domain> on every agent's ingress.
    #[arg(long, env = "DEPLOYER_BASE_DOMAIN", default_value = "localhost")]
    base_domain: String,
    /// ACME directory custom domains get their certificates from (e.g. Let's Encrypt's
    /// https://acme-v02.api.letsencrypt.org/directory). Without it, custom domains are served
    /// over plain HTTP only.
    #[arg(long, env = "DEPLOYER_ACME_DIRECTORY")]
    acme_directory: Option<String>,
    /// Contact address given to the ACME server.
    #[arg(long, env = "DEPLOYER_ACME_EMAIL")]
    acme_email: Option<String>,
    /// PEM file of the roots to trust for the ACME server's own HTTPS instead of the system's
    /// (a private ACME server).
    #[arg(long, env = "DEPLOYER_ACME_CA_FILE")]
    acme_ca_file: Option<PathBuf>,
}

impl IngressArgs {
    fn settings(&self) -> Result<IngressSettings, ConfigError> {
        let base = self.base_domain.trim_end_matches('.').to_ascii_lowercase();
        if deployer_controller::api::services::validate_domain(&base).is_err() && base != "localhost" {
            return Err(ConfigError(format!("--base-domain {:?} is not a host name", self.base_domain)));
        }
        let extra_roots_pem = match &self.acme_ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read --acme-ca-file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let acme = self.acme_directory.clone().map(|directory_url| AcmeConfig {
            directory_url,
            contact_email: self.acme_email.clone(),
            trusted_roots_pem: extra_roots_pem,
        });
        Ok(IngressSettings { base_domain: base, acme })
    }
}

impl From<DeployArgs> for DeploySettings {
    fn from(a: DeployArgs) -> DeploySettings {
        DeploySettings {
            max_concurrent: a.max_concurrent_deployments as usize,
            retries: a.deploy_retries,
            retry_base: Duration::from_secs(a.deploy_retry_base_s),
            health_timeout: Duration::from_secs(a.health_timeout_s),
            keep: a.keep_deployments,
            max_upload_bytes: a.max_upload_bytes,
            webhook_secret: a.webhook_secret.filter(|s| !s.is_empty()),
            webhook_grace: Duration::from_secs(a.webhook_grace_s),
            webhook_max_bytes: a.webhook_max_bytes,
            preview_ttl: Duration::from_secs(a.preview_ttl_s),
            git_hosts: deployer_controller::deploy::notify::GitHostSettings {
                github_token: a.github_token.filter(|t| !t.is_empty()),
                github_app: a.github_app_id.zip(a.github_app_private_key),
                github_api_url: a.github_api_url,
                gitlab_token: a.gitlab_access_token.filter(|t| !t.is_empty()),
                gitlab_url: a.gitlab_url,
                roots_pem: None,
            },
        }
    }
}

#[derive(Args)]
struct AgentArgs {
    /// Mark an agent down when no heartbeat arrived for this many seconds.
    #[arg(long, env = "DEPLOYER_AGENT_TTL_S", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    agent_ttl_s: u64,
    /// Mark an agent down this many seconds after its session dropped, unless it is back.
    #[arg(long, env = "DEPLOYER_AGENT_DISCONNECT_GRACE_S", default_value_t = 3)]
    agent_disconnect_grace_s: u64,
    /// Lifetime of agent certificates, seconds; agents renew after two thirds of it.
    #[arg(long, env = "DEPLOYER_AGENT_CERT_TTL_S", default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(3..))]
    agent_cert_ttl_s: u64,
}

impl From<AgentArgs> for AgentSettings {
    fn from(a: AgentArgs) -> AgentSettings {
        AgentSettings {
            ttl: Duration::from_secs(a.agent_ttl_s),
            disconnect_grace: Duration::from_secs(a.agent_disconnect_grace_s),
            cert_ttl: Duration::from_secs(a.agent_cert_ttl_s),
        }
    }
}

#[derive(Args)]
struct DevArgs {
    #[arg(long, env = "DEPLOYER_DATA_DIR", default_value = ".deployer")]
    data_dir: PathBuf,
    /// HTTP API listen address; a free port is used if this one is taken.
    #[arg(long, env = "DEPLOYER_HTTP_ADDR", default_value = "127.0.0.1:7700")]
    http: SocketAddr,
    #[arg(long, env = "DEPLOYER_GRPC_ADDR", default_value = "127.0.0.1:7701")]
    grpc: SocketAddr,
    /// Do not run the in-process agent (no Docker engine needed).
    #[arg(long)]
    no_agent: bool,
    /// Docker engine for the in-process agent: unix:///path or tcp://host:port (default:
    /// DOCKER_HOST, else /var/run/docker.sock).
    #[arg(long)]
    docker_host: Option<String>,
    #[command(flatten)]
    deploys: DeployArgs,
    #[command(flatten)]
    ingress: IngressArgs,
}

#[derive(Args)]
struct TuningArgs {
    /// Raft heartbeat interval, milliseconds.
    #[arg(long, env = "DEPLOYER_RAFT_HEARTBEAT_MS", default_value_t = RaftTuning::default().heartbeat_ms)]
    raft_heartbeat_ms: u64,
    /// Raft election timeout range, milliseconds.
    #[arg(long, env = "DEPLOYER_RAFT_ELECTION_MIN_MS", default_value_t = RaftTuning::default().election_min_ms)]
    raft_election_min_ms: u64,
    #[arg(long, env = "DEPLOYER_RAFT_ELECTION_MAX_MS", default_value_t = RaftTuning::default().election_max_ms)]
    raft_election_max_ms: u64,
    /// Take a snapshot (and purge the log behind it) after this many entries.
    #[arg(long, env = "DEPLOYER_RAFT_SNAPSHOT_LOGS", default_value_t = RaftTuning::default().snapshot_after_logs)]
    raft_snapshot_logs: u64,
    /// Log entries kept behind a snapshot for lagging followers.
    #[arg(long, env = "DEPLOYER_RAFT_KEEP_LOGS", default_value_t = RaftTuning::default().keep_logs_after_snapshot)]
    raft_keep_logs: u64,
    /// Size of the chunks a snapshot is sent in.
    #[arg(long, env = "DEPLOYER_RAFT_SNAPSHOT_CHUNK_BYTES", default_value_t = RaftTuning::default().snapshot_chunk_bytes)]
    raft_snapshot_chunk_bytes: u64,
}

impl From<TuningArgs> for RaftTuning {
    fn from(a: TuningArgs) -> RaftTuning {
        RaftTuning {
            heartbeat_ms: a.raft_heartbeat_ms,
            election_min_ms: a.raft_election_min_ms,
            election_max_ms: a.raft_election_max_ms,
            snapshot_after_logs: a.raft_snapshot_logs,
            keep_logs_after_snapshot: a.raft_keep_logs,
            snapshot_chunk_bytes: a.raft_snapshot_chunk_bytes,
        }
    }
}

/// Exit code for bad configuration (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOYER_LOG")
                .unwrap_or_else(|_| "info,openraft=warn,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EX_USAGE)
            } else if e.downcast_ref::<DockerUnavailable>().is_some() {
                ExitCode::from(EX_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

/// Exit code when the Docker engine cannot be reached (sysexits EX_UNAVAILABLE).
const EX_UNAVAILABLE: u8 = 69;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DockerUnavailable(String);

async fn bind(addr: SocketAddr, what: &str, fallback_to_free_port: bool) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if fallback_to_free_port && e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::new(addr.ip(), 0);
            Ok(TcpListener::bind(any).await.with_context(|| format!("cannot bind the {what} address {any}"))?)
        }
        Err(e) => Err(ConfigError(format!("cannot bind the {what} address {addr}: {e}")).into()),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let http = bind(args.http, "--http", false).await?;
            let grpc = bind(args.grpc, "--grpc", false).await?;
            let config = ServeConfig {
                data_dir: args.data_dir,
                advertise_grpc: args.advertise_grpc,
                advertise_http: args.advertise_http,
                join: args.join,
                token: args.token,
                tuning: args.tuning.into(),
                agents: args.agents.into(),
                deploys: args.deploys.into(),
                ingress: args.ingress.settings()?,
                dev_agent: None,
            };
            if let Some(token) = &config.token {
                deployer_common::token::JoinToken::parse(token)
                    .map_err(|e| ConfigError(format!("invalid --token: {e}")))?;
            }
            if config.join.as_deref().is_some_and(|j| !j.starts_with("https://")) {
                return Err(ConfigError(
                    "--join must look like https://HOST:PORT (a controller's gRPC address)".into(),
                )
                .into());
            }
            serve(config, http, grpc, shutdown_signal()).await
        }
        Command::Dev(args) => {
            let http = bind(args.http, "--http", true).await?;
            let grpc = bind(args.grpc, "--grpc", true).await?;
            let url = format!("http://{}", http.local_addr()?);
            let token_path = args.data_dir.join("admin-token");
            let mut config = ServeConfig {
                data_dir: args.data_dir,
                advertise_grpc: None,
                advertise_http: None,
                join: None,
                token: None,
                tuning: RaftTuning::default(),
                agents: AgentSettings::default(),
                deploys: args.deploys.clone().into(),
                ingress: args.ingress.settings()?,
                dev_agent: None,
            };
            if !args.no_agent {
                // Fail now, clearly, rather than run a platform that cannot start anything.
                let docker =
                    match deployer_agent::docker::connect(args.docker_host.as_deref(), Duration::from_secs(5)).await {
                        Ok(docker) => docker,
                        Err(e) => {
                            return Err(
                                DockerUnavailable(format!("{e}; or run `deployer-controller dev --no-agent`")).into()
                            )
                        }
                    };
                // The examples' base image, made locally: no registry is needed.
                match deployer_agent::devimage::ensure(&docker).await {
                    Ok(true) => {}
                    Ok(false) => eprintln!(
                        "note: /bin/busybox is missing, so the examples' base image {}:{} was not made \
                         (apt-get install busybox-static)",
                        deployer_agent::devimage::REPOSITORY,
                        deployer_agent::devimage::TAG
                    ),
                    Err(e) => eprintln!("note: {e}"),
                }
                config.dev_agent =
                    Some(DevAgent { data_dir: config.data_dir.join("agent"), docker_host: args.docker_host });
            }
            eprintln!();
            eprintln!("  Deployer (dev mode)");
            eprintln!("  API:          {url}/api/v1/health");
            eprintln!("  Admin token:  {}", token_path.display());
            eprintln!(
                "  Try:          curl -H \"Authorization: Bearer $(cat {})\" {url}/api/v1/cluster",
                token_path.display()
            );
            if !args.no_agent {
                eprintln!(
                    "  Deploy:       DEPLOYER_URL={url} DEPLOYER_TOKEN=$(cat {}) deployer up examples/hello",
                    token_path.display()
                );
            }
            eprintln!();
            serve(config, http, grpc, shutdown_signal()).await
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received; draining (send it again to exit now)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

//! `deployer-agent`: runs on each Docker host (DESIGN.md section 6).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use deployer_agent::AgentConfig;

/// The Deployer agent: builds and runs services on this Docker host.
#[derive(Parser)]
#[command(name = "deployer-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the cluster (first start) and serve the controller's tasks.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// A controller's gRPC address, as https://HOST:PORT.
    #[arg(long, env = "DEPLOYER_CONTROLLER")]
    controller: String,
    /// Agent join token (DPLY1.<ca fingerprint>.<secret>), from `deployer cluster token create --kind agent`.
    /// Needed only on the first start; later starts reuse the identity in the data dir.
    #[arg(long, env = "DEPLOYER_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the agent keeps its identity (tls/) and state.
    #[arg(long, env = "DEPLOYER_DATA_DIR")]
    data_dir: PathBuf,
    /// Labels for placement constraints: k=v,k2=v2.
    #[arg(long, env = "DEPLOYER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Host name to report (default: the kernel's).
    #[arg(long, env = "DEPLOYER_HOSTNAME")]
    hostname: Option<String>,
    /// Docker engine address: unix:///path, tcp://host:port (default: DOCKER_HOST, else the local socket).
    #[arg(long)]
    docker_host: Option<String>,
    /// Milliseconds between heartbeats.
    #[arg(long, env = "DEPLOYER_HEARTBEAT_MS", default_value_t = 5000)]
    heartbeat_ms: u64,
    /// Root of the deployments' sources and results: projects/<projectId>/{sources,deployments}
    /// (default: the data dir).
    #[arg(long, env = "DEPLOYER_STORAGE_PATH")]
    storage_path: Option<PathBuf>,
    /// Let services clone file:// git URLs from this host's disk. Off by default: a project
    /// could otherwise read any repository the agent can.
    #[arg(long, env = "DEPLOYER_ALLOW_LOCAL_GIT")]
    allow_local_git: bool,
    /// Where the ingress serves plain HTTP, ADDR:PORT; `none` runs no ingress on this host.
    #[arg(long, env = "DEPLOYER_INGRESS_HTTP", default_value = "0.0.0.0:80", value_parser = parse_listen)]
    ingress_http: Listen,
    /// Where the ingress serves HTTPS, ADDR:PORT; `none` serves no HTTPS.
    #[arg(long, env = "DEPLOYER_INGRESS_HTTPS", default_value = "0.0.0.0:443", value_parser = parse_listen)]
    ingress_https: Listen,
    /// The host name or IP other agents reach this one's ingress at (default: the address the
    /// controller sees this agent's session come from).
    #[arg(long, env = "DEPLOYER_INGRESS_ADVERTISE")]
    ingress_advertise: Option<String>,
    /// Seconds a replaced instance may take to finish its requests in flight before it stops.
    #[arg(long, env = "DEPLOYER_DRAIN_GRACE_S", default_value_t = 30)]
    drain_grace_s: u64,
    /// Threads serving ingress connections (default: one per core).
    #[arg(long, env = "DEPLOYER_INGRESS_THREADS")]
    ingress_threads: Option<usize>,
}

/// A listen address, or none.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Listen(Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|_| format!("{s:?} is not ADDR:PORT (like 0.0.0.0:80) or `none`"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not a label: write key=value")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOYER_LOG").unwrap_or_else(|_| "info,h2=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One thread: the agent is mostly idle and must stay small.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Command::Run(args) = cli.command;
    let config = AgentConfig {
        controller: args.controller,
        token: args.token,
        data_dir: args.data_dir,
        labels: args.labels.into_iter().collect(),
        hostname: args.hostname,
        docker_host: args.docker_host,
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        storage: args.storage_path,
        allow_file_git: args.allow_local_git,
        ingress: deployer_agent::routing::IngressConfig {
            http: args.ingress_http.0,
            https: args.ingress_https.0,
            advertise_host: args.ingress_advertise,
            drain_grace: Duration::from_secs(args.drain_grace_s),
            threads: args
                .ingress_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)),
            fallback_to_free_port: false,
        },
    };
    match runtime.block_on(deployer_agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Resolves on SIGINT or SIGTERM. Containers keep running: the agent never stops them on exit.
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
    tracing::info!("signal received; closing the session");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn labels_are_key_value_pairs() {
        assert_eq!(parse_label("zone=eu-1"), Ok(("zone".into(), "eu-1".into())));
        assert_eq!(parse_label("gpu="), Ok(("gpu".into(), "".into())));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn ingress_listeners_are_addresses_or_none() {
        assert_eq!(parse_listen("127.0.0.1:8080"), Ok(Listen(Some(([127, 0, 0, 1], 8080).into()))));
        assert_eq!(parse_listen("none"), Ok(Listen(None)));
        assert!(parse_listen("8080").is_err());
    }
}

//! Connection to the local Docker engine, and the per-container samples the agent reports.
//!
//! The agent only ever looks at containers that carry both `deployer.managed=true` and
//! `deployer.agent=<its id>`; everything else on the host belongs to someone else.

use std::collections::HashMap;
use std::io;
use std::pin::pin;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerMemoryStats, ContainerStatsResponse, SystemVersion};
use bollard::query_parameters::{ListContainersOptionsBuilder, StatsOptionsBuilder};
use bollard::{BollardRequest, ClientVersion, API_DEFAULT_VERSION};
use futures::StreamExt;

/// Label set to `"true"` on every container the platform created.
pub const LABEL_MANAGED: &str = "deployer.managed";
/// Label holding the id of the agent that owns the container.
pub const LABEL_AGENT: &str = "deployer.agent";
/// Label holding the project name.
pub const LABEL_PROJECT: &str = "deployer.project";
/// Label holding the service name within the project.
pub const LABEL_SERVICE: &str = "deployer.service";
/// Label holding the deployment id that created the container.
pub const LABEL_DEPLOYMENT: &str = "deployer.deployment";
/// Label holding the preview environment a container belongs to; absent for the service's own.
pub const LABEL_PREVIEW: &str = "deployer.preview";

/// The engine address used when neither `--docker-host` nor `DOCKER_HOST` is given.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Per-request deadline once connected; a stats sample takes about one second by itself.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many containers are sampled at once.
const STATS_CONCURRENCY: usize = 8;

const HINT_START: &str = "is dockerd running? set DOCKER_HOST or --docker-host";
const HINT_PERMISSION: &str = "run the agent as root or add its user to the docker group";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "invalid Docker host {host:?}: {reason} (use unix:///path/to/docker.sock, tcp://host:port or http://host:port)"
    )]
    InvalidHost { host: String, reason: String },
    #[error("cannot reach the Docker engine at {address}: {reason} ({hint})")]
    Unreachable { address: String, reason: String, hint: &'static str },
    #[error(
        "the Docker engine at {address} did not answer within {timeout:?} (is dockerd running and responsive? set DOCKER_HOST or --docker-host)"
    )]
    Timeout { address: String, timeout: Duration },
    #[error("the Docker engine at {address} cannot be used: {reason}")]
    Incompatible { address: String, reason: String },
    #[error("Docker engine request failed: {operation}")]
    Request {
        operation: String,
        #[source]
        source: BollardError,
    },
}

/// A connected Docker engine, speaking the newest API version both sides understand.
#[derive(Clone, Debug)]
pub struct Docker {
    api: bollard::Docker,
    address: String,
}

/// One sample of a managed, running container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerStats {
    pub id: String,
    pub name: String,
    pub project: Option<String>,
    pub service: Option<String>,
    pub deployment: Option<String>,
    /// As `docker stats` shows it: 100 is one full CPU, so it can exceed 100 on several cores.
    pub cpu_percent: f64,
    /// Usage without the inactive page cache, as `docker stats` shows it.
    pub memory_used_bytes: u64,
    /// The container's memory limit, or the host's memory when it has none.
    pub memory_limit_bytes: u64,
}

/// Connects to the engine at `docker_host` (or `DOCKER_HOST`, or the local socket), pings it and
/// negotiates the API version, all within `timeout`.
pub async fn connect(docker_host: Option<&str>, timeout: Duration) -> Result<Docker, DockerError> {
    let address = match docker_host {
        Some(host) => host.trim().to_owned(),
        None => std::env::var("DOCKER_HOST")
            .ok()
            .filter(|host| !host.trim().is_empty())
            .map_or_else(|| DEFAULT_DOCKER_HOST.to_owned(), |host| host.trim().to_owned()),
    };
    let endpoint = Endpoint::parse(&address)?;

    // The probe talks without a version prefix, like the docker CLI, so that an engine older or
    // newer than bollard's default still answers and tells us its API version.
    let probe_timeout = timeout.max(Duration::from_secs(1));
    let probe = endpoint
        .client(probe_timeout, API_DEFAULT_VERSION)
        .map_err(|err| unreachable(&address, &err))?
        .with_request_modifier(strip_api_version);
    let engine = tokio::time::timeout(timeout, async {
        probe.ping().await?;
        probe.version().await
    })
    .await
    .map_err(|_| DockerError::Timeout { address: address.clone(), timeout })?
    .map_err(|err| match err {
        BollardError::DockerResponseServerError { status_code, message } => DockerError::Incompatible {
            address: address.clone(),
            reason: format!("it answered HTTP {status_code}: {message} (is this address a Docker engine?)"),
        },
        err => unreachable(&address, &err),
    })?;

    let version =
        negotiate(&engine).map_err(|reason| DockerError::Incompatible { address: address.clone(), reason })?;
    let api = endpoint.client(REQUEST_TIMEOUT, &version).map_err(|err| unreachable(&address, &err))?;
    Ok(Docker { api, address })
}

impl Docker {
    /// The bollard client, for calls this module does not wrap.
    pub fn api(&self) -> &bollard::Docker {
        &self.api
    }

    /// The address this client talks to, e.g. `unix:///var/run/docker.sock`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The engine's version string, e.g. `28.2.2`.
    pub async fn version(&self) -> Result<String, DockerError> {
        let version = self.api.version().await.map_err(|source| request("read the engine version", source))?;
        Ok(version.version.unwrap_or_default())
    }

    /// One stats sample of every running container this agent owns. A container that stops or
    /// disappears while being sampled is left out.
    pub async fn managed_container_stats(&self, agent_id: &str) -> Result<Vec<ContainerStats>, DockerError> {
        let filters = HashMap::from([
            ("status", vec!["running".to_owned()]),
            ("label", vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_AGENT}={agent_id}")]),
        ]);
        let options = ListContainersOptionsBuilder::new().all(false).filters(&filters).build();
        let containers = self
            .api
            .list_containers(Some(options))
            .await
            .map_err(|source| request("list managed containers", source))?;

        // The futures are built up front: stream combinators over async closures that borrow
        // `agent_id` make this future fail the `Send` check when it is spawned.
        let samples: Vec<_> = containers
            .into_iter()
            .filter_map(|summary| {
                let labels = summary.labels.unwrap_or_default();
                // The engine filtered already; this guards against an engine that ignores filters.
                let owned = labels.get(LABEL_MANAGED).is_some_and(|v| v == "true")
                    && labels.get(LABEL_AGENT).is_some_and(|v| v == agent_id);
                let id = summary.id.filter(|_| owned)?;
                let name = summary
                    .names
                    .and_then(|names| names.into_iter().next())
                    .map(|name| name.trim_start_matches('/').to_owned())
                    .unwrap_or_else(|| id.clone());
                Some(ContainerStats {
                    id,
                    name,
                    project: labels.get(LABEL_PROJECT).cloned(),
                    service: labels.get(LABEL_SERVICE).cloned(),
                    deployment: labels.get(LABEL_DEPLOYMENT).cloned(),
                    ..ContainerStats::default()
                })
            })
            .map(|container| self.sample(container))
            .collect();
        let mut sampled = futures::stream::iter(samples).buffer_unordered(STATS_CONCURRENCY);
        let mut stats = Vec::new();
        while let Some(container) = sampled.next().await {
            stats.extend(container?);
        }
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(stats)
    }

    /// Fills in the usage of `container`, or `None` if it is gone or no longer running.
    async fn sample(&self, mut container: ContainerStats) -> Result<Option<ContainerStats>, DockerError> {
        // one_shot=false makes the engine wait for a second reading so that precpu_stats is set.
        let options = StatsOptionsBuilder::new().stream(false).one_shot(false).build();
        let mut samples = pin!(self.api.stats(&container.id, Some(options)));
        let response = match samples.next().await {
            Some(Ok(response)) => response,
            Some(Err(BollardError::DockerResponseServerError { status_code: 404 | 409, .. })) | None => {
                return Ok(None);
            }
            Some(Err(source)) => return Err(request(format!("read stats of container {}", container.name), source)),
        };
        // A container that stopped after the listing gets an empty sample with no system CPU time.
        let system_cpu = response.cpu_stats.as_ref().and_then(|cpu| cpu.system_cpu_usage).unwrap_or(0);
        if system_cpu == 0 {
            return Ok(None);
        }
        container.cpu_percent = cpu_percent(&response);
        let memory = response.memory_stats.unwrap_or_default();
        container.memory_used_bytes = memory_used(&memory);
        container.memory_limit_bytes = memory.limit.unwrap_or(0);
        Ok(Some(container))
    }
}

/// CPU use between the two readings of a sample, computed as the docker CLI does.
fn cpu_percent(stats: &ContainerStatsResponse) -> f64 {
    let (Some(cpu), Some(precpu)) = (&stats.cpu_stats, &stats.precpu_stats) else {
        return 0.0;
    };
    let total = |usage: &Option<bollard::models::ContainerCpuUsage>| {
        usage.as_ref().and_then(|usage| usage.total_usage).unwrap_or(0) as f64
    };
    let cpu_delta = total(&cpu.cpu_usage) - total(&precpu.cpu_usage);
    let system_delta = cpu.system_cpu_usage.unwrap_or(0) as f64 - precpu.system_cpu_usage.unwrap_or(0) as f64;
    let online_cpus = match cpu.online_cpus {
        Some(n) if n > 0 => f64::from(n),
        _ => cpu.cpu_usage.as_ref().and_then(|usage| usage.percpu_usage.as_ref()).map_or(0, Vec::len) as f64,
    };
    if cpu_delta > 0.0 && system_delta > 0.0 {
        cpu_delta / system_delta * online_cpus * 100.0
    } else {
        0.0
    }
}

/// Memory in use without the reclaimable inactive page cache, as the docker CLI shows it.
fn memory_used(memory: &ContainerMemoryStats) -> u64 {
    let usage = memory.usage.unwrap_or(0);
    let stat = |key: &str| memory.stats.as_ref().and_then(|stats| stats.get(key)).copied();
    // cgroup v1 reports total_inactive_file, cgroup v2 inactive_file.
    match stat("total_inactive_file").or_else(|| stat("inactive_file")) {
        Some(inactive) if inactive < usage => usage - inactive,
        _ => usage,
    }
}

/// Where the engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    /// Path of a Unix socket.
    Unix(String),
    /// `host:port` reached over plain HTTP.
    Http(String),
}

impl Endpoint {
    fn parse(host: &str) -> Result<Endpoint, DockerError> {
        let invalid = |reason: &str| DockerError::InvalidHost { host: host.to_owned(), reason: reason.to_owned() };
        let Some((scheme, rest)) = host.split_once("://") else {
            return Err(invalid("missing scheme"));
        };
        match scheme {
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(invalid("the socket path must be absolute"));
                }
                Ok(Endpoint::Unix(rest.to_owned()))
            }
            "tcp" | "http" => {
                if std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty()) {
                    return Err(invalid(
                        "DOCKER_TLS_VERIFY is set, but the agent only speaks plain HTTP to the engine",
                    ));
                }
                let authority = rest.trim_end_matches('/');
                if authority.is_empty() {
                    return Err(invalid("missing host"));
                }
                if authority.contains(['/', '?', '#', '@']) {
                    return Err(invalid("only host and port may follow the scheme"));
                }
                // Without a port, like the docker CLI: 2375, the engine's plain-HTTP port.
                let has_port = authority.rsplit_once(':').is_some_and(|(_, port)| !port.contains(']'));
                Ok(Endpoint::Http(if has_port { authority.to_owned() } else { format!("{authority}:2375") }))
            }
            "https" | "ssh" | "npipe" | "fd" => {
                Err(invalid(&format!("{scheme}:// is not supported by the agent; use a Unix socket or plain TCP")))
            }
            _ => Err(invalid(&format!("unknown scheme {scheme:?}"))),
        }
    }

    fn client(&self, timeout: Duration, version: &ClientVersion) -> Result<bollard::Docker, BollardError> {
        let timeout = timeout.as_secs().max(1);
        match self {
            Endpoint::Unix(path) => bollard::Docker::connect_with_unix(path, timeout, version),
            Endpoint::Http(authority) => bollard::Docker::connect_with_http(authority, timeout, version),
        }
    }
}

/// The newest API version both this client and the engine speak.
fn negotiate(engine: &SystemVersion) -> Result<ClientVersion, String> {
    let parse = |v: &str| {
        let (major, minor) = v.split_once('.')?;
        Some(ClientVersion { major_version: major.parse().ok()?, minor_version: minor.parse().ok()? })
    };
    let Some(server) = engine.api_version.as_deref().and_then(parse) else {
        return Err(format!("it reported no usable API version ({:?})", engine.api_version));
    };
    if let Some(minimum) = engine.min_api_version.as_deref().and_then(parse) {
        if minimum > *API_DEFAULT_VERSION {
            return Err(format!(
                "it requires Docker API {minimum} or newer and this agent speaks up to {}; upgrade the agent",
                *API_DEFAULT_VERSION
            ));
        }
    }
    Ok(if server < *API_DEFAULT_VERSION { server } else { *API_DEFAULT_VERSION })
}

/// Drops the `/v1.xx` prefix bollard puts on every path, for version-independent requests.
fn strip_api_version(mut request: BollardRequest) -> BollardRequest {
    let Some(path_and_query) = request.uri().path_and_query() else {
        return request;
    };
    let Some(unversioned) =
        path_and_query.as_str().strip_prefix("/v").and_then(|rest| rest.find('/').map(|slash| &rest[slash..]))
    else {
        return request;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = unversioned.parse().ok();
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

fn request(operation: impl Into<String>, source: BollardError) -> DockerError {
    DockerError::Request { operation: operation.into(), source }
}

/// Describes why the engine could not be reached, from the innermost I/O error if there is one.
fn unreachable(address: &str, err: &BollardError) -> DockerError {
    let mut io_error = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<io::Error>() {
            io_error = Some(found);
        }
        cause = current.source();
    }
    let (reason, hint) = match (err, io_error.map(io::Error::kind)) {
        (BollardError::SocketNotFoundError(_), _) | (_, Some(io::ErrorKind::NotFound)) => {
            ("no such socket".to_owned(), HINT_START)
        }
        (_, Some(io::ErrorKind::ConnectionRefused)) => ("connection refused".to_owned(), HINT_START),
        (_, Some(io::ErrorKind::PermissionDenied)) => ("permission denied".to_owned(), HINT_PERMISSION),
        (_, Some(_)) => (io_error.map(ToString::to_string).unwrap_or_default(), HINT_START),
        (err, None) => (err.to_string(), HINT_START),
    };
    DockerError::Unreachable { address: address.to_owned(), reason, hint }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerCpuStats, ContainerCpuUsage};
    use std::time::Instant;

    const LOCAL_SOCKET: &str = "/var/run/docker.sock";

    #[tokio::test]
    async fn missing_socket_fails_fast_and_names_the_address() {
        let started = Instant::now();
        let err = connect(Some("unix:///nonexistent.sock"), Duration::from_secs(2)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        let message = err.to_string();
        assert!(message.contains("unix:///nonexistent.sock"), "{message}");
        assert!(message.contains("no such socket"), "{message}");
        assert!(message.contains("DOCKER_HOST"), "{message}");
    }

    #[tokio::test]
    async fn refused_tcp_port_fails_with_connection_refused() {
        let err = connect(Some("tcp://127.0.0.1:1"), Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, DockerError::Unreachable { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "cannot reach the Docker engine at tcp://127.0.0.1:1: connection refused \
             (is dockerd running? set DOCKER_HOST or --docker-host)"
        );
    }

    #[tokio::test]
    async fn silent_engine_times_out_instead_of_hanging() {
        // The kernel accepts the connection into the backlog; nobody ever answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("tcp://{}", listener.local_addr().unwrap());
        let started = Instant::now();
        let err = connect(Some(&address), Duration::from_millis(300)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert!(matches!(err, DockerError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains(&address), "{err}");
    }

    #[tokio::test]
    async fn local_engine_has_no_containers_for_an_unknown_agent() {
        if !std::path::Path::new(LOCAL_SOCKET).exists() {
            eprintln!("skipped: no Docker engine at {LOCAL_SOCKET}");
            return;
        }
        let docker = connect(Some("unix:///var/run/docker.sock"), Duration::from_secs(5)).await.unwrap();
        assert!(!docker.version().await.unwrap().is_empty());
        // Spawned, as the agent does, so that the future is checked to be `Send`.
        let agent_id = String::from("some-agent-id-that-has-nothing");
        let stats =
            tokio::spawn(async move { docker.managed_container_stats(&agent_id).await }).await.unwrap().unwrap();
        assert_eq!(stats, Vec::new());
    }

    #[test]
    fn docker_hosts_are_parsed() {
        assert_eq!(
            Endpoint::parse("unix:///var/run/docker.sock").unwrap(),
            Endpoint::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(Endpoint::parse("tcp://10.0.0.5:2375").unwrap(), Endpoint::Http("10.0.0.5:2375".into()));
        assert_eq!(Endpoint::parse("http://docker.internal:80/").unwrap(), Endpoint::Http("docker.internal:80".into()));
        assert_eq!(Endpoint::parse("tcp://docker.internal").unwrap(), Endpoint::Http("docker.internal:2375".into()));
        assert_eq!(Endpoint::parse("tcp://[::1]").unwrap(), Endpoint::Http("[::1]:2375".into()));
        assert_eq!(Endpoint::parse("tcp://[::1]:2376").unwrap(), Endpoint::Http("[::1]:2376".into()));
        for bad in
            ["/var/run/docker.sock", "unix://relative.sock", "ssh://host", "https://host:2376", "tcp://", "ftp://x"]
        {
            let err = Endpoint::parse(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn version_prefix_is_stripped() {
        let request = |uri: &str| {
            let mut request = BollardRequest::new(bollard::body_full(Default::default()));
            *request.uri_mut() = uri.parse().unwrap();
            strip_api_version(request).uri().to_string()
        };
        assert_eq!(request("http://127.0.0.1:2375/v1.53/_ping"), "http://127.0.0.1:2375/_ping");
        assert_eq!(
            request("http://127.0.0.1:2375/v1.53/containers/json?all=false"),
            "http://127.0.0.1:2375/containers/json?all=false"
        );
        assert_eq!(request("http://127.0.0.1:2375/_ping"), "http://127.0.0.1:2375/_ping");
    }

    #[test]
    fn api_version_is_the_lower_of_both() {
        let engine = |api: &str, min: &str| SystemVersion {
            api_version: Some(api.into()),
            min_api_version: Some(min.into()),
            ..SystemVersion::default()
        };
        let v = |major_version, minor_version| ClientVersion { major_version, minor_version };
        assert_eq!(negotiate(&engine("1.41", "1.12")).unwrap(), v(1, 41));
        assert_eq!(negotiate(&engine("1.99", "1.44")).unwrap(), *API_DEFAULT_VERSION);
        assert!(negotiate(&engine("2.10", "2.0")).unwrap_err().contains("upgrade the agent"));
        assert!(negotiate(&SystemVersion::default()).is_err());
    }

    #[test]
    fn cpu_percent_matches_docker_stats() {
        let cpu = |total, system| ContainerCpuStats {
            cpu_usage: Some(ContainerCpuUsage { total_usage: Some(total), ..Default::default() }),
            system_cpu_usage: Some(system),
            online_cpus: Some(4),
            ..Default::default()
        };
        // 0.5 s of container CPU over 4 s of system CPU time on 4 CPUs: half of one CPU.
        let stats = ContainerStatsResponse {
            cpu_stats: Some(cpu(1_500_000_000, 14_000_000_000)),
            precpu_stats: Some(cpu(1_000_000_000, 10_000_000_000)),
            ..Default::default()
        };
        assert!((cpu_percent(&stats) - 50.0).abs() < 1e-9, "{}", cpu_percent(&stats));
        let idle = ContainerStatsResponse { cpu_stats: stats.cpu_stats.clone(), ..Default::default() };
        assert_eq!(cpu_percent(&idle), 0.0);
    }

    #[test]
    fn memory_used_excludes_inactive_page_cache() {
        let memory = |stats: &[(&str, u64)]| ContainerMemoryStats {
            usage: Some(100 << 20),
            stats: Some(stats.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            ..Default::default()
        };
        assert_eq!(memory_used(&memory(&[("inactive_file", 30 << 20)])), 70 << 20);
        assert_eq!(memory_used(&memory(&[("total_inactive_file", 10 << 20), ("inactive_file", 1)])), 90 << 20);
        assert_eq!(memory_used(&memory(&[("inactive_file", 200 << 20)])), 100 << 20);
        assert_eq!(memory_used(&memory(&[])), 100 << 20);
    }
}

//! Builds images and runs a deployment's containers through the Docker API: build, start with
//! hardened defaults, health check, stop and cleanup.
//!
//! Containers and networks carry the Deployer labels (`deployer.managed=true`, the agent, the
//! project, the service and the deployment; networks carry the first three), plus the preview
//! environment for a preview's (`deployer.preview`; absent for the service's own), and nothing
//! here ever stops or removes one that lacks `deployer.managed=true` (and, for a container, this
//! agent's label). Images carry no labels: the classic builder commits one layer per label, about
//! 1 s each on this engine. The agent recognises its images by their repository instead,
//! `deployer/<project>/<service>`, a namespace nothing else writes, and prunes no other.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerState, EndpointSettings, HostConfig, ImageSummary,
    NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListImagesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::docker::{
    Docker, LABEL_AGENT, LABEL_DEPLOYMENT, LABEL_MANAGED, LABEL_PREVIEW, LABEL_PROJECT, LABEL_SERVICE,
};

/// The namespace of the images the agent builds: `deployer/<project>/<service>:<deployment>`.
const IMAGE_NAMESPACE: &str = "deployer/";

/// The user a container runs as when its image names none (or root): `nobody` on most distributions.
pub const NON_ROOT_USER: &str = "65534:65534";
/// Memory limit of a service that asks for none.
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// Process limit of a service that asks for none.
pub const DEFAULT_PIDS_LIMIT: i64 = 256;
/// Mount options of the tmpfs on `/tmp` that comes with a read-only root.
pub const TMP_TMPFS_OPTIONS: &str = "rw,noexec,nosuid,size=64m";
/// Grace period `remove_deployment` gives a container between SIGTERM and SIGKILL, Docker's own default.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The first pause between health probes, doubled up to `HEALTH_POLL_INTERVAL`.
const HEALTH_POLL_FIRST: Duration = Duration::from_millis(10);
/// Upper bound for one health probe, so a hung connection cannot eat the whole timeout.
const HEALTH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How many of a crashed container's log lines a health check failure quotes.
const EXIT_LOG_LINES: usize = 20;
/// The engine answers a build only once it has read the whole context; a large one takes a while.
const BUILD_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Extra time a stop request may take beyond the grace period (killing, removing the sandbox).
const STOP_REQUEST_SLACK: Duration = Duration::from_secs(30);
/// The build context travels in chunks of this size through a channel of `CONTEXT_CHUNKS` slots.
const CONTEXT_CHUNK_BYTES: usize = 64 << 10;
const CONTEXT_CHUNKS: usize = 8;

/// Serialises network creation in this process: API 1.41 engines do not refuse a second network
/// with the same name, and two deployments of one project may start at once.
static NETWORK_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The labels a deployment's containers carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Labels {
    pub agent: String,
    pub project: String,
    pub service: String,
    pub deployment: String,
    /// The preview environment ("" for the service's own release, which carries no such label).
    pub preview: String,
}

impl Labels {
    /// The labels of a container.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut labels = self.network_map();
        labels.insert(LABEL_SERVICE.into(), self.service.clone());
        labels.insert(LABEL_DEPLOYMENT.into(), self.deployment.clone());
        labels
    }

    /// The labels of a project's network (or a preview's), which outlives any one service or
    /// deployment.
    fn network_map(&self) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_MANAGED.into(), "true".into()),
            (LABEL_AGENT.into(), self.agent.clone()),
            (LABEL_PROJECT.into(), self.project.clone()),
        ]);
        if !self.preview.is_empty() {
            labels.insert(LABEL_PREVIEW.into(), self.preview.clone());
        }
        labels
    }
}

/// The preview environment an object's labels name; "" for the service's own (no label, as on
/// containers made before previews existed).
pub fn preview_of(labels: &HashMap<String, String>) -> &str {
    labels.get(LABEL_PREVIEW).map_or("", String::as_str)
}

/// Severity of a line of build or pull output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// Where build and pull output goes, line by line.
pub type LogSink<'a> = &'a mut (dyn FnMut(LogLevel, String) + Send);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read the build context at {}: {source}", path.display())]
    Context {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the image build failed{}: {message}", step.as_ref().map(|s| format!(" at {s}")).unwrap_or_default())]
    Build {
        /// The step that failed as the builder announced it, e.g. `step 2/3 (RUN make)`.
        step: Option<String>,
        /// The engine's error text.
        message: String,
    },
    #[error("image {reference} is not present on this agent and cannot be pulled: {reason}")]
    ImageMissing { reference: String, reason: String },
    #[error("refusing to prune the images of {repository:?}: only repositories deployer/<project>/<service> are ours")]
    ForeignRepository { repository: String },
    #[error(
        "a Docker network named {name} exists but was not created by Deployer for this project; remove or rename it"
    )]
    ForeignNetwork { name: String },
    #[error("the container name {name} is taken by a container this agent does not manage; remove or rename it")]
    NameTaken { name: String },
    #[error("the engine refused to start container {name}: {message}")]
    Start { name: String, message: String },
    #[error("the health check path {path:?} must start with / and contain no spaces or control characters")]
    HealthPath { path: String },
    #[error(
        "the container exited with code {code} before answering its health check{}",
        exit_details(*restarts, *oom_killed, logs)
    )]
    Exited {
        code: i64,
        /// How often Docker restarted it meanwhile.
        restarts: i64,
        oom_killed: bool,
        /// Its last log lines, oldest first.
        logs: Vec<String>,
    },
    #[error("container {name} was removed before answering its health check")]
    Vanished { name: String },
    #[error("no healthy answer from {path} on port {port} within {}: {last_error}", human(*timeout))]
    Unhealthy { path: String, port: u16, timeout: Duration, last_error: String },
    /// The engine could not be reached or failed a request; trying again later may succeed.
    #[error("Docker engine request failed: {operation}: {}", reason(error))]
    Docker { operation: String, error: BollardError },
}

impl RuntimeError {
    /// Whether the same attempt may succeed later. A broken Dockerfile, an image that is not
    /// there or an app that never turns healthy fails again; the engine's hiccups may not.
    pub fn retryable(&self) -> bool {
        match self {
            RuntimeError::Docker { .. } | RuntimeError::Vanished { .. } => true,
            RuntimeError::Context { .. }
            | RuntimeError::Build { .. }
            | RuntimeError::ImageMissing { .. }
            | RuntimeError::ForeignRepository { .. }
            | RuntimeError::ForeignNetwork { .. }
            | RuntimeError::NameTaken { .. }
            | RuntimeError::Start { .. }
            | RuntimeError::HealthPath { .. }
            | RuntimeError::Exited { .. }
            | RuntimeError::Unhealthy { .. } => false,
        }
    }
}

fn docker_error(operation: impl Into<String>, error: BollardError) -> RuntimeError {
    RuntimeError::Docker { operation: operation.into(), error }
}

/// The engine's own words when it has some, else the client's.
fn reason(error: &BollardError) -> String {
    match error {
        BollardError::DockerResponseServerError { status_code, message } => format!("{message} (HTTP {status_code})"),
        BollardError::DockerStreamError { error } => error.clone(),
        BollardError::RequestTimeoutError => "the engine did not answer in time".into(),
        other => other.to_string(),
    }
}

fn exit_details(restarts: i64, oom_killed: bool, logs: &[String]) -> String {
    let mut details = String::new();
    if oom_killed {
        details.push_str(" (killed for exceeding its memory limit)");
    }
    if restarts > 0 {
        details.push_str(&format!(" (Docker restarted it {restarts} times)"));
    }
    if logs.is_empty() {
        details.push_str("; it wrote no log lines");
    } else {
        details.push_str("; its last log lines:");
        for line in logs {
            details.push_str("\n  ");
            details.push_str(line);
        }
    }
    details
}

/// `1.5s`, `250ms`, `30s`.
fn human(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{:.1}s", duration.as_secs_f64())
    }
}

fn status_code(error: &BollardError) -> Option<u16> {
    match error {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether the object carries the managed label and this agent's label.
fn owned_by(labels: Option<&HashMap<String, String>>, agent: &str) -> bool {
    labels.is_some_and(|labels| {
        labels.get(LABEL_MANAGED).is_some_and(|v| v == "true") && labels.get(LABEL_AGENT).is_some_and(|v| v == agent)
    })
}

// ---------------------------------------------------------------------------------------------
// Images

/// Builds `context_dir` with the Dockerfile at `dockerfile` (a path inside it) into `tag` and
/// returns the image id. The image gets no labels: each would cost the classic builder a step.
///
/// The context is streamed as a tar archive of the directory: symlinks are archived as links,
/// never followed; only a top-level `.git` is left out (`.dockerignore` is not applied). Every line
/// of the builder's output goes to `log`, errors at `Error` level.
pub async fn build_image(
    docker: &Docker,
    context_dir: &Path,
    dockerfile: &str,
    tag: &str,
    log: LogSink<'_>,
) -> Result<String, RuntimeError> {
    let (chunks, chunks_rx) = mpsc::channel::<io::Result<Vec<u8>>>(CONTEXT_CHUNKS);
    // Dropping `stop_packing` (when the build ends, or this future is dropped) unblocks the packer.
    let (stop_packing, stopped) = watch::channel(());
    let root = context_dir.to_path_buf();
    let runtime = tokio::runtime::Handle::current();
    let packer = tokio::task::spawn_blocking(move || {
        let mut writer = ChunkWriter { buffer: Vec::new(), chunks, stopped, runtime };
        let packed = pack_context(&root, &mut writer);
        if let Err((_, error)) = &packed {
            if error.kind() != io::ErrorKind::BrokenPipe {
                // Fails the request body, so the engine does not build a truncated context.
                let _ = writer.deliver(Err(io::Error::new(error.kind(), error.to_string())));
            }
        }
        packed
    });
    let body = bollard::body_try_stream(futures::stream::unfold(chunks_rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk.map(Into::into), rx))
    }));

    let options = BuildImageOptionsBuilder::new().dockerfile(dockerfile).t(tag).rm(true).forcerm(true).build();
    let api = docker.api().clone().with_timeout(BUILD_REQUEST_TIMEOUT);
    let built = follow_build(api.build_image(options, None, Some(body)), log).await;
    drop(stop_packing);

    let packed = packer.await.unwrap_or_else(|join| {
        Err((context_dir.to_path_buf(), io::Error::other(format!("the context packer failed: {join}"))))
    });
    match packed {
        // A context that could not be read is the cause of whatever the engine said.
        Err((path, source)) if source.kind() != io::ErrorKind::BrokenPipe => {
            return Err(RuntimeError::Context { path, source });
        }
        Err(_) => {}
        Ok(skipped) => {
            for path in skipped {
                log(
                    LogLevel::Warn,
                    format!("left out of the build context (not a file, directory or link): {}", path.display()),
                );
            }
        }
    }
    built?;
    match docker.api().inspect_image(tag).await {
        Ok(image) => Ok(image.id.unwrap_or_default()),
        Err(error) if status_code(&error) == Some(404) => {
            Err(RuntimeError::Build { step: None, message: format!("the build finished but image {tag} is missing") })
        }
        Err(error) => Err(docker_error(format!("inspect the built image {tag}"), error)),
    }
}

/// Passes the builder's output to `log` and turns its verdict into a result.
async fn follow_build(
    stream: impl futures::Stream<Item = Result<bollard::models::BuildInfo, BollardError>>,
    log: LogSink<'_>,
) -> Result<(), RuntimeError> {
    let mut stream = std::pin::pin!(stream);
    let mut step = None;
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(info) => info,
            // An error line in the output (bollard turns `errorDetail` into this), or the engine
            // rejecting the request itself (bad options, a Dockerfile it cannot find or parse).
            Err(BollardError::DockerStreamError { error: message })
            | Err(BollardError::DockerResponseServerError { message, .. }) => {
                for line in message.lines().filter(|line| !line.trim().is_empty()) {
                    log(LogLevel::Error, line.trim_end().to_owned());
                }
                return Err(RuntimeError::Build { step, message: message.trim().to_owned() });
            }
            Err(error) => return Err(docker_error("build the image", error)),
        };
        if let Some(text) = info.stream {
            for line in text.lines().map(str::trim_end).filter(|line| !line.is_empty()) {
                if let Some(announced) = build_step(line) {
                    step = Some(announced);
                }
                log(LogLevel::Info, line.to_owned());
            }
        }
        if let Some(status) = info.status {
            // Pull progress ("Downloading [==>  ]") is noise in a deployment log.
            let level = if info.progress_detail.is_some_and(|p| p.current.is_some()) {
                LogLevel::Debug
            } else {
                LogLevel::Info
            };
            log(level, info.id.map_or_else(|| status.clone(), |id| format!("{id}: {status}")));
        }
    }
    Ok(())
}

/// `Step 2/3 : RUN make` becomes `step 2/3 (RUN make)`.
fn build_step(line: &str) -> Option<String> {
    let rest = line.strip_prefix("Step ")?;
    let (number, instruction) = rest.split_once(" : ")?;
    Some(format!("step {number} ({instruction})"))
}

/// Sends what the tar builder writes down a bounded channel, in chunks.
struct ChunkWriter {
    buffer: Vec<u8>,
    chunks: mpsc::Sender<io::Result<Vec<u8>>>,
    stopped: watch::Receiver<()>,
    runtime: tokio::runtime::Handle,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buffer);
        self.deliver(Ok(chunk))
    }

    /// Waits for room in the channel, unless the build is over.
    fn deliver(&mut self, item: io::Result<Vec<u8>>) -> io::Result<()> {
        let sent = self.runtime.block_on(async {
            tokio::select! {
                sent = self.chunks.send(item) => sent.is_ok(),
                // Only ever resolves when the sender is dropped: the build is over.
                _ = self.stopped.changed() => false,
            }
        });
        if sent {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading the build context"))
        }
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CONTEXT_CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Writes `root` as a tar archive, symlinks as links, without a top-level `.git`. Returns the
/// special files (sockets, fifos, devices) it left out; an error names the path it concerns.
fn pack_context(root: &Path, writer: impl Write) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let mut archive = tar::Builder::new(writer);
    archive.follow_symlinks(false);
    let mut skipped = Vec::new();
    let mut directories = vec![PathBuf::new()];
    while let Some(directory) = directories.pop() {
        let full = root.join(&directory);
        let mut entries = std::fs::read_dir(&full)
            .and_then(|entries| entries.collect::<io::Result<Vec<_>>>())
            .map_err(|e| (full.clone(), e))?;
        // Sorted, so that one source always gives the same archive.
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name = entry.file_name();
            if directory.as_os_str().is_empty() && name == ".git" {
                continue;
            }
            let relative = directory.join(&name);
            let path = entry.path();
            let file_type = entry.file_type().map_err(|e| (path.clone(), e))?;
            if file_type.is_dir() || file_type.is_file() || file_type.is_symlink() {
                archive.append_path_with_name(&path, &relative).map_err(|e| (path.clone(), e))?;
                if file_type.is_dir() {
                    directories.push(relative);
                }
            } else {
                skipped.push(relative);
            }
        }
    }
    let mut writer = archive.into_inner().map_err(|e| (root.to_path_buf(), e))?;
    writer.flush().map_err(|e| (root.to_path_buf(), e))?;
    Ok(skipped)
}

/// Makes sure the image `reference` is on this agent and returns its id. A tag is pulled anew
/// (to pick up a moved tag); when the pull fails the local copy is used, with a warning. A
/// reference pinned by digest or id is used as it is when present.
///
/// `prune_images` removes only images named in the agent's own `deployer/` namespace; a pulled
/// image keeps the name it was pulled by.
pub async fn ensure_image(docker: &Docker, reference: &str, log: LogSink<'_>) -> Result<String, RuntimeError> {
    let local = local_image_id(docker, reference).await?;
    if let Some(id) = &local {
        // An image this agent built (a rollback's) is in no registry: never pulled.
        if is_pinned(reference) || reference.starts_with("deployer/") {
            return Ok(id.clone());
        }
    }
    let (repository, tag) = split_reference(reference);
    let options = CreateImageOptionsBuilder::new().from_image(repository).tag(tag).build();
    let mut pull = std::pin::pin!(docker.api().create_image(Some(options), None, None));
    let mut failure = None;
    while let Some(item) = pull.next().await {
        match item {
            Ok(info) => {
                if let Some(status) = info.status {
                    let level = if info.progress_detail.is_some_and(|p| p.current.is_some()) {
                        LogLevel::Debug
                    } else {
                        LogLevel::Info
                    };
                    log(level, info.id.map_or_else(|| status.clone(), |id| format!("{id}: {status}")));
                }
            }
            Err(BollardError::DockerStreamError { error: message })
            | Err(BollardError::DockerResponseServerError { message, .. }) => {
                failure = Some(message.trim().to_owned());
                break;
            }
            Err(error) => return Err(docker_error(format!("pull {reference}"), error)),
        }
    }
    match (failure, local) {
        (None, _) => local_image_id(docker, reference).await?.ok_or_else(|| RuntimeError::ImageMissing {
            reference: reference.to_owned(),
            reason: "the pull finished but the image is not there".into(),
        }),
        (Some(reason), Some(id)) => {
            log(LogLevel::Warn, format!("could not pull {reference} ({reason}); using the copy already on this agent"));
            Ok(id)
        }
        (Some(reason), None) => Err(RuntimeError::ImageMissing { reference: reference.to_owned(), reason }),
    }
}

async fn local_image_id(docker: &Docker, reference: &str) -> Result<Option<String>, RuntimeError> {
    match docker.api().inspect_image(reference).await {
        Ok(image) => Ok(image.id),
        Err(error) if status_code(&error) == Some(404) => Ok(None),
        Err(error) => Err(docker_error(format!("inspect image {reference}"), error)),
    }
}

/// A reference that always names the same image: `name@sha256:...`, `sha256:...` or a bare id.
fn is_pinned(reference: &str) -> bool {
    let id = reference.strip_prefix("sha256:").unwrap_or(reference);
    reference.contains('@') || (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `registry:5000/app:1.2` into (`registry:5000/app`, `1.2`); no tag means `latest` (else the
/// engine would pull every tag); `app@sha256:..` into (`app`, `sha256:..`).
fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((repository, digest)) = reference.split_once('@') {
        return (repository, digest);
    }
    let name_start = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_start..].rfind(':') {
        Some(colon) => (&reference[..name_start + colon], &reference[name_start + colon + 1..]),
        None => (reference, "latest"),
    }
}

/// Removes the images of `repository` (`deployer/<project>/<service>`, where the agent tags what
/// it builds), except the `keep` newest and any image a container (running or stopped) still
/// uses. Returns the tags removed.
///
/// An image counts only if every one of its tags is in `repository`: one also tagged elsewhere
/// is someone else's too. The tags in `spare` (a preview's images, which go with their preview)
/// are neither counted nor removed; an image they tag is kept. A repository outside `deployer/`
/// is refused.
pub async fn prune_images(
    docker: &Docker,
    repository: &str,
    keep: usize,
    spare: &HashSet<String>,
) -> Result<Vec<String>, RuntimeError> {
    if !is_own_repository(repository) {
        return Err(RuntimeError::ForeignRepository { repository: repository.to_owned() });
    }
    let filters = HashMap::from([("reference", vec![format!("{repository}:*")])]);
    let options = ListImagesOptionsBuilder::new().filters(&filters).build();
    let mut images = docker
        .api()
        .list_images(Some(options))
        .await
        .map_err(|e| docker_error(format!("list the images of {repository}"), e))?;
    // Filtered by reference, the list shows only the matching tags of each image; whether it has
    // others too comes from inspecting it.
    for image in &mut images {
        match docker.api().inspect_image(&image.id).await {
            Ok(inspected) => image.repo_tags = inspected.repo_tags.unwrap_or_default(),
            // Removed since it was listed: no longer a candidate.
            Err(error) if status_code(&error) == Some(404) => image.repo_tags.clear(),
            Err(error) => return Err(docker_error(format!("inspect image {}", image.id), error)),
        }
    }
    let candidates = prune_candidates(images, repository, spare);

    let containers = docker
        .api()
        .list_containers(Some(ListContainersOptionsBuilder::new().all(true).build()))
        .await
        .map_err(|e| docker_error("list containers", e))?;
    let in_use: HashSet<String> = containers.into_iter().filter_map(|container| container.image_id).collect();

    let mut removed = Vec::new();
    for image in candidates.into_iter().skip(keep).filter(|image| !in_use.contains(&image.id)) {
        // Removing the last tag removes the image; removing by id would fail while it has several.
        // A spared tag is not among them, so an image a preview shares only loses the others.
        for tag in image.repo_tags {
            let options = RemoveImageOptionsBuilder::new().force(false).noprune(false).build();
            match docker.api().remove_image(&tag, Some(options), None).await {
                Ok(_) => removed.push(tag),
                // Gone already, or a container started using it since we looked.
                Err(error) if matches!(status_code(&error), Some(404 | 409)) => {
                    tracing::debug!(image = %tag, error = %reason(&error), "image not pruned");
                }
                Err(error) => return Err(docker_error(format!("remove image {tag}"), error)),
            }
        }
    }
    Ok(removed)
}

/// Whether `repository` is one the agent builds into: `deployer/...`, with no tag or digest.
fn is_own_repository(repository: &str) -> bool {
    repository.strip_prefix(IMAGE_NAMESPACE).is_some_and(|rest| !rest.is_empty())
        && !repository.contains([':', '@'])
        && !repository.contains(char::is_whitespace)
}

/// The images of `repository` (every tag in it, at least one besides the `spare` ones, which are
/// left out of `repo_tags`), newest first: by creation time, which has one-second resolution,
/// then by tag, descending.
fn prune_candidates(images: Vec<ImageSummary>, repository: &str, spare: &HashSet<String>) -> Vec<ImageSummary> {
    // The engine filtered already; this guards against one that ignores the filter, or a
    // repository with pattern characters in it that widen it.
    let in_repository = |tag: &String| {
        tag.strip_prefix(repository)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|name| !name.is_empty() && !name.contains(['/', ':', '@']))
    };
    let mut candidates: Vec<_> = images
        .into_iter()
        .filter(|image| !image.repo_tags.is_empty() && image.repo_tags.iter().all(in_repository))
        .filter_map(|mut image| {
            image.repo_tags.retain(|tag| !spare.contains(tag));
            (!image.repo_tags.is_empty()).then_some(image)
        })
        .collect();
    let newest_tag = |image: &ImageSummary| image.repo_tags.iter().max().cloned();
    candidates.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| newest_tag(b).cmp(&newest_tag(a))));
    candidates
}

// ---------------------------------------------------------------------------------------------
// Networks

/// The name of a project's network, or of one of its previews': a preview's instances answer to
/// the same service names as the project's own, so each preview gets a network of its own.
pub fn network_name(project_id: &str, preview: &str) -> String {
    if preview.is_empty() {
        return format!("deployer-{project_id}");
    }
    // Docker allows [a-zA-Z0-9][a-zA-Z0-9_.-]* in a network name.
    let preview: String = preview
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
        .collect();
    format!("deployer-{project_id}-preview-{preview}")
}

/// Creates the user-defined bridge network of `labels.project` (of `labels.preview` when it is
/// set), [`network_name`], unless it exists, and returns its name. An existing network of that
/// name must carry `deployer.managed=true`, the project's label and the same preview label (any
/// agent's: the name is per host and an agent that rejoined under a new id still owns it).
pub async fn ensure_network(docker: &Docker, project_id: &str, labels: &Labels) -> Result<String, RuntimeError> {
    let name = network_name(project_id, &labels.preview);
    let _one_at_a_time = NETWORK_LOCK.lock().await;
    match docker.api().inspect_network(&name, None).await {
        Ok(network) => {
            let labels_found = network.labels.unwrap_or_default();
            let ours = network.name.as_deref() == Some(name.as_str())
                && labels_found.get(LABEL_MANAGED).is_some_and(|v| v == "true")
                && labels_found.get(LABEL_PROJECT).is_some_and(|v| v == &labels.project)
                && preview_of(&labels_found) == labels.preview;
            return if ours { Ok(name) } else { Err(RuntimeError::ForeignNetwork { name }) };
        }
        Err(error) if status_code(&error) == Some(404) => {}
        Err(error) => return Err(docker_error(format!("inspect network {name}"), error)),
    }
    let request = NetworkCreateRequest {
        name: name.clone(),
        driver: Some("bridge".into()),
        labels: Some(labels.network_map()),
        ..Default::default()
    };
    docker.api().create_network(request).await.map_err(|e| docker_error(format!("create network {name}"), e))?;
    Ok(name)
}

// ---------------------------------------------------------------------------------------------
// Containers

/// Relaxations of the hardened defaults; the default value relaxes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hardening {
    /// Keep the root filesystem writable (otherwise it is read-only with a tmpfs on `/tmp`).
    pub writable_root: bool,
    /// Run as the image's user even when that is root (otherwise root becomes 65534:65534).
    pub run_as_root: bool,
    /// Capabilities to add back; all others are dropped. `NET_BIND_SERVICE` is added by itself
    /// for a port below 1024.
    pub capabilities: Vec<String>,
    /// Process limit; `None` means `DEFAULT_PIDS_LIMIT`.
    pub pids_limit: Option<i64>,
}

/// One container to start.
#[derive(Clone, Debug)]
pub struct InstanceSpec<'a> {
    /// Container name, e.g. `deployer-<service>-<project>-<deploymentId8>-<replica>`.
    pub name: &'a str,
    pub image: &'a str,
    pub labels: &'a Labels,
    pub env: &'a [(String, String)],
    /// The port the app listens on inside the container.
    pub port: u16,
    /// Also publish `port` on 127.0.0.1 on a random host port.
    pub publish: bool,
    /// 0 = no limit; else `cpu_millis / 1000` CPUs.
    pub cpu_millis: u64,
    /// 0 = `DEFAULT_MEMORY_BYTES`. Swap is never allowed beyond it.
    pub memory_bytes: u64,
    /// The project network, from `ensure_network`.
    pub network: &'a str,
    /// Names others on the network reach this container by, e.g. the service name.
    pub network_aliases: Vec<String>,
    pub hardening: &'a Hardening,
}

/// A started container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub container_id: String,
    pub name: String,
    /// Its address on the project network; empty if it had already exited when it was inspected.
    pub ip: String,
    pub host_port: Option<u16>,
}

/// Creates and starts a container with the hardened defaults, less what `spec.hardening` relaxes:
///
/// - `no-new-privileges`, every capability dropped but those asked for (and `NET_BIND_SERVICE`
///   below port 1024);
/// - a read-only root with a `noexec,nosuid` 64 MiB tmpfs on `/tmp`;
/// - user 65534:65534 when the image names no user or root;
/// - memory limited with no swap beyond it, CPU limited, a pids limit;
/// - restart policy `unless-stopped`: a crashed app comes back on its own, with Docker's backoff
///   (100 ms doubling up to one minute, reset once it has run for 10 s), also after the engine
///   restarts, while a stop by the agent is final. `on-failure` would leave an app that exits
///   with 0 down;
/// - Docker's init (tini) as PID 1 when the engine has one, so SIGTERM reaches apps that do not
///   handle signals as PID 1 and zombies are reaped.
///
/// A leftover container of the same name from an earlier attempt of the same deployment is
/// replaced. If the engine refuses to start the container, it is removed.
pub async fn start_instance(docker: &Docker, spec: &InstanceSpec<'_>) -> Result<Instance, RuntimeError> {
    let image = match docker.api().inspect_image(spec.image).await {
        Ok(image) => image,
        Err(error) if status_code(&error) == Some(404) => {
            return Err(RuntimeError::ImageMissing {
                reference: spec.image.to_owned(),
                reason: "it was never built or pulled here, or it was removed".into(),
            });
        }
        Err(error) => return Err(docker_error(format!("inspect image {}", spec.image), error)),
    };
    let image_user = image.config.and_then(|config| config.user).unwrap_or_default();
    let body = container_body(spec, &image_user, init_available(docker).await);

    let options = CreateContainerOptionsBuilder::new().name(spec.name).build();
    let created = match docker.api().create_container(Some(options.clone()), body.clone()).await {
        Err(error) if status_code(&error) == Some(409) => {
            replace_leftover(docker, spec).await?;
            docker.api().create_container(Some(options), body).await
        }
        created => created,
    }
    .map_err(|error| match error {
        // The engine refused the configuration, e.g. more CPUs than the host has.
        BollardError::DockerResponseServerError { status_code: 400, message } => {
            RuntimeError::Start { name: spec.name.to_owned(), message }
        }
        error => docker_error(format!("create container {}", spec.name), error),
    })?;
    for warning in created.warnings.iter().filter(|w| !w.is_empty()) {
        tracing::warn!(container = %spec.name, "{warning}");
    }

    if let Err(error) = docker.api().start_container(&created.id, None).await {
        let _ = remove_container(docker, &created.id).await;
        return Err(match error {
            BollardError::DockerResponseServerError { message, .. } => {
                RuntimeError::Start { name: spec.name.to_owned(), message }
            }
            error => docker_error(format!("start container {}", spec.name), error),
        });
    }

    let inspected = inspect_container(docker, &created.id).await?;
    let host_port = spec
        .publish
        .then(|| {
            inspected
                .network_settings
                .as_ref()
                .and_then(|settings| settings.ports.as_ref())
                .and_then(|ports| ports.get(&port_key(spec.port)).cloned().flatten())
                .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port?.parse::<u16>().ok()))
        })
        .flatten();
    Ok(Instance {
        ip: container_ip(&inspected, spec.network).unwrap_or_default(),
        container_id: created.id,
        name: spec.name.to_owned(),
        host_port,
    })
}

fn port_key(port: u16) -> String {
    format!("{port}/tcp")
}

/// The create request for `spec`, run as `image_user` unless that is root and root is not allowed.
fn container_body(spec: &InstanceSpec<'_>, image_user: &str, init: bool) -> ContainerCreateBody {
    let hardening = spec.hardening;
    let user = (!hardening.run_as_root && is_root(image_user)).then(|| NON_ROOT_USER.to_owned());
    let mut cap_add = hardening.capabilities.clone();
    let normalized = |cap: &str| cap.trim().to_ascii_uppercase().trim_start_matches("CAP_").to_owned();
    if spec.port < 1024 && !cap_add.iter().any(|cap| normalized(cap) == "NET_BIND_SERVICE") {
        cap_add.push("NET_BIND_SERVICE".into());
    }
    let memory = if spec.memory_bytes == 0 { DEFAULT_MEMORY_BYTES } else { spec.memory_bytes };
    let memory = i64::try_from(memory).unwrap_or(i64::MAX);
    let nano_cpus =
        (spec.cpu_millis > 0).then(|| i64::try_from(spec.cpu_millis.saturating_mul(1_000_000)).unwrap_or(i64::MAX));
    let port = port_key(spec.port);
    let host_config = HostConfig {
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: (!cap_add.is_empty()).then_some(cap_add),
        readonly_rootfs: Some(!hardening.writable_root),
        tmpfs: (!hardening.writable_root).then(|| HashMap::from([("/tmp".into(), TMP_TMPFS_OPTIONS.into())])),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus,
        pids_limit: Some(hardening.pids_limit.unwrap_or(DEFAULT_PIDS_LIMIT)),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        }),
        init: init.then_some(true),
        network_mode: Some(spec.network.to_owned()),
        port_bindings: spec.publish.then(|| {
            HashMap::from([(
                port.clone(),
                Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]),
            )])
        }),
        ..Default::default()
    };
    let endpoint = EndpointSettings {
        aliases: (!spec.network_aliases.is_empty()).then(|| spec.network_aliases.clone()),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.to_owned()),
        user,
        env: Some(spec.env.iter().map(|(key, value)| format!("{key}={value}")).collect()),
        labels: Some(spec.labels.to_map()),
        exposed_ports: Some(vec![port]),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(spec.network.to_owned(), endpoint)])),
        }),
        ..Default::default()
    }
}

/// Whether an image's `User` runs as root: empty, `root` or uid 0, with any group.
fn is_root(user: &str) -> bool {
    let name = user.split(':').next().unwrap_or_default().trim();
    name.is_empty() || name == "root" || name == "0"
}

/// Whether the engine ships `docker-init`; it reports it as a version component when it does.
async fn init_available(docker: &Docker) -> bool {
    match docker.api().version().await {
        Ok(version) => version.components.unwrap_or_default().iter().any(|c| c.name == "docker-init"),
        Err(error) => {
            let error = reason(&error);
            tracing::warn!(%error, "cannot tell whether the engine has docker-init; starting without it");
            false
        }
    }
}

/// Removes the container holding `spec.name` if it is a leftover of this same deployment.
async fn replace_leftover(docker: &Docker, spec: &InstanceSpec<'_>) -> Result<(), RuntimeError> {
    let existing = match docker.api().inspect_container(spec.name, None).await {
        Ok(existing) => existing,
        // Removed in the meantime: the second create will tell.
        Err(error) if status_code(&error) == Some(404) => return Ok(()),
        Err(error) => return Err(docker_error(format!("inspect container {}", spec.name), error)),
    };
    let labels = existing.config.and_then(|config| config.labels);
    let same_deployment = owned_by(labels.as_ref(), &spec.labels.agent)
        && labels.as_ref().and_then(|l| l.get(LABEL_DEPLOYMENT)).is_some_and(|d| d == &spec.labels.deployment);
    if !same_deployment {
        return Err(RuntimeError::NameTaken { name: spec.name.to_owned() });
    }
    tracing::info!(container = %spec.name, "replacing a leftover container of an earlier attempt");
    remove_container(docker, existing.id.as_deref().unwrap_or(spec.name)).await
}

async fn inspect_container(docker: &Docker, container: &str) -> Result<ContainerInspectResponse, RuntimeError> {
    docker
        .api()
        .inspect_container(container, None)
        .await
        .map_err(|e| docker_error(format!("inspect container {container}"), e))
}

fn container_ip(inspected: &ContainerInspectResponse, network: &str) -> Option<String> {
    inspected.network_settings.as_ref()?.networks.as_ref()?.get(network)?.ip_address.clone().filter(|ip| !ip.is_empty())
}

/// Polls `http://<ip>:<port><path>` (every 10 ms at first, backing off to 250 ms) until it answers 2xx or 3xx, or `timeout`
/// passes. Gives up early when the container has exited, even when Docker is about to restart
/// it: the error carries the exit code and the last log lines. The container is left as it is.
pub async fn wait_healthy(
    docker: &Docker,
    instance: &Instance,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(RuntimeError::HealthPath { path: path.to_owned() });
    }
    let deadline = Instant::now() + timeout;
    // Most apps answer within a second: look often at first, then every HEALTH_POLL_INTERVAL.
    let mut pause = HEALTH_POLL_FIRST;
    loop {
        let inspected = match docker.api().inspect_container(&instance.container_id, None).await {
            Ok(inspected) => inspected,
            Err(error) if status_code(&error) == Some(404) => {
                return Err(RuntimeError::Vanished { name: instance.name.clone() });
            }
            Err(error) => return Err(docker_error(format!("inspect container {}", instance.name), error)),
        };
        let state = inspected.state.clone().unwrap_or_default();
        if has_exited(&state) {
            return Err(RuntimeError::Exited {
                code: state.exit_code.unwrap_or_default(),
                restarts: inspected.restart_count.unwrap_or_default(),
                oom_killed: state.oom_killed.unwrap_or_default(),
                logs: last_log_lines(docker, &instance.container_id).await,
            });
        }
        // Re-read every time: the address may come and go as Docker restarts the container.
        let network_ip = inspected
            .network_settings
            .as_ref()
            .and_then(|settings| settings.networks.as_ref())
            .and_then(|networks| networks.values().find_map(|endpoint| endpoint.ip_address.clone()))
            .filter(|ip| !ip.is_empty());
        let ip = network_ip.unwrap_or_else(|| instance.ip.clone());
        let now = Instant::now();
        let attempt_timeout =
            HEALTH_ATTEMPT_TIMEOUT.min(deadline.saturating_duration_since(now)).max(Duration::from_millis(50));
        let last_error = match ip.parse::<IpAddr>() {
            Ok(ip) => match probe(ip, port, path, attempt_timeout).await {
                Ok(status) if (200..400).contains(&status) => return Ok(()),
                Ok(status) => format!("it answered HTTP {status}"),
                Err(error) => error,
            },
            Err(_) => "the container has no address on its network".to_owned(),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(RuntimeError::Unhealthy { path: path.to_owned(), port, timeout, last_error });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(HEALTH_POLL_INTERVAL);
    }
}

/// Whether the app is not running: stopped, or between two runs under the restart policy.
fn has_exited(state: &ContainerState) -> bool {
    state.restarting == Some(true) || state.running == Some(false)
}

/// The container's last log lines (stdout and stderr), oldest first; empty if they cannot be read.
async fn last_log_lines(docker: &Docker, container: &str) -> Vec<String> {
    let options = LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&EXIT_LOG_LINES.to_string()).build();
    let mut logs = std::pin::pin!(docker.api().logs(container, Some(options)));
    let mut text = String::new();
    while let Some(Ok(chunk)) = logs.next().await {
        text.push_str(&chunk.to_string());
    }
    let lines: Vec<String> = text.lines().map(|line| line.trim_end().to_owned()).collect();
    lines[lines.len().saturating_sub(EXIT_LOG_LINES)..].to_vec()
}

/// One `GET` over HTTP/1.1; returns the status code, or why there was none.
async fn probe(ip: IpAddr, port: u16, path: &str, timeout: Duration) -> Result<u16, String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await.map_err(|e| describe_io(&e))?;
        let host = match ip {
            IpAddr::V4(ip) => format!("{ip}:{port}"),
            IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: deployer-agent\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| describe_io(&e))?;
        let mut head = Vec::with_capacity(256);
        let mut buffer = [0u8; 512];
        while !head.contains(&b'\n') && head.len() < 4096 {
            let read = stream.read(&mut buffer).await.map_err(|e| describe_io(&e))?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        parse_status_line(&head)
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| Err(format!("no answer within {}", human(timeout))))
}

fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => error.to_string(),
    }
}

/// The status code of `HTTP/1.1 200 OK`.
fn parse_status_line(head: &[u8]) -> Result<u16, String> {
    if head.is_empty() {
        return Err("the connection closed without an answer".into());
    }
    let line = String::from_utf8_lossy(head);
    let line = line.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") && code.len() == 3 => {
            code.parse().map_err(|_| format!("not an HTTP answer: {line:?}"))
        }
        _ => Err(format!("not an HTTP answer: {:?}", line.chars().take(80).collect::<String>())),
    }
}

/// Stops (SIGTERM, then SIGKILL after `grace`) and removes the containers of `service` in
/// `project` that this agent runs for `preview` ("": the service's own release), except those of
/// `keep_deployment`. Returns their names.
///
/// `project` scopes the search: service names repeat across projects. A preview's release never
/// stops the service's own, nor the reverse.
pub async fn stop_service_instances(
    docker: &Docker,
    agent: &str,
    project: &str,
    service: &str,
    preview: &str,
    keep_deployment: Option<&str>,
    grace: Duration,
) -> Result<Vec<String>, RuntimeError> {
    let mut filter = vec![format!("{LABEL_PROJECT}={project}"), format!("{LABEL_SERVICE}={service}")];
    // The engine cannot filter on a label's absence: the service's own are told apart below.
    if !preview.is_empty() {
        filter.push(format!("{LABEL_PREVIEW}={preview}"));
    }
    let found = managed_containers(docker, agent, &filter).await?;
    let doomed: Vec<_> = found
        .into_iter()
        .filter(|c| replaced_instance(&c.labels, project, service, preview, keep_deployment))
        .collect();
    stop_and_remove(docker, doomed, grace).await
}

/// Whether a container with `labels` is an instance of `service` in `project` for `preview`
/// other than `keep_deployment`'s.
fn replaced_instance(
    labels: &HashMap<String, String>,
    project: &str,
    service: &str,
    preview: &str,
    keep_deployment: Option<&str>,
) -> bool {
    labels.get(LABEL_PROJECT).is_some_and(|p| p == project)
        && labels.get(LABEL_SERVICE).is_some_and(|s| s == service)
        && preview_of(labels) == preview
        && keep_deployment.is_none_or(|keep| labels.get(LABEL_DEPLOYMENT).is_none_or(|d| d != keep))
}

/// Stops (with `grace`) and removes every container of `preview` in `project` that this agent
/// runs, whatever its service or deployment, and then the preview's network. Returns the names
/// of the containers removed; removing what is gone already is fine.
pub async fn remove_preview(
    docker: &Docker,
    agent: &str,
    project: &str,
    preview: &str,
    grace: Duration,
) -> Result<Vec<String>, RuntimeError> {
    if preview.is_empty() {
        // Would match the project's own instances.
        return Ok(Vec::new());
    }
    let filter = [format!("{LABEL_PROJECT}={project}"), format!("{LABEL_PREVIEW}={preview}")];
    let found = managed_containers(docker, agent, &filter).await?;
    let doomed: Vec<_> = found
        .into_iter()
        .filter(|c| c.labels.get(LABEL_PROJECT).is_some_and(|p| p == project) && preview_of(&c.labels) == preview)
        .collect();
    let removed = stop_and_remove(docker, doomed, grace).await?;
    remove_preview_network(docker, project, preview).await?;
    Ok(removed)
}

/// Removes the preview's network if it is ours and no container uses it any more (another
/// agent on the same host may still run instances of the preview on it).
async fn remove_preview_network(docker: &Docker, project: &str, preview: &str) -> Result<(), RuntimeError> {
    let name = network_name(project, preview);
    let network = match docker.api().inspect_network(&name, None).await {
        Ok(network) => network,
        Err(error) if status_code(&error) == Some(404) => return Ok(()),
        Err(error) => return Err(docker_error(format!("inspect network {name}"), error)),
    };
    let labels = network.labels.unwrap_or_default();
    let ours = labels.get(LABEL_MANAGED).is_some_and(|v| v == "true")
        && labels.get(LABEL_PROJECT).is_some_and(|p| p == project)
        && preview_of(&labels) == preview;
    if !ours || network.containers.is_some_and(|c| !c.is_empty()) {
        return Ok(());
    }
    match docker.api().remove_network(&name).await {
        Ok(()) => Ok(()),
        // Gone meanwhile, or a container joined it since.
        Err(error) if matches!(status_code(&error), Some(404 | 409)) => Ok(()),
        Err(error) => Err(docker_error(format!("remove network {name}"), error)),
    }
}

/// Removes the tags `deployer/<project_name>/<any service>:<deployment>` of `deployments` (a
/// preview's images). An image tagged elsewhere too only loses these tags. Returns the tags
/// removed; a tag that is not there is fine.
pub async fn remove_deployment_images(
    docker: &Docker,
    project_name: &str,
    deployments: &[String],
) -> Result<Vec<String>, RuntimeError> {
    let namespace = format!("{IMAGE_NAMESPACE}{project_name}");
    if !is_own_repository(&namespace) || project_name.contains(['/', '*', '?', '[']) {
        return Err(RuntimeError::ForeignRepository { repository: namespace });
    }
    let filters = HashMap::from([("reference", vec![format!("{namespace}/*:*")])]);
    let options = ListImagesOptionsBuilder::new().filters(&filters).build();
    let images = docker
        .api()
        .list_images(Some(options))
        .await
        .map_err(|e| docker_error(format!("list the images of {namespace}/*"), e))?;
    let doomed = deployment_tags(images.iter().flat_map(|image| &image.repo_tags), &namespace, deployments);
    let mut removed = Vec::new();
    for tag in doomed {
        let options = RemoveImageOptionsBuilder::new().force(false).noprune(false).build();
        match docker.api().remove_image(&tag, Some(options), None).await {
            Ok(_) => removed.push(tag),
            Err(error) if status_code(&error) == Some(404) => {}
            Err(error) => return Err(docker_error(format!("remove image {tag}"), error)),
        }
    }
    Ok(removed)
}

/// The tags among `tags` that are `<namespace>/<service>:<deployment>` for one of `deployments`.
fn deployment_tags<'a>(
    tags: impl IntoIterator<Item = &'a String>,
    namespace: &str,
    deployments: &[String],
) -> Vec<String> {
    let mut found: Vec<String> = tags
        .into_iter()
        .filter(|tag| {
            let (repository, name) = split_reference(tag);
            repository
                .strip_prefix(namespace)
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|service| !service.is_empty() && !service.contains('/'))
                && !tag.contains('@')
                && deployments.iter().any(|d| d == name)
        })
        .cloned()
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Stops and removes the containers of `deployment` that this agent runs, with a grace of
/// `DEFAULT_STOP_GRACE`.
pub async fn remove_deployment(docker: &Docker, agent: &str, deployment: &str) -> Result<(), RuntimeError> {
    let found = managed_containers(docker, agent, &[format!("{LABEL_DEPLOYMENT}={deployment}")]).await?;
    let doomed =
        found.into_iter().filter(|c| c.labels.get(LABEL_DEPLOYMENT).is_some_and(|d| d == deployment)).collect();
    stop_and_remove(docker, doomed, DEFAULT_STOP_GRACE).await.map(drop)
}

/// A running instance as the ingress reaches it: its port published on loopback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalBackend {
    pub deployment: String,
    pub service: String,
    /// The preview environment ("" for the service's own release).
    pub preview: String,
    pub addr: std::net::SocketAddr,
}

/// This agent's running instances and where each answers (its port published on 127.0.0.1).
/// A container between two runs (Docker restarting it) has no published port and is left out.
pub async fn running_backends(docker: &Docker, agent: &str) -> Result<Vec<LocalBackend>, RuntimeError> {
    let labels = vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_AGENT}={agent}")];
    let filters = HashMap::from([("label", labels)]);
    let options = ListContainersOptionsBuilder::new().all(false).filters(&filters).build();
    let containers =
        docker.api().list_containers(Some(options)).await.map_err(|e| docker_error("list running containers", e))?;
    let mut backends = Vec::new();
    for summary in containers {
        if !owned_by(summary.labels.as_ref(), agent) {
            continue;
        }
        let labels = summary.labels.unwrap_or_default();
        let (Some(deployment), Some(service)) = (labels.get(LABEL_DEPLOYMENT), labels.get(LABEL_SERVICE)) else {
            continue;
        };
        for port in summary.ports.unwrap_or_default() {
            let loopback = port.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()).filter(IpAddr::is_loopback);
            if let (Some(ip), Some(public)) = (loopback, port.public_port) {
                backends.push(LocalBackend {
                    deployment: deployment.clone(),
                    service: service.clone(),
                    preview: preview_of(&labels).to_owned(),
                    addr: std::net::SocketAddr::new(ip, public),
                });
            }
        }
    }
    backends.sort_by(|a, b| (&a.deployment, a.addr).cmp(&(&b.deployment, b.addr)));
    Ok(backends)
}

struct ManagedContainer {
    id: String,
    name: String,
    labels: HashMap<String, String>,
}

/// Containers (running or not) that carry the managed label, this agent's label and `extra`.
async fn managed_containers(
    docker: &Docker,
    agent: &str,
    extra: &[String],
) -> Result<Vec<ManagedContainer>, RuntimeError> {
    let mut labels = vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_AGENT}={agent}")];
    labels.extend_from_slice(extra);
    let filters = HashMap::from([("label", labels)]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let containers =
        docker.api().list_containers(Some(options)).await.map_err(|e| docker_error("list managed containers", e))?;
    Ok(containers
        .into_iter()
        .filter(|summary| owned_by(summary.labels.as_ref(), agent))
        .filter_map(|summary| {
            let id = summary.id?;
            let name = summary
                .names
                .and_then(|names| names.into_iter().next())
                .map(|name| name.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| id.clone());
            Some(ManagedContainer { id, name, labels: summary.labels.unwrap_or_default() })
        })
        .collect())
}

/// Stops all of `containers` at once (so grace periods do not add up), then removes them.
async fn stop_and_remove(
    docker: &Docker,
    containers: Vec<ManagedContainer>,
    grace: Duration,
) -> Result<Vec<String>, RuntimeError> {
    let seconds = i32::try_from(grace.as_secs() + u64::from(grace.subsec_nanos() > 0)).unwrap_or(i32::MAX);
    let api = docker.api().clone().with_timeout(grace + STOP_REQUEST_SLACK);
    let results = futures::future::join_all(containers.into_iter().map(|container| {
        let api = api.clone();
        async move {
            let options = StopContainerOptionsBuilder::new().t(seconds).build();
            match api.stop_container(&container.id, Some(options)).await {
                // 304: it was not running; 404: it is gone already.
                Ok(()) => {}
                Err(error) if matches!(status_code(&error), Some(304 | 404)) => {}
                Err(error) => return Err(docker_error(format!("stop container {}", container.name), error)),
            }
            remove_container(docker, &container.id).await?;
            Ok(container.name)
        }
    }))
    .await;
    results.into_iter().collect()
}

/// Removes a container and its anonymous volumes; one that is gone already is fine.
async fn remove_container(docker: &Docker, container: &str) -> Result<(), RuntimeError> {
    let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
    match docker.api().remove_container(container, Some(options)).await {
        Ok(()) => Ok(()),
        // 404: gone; 409: a removal is already in progress.
        Err(error) if matches!(status_code(&error), Some(404 | 409)) => Ok(()),
        Err(error) => Err(docker_error(format!("remove container {container}"), error)),
    }
}

/// The isolation a container actually runs with, as the engine reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedHardening {
    pub read_only_root: bool,
    /// Mount options of the tmpfs on `/tmp`, if there is one.
    pub tmp_tmpfs: Option<String>,
    pub no_new_privileges: bool,
    pub cap_drop: Vec<String>,
    pub cap_add: Vec<String>,
    /// Empty: the image's user.
    pub user: String,
    pub memory_bytes: i64,
    pub memory_swap_bytes: i64,
    /// 0: no CPU limit.
    pub nano_cpus: i64,
    pub pids_limit: Option<i64>,
    pub init: bool,
    pub restart_policy: String,
    pub labels: HashMap<String, String>,
    /// Aliases per network the container is attached to.
    pub network_aliases: HashMap<String, Vec<String>>,
}

/// Reads back the hardening of `container` (a name or id) from `docker inspect`.
pub async fn applied_hardening(docker: &Docker, container: &str) -> Result<AppliedHardening, RuntimeError> {
    let inspected = inspect_container(docker, container).await?;
    let host = inspected.host_config.unwrap_or_default();
    let config = inspected.config.unwrap_or_default();
    let network_aliases = inspected
        .network_settings
        .and_then(|settings| settings.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(network, endpoint)| (network, endpoint.aliases.unwrap_or_default()))
        .collect();
    Ok(AppliedHardening {
        read_only_root: host.readonly_rootfs.unwrap_or_default(),
        tmp_tmpfs: host.tmpfs.and_then(|mut tmpfs| tmpfs.remove("/tmp")),
        no_new_privileges: host
            .security_opt
            .unwrap_or_default()
            .iter()
            .any(|opt| opt == "no-new-privileges" || opt == "no-new-privileges:true"),
        cap_drop: host.cap_drop.unwrap_or_default(),
        cap_add: host.cap_add.unwrap_or_default(),
        user: config.user.unwrap_or_default(),
        memory_bytes: host.memory.unwrap_or_default(),
        memory_swap_bytes: host.memory_swap.unwrap_or_default(),
        nano_cpus: host.nano_cpus.unwrap_or_default(),
        pids_limit: host.pids_limit,
        init: host.init.unwrap_or_default(),
        restart_policy: host
            .restart_policy
            .and_then(|policy| policy.name)
            .map(|name| name.to_string())
            .unwrap_or_default(),
        labels: config.labels.unwrap_or_default(),
        network_aliases,
    })
}

/// Also the Docker fixtures of the other modules' tests (`Scratch` and its helpers).
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    const SOCKET: &str = "/var/run/docker.sock";

    /// Whether an engine is reachable; tests that need one skip without it, as in `docker.rs`.
    pub(crate) fn engine_missing() -> bool {
        let missing = std::env::var_os("DOCKER_HOST").is_none() && !Path::new(SOCKET).exists();
        if missing {
            eprintln!("skipped: no Docker engine at {SOCKET}");
        }
        missing
    }

    /// Runs the docker CLI; returns its stdout, or panics with its stderr.
    pub(crate) fn docker_cli(args: &[&str]) -> String {
        let out = Command::new("docker").args(args).stdin(Stdio::null()).output().expect("run the docker CLI");
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like `docker_cli`, for cleanup: failures are ignored.
    fn docker_quiet(args: &[&str]) -> String {
        Command::new("docker")
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Imports an image whose whole root filesystem is busybox (from Debian's `busybox-static`):
    /// no registry is reachable, so tests make their own base.
    fn import_busybox(tag: &str) {
        let busybox = Path::new("/bin/busybox");
        assert!(busybox.exists(), "/bin/busybox not found: install Debian's busybox-static (scripts/test does)");
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(busybox, bin.join("busybox")).unwrap();
        for applet in ["sh", "sleep", "cat", "echo", "false", "true", "httpd"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        std::fs::create_dir_all(root.path().join("tmp")).unwrap();
        let archive = root.path().join("rootfs.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        builder.follow_symlinks(false);
        for dir in ["bin", "tmp"] {
            builder.append_dir_all(dir, root.path().join(dir)).unwrap();
        }
        builder.into_inner().unwrap().sync_all().unwrap();
        docker_cli(&["import", archive.to_str().unwrap(), tag]);
    }

    /// What one test creates, all named after its unique id; removed on drop, even on failure.
    pub(crate) struct Scratch {
        pub(crate) id: String,
        pub(crate) agent: String,
        pub(crate) base: String,
        /// Containers made with the docker CLI, without this agent's labels.
        foreign_containers: Vec<String>,
    }

    impl Scratch {
        pub(crate) async fn new(test: &str) -> (Docker, Scratch) {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            // Lowercase, as a repository name must be.
            let id = format!("rt{}x{}-{test}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
                .to_ascii_lowercase();
            let scratch = Scratch {
                agent: format!("agent-{id}"),
                base: format!("deployer-test/{id}-base:1"),
                foreign_containers: Vec::new(),
                id,
            };
            import_busybox(&scratch.base);
            let docker = crate::docker::connect(None, Duration::from_secs(5)).await.unwrap();
            (docker, scratch)
        }

        pub(crate) fn labels(&self, project: &str, service: &str, deployment: &str) -> Labels {
            Labels {
                agent: self.agent.clone(),
                project: project.into(),
                service: service.into(),
                deployment: deployment.into(),
                preview: String::new(),
            }
        }

        /// The labels of a preview's instance.
        pub(crate) fn preview_labels(&self, project: &str, service: &str, deployment: &str, preview: &str) -> Labels {
            Labels { preview: preview.into(), ..self.labels(project, service, deployment) }
        }

        pub(crate) fn project(&self, suffix: &str) -> String {
            format!("{}-{suffix}", self.id)
        }

        fn tag(&self, name: &str) -> String {
            format!("deployer-test/{}-{name}:1", self.id)
        }

        /// Where the agent tags the images of `service` in `project` (from `Scratch::project`).
        pub(crate) fn repository(&self, project: &str, service: &str) -> String {
            format!("deployer/{project}/{service}")
        }

        /// Whether `tag` is in one of the repositories this test made, `tag` or `repository`.
        fn owns_tag(&self, tag: &str) -> bool {
            tag.starts_with(&format!("deployer-test/{}-", self.id))
                || tag.starts_with(&format!("deployer/{}-", self.id))
        }

        /// Builds a context with `Dockerfile` (its `{base}` replaced) and `files`.
        pub(crate) async fn build(
            &self,
            docker: &Docker,
            dockerfile: &str,
            files: &[(&str, &str)],
            tag: &str,
        ) -> (Result<String, RuntimeError>, Vec<(LogLevel, String)>) {
            let context = tempfile::tempdir().unwrap();
            std::fs::write(context.path().join("Dockerfile"), dockerfile.replace("{base}", &self.base)).unwrap();
            for (name, content) in files {
                std::fs::write(context.path().join(name), content).unwrap();
            }
            let mut lines = Vec::new();
            let built =
                build_image(docker, context.path(), "Dockerfile", tag, &mut |level, line| lines.push((level, line)))
                    .await;
            (built, lines)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let agent_filter = format!("label={LABEL_AGENT}={}", self.agent);
            let mut containers: Vec<String> =
                docker_quiet(&["ps", "-aq", "--filter", &agent_filter]).split_whitespace().map(String::from).collect();
            containers.extend(self.foreign_containers.iter().cloned());
            if !containers.is_empty() {
                docker_quiet(
                    &[&["rm", "-f", "-v"][..], &containers.iter().map(String::as_str).collect::<Vec<_>>()].concat(),
                );
            }
            let networks = docker_quiet(&["network", "ls", "-q", "--filter", &agent_filter]);
            for network in networks.split_whitespace() {
                docker_quiet(&["network", "rm", network]);
            }
            // Images carry no labels: they are found by name. The base goes last, after the images
            // built on it.
            let mut tags: Vec<String> = docker_quiet(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
                .lines()
                .filter(|tag| self.owns_tag(tag) && *tag != self.base)
                .map(String::from)
                .collect();
            tags.push(self.base.clone());
            for tag in tags {
                docker_quiet(&["rmi", "-f", &tag]);
            }
        }
    }

    pub(crate) fn spec<'a>(
        name: &'a str,
        image: &'a str,
        labels: &'a Labels,
        network: &'a str,
        hardening: &'a Hardening,
    ) -> InstanceSpec<'a> {
        InstanceSpec {
            name,
            image,
            labels,
            env: &[],
            port: 8080,
            publish: false,
            cpu_millis: 0,
            memory_bytes: 0,
            network,
            network_aliases: Vec::new(),
            hardening,
        }
    }

    /// The body of `GET path` at `address`.
    async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    pub(crate) const HTTPD_DOCKERFILE: &str = "FROM {base}\nCOPY index.html /www/index.html\n\
        CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n";
    const SLEEP_DOCKERFILE: &str = "FROM {base}\nCMD [\"/bin/busybox\", \"sleep\", \"3600\"]\n";

    #[tokio::test]
    async fn build_streams_its_output() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("build").await;
        let tag = format!("{}:d1", scratch.repository(&scratch.project("p"), "web"));
        let context = tempfile::tempdir().unwrap();
        std::fs::write(context.path().join("Dockerfile"), HTTPD_DOCKERFILE.replace("{base}", &scratch.base)).unwrap();
        std::fs::write(context.path().join("index.html"), "hello").unwrap();
        std::fs::create_dir(context.path().join(".git")).unwrap();
        std::fs::write(context.path().join(".git/HEAD"), "ref: refs/heads/main").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", context.path().join("outside")).unwrap();

        // Spawned, as the agent does, so that the future is checked to be `Send`.
        let (docker2, dir, tag2) = (docker.clone(), context.path().to_path_buf(), tag.clone());
        let (built, lines) = tokio::spawn(async move {
            let mut lines = Vec::new();
            let built =
                build_image(&docker2, &dir, "Dockerfile", &tag2, &mut |level, line| lines.push((level, line))).await;
            (built, lines)
        })
        .await
        .unwrap();
        let id = built.unwrap();

        assert!(id.starts_with("sha256:"), "{id}");
        assert!(
            lines.iter().any(|(level, line)| *level == LogLevel::Info && line.starts_with("Step 2/3 : ")),
            "{lines:?}"
        );
        assert!(!lines.iter().any(|(_, line)| line.contains("LABEL")), "no label steps: {lines:?}");
        assert!(lines.iter().any(|(_, line)| line.contains("COPY index.html /www/index.html")), "{lines:?}");
        assert!(lines.iter().all(|(level, _)| *level != LogLevel::Error), "{lines:?}");
        let image = docker.api().inspect_image(&tag).await.unwrap();
        assert_eq!(image.id.as_deref(), Some(id.as_str()));
        assert_eq!(image.repo_tags, Some(vec![tag.clone()]));
    }

    #[tokio::test]
    async fn build_failures_name_the_step_and_the_engine_error() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("build-fail").await;

        let (built, lines) =
            scratch.build(&docker, "FROM {base}\nRUN /bin/false\nCMD [\"sh\"]\n", &[], &scratch.tag("run")).await;
        let err = built.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, RuntimeError::Build { .. }), "{err:?}");
        assert!(!err.retryable());
        assert!(message.starts_with("the image build failed at step 2/3 (RUN /bin/false): "), "{message}");
        assert!(message.contains("returned a non-zero code: 1"), "{message}");
        assert!(
            lines.iter().any(|(level, line)| *level == LogLevel::Error && line.contains("non-zero code")),
            "{lines:?}"
        );

        let (built, _) = scratch.build(&docker, "FROMM {base}\n", &[], &scratch.tag("typo")).await;
        let message = built.unwrap_err().to_string();
        assert!(message.contains("unknown instruction"), "{message}");

        let (built, _) = scratch.build(&docker, "FROM {base}\nCOPY missing.txt /\n", &[], &scratch.tag("copy")).await;
        let message = built.unwrap_err().to_string();
        assert!(message.contains("missing.txt"), "{message}");
    }

    #[tokio::test]
    async fn hardened_instance_serves_its_page() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("serve").await;
        let project = scratch.project("p");
        let labels = scratch.labels(&project, "web", "d1");
        let tag = scratch.tag("web");
        let (built, _) = scratch.build(&docker, HTTPD_DOCKERFILE, &[("index.html", "<h1>hello</h1>")], &tag).await;
        built.unwrap();
        let network = ensure_network(&docker, &project, &labels).await.unwrap();
        assert_eq!(network, format!("deployer-{project}"));
        assert_eq!(ensure_network(&docker, &project, &labels).await.unwrap(), network, "a second call reuses it");
        let network_labels = docker.api().inspect_network(&network, None).await.unwrap().labels.unwrap();
        assert_eq!(network_labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
        assert_eq!(network_labels.get(LABEL_AGENT), Some(&scratch.agent));
        assert_eq!(network_labels.get(LABEL_PROJECT), Some(&project));

        let name = format!("deployer-web-{}-d1-0", scratch.id);
        let hardening = Hardening::default();
        let env = [("GREETING".to_owned(), "hi there".to_owned())];
        let spec = InstanceSpec {
            env: &env,
            publish: true,
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            network_aliases: vec!["web".into()],
            ..spec(&name, &tag, &labels, &network, &hardening)
        };
        let instance = start_instance(&docker, &spec).await.unwrap();
        assert_eq!(instance.name, name);
        assert!(instance.ip.parse::<IpAddr>().is_ok(), "{instance:?}");
        wait_healthy(&docker, &instance, 8080, "/", Duration::from_secs(20)).await.unwrap();

        let ip: IpAddr = instance.ip.parse().unwrap();
        let page = http_get((ip, 8080).into(), "/index.html").await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n") && page.ends_with("<h1>hello</h1>"), "{page}");
        let host_port = instance.host_port.expect("published");
        let page = http_get(([127, 0, 0, 1], host_port).into(), "/index.html").await;
        assert!(page.ends_with("<h1>hello</h1>"), "{page}");

        let applied = applied_hardening(&docker, &instance.container_id).await.unwrap();
        assert!(applied.read_only_root);
        assert_eq!(applied.tmp_tmpfs.as_deref(), Some(TMP_TMPFS_OPTIONS));
        assert!(applied.no_new_privileges);
        assert_eq!(applied.cap_drop, ["ALL"]);
        assert_eq!(applied.cap_add, Vec::<String>::new());
        assert_eq!(applied.user, NON_ROOT_USER, "the busybox image names no user");
        assert_eq!(applied.memory_bytes, 64 << 20);
        assert_eq!(applied.memory_swap_bytes, 64 << 20);
        assert_eq!(applied.nano_cpus, 500_000_000);
        assert_eq!(applied.pids_limit, Some(DEFAULT_PIDS_LIMIT));
        assert_eq!(applied.restart_policy, "unless-stopped");
        assert_eq!(applied.init, init_available(&docker).await);
        for (key, value) in labels.to_map() {
            assert_eq!(applied.labels.get(&key), Some(&value), "{key}");
        }
        assert!(applied.network_aliases[&network].contains(&"web".to_owned()), "{:?}", applied.network_aliases);
        let env_found = docker.api().inspect_container(&name, None).await.unwrap().config.unwrap().env.unwrap();
        assert!(env_found.contains(&"GREETING=hi there".to_owned()), "{env_found:?}");

        remove_deployment(&docker, &scratch.agent, "d1").await.unwrap();
        let gone = docker.api().inspect_container(&name, None).await.unwrap_err();
        assert_eq!(status_code(&gone), Some(404));
    }

    #[tokio::test]
    async fn an_instance_that_exits_is_reported_with_its_code_and_logs() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("exits").await;
        let project = scratch.project("p");
        let labels = scratch.labels(&project, "crash", "d1");
        let tag = scratch.tag("crash");
        let dockerfile = "FROM {base}\n\
            CMD [\"/bin/busybox\", \"sh\", \"-c\", \"echo starting up; echo cannot open the database >&2; exit 3\"]\n";
        scratch.build(&docker, dockerfile, &[], &tag).await.0.unwrap();
        let network = ensure_network(&docker, &project, &labels).await.unwrap();
        let name = format!("deployer-crash-{}", scratch.id);
        let hardening = Hardening::default();
        let instance = start_instance(&docker, &spec(&name, &tag, &labels, &network, &hardening)).await.unwrap();

        // Docker keeps restarting it (unless-stopped); the health check still gives up long
        // before its timeout.
        let err = wait_healthy(&docker, &instance, 8080, "/", Duration::from_secs(120)).await.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, RuntimeError::Exited { code: 3, .. }), "{err:?}");
        assert!(!err.retryable());
        assert!(message.starts_with("the container exited with code 3 before answering its health check"), "{message}");
        assert!(message.contains("cannot open the database"), "{message}");
        assert!(message.contains("starting up"), "{message}");
    }

    #[tokio::test]
    async fn a_silent_instance_times_out_and_relaxations_apply() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("silent").await;
        let project = scratch.project("p");
        let labels = scratch.labels(&project, "quiet", "d1");
        let tag = scratch.tag("quiet");
        scratch.build(&docker, SLEEP_DOCKERFILE, &[], &tag).await.0.unwrap();
        let network = ensure_network(&docker, &project, &labels).await.unwrap();
        let name = format!("deployer-quiet-{}", scratch.id);
        let hardening = Hardening {
            writable_root: true,
            run_as_root: true,
            capabilities: vec!["CHOWN".into()],
            pids_limit: Some(100),
        };
        let spec = InstanceSpec { port: 80, ..spec(&name, &tag, &labels, &network, &hardening) };
        let instance = start_instance(&docker, &spec).await.unwrap();

        let err = wait_healthy(&docker, &instance, 80, "/healthz", Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, RuntimeError::Unhealthy { .. }), "{err:?}");
        assert!(!err.retryable());
        assert_eq!(err.to_string(), "no healthy answer from /healthz on port 80 within 1s: connection refused");
        let err = wait_healthy(&docker, &instance, 80, "healthz", Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, RuntimeError::HealthPath { .. }), "{err:?}");

        let applied = applied_hardening(&docker, &name).await.unwrap();
        assert!(!applied.read_only_root);
        assert_eq!(applied.tmp_tmpfs, None);
        assert!(applied.no_new_privileges, "never relaxed");
        assert_eq!(applied.cap_drop, ["ALL"]);
        assert_eq!(applied.cap_add, ["CHOWN", "NET_BIND_SERVICE"], "port 80 needs NET_BIND_SERVICE");
        assert_eq!(applied.user, "", "the image's own user");
        assert_eq!(applied.memory_bytes, DEFAULT_MEMORY_BYTES as i64);
        assert_eq!(applied.nano_cpus, 0);
        assert_eq!(applied.pids_limit, Some(100));
    }

    #[tokio::test]
    async fn start_replaces_its_own_leftover_and_refuses_foreign_names() {
        if engine_missing() {
            return;
        }
        let (docker, mut scratch) = Scratch::new("names").await;
        let project = scratch.project("p");
        let labels = scratch.labels(&project, "api", "d1");
        let tag = scratch.tag("api");
        scratch.build(&docker, SLEEP_DOCKERFILE, &[], &tag).await.0.unwrap();
        let network = ensure_network(&docker, &project, &labels).await.unwrap();
        let hardening = Hardening::default();

        let name = format!("deployer-api-{}", scratch.id);
        let first = start_instance(&docker, &spec(&name, &tag, &labels, &network, &hardening)).await.unwrap();
        let second = start_instance(&docker, &spec(&name, &tag, &labels, &network, &hardening)).await.unwrap();
        assert_ne!(first.container_id, second.container_id, "the leftover was replaced");

        let foreign = format!("{}-foreign", scratch.id);
        docker_cli(&["create", "--name", &foreign, &scratch.base, "/bin/busybox", "true"]);
        scratch.foreign_containers.push(foreign.clone());
        let err = start_instance(&docker, &spec(&foreign, &tag, &labels, &network, &hardening)).await.unwrap_err();
        assert!(matches!(err, RuntimeError::NameTaken { .. }), "{err:?}");
        assert!(!docker_cli(&["inspect", &foreign]).is_empty(), "left alone");

        let missing = scratch.tag("never-built");
        let err = start_instance(&docker, &spec(&name, &missing, &labels, &network, &hardening)).await.unwrap_err();
        assert!(matches!(err, RuntimeError::ImageMissing { .. }), "{err:?}");
        assert!(err.to_string().contains(&missing), "{err}");
    }

    #[tokio::test]
    async fn stop_service_keeps_the_named_deployment_and_never_touches_others() {
        if engine_missing() {
            return;
        }
        let (docker, mut scratch) = Scratch::new("stop").await;
        let project = scratch.project("p");
        let other_project = scratch.project("q");
        let old = scratch.labels(&project, "api", "d1");
        let new = scratch.labels(&project, "api", "d2");
        let worker = scratch.labels(&project, "worker", "d3");
        let elsewhere = scratch.labels(&other_project, "api", "d4");
        let tag = scratch.tag("sleep");
        scratch.build(&docker, SLEEP_DOCKERFILE, &[], &tag).await.0.unwrap();
        let network = ensure_network(&docker, &project, &old).await.unwrap();
        let other_network = ensure_network(&docker, &other_project, &elsewhere).await.unwrap();
        let hardening = Hardening::default();
        let name = |what: &str| format!("{}-{what}", scratch.id);
        for (container, labels, network) in [
            (name("old-0"), &old, &network),
            (name("old-1"), &old, &network),
            (name("new-0"), &new, &network),
            (name("worker-0"), &worker, &network),
            (name("elsewhere-0"), &elsewhere, &other_network),
        ] {
            start_instance(&docker, &spec(&container, &tag, labels, network, &hardening)).await.unwrap();
        }
        // Not ours: no labels at all, and another agent's container of the same service.
        let unlabelled = name("unlabelled");
        docker_cli(&["run", "-d", "--name", &unlabelled, &scratch.base, "/bin/busybox", "sleep", "3600"]);
        scratch.foreign_containers.push(unlabelled.clone());
        let other_agent = name("other-agent");
        let label = |key: &str, value: &str| format!("{key}={value}");
        docker_cli(&[
            "create",
            "--name",
            &other_agent,
            "--label",
            &label(LABEL_MANAGED, "true"),
            "--label",
            &label(LABEL_AGENT, "some-other-agent"),
            "--label",
            &label(LABEL_PROJECT, &project),
            "--label",
            &label(LABEL_SERVICE, "api"),
            "--label",
            &label(LABEL_DEPLOYMENT, "d1"),
            &scratch.base,
            "/bin/busybox",
            "true",
        ]);
        scratch.foreign_containers.push(other_agent.clone());

        let mut stopped =
            stop_service_instances(&docker, &scratch.agent, &project, "api", "", Some("d2"), Duration::from_secs(2))
                .await
                .unwrap();
        stopped.sort();
        assert_eq!(stopped, [name("old-0"), name("old-1")]);
        for gone in [name("old-0"), name("old-1")] {
            assert_eq!(status_code(&docker.api().inspect_container(&gone, None).await.unwrap_err()), Some(404));
        }
        for kept in [name("new-0"), name("worker-0"), name("elsewhere-0"), unlabelled.clone(), other_agent.clone()] {
            docker.api().inspect_container(&kept, None).await.unwrap_or_else(|e| panic!("{kept}: {e}"));
        }
        let running = docker_cli(&["inspect", "-f", "{{.State.Running}}", &unlabelled]);
        assert_eq!(running.trim(), "true");

        // No deployment kept: the new one goes too.
        let stopped =
            stop_service_instances(&docker, &scratch.agent, &project, "api", "", None, Duration::from_secs(2))
                .await
                .unwrap();
        assert_eq!(stopped, [name("new-0")]);
        remove_deployment(&docker, &scratch.agent, "d4").await.unwrap();
        assert_eq!(
            status_code(&docker.api().inspect_container(&name("elsewhere-0"), None).await.unwrap_err()),
            Some(404)
        );
        docker.api().inspect_container(&other_agent, None).await.unwrap();
    }

    #[tokio::test]
    async fn a_previews_release_and_the_services_own_replace_only_their_own() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("preview-stop").await;
        let project = scratch.project("p");
        let own_old = scratch.labels(&project, "api", "d1");
        let own_new = scratch.labels(&project, "api", "d2");
        let preview_old = scratch.preview_labels(&project, "api", "p1", "pr-7");
        let preview_new = scratch.preview_labels(&project, "api", "p2", "pr-7");
        let other_preview = scratch.preview_labels(&project, "api", "q1", "pr-8");
        let tag = scratch.tag("sleep");
        scratch.build(&docker, SLEEP_DOCKERFILE, &[], &tag).await.0.unwrap();
        let hardening = Hardening::default();
        let name = |what: &str| format!("{}-{what}", scratch.id);
        for (container, labels) in [
            (name("d1"), &own_old),
            (name("d2"), &own_new),
            (name("p1"), &preview_old),
            (name("p2"), &preview_new),
            (name("q1"), &other_preview),
        ] {
            let network = ensure_network(&docker, &project, labels).await.unwrap();
            let spec = InstanceSpec { publish: true, ..spec(&container, &tag, labels, &network, &hardening) };
            start_instance(&docker, &spec).await.unwrap();
        }
        // Each preview has a network of its own: its service names are the project's.
        let networks = |container: String| {
            let docker = docker.clone();
            async move {
                let mut names: Vec<String> =
                    applied_hardening(&docker, &container).await.unwrap().network_aliases.into_keys().collect();
                names.sort();
                names
            }
        };
        assert_eq!(networks(name("d1")).await, [network_name(&project, "")]);
        assert_eq!(networks(name("p1")).await, [network_name(&project, "pr-7")]);
        assert_eq!(networks(name("q1")).await, [network_name(&project, "pr-8")]);
        let labels = applied_hardening(&docker, &name("p1")).await.unwrap().labels;
        assert_eq!(labels.get(LABEL_PREVIEW).map(String::as_str), Some("pr-7"));
        let labels = applied_hardening(&docker, &name("d1")).await.unwrap().labels;
        assert_eq!(labels.get(LABEL_PREVIEW), None);

        let backends = running_backends(&docker, &scratch.agent).await.unwrap();
        let previews: HashMap<&str, &str> =
            backends.iter().map(|b| (b.deployment.as_str(), b.preview.as_str())).collect();
        assert_eq!(previews, HashMap::from([("d1", ""), ("d2", ""), ("p1", "pr-7"), ("p2", "pr-7"), ("q1", "pr-8")]));

        let grace = Duration::from_secs(2);
        let exists = |container: String| {
            let docker = docker.clone();
            async move { docker.api().inspect_container(&container, None).await.is_ok() }
        };
        // The preview's new release replaces its old one only.
        let stopped =
            stop_service_instances(&docker, &scratch.agent, &project, "api", "pr-7", Some("p2"), grace).await.unwrap();
        assert_eq!(stopped, [name("p1")]);
        for kept in ["d1", "d2", "p2", "q1"] {
            assert!(exists(name(kept)).await, "{kept}");
        }
        // The service's new release replaces its old one only.
        let stopped =
            stop_service_instances(&docker, &scratch.agent, &project, "api", "", Some("d2"), grace).await.unwrap();
        assert_eq!(stopped, [name("d1")]);
        // Stopping the whole service leaves its previews running.
        let stopped = stop_service_instances(&docker, &scratch.agent, &project, "api", "", None, grace).await.unwrap();
        assert_eq!(stopped, [name("d2")]);
        for kept in ["p2", "q1"] {
            assert!(exists(name(kept)).await, "{kept}");
        }

        // Removing a preview takes its containers and network, and nothing of another's.
        assert_eq!(remove_preview(&docker, &scratch.agent, &project, "pr-7", grace).await.unwrap(), [name("p2")]);
        assert!(!exists(name("p2")).await);
        assert!(exists(name("q1")).await);
        let gone = docker.api().inspect_network(&network_name(&project, "pr-7"), None).await.unwrap_err();
        assert_eq!(status_code(&gone), Some(404));
        docker.api().inspect_network(&network_name(&project, "pr-8"), None).await.unwrap();
        docker.api().inspect_network(&network_name(&project, ""), None).await.unwrap();
        assert_eq!(
            remove_preview(&docker, &scratch.agent, &project, "pr-7", grace).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(remove_preview(&docker, &scratch.agent, &project, "", grace).await.unwrap(), Vec::<String>::new());
        assert!(exists(name("q1")).await);
    }

    #[test]
    fn only_a_previews_instances_carry_its_label() {
        let labels = Labels {
            agent: "a".into(),
            project: "p".into(),
            service: "s".into(),
            deployment: "d".into(),
            preview: String::new(),
        };
        assert_eq!(labels.to_map().get(LABEL_PREVIEW), None);
        assert_eq!(preview_of(&labels.to_map()), "");
        let preview = Labels { preview: "pr-7".into(), ..labels };
        assert_eq!(preview.to_map().get(LABEL_PREVIEW).map(String::as_str), Some("pr-7"));
        assert_eq!(preview_of(&preview.network_map()), "pr-7");
    }

    #[test]
    fn a_release_replaces_the_instances_of_its_own_preview_only() {
        let labels = |service: &str, deployment: &str, preview: Option<&str>| {
            let mut labels = HashMap::from([
                (LABEL_PROJECT.to_string(), "p".to_string()),
                (LABEL_SERVICE.to_string(), service.to_string()),
                (LABEL_DEPLOYMENT.to_string(), deployment.to_string()),
            ]);
            if let Some(preview) = preview {
                labels.insert(LABEL_PREVIEW.into(), preview.into());
            }
            labels
        };
        let own = labels("s", "d1", None);
        let preview = labels("s", "p1", Some("pr-7"));
        // The service's own release: instances without the label (as before previews existed).
        assert!(replaced_instance(&own, "p", "s", "", Some("d2")));
        assert!(replaced_instance(&own, "p", "s", "", None));
        assert!(!replaced_instance(&own, "p", "s", "", Some("d1")), "the kept deployment");
        assert!(!replaced_instance(&preview, "p", "s", "", None), "a preview's, for the service's own");
        // A preview's release.
        assert!(replaced_instance(&preview, "p", "s", "pr-7", Some("p2")));
        assert!(!replaced_instance(&preview, "p", "s", "pr-7", Some("p1")));
        assert!(!replaced_instance(&own, "p", "s", "pr-7", None), "the service's own, for a preview");
        assert!(!replaced_instance(&preview, "p", "s", "pr-8", None), "another preview's");
        assert!(!replaced_instance(&preview, "p", "t", "pr-7", None), "another service's");
        assert!(!replaced_instance(&preview, "q", "s", "pr-7", None), "another project's");
    }

    #[test]
    fn previews_have_networks_of_their_own() {
        assert_eq!(network_name("p1", ""), "deployer-p1");
        assert_eq!(network_name("p1", "pr-7"), "deployer-p1-preview-pr-7");
        assert_eq!(network_name("p1", "feature/x y"), "deployer-p1-preview-feature-x-y");
    }

    #[test]
    fn a_previews_image_tags_are_those_of_its_deployments_in_the_project() {
        let tags: Vec<String> = [
            "deployer/shop/web:p1",
            "deployer/shop/api:p1",
            "deployer/shop/api:p2",
            "deployer/shop/api:d1",
            "deployer/shop/nested/api:p1",
            "deployer/shopping/web:p1",
            "deployer/other/web:p1",
            "deployer/shop:p1",
            "deployer/shop/web:p10",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        let found = deployment_tags(&tags, "deployer/shop", &["p1".to_string(), "p2".to_string()]);
        assert_eq!(found, ["deployer/shop/api:p1", "deployer/shop/api:p2", "deployer/shop/web:p1"]);
    }

    /// A sleeping image's Dockerfile that no other build shares, so the build cache cannot merge
    /// two of them into one image.
    pub(crate) fn sleeper(build: &str) -> String {
        format!("FROM {{base}}\nENV BUILD={build}\nCMD [\"/bin/busybox\", \"sleep\", \"3600\"]\n")
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_images_and_those_in_use() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("prune").await;
        let project = scratch.project("p");
        let api = scratch.repository(&project, "api");
        // In the repository, but also tagged outside it: someone else's too, so never pruned.
        let shared = format!("{api}:shared");
        let shared_elsewhere = scratch.tag("shared");
        scratch.build(&docker, &sleeper("shared"), &[], &shared).await.0.unwrap();
        docker_cli(&["tag", &shared, &shared_elsewhere]);
        let mut tags = Vec::new();
        for n in 1..=3 {
            if n > 1 {
                // Not a wait: `created` has one-second resolution, and this gives each build its own.
                tokio::time::sleep(Duration::from_millis(1100)).await;
            }
            let tag = format!("{api}:d{n}");
            scratch.build(&docker, &sleeper(&format!("d{n}")), &[], &tag).await.0.unwrap();
            tags.push(tag);
        }
        let worker = format!("{}:d9", scratch.repository(&project, "worker"));
        scratch.build(&docker, &sleeper("d9"), &[], &worker).await.0.unwrap();
        let outside = scratch.tag("other");
        scratch.build(&docker, &sleeper("other"), &[], &outside).await.0.unwrap();
        // The oldest image still runs (a rollback target, say).
        let labels = scratch.labels(&project, "api", "d1");
        let network = ensure_network(&docker, &project, &labels).await.unwrap();
        let hardening = Hardening::default();
        let name = format!("{}-api", scratch.id);
        start_instance(&docker, &spec(&name, &tags[0], &labels, &network, &hardening)).await.unwrap();

        let none = HashSet::new();
        let removed = prune_images(&docker, &api, 1, &none).await.unwrap();
        assert_eq!(removed, [tags[1].clone()]);
        let exists = |tag: String| {
            let docker = docker.clone();
            async move { docker.api().inspect_image(&tag).await.is_ok() }
        };
        assert!(exists(tags[0].clone()).await, "in use");
        assert!(!exists(tags[1].clone()).await);
        assert!(exists(tags[2].clone()).await, "newest");
        assert!(exists(worker.clone()).await, "another service");
        assert!(exists(outside.clone()).await, "outside deployer/");
        assert!(exists(shared.clone()).await && exists(shared_elsewhere.clone()).await, "tagged elsewhere too");

        remove_deployment(&docker, &scratch.agent, "d1").await.unwrap();
        let removed = prune_images(&docker, &api, 1, &none).await.unwrap();
        assert_eq!(removed, [tags[0].clone()]);
        assert!(exists(tags[2].clone()).await);
        assert_eq!(prune_images(&docker, &api, 1, &none).await.unwrap(), Vec::<String>::new());
        assert_eq!(prune_images(&docker, &api, 0, &none).await.unwrap(), [tags[2].clone()]);
        assert!(exists(shared.clone()).await && exists(shared_elsewhere.clone()).await, "tagged elsewhere too");
        assert!(exists(worker.clone()).await, "another service");
        assert!(exists(scratch.base.clone()).await, "the base image is outside deployer/");
    }

    #[tokio::test]
    async fn prune_refuses_a_repository_outside_deployer() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("prune-foreign").await;
        let victim = scratch.tag("victim");
        scratch.build(&docker, SLEEP_DOCKERFILE, &[], &victim).await.0.unwrap();
        let (repository, _) = split_reference(&victim);
        for repository in [
            repository,
            "deployer",
            "deployer/",
            "deployers/p/api",
            "deployer/p/api:d1",
            "deployer/p/api@sha256:ab",
            "deployer/p /api",
            "",
        ] {
            let err = prune_images(&docker, repository, 0, &HashSet::new()).await.unwrap_err();
            assert!(matches!(err, RuntimeError::ForeignRepository { .. }), "{repository:?}: {err:?}");
            assert!(!err.retryable());
            assert!(err.to_string().contains(&format!("{repository:?}")), "{err}");
        }
        assert!(docker.api().inspect_image(&victim).await.is_ok(), "left alone");
    }

    #[test]
    fn prune_candidates_are_the_repositorys_own_images_newest_first() {
        let image = |id: &str, created: i64, tags: &[&str]| ImageSummary {
            id: id.into(),
            created,
            repo_tags: tags.iter().map(|tag| tag.to_string()).collect(),
            ..Default::default()
        };
        let images: Vec<ImageSummary> = vec![
            image("older", 100, &["deployer/p/api:z"]),
            image("tie-a", 200, &["deployer/p/api:a"]),
            image("tie-b", 200, &["deployer/p/api:0", "deployer/p/api:b"]),
            image("newest", 300, &["deployer/p/api:m"]),
            image("shared", 400, &["deployer/p/api:s", "someone/else:1"]),
            image("longer-name", 400, &["deployer/p/api-x:1"]),
            image("nested", 400, &["deployer/p/api/x:1"]),
            image("dangling", 400, &["<none>:<none>"]),
            image("untagged", 400, &[]),
        ];
        let ids = |spare: &[&str]| -> Vec<String> {
            let spare = spare.iter().map(|tag| tag.to_string()).collect();
            prune_candidates(images.clone(), "deployer/p/api", &spare).into_iter().map(|i| i.id).collect()
        };
        assert_eq!(ids(&[]), ["newest", "tie-b", "tie-a", "older"]);
        // A preview's tags are not the service's: an image only they tag is no candidate, and
        // one they share with the service's own keeps them.
        assert_eq!(ids(&["deployer/p/api:m", "deployer/p/api:0"]), ["tie-b", "tie-a", "older"]);
        let spare = HashSet::from(["deployer/p/api:0".to_string()]);
        let shared = prune_candidates(images.clone(), "deployer/p/api", &spare);
        assert_eq!(shared[1].repo_tags, ["deployer/p/api:b"]);
    }

    #[tokio::test]
    async fn ensure_image_uses_the_local_copy_and_names_a_missing_image() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("ensure").await;
        let expected = docker.api().inspect_image(&scratch.base).await.unwrap().id.unwrap();

        let mut lines = Vec::new();
        let id = ensure_image(&docker, &scratch.base, &mut |level, line| lines.push((level, line))).await.unwrap();
        assert_eq!(id, expected);
        assert!(
            lines.iter().any(|(level, line)| *level == LogLevel::Warn && line.starts_with("could not pull")),
            "{lines:?}"
        );

        let mut lines = Vec::new();
        let id = ensure_image(&docker, &expected, &mut |level, line| lines.push((level, line))).await.unwrap();
        assert_eq!(id, expected);
        assert!(lines.is_empty(), "an id is not pulled: {lines:?}");

        let missing = scratch.tag("nowhere");
        let err = ensure_image(&docker, &missing, &mut |_, _| {}).await.unwrap_err();
        assert!(matches!(err, RuntimeError::ImageMissing { .. }), "{err:?}");
        assert!(!err.retryable());
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("image {missing} is not present on this agent and cannot be pulled: ")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_foreign_network_of_the_same_name_is_refused() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("netname").await;
        let project = scratch.project("p");
        let name = network_name(&project, "");
        docker_cli(&["network", "create", &name]);
        let err = ensure_network(&docker, &project, &scratch.labels(&project, "web", "d1")).await.unwrap_err();
        docker_quiet(&["network", "rm", &name]);
        assert!(matches!(err, RuntimeError::ForeignNetwork { .. }), "{err:?}");
        assert!(err.to_string().contains(&name), "{err}");
    }

    /// Compiles only if every operation can run in a spawned task, as the agent runs them.
    #[allow(dead_code)]
    fn operations_are_send(
        docker: &Docker,
        spec: &InstanceSpec<'_>,
        instance: &Instance,
        log: LogSink<'_>,
        pull_log: LogSink<'_>,
    ) {
        fn send<T: Send>(_: T) {}
        send(build_image(docker, Path::new("."), "Dockerfile", "t", log));
        send(ensure_network(docker, "p", spec.labels));
        send(ensure_image(docker, "i", pull_log));
        send(start_instance(docker, spec));
        send(wait_healthy(docker, instance, 80, "/", Duration::ZERO));
        send(stop_service_instances(docker, "a", "p", "s", "", None, Duration::ZERO));
        send(remove_deployment(docker, "a", "d"));
        send(remove_preview(docker, "a", "p", "pr", Duration::ZERO));
        send(remove_deployment_images(docker, "p", &[]));
        let spare = HashSet::new();
        send(prune_images(docker, "deployer/p/s", 1, &spare));
        send(applied_hardening(docker, "c"));
    }

    #[test]
    fn context_keeps_links_as_links_and_leaves_out_git() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref").unwrap();
        std::fs::create_dir_all(root.join("src/.git")).unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(root.join("Dockerfile"), "FROM x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        std::os::unix::fs::symlink("src/main.rs", root.join("main.rs")).unwrap();
        let long = "d".repeat(120);
        std::fs::create_dir_all(root.join(&long)).unwrap();
        std::fs::write(root.join(&long).join("f.txt"), "long").unwrap();

        let mut archive = Vec::new();
        let skipped = pack_context(root, &mut archive).unwrap();
        assert!(skipped.is_empty());
        let mut entries: Vec<(String, tar::EntryType, Option<String>)> = tar::Archive::new(archive.as_slice())
            .entries()
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                (
                    entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned(),
                    entry.header().entry_type(),
                    entry.link_name().unwrap().map(|link| link.to_string_lossy().into_owned()),
                )
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        let long_file = format!("{long}/f.txt");
        assert_eq!(
            names,
            ["Dockerfile", long.as_str(), &long_file, "main.rs", "passwd", "src", "src/.git", "src/main.rs"]
        );
        let passwd = entries.iter().find(|e| e.0 == "passwd").unwrap();
        assert_eq!((passwd.1, passwd.2.as_deref()), (tar::EntryType::Symlink, Some("/etc/passwd")));
        let main = entries.iter().find(|e| e.0 == "main.rs").unwrap();
        assert_eq!((main.1, main.2.as_deref()), (tar::EntryType::Symlink, Some("src/main.rs")));
    }

    #[test]
    fn unreadable_context_names_the_path() {
        let missing = Path::new("/nonexistent/context");
        let (path, error) = pack_context(missing, Vec::new()).unwrap_err();
        assert_eq!(path, missing);
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn container_body_is_hardened_by_default() {
        let labels = Labels {
            agent: "a".into(),
            project: "p".into(),
            service: "s".into(),
            deployment: "d".into(),
            preview: String::new(),
        };
        let hardening = Hardening::default();
        let spec = spec("n", "img", &labels, "net", &hardening);
        let body = container_body(&spec, "", true);
        let host = body.host_config.unwrap();
        assert_eq!(body.user.as_deref(), Some(NON_ROOT_USER));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, None);
        assert_eq!(host.memory, Some(DEFAULT_MEMORY_BYTES as i64));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.nano_cpus, None);
        assert_eq!(host.init, Some(true));
        assert_eq!(host.port_bindings, None);
        assert_eq!(body.exposed_ports, Some(vec!["8080/tcp".to_owned()]));

        assert_eq!(container_body(&spec, "app", false).user, None, "the image's own user stays");
        assert_eq!(container_body(&spec, "0:0", false).user.as_deref(), Some(NON_ROOT_USER));
        assert_eq!(container_body(&spec, "root", false).host_config.unwrap().init, None);

        let relaxed = Hardening { capabilities: vec!["cap_net_bind_service".into()], ..Hardening::default() };
        let low = InstanceSpec { port: 443, publish: true, ..spec.clone() };
        let low = InstanceSpec { hardening: &relaxed, ..low };
        let host = container_body(&low, "", false).host_config.unwrap();
        assert_eq!(host.cap_add, Some(vec!["cap_net_bind_service".to_owned()]), "not added twice");
        let bindings = host.port_bindings.unwrap();
        let binding = bindings["443/tcp"].as_ref().unwrap();
        assert_eq!(binding[0].host_ip.as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn references_are_split_and_pinned_ones_recognised() {
        assert_eq!(split_reference("postgres"), ("postgres", "latest"));
        assert_eq!(split_reference("postgres:17"), ("postgres", "17"));
        assert_eq!(split_reference("registry:5000/team/app"), ("registry:5000/team/app", "latest"));
        assert_eq!(split_reference("registry:5000/team/app:1.2"), ("registry:5000/team/app", "1.2"));
        assert_eq!(split_reference("app@sha256:abcd"), ("app", "sha256:abcd"));
        assert!(is_pinned("app@sha256:abcd"));
        assert!(is_pinned("sha256:0123456789abcdef"));
        assert!(is_pinned("0123456789ab"));
        assert!(!is_pinned("postgres:17"));
        assert!(!is_pinned("deadbeef"));
    }

    #[test]
    fn small_parsers() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 302 Found\r\nLocation: /x\r\n"), Ok(302));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n").unwrap_err().starts_with("not an HTTP answer"));
        assert_eq!(parse_status_line(b"").unwrap_err(), "the connection closed without an answer");
        assert_eq!(build_step("Step 2/3 : RUN make all").as_deref(), Some("step 2/3 (RUN make all)"));
        assert_eq!(build_step(" ---> Running in 1234"), None);
        assert!(is_root("") && is_root("root") && is_root("0:0") && is_root("root:staff"));
        assert!(!is_root("app") && !is_root("1000:1000"));
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(30)), "30s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn exit_errors_quote_the_logs() {
        let err = RuntimeError::Exited { code: 1, restarts: 2, oom_killed: true, logs: vec!["a".into(), "b".into()] };
        assert_eq!(
            err.to_string(),
            "the container exited with code 1 before answering its health check (killed for exceeding its \
             memory limit) (Docker restarted it 2 times); its last log lines:\n  a\n  b"
        );
        let err = RuntimeError::Exited { code: 0, restarts: 0, oom_killed: false, logs: vec![] };
        assert!(err.to_string().ends_with("; it wrote no log lines"));
        let err = RuntimeError::Docker { operation: "x".into(), error: BollardError::RequestTimeoutError };
        assert!(err.retryable());
    }
}

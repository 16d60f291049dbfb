//! Deployments on the agent: each attempt the leader sends runs here, off the session, and its
//! progress (log lines and status) waits in an outbox until the controller acknowledges it.
//!
//! The session only carries messages: when it drops, attempts go on, and the next session sends
//! again whatever was not acknowledged (the controller keeps a line once, by its number). An
//! attempt is run at most once: a repeat of one in progress is ignored, and a repeat of one
//! that ended (even before a restart of the agent) is answered from its result file.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployer_proto::agent::agent_message::Body as AgentBody;
use deployer_proto::agent::run_deployment::Source as RunSource;
use deployer_proto::agent::{
    AgentMessage, DeploymentUpdate, DestroyPreview, FetchUpload, InstanceEvent, LogLine, PreviewDestroyed,
    RunDeployment, StopService, UpdateAck, UploadChunk,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use crate::docker::Docker;
use crate::runtime::{self, Hardening, InstanceSpec, Labels, LogLevel};
use crate::source::{self, GitSource, Limits};

/// Lines sent in one update message.
const LINES_PER_UPDATE: usize = 200;
/// Unacknowledged lines kept per attempt; older ones are dropped (the log says so).
const MAX_PENDING_LINES: usize = 20_000;
/// How long old instances get to finish their requests when a new release replaces them.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a window of upload chunks before asking again.
const UPLOAD_WAIT: Duration = Duration::from_secs(30);
/// How long an aborted attempt gets to let go of what it holds before its preview is removed.
const ABORT_WAIT: Duration = Duration::from_secs(5);
/// A source directory `<dir>` of a deployment has `<dir>.service` beside it, holding the
/// service's id, and, for a preview's deployment, `<dir>.preview`, holding the preview.
const SERVICE_MARKER: &str = "service";
const PREVIEW_MARKER: &str = "preview";

/// What the agent needs to run deployments.
#[derive(Clone)]
pub struct TaskContext {
    pub docker: Docker,
    pub agent_id: String,
    /// Root of `projects/<projectId>/{sources,builds,deployments}`.
    pub storage: PathBuf,
    /// Whether `file://` git URLs may be cloned (dev mode).
    pub allow_file_git: bool,
    /// The ingress, which replaced instances wait for before they stop (None: no ingress).
    pub ingress: Option<Arc<crate::routing::Ingress>>,
}

/// How an attempt ended (or where it stands), as reported to the controller.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Report {
    status: String,
    image: String,
    commit: String,
    url: String,
    error: String,
    retryable: bool,
}

struct Task {
    /// Lines not yet acknowledged, in order.
    lines: VecDeque<LogLine>,
    next_seq: u64,
    /// Lines up to this were sent on the current session.
    sent_upto: u64,
    /// The latest status, and the seq of the line that announced it.
    report: Option<(Report, u64)>,
    report_sent: bool,
    finished: bool,
    /// Stops the attempt's work (when the controller moved it to another agent).
    abort: Option<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Inner {
    tasks: HashMap<(String, u32), Task>,
    uploads: HashMap<String, mpsc::Sender<UploadChunk>>,
    /// Messages other than updates, sent once.
    extra: Vec<AgentMessage>,
    /// Previews being removed, by (project, preview): a repeat of the request waits for the answer.
    destroying: HashSet<(String, String)>,
}

pub struct Tasks {
    ctx: TaskContext,
    inner: Mutex<Inner>,
    /// Something waits in the outbox.
    pub ready: Notify,
}

/// A failed step: the message for the user, and whether trying again may help.
struct Failure {
    message: String,
    retryable: bool,
}

impl From<source::SourceError> for Failure {
    fn from(e: source::SourceError) -> Failure {
        Failure { retryable: e.retryable(), message: e.to_string() }
    }
}

impl From<runtime::RuntimeError> for Failure {
    fn from(e: runtime::RuntimeError) -> Failure {
        Failure { retryable: e.retryable(), message: e.to_string() }
    }
}

fn io_failure(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure { message: format!("{what}: {e}"), retryable: true }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn level_str(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

impl Tasks {
    pub fn new(ctx: TaskContext) -> Arc<Tasks> {
        Arc::new(Tasks { ctx, inner: Mutex::default(), ready: Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn result_file(&self, project: &str, id: &str, attempt: u32) -> PathBuf {
        self.ctx
            .storage
            .join("projects")
            .join(project)
            .join("deployments")
            .join(id)
            .join(format!("attempt-{attempt}.json"))
    }

    /// A new session: everything not acknowledged goes out again.
    pub fn session_started(&self) {
        let mut inner = self.lock();
        for task in inner.tasks.values_mut() {
            task.sent_upto = 0;
            task.report_sent = false;
        }
        drop(inner);
        self.ready.notify_one();
    }

    /// Messages to send now.
    pub fn drain(&self) -> Vec<AgentMessage> {
        let mut inner = self.lock();
        let mut out: Vec<AgentMessage> = std::mem::take(&mut inner.extra);
        for ((id, attempt), task) in inner.tasks.iter_mut() {
            loop {
                // Lines are in seq order: the unsent ones start where the sent ones end.
                let first_unsent = task.lines.partition_point(|l| l.seq <= task.sent_upto);
                let lines: Vec<LogLine> = task.lines.range(first_unsent..).take(LINES_PER_UPDATE).cloned().collect();
                let report_due = !task.report_sent
                    && task.report.as_ref().is_some_and(|(_, seq)| lines.last().is_none_or(|l| l.seq >= *seq));
                if lines.is_empty() && !report_due {
                    break;
                }
                if let Some(last) = lines.last() {
                    task.sent_upto = last.seq;
                }
                let mut update = DeploymentUpdate {
                    deployment_id: id.clone(),
                    attempt: *attempt,
                    logs: lines,
                    ..Default::default()
                };
                if report_due {
                    if let Some((r, _)) = &task.report {
                        update.status = r.status.clone();
                        update.image = r.image.clone();
                        update.commit = r.commit.clone();
                        update.url = r.url.clone();
                        update.error = r.error.clone();
                        update.retryable = r.retryable;
                    }
                    task.report_sent = true;
                }
                out.push(AgentMessage { body: Some(AgentBody::DeploymentUpdate(update)) });
            }
        }
        out
    }

    /// The controller recorded an attempt's lines up to `seq`.
    pub fn acked(&self, ack: UpdateAck) {
        let mut inner = self.lock();
        let key = (ack.deployment_id, ack.attempt);
        if ack.abandon {
            // The deployment went on elsewhere: stop this attempt and remove what it started.
            if let Some(abort) = inner.tasks.remove(&key).and_then(|t| t.abort) {
                abort.abort();
            }
            let (docker, agent, deployment) = (self.ctx.docker.clone(), self.ctx.agent_id.clone(), key.0.clone());
            tracing::warn!(deployment = %deployment, attempt = key.1, "the attempt moved to another agent: abandoned");
            tokio::spawn(async move {
                if let Err(e) = runtime::remove_deployment(&docker, &agent, &deployment).await {
                    tracing::warn!(deployment = %deployment, error = %e, "cannot remove an abandoned attempt's containers");
                }
            });
            return;
        }
        let Some(task) = inner.tasks.get_mut(&key) else { return };
        while task.lines.front().is_some_and(|l| l.seq <= ack.seq) {
            task.lines.pop_front();
        }
        if ack.r#final {
            task.report = None;
            task.lines.clear();
            if task.finished {
                inner.tasks.remove(&key);
            }
        }
    }

    fn log(&self, key: &(String, u32), level: &str, phase: &str, message: String) -> u64 {
        let mut inner = self.lock();
        let Some(task) = inner.tasks.get_mut(key) else { return 0 };
        task.next_seq += 1;
        let seq = task.next_seq;
        if task.lines.len() >= MAX_PENDING_LINES {
            task.lines.pop_front();
        }
        task.lines.push_back(LogLine {
            seq,
            level: level.into(),
            message,
            at_ms: now_ms(),
            phase: phase.into(),
            step: String::new(),
        });
        drop(inner);
        self.ready.notify_one();
        seq
    }

    fn set_report(&self, key: &(String, u32), report: Report, message: String) {
        let level = if report.status == "failed" { "error" } else { "info" };
        let phase = match report.status.as_str() {
            "building" => "source",
            "deploying" => "deploy",
            _ => "run",
        };
        let seq = self.log(key, level, phase, message);
        let mut inner = self.lock();
        if let Some(task) = inner.tasks.get_mut(key) {
            task.report = Some((report, seq));
            task.report_sent = false;
        }
        drop(inner);
        self.ready.notify_one();
    }

    /// The leader asks for an attempt: start it, unless it runs or ran already.
    pub fn run(self: &Arc<Self>, run: RunDeployment) {
        let key = (run.deployment_id.clone(), run.attempt);
        let result_file = self.result_file(&run.project_id, &run.deployment_id, run.attempt);
        let mut inner = self.lock();
        if inner.tasks.contains_key(&key) {
            return;
        }
        let mut task = Task {
            lines: VecDeque::new(),
            next_seq: 0,
            sent_upto: 0,
            report: None,
            report_sent: false,
            finished: false,
            abort: None,
        };
        // It ended before (this agent may have restarted since): say how, again.
        if let Some(report) = std::fs::read(&result_file).ok().and_then(|b| serde_json::from_slice::<Report>(&b).ok()) {
            task.finished = true;
            task.next_seq = 1_000_000_000;
            task.report = Some((report, 0));
            inner.tasks.insert(key, task);
            drop(inner);
            self.ready.notify_one();
            return;
        }
        inner.tasks.insert(key.clone(), task);
        drop(inner);
        let tasks = self.clone();
        let abort_key = key.clone();
        let work = tokio::spawn(async move {
            tracing::info!(deployment = %key.0, attempt = key.1, "deployment attempt started");
            let report = match tasks.execute(&key, &run).await {
                Ok(report) => report,
                Err(f) => {
                    // Nothing of a failed attempt keeps running; the previous release is untouched.
                    let _ =
                        runtime::remove_deployment(&tasks.ctx.docker, &tasks.ctx.agent_id, &run.deployment_id).await;
                    Report { status: "failed".into(), error: f.message, retryable: f.retryable, ..Default::default() }
                }
            };
            tracing::info!(deployment = %key.0, attempt = key.1, status = %report.status, "deployment attempt ended");
            if let Some(dir) = result_file.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Ok(bytes) = serde_json::to_vec(&report) {
                let _ = deployer_common::files::write_atomic(&result_file, &bytes, false);
            }
            let message = match report.status.as_str() {
                "running" => format!(
                    "deployment running{}",
                    if report.url.is_empty() { String::new() } else { format!(" at {}", report.url) }
                ),
                _ => format!("deployment failed: {}", report.error),
            };
            let running = report.status == "running";
            tasks.set_report(&key, report, message);
            if running {
                // The new release serves: the one it replaces on this agent stops (given its
                // grace to finish what it is doing), and old sources and images go.
                tasks.retire_previous(&run).await;
                tasks.cleanup(&run).await;
            }
            let mut inner = tasks.lock();
            if let Some(task) = inner.tasks.get_mut(&key) {
                task.finished = true;
            }
        });
        if let Some(task) = self.lock().tasks.get_mut(&abort_key) {
            task.abort = Some(work.abort_handle());
        }
    }

    /// Watches the engine for this agent's instances that die. Docker restarts a crashed one
    /// (restart policy `unless-stopped`, with its own backoff); each crash becomes a line of its
    /// deployment's log. A container the agent stopped on purpose is gone or stays stopped,
    /// and is not reported.
    pub async fn watch_crashes(self: Arc<Self>) {
        let filters = std::collections::HashMap::from([
            ("type", vec!["container".to_string()]),
            ("event", vec!["die".to_string(), "start".to_string()]),
            ("label", vec!["deployer.managed=true".to_string(), format!("deployer.agent={}", self.ctx.agent_id)]),
        ]);
        loop {
            let options = bollard::query_parameters::EventsOptionsBuilder::new().filters(&filters).build();
            let api = self.ctx.docker.api().clone().with_timeout(Duration::from_secs(24 * 3600));
            let mut events = std::pin::pin!(api.events(Some(options)));
            while let Some(Ok(event)) = events.next().await {
                let Some(actor) = event.actor else { continue };
                // An instance came or went: the ingress resolves its addresses again.
                if let Some(ingress) = self.ctx.ingress.clone() {
                    tokio::spawn(async move { ingress.refresh().await });
                }
                if event.action.as_deref() != Some("die") {
                    continue;
                }
                let attributes = actor.attributes.unwrap_or_default();
                let (Some(id), Some(deployment)) = (actor.id, attributes.get("deployer.deployment").cloned()) else {
                    continue;
                };
                let name = attributes.get("name").cloned().unwrap_or_else(|| id.clone());
                let code = attributes.get("exitCode").cloned().unwrap_or_else(|| "?".into());
                let tasks = self.clone();
                tokio::spawn(async move { tasks.report_crash(id, name, deployment, code).await });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn report_crash(&self, id: String, name: String, deployment: String, code: String) {
        // Give Docker a moment to decide: restarting (a crash) or stopped (on purpose).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(inspect) = self.ctx.docker.api().inspect_container(&id, None).await else { return };
        let state = inspect.state.unwrap_or_default();
        let restarting = state.restarting.unwrap_or(false) || state.running.unwrap_or(false);
        if !restarting {
            return;
        }
        let restarts = inspect.restart_count.unwrap_or(0);
        let oom = if state.oom_killed.unwrap_or(false) { " (killed: out of memory)" } else { "" };
        let message = format!("{name} exited with code {code}{oom}; Docker restarts it (restart {restarts})");
        tracing::warn!(deployment = %deployment, "{message}");
        let event = InstanceEvent { deployment_id: deployment, level: "warn".into(), message, at_ms: now_ms() };
        self.lock().extra.push(AgentMessage { body: Some(AgentBody::InstanceEvent(event)) });
        self.ready.notify_one();
    }

    /// A window of an uploaded tarball arrived.
    pub fn upload_chunk(&self, chunk: UploadChunk) {
        let tx = self.lock().uploads.get(&chunk.deployment_id).cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send(chunk);
        }
    }

    /// Sends `message` to the controller with the next batch.
    pub fn send(&self, message: AgentMessage) {
        self.lock().extra.push(message);
        self.ready.notify_one();
    }

    /// A newer release of the service runs elsewhere: once no route points at this agent's
    /// instances of it and their requests are done, stop them.
    pub fn stop_service(&self, stop: StopService) {
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let keep = Some(stop.keep_deployment.as_str()).filter(|k| !k.is_empty());
            if let Some(ingress) = &ctx.ingress {
                ingress.release(&stop.service_id, &stop.preview, keep).await;
            }
            match runtime::stop_service_instances(
                &ctx.docker,
                &ctx.agent_id,
                &stop.project_id,
                &stop.service_id,
                &stop.preview,
                keep,
                STOP_GRACE,
            )
            .await
            {
                Ok(stopped) if !stopped.is_empty() => {
                    let (service, preview) = (&stop.service_id, &stop.preview);
                    tracing::info!(%service, %preview, ?stopped, "stopped replaced instances")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    service = %stop.service_id, preview = %stop.preview, error = %e, "cannot stop replaced instances"
                ),
            }
        });
    }

    async fn execute(self: &Arc<Self>, key: &(String, u32), run: &RunDeployment) -> Result<Report, Failure> {
        let ctx = &self.ctx;
        let labels = Labels {
            agent: ctx.agent_id.clone(),
            project: run.project_id.clone(),
            service: run.service_id.clone(),
            deployment: run.deployment_id.clone(),
            preview: run.preview.clone(),
        };
        let project_dir = ctx.storage.join("projects").join(&run.project_id);
        let source_dir = project_dir.join("sources").join(&run.deployment_id);
        self.set_report(
            key,
            Report { status: "building".into(), ..Default::default() },
            format!("attempt {}: building", run.attempt),
        );
        // Leftovers of an earlier, interrupted run of this attempt go first.
        let _ = runtime::remove_deployment(&ctx.docker, &ctx.agent_id, &run.deployment_id).await;
        let tag = format!("deployer/{}/{}:{}", run.project_name, run.service_name, run.deployment_id);
        let mut report = Report::default();
        let image = match &run.source {
            Some(RunSource::Git(g)) => {
                self.fresh_dir(&source_dir, run).await?;
                let fetched = self.clone_git(key, g, &source_dir).await?;
                report.commit = fetched.commit.clone();
                self.log(key, "info", "source", format!("commit {} {}", short(&fetched.commit), fetched.summary));
                self.build(key, &source_dir, &g.dockerfile, &tag).await?
            }
            Some(RunSource::Upload(u)) => {
                self.fresh_dir(&source_dir, run).await?;
                let bytes = self.fetch_upload(key, run, u.chunks).await?;
                let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
                if digest != u.sha256 || bytes.len() as u64 != u.size {
                    return Err(Failure {
                        message: "the uploaded tarball arrived damaged (checksum mismatch)".into(),
                        retryable: true,
                    });
                }
                self.log(key, "info", "source", format!("extracting the uploaded source ({} bytes)", bytes.len()));
                let dest = source_dir.clone();
                let stats =
                    tokio::task::spawn_blocking(move || source::extract_tar_gz(&bytes[..], &dest, &Limits::default()))
                        .await
                        .map_err(|e| io_failure("extraction stopped", e))??;
                self.log(key, "info", "source", format!("extracted {} files, {} bytes", stats.files, stats.bytes));
                self.build(key, &source_dir, &u.dockerfile, &tag).await?
            }
            Some(RunSource::Image(reference)) => {
                let mut sink = self.sink(key, "source");
                runtime::ensure_image(&ctx.docker, reference, &mut sink).await?;
                reference.clone()
            }
            None => return Err(Failure { message: "the deployment names no source".into(), retryable: false }),
        };
        report.image = image.clone();
        self.set_report(
            key,
            Report {
                status: "deploying".into(),
                image: image.clone(),
                commit: report.commit.clone(),
                ..Default::default()
            },
            format!("starting {} instance(s) of {image}", run.replicas.max(1)),
        );
        let network = runtime::ensure_network(&ctx.docker, &run.project_id, &labels).await?;
        let env: Vec<(String, String)> = run.env.iter().map(|e| (e.name.clone(), e.value.clone())).collect();
        let security = run.security.clone().unwrap_or_default();
        let hardening = Hardening {
            writable_root: security.writable_root,
            run_as_root: security.run_as_root,
            capabilities: security.capabilities,
            pids_limit: Some(security.pids_limit).filter(|p| *p > 0),
        };
        let port = u16::try_from(run.port)
            .map_err(|_| Failure { message: format!("port {} is out of range", run.port), retryable: false })?;
        // The id's last characters: ids are UUIDv7, whose leading ones are the time, the same for
        // every deployment made within a minute.
        let alnum: Vec<char> = run.deployment_id.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let short_id: String = alnum[alnum.len().saturating_sub(12)..].iter().collect();
        let mut instances = Vec::new();
        for replica in 0..run.replicas.max(1) {
            let name = format!("deployer-{}-{}-{short_id}-{replica}", run.service_name, run.project_name);
            let spec = InstanceSpec {
                name: &name,
                image: &image,
                labels: &labels,
                env: &env,
                port,
                publish: true,
                cpu_millis: run.cpu_millis,
                memory_bytes: run.memory_bytes,
                network: &network,
                network_aliases: vec![run.service_name.clone()],
                hardening: &hardening,
            };
            let instance = runtime::start_instance(&ctx.docker, &spec).await?;
            self.log(key, "info", "deploy", format!("started {} ({})", instance.name, short(&instance.container_id)));
            instances.push(instance);
        }
        let timeout = Duration::from_secs(u64::from(run.health_timeout_s.max(1)));
        for instance in &instances {
            self.log(
                key,
                "info",
                "health",
                format!("waiting for {} to answer GET {} on port {port}", instance.name, run.health_path),
            );
            runtime::wait_healthy(&ctx.docker, instance, port, &run.health_path, timeout).await?;
            self.log(key, "info", "health", format!("{} is healthy", instance.name));
        }
        report.status = "running".into();
        report.url =
            instances.iter().find_map(|i| i.host_port).map(|p| format!("http://127.0.0.1:{p}")).unwrap_or_default();
        Ok(report)
    }

    /// A log sink for the runtime's output.
    fn sink(
        self: &Arc<Self>,
        key: &(String, u32),
        phase: &'static str,
    ) -> impl FnMut(LogLevel, String) + Send + 'static {
        let tasks = self.clone();
        let key = key.clone();
        move |level, line| {
            tasks.log(&key, level_str(level), phase, line);
        }
    }

    async fn build(
        self: &Arc<Self>,
        key: &(String, u32),
        dir: &Path,
        dockerfile: &str,
        tag: &str,
    ) -> Result<String, Failure> {
        let root = dir.to_path_buf();
        let requested = dockerfile.to_string();
        let dockerfile = tokio::task::spawn_blocking(move || source::dockerfile_in(&root, &requested))
            .await
            .map_err(|e| io_failure("checking the Dockerfile stopped", e))??;
        self.log(key, "info", "build", format!("building {tag} from {dockerfile}"));
        let mut sink = self.sink(key, "build");
        runtime::build_image(&self.ctx.docker, dir, &dockerfile, tag, &mut sink).await?;
        Ok(tag.to_string())
    }

    async fn clone_git(
        self: &Arc<Self>,
        key: &(String, u32),
        g: &deployer_proto::agent::GitSource,
        dest: &Path,
    ) -> Result<source::Fetched, Failure> {
        let g = g.clone();
        let dest = dest.to_path_buf();
        let allow_file = self.ctx.allow_file_git;
        let mut sink = self.sink(key, "source");
        let fetched = tokio::task::spawn_blocking(move || {
            let src = GitSource {
                url: &g.url,
                branch: Some(g.branch.as_str()).filter(|b| !b.is_empty()),
                commit: Some(g.commit.as_str()).filter(|c| !c.is_empty()),
                username: Some(g.username.as_str()).filter(|u| !u.is_empty()),
                password: Some(g.password.as_str()).filter(|p| !p.is_empty()),
                allow_file,
            };
            source::fetch_git(&src, &dest, &mut |line| sink(LogLevel::Info, line))
        })
        .await
        .map_err(|e| io_failure("the clone stopped", e))??;
        Ok(fetched)
    }

    /// An empty directory for the deployment's source, recorded as the service's (and the
    /// preview's, for a preview's deployment).
    async fn fresh_dir(&self, dir: &Path, run: &RunDeployment) -> Result<(), Failure> {
        if tokio::fs::metadata(dir).await.is_ok() {
            tokio::fs::remove_dir_all(dir).await.map_err(|e| io_failure("cannot clear the source directory", e))?;
        }
        tokio::fs::create_dir_all(dir).await.map_err(|e| io_failure("cannot create the source directory", e))?;
        let write = |extension: &str, content: String| {
            let marker = dir.with_extension(extension);
            async move {
                tokio::fs::write(&marker, content).await.map_err(|e| io_failure("cannot write the source directory", e))
            }
        };
        // The preview's marker first: the service's cleanup never sees it as the service's own.
        if !run.preview.is_empty() {
            write(PREVIEW_MARKER, run.preview.clone()).await?;
        }
        write(SERVICE_MARKER, run.service_id.clone()).await
    }

    async fn fetch_upload(
        self: &Arc<Self>,
        key: &(String, u32),
        run: &RunDeployment,
        chunks: u32,
    ) -> Result<Vec<u8>, Failure> {
        let (tx, mut rx) = mpsc::channel(64);
        self.lock().uploads.insert(run.deployment_id.clone(), tx);
        self.log(key, "info", "source", format!("fetching the uploaded source ({chunks} chunks)"));
        let mut data = Vec::new();
        let mut next = 0u32;
        let mut tries = 0;
        let result = loop {
            if next >= chunks {
                break Ok(data);
            }
            self.ask(FetchUpload { deployment_id: run.deployment_id.clone(), chunk: next });
            let window_end = next + 8;
            loop {
                match tokio::time::timeout(UPLOAD_WAIT, rx.recv()).await {
                    Ok(Some(chunk)) if !chunk.error.is_empty() => {
                        break;
                    }
                    Ok(Some(chunk)) if chunk.chunk == next => {
                        data.extend_from_slice(&chunk.data);
                        next += 1;
                        tries = 0;
                        if next >= window_end || next >= chunks {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            tries += 1;
            if tries > 5 {
                break Err(Failure {
                    message: format!("the upload could not be fetched (stuck at chunk {next} of {chunks})"),
                    retryable: true,
                });
            }
        };
        self.lock().uploads.remove(&run.deployment_id);
        result
    }

    fn ask(&self, fetch: FetchUpload) {
        self.lock().extra.push(AgentMessage { body: Some(AgentBody::FetchUpload(fetch)) });
        self.ready.notify_one();
    }

    /// Stops this agent's instances of the service (of the same preview) other than the
    /// deployment's.
    async fn retire_previous(&self, run: &RunDeployment) {
        let ctx = &self.ctx;
        let keep = Some(run.deployment_id.as_str());
        // Zero downtime: the old instances serve until the routes point at the new ones and
        // what they are answering is done.
        if let Some(ingress) = &ctx.ingress {
            ingress.release(&run.service_id, &run.preview, keep).await;
        }
        let stopped = runtime::stop_service_instances(
            &ctx.docker,
            &ctx.agent_id,
            &run.project_id,
            &run.service_id,
            &run.preview,
            keep,
            STOP_GRACE,
        )
        .await;
        match stopped {
            Ok(stopped) if !stopped.is_empty() => {
                tracing::info!(preview = %run.preview, ?stopped, "stopped the previous instances")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(preview = %run.preview, error = %e, "cannot stop the previous instances"),
        }
    }

    /// Keeps the newest `keep` sources and images of the service; never touches anything that
    /// is not ours. A preview's deployments are neither counted nor removed here: they go all
    /// together with their preview ([`Tasks::destroy_preview`]).
    async fn cleanup(&self, run: &RunDeployment) {
        if !run.preview.is_empty() {
            return;
        }
        let keep = run.keep.max(1) as usize;
        let sources = self.ctx.storage.join("projects").join(&run.project_id).join("sources");
        let markers = source_markers(&sources).await;
        let repository = format!("deployer/{}/{}", run.project_name, run.service_name);
        let spare: HashSet<String> =
            markers.iter().filter(|m| m.preview.is_some()).map(|m| format!("{repository}:{}", m.deployment)).collect();
        match runtime::prune_images(&self.ctx.docker, &repository, keep, &spare).await {
            Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed old images"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove old images"),
        }
        let mut mine: Vec<_> =
            markers.into_iter().filter(|m| m.preview.is_none() && m.service == run.service_id).collect();
        mine.sort_by_key(|m| std::cmp::Reverse(m.modified));
        for marker in mine.into_iter().skip(keep) {
            let dir = sources.join(&marker.deployment);
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let _ = tokio::fs::remove_file(dir.with_extension(SERVICE_MARKER)).await;
        }
    }

    /// The controller removes a preview environment: its attempts here stop, and its
    /// containers, network, images and sources go, off the session. The answer,
    /// `PreviewDestroyed`, goes out through the outbox; a repeat of the request while one runs
    /// is answered by that one.
    pub fn destroy_preview(self: &Arc<Self>, destroy: DestroyPreview) {
        let key = (destroy.project_id.clone(), destroy.preview.clone());
        if !self.lock().destroying.insert(key.clone()) {
            return;
        }
        let tasks = self.clone();
        tokio::spawn(async move {
            let problems = tasks.remove_preview(&destroy).await;
            let error = if problems.is_empty() {
                tracing::info!(project = %destroy.project_id, preview = %destroy.preview, "preview removed");
                String::new()
            } else {
                let error = format!("preview {} was not entirely removed: {}", destroy.preview, problems.join("; "));
                tracing::warn!(project = %destroy.project_id, %error, "cannot remove a preview");
                error
            };
            tasks.lock().destroying.remove(&key);
            tasks.send(AgentMessage {
                body: Some(AgentBody::PreviewDestroyed(PreviewDestroyed {
                    project_id: destroy.project_id,
                    preview: destroy.preview,
                    error,
                })),
            });
        });
    }

    /// Does the work of [`Tasks::destroy_preview`]; returns what could not be removed. Everything
    /// it removes may be gone already.
    async fn remove_preview(&self, destroy: &DestroyPreview) -> Vec<String> {
        let ctx = &self.ctx;
        let names = [&destroy.project_id, &destroy.preview].into_iter().chain(&destroy.deployment_ids);
        if let Some(bad) = names.into_iter().find(|name| !is_plain_name(name)) {
            return vec![format!("{bad:?} is not a valid project, preview or deployment id")];
        }
        self.abort_attempts(&destroy.deployment_ids).await;
        let mut problems = Vec::new();
        match runtime::remove_preview(&ctx.docker, &ctx.agent_id, &destroy.project_id, &destroy.preview, STOP_GRACE)
            .await
        {
            Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed the preview's containers"),
            Ok(_) => {}
            Err(e) => problems.push(format!("cannot remove its containers: {e}")),
        }
        if !destroy.deployment_ids.is_empty() {
            match runtime::remove_deployment_images(&ctx.docker, &destroy.project_name, &destroy.deployment_ids).await {
                Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed the preview's images"),
                Ok(_) => {}
                Err(e) => problems.push(format!("cannot remove its images: {e}")),
            }
        }
        let project_dir = ctx.storage.join("projects").join(&destroy.project_id);
        let mut dirs = Vec::new();
        for id in &destroy.deployment_ids {
            dirs.push(project_dir.join("deployments").join(id));
            dirs.push(project_dir.join("sources").join(id));
        }
        for dir in &dirs {
            if let Err(e) = remove_dir(dir).await {
                problems.push(format!("cannot remove {}: {e}", dir.display()));
            }
        }
        // The markers go last: until the images are gone, the service's cleanup spares them.
        if problems.is_empty() {
            for id in &destroy.deployment_ids {
                let source = project_dir.join("sources").join(id);
                for extension in [SERVICE_MARKER, PREVIEW_MARKER] {
                    let marker = source.with_extension(extension);
                    if let Err(e) = tokio::fs::remove_file(&marker).await {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            problems.push(format!("cannot remove {}: {e}", marker.display()));
                        }
                    }
                }
            }
        }
        problems
    }

    /// Stops the attempts of `deployments` that run here and forgets them, waiting (a little)
    /// for each to let go, so that nothing of theirs starts after the preview is gone.
    async fn abort_attempts(&self, deployments: &[String]) {
        let mut aborted = Vec::new();
        {
            let mut inner = self.lock();
            inner.tasks.retain(|(id, _), task| {
                let doomed = deployments.contains(id);
                if doomed {
                    aborted.extend(task.abort.take());
                }
                !doomed
            });
            for id in deployments {
                inner.uploads.remove(id);
            }
        }
        for abort in &aborted {
            abort.abort();
        }
        let deadline = tokio::time::Instant::now() + ABORT_WAIT;
        while aborted.iter().any(|a| !a.is_finished()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A source directory's markers.
struct SourceMarker {
    /// The directory's name: the deployment id.
    deployment: String,
    service: String,
    preview: Option<String>,
    modified: Option<std::time::SystemTime>,
}

/// The source directories under `sources` that have a service marker.
async fn source_markers(sources: &Path) -> Vec<SourceMarker> {
    let Ok(mut entries) = tokio::fs::read_dir(sources).await else { return Vec::new() };
    let mut markers = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != SERVICE_MARKER) {
            continue;
        }
        let (Some(deployment), Ok(service)) =
            (path.file_stem().and_then(|s| s.to_str()), tokio::fs::read_to_string(&path).await)
        else {
            continue;
        };
        let preview = tokio::fs::read_to_string(path.with_extension(PREVIEW_MARKER)).await.ok();
        let modified = entry.metadata().await.and_then(|m| m.modified()).ok();
        markers.push(SourceMarker { deployment: deployment.to_owned(), service, preview, modified });
    }
    markers
}

/// Removes a directory and what is in it; one that is not there is fine.
async fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// An id that is safe as one path component: not empty, no separator, not `.` or `..`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::{docker_cli, engine_missing, sleeper, spec, Scratch, HTTPD_DOCKERFILE};
    use std::collections::BTreeSet;

    /// How long a test waits for the agent to get somewhere.
    const PATIENCE: Duration = Duration::from_secs(60);

    fn tasks(docker: &Docker, scratch: &Scratch, storage: &Path) -> Arc<Tasks> {
        Tasks::new(TaskContext {
            docker: docker.clone(),
            agent_id: scratch.agent.clone(),
            storage: storage.to_path_buf(),
            allow_file_git: false,
            ingress: None,
        })
    }

    /// A deployment of `service` (its id and name alike) from the image `image`.
    fn run(project: &str, service: &str, deployment: &str, preview: &str, image: &str) -> RunDeployment {
        RunDeployment {
            deployment_id: deployment.into(),
            attempt: 1,
            project_id: project.into(),
            project_name: project.into(),
            service_id: service.into(),
            service_name: service.into(),
            source: Some(RunSource::Image(image.into())),
            port: 8080,
            health_path: "/".into(),
            health_timeout_s: 20,
            replicas: 1,
            keep: 5,
            preview: preview.into(),
            ..Default::default()
        }
    }

    /// Runs an attempt to its end (retiring what it replaces included) and returns its status.
    async fn run_to_end(tasks: &Arc<Tasks>, run: RunDeployment) -> String {
        let key = (run.deployment_id.clone(), run.attempt);
        tasks.run(run);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(task) = tasks.lock().tasks.get(&key).filter(|t| t.finished) {
                let (report, _) = task.report.as_ref().expect("a finished attempt has a report");
                assert_eq!(report.error, "", "{key:?}");
                return report.status.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "attempt {key:?} did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The deployments this agent has containers of in `project`.
    fn deployments_running(scratch: &Scratch, project: &str) -> BTreeSet<String> {
        docker_cli(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=deployer.agent={}", scratch.agent),
            "--filter",
            &format!("label=deployer.project={project}"),
            "--format",
            "{{.Label \"deployer.deployment\"}}",
        ])
        .lines()
        .map(String::from)
        .collect()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Waits for the `PreviewDestroyed` answer in the outbox.
    async fn preview_destroyed(tasks: &Arc<Tasks>) -> PreviewDestroyed {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            for message in tasks.drain() {
                if let Some(AgentBody::PreviewDestroyed(answer)) = message.body {
                    return answer;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no PreviewDestroyed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn image_exists(docker: &Docker, tag: &str) -> bool {
        docker.api().inspect_image(tag).await.is_ok()
    }

    /// A source directory with its markers, as `fresh_dir` leaves it, modified `age` seconds ago.
    fn source_dir(storage: &Path, project: &str, deployment: &str, service: &str, preview: &str, age: u64) {
        let dir = storage.join("projects").join(project).join("sources").join(deployment);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), "FROM x").unwrap();
        if !preview.is_empty() {
            std::fs::write(dir.with_extension(PREVIEW_MARKER), preview).unwrap();
        }
        let marker = dir.with_extension(SERVICE_MARKER);
        std::fs::write(&marker, service).unwrap();
        let modified = std::time::SystemTime::now() - Duration::from_secs(age);
        std::fs::File::options().write(true).open(&marker).unwrap().set_modified(modified).unwrap();
    }

    fn sources_left(storage: &Path, project: &str) -> BTreeSet<String> {
        let dir = storage.join("projects").join(project).join("sources");
        std::fs::read_dir(dir)
            .map(|entries| entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_previews_release_replaces_only_the_previews_previous_one() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("task-preview").await;
        let storage = tempfile::tempdir().unwrap();
        let tasks = tasks(&docker, &scratch, storage.path());
        let project = scratch.project("p");
        let image = format!("{}:base", scratch.repository(&project, "web"));
        scratch.build(&docker, HTTPD_DOCKERFILE, &[("index.html", "hello")], &image).await.0.unwrap();

        assert_eq!(run_to_end(&tasks, run(&project, "web", "d1", "", &image)).await, "running");
        assert_eq!(run_to_end(&tasks, run(&project, "web", "p1", "pr-7", &image)).await, "running");
        assert_eq!(deployments_running(&scratch, &project), set(&["d1", "p1"]), "side by side");
        assert_eq!(run_to_end(&tasks, run(&project, "web", "p2", "pr-7", &image)).await, "running");
        assert_eq!(deployments_running(&scratch, &project), set(&["d1", "p2"]), "the preview's p1 retired");
        assert_eq!(run_to_end(&tasks, run(&project, "web", "d2", "", &image)).await, "running");
        assert_eq!(deployments_running(&scratch, &project), set(&["d2", "p2"]), "the service's d1 retired");

        // The controller stops the service's old release, then the preview's: each its own.
        let stop = |preview: &str, keep: &str| StopService {
            service_id: "web".into(),
            keep_deployment: keep.into(),
            project_id: project.clone(),
            preview: preview.into(),
        };
        tasks.stop_service(stop("", ""));
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while deployments_running(&scratch, &project) != set(&["p2"]) {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", deployments_running(&scratch, &project));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks.stop_service(stop("pr-7", ""));
        while !deployments_running(&scratch, &project).is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", deployments_running(&scratch, &project));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn destroying_a_preview_removes_its_containers_images_and_sources_only() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("task-destroy").await;
        let storage = tempfile::tempdir().unwrap();
        let tasks = tasks(&docker, &scratch, storage.path());
        let project = scratch.project("p");
        let tag = |service: &str, deployment: &str| format!("{}:{deployment}", scratch.repository(&project, service));
        // The service's own release d1 of web, and preview pr-7's p1 (web) and p2 (api).
        for (service, deployment, preview) in
            [("web", "d1", ""), ("web", "p1", "pr-7"), ("api", "p2", "pr-7"), ("api", "q1", "pr-8")]
        {
            let image = tag(service, deployment);
            scratch.build(&docker, &sleeper(deployment), &[], &image).await.0.unwrap();
            let labels = scratch.preview_labels(&project, service, deployment, preview);
            let network = runtime::ensure_network(&docker, &project, &labels).await.unwrap();
            let name = format!("{}-{deployment}", scratch.id);
            runtime::start_instance(&docker, &spec(&name, &image, &labels, &network, &Hardening::default()))
                .await
                .unwrap();
            source_dir(storage.path(), &project, deployment, service, preview, 0);
            let results = storage.path().join("projects").join(&project).join("deployments").join(deployment);
            std::fs::create_dir_all(&results).unwrap();
            std::fs::write(results.join("attempt-1.json"), "{}").unwrap();
        }
        // An attempt of p1 still in progress here.
        let pending = tokio::spawn(std::future::pending::<()>());
        tasks.lock().tasks.insert(
            ("p1".into(), 2),
            Task {
                lines: VecDeque::new(),
                next_seq: 0,
                sent_upto: 0,
                report: None,
                report_sent: false,
                finished: false,
                abort: Some(pending.abort_handle()),
            },
        );

        let destroy = DestroyPreview {
            project_id: project.clone(),
            preview: "pr-7".into(),
            deployment_ids: vec!["p1".into(), "p2".into()],
            project_name: project.clone(),
        };
        tasks.destroy_preview(destroy.clone());
        let answer = preview_destroyed(&tasks).await;
        assert_eq!(
            answer,
            PreviewDestroyed { project_id: project.clone(), preview: "pr-7".into(), error: String::new() }
        );
        assert!(pending.await.unwrap_err().is_cancelled(), "the attempt in progress was aborted");
        assert!(tasks.lock().tasks.is_empty());
        assert_eq!(deployments_running(&scratch, &project), set(&["d1", "q1"]));
        assert!(!image_exists(&docker, &tag("web", "p1")).await);
        assert!(!image_exists(&docker, &tag("api", "p2")).await);
        assert!(image_exists(&docker, &tag("web", "d1")).await, "the service's own");
        assert!(image_exists(&docker, &tag("api", "q1")).await, "another preview's");
        assert_eq!(
            sources_left(storage.path(), &project),
            set(&["d1", "d1.service", "q1", "q1.preview", "q1.service"])
        );
        let results = storage.path().join("projects").join(&project).join("deployments");
        assert_eq!(
            std::fs::read_dir(results)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect::<BTreeSet<_>>(),
            set(&["d1", "q1"])
        );

        // Again (the answer was lost, say): nothing left to remove, and that is a success.
        tasks.destroy_preview(destroy.clone());
        assert_eq!(preview_destroyed(&tasks).await.error, "");
        assert_eq!(deployments_running(&scratch, &project), set(&["d1", "q1"]));

        // A request that would reach outside the preview is refused, and says why.
        let escape = DestroyPreview { deployment_ids: vec!["..".into()], ..destroy.clone() };
        tasks.destroy_preview(escape);
        let answer = preview_destroyed(&tasks).await;
        assert!(answer.error.contains("\"..\" is not a valid"), "{answer:?}");
        let everything = DestroyPreview { preview: String::new(), ..destroy };
        tasks.destroy_preview(everything);
        assert!(!preview_destroyed(&tasks).await.error.is_empty());
        assert_eq!(deployments_running(&scratch, &project), set(&["d1", "q1"]));
        assert_eq!(sources_left(storage.path(), &project).len(), 5);
    }

    #[tokio::test]
    async fn the_services_cleanup_leaves_its_previews_images_and_sources() {
        if engine_missing() {
            return;
        }
        let (docker, scratch) = Scratch::new("task-cleanup").await;
        let storage = tempfile::tempdir().unwrap();
        let tasks = tasks(&docker, &scratch, storage.path());
        let project = scratch.project("p");
        let tag = |deployment: &str| format!("{}:{deployment}", scratch.repository(&project, "web"));
        // Oldest first: d1 and d2 are the service's own, p1 a preview's, newer than both; p0 an
        // older preview's that shares its image with d1 (the same build).
        for (deployment, preview, age) in [("d1", "", 40), ("p0", "pr-6", 35), ("d2", "", 30), ("p1", "pr-7", 20)] {
            if deployment == "p0" {
                docker_cli(&["tag", &tag("d1"), &tag("p0")]);
            } else {
                scratch.build(&docker, &sleeper(deployment), &[], &tag(deployment)).await.0.unwrap();
            }
            source_dir(storage.path(), &project, deployment, "web", preview, age);
        }
        let service = RunDeployment { keep: 1, ..run(&project, "web", "d2", "", &tag("d2")) };
        tasks.cleanup(&service).await;
        assert!(image_exists(&docker, &tag("d2")).await, "the newest of the service's own");
        assert!(!image_exists(&docker, &tag("d1")).await, "beyond keep");
        assert!(image_exists(&docker, &tag("p0")).await, "a preview's, sharing the image");
        assert!(image_exists(&docker, &tag("p1")).await, "a preview's");
        assert_eq!(
            sources_left(storage.path(), &project),
            set(&["d2", "d2.service", "p0", "p0.preview", "p0.service", "p1", "p1.preview", "p1.service"])
        );

        // A preview's release cleans nothing up: its preview goes all at once.
        let preview = RunDeployment { keep: 1, ..run(&project, "web", "p1", "pr-7", &tag("p1")) };
        tasks.cleanup(&preview).await;
        assert!(image_exists(&docker, &tag("p0")).await && image_exists(&docker, &tag("d2")).await);
        assert_eq!(sources_left(storage.path(), &project).len(), 8);
    }
}

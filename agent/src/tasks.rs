//! Deployments on the agent: each attempt the leader sends runs here, off the session, and its
//! progress (log lines and status) waits in an outbox until the controller acknowledges it.
//!
//! The session only carries messages: when it drops, attempts go on, and the next session sends
//! again whatever was not acknowledged (the controller keeps a line once, by its number). An
//! attempt is run at most once: a repeat of one in progress is ignored, and a repeat of one
//! that ended (even before a restart of the agent) is answered from its result file.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployer_proto::agent::agent_message::Body as AgentBody;
use deployer_proto::agent::run_deployment::Source as RunSource;
use deployer_proto::agent::{
    AgentMessage, DeploymentUpdate, FetchUpload, InstanceEvent, LogLine, RunDeployment, StopService, UpdateAck,
    UploadChunk,
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
                ingress.release(&stop.service_id, keep).await;
            }
            match runtime::stop_service_instances(
                &ctx.docker,
                &ctx.agent_id,
                &stop.project_id,
                &stop.service_id,
                keep,
                STOP_GRACE,
            )
            .await
            {
                Ok(stopped) if !stopped.is_empty() => {
                    tracing::info!(service = %stop.service_id, ?stopped, "stopped replaced instances")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(service = %stop.service_id, error = %e, "cannot stop replaced instances"),
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
                self.fresh_dir(&source_dir, &run.service_id).await?;
                let fetched = self.clone_git(key, g, &source_dir).await?;
                report.commit = fetched.commit.clone();
                self.log(key, "info", "source", format!("commit {} {}", short(&fetched.commit), fetched.summary));
                self.build(key, &source_dir, &g.dockerfile, &tag).await?
            }
            Some(RunSource::Upload(u)) => {
                self.fresh_dir(&source_dir, &run.service_id).await?;
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
        let short_id: String = run.deployment_id.chars().filter(|c| c.is_ascii_alphanumeric()).take(8).collect();
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

    /// An empty directory for the deployment's source, recorded as the service's.
    async fn fresh_dir(&self, dir: &Path, service_id: &str) -> Result<(), Failure> {
        if tokio::fs::metadata(dir).await.is_ok() {
            tokio::fs::remove_dir_all(dir).await.map_err(|e| io_failure("cannot clear the source directory", e))?;
        }
        tokio::fs::create_dir_all(dir).await.map_err(|e| io_failure("cannot create the source directory", e))?;
        let marker = dir.with_extension("service");
        tokio::fs::write(&marker, service_id).await.map_err(|e| io_failure("cannot write the source directory", e))?;
        Ok(())
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

    /// Stops this agent's instances of the service other than the deployment's.
    async fn retire_previous(&self, run: &RunDeployment) {
        let ctx = &self.ctx;
        let keep = Some(run.deployment_id.as_str());
        // Zero downtime: the old instances serve until the routes point at the new ones and
        // what they are answering is done.
        if let Some(ingress) = &ctx.ingress {
            ingress.release(&run.service_id, keep).await;
        }
        let stopped = runtime::stop_service_instances(
            &ctx.docker,
            &ctx.agent_id,
            &run.project_id,
            &run.service_id,
            keep,
            STOP_GRACE,
        )
        .await;
        match stopped {
            Ok(stopped) if !stopped.is_empty() => tracing::info!(?stopped, "stopped the previous instances"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot stop the previous instances"),
        }
    }

    /// Keeps the newest `keep` sources and images of the service; never touches anything that
    /// is not ours.
    async fn cleanup(&self, run: &RunDeployment) {
        let keep = run.keep.max(1) as usize;
        let repository = format!("deployer/{}/{}", run.project_name, run.service_name);
        match runtime::prune_images(&self.ctx.docker, &repository, keep).await {
            Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed old images"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove old images"),
        }
        let sources = self.ctx.storage.join("projects").join(&run.project_id).join("sources");
        let Ok(mut entries) = tokio::fs::read_dir(&sources).await else { return };
        let mut mine = Vec::new();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "service")
                && tokio::fs::read_to_string(&path).await.is_ok_and(|s| s == run.service_id)
            {
                let modified = entry.metadata().await.and_then(|m| m.modified()).ok();
                mine.push((modified, path));
            }
        }
        mine.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        for (_, marker) in mine.into_iter().skip(keep) {
            let dir = marker.with_extension("");
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let _ = tokio::fs::remove_file(&marker).await;
        }
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

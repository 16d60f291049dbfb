//! The leader's dispatcher loop and its handling of agent reports.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use deployer_proto::agent::controller_message::Body as ControllerBody;
use deployer_proto::agent::run_deployment::Source as RunSource;
use deployer_proto::agent::{
    ControllerMessage, DeploymentUpdate, EnvVar, FetchUpload, GitSource, InstanceEvent, RunDeployment, Security,
    StopService, UpdateAck, UploadChunk, UploadSource,
};
use tokio::sync::{broadcast, mpsc};

use super::DeploySource;
use crate::api::services::ServiceSpec;
use crate::command::{Command, CommandResponse, DeploymentStatus, LogLine};
use crate::controller::SharedController;
use crate::scheduler::{self, AgentSnapshot, Resources};
use crate::store::queries::{AgentRow, DeploymentRow};
use crate::store::state_machine::StateEvent;
use crate::util::now_ms;

/// How often the dispatcher looks at the queue when nothing wakes it.
const TICK: Duration = Duration::from_millis(500);
/// How often the leader drops the uploads of old deployments.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// How long a webhook delivery's id is remembered (a redelivery within this deploys nothing).
const WEBHOOK_DELIVERIES_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Chunks of an upload sent per request of the agent.
const UPLOAD_WINDOW: u32 = 8;
/// How long a release that turned healthy waits for every agent to route to it before it is
/// declared running anyway.
const ROUTES_SYNC: Duration = Duration::from_secs(2);

/// Runs on every controller; acts only while this node leads and tracks agent sessions.
pub async fn run(c: SharedController, mut events: broadcast::Receiver<StateEvent>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_since: Option<tokio::time::Instant> = None;
    let mut last_cleanup = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = c.deploys.wake.notified() => {}
            event = events.recv() => match event {
                Ok(StateEvent::DeploymentChanged { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
        if !c.agents.is_active() {
            leading_since = None;
            c.deploys.forget(|_| false);
            continue;
        }
        let since = *leading_since.get_or_insert_with(tokio::time::Instant::now);
        if let Err(e) = dispatch_once(&c, since).await {
            tracing::warn!(error = %e, "deployment dispatcher: will retry");
        }
        if last_cleanup.elapsed() >= CLEANUP_EVERY {
            last_cleanup = tokio::time::Instant::now();
            drop_stale_uploads(&c).await;
            // A git host redelivers within hours; a week of delivery ids is plenty.
            let before = now_ms() - WEBHOOK_DELIVERIES_KEPT.as_millis() as i64;
            if c.state.webhook_deliveries_before(before).await.unwrap_or(false) {
                if let Err(e) = c.propose(Command::PruneWebhookDeliveries { before }).await {
                    tracing::debug!(error = %e, "cannot prune old webhook deliveries");
                }
            }
        }
    }
}

/// Uploaded tarballs of deployments older than the newest `keep` of their service are dropped
/// from the state (the agents keep their own copies of the newest sources).
async fn drop_stale_uploads(c: &SharedController) {
    match c.state.stale_uploads(c.deploys.settings.keep).await {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(uploads = ids.len(), "dropping the uploads of old deployments");
            if let Err(e) = c.propose(Command::DropUploads { ids }).await {
                tracing::warn!(error = %e, "cannot drop old uploads yet");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot look for old uploads"),
    }
}

/// One pass over the queue: look after attempts in progress, then start queued ones.
async fn dispatch_once(c: &SharedController, leading_since: tokio::time::Instant) -> anyhow::Result<()> {
    let active = c.state.active_deployments().await?;
    let agents: HashMap<String, AgentRow> = c.state.agents().await?.into_iter().map(|a| (a.id.clone(), a)).collect();
    c.deploys.forget(|(id, attempt)| active.iter().any(|d| &d.id == id && d.attempt == i64::from(*attempt)));
    let mut in_progress = 0usize;
    // One release of a service at a time: a newer one waits for the one in progress, so an
    // older build can never finish last and replace it.
    let mut busy_services: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
    for d in active.iter().filter(|d| d.status().in_progress()) {
        in_progress += 1;
        busy_services.insert((&d.service_id, &d.preview));
        let agent_id = d.agent_id.clone().unwrap_or_default();
        let ready = agents.get(&agent_id).is_some_and(|a| a.status == "ready");
        if !ready {
            agent_lost(c, d, &agent_id).await?;
            continue;
        }
        if let Some((serial, _)) = c.agents.session_of(&agent_id) {
            if !c.deploys.was_sent(&d.id, d.attempt as u32, serial) {
                send_run(c, d, &agent_id, serial).await;
            }
        }
    }
    let now = now_ms();
    let mut reserved = None;
    for d in active.iter().filter(|d| d.status() == DeploymentStatus::Queued) {
        if in_progress >= c.deploys.settings.max_concurrent {
            break;
        }
        if d.not_before > now || busy_services.contains(&(d.service_id.as_str(), d.preview.as_str())) {
            continue;
        }
        let reserved = match &mut reserved {
            Some(r) => r,
            None => reserved.insert(reservations(c).await?),
        };
        match place(c, d, &agents, reserved, leading_since).await? {
            Placed::On(agent_id, resources) => {
                let attempt = d.attempt as u32 + 1;
                let assign =
                    Command::AssignDeployment { id: d.id.clone(), attempt, agent_id: agent_id.clone(), at: now_ms() };
                let line =
                    controller_line("info", "schedule", format!("attempt {attempt}: scheduled on agent {agent_id}"));
                let batch = Command::Batch {
                    commands: vec![
                        assign,
                        Command::AppendDeploymentLogs { id: d.id.clone(), attempt, lines: vec![line] },
                    ],
                };
                if first_applied(c.propose(batch).await?) {
                    in_progress += 1;
                    busy_services.insert((&d.service_id, &d.preview));
                    let entry = reserved.entry(agent_id.clone()).or_default();
                    entry.0.cpu_millis += resources.cpu_millis;
                    entry.0.memory_bytes += resources.memory_bytes;
                    *entry.1.entry(d.service_id.clone()).or_default() += 1;
                    if let Some((serial, _)) = c.agents.session_of(&agent_id) {
                        let mut assigned = d.clone();
                        assigned.attempt = i64::from(attempt);
                        send_run(c, &assigned, &agent_id, serial).await;
                    }
                }
            }
            Placed::Wait => {}
            Placed::Nowhere(reason) => {
                let error = format!("cannot schedule the deployment: {reason}");
                fail(c, d, d.attempt as u32, error).await?;
            }
        }
    }
    Ok(())
}

/// Whether the first response of a batch (or a single response) is `Applied`.
fn first_applied(response: CommandResponse) -> bool {
    match response {
        CommandResponse::Applied => true,
        CommandResponse::Batch { responses } => matches!(responses.first(), Some(CommandResponse::Applied)),
        CommandResponse::Rejected { .. } => false,
    }
}

pub(crate) fn controller_line(level: &str, phase: &str, message: String) -> LogLine {
    LogLine { agent_seq: None, level: level.into(), message, at: now_ms(), phase: phase.into(), step: None }
}

/// The agent of an attempt in progress went down: move the deployment to another agent, once.
async fn agent_lost(c: &SharedController, d: &DeploymentRow, agent_id: &str) -> anyhow::Result<()> {
    let attempt = d.attempt as u32;
    if d.requeues >= 1 {
        let error = format!("agent {agent_id} went down during the deployment, after it had already been moved once");
        return fail(c, d, attempt, error).await;
    }
    let message =
        format!("agent {agent_id} went down during attempt {attempt}: moving the deployment to another agent");
    tracing::warn!(deployment = %d.id, agent = %agent_id, "agent lost mid-deployment: requeued");
    let requeue =
        Outcome { status: DeploymentStatus::Queued, level: "warn", exclude_agent: Some(agent_id.to_string()) };
    c.propose(requeue.commands(d, attempt, message)).await?;
    Ok(())
}

async fn fail(c: &SharedController, d: &DeploymentRow, attempt: u32, error: String) -> anyhow::Result<()> {
    tracing::info!(deployment = %d.id, error = %error, "deployment failed");
    let failed = Outcome { status: DeploymentStatus::Failed, level: "error", exclude_agent: None };
    c.propose(failed.commands(d, attempt, error)).await?;
    Ok(())
}

/// How the controller ends an attempt on its own: the reason in the log, then the status.
struct Outcome {
    status: DeploymentStatus,
    level: &'static str,
    exclude_agent: Option<String>,
}

impl Outcome {
    fn commands(self, d: &DeploymentRow, attempt: u32, reason: String) -> Command {
        let line = controller_line(self.level, "schedule", reason.clone());
        Command::Batch {
            commands: vec![
                Command::AppendDeploymentLogs { id: d.id.clone(), attempt, lines: vec![line] },
                Command::UpdateDeployment {
                    id: d.id.clone(),
                    attempt,
                    status: self.status,
                    image: None,
                    commit: None,
                    url: None,
                    error: Some(reason),
                    not_before: None,
                    exclude_agent: self.exclude_agent,
                    at: now_ms(),
                },
            ],
        }
    }
}

type Reserved = HashMap<String, (Resources, HashMap<String, u32>)>;

/// What each agent's running and in-progress deployments hold.
async fn reservations(c: &SharedController) -> anyhow::Result<Reserved> {
    let mut out: Reserved = HashMap::new();
    for (agent, service, spec) in c.state.running_on_agents().await? {
        let Ok(spec) = serde_json::from_str::<ServiceSpec>(&spec) else { continue };
        let replicas = u64::from(spec.replicas.max(1));
        let entry = out.entry(agent).or_default();
        entry.0.cpu_millis += spec.resources.cpu_millis * replicas;
        entry.0.memory_bytes += spec.resources.memory_bytes * replicas;
        *entry.1.entry(service).or_default() += spec.replicas.max(1);
    }
    Ok(out)
}

enum Placed {
    On(String, Resources),
    /// The best agent is between sessions (a leader change): try again shortly.
    Wait,
    Nowhere(String),
}

async fn place(
    c: &SharedController,
    d: &DeploymentRow,
    agents: &HashMap<String, AgentRow>,
    reserved: &Reserved,
    leading_since: tokio::time::Instant,
) -> anyhow::Result<Placed> {
    let Some(service) = c.state.service(&d.project_id, &d.service_id).await? else {
        return Ok(Placed::Nowhere("the service was deleted".into()));
    };
    let spec: ServiceSpec = serde_json::from_value(service.spec)?;
    let replicas = spec.replicas.max(1);
    // A rollback runs where its image is.
    let pinned = match serde_json::from_str::<DeploySource>(&d.source) {
        Ok(DeploySource::Rollback { agent, .. }) => Some(agent),
        _ => None,
    };
    let snapshots: Vec<AgentSnapshot> = agents
        .values()
        .filter(|a| pinned.as_ref().is_none_or(|p| *p == a.id))
        .map(|a| {
            let (res, instances) = reserved.get(&a.id).cloned().unwrap_or_default();
            AgentSnapshot {
                id: a.id.clone(),
                ready: a.status == "ready",
                labels: a.labels.clone(),
                capacity: Resources {
                    cpu_millis: a.cpu_millis.max(0) as u64,
                    memory_bytes: a.memory_bytes.max(0) as u64,
                },
                reserved: res,
                instances,
            }
        })
        .collect();
    // The replicas of one deployment run on the agent that built its image (images move
    // between agents with the image distribution of a later release): one placement for all.
    let resources = Resources {
        cpu_millis: spec.resources.cpu_millis * u64::from(replicas),
        memory_bytes: spec.resources.memory_bytes * u64::from(replicas),
    };
    let request = scheduler::Request {
        service_id: d.service_id.clone(),
        resources,
        constraints: BTreeMap::new(),
        replicas: 1,
        exclude: d.excluded(),
        seed: d.seq as u64,
    };
    match scheduler::place(&snapshots, &request) {
        Ok(placement) => {
            let Some(agent) = placement.agents.into_iter().next() else { return Ok(Placed::Wait) };
            if c.agents.session_of(&agent).is_none() {
                return Ok(Placed::Wait);
            }
            Ok(Placed::On(agent, resources))
        }
        Err(none) => {
            let ttl = c.agents.settings.ttl;
            // Right after a leader change, agents are still redialing; an agent that is not
            // ready may be joining or coming back. Wait for them (an agent TTL) before failing:
            // only a cluster whose agents are all there and none fits fails at once.
            let agents_may_come = agents.is_empty() || agents.values().any(|a| a.status != "ready");
            let queued_for = Duration::from_millis(now_ms().saturating_sub(d.updated_at).max(0) as u64);
            if (leading_since.elapsed() < ttl && c.agents.sessions() == 0) || (agents_may_come && queued_for < ttl) {
                return Ok(Placed::Wait);
            }
            Ok(Placed::Nowhere(none.to_string()))
        }
    }
}

/// Sends the attempt to its agent's current session.
async fn send_run(c: &SharedController, d: &DeploymentRow, agent_id: &str, serial: u64) {
    let run = match run_message(c, d).await {
        Ok(run) => run,
        Err(e) => {
            tracing::warn!(deployment = %d.id, error = %e, "cannot prepare the deployment for its agent");
            return;
        }
    };
    let message = ControllerMessage { body: Some(ControllerBody::RunDeployment(run)) };
    if c.agents.send(agent_id, serial, message) {
        c.deploys.mark_sent(&d.id, d.attempt as u32, serial);
        tracing::info!(deployment = %d.id, attempt = d.attempt, agent = %agent_id, "sent the deployment to its agent");
    }
}

async fn run_message(c: &SharedController, d: &DeploymentRow) -> anyhow::Result<RunDeployment> {
    let service = c
        .state
        .service(&d.project_id, &d.service_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("service {} is gone", d.service_id))?;
    let project = c.state.project(&d.project_id).await?.ok_or_else(|| anyhow::anyhow!("project is gone"))?;
    let spec: ServiceSpec = serde_json::from_value(service.spec)?;
    let mut env: Vec<EnvVar> = spec.env.iter().map(|(k, v)| EnvVar { name: k.clone(), value: v.clone() }).collect();
    let mut git_user = String::new();
    let mut git_password = String::new();
    for (name, sealed) in c.state.sealed_secrets(&d.service_id).await? {
        let aad = format!("secret:{}:{name}", d.service_id);
        let value = c.key.open(&sealed, aad.as_bytes()).map_err(|e| anyhow::anyhow!("secret {name}: {e}"))?;
        let value = String::from_utf8(value).map_err(|_| anyhow::anyhow!("secret {name} is not UTF-8"))?;
        match name.as_str() {
            "GIT_USERNAME" => git_user = value,
            "GIT_PASSWORD" => git_password = value,
            _ => env.push(EnvVar { name, value }),
        }
    }
    let source: DeploySource = serde_json::from_str(&d.source)?;
    let source = match source {
        DeploySource::Git { url, branch, commit, dockerfile } => RunSource::Git(GitSource {
            url,
            branch,
            commit: commit.unwrap_or_default(),
            dockerfile,
            username: git_user,
            password: git_password,
        }),
        DeploySource::Image(reference) | DeploySource::Rollback { image: reference, .. } => RunSource::Image(reference),
        DeploySource::Upload { size, sha256, chunks, dockerfile } => {
            RunSource::Upload(UploadSource { size, sha256, dockerfile, chunks })
        }
    };
    Ok(RunDeployment {
        deployment_id: d.id.clone(),
        attempt: d.attempt as u32,
        project_id: d.project_id.clone(),
        project_name: project.name,
        service_id: d.service_id.clone(),
        service_name: service.name,
        source: Some(source),
        port: u32::from(spec.port),
        env,
        cpu_millis: spec.resources.cpu_millis,
        memory_bytes: spec.resources.memory_bytes,
        health_path: spec.health_check.path.clone(),
        health_timeout_s: spec.health_check.timeout_s.unwrap_or(c.deploys.settings.health_timeout.as_secs() as u32),
        replicas: spec.replicas.max(1),
        security: Some(Security {
            writable_root: spec.security.writable_root,
            run_as_root: spec.security.run_as_root,
            capabilities: spec.security.capabilities.clone(),
            pids_limit: spec.security.pids_limit.unwrap_or(0),
        }),
        keep: c.deploys.settings.keep,
        preview: d.preview.clone(),
    })
}

/// What an agent session hands to [`session_worker`].
pub enum SessionReport {
    Update(DeploymentUpdate),
    Instance(InstanceEvent),
    FetchUpload(FetchUpload),
}

/// Handles one agent session's deployment reports in order, off the session's own loop (so
/// heartbeats are never stuck behind a commit).
pub async fn session_worker(
    c: SharedController,
    agent_id: String,
    serial: u64,
    mut reports: mpsc::Receiver<SessionReport>,
) {
    while let Some(report) = reports.recv().await {
        match report {
            SessionReport::Update(update) => {
                if let Err(e) = on_update(&c, &agent_id, serial, update).await {
                    tracing::warn!(agent = %agent_id, error = %e, "cannot record a deployment report; the agent will send it again");
                }
            }
            SessionReport::Instance(event) => {
                if let Err(e) = on_instance_event(&c, &agent_id, event).await {
                    tracing::warn!(agent = %agent_id, error = %e, "cannot record an instance event");
                }
            }
            SessionReport::FetchUpload(fetch) => {
                let c = c.clone();
                let agent_id = agent_id.clone();
                tokio::spawn(async move { send_upload(c, agent_id, serial, fetch).await });
            }
        }
    }
}

async fn on_update(c: &SharedController, agent_id: &str, serial: u64, u: DeploymentUpdate) -> anyhow::Result<()> {
    let Some(d) = c.state.deployment(&u.deployment_id).await? else {
        ack(c, agent_id, serial, &u, u64::MAX, true);
        return Ok(());
    };
    // An agent reports only on what it was given; anything else is dropped (and acknowledged,
    // so it stops sending it).
    let assigned = d.agent_id.as_deref() == Some(agent_id) && i64::from(u.attempt) == d.attempt;
    // An agent the deployment was moved off may still send what its attempt did.
    let moved_off = i64::from(u.attempt) < d.attempt && d.excluded().iter().any(|a| a == agent_id);
    if !assigned && !moved_off {
        tracing::warn!(agent = %agent_id, deployment = %d.id, "a report about another agent's deployment was ignored");
        ack(c, agent_id, serial, &u, u64::MAX, true);
        return Ok(());
    }
    let mut commands = Vec::new();
    let last_seq = u.logs.iter().map(|l| l.seq).max();
    if !u.logs.is_empty() {
        let lines = u
            .logs
            .iter()
            .map(|l| LogLine {
                agent_seq: Some(l.seq),
                level: l.level.clone(),
                message: l.message.clone(),
                at: l.at_ms,
                phase: l.phase.clone(),
                step: Some(l.step.clone()).filter(|s| !s.is_empty()),
            })
            .collect();
        commands.push(Command::AppendDeploymentLogs { id: d.id.clone(), attempt: u.attempt, lines });
    }
    let mut status_command = None;
    let mut running = false;
    let mut routed = None;
    if let Some(status) = DeploymentStatus::parse(&u.status) {
        let (status, not_before, error) = match status {
            DeploymentStatus::Failed if u.retryable && u.attempt <= c.deploys.settings.retries => {
                let wait = c.deploys.settings.retry_base * (1u32 << (u.attempt.saturating_sub(1)).min(10));
                let message = format!("attempt {} failed: {}; retrying in {} s", u.attempt, u.error, wait.as_secs());
                commands.push(Command::AppendDeploymentLogs {
                    id: d.id.clone(),
                    attempt: u.attempt,
                    lines: vec![controller_line("warn", "schedule", message)],
                });
                (DeploymentStatus::Queued, Some(now_ms() + wait.as_millis() as i64), Some(u.error.clone()))
            }
            other => (other, None, Some(u.error.clone()).filter(|e| !e.is_empty())),
        };
        running = status == DeploymentStatus::Running;
        // It answers at its service's host name, through the ingress.
        if running {
            routed = crate::ingress::routed_row(c, &d, agent_id).await;
        }
        let url = routed.as_ref().and_then(|r| {
            crate::ingress::url_for(&c.ingress, &r.service_name, &r.project_name, &r.preview, &r.ingress)
        });
        status_command = Some(commands.len());
        commands.push(Command::UpdateDeployment {
            id: d.id.clone(),
            attempt: u.attempt,
            status,
            image: Some(u.image.clone()).filter(|s| !s.is_empty()),
            commit: Some(u.commit.clone()).filter(|s| !s.is_empty()),
            url: url.or_else(|| Some(u.url.clone()).filter(|s| !s.is_empty())),
            error,
            not_before,
            exclude_agent: None,
            at: now_ms(),
        });
    }
    if commands.is_empty() {
        return Ok(());
    }
    // Traffic goes to the new release before it is declared running (not for an attempt that
    // moved elsewhere meanwhile).
    let pinned = match routed.filter(|_| !moved_off) {
        Some(row) => {
            crate::ingress::pin_running(c, row, ROUTES_SYNC).await;
            true
        }
        None => false,
    };
    let response = c.propose(Command::Batch { commands }).await;
    if pinned {
        c.ingress.unpin(&d.service_id, &d.preview);
    }
    let response = response?;
    let final_status = matches!(u.status.as_str(), "running" | "failed");
    // A status the state refused (a late report of an attempt that was moved elsewhere) is
    // final for the agent too: it stops sending it.
    let status_applied = match (&response, status_command) {
        (CommandResponse::Batch { responses }, Some(i)) => matches!(responses.get(i), Some(CommandResponse::Applied)),
        _ => true,
    };
    if moved_off {
        // It went on while the deployment moved elsewhere: whatever it started must go.
        tracing::warn!(agent = %agent_id, deployment = %d.id, attempt = u.attempt, "abandoning an attempt moved off this agent");
        abandon(c, agent_id, serial, &u, last_seq.unwrap_or(0));
        return Ok(());
    }
    ack(c, agent_id, serial, &u, last_seq.unwrap_or(0), final_status || !status_applied);
    if running && status_applied {
        stop_elsewhere(c, agent_id, &d.project_id, &d.service_id, &d.preview, &d.id);
    }
    if status_command.is_some() {
        c.deploys.wake();
    }
    Ok(())
}

/// A running instance crashed (and Docker restarted it): a line in its deployment's log.
async fn on_instance_event(c: &SharedController, agent_id: &str, event: InstanceEvent) -> anyhow::Result<()> {
    let Some(d) = c.state.deployment(&event.deployment_id).await? else { return Ok(()) };
    if d.agent_id.as_deref() != Some(agent_id) {
        return Ok(());
    }
    let level =
        if matches!(event.level.as_str(), "debug" | "info" | "warn" | "error") { event.level } else { "warn".into() };
    let line = LogLine {
        agent_seq: None,
        level,
        message: event.message.chars().take(4096).collect(),
        at: event.at_ms,
        phase: "run".into(),
        step: None,
    };
    c.propose(Command::AppendDeploymentLogs { id: d.id, attempt: d.attempt as u32, lines: vec![line] }).await?;
    Ok(())
}

fn ack(c: &SharedController, agent_id: &str, serial: u64, u: &DeploymentUpdate, seq: u64, final_: bool) {
    let ack =
        UpdateAck { deployment_id: u.deployment_id.clone(), attempt: u.attempt, seq, r#final: final_, abandon: false };
    c.agents.send(agent_id, serial, ControllerMessage { body: Some(ControllerBody::UpdateAck(ack)) });
}

fn abandon(c: &SharedController, agent_id: &str, serial: u64, u: &DeploymentUpdate, seq: u64) {
    let ack =
        UpdateAck { deployment_id: u.deployment_id.clone(), attempt: u.attempt, seq, r#final: true, abandon: true };
    c.agents.send(agent_id, serial, ControllerMessage { body: Some(ControllerBody::UpdateAck(ack)) });
}

/// A new release of the service runs: its older instances on other agents stop.
fn stop_elsewhere(c: &SharedController, agent_id: &str, project_id: &str, service_id: &str, preview: &str, keep: &str) {
    for (other, serial) in c.agents.all_sessions() {
        if other == agent_id {
            continue;
        }
        let stop = StopService {
            service_id: service_id.to_string(),
            keep_deployment: keep.to_string(),
            project_id: project_id.to_string(),
            preview: preview.to_string(),
        };
        c.agents.send(&other, serial, ControllerMessage { body: Some(ControllerBody::StopService(stop)) });
    }
}

/// Sends a window of an uploaded tarball's chunks to the agent that asked.
async fn send_upload(c: SharedController, agent_id: String, serial: u64, fetch: FetchUpload) {
    let Some((_, tx)) = c.agents.session_of(&agent_id).filter(|(s, _)| *s == serial) else { return };
    // Only the agent the deployment is assigned to may read its upload.
    match c.state.deployment(&fetch.deployment_id).await {
        Ok(Some(d)) if d.agent_id.as_deref() == Some(agent_id.as_str()) => {}
        Ok(_) => {
            tracing::warn!(agent = %agent_id, deployment = %fetch.deployment_id, "refused an upload to an agent it is not for");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a deployment");
            return;
        }
    }
    let chunks = match c.state.upload_chunks(&fetch.deployment_id, fetch.chunk, UPLOAD_WINDOW).await {
        Ok(chunks) if !chunks.is_empty() => chunks,
        Ok(_) => {
            let error = UploadChunk {
                deployment_id: fetch.deployment_id.clone(),
                chunk: fetch.chunk,
                data: Vec::new(),
                error: format!("upload {} has no chunk {}", fetch.deployment_id, fetch.chunk),
            };
            let _ = tx.send(Ok(ControllerMessage { body: Some(ControllerBody::UploadChunk(error)) })).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read an upload");
            return;
        }
    };
    for (chunk, data) in chunks {
        let message =
            UploadChunk { deployment_id: fetch.deployment_id.clone(), chunk: chunk as u32, data, error: String::new() };
        if tx.send(Ok(ControllerMessage { body: Some(ControllerBody::UploadChunk(message)) })).await.is_err() {
            return;
        }
    }
}

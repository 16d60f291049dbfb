//! Commands of the replicated state machine.
//!
//! A command is deterministic: the proposer makes every id, timestamp, secret hash and sealed
//! value, so each node applying it writes exactly the same rows.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type UnixMillis = i64;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// First command of a cluster: its CA, with the private key sealed by the cluster key.
    InitCluster {
        ca_cert_pem: String,
        ca_key_sealed_hex: String,
        at: UnixMillis,
    },
    CreateJoinToken {
        id: String,
        kind: JoinTokenKind,
        secret_hash: String,
        created_at: UnixMillis,
        expires_at: UnixMillis,
    },
    RevokeJoinToken {
        id: String,
        at: UnixMillis,
    },
    CreateApiToken {
        id: String,
        name: String,
        token_hash: String,
        scopes: Vec<String>,
        created_at: UnixMillis,
        expires_at: Option<UnixMillis>,
        /// The user the token acts as (`None`: the cluster's first admin token).
        #[serde(default)]
        user_id: Option<String>,
    },
    /// Revokes an API token; with `user_id`, only if it is that user's.
    RevokeApiToken {
        id: String,
        user_id: Option<String>,
        at: UnixMillis,
    },
    CreateUser {
        id: String,
        email: String,
        /// Argon2id PHC string, computed by the proposer.
        password_hash: String,
        admin: bool,
        created_at: UnixMillis,
    },
    CreateSession {
        id: String,
        user_id: String,
        token_hash: String,
        created_at: UnixMillis,
        expires_at: UnixMillis,
    },
    RevokeSession {
        token_hash: String,
        at: UnixMillis,
    },
    CreateProject {
        id: String,
        name: String,
        created_at: UnixMillis,
        /// The user who becomes the project's owner (`None` when made with the first admin token).
        #[serde(default)]
        owner: Option<String>,
    },
    /// Gives a user a role on a project (replacing the role it had).
    SetCollaborator {
        project_id: String,
        user_id: String,
        role: String,
        at: UnixMillis,
    },
    RemoveCollaborator {
        project_id: String,
        user_id: String,
    },
    /// Creates a service (`create`) or replaces its spec. The proposer validated the spec and
    /// sealed the secrets; applying checks what depends on the rest of the state (a free name,
    /// free domains, dependencies that exist, no cycle) before writing anything.
    PutService {
        id: String,
        project_id: String,
        name: String,
        create: bool,
        /// The full spec without secrets.
        spec: serde_json::Value,
        depends_on: Vec<String>,
        domains: Vec<String>,
        /// (name, sealed value as hex) to set.
        set_secrets: Vec<(String, String)>,
        unset_secrets: Vec<String>,
        at: UnixMillis,
    },
    DeleteService {
        id: String,
        project_id: String,
    },
    /// `command`, recorded in the audit log if it is applied.
    Audited {
        entry: AuditEntry,
        command: Box<Command>,
    },
    DeleteProject {
        id: String,
    },
    /// An agent joined with a token; it is `down` until its first session says hello.
    RegisterAgent {
        id: String,
        hostname: String,
        labels: std::collections::BTreeMap<String, String>,
        token_id: String,
        created_at: UnixMillis,
    },
    /// An agent's session said hello (or heartbeats resumed): it is `ready`, with what it told.
    AgentUp {
        id: String,
        hostname: String,
        labels: std::collections::BTreeMap<String, String>,
        version: String,
        cpu_millis: u64,
        memory_bytes: u64,
        /// Where its ingress answers plain HTTP (host:port; empty: it runs none).
        #[serde(default)]
        ingress: String,
        #[serde(default)]
        ingress_https_port: u32,
        at: UnixMillis,
    },
    /// Agents whose heartbeats stopped for the TTL: each is `down`, last seen at its time.
    AgentsDown {
        agents: Vec<(String, UnixMillis)>,
    },
    /// The agent's certificate is refused from now on; it is no longer listed.
    RevokeAgent {
        id: String,
        at: UnixMillis,
    },
    /// A deployment asked for: `queued`. An older deployment of the same service still queued
    /// is `superseded` by it.
    CreateDeployment {
        id: String,
        project_id: String,
        service_id: String,
        /// What to deploy, resolved when it was asked for (see `deploy::DeploySource`).
        source: serde_json::Value,
        reference: Option<String>,
        created_by: String,
        /// The preview environment it belongs to ("" for the service's own releases).
        #[serde(default)]
        preview: String,
        /// Where its status is reported (JSON of `githost::Notify`; "" for nowhere).
        #[serde(default)]
        notify: String,
        at: UnixMillis,
    },
    /// One chunk of an uploaded source tarball, stored before its deployment is created.
    PutUploadChunk {
        upload_id: String,
        chunk: u32,
        data_hex: String,
    },
    /// The dispatcher handed a queued deployment to an agent: attempt `attempt` starts.
    AssignDeployment {
        id: String,
        attempt: u32,
        agent_id: String,
        at: UnixMillis,
    },
    /// What an attempt reached. Applied only while `attempt` is the deployment's current one and
    /// it is still in progress: a late report of an older attempt changes nothing.
    UpdateDeployment {
        id: String,
        attempt: u32,
        status: DeploymentStatus,
        image: Option<String>,
        commit: Option<String>,
        url: Option<String>,
        error: Option<String>,
        /// For a retry (`status` queued): not handed out again before this time.
        not_before: Option<UnixMillis>,
        /// For a requeue (`status` queued after the agent went down): never that agent again.
        exclude_agent: Option<String>,
        at: UnixMillis,
    },
    /// Log lines of a deployment's attempt.
    AppendDeploymentLogs {
        id: String,
        attempt: u32,
        lines: Vec<LogLine>,
    },
    /// Drops the uploaded tarballs of these deployments (they ended long ago).
    DropUploads {
        ids: Vec<String>,
    },
    /// The CA of the default host names' certificates. The first one stays: a later one (from a
    /// leader that raced another) is rejected.
    SetIngressCa {
        cert_pem: String,
        key_sealed_hex: String,
        at: UnixMillis,
    },
    /// The ACME account the leader orders certificates with.
    SetAcmeAccount {
        directory_url: String,
        credentials_sealed_hex: String,
        at: UnixMillis,
    },
    /// A custom domain's certificate was issued (or renewed).
    PutCertificate {
        domain: String,
        cert_chain_pem: String,
        key_sealed_hex: String,
        not_before: UnixMillis,
        not_after: UnixMillis,
        at: UnixMillis,
    },
    /// Ordering a custom domain's certificate failed; the last good one (if any) stays.
    CertificateFailed {
        domain: String,
        error: String,
        retry_at: UnixMillis,
        at: UnixMillis,
    },
    /// A webhook delivery and the deployments it asks for, all or nothing: a delivery handled
    /// before (a redelivery) is rejected and creates nothing. `deployments` holds only
    /// `CreateDeployment` commands.
    WebhookDelivery {
        provider: String,
        delivery_id: String,
        deployments: Vec<Command>,
        at: UnixMillis,
    },
    /// A project's own webhook secret (None: back to the default `WEBHOOK_SECRET`). The one it
    /// replaces stays valid until `previous_until`.
    SetWebhookSecret {
        project_id: String,
        sealed_hex: Option<String>,
        previous_until: UnixMillis,
        at: UnixMillis,
    },
    /// A service's generic deploy hook secret; the one it replaces stays valid until
    /// `previous_until`.
    SetDeployHook {
        project_id: String,
        service_id: String,
        sealed_hex: String,
        previous_until: UnixMillis,
        at: UnixMillis,
    },
    /// Opens a preview environment, or moves the live one with this key to a new head (and
    /// pushes its expiry back).
    PutPreview {
        id: String,
        project_id: String,
        key: String,
        origin: String,
        number: Option<u64>,
        branch: String,
        commit: String,
        expires_at: UnixMillis,
        /// Its deployments (`CreateDeployment` commands with this preview's key), created with
        /// it or not at all.
        deployments: Vec<Command>,
        at: UnixMillis,
    },
    /// Starts tearing a preview down: its deployments end (`cancelled`) so its hosts stop
    /// answering, and the leader has every agent remove what it holds of it.
    DestroyPreview {
        project_id: String,
        key: String,
        reason: String,
        at: UnixMillis,
    },
    /// How a teardown went: done, or what is left (tried again later).
    PreviewTeardown {
        project_id: String,
        key: String,
        error: Option<String>,
        at: UnixMillis,
    },
    /// Turns a project's preview environments on or off.
    SetPreviewsEnabled {
        project_id: String,
        enabled: bool,
    },
    /// Forgets deliveries received before `before` (a redelivery that old is not expected).
    PruneWebhookDeliveries {
        before: UnixMillis,
    },
    /// Writes that arrived together, committed as one entry; each is applied (or rejected) on
    /// its own, in order, and answers on its own.
    Batch {
        commands: Vec<Command>,
    },
}

impl Command {
    /// Short name for logs; never the command's content, which may hold secret material.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::InitCluster { .. } => "init_cluster",
            Command::CreateJoinToken { .. } => "create_join_token",
            Command::RevokeJoinToken { .. } => "revoke_join_token",
            Command::CreateApiToken { .. } => "create_api_token",
            Command::CreateProject { .. } => "create_project",
            Command::DeleteProject { .. } => "delete_project",
            Command::RevokeApiToken { .. } => "revoke_api_token",
            Command::CreateUser { .. } => "create_user",
            Command::CreateSession { .. } => "create_session",
            Command::RevokeSession { .. } => "revoke_session",
            Command::SetCollaborator { .. } => "set_collaborator",
            Command::PutService { .. } => "put_service",
            Command::DeleteService { .. } => "delete_service",
            Command::RemoveCollaborator { .. } => "remove_collaborator",
            Command::Audited { command, .. } => command.kind(),
            Command::RegisterAgent { .. } => "register_agent",
            Command::AgentUp { .. } => "agent_up",
            Command::AgentsDown { .. } => "agents_down",
            Command::RevokeAgent { .. } => "revoke_agent",
            Command::CreateDeployment { .. } => "create_deployment",
            Command::PutUploadChunk { .. } => "put_upload_chunk",
            Command::AssignDeployment { .. } => "assign_deployment",
            Command::UpdateDeployment { .. } => "update_deployment",
            Command::AppendDeploymentLogs { .. } => "append_deployment_logs",
            Command::DropUploads { .. } => "drop_uploads",
            Command::SetIngressCa { .. } => "set_ingress_ca",
            Command::SetAcmeAccount { .. } => "set_acme_account",
            Command::PutCertificate { .. } => "put_certificate",
            Command::CertificateFailed { .. } => "certificate_failed",
            Command::WebhookDelivery { .. } => "webhook_delivery",
            Command::SetWebhookSecret { .. } => "set_webhook_secret",
            Command::SetDeployHook { .. } => "set_deploy_hook",
            Command::PruneWebhookDeliveries { .. } => "prune_webhook_deliveries",
            Command::PutPreview { .. } => "put_preview",
            Command::DestroyPreview { .. } => "destroy_preview",
            Command::PreviewTeardown { .. } => "preview_teardown",
            Command::SetPreviewsEnabled { .. } => "set_previews_enabled",
            Command::Batch { .. } => "batch",
        }
    }

    /// Events applying this may cause (an event for a command that ends up rejected is harmless).
    pub fn collect_events(&self, out: &mut Vec<crate::store::state_machine::StateEvent>) {
        match self {
            Command::RevokeAgent { id, .. } => {
                out.push(crate::store::state_machine::StateEvent::AgentRevoked(id.clone()))
            }
            Command::Batch { commands } => commands.iter().for_each(|c| c.collect_events(out)),
            Command::Audited { command, .. } => command.collect_events(out),
            _ => {}
        }
    }

    /// Whether applying this may add, change or remove an API token.
    pub fn touches_api_tokens(&self) -> bool {
        match self {
            // Sessions and users are cached with tokens: any change to them drops the cache.
            Command::CreateApiToken { .. }
            | Command::RevokeApiToken { .. }
            | Command::CreateUser { .. }
            | Command::CreateSession { .. }
            | Command::RevokeSession { .. } => true,
            Command::Audited { command, .. } => command.touches_api_tokens(),
            Command::Batch { commands } => commands.iter().any(Command::touches_api_tokens),
            _ => false,
        }
    }
}

/// Where a deployment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    Queued,
    Building,
    Deploying,
    Running,
    Failed,
    Cancelled,
    Superseded,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Queued => "queued",
            DeploymentStatus::Building => "building",
            DeploymentStatus::Deploying => "deploying",
            DeploymentStatus::Running => "running",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::Cancelled => "cancelled",
            DeploymentStatus::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<DeploymentStatus> {
        [
            DeploymentStatus::Queued,
            DeploymentStatus::Building,
            DeploymentStatus::Deploying,
            DeploymentStatus::Running,
            DeploymentStatus::Failed,
            DeploymentStatus::Cancelled,
            DeploymentStatus::Superseded,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether an agent is (or may be) working on it.
    pub fn in_progress(self) -> bool {
        matches!(self, DeploymentStatus::Building | DeploymentStatus::Deploying)
    }
}

/// One line of a deployment's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The agent's number for the line (`None` for the controller's own lines).
    pub agent_seq: Option<u64>,
    pub level: String,
    pub message: String,
    pub at: UnixMillis,
    pub phase: String,
    pub step: Option<String>,
}

/// One line of the audit log: who did what to which target, when and from where.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: String,
    pub at: UnixMillis,
    /// `user:<email>`, or `token:<name>` for the first admin token.
    pub actor: String,
    /// e.g. `project.create`.
    pub action: String,
    pub target: String,
    pub project_id: Option<String>,
    /// The client's address.
    pub source: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinTokenKind {
    Controller,
    Agent,
}

impl JoinTokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinTokenKind::Controller => "controller",
            JoinTokenKind::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<JoinTokenKind> {
        match s {
            "controller" => Some(JoinTokenKind::Controller),
            "agent" => Some(JoinTokenKind::Agent),
            _ => None,
        }
    }
}

/// What applying a command produced. A command that breaks a rule of the state (a duplicate
/// name, an unknown id) is rejected deterministically on every node, not failed as storage.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandResponse {
    #[default]
    Applied,
    Rejected {
        reason: Rejection,
        message: String,
    },
    /// One response per command of a `Batch`, in order.
    Batch {
        responses: Vec<CommandResponse>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    Conflict,
    NotFound,
    /// The command is well formed but contradicts the state (e.g. a dependency cycle).
    Invalid,
}

impl CommandResponse {
    pub fn rejected(reason: Rejection, message: impl Into<String>) -> Self {
        CommandResponse::Rejected { reason, message: message.into() }
    }
}

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
    },
    CreateProject {
        id: String,
        name: String,
        created_at: UnixMillis,
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
            Command::RegisterAgent { .. } => "register_agent",
            Command::AgentUp { .. } => "agent_up",
            Command::AgentsDown { .. } => "agents_down",
            Command::RevokeAgent { .. } => "revoke_agent",
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
            _ => {}
        }
    }

    /// Whether applying this may add, change or remove an API token.
    pub fn touches_api_tokens(&self) -> bool {
        match self {
            Command::CreateApiToken { .. } => true,
            Command::Batch { commands } => commands.iter().any(Command::touches_api_tokens),
            _ => false,
        }
    }
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
}

impl CommandResponse {
    pub fn rejected(reason: Rejection, message: impl Into<String>) -> Self {
        CommandResponse::Rejected { reason, message: message.into() }
    }
}

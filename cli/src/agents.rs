//! `deployer agents ...` (alias `nodes`): the Docker hosts of the cluster.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde::Deserialize;

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, fields, timestamp, Format, Table};

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// List agents, newest first, with their status and latest metrics.
    List,
    /// Show one agent, with its containers.
    Show { id: String },
    /// Revoke an agent: its session ends and its certificate is refused from now on.
    Revoke { id: String },
}

#[derive(Deserialize)]
struct Metrics {
    cpu_percent: f64,
    memory_used_bytes: u64,
    memory_total_bytes: u64,
    disk_used_bytes: u64,
    disk_total_bytes: u64,
}

#[derive(Deserialize)]
struct Container {
    name: String,
    cpu_percent: f64,
    memory_used_bytes: u64,
}

#[derive(Deserialize)]
struct AgentView {
    id: String,
    hostname: String,
    status: String,
    labels: BTreeMap<String, String>,
    version: String,
    connected: Option<bool>,
    last_seen: String,
    metrics: Option<Metrics>,
    #[serde(default)]
    containers: Vec<Container>,
}

fn gib(bytes: u64) -> String {
    format!("{:.1}G", bytes as f64 / (1u64 << 30) as f64)
}

fn labels(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

impl AgentView {
    fn cpu(&self) -> String {
        self.metrics.as_ref().map_or("-".into(), |m| format!("{:.0}%", m.cpu_percent))
    }
    fn memory(&self) -> String {
        self.metrics
            .as_ref()
            .map_or("-".into(), |m| format!("{}/{}", gib(m.memory_used_bytes), gib(m.memory_total_bytes)))
    }
    fn disk(&self) -> String {
        self.metrics.as_ref().map_or("-".into(), |m| format!("{}/{}", gib(m.disk_used_bytes), gib(m.disk_total_bytes)))
    }
    fn session(&self) -> String {
        match self.connected {
            Some(true) => "connected".into(),
            Some(false) => "disconnected".into(),
            None => "unknown".into(),
        }
    }
}

pub async fn run(command: AgentsCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        AgentsCommand::List => {
            let answer = client.get(&["agents"], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let agents: Vec<AgentView> = answer.decode()?;
            if agents.is_empty() {
                eprintln!(
                    "No agents; create a token with `deployer cluster token create --kind agent` and run \
                     `deployer-agent run --controller https://CONTROLLER:7701 --token TOKEN --data-dir DIR` on a Docker host."
                );
                return Ok(());
            }
            let mut table = Table::new(&["ID", "HOSTNAME", "STATUS", "CPU", "MEMORY", "DISK", "LABELS", "LAST SEEN"]);
            for a in &agents {
                table.row(vec![
                    a.id.clone(),
                    a.hostname.clone(),
                    a.status.clone(),
                    a.cpu(),
                    a.memory(),
                    a.disk(),
                    labels(&a.labels),
                    timestamp(&a.last_seen),
                ]);
            }
            emit(&table.render())
        }
        AgentsCommand::Show { id } => {
            let answer = client.get(&["agents", &id], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let a: AgentView = answer.decode()?;
            let containers = if a.containers.is_empty() {
                "-".to_string()
            } else {
                a.containers
                    .iter()
                    .map(|c| format!("{} ({:.0}% cpu, {})", c.name, c.cpu_percent, gib(c.memory_used_bytes)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            emit(&fields(&[
                ("id", a.id.clone()),
                ("hostname", a.hostname.clone()),
                ("status", a.status.clone()),
                ("session", a.session()),
                ("version", a.version.clone()),
                ("labels", labels(&a.labels)),
                ("cpu", a.cpu()),
                ("memory", a.memory()),
                ("disk", a.disk()),
                ("last seen", timestamp(&a.last_seen)),
                ("containers", containers),
            ]))
        }
        AgentsCommand::Revoke { id } => {
            let answer = client.delete(&["agents", &id]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("revoked agent {id}\n"))
        }
    }
}

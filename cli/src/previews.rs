//! `deployer previews ...`: a project's preview environments, by hand for a branch.

use clap::Subcommand;
use serde::Deserialize;
use serde_json::json;

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, fields, or_dash, timestamp, Format, Table};

#[derive(Subcommand)]
pub enum PreviewsCommand {
    /// List the project's previews, newest first (destroyed ones too).
    List {
        project_id: String,
        /// At most this many (the controller's default is 50).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Deploy every git service of the project from a branch, at
    /// <service>-<project>-<branch slug>.<base domain>; again to move it to the branch's new head.
    Create {
        project_id: String,
        branch: String,
        /// A commit of the branch (7 to 40 hex digits) instead of its head.
        #[arg(long)]
        commit: Option<String>,
    },
    /// Destroy a preview: its hosts stop answering, its containers, images and sources go.
    Delete { project_id: String, key: String },
    /// Turn the project's previews of pull and merge requests on or off.
    Enable {
        project_id: String,
        #[arg(action = clap::ArgAction::Set, value_name = "true|false")]
        enabled: bool,
    },
}

#[derive(Deserialize)]
struct PreviewView {
    key: String,
    origin: String,
    branch: String,
    commit: Option<String>,
    status: String,
    expires_at: String,
    teardown_error: Option<String>,
    hosts: Vec<String>,
}

impl PreviewView {
    fn fields(&self) -> String {
        fields(&[
            ("key", self.key.clone()),
            ("status", self.status.clone()),
            ("origin", self.origin.clone()),
            ("branch", self.branch.clone()),
            ("commit", or_dash(self.commit.as_deref())),
            ("hosts", if self.hosts.is_empty() { "-".into() } else { self.hosts.join(" ") }),
            ("expires", timestamp(&self.expires_at)),
            ("teardown error", or_dash(self.teardown_error.as_deref())),
        ])
    }
}

pub async fn run(command: PreviewsCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        PreviewsCommand::List { project_id, limit } => {
            let query: Vec<(&str, String)> = limit.map(|l| ("limit", l.to_string())).into_iter().collect();
            let answer = client.get(&["projects", &project_id, "previews"], &query).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let previews: Vec<PreviewView> = answer.decode()?;
            if previews.is_empty() {
                eprintln!("No previews in project {project_id}; make one with `deployer previews create {project_id} BRANCH`.");
                return Ok(());
            }
            let mut table = Table::new(&["KEY", "STATUS", "BRANCH", "COMMIT", "HOSTS", "EXPIRES"]);
            for p in previews {
                let commit = p.commit.as_deref().map(|c| c.chars().take(12).collect::<String>());
                table.row(vec![
                    p.key,
                    match p.teardown_error {
                        Some(error) => format!("{} ({error})", p.status),
                        None => p.status,
                    },
                    p.branch,
                    or_dash(commit.as_deref()),
                    if p.hosts.is_empty() { "-".into() } else { p.hosts.join(" ") },
                    timestamp(&p.expires_at),
                ]);
            }
            emit(&table.render())
        }
        PreviewsCommand::Create { project_id, branch, commit } => {
            let mut body = json!({ "branch": branch });
            if let Some(commit) = commit {
                body["commit"] = json!(commit);
            }
            let answer = client.post(&["projects", &project_id, "previews"], &body).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let preview: PreviewView = answer.decode()?;
            emit(&preview.fields())?;
            eprintln!("Its deployments are queued: `deployer previews list {project_id}` shows where it answers.");
            Ok(())
        }
        PreviewsCommand::Delete { project_id, key } => {
            client.delete(&["projects", &project_id, "previews", &key]).await?;
            if format == Format::Table {
                eprintln!(
                    "Preview {key} is being torn down; `deployer previews list {project_id}` shows when it is gone."
                );
            }
            Ok(())
        }
        PreviewsCommand::Enable { project_id, enabled } => {
            client.put(&["projects", &project_id, "previews", "settings"], &json!({ "enabled": enabled })).await?;
            if format == Format::Table {
                eprintln!(
                    "Previews of pull and merge requests are {} for project {project_id}.",
                    if enabled { "on" } else { "off" }
                );
            }
            Ok(())
        }
    }
}

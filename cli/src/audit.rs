//! `deployer audit`: who did what, when and from where.

use clap::Args;
use serde::Deserialize;

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, or_dash, timestamp, Format, Table};

#[derive(Args)]
pub struct AuditArgs {
    /// Only this project's entries (required unless you are a cluster administrator).
    #[arg(long, value_name = "ID")]
    project: Option<String>,
    /// At most this many (1 to 1000; the controller's default is 100).
    #[arg(long)]
    limit: Option<u32>,
    /// Only entries older than this one (the last SEQ of the previous page).
    #[arg(long, value_name = "SEQ")]
    before: Option<i64>,
}

#[derive(Deserialize)]
struct AuditView {
    seq: i64,
    at: String,
    actor: String,
    action: String,
    target: String,
    project_id: Option<String>,
    source: String,
}

pub async fn run(args: AuditArgs, client: &Client, format: Format) -> Result<(), CliError> {
    let mut query = Vec::new();
    if let Some(project) = &args.project {
        query.push(("project_id", project.clone()));
    }
    if let Some(limit) = args.limit {
        query.push(("limit", limit.to_string()));
    }
    if let Some(before) = args.before {
        query.push(("before", before.to_string()));
    }
    let answer = client.get(&["audit"], &query).await?;
    if format == Format::Json {
        return emit_json(&answer);
    }
    let entries: Vec<AuditView> = answer.decode()?;
    if entries.is_empty() {
        match &args.project {
            Some(project) => eprintln!("No audit entries for project {project}."),
            None => eprintln!("No audit entries."),
        }
        return Ok(());
    }
    let mut table = Table::new(&["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "PROJECT", "SOURCE"]);
    for e in entries {
        table.row(vec![
            e.seq.to_string(),
            timestamp(&e.at),
            e.actor,
            e.action,
            e.target,
            or_dash(e.project_id.as_deref()),
            e.source,
        ]);
    }
    emit(&table.render())
}

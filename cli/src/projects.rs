//! `deployer projects ...`.

use clap::Subcommand;
use serde::Deserialize;
use serde_json::json;

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, fields, timestamp, Format, Table};

#[derive(Subcommand)]
pub enum ProjectsCommand {
    /// Create a project (a name of lowercase letters, digits and '-').
    Create { name: String },
    /// List projects, newest first.
    List {
        /// At most this many (the controller's default is 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Only projects older than the one with this id (the last id of the previous page).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
    },
    /// Show one project.
    Show { id: String },
    /// Delete a project.
    Delete { id: String },
}

#[derive(Deserialize)]
struct ProjectView {
    id: String,
    name: String,
    created_at: String,
}

impl ProjectView {
    fn fields(self) -> String {
        fields(&[("id", self.id), ("name", self.name), ("created", timestamp(&self.created_at))])
    }
}

pub async fn run(command: ProjectsCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        ProjectsCommand::Create { name } => {
            let answer = client.post(&["projects"], &json!({ "name": name })).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&answer.decode::<ProjectView>()?.fields())
        }
        ProjectsCommand::List { limit, before } => {
            let mut query = Vec::new();
            if let Some(limit) = limit {
                query.push(("limit", limit.to_string()));
            }
            if let Some(before) = before {
                query.push(("before", before));
            }
            let answer = client.get(&["projects"], &query).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let projects: Vec<ProjectView> = answer.decode()?;
            if projects.is_empty() {
                eprintln!("No projects; create one with `deployer projects create NAME`.");
                return Ok(());
            }
            let mut table = Table::new(&["ID", "NAME", "CREATED"]);
            for p in projects {
                table.row(vec![p.id, p.name, timestamp(&p.created_at)]);
            }
            emit(&table.render())
        }
        ProjectsCommand::Show { id } => {
            let answer = client.get(&["projects", &id], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&answer.decode::<ProjectView>()?.fields())
        }
        ProjectsCommand::Delete { id } => {
            let answer = client.delete(&["projects", &id]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("deleted project {id}\n"))
        }
    }
}

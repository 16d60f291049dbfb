//! `deployer collaborators ...`: who may do what on a project.

use clap::Subcommand;
use serde::Deserialize;
use serde_json::json;

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, fields, Format, Table};

#[derive(Subcommand)]
pub enum CollaboratorsCommand {
    /// Give a user a role on a project (or change it).
    Add {
        project_id: String,
        /// The user's email; the user must exist (`deployer users create`).
        email: String,
        /// viewer (reads), developer (also deploys), admin (also edits services, secrets and
        /// collaborators) or owner (also deletes the project); never above your own.
        #[arg(long, value_name = "ROLE")]
        role: String,
    },
    /// Take a user's role on a project away.
    Remove {
        project_id: String,
        /// The user's id, or email.
        user: String,
    },
    /// List a project's collaborators and their roles.
    List { project_id: String },
}

#[derive(Deserialize)]
struct CollaboratorView {
    user_id: String,
    email: String,
    role: String,
}

pub async fn run(command: CollaboratorsCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        CollaboratorsCommand::Add { project_id, email, role } => {
            // The role is passed as given, so the controller's own message names the valid ones.
            let body = json!({ "email": email, "role": role });
            let answer = client.post(&["projects", &project_id, "collaborators"], &body).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let c: CollaboratorView = answer.decode()?;
            emit(&fields(&[("project", project_id), ("user", c.user_id), ("email", c.email), ("role", c.role)]))
        }
        CollaboratorsCommand::Remove { project_id, user } => {
            let user_id = if user.contains('@') { user_id_of(client, &project_id, &user).await? } else { user };
            let answer = client.delete(&["projects", &project_id, "collaborators", &user_id]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("removed user {user_id} from project {project_id}\n"))
        }
        CollaboratorsCommand::List { project_id } => {
            let answer = client.get(&["projects", &project_id, "collaborators"], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let collaborators: Vec<CollaboratorView> = answer.decode()?;
            if collaborators.is_empty() {
                eprintln!(
                    "No collaborators on project {project_id} (cluster administrators may act on every project); \
                     add one with `deployer collaborators add {project_id} EMAIL --role developer`."
                );
                return Ok(());
            }
            let mut table = Table::new(&["USER_ID", "EMAIL", "ROLE"]);
            for c in collaborators {
                table.row(vec![c.user_id, c.email, c.role]);
            }
            emit(&table.render())
        }
    }
}

/// The id of the collaborator with this email.
async fn user_id_of(client: &Client, project_id: &str, email: &str) -> Result<String, CliError> {
    let collaborators: Vec<CollaboratorView> =
        client.get(&["projects", project_id, "collaborators"], &[]).await?.decode()?;
    collaborators.into_iter().find(|c| c.email.eq_ignore_ascii_case(email.trim())).map(|c| c.user_id).ok_or_else(|| {
        CliError::Failed {
            message: format!("{email} is not a collaborator of project {project_id}"),
            hint: Some(format!("see who is with `deployer collaborators list {project_id}`")),
        }
    })
}

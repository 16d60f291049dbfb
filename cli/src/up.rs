//! `deployer up DIR`: deploy a directory in one command, making its project and service first
//! if they do not exist yet (an upload service listening on `--port`).

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use crate::client::{CliError, Client};
use crate::deployments::{deploy, DeployArgs};
use crate::output::Format;

#[derive(Args)]
pub struct UpArgs {
    /// The directory to deploy: it holds a Dockerfile at its root.
    dir: PathBuf,
    /// The project, by name; made if missing.
    #[arg(long, default_value = "dev")]
    project: String,
    /// The service, by name; made if missing [default: the directory's name].
    #[arg(long)]
    service: Option<String>,
    /// The port the app listens on, for a new service.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Return once the deployment is queued instead of following its log to the end.
    #[arg(long)]
    detach: bool,
}

/// A DNS label made of a directory name: lowercase letters, digits and single dashes.
fn label_of(name: &str) -> String {
    let mut label = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            label.push(c.to_ascii_lowercase());
        } else if !label.is_empty() && !label.ends_with('-') {
            label.push('-');
        }
    }
    let label: String = label.trim_end_matches('-').chars().take(40).collect();
    label.trim_end_matches('-').to_string()
}

fn id_of(list: &Value, name: &str) -> Option<String> {
    list.as_array()?.iter().find(|item| item["name"] == name).and_then(|item| item["id"].as_str()).map(str::to_string)
}

pub async fn up(args: UpArgs, client: &Client, format: Format) -> Result<(), CliError> {
    let UpArgs { dir, project, service, port, detach } = args;
    let dir = std::fs::canonicalize(&dir)
        .map_err(|e| CliError::Usage { message: format!("cannot use {}: {e}", dir.display()), hint: None })?;
    if !dir.join("Dockerfile").is_file() {
        return Err(CliError::Usage {
            message: format!("{} has no Dockerfile at its root", dir.display()),
            hint: None,
        });
    }
    let service = match service {
        Some(s) => s,
        None => label_of(&dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()),
    };
    if service.is_empty() {
        return Err(CliError::Usage {
            message: "name the service with --service (the directory's name is no DNS label)".into(),
            hint: None,
        });
    }
    let projects = client.get(&["projects"], &[("limit", "1000".to_string())]).await?;
    let project_id = match id_of(&projects.json, &project) {
        Some(id) => id,
        None => {
            let made = client.post(&["projects"], &json!({ "name": project })).await?;
            eprintln!("Created project {project}.");
            id_of(&json!([made.json]), &project)
                .ok_or_else(|| CliError::Unexpected(format!("unexpected answer: {}", made.raw.trim())))?
        }
    };
    let services = client.get(&["projects", &project_id, "services"], &[]).await?;
    let service_id = match id_of(&services.json, &service) {
        Some(id) => id,
        None => {
            let spec = json!({ "name": service, "source": { "upload": {} }, "port": port });
            let made = client.post(&["projects", &project_id, "services"], &spec).await?;
            eprintln!("Created service {service} (uploads, port {port}) in project {project}.");
            id_of(&json!([made.json]), &service)
                .ok_or_else(|| CliError::Unexpected(format!("unexpected answer: {}", made.raw.trim())))?
        }
    };
    deploy(DeployArgs::upload(project_id, service_id, dir, detach), client, format).await
}

#[cfg(test)]
mod tests {
    use super::label_of;

    #[test]
    fn directory_names_become_labels() {
        assert_eq!(label_of("hello"), "hello");
        assert_eq!(label_of("My App_2"), "my-app-2");
        assert_eq!(label_of("--x--"), "x");
        assert_eq!(label_of("é"), "");
    }
}

//! `deployer env ...`: a service's environment variables.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde_json::{Map, Value};

use crate::client::{Answer, CliError, Client};
use crate::output::{emit, emit_json, Format, Table};
use crate::services::{parse_assignment, ServiceView};

#[derive(Subcommand)]
pub enum EnvCommand {
    /// Set environment variables (or change them). For values that must stay private, use
    /// `deployer secrets set`.
    Set {
        project_id: String,
        service_id: String,
        #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_assignment)]
        vars: Vec<(String, String)>,
    },
    /// Remove environment variables.
    Unset {
        project_id: String,
        service_id: String,
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// List a service's environment variables (with `-o json`, the whole service as the API sends it).
    List { project_id: String, service_id: String },
}

/// `PATCH` a service; the answer is its new view.
pub async fn patch(client: &Client, project_id: &str, service_id: &str, body: &Value) -> Result<Answer, CliError> {
    client.patch(&["projects", project_id, "services", service_id], body).await
}

/// The names in `asked` that are not among `present`.
pub fn missing_names<V>(asked: &[String], present: &BTreeMap<String, V>) -> Vec<String> {
    asked.iter().filter(|k| !present.contains_key(*k)).cloned().collect()
}

pub async fn run(command: EnvCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        EnvCommand::Set { project_id, service_id, vars } => {
            let values: Map<String, Value> = vars.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let names: Vec<String> = values.keys().cloned().collect();
            let answer = patch(client, &project_id, &service_id, &serde_json::json!({ "env": values })).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let service: ServiceView = answer.decode()?;
            emit(&format!("set {} on service {}\n", names.join(", "), service.name))
        }
        EnvCommand::Unset { project_id, service_id, keys } => {
            let before: ServiceView =
                client.get(&["projects", &project_id, "services", &service_id], &[]).await?.decode()?;
            let missing = missing_names(&keys, &before.env);
            let removals: Map<String, Value> = keys.iter().map(|k| (k.clone(), Value::Null)).collect();
            let answer = patch(client, &project_id, &service_id, &serde_json::json!({ "env": removals })).await?;
            if !missing.is_empty() {
                eprintln!("note: service {} had no environment variable {}", before.name, missing.join(", "));
            }
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("removed {} from service {}\n", keys.join(", "), before.name))
        }
        EnvCommand::List { project_id, service_id } => {
            let answer = client.get(&["projects", &project_id, "services", &service_id], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let service: ServiceView = answer.decode()?;
            if service.env.is_empty() {
                eprintln!(
                    "No environment variables on service {}; set one with \
                     `deployer env set {project_id} {service_id} KEY=VALUE`.",
                    service.name
                );
                return Ok(());
            }
            let mut table = Table::new(&["NAME", "VALUE"]);
            for (name, value) in service.env {
                table.row(vec![name, value]);
            }
            emit(&table.render())
        }
    }
}

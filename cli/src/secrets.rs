//! `deployer secrets ...`: a service's secrets, sealed by the controller and never shown.

use clap::Subcommand;
use serde_json::{Map, Value};

use crate::client::{CliError, Client};
use crate::env::{missing_names, patch};
use crate::output::{emit, emit_json, Format, Table};
use crate::prompt;
use crate::services::ServiceView;

#[derive(Subcommand)]
pub enum SecretsCommand {
    /// Set secrets (or change them); the values are never shown again.
    ///
    /// Given as KEY alone, the one secret's value is read from stdin (asked for without echo on a
    /// terminal), so it appears neither in the shell's history nor in `ps`:
    ///
    ///   printf '%s' "$DATABASE_URL" | deployer secrets set PROJECT_ID SERVICE_ID DATABASE_URL
    ///   deployer secrets set PROJECT_ID SERVICE_ID TLS_KEY < key.pem
    ///
    /// One line ending at the end of the value is dropped.
    #[command(verbatim_doc_comment)]
    Set {
        project_id: String,
        service_id: String,
        #[arg(required = true, value_name = "KEY[=VALUE]", value_parser = parse_secret)]
        secrets: Vec<(String, Option<String>)>,
    },
    /// Remove secrets.
    Unset {
        project_id: String,
        service_id: String,
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// List the names of a service's secrets (never their values).
    List { project_id: String, service_id: String },
}

/// `KEY=VALUE`, or `KEY` alone for a value read from stdin.
pub fn parse_secret(text: &str) -> Result<(String, Option<String>), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), Some(value.to_string()))),
        None if !text.is_empty() => Ok((text.to_string(), None)),
        _ => Err(format!("expected KEY=VALUE, or KEY alone to read its value from stdin, not {text:?}")),
    }
}

/// The secrets as JSON, the one given as `KEY` alone read from stdin (or asked for on a terminal);
/// `what` is how the others are given (`--secret `, or nothing).
pub async fn secret_values(secrets: Vec<(String, Option<String>)>, what: &str) -> Result<Map<String, Value>, CliError> {
    let from_stdin: Vec<&str> = secrets.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| k.as_str()).collect();
    if from_stdin.len() > 1 {
        return Err(CliError::Usage {
            message: format!(
                "only one secret's value can be read from stdin, and {} were given without a value",
                from_stdin.join(", ")
            ),
            hint: Some(format!("give the others as {what}KEY=VALUE, or set them one at a time")),
        });
    }
    let mut values = Map::new();
    for (key, value) in secrets {
        let value = match value {
            Some(value) => value,
            None if prompt::interactive() => prompt::hidden(&format!("Value of {key}: ")).await?,
            None => prompt::value_from_stdin().await?,
        };
        if value.is_empty() {
            return Err(CliError::Usage {
                message: format!("no value was given for the secret {key}"),
                hint: Some(format!(
                    "write the value to stdin, as in `printf '%s' \"$VALUE\" | deployer ... {key}`; for an \
                     empty value give {key}="
                )),
            });
        }
        values.insert(key, Value::String(value));
    }
    Ok(values)
}

pub async fn run(command: SecretsCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        SecretsCommand::Set { project_id, service_id, secrets } => {
            let values = secret_values(secrets, "").await?;
            let names: Vec<String> = values.keys().cloned().collect();
            let body = serde_json::json!({ "secrets": values });
            let answer = patch(client, &project_id, &service_id, &body).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let service: ServiceView = answer.decode()?;
            emit(&format!("set secrets {} on service {}\n", names.join(", "), service.name))
        }
        SecretsCommand::Unset { project_id, service_id, keys } => {
            let before: ServiceView =
                client.get(&["projects", &project_id, "services", &service_id], &[]).await?.decode()?;
            let missing = missing_names(&keys, &before.secrets);
            let removals: Map<String, Value> = keys.iter().map(|k| (k.clone(), Value::Null)).collect();
            let answer = patch(client, &project_id, &service_id, &serde_json::json!({ "secrets": removals })).await?;
            if !missing.is_empty() {
                eprintln!("note: service {} had no secret {}", before.name, missing.join(", "));
            }
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("removed secrets {} from service {}\n", keys.join(", "), before.name))
        }
        SecretsCommand::List { project_id, service_id } => {
            let answer = client.get(&["projects", &project_id, "services", &service_id], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let service: ServiceView = answer.decode()?;
            if service.secrets.is_empty() {
                eprintln!(
                    "No secrets on service {}; set one with `deployer secrets set {project_id} {service_id} KEY` \
                     (the value is read from stdin).",
                    service.name
                );
                return Ok(());
            }
            let mut table = Table::new(&["NAME"]);
            for name in service.secrets.into_keys() {
                table.row(vec![name]);
            }
            emit(&table.render())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_secret;

    #[test]
    fn a_secret_is_key_equals_value_or_a_key_alone() {
        assert_eq!(parse_secret("A=b=c"), Ok(("A".into(), Some("b=c".into()))));
        assert_eq!(parse_secret("TOKEN"), Ok(("TOKEN".into(), None)));
        assert!(parse_secret("").is_err());
        assert!(parse_secret("=x").is_err());
    }
}

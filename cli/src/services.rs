//! `deployer services ...`: what a project runs.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, fields, or_dash, timestamp, Format, Table};
use crate::secrets::{parse_secret, secret_values};

#[derive(Subcommand)]
pub enum ServicesCommand {
    /// Create a service (a name of lowercase letters, digits and '-') from one source: a git
    /// repository, an image, or uploads.
    #[command(after_help = "Examples:\n  \
        deployer services create $PROJECT web --git https://github.com/acme/web.git --port 3000 \\\n      \
        --env NODE_ENV=production --domain www.example.com --depends-on db\n  \
        printf '%s' \"$DATABASE_URL\" | deployer services create $PROJECT web --image acme/web:1.4 --secret DATABASE_URL")]
    Create(Box<CreateArgs>),
    /// List a project's services, by name.
    List { project_id: String },
    /// Show a service: its spec, environment, and the names of its secrets.
    Show { project_id: String, service_id: String },
    /// Delete a service (refused while another service depends on it).
    Delete { project_id: String, service_id: String },
}

/// `deployer services create`'s arguments (boxed: they are much larger than the other commands').
#[derive(Args)]
pub struct CreateArgs {
    project_id: String,
    name: String,
    #[command(flatten)]
    source: SourceArgs,
    /// The git branch to build [default: main].
    #[arg(long, conflicts_with_all = ["image", "upload"])]
    branch: Option<String>,
    /// The Dockerfile's path inside the repository [default: Dockerfile].
    #[arg(long, value_name = "PATH", conflicts_with_all = ["image", "upload"])]
    dockerfile: Option<String>,
    /// The port the service listens on [default: 8080].
    #[arg(long)]
    port: Option<u16>,
    /// An environment variable; repeat for more.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_assignment)]
    env: Vec<(String, String)>,
    /// A secret; repeat for more. Given as KEY alone (once), its value is read from stdin, so it
    /// appears neither in the shell's history nor in `ps`.
    #[arg(long = "secret", value_name = "KEY[=VALUE]", value_parser = parse_secret)]
    secrets: Vec<(String, Option<String>)>,
    /// How many instances to run [default: 1].
    #[arg(long)]
    replicas: Option<u32>,
    /// CPU per instance, in thousandths of a core [default: 500].
    #[arg(long, value_name = "MILLIS")]
    cpu: Option<u64>,
    /// Memory per instance: bytes, or with a K, M, G or T suffix (powers of 1024), as in 512M
    /// [default: 512M].
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    memory: Option<u64>,
    /// The HTTP path that answers when an instance is healthy [default: /].
    #[arg(long, value_name = "PATH")]
    health_path: Option<String>,
    /// The name of a service of the same project that must run first; repeat for more.
    #[arg(long = "depends-on", value_name = "NAME")]
    depends_on: Vec<String>,
    /// A host name the service answers on; repeat for more.
    #[arg(long = "domain", value_name = "HOST")]
    domains: Vec<String>,
}

/// Where the service's code comes from: exactly one.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// Build from this git repository (https://, ssh://, git://, file:// or user@host:path).
    #[arg(long, value_name = "URL")]
    git: Option<String>,
    /// Run this container image, as in nginx:1.27.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Run code uploaded later.
    #[arg(long)]
    upload: bool,
}

/// The controller's view of a service; secrets arrive as names with a masked value.
#[derive(Deserialize)]
pub struct ServiceView {
    pub id: String,
    pub project_id: String,
    pub name: String,
    source: Value,
    port: u16,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    replicas: u32,
    resources: Resources,
    health_check: HealthCheck,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    pub secrets: BTreeMap<String, Value>,
    created_at: String,
    updated_at: String,
}

#[derive(Deserialize)]
struct Resources {
    cpu_millis: u64,
    memory_bytes: u64,
}

#[derive(Deserialize)]
struct HealthCheck {
    path: String,
}

/// How a secret's value is always shown.
const MASK: &str = "********";

impl ServiceView {
    fn fields(self) -> String {
        let env = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let secrets = self.secrets.keys().map(|k| format!("{k}={MASK}")).collect();
        list_fields(vec![
            ("id", vec![self.id]),
            ("name", vec![self.name]),
            ("project", vec![self.project_id]),
            ("source", vec![describe_source(&self.source)]),
            ("port", vec![self.port.to_string()]),
            ("replicas", vec![self.replicas.to_string()]),
            ("cpu", vec![format!("{} millis", self.resources.cpu_millis)]),
            ("memory", vec![memory(self.resources.memory_bytes)]),
            ("health_check", vec![self.health_check.path]),
            ("depends_on", self.depends_on),
            ("domains", self.domains),
            ("env", env),
            ("secrets", secrets),
            ("created", vec![timestamp(&self.created_at)]),
            ("updated", vec![timestamp(&self.updated_at)]),
        ])
    }
}

/// Like [`fields`], with a value per line for lists, and `-` for an empty one.
fn list_fields(pairs: Vec<(&str, Vec<String>)>) -> String {
    let indent = " ".repeat(pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 3);
    let pairs: Vec<(&str, String)> = pairs
        .into_iter()
        .map(|(k, v)| (k, if v.is_empty() { "-".into() } else { v.join(&format!("\n{indent}")) }))
        .collect();
    fields(&pairs)
}

/// A source in a field: `git URL (branch B, Dockerfile PATH)`, `image REF` or `upload`.
fn describe_source(source: &Value) -> String {
    if let Some(git) = source.get("git") {
        let text = |k: &str| git.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        return format!("git {} (branch {}, {})", text("url"), text("branch"), text("dockerfile"));
    }
    if let Some(image) = source.get("image").and_then(Value::as_str) {
        return format!("image {image}");
    }
    if source.get("upload").is_some() {
        return "upload".into();
    }
    source.to_string()
}

/// A source in a table cell, without spaces: `git:URL#BRANCH`, `image:REF` or `upload`.
fn source_cell(source: &Value) -> String {
    if let Some(git) = source.get("git") {
        let text = |k: &str| git.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        return format!("git:{}#{}", text("url"), text("branch"));
    }
    if let Some(image) = source.get("image").and_then(Value::as_str) {
        return format!("image:{image}");
    }
    if source.get("upload").is_some() {
        return "upload".into();
    }
    source.to_string()
}

/// Bytes in binary units, exact: `512 MiB`, `1536 KiB`, `100 bytes`.
fn memory(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// `KEY=VALUE` from the command line; the value may be empty or hold more `=`.
pub fn parse_assignment(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, as in LOG_LEVEL=debug, not {text:?}")),
    }
}

/// A size in bytes from `536870912`, `512K`, `512M`, `2G` or `1T` (also `Mi` or `MiB`): powers of 1024.
fn parse_memory(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KI" | "KIB" => 10,
        "M" | "MI" | "MIB" => 20,
        "G" | "GI" | "GIB" => 30,
        "T" | "TI" | "TIB" => 40,
        _ => {
            return Err(format!("{text:?} is not a size like 536870912, 512M or 2G (K, M, G and T are powers of 1024)"))
        }
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a size like 536870912, 512M or 2G"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text} is too large"))
}

pub async fn run(command: ServicesCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        ServicesCommand::Create(args) => {
            let CreateArgs {
                project_id,
                name,
                source,
                branch,
                dockerfile,
                port,
                env,
                secrets,
                replicas,
                cpu,
                memory,
                health_path,
                depends_on,
                domains,
            } = *args;
            let source = match source {
                SourceArgs { git: Some(url), .. } => {
                    let mut git = json!({ "url": url });
                    if let Some(branch) = branch {
                        git["branch"] = json!(branch);
                    }
                    if let Some(dockerfile) = dockerfile {
                        git["dockerfile"] = json!(dockerfile);
                    }
                    json!({ "git": git })
                }
                SourceArgs { image: Some(reference), .. } => json!({ "image": reference }),
                SourceArgs { .. } => json!({ "upload": {} }),
            };
            let mut body = json!({ "name": name, "source": source });
            if let Some(port) = port {
                body["port"] = json!(port);
            }
            if !env.is_empty() {
                body["env"] = json!(env.into_iter().collect::<BTreeMap<_, _>>());
            }
            if !secrets.is_empty() {
                body["secrets"] = Value::Object(secret_values(secrets, "--secret ").await?);
            }
            if let Some(replicas) = replicas {
                body["replicas"] = json!(replicas);
            }
            if cpu.is_some() || memory.is_some() {
                let mut resources = Map::new();
                resources.extend(cpu.map(|c| ("cpu_millis".to_string(), json!(c))));
                resources.extend(memory.map(|m| ("memory_bytes".to_string(), json!(m))));
                body["resources"] = Value::Object(resources);
            }
            if let Some(path) = health_path {
                body["health_check"] = json!({ "path": path });
            }
            if !depends_on.is_empty() {
                body["depends_on"] = json!(depends_on);
            }
            if !domains.is_empty() {
                body["domains"] = json!(domains);
            }
            let answer = client.post(&["projects", &project_id, "services"], &body).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&answer.decode::<ServiceView>()?.fields())
        }
        ServicesCommand::List { project_id } => {
            let answer = client.get(&["projects", &project_id, "services"], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let services: Vec<ServiceView> = answer.decode()?;
            if services.is_empty() {
                eprintln!(
                    "No services in project {project_id}; create one with \
                     `deployer services create {project_id} NAME --git URL` (or --image REF)."
                );
                return Ok(());
            }
            let mut table = Table::new(&["ID", "NAME", "SOURCE", "PORT", "REPLICAS", "DOMAINS", "UPDATED"]);
            for s in services {
                table.row(vec![
                    s.id,
                    s.name,
                    source_cell(&s.source),
                    s.port.to_string(),
                    s.replicas.to_string(),
                    or_dash(Some(&s.domains.join(","))),
                    timestamp(&s.updated_at),
                ]);
            }
            emit(&table.render())
        }
        ServicesCommand::Show { project_id, service_id } => {
            let answer = client.get(&["projects", &project_id, "services", &service_id], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&answer.decode::<ServiceView>()?.fields())
        }
        ServicesCommand::Delete { project_id, service_id } => {
            let answer = client.delete(&["projects", &project_id, "services", &service_id]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("deleted service {service_id}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_takes_binary_suffixes() {
        assert_eq!(parse_memory("536870912"), Ok(512 << 20));
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory("2g"), Ok(2 << 30));
        assert_eq!(parse_memory("64KiB"), Ok(64 << 10));
        assert_eq!(parse_memory("1T"), Ok(1 << 40));
        for bad in ["", "M", "-1M", "1.5G", "512MB", "12X", "99999999999999999999", "99999999999T"] {
            assert!(parse_memory(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn memory_is_shown_in_exact_binary_units() {
        assert_eq!(memory(512 << 20), "512 MiB");
        assert_eq!(memory(1536 << 10), "1536 KiB");
        assert_eq!(memory(2 << 30), "2 GiB");
        assert_eq!(memory(100), "100 bytes");
    }

    #[test]
    fn assignments_split_at_the_first_equals_sign() {
        assert_eq!(parse_assignment("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_assignment("EMPTY="), Ok(("EMPTY".into(), "".into())));
        assert!(parse_assignment("NOEQUALS").is_err());
        assert!(parse_assignment("=value").is_err());
    }

    #[test]
    fn sources_are_described() {
        let git = json!({"git": {"url": "https://x/a.git", "branch": "main", "dockerfile": "Dockerfile"}});
        assert_eq!(describe_source(&git), "git https://x/a.git (branch main, Dockerfile)");
        assert_eq!(source_cell(&git), "git:https://x/a.git#main");
        assert_eq!(source_cell(&json!({"image": "nginx:1.27"})), "image:nginx:1.27");
        assert_eq!(describe_source(&json!({"upload": {}})), "upload");
    }
}

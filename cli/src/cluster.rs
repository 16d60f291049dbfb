//! `deployer cluster ...`: membership and join tokens.

use clap::{Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use crate::client::{CliError, Client};
use crate::output::{self, emit, emit_json, fields, or_dash, timestamp, Format, Table};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Show the leader, the term and the controller nodes.
    Status,
    /// Join tokens for new controllers and agents.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a join token (shown only once).
    Create {
        /// What the token lets join.
        #[arg(long, value_enum)]
        kind: TokenKind,
        /// Lifetime in seconds (the controller's default is one day).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Print only the token, for scripts.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List join tokens, newest first.
    List,
    /// Revoke a join token; nothing can join with it afterwards.
    Revoke { id: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TokenKind {
    Controller,
    Agent,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Controller => "controller",
            TokenKind::Agent => "agent",
        }
    }
}

#[derive(Deserialize)]
struct ClusterView {
    leader_id: Option<u64>,
    term: u64,
    nodes: Vec<NodeView>,
}

#[derive(Deserialize)]
struct NodeView {
    id: u64,
    addr: String,
    http_addr: Option<String>,
    voter: bool,
}

#[derive(Deserialize)]
struct CreatedToken {
    id: String,
    kind: String,
    token: String,
    expires_at: String,
}

#[derive(Deserialize)]
struct TokenView {
    id: String,
    kind: String,
    created_at: String,
    expires_at: String,
    revoked_at: Option<String>,
}

pub async fn run(command: ClusterCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        ClusterCommand::Status => status(client, format).await,
        ClusterCommand::Token { command } => token(command, client, format).await,
    }
}

async fn status(client: &Client, format: Format) -> Result<(), CliError> {
    let answer = client.get(&["cluster"], &[]).await?;
    if format == Format::Json {
        return emit_json(&answer);
    }
    let cluster: ClusterView = answer.decode()?;
    let leader = match cluster.leader_id {
        Some(id) => id.to_string(),
        None => "none (an election is under way)".into(),
    };
    let mut out = fields(&[("leader", leader), ("term", cluster.term.to_string())]);
    out.push('\n');
    let mut table = Table::new(&["ID", "ADDR", "HTTP_ADDR", "VOTER", "LEADER"]);
    for node in &cluster.nodes {
        table.row(vec![
            node.id.to_string(),
            node.addr.clone(),
            or_dash(node.http_addr.as_deref()),
            if node.voter { "yes" } else { "no" }.into(),
            if cluster.leader_id == Some(node.id) { "*" } else { "" }.into(),
        ]);
    }
    out.push_str(&table.render());
    emit(&out)
}

async fn token(command: TokenCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        TokenCommand::Create { kind, ttl, quiet } => {
            let mut body = json!({ "kind": kind.as_str() });
            if let Some(ttl) = ttl {
                body["ttl_s"] = json!(ttl);
            }
            let answer = client.post(&["cluster", "tokens"], &body).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let created: CreatedToken = answer.decode()?;
            if quiet {
                return emit(&format!("{}\n", created.token));
            }
            emit(&fields(&[
                ("token", created.token),
                ("id", created.id),
                ("kind", created.kind),
                ("expires", timestamp(&created.expires_at)),
            ]))?;
            eprintln!("The token is shown only once; keep it somewhere safe until it is used.");
            Ok(())
        }
        TokenCommand::List => {
            let answer = client.get(&["cluster", "tokens"], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let tokens: Vec<TokenView> = answer.decode()?;
            if tokens.is_empty() {
                eprintln!("No join tokens; create one with `deployer cluster token create --kind agent`.");
                return Ok(());
            }
            let now = OffsetDateTime::now_utc();
            let mut table = Table::new(&["ID", "KIND", "CREATED", "EXPIRES", "STATUS"]);
            for t in tokens {
                let status = token_status(&t, now);
                table.row(vec![t.id, t.kind, timestamp(&t.created_at), timestamp(&t.expires_at), status.into()]);
            }
            emit(&table.render())
        }
        TokenCommand::Revoke { id } => {
            let answer = client.delete(&["cluster", "tokens", &id]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("revoked join token {id}\n"))
        }
    }
}

fn token_status(t: &TokenView, now: OffsetDateTime) -> &'static str {
    output::token_status(t.revoked_at.is_some(), Some(&t.expires_at), now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    #[test]
    fn token_status_follows_revocation_then_expiry() {
        let view = |expires: &str, revoked: Option<&str>| TokenView {
            id: "t".into(),
            kind: "agent".into(),
            created_at: "2020-01-01T00:00:00Z".into(),
            expires_at: expires.into(),
            revoked_at: revoked.map(Into::into),
        };
        let now = OffsetDateTime::parse("2030-01-01T00:00:00Z", &Rfc3339).unwrap();
        assert_eq!(token_status(&view("2031-01-01T00:00:00.5Z", None), now), "active");
        assert_eq!(token_status(&view("2029-01-01T00:00:00Z", None), now), "expired");
        assert_eq!(token_status(&view("2031-01-01T00:00:00Z", Some("2029-06-01T00:00:00Z")), now), "revoked");
        assert_eq!(token_status(&view("soon", None), now), "unknown");
    }
}

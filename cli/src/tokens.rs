//! `deployer tokens ...`: API tokens that act as their maker, limited to their scopes.

use clap::{Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, fields, or_dash, timestamp, token_status, Format, Table};

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Create an API token (shown only once).
    Create {
        /// What the token is for, like "ci" or "laptop".
        name: String,
        /// What the token may do; repeat or separate with commas. A token never gets a scope
        /// you do not hold.
        #[arg(long = "scope", value_enum, required = true, value_delimiter = ',')]
        scopes: Vec<Scope>,
        /// Lifetime, like 3600s, 90m, 12h or 30d (at most a year); without it the token never expires.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<u64>,
        /// Print only the token, for scripts.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List your API tokens, newest first (cluster administrators see everyone's).
    List,
    /// Revoke an API token; it is refused from then on.
    Revoke { id: String },
}

/// `read` < `deploy` < `write` < `admin`; each implies the ones before it.
#[derive(Clone, Copy, ValueEnum)]
pub enum Scope {
    /// Read anything the user may see.
    Read,
    /// Also deploy, roll back and manage previews.
    Deploy,
    /// Also create and change projects and services.
    Write,
    /// Also administer (users, the cluster, collaborators).
    Admin,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Deploy => "deploy",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// Seconds from `90`, `90s`, `15m`, `12h` or `30d`.
fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let multiplier = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d, as in 30d")),
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 3600s, 90m, 12h or 30d"))?;
    if n == 0 {
        return Err("the lifetime must be more than zero".into());
    }
    n.checked_mul(multiplier).ok_or_else(|| format!("{text} is too long"))
}

#[derive(Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    pub token: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<String>,
}

#[derive(Deserialize)]
struct TokenView {
    id: String,
    name: String,
    scopes: Vec<String>,
    user: Option<String>,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
}

/// An expiry in a table or a field.
pub fn expiry(expires_at: Option<&str>) -> String {
    expires_at.map_or("never".into(), timestamp)
}

pub async fn run(command: TokensCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        TokensCommand::Create { name, scopes, expires_in, quiet } => {
            let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            let mut body = json!({ "name": name, "scopes": scopes });
            if let Some(seconds) = expires_in {
                body["expires_in_s"] = json!(seconds);
            }
            let answer = client.post(&["tokens"], &body).await?;
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
                ("name", created.name),
                ("scopes", created.scopes.join(",")),
                ("expires", expiry(created.expires_at.as_deref())),
            ]))?;
            eprintln!("This token is not shown again; keep it somewhere safe (commands take it as DEPLOYER_TOKEN).");
            Ok(())
        }
        TokensCommand::List => {
            let answer = client.get(&["tokens"], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let tokens: Vec<TokenView> = answer.decode()?;
            if tokens.is_empty() {
                eprintln!("No API tokens; create one with `deployer tokens create NAME --scope read`.");
                return Ok(());
            }
            let now = OffsetDateTime::now_utc();
            let mut table = Table::new(&["ID", "NAME", "USER", "SCOPES", "CREATED", "EXPIRES", "STATUS"]);
            for t in tokens {
                let status = token_status(t.revoked_at.is_some(), t.expires_at.as_deref(), now);
                table.row(vec![
                    t.id,
                    t.name,
                    or_dash(t.user.as_deref()),
                    t.scopes.join(","),
                    timestamp(&t.created_at),
                    expiry(t.expires_at.as_deref()),
                    status.into(),
                ]);
            }
            emit(&table.render())
        }
        TokensCommand::Revoke { id } => {
            let answer = client.delete(&["tokens", &id]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&format!("revoked API token {id}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_take_a_unit_suffix() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("30d"), Ok(2_592_000));
        for bad in ["", "d", "0d", "1w", "-1h", "1.5h", "h1", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }
}

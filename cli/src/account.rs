//! `deployer login`, `logout` and `whoami`.
//!
//! `login` signs in with an email and password, makes an API token with every scope the user
//! holds, ends the session and saves the token in the config file (see `config.rs`); `logout`
//! revokes that token and removes it from the file.

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::client::{Answer, CliError, Client};
use crate::config::{self, Config, DEFAULT_URL};
use crate::output::{emit, emit_json, fields, yes_no, Format};
use crate::prompt;
use crate::tokens::CreatedToken;
use crate::users::UserView;

#[derive(Deserialize)]
struct Me {
    user: Option<UserView>,
    scopes: Vec<String>,
    cluster_admin: bool,
    via: String,
}

/// What `login` was given on the command line.
pub struct LoginArgs {
    /// `--url` or `DEPLOYER_URL`.
    pub url: Option<String>,
    /// Whether `--token` or `DEPLOYER_TOKEN` is set, which would win over the saved token.
    pub token_set: bool,
    pub email: Option<String>,
    pub password_stdin: bool,
}

pub async fn login(args: LoginArgs, format: Format) -> Result<(), CliError> {
    let path = config::require_path()?;
    let mut config = Config::load(&path)?;
    let url = args.url.clone().or_else(|| config.url.clone()).unwrap_or_else(|| DEFAULT_URL.into());
    let client = Client::new(&url, None)?;
    let url = client.url();

    let email = match args.email {
        Some(email) => email,
        None if args.password_stdin => {
            return Err(CliError::Usage {
                message: "--password-stdin needs --email, since stdin holds the password".into(),
                hint: Some("deployer login --email you@example.com --password-stdin".into()),
            })
        }
        None if !prompt::interactive() => return Err(prompt::not_interactive("the email")),
        None => prompt::line("Email: ").await?,
    };
    let password = if args.password_stdin {
        prompt::password_from_stdin().await?
    } else if prompt::interactive() {
        prompt::password("Password: ").await?
    } else {
        return Err(prompt::not_interactive("the password"));
    };
    if !is_loopback(&url) {
        eprintln!("warning: {url} is plain HTTP, so the password crosses the network unencrypted");
    }

    let (_, session) = client.login(&email, &password).await?;
    let session = client.with_session(session);
    let made = make_token(&session, &url, &mut config, &path).await;
    // The session was only needed to make the token.
    if let Err(e) = session.post(&["auth", "logout"], &json!({})).await {
        eprintln!("warning: the login session could not be ended ({e}); it expires by itself in a week");
    }
    let (me, created, previous) = made?;

    if let Some((token, id)) = previous {
        // The token of an earlier login here is of no more use; it revokes itself.
        let revoked = Client::new(&url, Some(token))?.delete(&["tokens", &id]).await;
        match revoked {
            // Already revoked, or expired.
            Ok(_) => {}
            Err(CliError::Api { status, .. }) if status == StatusCode::UNAUTHORIZED => {}
            Err(e) => eprintln!("warning: the previous login's token {id} could not be revoked: {e}"),
        }
    }
    if args.token_set {
        eprintln!("note: DEPLOYER_TOKEN or --token is set, and wins over the saved token; unset it to use this login");
    }

    let email = me.json["user"]["email"].as_str().unwrap_or(&email).to_string();
    if format == Format::Json {
        let out = json!({
            "url": url,
            "user": me.json["user"],
            "token": { "id": created.id, "name": created.name, "scopes": created.scopes, "expires_at": created.expires_at },
            "config": path.display().to_string(),
        });
        let text = serde_json::to_string_pretty(&out).map_err(|e| CliError::Unexpected(e.to_string()))?;
        return emit(&format!("{text}\n"));
    }
    emit(&format!(
        "logged in to {url} as {email}; token {} ({}) with scopes {} saved in {}\n",
        created.name,
        created.id,
        created.scopes.join(","),
        path.display()
    ))
}

/// Makes the CLI's token with the session and saves it; answers who logged in, the new token and
/// the previous login's token (and id), if it was for the same controller.
async fn make_token(
    session: &Client,
    url: &str,
    config: &mut Config,
    path: &std::path::Path,
) -> Result<(Answer, CreatedToken, Option<(String, String)>), CliError> {
    let me = session.get(&["me"], &[]).await?;
    let scopes = me.decode::<Me>()?.scopes;
    let name = format!("cli@{}", hostname());
    let created: CreatedToken =
        session.post(&["tokens"], &json!({ "name": name, "scopes": scopes })).await?.decode()?;

    let same_controller = config.url.as_deref().is_some_and(|u| config::same_url(u, url));
    let previous = match (config.token.take(), config.token_id.take()) {
        (Some(token), Some(id)) if same_controller => Some((token, id)),
        _ => None,
    };
    config.url = Some(url.to_string());
    config.token = Some(created.token.clone());
    config.token_id = Some(created.id.clone());
    config.email = me.json["user"]["email"].as_str().map(str::to_string);
    if let Err(e) = config.save(path) {
        // A token nobody holds is revoked rather than left behind.
        let _ = session.delete(&["tokens", &created.id]).await;
        return Err(e);
    }
    Ok((me, created, previous))
}

pub async fn logout(format: Format) -> Result<(), CliError> {
    let path = config::require_path()?;
    let mut config = Config::load(&path)?;
    let Some(token) = config.token.take() else {
        eprintln!("Not logged in: {} holds no token.", path.display());
        return Ok(());
    };
    let url = config.url.clone().unwrap_or_else(|| DEFAULT_URL.into());
    let revoked = match config.token_id.take() {
        Some(id) => {
            let client = Client::new(&url, Some(token))?.token_from_config(&path);
            match client.delete(&["tokens", &id]).await {
                Ok(_) => Some(id),
                // Revoked or expired already, or gone with a reset cluster.
                Err(CliError::Api { status, message, .. })
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::NOT_FOUND =>
                {
                    eprintln!("note: the controller no longer takes the token ({message}); removing it");
                    None
                }
                Err(e) => {
                    eprintln!("The token was not revoked, and stays in {}.", path.display());
                    return Err(e);
                }
            }
        }
        None => {
            eprintln!(
                "warning: {} names no token id, so the token could not be revoked; find it with \
                 `deployer tokens list` and revoke it with `deployer tokens revoke ID`",
                path.display()
            );
            None
        }
    };
    config.email = None;
    config.save(&path)?;
    // Like the API's 204, `--output json` prints nothing.
    match revoked {
        _ if format == Format::Json => Ok(()),
        Some(id) => emit(&format!("logged out of {url}: revoked token {id} and removed it from {}\n", path.display())),
        None => emit(&format!("logged out of {url}: removed the token from {}\n", path.display())),
    }
}

pub async fn whoami(client: &Client, format: Format) -> Result<(), CliError> {
    let answer = client.get(&["me"], &[]).await?;
    if format == Format::Json {
        return emit_json(&answer);
    }
    let me: Me = answer.decode()?;
    let user = me.user.map_or("the cluster's first admin token".into(), |u| u.email);
    let admin = if me.cluster_admin { "yes (a cluster administrator)".into() } else { yes_no(false) };
    emit(&fields(&[
        ("user", user),
        ("admin", admin),
        ("scopes", me.scopes.join(",")),
        ("via", me.via),
        ("controller", client.url()),
    ]))
}

/// This machine's name, for the name of the token `login` makes.
fn hostname() -> String {
    let from_command = std::process::Command::new("hostname")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let name = from_command
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty() && !n.chars().any(char::is_control))
        .unwrap_or_else(|| "unknown-host".into());
    // Token names are at most 100 characters.
    name.chars().take(90).collect()
}

/// Whether `url` names this machine, where plain HTTP does not leave it.
fn is_loopback(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string)) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_addresses_are_recognized() {
        for local in ["http://127.0.0.1:7700", "http://localhost:1", "http://[::1]:7700/", "http://a.localhost"] {
            assert!(is_loopback(local), "{local}");
        }
        for remote in ["http://10.0.0.1:7700", "http://deployer.example.com", "nonsense"] {
            assert!(!is_loopback(remote), "{remote}");
        }
    }
}

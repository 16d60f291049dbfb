//! `deployer deploy`, `deployer deployments ...` and `deployer logs`: deploying a service and
//! following what its deployments do.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use flate2::write::GzEncoder;
use flate2::Compression;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Answer, CliError, Client, WebSocket};
use crate::output::{emit, emit_json, fields, or_dash, pretty_json, timestamp, Format, Table};

/// `deployer deploy`'s arguments.
#[derive(Args)]
pub struct DeployArgs {
    project_id: String,
    service_id: String,
    /// The branch, or the commit (7 to 40 hex digits), to build [default: the service's branch].
    #[arg(long = "ref", value_name = "BRANCH_OR_COMMIT", conflicts_with = "upload")]
    reference: Option<String>,
    /// Deploy the files of this directory instead of the service's source (sent as a .tar.gz,
    /// without its top-level .git; symbolic links are kept as links).
    #[arg(long, value_name = "DIR")]
    upload: Option<PathBuf>,
    /// Return once the deployment is queued instead of following its log to the end.
    #[arg(long)]
    detach: bool,
}

impl DeployArgs {
    /// A deployment of the files of `dir`.
    pub fn upload(project_id: String, service_id: String, dir: PathBuf, detach: bool) -> DeployArgs {
        DeployArgs { project_id, service_id, reference: None, upload: Some(dir), detach }
    }
}

#[derive(Subcommand)]
pub enum DeploymentsCommand {
    /// List a service's deployments, newest first.
    List {
        project_id: String,
        service_id: String,
        /// At most this many (the controller's default is 50).
        #[arg(long)]
        limit: Option<u32>,
        /// Only deployments older than the one with this id (the last id of the previous page).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
    },
    /// Show one deployment: its status, what it runs and where.
    Show { deployment_id: String },
}

/// `deployer logs`'s arguments.
#[derive(Args)]
pub struct LogsArgs {
    deployment_id: String,
    /// Keep printing new lines until the deployment ends; the exit status then says how it ended.
    #[arg(long, short)]
    follow: bool,
}

/// The controller's view of a deployment.
#[derive(Deserialize)]
struct DeploymentView {
    id: String,
    #[serde(default)]
    project_id: Option<String>,
    service_id: String,
    status: String,
    attempt: i64,
    agent_id: Option<String>,
    image: Option<String>,
    commit: Option<String>,
    url: Option<String>,
    error: Option<String>,
    #[serde(default, rename = "ref")]
    reference: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    created_by: Option<String>,
    created_at: String,
    #[serde(default)]
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl DeploymentView {
    /// Whether the deployment has reached a status it does not leave by itself.
    fn ended(&self) -> bool {
        !matches!(self.status.as_str(), "queued" | "building" | "deploying")
    }

    fn fields(&self) -> String {
        let at = |t: &Option<String>| t.as_deref().map_or("-".into(), timestamp);
        fields(&[
            ("id", self.id.clone()),
            ("project", or_dash(self.project_id.as_deref())),
            ("service", self.service_id.clone()),
            ("status", self.status.clone()),
            ("attempt", self.attempt.to_string()),
            ("source", or_dash(self.source.as_deref())),
            ("ref", or_dash(self.reference.as_deref())),
            ("commit", or_dash(self.commit.as_deref())),
            ("image", or_dash(self.image.as_deref())),
            ("agent", or_dash(self.agent_id.as_deref())),
            ("url", or_dash(self.url.as_deref())),
            ("error", or_dash(self.error.as_deref())),
            ("created_by", or_dash(self.created_by.as_deref())),
            ("created", timestamp(&self.created_at)),
            ("started", at(&self.started_at)),
            ("finished", at(&self.finished_at)),
        ])
    }

    /// How it ended, for people: a line to print when it runs, else the error to exit with.
    fn outcome(&self, hint: Option<String>) -> Result<String, CliError> {
        let id = &self.id;
        let message = match self.status.as_str() {
            "running" => {
                return Ok(match self.url.as_deref().filter(|u| !u.is_empty()) {
                    Some(url) => format!("deployment {id} is running at {url}\n"),
                    None => format!("deployment {id} is running\n"),
                })
            }
            "failed" => format!("deployment {id} failed: {}", self.error.as_deref().unwrap_or("no reason given")),
            "cancelled" => format!("deployment {id} was cancelled"),
            "superseded" => format!("deployment {id} was superseded by a newer deployment of its service"),
            other => format!("deployment {id} ended with status {other}"),
        };
        Err(CliError::Failed { message, hint })
    }
}

/// One line of a deployment's log, from the logs WebSocket or `GET .../logs` (which adds `n`).
#[derive(Deserialize)]
struct LogLine {
    #[serde(default)]
    n: Option<i64>,
    level: String,
    message: String,
    timestamp: String,
    phase: String,
}

/// The widest phase (`schedule`), so messages line up.
const PHASE_WIDTH: usize = 8;

/// `HH:MM:SS.mmm phase     message` (the time in UTC), warnings and errors marked; the lines of
/// a multi-line message are indented under the first, and control characters cannot reach the
/// terminal.
fn format_line(line: &LogLine) -> String {
    let marker = match line.level.as_str() {
        "warn" | "warning" => "warn: ",
        "error" => "error: ",
        _ => "",
    };
    let prefix = format!("{} {:<PHASE_WIDTH$}  ", clock(&line.timestamp), line.phase);
    let indent = " ".repeat(prefix.chars().count());
    let mut out = String::new();
    for (i, part) in line.message.trim_end_matches(['\n', '\r']).split('\n').enumerate() {
        let part: String = part
            .trim_end_matches('\r')
            .chars()
            .map(|c| if c.is_control() && c != '\t' { '\u{fffd}' } else { c })
            .collect();
        if i == 0 {
            out.push_str(&format!("{prefix}{marker}{part}\n"));
        } else {
            out.push_str(&format!("{indent}{part}\n"));
        }
    }
    out
}

/// `HH:MM:SS.mmm` in UTC of an API timestamp; anything unparsable as sent.
fn clock(s: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    let format = time::macros::format_description!("[hour]:[minute]:[second].[subsecond digits:3]");
    time::OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&format).ok())
        .unwrap_or_else(|| s.to_string())
}

/// A gzip-compressed tar of a directory's tree, paths relative to it.
#[derive(Default)]
struct Tarball {
    bytes: Vec<u8>,
    /// Files, directories and links in it.
    entries: usize,
    /// What a tar cannot hold (sockets, fifos, devices), left out.
    skipped: Vec<PathBuf>,
}

/// `dir` packed for an upload; a `dir` that is not a directory is a usage error.
fn pack(dir: &Path) -> Result<Tarball, CliError> {
    let usage = |message: String| CliError::Usage {
        message,
        hint: Some("pass the directory that holds the source (and its Dockerfile), as in --upload .".into()),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(usage(format!("cannot upload {}: it is not a directory", dir.display()))),
        Err(e) => return Err(usage(format!("cannot upload {}: {e}", dir.display()))),
    }
    tarball(dir).map_err(|e| CliError::Failed { message: format!("cannot pack {}: {e}", dir.display()), hint: None })
}

/// Packs `dir`'s tree without its top-level `.git`, storing symbolic links as links (never
/// following them), in name order so the same tree makes the same list.
fn tarball(dir: &Path) -> std::io::Result<Tarball> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    builder.follow_symlinks(false);
    let mut tarball = Tarball::default();
    add_tree(&mut builder, dir, Path::new(""), &mut tarball)?;
    tarball.bytes = builder.into_inner()?.finish()?;
    Ok(tarball)
}

fn add_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    relative: &Path,
    tarball: &mut Tarball,
) -> std::io::Result<()> {
    let here = root.join(relative);
    let with_path = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", here.display()));
    let mut entries = std::fs::read_dir(&here).and_then(Iterator::collect::<Result<Vec<_>, _>>).map_err(with_path)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if relative.as_os_str().is_empty() && entry.file_name() == ".git" {
            continue;
        }
        let name = relative.join(entry.file_name());
        // The entry's own type: a link to a directory is a link, not a directory.
        let kind = entry.file_type().map_err(with_path)?;
        if kind.is_dir() || kind.is_file() || kind.is_symlink() {
            builder.append_path_with_name(entry.path(), &name)?;
            tarball.entries += 1;
        } else {
            tarball.skipped.push(name.clone());
        }
        if kind.is_dir() {
            add_tree(builder, root, &name, tarball)?;
        }
    }
    Ok(())
}

/// How long to wait before opening the logs WebSocket again, and how many times in a row.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
const RECONNECTS: u32 = 5;
/// The controller pings every 20 s: this long without a frame means the connection is gone.
const SILENCE: Duration = Duration::from_secs(65);

/// How a logs WebSocket ended.
enum Ending {
    /// The controller closed it (1000): the deployment has ended.
    Closed,
    /// The connection went away first.
    Dropped(String),
}

/// Follows a deployment's log over the WebSocket until the deployment ends, handing each line's
/// JSON to `print` once however often the socket must be reopened (the controller sends every
/// line from the first each time); then reads the deployment as it ended.
async fn follow(
    client: &Client,
    id: &str,
    reconnect_delay: Duration,
    print: &mut impl FnMut(&str) -> Result<(), CliError>,
) -> Result<(Answer, DeploymentView), CliError> {
    let mut shown = 0usize;
    let mut failures = 0u32;
    loop {
        let before = shown;
        let ending = match client.websocket(&["ws", "deployments", id, "logs"]).await {
            Ok(socket) => read_lines(socket, &mut shown, print).await?,
            Err(e) if transient(&e) => Ending::Dropped(e.to_string()),
            Err(e) => return Err(e),
        };
        let reason = match ending {
            Ending::Closed => {
                let answer = client.get(&["deployments", id], &[]).await?;
                let deployment: DeploymentView = answer.decode()?;
                if deployment.ended() {
                    return Ok((answer, deployment));
                }
                // The controller closes only at the end; a view that lags is read again shortly.
                format!("the log stream ended while the deployment is {}", deployment.status)
            }
            Ending::Dropped(reason) => reason,
        };
        // Reconnects are counted in a row: a connection that brought new lines starts over.
        failures = if shown > before { 1 } else { failures + 1 };
        if failures > RECONNECTS {
            return Err(CliError::Failed {
                message: format!("lost the log stream of deployment {id}: {reason}"),
                hint: Some(format!("the deployment goes on; follow it with deployer logs -f {id}")),
            });
        }
        eprintln!("warning: {reason}; reconnecting ({failures}/{RECONNECTS})");
        tokio::time::sleep(reconnect_delay).await;
    }
}

/// Whether opening the socket may work if tried again.
fn transient(e: &CliError) -> bool {
    match e {
        CliError::Unreachable { .. } => true,
        CliError::Api { status, .. } => status.as_u16() == 503,
        _ => false,
    }
}

/// Reads one socket to its end, printing the lines after the first `*shown`.
async fn read_lines(
    mut socket: WebSocket,
    shown: &mut usize,
    print: &mut impl FnMut(&str) -> Result<(), CliError>,
) -> Result<Ending, CliError> {
    let mut received = 0usize;
    loop {
        let message = match tokio::time::timeout(SILENCE, socket.next()).await {
            Err(_) => return Ok(Ending::Dropped(format!("the log stream was silent for {} s", SILENCE.as_secs()))),
            Ok(None) => return Ok(Ending::Dropped("the log stream closed early".into())),
            Ok(Some(Err(e))) => return Ok(Ending::Dropped(format!("the log stream broke: {e}"))),
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Text(text) => {
                received += 1;
                if received > *shown {
                    *shown = received;
                    print(text.as_str())?;
                }
            }
            Message::Close(frame) => {
                // Sends the reply the close handshake wants; the socket is done either way.
                let _ = tokio::time::timeout(Duration::from_secs(1), futures::SinkExt::close(&mut socket)).await;
                return Ok(match frame {
                    Some(f) if f.code == CloseCode::Normal => Ending::Closed,
                    Some(f) => Ending::Dropped(format!("the log stream closed ({}: {})", u16::from(f.code), f.reason)),
                    None => Ending::Dropped("the log stream closed without a reason".into()),
                });
            }
            // tungstenite answers pings itself.
            _ => {}
        }
    }
}

/// How `follow` shows each line.
fn line_printer(format: Format, quiet: bool) -> impl FnMut(&str) -> Result<(), CliError> {
    move |text: &str| match (format, quiet) {
        (_, true) => Ok(()),
        (Format::Json, false) => emit(&format!("{}\n", text.trim())),
        (Format::Table, false) => match serde_json::from_str::<LogLine>(text) {
            Ok(line) => emit(&format_line(&line)),
            Err(_) => emit(&format!("{}\n", text.trim())),
        },
    }
}

/// [`follow`], until Ctrl-C, which stops following (exit 130) but not the deployment.
async fn follow_until_interrupted(
    client: &Client,
    id: &str,
    mut print: impl FnMut(&str) -> Result<(), CliError>,
) -> Result<(Answer, DeploymentView), CliError> {
    tokio::select! {
        outcome = follow(client, id, RECONNECT_DELAY, &mut print) => outcome,
        () = crate::interrupted() => {
            eprintln!();
            eprintln!("hint: the deployment goes on; follow it with deployer logs -f {id}");
            std::process::exit(130);
        }
    }
}

pub async fn deploy(args: DeployArgs, client: &Client, format: Format) -> Result<(), CliError> {
    let DeployArgs { project_id, service_id, reference, upload, detach } = args;
    let answer = match upload {
        Some(dir) => {
            let tarball = pack(&dir)?;
            for skipped in &tarball.skipped {
                eprintln!("warning: left out {}: not a file, directory or symbolic link", skipped.display());
            }
            if format == Format::Table {
                eprintln!(
                    "Uploading {} ({} entries, {} bytes compressed)...",
                    dir.display(),
                    tarball.entries,
                    tarball.bytes.len()
                );
            }
            let path = ["projects", &project_id, "services", &service_id, "upload"];
            client.post_bytes(&path, "application/gzip", tarball.bytes).await?
        }
        None => {
            let body = match reference {
                Some(reference) => json!({ "ref": reference }),
                None => json!({}),
            };
            client.post(&["projects", &project_id, "services", &service_id, "deploy"], &body).await?
        }
    };
    follow_new(answer, detach, client, format).await
}

/// `deployer rollback`'s arguments.
#[derive(Args)]
pub struct RollbackArgs {
    project_id: String,
    service_id: String,
    /// The deployment whose image to run again [default: the newest one before the current
    /// release that ran healthy].
    #[arg(long, value_name = "DEPLOYMENT_ID")]
    to: Option<String>,
    /// Return once the deployment is queued instead of following its log to the end.
    #[arg(long)]
    detach: bool,
}

pub async fn rollback(args: RollbackArgs, client: &Client, format: Format) -> Result<(), CliError> {
    let RollbackArgs { project_id, service_id, to, detach } = args;
    let body = match to {
        Some(id) => json!({ "deployment_id": id }),
        None => json!({}),
    };
    let answer = client.post(&["projects", &project_id, "services", &service_id, "rollback"], &body).await?;
    follow_new(answer, detach, client, format).await
}

/// Prints a new deployment, or follows it to its end.
async fn follow_new(answer: Answer, detach: bool, client: &Client, format: Format) -> Result<(), CliError> {
    let deployment: DeploymentView = answer.decode()?;
    if detach {
        if format == Format::Json {
            return emit_json(&answer);
        }
        emit(&deployment.fields())?;
        eprintln!("Follow it with `deployer logs -f {}`.", deployment.id);
        return Ok(());
    }
    if format == Format::Table {
        eprintln!(
            "Deployment {} is {}; following its log (Ctrl-C stops following, not the deployment).",
            deployment.id, deployment.status
        );
    }
    let quiet = format == Format::Json;
    let (answer, ended) = follow_until_interrupted(client, &deployment.id, line_printer(format, quiet)).await?;
    if format == Format::Json {
        emit_json(&answer)?;
        return ended.outcome(Some(format!("its log: deployer logs {}", ended.id))).map(drop);
    }
    emit(&ended.outcome(None)?)
}

/// Most lines `GET .../logs` answers at once.
const LOG_PAGE: usize = 10_000;

pub async fn logs(args: LogsArgs, client: &Client, format: Format) -> Result<(), CliError> {
    let LogsArgs { deployment_id: id, follow } = args;
    if follow {
        let (_, ended) = follow_until_interrupted(client, &id, line_printer(format, false)).await?;
        let running = ended.outcome(None)?;
        return match format {
            // stdout holds the lines' JSON only.
            Format::Json => {
                eprint!("{running}");
                Ok(())
            }
            Format::Table => emit(&running),
        };
    }
    let mut pages = Vec::new();
    let mut lines: Vec<LogLine> = Vec::new();
    loop {
        let mut query = vec![("limit", LOG_PAGE.to_string())];
        if let Some(after) = lines.last().and_then(|l| l.n) {
            query.push(("after", after.to_string()));
        }
        let answer = client.get(&["deployments", &id, "logs"], &query).await?;
        let page: Vec<LogLine> = answer.decode()?;
        let full = page.len() == LOG_PAGE && page.last().is_some_and(|l| l.n.is_some());
        lines.extend(page);
        pages.push(answer);
        if !full {
            break;
        }
    }
    if format == Format::Json {
        return match pages.as_slice() {
            [page] => emit_json(page),
            _ => emit(&format!("{}\n", pretty_json(&join_arrays(&pages)))),
        };
    }
    if lines.is_empty() {
        eprintln!("No log lines for deployment {id} yet; follow it with `deployer logs -f {id}`.");
        return Ok(());
    }
    emit(&lines.iter().map(format_line).collect::<String>())
}

/// The JSON arrays of several answers as one, the API's text kept as sent.
fn join_arrays(pages: &[Answer]) -> String {
    let inner: Vec<&str> = pages
        .iter()
        .map(|p| p.raw.trim().trim_start_matches('[').trim_end_matches(']').trim())
        .filter(|s| !s.is_empty())
        .collect();
    format!("[{}]", inner.join(","))
}

pub async fn run(command: DeploymentsCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        DeploymentsCommand::List { project_id, service_id, limit, before } => {
            let mut query = Vec::new();
            if let Some(limit) = limit {
                query.push(("limit", limit.to_string()));
            }
            if let Some(before) = before {
                query.push(("before", before));
            }
            let answer = client.get(&["projects", &project_id, "services", &service_id, "deployments"], &query).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let deployments: Vec<DeploymentView> = answer.decode()?;
            if deployments.is_empty() {
                eprintln!(
                    "No deployments of service {service_id}; deploy it with `deployer deploy {project_id} {service_id}`."
                );
                return Ok(());
            }
            let mut table = Table::new(&["ID", "STATUS", "ATTEMPT", "COMMIT", "IMAGE", "URL", "CREATED"]);
            for d in deployments {
                let commit = d.commit.as_deref().map(|c| c.chars().take(12).collect::<String>());
                table.row(vec![
                    d.id,
                    d.status,
                    d.attempt.to_string(),
                    or_dash(commit.as_deref()),
                    or_dash(d.image.as_deref()),
                    or_dash(d.url.as_deref()),
                    timestamp(&d.created_at),
                ]);
            }
            emit(&table.render())
        }
        DeploymentsCommand::Show { deployment_id } => {
            let answer = client.get(&["deployments", &deployment_id], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            emit(&answer.decode::<DeploymentView>()?.fields())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn line(level: &str, message: &str, timestamp: &str, phase: &str) -> LogLine {
        LogLine {
            n: None,
            level: level.into(),
            message: message.into(),
            timestamp: timestamp.into(),
            phase: phase.into(),
        }
    }

    #[test]
    fn log_lines_show_the_time_the_phase_and_marked_levels() {
        let info = line("info", "Step 1/7 : FROM node:22", "2026-11-26T18:05:54.4Z", "build");
        assert_eq!(format_line(&info), "18:05:54.400 build     Step 1/7 : FROM node:22\n");
        let warn = line("warn", "retrying\n", "2026-11-26T19:05:54.123+01:00", "schedule");
        assert_eq!(format_line(&warn), "18:05:54.123 schedule  warn: retrying\n");
        let error = line("error", "exit code 1", "2026-11-26T18:05:54Z", "health");
        assert_eq!(format_line(&error), "18:05:54.000 health    error: exit code 1\n");
        let odd = line("debug", "a\nb\x1b[2J\r\n", "later", "run");
        assert_eq!(format_line(&odd), "later run       a\n                b\u{fffd}[2J\n");
    }

    #[test]
    fn log_lines_decode_from_the_socket_and_the_listing() {
        let socket: LogLine = serde_json::from_str(
            r#"{"level":"info","message":"m","timestamp":"2026-11-26T18:05:54.4Z","phase":"source","step":null}"#,
        )
        .unwrap();
        assert_eq!(socket.n, None);
        let listed: LogLine = serde_json::from_str(
            r#"{"n":7,"level":"info","message":"m","timestamp":"t","phase":"run","step":"x","attempt":2}"#,
        )
        .unwrap();
        assert_eq!(listed.n, Some(7));
    }

    #[cfg(unix)]
    #[test]
    fn the_tarball_holds_the_tree_without_git_and_keeps_links() {
        use std::collections::BTreeMap;
        use std::io::Read;

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::create_dir_all(root.join("src/nested")).unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
        std::fs::write(root.join("src/nested/.keep"), "").unwrap();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::os::unix::fs::symlink("src/main.rs", root.join("main-link")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("outside")).unwrap();

        let packed = tarball(root).unwrap();
        assert_eq!(&packed.bytes[..2], &[0x1f, 0x8b], "gzip-compressed");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(packed.bytes.as_slice()));
        let mut found = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
            let what = match entry.header().entry_type() {
                tar::EntryType::Symlink => format!("-> {}", entry.link_name().unwrap().unwrap().display()),
                tar::EntryType::Directory => "dir".into(),
                tar::EntryType::Regular => {
                    let mut text = String::new();
                    entry.read_to_string(&mut text).unwrap();
                    format!("file {text:?}")
                }
                other => format!("{other:?}"),
            };
            found.insert(path, what);
        }
        let expected: BTreeMap<String, String> = [
            ("Dockerfile", "file \"FROM scratch\\n\""),
            ("main-link", "-> src/main.rs"),
            ("outside", "-> /etc"),
            ("src", "dir"),
            ("src/main.rs", "file \"fn main() {}\\n\""),
            ("src/nested", "dir"),
            ("src/nested/.keep", "file \"\""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(found, expected);
        assert_eq!(packed.entries, expected.len());
        assert!(packed.skipped.is_empty());
    }

    #[test]
    fn only_a_directory_is_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.tar.gz");
        std::fs::write(&file, "x").unwrap();
        let e = pack(&file).err().expect("a file is refused");
        assert!(e.to_string().contains("is not a directory"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = pack(&dir.path().join("missing")).err().expect("a missing path is refused");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn outcomes_say_how_a_deployment_ended() {
        let view = |status: &str| -> DeploymentView {
            serde_json::from_value(json!({
                "id": "d1", "project_id": "p1", "service_id": "s1", "status": status, "attempt": 1,
                "agent_id": null, "image": null, "commit": null, "url": "http://web.localhost",
                "error": "build failed: exit code 2", "ref": null, "source": "git", "created_by": "user:u1",
                "created_at": "2026-11-26T18:05:54Z", "started_at": null, "finished_at": null
            }))
            .unwrap()
        };
        assert_eq!(view("running").outcome(None).unwrap(), "deployment d1 is running at http://web.localhost\n");
        let failed = view("failed").outcome(None).err().unwrap();
        assert_eq!(failed.to_string(), "deployment d1 failed: build failed: exit code 2");
        assert_eq!(failed.exit_code(), 1);
        assert!(view("cancelled").outcome(None).is_err());
        assert!(view("superseded").outcome(None).is_err());
        assert!(!view("building").ended() && !view("queued").ended() && view("superseded").ended());
    }

    #[test]
    fn log_pages_join_into_one_array() {
        let page = |raw: &str| Answer { raw: raw.into(), json: serde_json::from_str(raw).unwrap() };
        let joined = join_arrays(&[page(r#"[{"n":1},{"n":2}]"#), page("[ ]"), page(r#" [{"n":3}] "#)]);
        assert_eq!(joined, r#"[{"n":1},{"n":2},{"n":3}]"#);
    }

    /// What the fake controller's logs WebSocket does on one connection.
    struct Script {
        lines: Vec<String>,
        close: bool,
    }

    /// A controller that answers the logs WebSocket by `scripts` (dropping connections once they
    /// are used up), and any other request with `deployment`.
    async fn fake_controller(scripts: Vec<Script>, deployment: Value) -> (String, tokio::task::JoinHandle<()>) {
        use futures::SinkExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut scripts = scripts.into_iter();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = [0u8; 32];
                let mut seen = 0;
                while seen < 16 {
                    seen = stream.peek(&mut head).await.unwrap();
                }
                if !head.starts_with(b"GET /api/v1/ws/") {
                    let mut request = Vec::new();
                    while !request.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8; 1];
                        stream.read_exact(&mut byte).await.unwrap();
                        request.push(byte[0]);
                    }
                    let body = deployment.to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(response.as_bytes()).await.unwrap();
                    continue;
                }
                let Some(script) = scripts.next() else { continue };
                let check = |request: &Request, response: Response| {
                    assert_eq!(request.headers()["authorization"], "Bearer t0ken");
                    assert_eq!(request.uri().path(), "/api/v1/ws/deployments/d1/logs");
                    Ok(response)
                };
                let mut socket = tokio_tungstenite::accept_hdr_async(stream, check).await.unwrap();
                for line in script.lines {
                    socket.send(Message::text(line)).await.unwrap();
                }
                if script.close {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "the deployment ended".into() };
                    socket.send(Message::Close(Some(frame))).await.unwrap();
                    while let Some(Ok(_)) = socket.next().await {}
                }
            }
        });
        (url, server)
    }

    fn ws_line(i: usize) -> String {
        json!({"level": "info", "message": format!("line {i}"), "timestamp": "2026-11-26T18:05:54Z",
               "phase": "build", "step": null})
        .to_string()
    }

    fn ended(status: &str) -> Value {
        json!({"id": "d1", "project_id": "p1", "service_id": "s1", "status": status, "attempt": 1,
               "agent_id": "a1", "image": "img", "commit": null, "url": "http://web.localhost", "error": null,
               "ref": null, "source": "image", "created_by": "user:u1", "created_at": "2026-11-26T18:05:54Z",
               "started_at": null, "finished_at": null})
    }

    #[tokio::test]
    async fn a_dropped_log_stream_resumes_without_repeating_lines() {
        let scripts = vec![
            Script { lines: (1..=3).map(ws_line).collect(), close: false },
            Script { lines: (1..=2).map(ws_line).collect(), close: false },
            Script { lines: (1..=5).map(ws_line).collect(), close: true },
        ];
        let (url, server) = fake_controller(scripts, ended("running")).await;
        let client = Client::new(&url, Some("t0ken".into())).unwrap();
        let mut printed = Vec::new();
        let mut print = |text: &str| {
            printed.push(serde_json::from_str::<LogLine>(text).unwrap().message);
            Ok(())
        };
        let (_, deployment) = follow(&client, "d1", Duration::from_millis(10), &mut print).await.unwrap();
        server.abort();
        assert_eq!(printed, ["line 1", "line 2", "line 3", "line 4", "line 5"]);
        assert_eq!(deployment.status, "running");
    }

    #[tokio::test]
    async fn a_log_stream_that_keeps_dropping_is_given_up() {
        let scripts = (0..10).map(|_| Script { lines: vec![ws_line(1)], close: false }).collect();
        let (url, server) = fake_controller(scripts, ended("running")).await;
        let client = Client::new(&url, Some("t0ken".into())).unwrap();
        let mut count = 0;
        let mut print = |_: &str| {
            count += 1;
            Ok(())
        };
        let e = follow(&client, "d1", Duration::from_millis(10), &mut print).await.err().unwrap();
        server.abort();
        assert!(e.to_string().starts_with("lost the log stream of deployment d1"), "{e}");
        assert_eq!(count, 1, "the line is printed once");
    }
}

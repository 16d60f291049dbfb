//! Questions on the terminal: prompts on stderr, answers from stdin, passwords without echo.
//!
//! Echo is turned off with `stty -echo` (the terminal is stdin, which `stty` inherits), so the CLI
//! needs no terminal library. Reads run on a blocking thread so Ctrl-C is still handled while one
//! waits; `main` then calls [`restore_terminal`] before it exits.

use std::io::{IsTerminal, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::client::CliError;

/// Whether this process turned echo off and has not turned it back on.
static ECHO_OFF: AtomicBool = AtomicBool::new(false);

/// Whether a person can be asked: stdin is a terminal.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal()
}

/// The usage error for a secret that can only come from a terminal or from `--password-stdin`.
pub fn not_interactive(what: &str) -> CliError {
    CliError::Usage {
        message: format!("stdin is not a terminal, so {what} cannot be asked for"),
        hint: Some("pass --password-stdin and write the password to stdin, as in `... --password-stdin < file`".into()),
    }
}

/// Asks on stderr and reads one line from stdin, shown as typed.
pub async fn line(question: &str) -> Result<String, CliError> {
    ask(question);
    let answer = read_line().await?;
    Ok(answer.trim().to_string())
}

/// Asks on stderr and reads one line from the terminal with echo turned off.
pub async fn password(question: &str) -> Result<String, CliError> {
    let answer = hidden(question).await?;
    if answer.is_empty() {
        return Err(CliError::Failed { message: "no password was given".into(), hint: None });
    }
    Ok(answer)
}

/// Asks on stderr and reads one line from the terminal with echo turned off; it may be empty.
pub async fn hidden(question: &str) -> Result<String, CliError> {
    ask(question);
    stty("-echo")?;
    ECHO_OFF.store(true, Ordering::SeqCst);
    let answer = read_line().await;
    restore_terminal();
    // The Enter the user typed was not echoed either.
    eprintln!();
    answer
}

/// All of stdin, without the one line ending a file or `echo` adds (`--password-stdin`).
pub async fn password_from_stdin() -> Result<String, CliError> {
    let password = value_from_stdin().await?;
    if password.is_empty() {
        return Err(CliError::Usage {
            message: "--password-stdin was given, but stdin held no password".into(),
            hint: Some("write the password to stdin, as in `printf '%s' \"$PASSWORD\" | deployer ...`".into()),
        });
    }
    Ok(password)
}

/// All of stdin, without the one line ending a file or `echo` adds; it may be empty.
pub async fn value_from_stdin() -> Result<String, CliError> {
    let read = tokio::task::spawn_blocking(|| {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map(|_| text)
    });
    let text = read.await.map_err(|e| stdin_failed(e.into()))?.map_err(stdin_failed)?;
    let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    Ok(value.to_string())
}

/// Turns echo back on if this process turned it off (also after Ctrl-C, from `main`).
pub fn restore_terminal() {
    if ECHO_OFF.swap(false, Ordering::SeqCst) {
        let _ = stty("echo");
    }
}

fn ask(question: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{question}").and_then(|()| err.flush());
}

/// One line from stdin, without its line ending; the end of input is an error.
async fn read_line() -> Result<String, CliError> {
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|n| (n, line))
    });
    let (n, line) = read.await.map_err(|e| stdin_failed(e.into()))?.map_err(stdin_failed)?;
    if n == 0 {
        return Err(CliError::Failed { message: "stdin ended before an answer was given".into(), hint: None });
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn stdin_failed(e: std::io::Error) -> CliError {
    CliError::Failed { message: format!("cannot read stdin: {e}"), hint: None }
}

fn stty(setting: &str) -> Result<(), CliError> {
    let cannot = |reason: String| CliError::Failed {
        message: format!("cannot turn terminal echo {}: {reason}", if setting == "echo" { "on" } else { "off" }),
        hint: Some("pass --password-stdin and write the password to stdin instead".into()),
    };
    let status = Command::new("stty")
        .arg(setting)
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| cannot(format!("cannot run stty: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(cannot(format!("stty {setting} failed ({status})")))
    }
}

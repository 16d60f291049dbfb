//! `deployer`: the command-line client of the Deployer HTTP API (DESIGN.md section 6).

mod agents;
mod client;
mod cluster;
mod output;
mod projects;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use agents::AgentsCommand;
use client::{CliError, Client};
use cluster::ClusterCommand;
use output::{emit, emit_json, Format};
use projects::ProjectsCommand;

/// Command-line client of a Deployer cluster.
#[derive(Parser)]
#[command(name = "deployer", version, about)]
struct Cli {
    /// The controller's HTTP API address.
    #[arg(long, global = true, env = "DEPLOYER_URL", default_value = "http://127.0.0.1:7700")]
    url: String,
    /// API token (a new cluster's admin token is in <data-dir>/admin-token).
    #[arg(long, global = true, env = "DEPLOYER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How to print answers.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The controller cluster: status and join tokens.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Agents: the Docker hosts that run services.
    #[command(alias = "nodes")]
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Projects: groups of services.
    Projects {
        #[command(subcommand)]
        command: ProjectsCommand,
    },
    /// Check that the controller answers (needs no token).
    Health,
    /// Print a shell completion script.
    ///
    /// For example: `deployer completions bash > /etc/bash_completion.d/deployer`.
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    // Made on first use, so a bad DEPLOYER_URL does not get in the way of `completions`.
    let client = || Client::new(&cli.url, cli.token.clone());
    match cli.command {
        Command::Cluster { command } => cluster::run(command, &client()?, cli.output).await,
        Command::Projects { command } => projects::run(command, &client()?, cli.output).await,
        Command::Agents { command } => agents::run(command, &client()?, cli.output).await,
        Command::Health => {
            let answer = client()?.get_public(&["health"]).await?;
            if cli.output == Format::Json {
                return emit_json(&answer);
            }
            match answer.json.get("status").and_then(|s| s.as_str()) {
                Some(status) => emit(&format!("{status} ({})\n", cli.url.trim_end_matches('/'))),
                None => Err(CliError::Unexpected(format!("unexpected health answer: {}", answer.raw.trim()))),
            }
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "deployer", &mut script);
            emit(&String::from_utf8_lossy(&script))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;

    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}

//! `deployer`: the command-line client of the Deployer HTTP API (DESIGN.md section 6).

mod account;
mod agents;
mod audit;
mod client;
mod cluster;
mod collaborators;
mod config;
mod deployments;
mod env;
mod output;
mod previews;
mod projects;
mod prompt;
mod secrets;
mod services;
mod tokens;
mod up;
mod users;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use agents::AgentsCommand;
use audit::AuditArgs;
use client::CliError;
use cluster::ClusterCommand;
use collaborators::CollaboratorsCommand;
use deployments::{DeployArgs, DeploymentsCommand, LogsArgs};
use env::EnvCommand;
use output::{emit, emit_json, Format};
use projects::ProjectsCommand;
use secrets::SecretsCommand;
use services::ServicesCommand;
use tokens::TokensCommand;
use users::UsersCommand;

/// Command-line client of a Deployer cluster.
#[derive(Parser)]
#[command(name = "deployer", version, about)]
struct Cli {
    /// The controller's HTTP API address [default: the one `deployer login` saved, else http://127.0.0.1:7700].
    #[arg(long, global = true, env = "DEPLOYER_URL")]
    url: Option<String>,
    /// API token [default: the one `deployer login` saved] (a new cluster's admin token is in
    /// <data-dir>/admin-token).
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
    /// Services: what a project runs, built from git, an image or uploads.
    Services {
        #[command(subcommand)]
        command: ServicesCommand,
    },
    /// A service's environment variables.
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// A service's secrets: set from the command line or stdin, never shown.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Deploy a service from its source (or a local directory), and follow the deployment's log
    /// until it runs or fails.
    ///
    /// The exit status says how it ended: 0 once it runs, 1 if it failed, was cancelled or was
    /// superseded, 130 on Ctrl-C (which stops following, not the deployment).
    #[command(after_help = "Examples:\n  \
        deployer deploy $PROJECT $SERVICE --ref main\n  \
        deployer deploy $PROJECT $SERVICE --upload . --detach")]
    Deploy(DeployArgs),
    /// Deploy a directory with a Dockerfile in one step: its project and service (an upload
    /// service) are made first if missing; follows the log and prints where it answers.
    ///
    /// For example, with `deployer-controller dev` running: `deployer up examples/hello`.
    Up(up::UpArgs),
    /// Run an earlier release of a service again, without a build: the one before the current
    /// release that ran healthy, or `--to` a given deployment. Follows it like `deploy`.
    Rollback(deployments::RollbackArgs),
    /// A service's deployments: list and show.
    Deployments {
        #[command(subcommand)]
        command: DeploymentsCommand,
    },
    /// Print a deployment's log, or follow it live with -f.
    Logs(LogsArgs),
    /// A project's preview environments (pull requests get theirs from the git webhooks): list,
    /// create for a branch, delete, turn on or off.
    Previews {
        #[command(subcommand)]
        command: previews::PreviewsCommand,
    },
    /// Log in with an email and password, and save an API token for the CLI.
    ///
    /// The token (named cli@<hostname>, with every scope you hold) and the controller's URL are saved
    /// in $DEPLOYER_CONFIG, else $XDG_CONFIG_HOME/deployer/config.json, else
    /// ~/.config/deployer/config.json (mode 0600). DEPLOYER_URL, DEPLOYER_TOKEN, --url and --token
    /// win over the file.
    Login {
        /// Asked for when not given.
        #[arg(long)]
        email: Option<String>,
        /// Read the password from stdin instead of asking (for scripts).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Revoke the token `deployer login` saved, and remove it from the config file.
    Logout,
    /// Show whom the token acts as, and what it may do.
    Whoami,
    /// Users who may log in (cluster administrators only).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// API tokens: create, list and revoke.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Project collaborators and their roles.
    Collaborators {
        #[command(subcommand)]
        command: CollaboratorsCommand,
    },
    /// The audit log: who did what, when and from where, newest first.
    Audit(AuditArgs),
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
    // Only commands that may ask for a password handle Ctrl-C (once a handler is installed, SIGINT
    // no longer just ends the process, even when the shell meant it to be ignored).
    let outcome = if cli.command.may_prompt() {
        runtime.block_on(async {
            tokio::select! {
                outcome = run(cli) => outcome,
                () = interrupted() => {
                    // Echo may be off mid-prompt; a blocked read of stdin would keep the runtime
                    // from shutting down, so exit here.
                    prompt::restore_terminal();
                    eprintln!();
                    std::process::exit(130);
                }
            }
        })
    } else {
        runtime.block_on(run(cli))
    };
    match outcome {
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

impl Command {
    fn may_prompt(&self) -> bool {
        matches!(
            self,
            Command::Login { .. }
                | Command::Users { command: UsersCommand::Create { .. } }
                | Command::Services { command: ServicesCommand::Create(_) }
                | Command::Secrets { command: SecretsCommand::Set { .. } }
        )
    }
}

/// Ctrl-C; never, if it cannot be listened for.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    // Made on first use, so a bad DEPLOYER_URL or config file does not get in the way of `completions`.
    let client = || config::client(cli.url.as_deref(), cli.token.as_deref());
    let format = cli.output;
    match cli.command {
        Command::Cluster { command } => cluster::run(command, &client()?, format).await,
        Command::Projects { command } => projects::run(command, &client()?, format).await,
        Command::Services { command } => services::run(command, &client()?, format).await,
        Command::Env { command } => env::run(command, &client()?, format).await,
        Command::Secrets { command } => secrets::run(command, &client()?, format).await,
        Command::Deploy(args) => deployments::deploy(args, &client()?, format).await,
        Command::Up(args) => up::up(args, &client()?, format).await,
        Command::Rollback(args) => deployments::rollback(args, &client()?, format).await,
        Command::Deployments { command } => deployments::run(command, &client()?, format).await,
        Command::Logs(args) => deployments::logs(args, &client()?, format).await,
        Command::Previews { command } => previews::run(command, &client()?, format).await,
        Command::Agents { command } => agents::run(command, &client()?, format).await,
        Command::Login { email, password_stdin } => {
            let token_set = cli.token.as_deref().is_some_and(|t| !t.trim().is_empty());
            let args = account::LoginArgs { url: cli.url.clone(), token_set, email, password_stdin };
            account::login(args, format).await
        }
        Command::Logout => account::logout(format).await,
        Command::Whoami => account::whoami(&client()?, format).await,
        Command::Users { command } => users::run(command, &client()?, format).await,
        Command::Tokens { command } => tokens::run(command, &client()?, format).await,
        Command::Collaborators { command } => collaborators::run(command, &client()?, format).await,
        Command::Audit(args) => audit::run(args, &client()?, format).await,
        Command::Health => {
            let client = client()?;
            let answer = client.get_public(&["health"]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            match answer.json.get("status").and_then(|s| s.as_str()) {
                Some(status) => emit(&format!("{status} ({})\n", client.url())),
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

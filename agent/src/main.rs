//! `deployer-agent`: runs on each Docker host. A stub for now: it accepts the contract's flags
//! (DESIGN.md section 6) and says that agent support is not implemented yet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// sysexits EX_USAGE: the same code the controller uses for configuration it cannot run with.
const EX_USAGE: u8 = 64;

/// The Deployer agent: builds and runs services on this Docker host.
#[derive(Parser)]
#[command(name = "deployer-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the cluster (first start) and serve the controller's tasks.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The controller's gRPC address, as https://HOST:PORT.
    #[arg(long, env = "DEPLOYER_CONTROLLER")]
    controller: String,
    /// Agent join token (DPLY1.<ca fingerprint>.<secret>), from `deployer cluster token create --kind agent`.
    #[arg(long, env = "DEPLOYER_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Where the agent keeps its identity and state.
    #[arg(long, env = "DEPLOYER_DATA_DIR")]
    data_dir: PathBuf,
    /// Labels for placement constraints: k=v,k2=v2.
    #[arg(long, env = "DEPLOYER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not a label: write key=value")),
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => {
            eprintln!(
                "error: agent support is not implemented yet: this deployer-agent cannot join {} \
                 (data dir {}, {} label(s))",
                args.controller,
                args.data_dir.display(),
                args.labels.len()
            );
            ExitCode::from(EX_USAGE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn labels_are_key_value_pairs() {
        assert_eq!(parse_label("zone=eu-1"), Ok(("zone".into(), "eu-1".into())));
        assert_eq!(parse_label("gpu="), Ok(("gpu".into(), "".into())));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=x").is_err());
    }
}

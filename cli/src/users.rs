//! `deployer users ...`: the people who may log in (cluster administrators only).

use clap::Subcommand;
use serde::Deserialize;
use serde_json::json;

use crate::client::{CliError, Client};
use crate::output::{emit, emit_json, fields, timestamp, yes_no, Format, Table};
use crate::prompt;

#[derive(Subcommand)]
pub enum UsersCommand {
    /// Create a user; the password (10 to 256 characters) is asked for twice, without echo.
    Create {
        email: String,
        /// A cluster administrator, who may manage users and owns every project.
        #[arg(long)]
        admin: bool,
        /// Read the password from stdin instead of asking (for scripts).
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users, newest first.
    List,
}

#[derive(Deserialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub admin: bool,
    pub created_at: String,
}

pub async fn run(command: UsersCommand, client: &Client, format: Format) -> Result<(), CliError> {
    match command {
        UsersCommand::Create { email, admin, password_stdin } => {
            let password = if password_stdin {
                prompt::password_from_stdin().await?
            } else if prompt::interactive() {
                let first = prompt::password(&format!("Password for {email}: ")).await?;
                let again = prompt::password("The same password again: ").await?;
                if first != again {
                    return Err(CliError::Failed { message: "the two passwords differ".into(), hint: None });
                }
                first
            } else {
                return Err(prompt::not_interactive("the new user's password"));
            };
            let body = json!({ "email": email, "password": password, "admin": admin });
            let answer = client.post(&["users"], &body).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let user: UserView = answer.decode()?;
            emit(&fields(&[
                ("id", user.id),
                ("email", user.email),
                ("admin", yes_no(user.admin)),
                ("created", timestamp(&user.created_at)),
            ]))
        }
        UsersCommand::List => {
            let answer = client.get(&["users"], &[]).await?;
            if format == Format::Json {
                return emit_json(&answer);
            }
            let users: Vec<UserView> = answer.decode()?;
            if users.is_empty() {
                eprintln!("No users; create one with `deployer users create EMAIL`.");
                return Ok(());
            }
            let mut table = Table::new(&["ID", "EMAIL", "ADMIN", "CREATED"]);
            for u in users {
                table.row(vec![u.id, u.email, yes_no(u.admin), timestamp(&u.created_at)]);
            }
            emit(&table.render())
        }
    }
}

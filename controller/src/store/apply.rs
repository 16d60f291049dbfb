//! Applying one command to the state database, inside the batch's transaction, on the state
//! machine's writer thread (rusqlite, synchronous).

use rusqlite::types::{FromSql, ToSql};
use rusqlite::{OptionalExtension, Params, Transaction};

use super::apply_previews::HostOwner;
use super::state_machine::StateEvent;
use crate::command::{AuditEntry, Command, CommandResponse, Rejection};

/// Runs one statement (prepared once per connection) and returns how many rows it changed.
pub(super) fn exec(tx: &Transaction<'_>, sql: &str, params: impl Params) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

/// The first column of the statement's first row, if it has one.
pub(super) fn scalar<T: FromSql>(tx: &Transaction<'_>, sql: &str, params: impl Params) -> rusqlite::Result<Option<T>> {
    tx.prepare_cached(sql)?.query_row(params, |row| row.get(0)).optional()
}

/// The first column of every row of the statement (a SELECT, or a write with RETURNING).
pub(super) fn column<T: FromSql>(tx: &Transaction<'_>, sql: &str, params: impl Params) -> rusqlite::Result<Vec<T>> {
    let mut statement = tx.prepare_cached(sql)?;
    let rows = statement.query_map(params, |row| row.get(0))?;
    rows.collect()
}

/// Runs a statement built for a number of rows, with its values in order.
fn exec_rows(tx: &Transaction<'_>, sql: &str, values: &[&dyn ToSql]) -> rusqlite::Result<usize> {
    tx.prepare(sql)?.execute(rusqlite::params_from_iter(values))
}

pub(crate) fn apply(
    tx: &Transaction<'_>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> rusqlite::Result<CommandResponse> {
    let Command::Batch { commands } = command else {
        return apply_one(tx, command, events);
    };
    let mut responses = Vec::with_capacity(commands.len());
    let mut commands = commands.into_iter().peekable();
    while let Some(command) = commands.next() {
        match NewProject::from_command(command) {
            // A run of project creations takes three statements, whatever its length: the
            // projects, their owners, their audit entries.
            Ok(first) => {
                let mut run = vec![first];
                while run.len() < CREATE_RUN_MAX {
                    match commands.next_if(NewProject::matches).map(NewProject::from_command) {
                        Some(Ok(p)) => run.push(p),
                        _ => break,
                    }
                }
                responses.extend(create_projects(tx, run)?);
            }
            // Batches are flat: the proposer never nests them.
            Err(Command::Batch { .. }) => {
                responses.push(CommandResponse::rejected(Rejection::Conflict, "nested batch"))
            }
            Err(command) => responses.push(apply_one(tx, command, events)?),
        }
    }
    Ok(CommandResponse::Batch { responses })
}

/// A project creation, audited or not, as the batch path takes it.
struct NewProject {
    id: String,
    name: String,
    created_at: i64,
    owner: Option<String>,
    audit: Option<AuditEntry>,
}

impl NewProject {
    fn matches(c: &Command) -> bool {
        match c {
            Command::CreateProject { .. } => true,
            Command::Audited { command, .. } => matches!(**command, Command::CreateProject { .. }),
            _ => false,
        }
    }

    fn from_command(c: Command) -> Result<NewProject, Command> {
        match c {
            Command::CreateProject { id, name, created_at, owner } => {
                Ok(NewProject { id, name, created_at, owner, audit: None })
            }
            Command::Audited { entry, command } if matches!(*command, Command::CreateProject { .. }) => {
                let Command::CreateProject { id, name, created_at, owner } = *command else { unreachable!() };
                Ok(NewProject { id, name, created_at, owner, audit: Some(entry) })
            }
            other => Err(other),
        }
    }
}

/// Most rows in one INSERT (at most eight bound values each).
const CREATE_RUN_MAX: usize = 256;

fn insert_audit(tx: &Transaction<'_>, entries: &[AuditEntry]) -> rusqlite::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut sql = String::from("INSERT INTO audit (id, at, actor, action, target, project_id, source) VALUES ");
    sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; entries.len()].join(", "));
    let mut values: Vec<&dyn ToSql> = Vec::with_capacity(entries.len() * 7);
    for e in entries {
        values.extend([&e.id as &dyn ToSql, &e.at, &e.actor, &e.action, &e.target, &e.project_id, &e.source]);
    }
    exec_rows(tx, &sql, &values)?;
    Ok(())
}

/// Inserts projects in order with one statement; a project whose id or name is taken (also by
/// an earlier one of the same run) is skipped and answered with a conflict. Owners and audit
/// entries are written for the inserted ones.
fn create_projects(tx: &Transaction<'_>, run: Vec<NewProject>) -> rusqlite::Result<Vec<CommandResponse>> {
    let mut sql = String::from("INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)");
    for _ in 1..run.len() {
        sql.push_str(", (?, ?, ?)");
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
    let values: Vec<&dyn ToSql> = run.iter().flat_map(|p| [&p.id as &dyn ToSql, &p.name, &p.created_at]).collect();
    // A run of one is the common case (one write per entry): its statement is kept prepared.
    let (mut cached, mut built);
    let statement: &mut rusqlite::Statement<'_> = if run.len() == 1 {
        cached = tx.prepare_cached(&sql)?;
        &mut cached
    } else {
        built = tx.prepare(&sql)?;
        &mut built
    };
    let mut inserted: std::collections::HashSet<String> =
        statement.query_map(rusqlite::params_from_iter(values), |row| row.get(0))?.collect::<Result<_, _>>()?;
    let mut responses = Vec::with_capacity(run.len());
    let mut owners = Vec::new();
    let mut audits = Vec::new();
    for p in run {
        // `remove`: a second command with the same id was the one skipped.
        if inserted.remove(&p.id) {
            if let Some(owner) = p.owner {
                owners.push((p.id.clone(), owner, p.created_at));
            }
            audits.extend(p.audit);
            responses.push(CommandResponse::Applied);
        } else {
            responses.push(CommandResponse::rejected(
                Rejection::Conflict,
                format!("a project named \"{}\" already exists", p.name),
            ));
        }
    }
    if !owners.is_empty() {
        let mut sql = String::from("INSERT INTO collaborators (project_id, user_id, role, added_at) VALUES ");
        sql.push_str(&vec!["(?, ?, 'owner', ?)"; owners.len()].join(", "));
        let values: Vec<&dyn ToSql> =
            owners.iter().flat_map(|(project, user, at)| [project as &dyn ToSql, user, at]).collect();
        exec_rows(tx, &sql, &values)?;
    }
    insert_audit(tx, &audits)?;
    Ok(responses)
}

fn apply_one(
    tx: &Transaction<'_>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> rusqlite::Result<CommandResponse> {
    // What the ingress routes by: a change re-computes the agents' route tables.
    let routing = matches!(
        command,
        Command::AgentUp { .. }
            | Command::AgentsDown { .. }
            | Command::RevokeAgent { .. }
            | Command::PutService { .. }
            | Command::DeleteService { .. }
            | Command::DeleteProject { .. }
    );
    match command {
        Command::Batch { .. } => return Ok(CommandResponse::rejected(Rejection::Conflict, "nested batch")),
        command @ (Command::CreateDeployment { .. }
        | Command::PutUploadChunk { .. }
        | Command::AssignDeployment { .. }
        | Command::UpdateDeployment { .. }
        | Command::AppendDeploymentLogs { .. }
        | Command::DropUploads { .. }) => return super::apply_deploy::apply(tx, command, events),
        command @ (Command::SetIngressCa { .. }
        | Command::SetAcmeAccount { .. }
        | Command::PutCertificate { .. }
        | Command::CertificateFailed { .. }) => return super::apply_ingress::apply(tx, command, events),
        command @ (Command::WebhookDelivery { .. }
        | Command::SetWebhookSecret { .. }
        | Command::SetDeployHook { .. }
        | Command::PruneWebhookDeliveries { .. }) => return super::apply_webhooks::apply(tx, command, events),
        command @ (Command::PutPreview { .. }
        | Command::DestroyPreview { .. }
        | Command::PreviewTeardown { .. }
        | Command::SetPreviewsEnabled { .. }) => return super::apply_previews::apply(tx, command, events),
        Command::InitCluster { ca_cert_pem, ca_key_sealed_hex, at } => {
            if scalar::<i64>(tx, "SELECT id FROM cluster WHERE id = 1", [])?.is_some() {
                return Ok(CommandResponse::rejected(Rejection::Conflict, "the cluster is already initialized"));
            }
            let sealed = hex::decode(&ca_key_sealed_hex).unwrap_or_default();
            exec(
                tx,
                "INSERT INTO cluster (id, ca_cert_pem, ca_key_sealed, created_at) VALUES (1, ?, ?, ?)",
                rusqlite::params![ca_cert_pem, sealed, at],
            )?;
        }
        Command::CreateJoinToken { id, kind, secret_hash, created_at, expires_at } => {
            exec(
                tx,
                "INSERT INTO join_tokens (id, kind, secret_hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
                rusqlite::params![id, kind.as_str(), secret_hash, created_at, expires_at],
            )?;
        }
        Command::RevokeJoinToken { id, at } => {
            let done = exec(
                tx,
                "UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                rusqlite::params![at, id],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no join token with id {id}")));
            }
        }
        Command::CreateApiToken { id, name, token_hash, scopes, created_at, expires_at, user_id } => {
            exec(
                tx,
                "INSERT INTO api_tokens (id, name, token_hash, scopes, created_at, expires_at, user_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rusqlite::params![
                    id,
                    name,
                    token_hash,
                    serde_json::to_string(&scopes).unwrap_or_else(|_| "[]".into()),
                    created_at,
                    expires_at,
                    user_id
                ],
            )?;
        }
        Command::RevokeApiToken { id, user_id, at } => {
            let done = exec(
                tx,
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?1) \
                 WHERE id = ?2 AND (?3 IS NULL OR user_id = ?3)",
                rusqlite::params![at, id, user_id],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no API token with id {id}")));
            }
        }
        Command::CreateUser { id, email, password_hash, admin, created_at } => {
            let done = exec(
                tx,
                "INSERT INTO users (id, email, password_hash, admin, created_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
                rusqlite::params![id, email, password_hash, admin, created_at],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("a user with email {email} already exists"),
                ));
            }
        }
        Command::CreateSession { id, user_id, token_hash, created_at, expires_at } => {
            let done = exec(
                tx,
                "INSERT INTO sessions (id, user_id, token_hash, created_at, expires_at) \
                 SELECT ?, id, ?, ?, ? FROM users WHERE id = ? ON CONFLICT DO NOTHING",
                rusqlite::params![id, token_hash, created_at, expires_at, user_id],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no user with id {user_id}")));
            }
        }
        Command::RevokeSession { token_hash, at } => {
            exec(
                tx,
                "UPDATE sessions SET revoked_at = COALESCE(revoked_at, ?) WHERE token_hash = ?",
                rusqlite::params![at, token_hash],
            )?;
        }
        Command::SetCollaborator { project_id, user_id, role, at } => {
            let done = exec(
                tx,
                "INSERT INTO collaborators (project_id, user_id, role, added_at) \
                 SELECT p.id, u.id, ?, ? FROM projects p, users u WHERE p.id = ? AND u.id = ? \
                 ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role",
                rusqlite::params![role, at, project_id, user_id],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, "no such project or user"));
            }
        }
        Command::RemoveCollaborator { project_id, user_id } => {
            let done = exec(
                tx,
                "DELETE FROM collaborators WHERE project_id = ? AND user_id = ?",
                rusqlite::params![project_id, user_id],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::NotFound,
                    "that user is not a collaborator of the project",
                ));
            }
        }
        Command::PutService {
            id,
            project_id,
            name,
            create,
            spec,
            depends_on,
            domains,
            set_secrets,
            unset_secrets,
            at,
        } => {
            let service = PutService { id, project_id, name, create, spec, depends_on, domains, at };
            if let Some(rejection) = check_service(tx, &service)? {
                return Ok(rejection);
            }
            write_service(tx, &service, set_secrets, unset_secrets)?;
        }
        Command::DeleteService { id, project_id } => {
            let name: Option<String> = scalar(
                tx,
                "SELECT name FROM services WHERE id = ? AND project_id = ?",
                rusqlite::params![id, project_id],
            )?;
            let Some(name) = name else {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no service with id {id}")));
            };
            let graph = dependency_graph(tx, &project_id)?;
            let mut needed_by: Vec<&String> =
                graph.iter().filter(|(other, deps)| **other != name && deps.contains(&name)).map(|(o, _)| o).collect();
            if !needed_by.is_empty() {
                needed_by.sort();
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("service {name} is in the depends_on of {needed_by:?}; change those first"),
                ));
            }
            exec(tx, "DELETE FROM services WHERE id = ?", [&id])?;
        }
        // The command, and its audit entry if it was applied.
        Command::Audited { entry, command } => {
            let response = apply_one(tx, *command, events)?;
            if matches!(response, CommandResponse::Applied) {
                insert_audit(tx, &[entry])?;
            }
            return Ok(response);
        }
        Command::CreateProject { id, name, created_at, owner } => {
            let response = create_projects(tx, vec![NewProject { id, name, created_at, owner, audit: None }])?;
            return Ok(response.into_iter().next().unwrap_or_default());
        }
        Command::RegisterAgent { id, hostname, labels, token_id, created_at } => {
            let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
            let done = exec(
                tx,
                "INSERT INTO agents (id, hostname, labels, status, last_seen, token_id, created_at) \
                 VALUES (?1, ?2, ?3, 'down', ?4, ?5, ?4) ON CONFLICT DO NOTHING",
                rusqlite::params![id, hostname, labels, created_at, token_id],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::Conflict, format!("agent {id} already exists")));
            }
        }
        Command::AgentUp {
            id,
            hostname,
            labels,
            version,
            cpu_millis,
            memory_bytes,
            ingress,
            ingress_https_port,
            at,
        } => {
            let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
            let done = exec(
                tx,
                "UPDATE agents SET hostname = ?, labels = ?, version = ?, cpu_millis = ?, memory_bytes = ?, \
                 ingress = ?, ingress_https_port = ?, status = 'ready', last_seen = MAX(last_seen, ?) \
                 WHERE id = ? AND revoked_at IS NULL",
                rusqlite::params![
                    hostname,
                    labels,
                    version,
                    i64::try_from(cpu_millis).unwrap_or(i64::MAX),
                    i64::try_from(memory_bytes).unwrap_or(i64::MAX),
                    ingress,
                    ingress_https_port,
                    at,
                    id
                ],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no agent with id {id}")));
            }
        }
        Command::AgentsDown { agents } => {
            for (id, last_seen) in agents {
                exec(
                    tx,
                    "UPDATE agents SET status = 'down', last_seen = MAX(last_seen, ?) \
                     WHERE id = ? AND revoked_at IS NULL",
                    rusqlite::params![last_seen, id],
                )?;
            }
        }
        Command::RevokeAgent { id, at } => {
            let done = exec(
                tx,
                "UPDATE agents SET revoked_at = ?, status = 'down' WHERE id = ? AND revoked_at IS NULL",
                rusqlite::params![at, id],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no agent with id {id}")));
            }
        }
        Command::DeleteProject { id } => {
            if exec(tx, "DELETE FROM projects WHERE id = ?", [&id])? == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no project with id {id}")));
            }
        }
    }
    if routing {
        events.push(StateEvent::IngressChanged);
    }
    Ok(CommandResponse::Applied)
}

struct PutService {
    id: String,
    project_id: String,
    name: String,
    create: bool,
    spec: serde_json::Value,
    depends_on: Vec<String>,
    domains: Vec<String>,
    at: i64,
}

/// Service name -> the names it depends on, for every service of the project.
fn dependency_graph(
    tx: &Transaction<'_>,
    project_id: &str,
) -> rusqlite::Result<std::collections::BTreeMap<String, Vec<String>>> {
    let mut statement = tx.prepare_cached("SELECT name, spec FROM services WHERE project_id = ?")?;
    let rows: Vec<(String, String)> =
        statement.query_map([project_id], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .map(|(name, spec)| {
            let deps = serde_json::from_str::<serde_json::Value>(&spec)
                .ok()
                .and_then(|v| serde_json::from_value(v["depends_on"].clone()).ok())
                .unwrap_or_default();
            (name, deps)
        })
        .collect())
}

/// A dependency cycle through `start`, as `a -> b -> a`, if there is one.
fn find_cycle(graph: &std::collections::BTreeMap<String, Vec<String>>, start: &str) -> Option<String> {
    fn visit(
        graph: &std::collections::BTreeMap<String, Vec<String>>,
        node: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut std::collections::BTreeSet<String>,
    ) -> bool {
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if visit(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = std::collections::BTreeSet::new();
    visit(graph, start, start, &mut path, &mut seen).then(|| path.join(" -> "))
}

/// Everything that can refuse a service write, checked before anything is written.
fn check_service(tx: &Transaction<'_>, s: &PutService) -> rusqlite::Result<Option<CommandResponse>> {
    let project_name: Option<String> = scalar(tx, "SELECT name FROM projects WHERE id = ?", [&s.project_id])?;
    let Some(project_name) = project_name else {
        return Ok(Some(CommandResponse::rejected(
            Rejection::NotFound,
            format!("no project with id {}", s.project_id),
        )));
    };
    let existing: Option<String> =
        scalar(tx, "SELECT name FROM services WHERE id = ? AND project_id = ?", [&s.id, &s.project_id])?;
    match (s.create, &existing) {
        (true, Some(_)) => {
            return Ok(Some(CommandResponse::rejected(Rejection::Conflict, format!("service {} already exists", s.id))))
        }
        (false, None) => {
            return Ok(Some(CommandResponse::rejected(Rejection::NotFound, format!("no service with id {}", s.id))))
        }
        _ => {}
    }
    let same_name: Option<String> = scalar(
        tx,
        "SELECT id FROM services WHERE project_id = ? AND name = ? AND id != ?",
        [&s.project_id, &s.name, &s.id],
    )?;
    if same_name.is_some() {
        return Ok(Some(CommandResponse::rejected(
            Rejection::Conflict,
            format!("a service named \"{}\" already exists in this project", s.name),
        )));
    }
    // Host names are `<service>-<project>`: `a-b` in `c` and `a` in `b-c` would share one. The
    // service's previews get hosts too, `<service>-<project>-<preview>`, for each live preview.
    let previews: Vec<String> =
        column(tx, "SELECT key FROM previews WHERE project_id = ? AND status != 'destroyed'", [&s.project_id])?;
    let mut hosts = vec![format!("{}-{project_name}", s.name)];
    hosts.extend(previews.iter().map(|key| format!("{}-{project_name}-{key}", s.name)));
    if let Some(taken) = super::apply_previews::host_taken(tx, &hosts, HostOwner::Service(&s.id))? {
        return Ok(Some(CommandResponse::rejected(
            Rejection::Conflict,
            format!("{taken}; choose another service name"),
        )));
    }
    for domain in &s.domains {
        let owner: Option<String> = scalar(tx, "SELECT service_id FROM service_domains WHERE domain = ?", [domain])?;
        if owner.is_some_and(|o| o != s.id) {
            return Ok(Some(CommandResponse::rejected(
                Rejection::Conflict,
                format!("domain {domain} is already claimed by another service"),
            )));
        }
    }
    let mut graph = dependency_graph(tx, &s.project_id)?;
    if let Some(old) = &existing {
        graph.remove(old);
    }
    for dep in &s.depends_on {
        if dep == &s.name {
            return Ok(Some(CommandResponse::rejected(
                Rejection::Invalid,
                "depends_on: a service cannot depend on itself",
            )));
        }
        if !graph.contains_key(dep) {
            return Ok(Some(CommandResponse::rejected(
                Rejection::Invalid,
                format!("depends_on: there is no service named \"{dep}\" in this project"),
            )));
        }
    }
    // A renamed service keeps the dependencies on its old name only if nobody depends on it.
    if let Some(old) = existing.as_ref().filter(|old| **old != s.name) {
        if graph.values().any(|deps| deps.contains(old)) {
            return Ok(Some(CommandResponse::rejected(
                Rejection::Conflict,
                format!("service {old} is in the depends_on of other services; it cannot be renamed"),
            )));
        }
    }
    graph.insert(s.name.clone(), s.depends_on.clone());
    if let Some(cycle) = find_cycle(&graph, &s.name) {
        return Ok(Some(CommandResponse::rejected(
            Rejection::Invalid,
            format!("depends_on: this would make a dependency cycle: {cycle}"),
        )));
    }
    Ok(None)
}

fn write_service(
    tx: &Transaction<'_>,
    s: &PutService,
    set_secrets: Vec<(String, String)>,
    unset_secrets: Vec<String>,
) -> rusqlite::Result<()> {
    let spec = serde_json::to_string(&s.spec).unwrap_or_else(|_| "{}".into());
    if s.create {
        exec(
            tx,
            "INSERT INTO services (id, project_id, name, spec, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            rusqlite::params![s.id, s.project_id, s.name, spec, s.at],
        )?;
    } else {
        exec(
            tx,
            "UPDATE services SET name = ?, spec = ?, updated_at = ? WHERE id = ?",
            rusqlite::params![s.name, spec, s.at, s.id],
        )?;
    }
    exec(tx, "DELETE FROM service_domains WHERE service_id = ?", [&s.id])?;
    for domain in &s.domains {
        exec(tx, "INSERT INTO service_domains (domain, service_id) VALUES (?, ?)", [domain, &s.id])?;
    }
    for name in unset_secrets {
        exec(tx, "DELETE FROM service_secrets WHERE service_id = ? AND name = ?", [&s.id, &name])?;
    }
    for (name, sealed_hex) in set_secrets {
        exec(
            tx,
            "INSERT INTO service_secrets (service_id, name, sealed, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (service_id, name) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
            rusqlite::params![s.id, name, hex::decode(sealed_hex).unwrap_or_default(), s.at],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::apply;
    use crate::command::{Command, CommandResponse, Rejection};

    fn create(id: &str, name: &str) -> Command {
        Command::CreateProject { id: id.into(), name: name.into(), created_at: 1, owner: None }
    }

    fn is_conflict(r: &CommandResponse) -> bool {
        matches!(r, CommandResponse::Rejected { reason: Rejection::Conflict, .. })
    }

    #[tokio::test]
    async fn a_batch_answers_each_write_on_its_own_and_in_order() {
        let (_dir, pool) = super::super::test_state().await;
        let batch = Command::Batch {
            commands: vec![
                create("p1", "web"),
                create("p2", "web"),   // name taken earlier in the same run
                create("p3", "old"),   // name taken before the batch
                create("p1", "other"), // id taken earlier in the same run
                Command::DeleteProject { id: "missing".into() },
                create("p4", "api"),
            ],
        };
        let answer = super::super::test_direct(&pool, |tx| {
            assert!(matches!(apply(tx, create("p0", "old"), &mut Vec::new()).unwrap(), CommandResponse::Applied));
            apply(tx, batch, &mut Vec::new()).unwrap()
        });
        let CommandResponse::Batch { responses } = answer else {
            panic!("a batch answers a batch");
        };
        assert_eq!(responses.len(), 6);
        assert!(matches!(responses[0], CommandResponse::Applied));
        assert!(is_conflict(&responses[1]) && is_conflict(&responses[2]) && is_conflict(&responses[3]));
        assert!(matches!(responses[4], CommandResponse::Rejected { reason: Rejection::NotFound, .. }));
        assert!(matches!(responses[5], CommandResponse::Applied));
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM projects ORDER BY name").fetch_all(&pool).await.unwrap();
        assert_eq!(names, ["api", "old", "web"]);
    }
}

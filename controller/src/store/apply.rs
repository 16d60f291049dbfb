//! Applying one command to the state database, inside the batch's transaction.

use sqlx::{Sqlite, Transaction};

use super::apply_previews::HostOwner;
use super::state_machine::StateEvent;
use crate::command::{AuditEntry, Command, CommandResponse, Rejection};

pub(crate) async fn apply(
    tx: &mut Transaction<'_, Sqlite>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> Result<CommandResponse, sqlx::Error> {
    let Command::Batch { commands } = command else {
        return apply_one(tx, command, events).await;
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
                responses.extend(create_projects(tx, run).await?);
            }
            // Batches are flat: the proposer never nests them.
            Err(Command::Batch { .. }) => {
                responses.push(CommandResponse::rejected(Rejection::Conflict, "nested batch"))
            }
            Err(command) => responses.push(apply_one(tx, command, events).await?),
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

async fn insert_audit(tx: &mut Transaction<'_, Sqlite>, entries: &[AuditEntry]) -> Result<(), sqlx::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut sql = String::from("INSERT INTO audit (id, at, actor, action, target, project_id, source) VALUES ");
    sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; entries.len()].join(", "));
    let mut query = sqlx::query(&sql);
    for e in entries {
        query = query
            .bind(&e.id)
            .bind(e.at)
            .bind(&e.actor)
            .bind(&e.action)
            .bind(&e.target)
            .bind(&e.project_id)
            .bind(&e.source);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// Inserts projects in order with one statement; a project whose id or name is taken (also by
/// an earlier one of the same run) is skipped and answered with a conflict. Owners and audit
/// entries are written for the inserted ones.
async fn create_projects(
    tx: &mut Transaction<'_, Sqlite>,
    run: Vec<NewProject>,
) -> Result<Vec<CommandResponse>, sqlx::Error> {
    let mut sql = String::from("INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)");
    for _ in 1..run.len() {
        sql.push_str(", (?, ?, ?)");
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
    let mut query = sqlx::query_scalar::<_, String>(&sql);
    for p in &run {
        query = query.bind(&p.id).bind(&p.name).bind(p.created_at);
    }
    let mut inserted: std::collections::HashSet<String> = query.fetch_all(&mut **tx).await?.into_iter().collect();
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
        let mut query = sqlx::query(&sql);
        for (project, user, at) in &owners {
            query = query.bind(project).bind(user).bind(at);
        }
        query.execute(&mut **tx).await?;
    }
    insert_audit(tx, &audits).await?;
    Ok(responses)
}

async fn apply_one(
    tx: &mut Transaction<'_, Sqlite>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> Result<CommandResponse, sqlx::Error> {
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
        | Command::DropUploads { .. }) => return super::apply_deploy::apply(tx, command, events).await,
        command @ (Command::SetIngressCa { .. }
        | Command::SetAcmeAccount { .. }
        | Command::PutCertificate { .. }
        | Command::CertificateFailed { .. }) => return super::apply_ingress::apply(tx, command, events).await,
        command @ (Command::WebhookDelivery { .. }
        | Command::SetWebhookSecret { .. }
        | Command::SetDeployHook { .. }
        | Command::PruneWebhookDeliveries { .. }) => return super::apply_webhooks::apply(tx, command, events).await,
        command @ (Command::PutPreview { .. }
        | Command::DestroyPreview { .. }
        | Command::PreviewTeardown { .. }
        | Command::SetPreviewsEnabled { .. }) => return super::apply_previews::apply(tx, command, events).await,
        Command::InitCluster { ca_cert_pem, ca_key_sealed_hex, at } => {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT id FROM cluster WHERE id = 1").fetch_optional(&mut **tx).await?;
            if exists.is_some() {
                return Ok(CommandResponse::rejected(Rejection::Conflict, "the cluster is already initialized"));
            }
            let sealed = hex::decode(&ca_key_sealed_hex).unwrap_or_default();
            sqlx::query("INSERT INTO cluster (id, ca_cert_pem, ca_key_sealed, created_at) VALUES (1, ?, ?, ?)")
                .bind(ca_cert_pem)
                .bind(sealed)
                .bind(at)
                .execute(&mut **tx)
                .await?;
        }
        Command::CreateJoinToken { id, kind, secret_hash, created_at, expires_at } => {
            sqlx::query(
                "INSERT INTO join_tokens (id, kind, secret_hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(kind.as_str())
            .bind(secret_hash)
            .bind(created_at)
            .bind(expires_at)
            .execute(&mut **tx)
            .await?;
        }
        Command::RevokeJoinToken { id, at } => {
            let done = sqlx::query("UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
                .bind(at)
                .bind(&id)
                .execute(&mut **tx)
                .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no join token with id {id}")));
            }
        }
        Command::CreateApiToken { id, name, token_hash, scopes, created_at, expires_at, user_id } => {
            sqlx::query(
                "INSERT INTO api_tokens (id, name, token_hash, scopes, created_at, expires_at, user_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(name)
            .bind(token_hash)
            .bind(serde_json::to_string(&scopes).unwrap_or_else(|_| "[]".into()))
            .bind(created_at)
            .bind(expires_at)
            .bind(user_id)
            .execute(&mut **tx)
            .await?;
        }
        Command::RevokeApiToken { id, user_id, at } => {
            let done = sqlx::query(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?) \
                 WHERE id = ? AND (? IS NULL OR user_id = ?)",
            )
            .bind(at)
            .bind(&id)
            .bind(&user_id)
            .bind(&user_id)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no API token with id {id}")));
            }
        }
        Command::CreateUser { id, email, password_hash, admin, created_at } => {
            let done = sqlx::query(
                "INSERT INTO users (id, email, password_hash, admin, created_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&id)
            .bind(&email)
            .bind(password_hash)
            .bind(admin)
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("a user with email {email} already exists"),
                ));
            }
        }
        Command::CreateSession { id, user_id, token_hash, created_at, expires_at } => {
            let done = sqlx::query(
                "INSERT INTO sessions (id, user_id, token_hash, created_at, expires_at) \
                 SELECT ?, id, ?, ?, ? FROM users WHERE id = ? ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(token_hash)
            .bind(created_at)
            .bind(expires_at)
            .bind(&user_id)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no user with id {user_id}")));
            }
        }
        Command::RevokeSession { token_hash, at } => {
            sqlx::query("UPDATE sessions SET revoked_at = COALESCE(revoked_at, ?) WHERE token_hash = ?")
                .bind(at)
                .bind(token_hash)
                .execute(&mut **tx)
                .await?;
        }
        Command::SetCollaborator { project_id, user_id, role, at } => {
            let done = sqlx::query(
                "INSERT INTO collaborators (project_id, user_id, role, added_at) \
                 SELECT p.id, u.id, ?, ? FROM projects p, users u WHERE p.id = ? AND u.id = ? \
                 ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role",
            )
            .bind(role)
            .bind(at)
            .bind(&project_id)
            .bind(&user_id)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, "no such project or user"));
            }
        }
        Command::RemoveCollaborator { project_id, user_id } => {
            let done = sqlx::query("DELETE FROM collaborators WHERE project_id = ? AND user_id = ?")
                .bind(&project_id)
                .bind(&user_id)
                .execute(&mut **tx)
                .await?;
            if done.rows_affected() == 0 {
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
            if let Some(rejection) = check_service(tx, &service).await? {
                return Ok(rejection);
            }
            write_service(tx, &service, set_secrets, unset_secrets).await?;
        }
        Command::DeleteService { id, project_id } => {
            let name: Option<String> = sqlx::query_scalar("SELECT name FROM services WHERE id = ? AND project_id = ?")
                .bind(&id)
                .bind(&project_id)
                .fetch_optional(&mut **tx)
                .await?;
            let Some(name) = name else {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no service with id {id}")));
            };
            let graph = dependency_graph(tx, &project_id).await?;
            let mut needed_by: Vec<&String> =
                graph.iter().filter(|(other, deps)| **other != name && deps.contains(&name)).map(|(o, _)| o).collect();
            if !needed_by.is_empty() {
                needed_by.sort();
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("service {name} is in the depends_on of {needed_by:?}; change those first"),
                ));
            }
            sqlx::query("DELETE FROM services WHERE id = ?").bind(&id).execute(&mut **tx).await?;
        }
        // The command, and its audit entry if it was applied.
        Command::Audited { entry, command } => {
            let response = Box::pin(apply_one(tx, *command, events)).await?;
            if matches!(response, CommandResponse::Applied) {
                insert_audit(tx, &[entry]).await?;
            }
            return Ok(response);
        }
        Command::CreateProject { id, name, created_at, owner } => {
            let response = create_projects(tx, vec![NewProject { id, name, created_at, owner, audit: None }]).await?;
            return Ok(response.into_iter().next().unwrap_or_default());
        }
        Command::RegisterAgent { id, hostname, labels, token_id, created_at } => {
            let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
            let done = sqlx::query(
                "INSERT INTO agents (id, hostname, labels, status, last_seen, token_id, created_at) \
                 VALUES (?, ?, ?, 'down', ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(&id)
            .bind(hostname)
            .bind(labels)
            .bind(created_at)
            .bind(token_id)
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
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
            let done = sqlx::query(
                "UPDATE agents SET hostname = ?, labels = ?, version = ?, cpu_millis = ?, memory_bytes = ?, \
                 ingress = ?, ingress_https_port = ?, status = 'ready', last_seen = MAX(last_seen, ?) \
                 WHERE id = ? AND revoked_at IS NULL",
            )
            .bind(hostname)
            .bind(labels)
            .bind(version)
            .bind(i64::try_from(cpu_millis).unwrap_or(i64::MAX))
            .bind(i64::try_from(memory_bytes).unwrap_or(i64::MAX))
            .bind(ingress)
            .bind(ingress_https_port)
            .bind(at)
            .bind(&id)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no agent with id {id}")));
            }
        }
        Command::AgentsDown { agents } => {
            for (id, last_seen) in agents {
                sqlx::query(
                    "UPDATE agents SET status = 'down', last_seen = MAX(last_seen, ?) \
                     WHERE id = ? AND revoked_at IS NULL",
                )
                .bind(last_seen)
                .bind(id)
                .execute(&mut **tx)
                .await?;
            }
        }
        Command::RevokeAgent { id, at } => {
            let done =
                sqlx::query("UPDATE agents SET revoked_at = ?, status = 'down' WHERE id = ? AND revoked_at IS NULL")
                    .bind(at)
                    .bind(&id)
                    .execute(&mut **tx)
                    .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no agent with id {id}")));
            }
        }
        Command::DeleteProject { id } => {
            let done = sqlx::query("DELETE FROM projects WHERE id = ?").bind(&id).execute(&mut **tx).await?;
            if done.rows_affected() == 0 {
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
async fn dependency_graph(
    tx: &mut Transaction<'_, Sqlite>,
    project_id: &str,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, spec FROM services WHERE project_id = ?")
        .bind(project_id)
        .fetch_all(&mut **tx)
        .await?;
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
async fn check_service(
    tx: &mut Transaction<'_, Sqlite>,
    s: &PutService,
) -> Result<Option<CommandResponse>, sqlx::Error> {
    let project: Option<String> = sqlx::query_scalar("SELECT id FROM projects WHERE id = ?")
        .bind(&s.project_id)
        .fetch_optional(&mut **tx)
        .await?;
    if project.is_none() {
        return Ok(Some(CommandResponse::rejected(
            Rejection::NotFound,
            format!("no project with id {}", s.project_id),
        )));
    }
    let existing: Option<String> = sqlx::query_scalar("SELECT name FROM services WHERE id = ? AND project_id = ?")
        .bind(&s.id)
        .bind(&s.project_id)
        .fetch_optional(&mut **tx)
        .await?;
    match (s.create, &existing) {
        (true, Some(_)) => {
            return Ok(Some(CommandResponse::rejected(Rejection::Conflict, format!("service {} already exists", s.id))))
        }
        (false, None) => {
            return Ok(Some(CommandResponse::rejected(Rejection::NotFound, format!("no service with id {}", s.id))))
        }
        _ => {}
    }
    let same_name: Option<String> =
        sqlx::query_scalar("SELECT id FROM services WHERE project_id = ? AND name = ? AND id != ?")
            .bind(&s.project_id)
            .bind(&s.name)
            .bind(&s.id)
            .fetch_optional(&mut **tx)
            .await?;
    if same_name.is_some() {
        return Ok(Some(CommandResponse::rejected(
            Rejection::Conflict,
            format!("a service named \"{}\" already exists in this project", s.name),
        )));
    }
    // Host names are `<service>-<project>`: `a-b` in `c` and `a` in `b-c` would share one. The
    // service's previews get hosts too, `<service>-<project>-<preview>`, for each live preview.
    let project_name: Option<String> = sqlx::query_scalar("SELECT name FROM projects WHERE id = ?")
        .bind(&s.project_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(project_name) = project_name else {
        return Ok(Some(CommandResponse::rejected(
            Rejection::NotFound,
            format!("no project with id {}", s.project_id),
        )));
    };
    let previews: Vec<String> =
        sqlx::query_scalar("SELECT key FROM previews WHERE project_id = ? AND status != 'destroyed'")
            .bind(&s.project_id)
            .fetch_all(&mut **tx)
            .await?;
    let mut hosts = vec![format!("{}-{project_name}", s.name)];
    hosts.extend(previews.iter().map(|key| format!("{}-{project_name}-{key}", s.name)));
    if let Some(taken) = super::apply_previews::host_taken(tx, &hosts, HostOwner::Service(&s.id)).await? {
        return Ok(Some(CommandResponse::rejected(
            Rejection::Conflict,
            format!("{taken}; choose another service name"),
        )));
    }
    for domain in &s.domains {
        let owner: Option<String> = sqlx::query_scalar("SELECT service_id FROM service_domains WHERE domain = ?")
            .bind(domain)
            .fetch_optional(&mut **tx)
            .await?;
        if owner.is_some_and(|o| o != s.id) {
            return Ok(Some(CommandResponse::rejected(
                Rejection::Conflict,
                format!("domain {domain} is already claimed by another service"),
            )));
        }
    }
    let mut graph = dependency_graph(tx, &s.project_id).await?;
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

async fn write_service(
    tx: &mut Transaction<'_, Sqlite>,
    s: &PutService,
    set_secrets: Vec<(String, String)>,
    unset_secrets: Vec<String>,
) -> Result<(), sqlx::Error> {
    let spec = serde_json::to_string(&s.spec).unwrap_or_else(|_| "{}".into());
    if s.create {
        sqlx::query(
            "INSERT INTO services (id, project_id, name, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.project_id)
        .bind(&s.name)
        .bind(spec)
        .bind(s.at)
        .bind(s.at)
        .execute(&mut **tx)
        .await?;
    } else {
        sqlx::query("UPDATE services SET name = ?, spec = ?, updated_at = ? WHERE id = ?")
            .bind(&s.name)
            .bind(spec)
            .bind(s.at)
            .bind(&s.id)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("DELETE FROM service_domains WHERE service_id = ?").bind(&s.id).execute(&mut **tx).await?;
    for domain in &s.domains {
        sqlx::query("INSERT INTO service_domains (domain, service_id) VALUES (?, ?)")
            .bind(domain)
            .bind(&s.id)
            .execute(&mut **tx)
            .await?;
    }
    for name in unset_secrets {
        sqlx::query("DELETE FROM service_secrets WHERE service_id = ? AND name = ?")
            .bind(&s.id)
            .bind(name)
            .execute(&mut **tx)
            .await?;
    }
    for (name, sealed_hex) in set_secrets {
        sqlx::query(
            "INSERT INTO service_secrets (service_id, name, sealed, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (service_id, name) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
        )
        .bind(&s.id)
        .bind(name)
        .bind(hex::decode(sealed_hex).unwrap_or_default())
        .bind(s.at)
        .execute(&mut **tx)
        .await?;
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
        let mut tx = pool.begin().await.unwrap();
        assert!(matches!(
            apply(&mut tx, create("p0", "old"), &mut Vec::new()).await.unwrap(),
            CommandResponse::Applied
        ));
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
        let CommandResponse::Batch { responses } = apply(&mut tx, batch, &mut Vec::new()).await.unwrap() else {
            panic!("a batch answers a batch");
        };
        assert_eq!(responses.len(), 6);
        assert!(matches!(responses[0], CommandResponse::Applied));
        assert!(is_conflict(&responses[1]) && is_conflict(&responses[2]) && is_conflict(&responses[3]));
        assert!(matches!(responses[4], CommandResponse::Rejected { reason: Rejection::NotFound, .. }));
        assert!(matches!(responses[5], CommandResponse::Applied));
        tx.commit().await.unwrap();
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM projects ORDER BY name").fetch_all(&pool).await.unwrap();
        assert_eq!(names, ["api", "old", "web"]);
    }
}

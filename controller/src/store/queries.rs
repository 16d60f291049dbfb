//! Reads of the replicated state, for the API and the cluster services. Each node reads its own
//! copy; writes go through Raft.

use serde::Serialize;
use sqlx::sqlite::SqlitePool;
use sqlx::Row;

use crate::command::{JoinTokenKind, UnixMillis};

#[derive(Clone)]
pub struct StateReader {
    pool: SqlitePool,
    /// The index of the last applied entry: what cached listings are valid for.
    applied: tokio::sync::watch::Receiver<u64>,
    listings: std::sync::Arc<ListingCache>,
}

/// Project listings by their query, valid for one applied index: a dashboard polling the same
/// page costs no query until the state changes. Entries are read after the caller's read
/// barrier, so a cached page is never older than what the caller must see.
#[derive(Default)]
struct ListingCache {
    entries: std::sync::Mutex<(u64, Listings)>,
}

/// (limit, before, member) of a listing.
type ListingKey = (u32, Option<String>, Option<String>);
type Listings = std::collections::HashMap<ListingKey, std::sync::Arc<Vec<Project>>>;

/// Most listings kept for one applied index.
const LISTING_CACHE_MAX: usize = 1024;

#[derive(Clone, Debug, Serialize)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub created_at: UnixMillis,
}

pub struct ClusterCaRow {
    pub ca_cert_pem: String,
    pub ca_key_sealed: Vec<u8>,
}

pub struct JoinTokenRow {
    pub id: String,
    pub kind: Option<JoinTokenKind>,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

#[derive(Clone, Debug, Serialize)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub admin: bool,
    pub created_at: UnixMillis,
}

#[derive(Clone, Debug)]
pub struct ApiTokenRow {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
    pub revoked_at: Option<UnixMillis>,
    /// The user it acts as (`None`: the cluster's first admin token).
    pub user: Option<UserRow>,
}

#[derive(Clone, Debug)]
pub struct SessionRow {
    pub id: String,
    pub user: UserRow,
    pub expires_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

#[derive(Clone, Debug)]
pub struct AuditRow {
    pub seq: i64,
    pub id: String,
    pub at: UnixMillis,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub project_id: Option<String>,
    pub source: String,
}

impl StateReader {
    pub fn new(pool: SqlitePool, applied: tokio::sync::watch::Receiver<u64>) -> StateReader {
        StateReader { pool, applied, listings: Default::default() }
    }

    pub async fn cluster_ca(&self) -> Result<Option<ClusterCaRow>, sqlx::Error> {
        let row = sqlx::query("SELECT ca_cert_pem, ca_key_sealed FROM cluster WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| ClusterCaRow { ca_cert_pem: r.get(0), ca_key_sealed: r.get(1) }))
    }

    fn join_token_row(row: sqlx::sqlite::SqliteRow) -> JoinTokenRow {
        let kind: String = row.get(1);
        JoinTokenRow {
            id: row.get(0),
            kind: JoinTokenKind::parse(&kind),
            created_at: row.get(2),
            expires_at: row.get(3),
            revoked_at: row.get(4),
        }
    }

    pub async fn join_token_by_hash(&self, secret_hash: &str) -> Result<Option<JoinTokenRow>, sqlx::Error> {
        let row =
            sqlx::query("SELECT id, kind, created_at, expires_at, revoked_at FROM join_tokens WHERE secret_hash = ?")
                .bind(secret_hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(Self::join_token_row))
    }

    pub async fn join_tokens(&self) -> Result<Vec<JoinTokenRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, kind, created_at, expires_at, revoked_at FROM join_tokens ORDER BY created_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Self::join_token_row).collect())
    }

    fn api_token_row(r: sqlx::sqlite::SqliteRow) -> ApiTokenRow {
        let scopes: String = r.get(2);
        let user_id: Option<String> = r.get(6);
        ApiTokenRow {
            id: r.get(0),
            name: r.get(1),
            scopes: serde_json::from_str(&scopes).unwrap_or_default(),
            created_at: r.get(3),
            expires_at: r.get(4),
            revoked_at: r.get(5),
            user: user_id.map(|id| UserRow { id, email: r.get(7), admin: r.get(8), created_at: r.get(9) }),
        }
    }

    pub async fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT t.id, t.name, t.scopes, t.created_at, t.expires_at, t.revoked_at, u.id, u.email, u.admin, \
             u.created_at FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Self::api_token_row))
    }

    /// API tokens, newest first: a user's, or (`None`) everyone's.
    pub async fn api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiTokenRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT t.id, t.name, t.scopes, t.created_at, t.expires_at, t.revoked_at, u.id, u.email, u.admin, \
             u.created_at FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id \
             WHERE ? IS NULL OR t.user_id = ? ORDER BY t.created_at DESC, t.id DESC",
        )
        .bind(user_id)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Self::api_token_row).collect())
    }

    pub async fn session_by_hash(&self, token_hash: &str) -> Result<Option<SessionRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT s.id, s.expires_at, s.revoked_at, u.id, u.email, u.admin, u.created_at \
             FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| SessionRow {
            id: r.get(0),
            expires_at: r.get(1),
            revoked_at: r.get(2),
            user: UserRow { id: r.get(3), email: r.get(4), admin: r.get(5), created_at: r.get(6) },
        }))
    }

    /// A user and their password hash, by email (any case).
    pub async fn user_by_email(&self, email: &str) -> Result<Option<(UserRow, String)>, sqlx::Error> {
        let row = sqlx::query("SELECT id, email, admin, created_at, password_hash FROM users WHERE email = ?")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (UserRow { id: r.get(0), email: r.get(1), admin: r.get(2), created_at: r.get(3) }, r.get(4))))
    }

    pub async fn user(&self, id: &str) -> Result<Option<UserRow>, sqlx::Error> {
        let row = sqlx::query("SELECT id, email, admin, created_at FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| UserRow { id: r.get(0), email: r.get(1), admin: r.get(2), created_at: r.get(3) }))
    }

    pub async fn users(&self) -> Result<Vec<UserRow>, sqlx::Error> {
        let rows = sqlx::query("SELECT id, email, admin, created_at FROM users ORDER BY created_at DESC, id DESC")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| UserRow { id: r.get(0), email: r.get(1), admin: r.get(2), created_at: r.get(3) })
            .collect())
    }

    /// The user's role on the project, if they are a collaborator.
    pub async fn collaborator_role(&self, project_id: &str, user_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT role FROM collaborators WHERE project_id = ? AND user_id = ?")
            .bind(project_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn collaborators(&self, project_id: &str) -> Result<Vec<(UserRow, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT u.id, u.email, u.admin, u.created_at, c.role FROM collaborators c JOIN users u ON u.id = c.user_id \
             WHERE c.project_id = ? ORDER BY c.added_at, u.email",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (UserRow { id: r.get(0), email: r.get(1), admin: r.get(2), created_at: r.get(3) }, r.get(4)))
            .collect())
    }

    /// Audit entries, newest first, optionally of one project; `before` is a `seq`.
    pub async fn audit(
        &self,
        project_id: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<AuditRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT seq, id, at, actor, action, target, project_id, source FROM audit \
             WHERE (? IS NULL OR project_id = ?) AND (? IS NULL OR seq < ?) ORDER BY seq DESC LIMIT ?",
        )
        .bind(project_id)
        .bind(project_id)
        .bind(before)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AuditRow {
                seq: r.get(0),
                id: r.get(1),
                at: r.get(2),
                actor: r.get(3),
                action: r.get(4),
                target: r.get(5),
                project_id: r.get(6),
                source: r.get(7),
            })
            .collect())
    }

    fn project_row(row: sqlx::sqlite::SqliteRow) -> Project {
        Project { id: row.get(0), name: row.get(1), created_at: row.get(2) }
    }

    pub async fn project(&self, id: &str) -> Result<Option<Project>, sqlx::Error> {
        let row = sqlx::query("SELECT id, name, created_at FROM projects WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Self::project_row))
    }

    /// Newest first; `before` is the id of a project, for paging. With `member`, only the
    /// projects that user collaborates on.
    ///
    /// The rows come back as one JSON array built by SQLite: sqlx hands rows over from its
    /// worker thread one message at a time, which costs more than the query itself.
    pub async fn projects(
        &self,
        limit: u32,
        before: Option<&str>,
        member: Option<&str>,
    ) -> Result<std::sync::Arc<Vec<Project>>, sqlx::Error> {
        let version = *self.applied.borrow();
        let key = (limit, before.map(str::to_string), member.map(str::to_string));
        {
            let cache = self.listings.entries.lock().unwrap_or_else(|e| e.into_inner());
            if cache.0 == version {
                if let Some(hit) = cache.1.get(&key) {
                    return Ok(hit.clone());
                }
            }
        }
        let projects = std::sync::Arc::new(self.query_projects(limit, before, member).await?);
        // Only if nothing was applied meanwhile: the rows then hold exactly that index's state
        // (or a newer one, which a reader may see too).
        if *self.applied.borrow() == version {
            let mut cache = self.listings.entries.lock().unwrap_or_else(|e| e.into_inner());
            if cache.0 != version || cache.1.len() >= LISTING_CACHE_MAX {
                cache.1.clear();
                cache.0 = version;
            }
            cache.1.insert(key, projects.clone());
        }
        Ok(projects)
    }

    async fn query_projects(
        &self,
        limit: u32,
        before: Option<&str>,
        member: Option<&str>,
    ) -> Result<Vec<Project>, sqlx::Error> {
        let membership = if member.is_some() {
            "JOIN collaborators c ON c.project_id = p.id AND c.user_id = ?1"
        } else {
            "WHERE ?1 IS NULL"
        };
        let paging = if before.is_some() {
            " AND (p.created_at, p.id) < (SELECT b.created_at, b.id FROM projects b WHERE b.id = ?2)"
        } else {
            " AND ?2 IS NULL"
        };
        let sql = format!(
            "SELECT json_group_array(json_array(id, name, created_at)) FROM \
             (SELECT p.id, p.name, p.created_at FROM projects p {membership} {} {paging} \
              ORDER BY p.created_at DESC, p.id DESC LIMIT ?3)",
            if member.is_some() { "WHERE 1" } else { "" }
        );
        let json: String = sqlx::query_scalar(&sql).bind(member).bind(before).bind(limit).fetch_one(&self.pool).await?;
        let rows: Vec<(String, String, UnixMillis)> =
            serde_json::from_str(&json).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        Ok(rows.into_iter().map(|(id, name, created_at)| Project { id, name, created_at }).collect())
    }
}

#[derive(Clone, Debug)]
pub struct AgentRow {
    pub id: String,
    pub hostname: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub version: String,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    pub status: String,
    pub last_seen: UnixMillis,
    pub created_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
    /// Where its ingress answers plain HTTP (host:port; '' for none), and its HTTPS port.
    pub ingress: String,
    pub ingress_https_port: i64,
}

const AGENT_COLUMNS: &str = "id, hostname, labels, version, cpu_millis, memory_bytes, status, last_seen, created_at, \
     revoked_at, ingress, ingress_https_port";

impl StateReader {
    fn agent_row(row: sqlx::sqlite::SqliteRow) -> AgentRow {
        let labels: String = row.get(2);
        AgentRow {
            id: row.get(0),
            hostname: row.get(1),
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            version: row.get(3),
            cpu_millis: row.get(4),
            memory_bytes: row.get(5),
            status: row.get(6),
            last_seen: row.get(7),
            created_at: row.get(8),
            revoked_at: row.get(9),
            ingress: row.get(10),
            ingress_https_port: row.get(11),
        }
    }

    /// One agent, revoked or not.
    pub async fn agent(&self, id: &str) -> Result<Option<AgentRow>, sqlx::Error> {
        let row = sqlx::query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Self::agent_row))
    }

    /// Agents that are not revoked, newest first.
    pub async fn agents(&self) -> Result<Vec<AgentRow>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE revoked_at IS NULL ORDER BY created_at DESC, id DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Self::agent_row).collect())
    }
}

#[derive(Clone, Debug)]
pub struct ServiceRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub spec: serde_json::Value,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// Names of the secrets set (never their values).
    pub secret_names: Vec<String>,
}

impl StateReader {
    async fn service_rows(&self, rows: Vec<sqlx::sqlite::SqliteRow>) -> Result<Vec<ServiceRow>, sqlx::Error> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.get(0);
            let spec: String = r.get(3);
            let secret_names =
                sqlx::query_scalar("SELECT name FROM service_secrets WHERE service_id = ? ORDER BY name")
                    .bind(&id)
                    .fetch_all(&self.pool)
                    .await?;
            out.push(ServiceRow {
                id,
                project_id: r.get(1),
                name: r.get(2),
                spec: serde_json::from_str(&spec).unwrap_or_default(),
                created_at: r.get(4),
                updated_at: r.get(5),
                secret_names,
            });
        }
        Ok(out)
    }

    /// The project's services, by name.
    pub async fn services(&self, project_id: &str) -> Result<Vec<ServiceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, project_id, name, spec, created_at, updated_at FROM services WHERE project_id = ? ORDER BY name",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        self.service_rows(rows).await
    }

    pub async fn service(&self, project_id: &str, id: &str) -> Result<Option<ServiceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, project_id, name, spec, created_at, updated_at FROM services WHERE id = ? AND project_id = ?",
        )
        .bind(id)
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(self.service_rows(rows).await?.into_iter().next())
    }

    /// A secret's sealed value (for the agent that runs the service).
    pub async fn sealed_secrets(&self, service_id: &str) -> Result<Vec<(String, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as("SELECT name, sealed FROM service_secrets WHERE service_id = ? ORDER BY name")
            .bind(service_id)
            .fetch_all(&self.pool)
            .await
    }
}

/// A deployment as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeploymentRow {
    pub id: String,
    pub seq: i64,
    pub project_id: String,
    pub service_id: String,
    pub status: String,
    pub source: String,
    #[sqlx(rename = "ref")]
    pub reference: Option<String>,
    pub attempt: i64,
    pub requeues: i64,
    pub excluded: String,
    pub not_before: i64,
    pub agent_id: Option<String>,
    pub image: Option<String>,
    pub commit_sha: Option<String>,
    pub url: Option<String>,
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: UnixMillis,
    pub started_at: Option<UnixMillis>,
    pub healthy_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub updated_at: UnixMillis,
    /// The preview environment's key ("" for the service's own releases).
    pub preview: String,
    /// Where its status is reported (JSON; "" for nowhere).
    pub notify: String,
}

impl DeploymentRow {
    pub fn status(&self) -> crate::command::DeploymentStatus {
        crate::command::DeploymentStatus::parse(&self.status).unwrap_or(crate::command::DeploymentStatus::Failed)
    }

    pub fn excluded(&self) -> Vec<String> {
        serde_json::from_str(&self.excluded).unwrap_or_default()
    }
}

/// A stored log line, with its number.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LogRow {
    pub n: i64,
    pub attempt: i64,
    pub level: String,
    pub message: String,
    pub at: UnixMillis,
    pub phase: String,
    pub step: Option<String>,
}

impl StateReader {
    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM deployments WHERE id = ?").bind(id).fetch_optional(&self.pool).await
    }

    /// A service's deployments, newest first, `limit` of them older than `before` (a deployment id).
    pub async fn deployments_of_service(
        &self,
        service_id: &str,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT * FROM deployments WHERE service_id = ?1 \
             AND (?2 IS NULL OR seq < (SELECT seq FROM deployments WHERE id = ?2)) \
             ORDER BY seq DESC LIMIT ?3",
        )
        .bind(service_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// Deployments that are queued or in progress, oldest first: the dispatcher's queue.
    pub async fn active_deployments(&self) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM deployments WHERE status IN ('queued', 'building', 'deploying') ORDER BY seq")
            .fetch_all(&self.pool)
            .await
    }

    /// Reserved resources per agent: what its running and in-progress deployments asked for.
    pub async fn running_on_agents(&self) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT d.agent_id, d.service_id, s.spec FROM deployments d JOIN services s ON s.id = d.service_id \
             WHERE d.agent_id IS NOT NULL AND d.status IN ('running', 'building', 'deploying')",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Log lines numbered above `after`, in order, at most `limit`.
    pub async fn deployment_logs(&self, id: &str, after: i64, limit: u32) -> Result<Vec<LogRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT n, attempt, level, message, at, phase, step FROM deployment_logs \
             WHERE deployment_id = ? AND n > ? ORDER BY n LIMIT ?",
        )
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// The chunks of an uploaded tarball from `chunk` on, at most `limit`.
    pub async fn upload_chunks(&self, id: &str, chunk: u32, limit: u32) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as("SELECT chunk, data FROM uploads WHERE id = ? AND chunk >= ? ORDER BY chunk LIMIT ?")
            .bind(id)
            .bind(chunk)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
    }

    /// Uploads of deployments beyond the newest `keep` of their service that ended.
    pub async fn stale_uploads(&self, keep: u32) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT u.id FROM uploads u JOIN deployments d ON d.id = u.id \
             WHERE d.status NOT IN ('queued', 'building', 'deploying') \
             AND (SELECT COUNT(*) FROM deployments n WHERE n.service_id = d.service_id AND n.seq > d.seq) >= ?",
        )
        .bind(keep)
        .fetch_all(&self.pool)
        .await
    }
}

/// A service with a running deployment, as the ingress routes it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RoutedRow {
    pub service_id: String,
    pub service_name: String,
    pub project_name: String,
    pub deployment_id: String,
    pub agent_id: String,
    /// The running agent's ingress, host:port ('' when it runs none).
    pub ingress: String,
    pub ingress_https_port: i64,
    /// The preview environment's key ("" for the service's own release).
    pub preview: String,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct CertificateRow {
    pub domain: String,
    pub cert_chain_pem: String,
    pub key_sealed: Option<Vec<u8>>,
    pub not_before: UnixMillis,
    pub not_after: UnixMillis,
    pub error: Option<String>,
    pub retry_at: UnixMillis,
}

impl StateReader {
    /// Every service's running deployment and the agent that runs it, by service id.
    pub async fn routed_services(&self) -> Result<Vec<RoutedRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT s.id AS service_id, s.name AS service_name, p.name AS project_name, d.id AS deployment_id, \
             d.agent_id AS agent_id, a.ingress AS ingress, a.ingress_https_port AS ingress_https_port, \
             d.preview AS preview \
             FROM deployments d JOIN services s ON s.id = d.service_id JOIN projects p ON p.id = s.project_id \
             JOIN agents a ON a.id = d.agent_id \
             WHERE d.status = 'running' AND a.revoked_at IS NULL ORDER BY s.id, d.preview, d.seq DESC",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Custom domains and the services that claim them.
    pub async fn service_domains(&self) -> Result<Vec<(String, String)>, sqlx::Error> {
        sqlx::query_as("SELECT domain, service_id FROM service_domains ORDER BY domain").fetch_all(&self.pool).await
    }

    /// The default host names' CA: its certificate and sealed key.
    pub async fn ingress_ca(&self) -> Result<Option<(String, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as("SELECT cert_pem, key_sealed FROM ingress_ca WHERE id = 1").fetch_optional(&self.pool).await
    }

    /// The ACME account: its directory and sealed credentials.
    pub async fn acme_account(&self) -> Result<Option<(String, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as("SELECT directory_url, credentials_sealed FROM acme_account WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn certificates(&self) -> Result<Vec<CertificateRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT domain, cert_chain_pem, key_sealed, not_before, not_after, error, retry_at FROM certificates \
             ORDER BY domain",
        )
        .fetch_all(&self.pool)
        .await
    }
}

impl StateReader {
    /// Where an agent's ingress answers plain HTTP (host:port; '' for none).
    pub async fn agent_ingress(&self, id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT ingress FROM agents WHERE id = ?").bind(id).fetch_optional(&self.pool).await
    }
}

/// A secret with the one it replaced, valid until `previous_until`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RotatedSecret {
    pub owner: String,
    pub sealed: Vec<u8>,
    pub previous_sealed: Option<Vec<u8>>,
    pub previous_until: UnixMillis,
}

impl StateReader {
    /// Every project's own webhook secret.
    pub async fn webhook_secrets(&self) -> Result<Vec<RotatedSecret>, sqlx::Error> {
        sqlx::query_as(
            "SELECT project_id AS owner, sealed, previous_sealed, previous_until FROM project_webhook_secrets \
             ORDER BY project_id",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// A service's deploy hook secret.
    pub async fn deploy_hook(&self, service_id: &str) -> Result<Option<RotatedSecret>, sqlx::Error> {
        sqlx::query_as(
            "SELECT service_id AS owner, sealed, previous_sealed, previous_until FROM service_deploy_hooks \
             WHERE service_id = ?",
        )
        .bind(service_id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Services built from git, in every project: (service id, project id, name, spec).
    pub async fn git_services(&self) -> Result<Vec<(String, String, String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, project_id, name, spec FROM services WHERE json_extract(spec, '$.source.git') IS NOT NULL \
             ORDER BY project_id, name",
        )
        .fetch_all(&self.pool)
        .await
    }
}

impl StateReader {
    /// The project of a service, by the service's id alone.
    pub async fn service_project(&self, service_id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT project_id FROM services WHERE id = ?")
            .bind(service_id)
            .fetch_optional(&self.pool)
            .await
    }
}

impl StateReader {
    /// Whether a webhook delivery older than `before` is remembered.
    pub async fn webhook_deliveries_before(&self, before: UnixMillis) -> Result<bool, sqlx::Error> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM webhook_deliveries WHERE received_at < ? LIMIT 1")
            .bind(before)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }
}

/// A preview environment.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PreviewRow {
    pub id: String,
    pub project_id: String,
    pub key: String,
    pub origin: String,
    pub number: Option<i64>,
    pub branch: String,
    pub commit_sha: String,
    pub status: String,
    pub expires_at: UnixMillis,
    pub teardown_error: Option<String>,
    pub teardown_tries: i64,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    pub destroyed_at: Option<UnixMillis>,
}

const PREVIEW_COLUMNS: &str = "id, project_id, key, origin, number, branch, commit_sha, status, expires_at, \
     teardown_error, teardown_tries, created_at, updated_at, destroyed_at";

impl StateReader {
    /// A project's previews, newest first (destroyed ones too), at most `limit`.
    pub async fn previews(&self, project_id: &str, limit: u32) -> Result<Vec<PreviewRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {PREVIEW_COLUMNS} FROM previews WHERE project_id = ? ORDER BY created_at DESC, id DESC LIMIT ?"
        ))
        .bind(project_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// The live (not destroyed) preview with this key.
    pub async fn live_preview(&self, project_id: &str, key: &str) -> Result<Option<PreviewRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {PREVIEW_COLUMNS} FROM previews WHERE project_id = ? AND key = ? AND status != 'destroyed'"
        ))
        .bind(project_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await
    }

    /// Previews being torn down, and active ones past their expiry.
    pub async fn previews_to_tend(&self, now: UnixMillis) -> Result<Vec<PreviewRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {PREVIEW_COLUMNS} FROM previews WHERE status = 'destroying' \
             OR (status = 'active' AND expires_at <= ?) ORDER BY updated_at"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await
    }

    /// A preview's deployments and the agents they were placed on: (deployment id, agent id).
    pub async fn preview_deployments(
        &self,
        project_id: &str,
        key: &str,
    ) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
        sqlx::query_as("SELECT id, agent_id FROM deployments WHERE project_id = ? AND preview = ? ORDER BY seq")
            .bind(project_id)
            .bind(key)
            .fetch_all(&self.pool)
            .await
    }

    /// Whether the project deploys previews.
    pub async fn previews_enabled(&self, project_id: &str) -> Result<Option<bool>, sqlx::Error> {
        sqlx::query_scalar("SELECT previews_enabled != 0 FROM projects WHERE id = ?")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await
    }
}

impl StateReader {
    /// Active previews made by hand for this branch, in every project: (project id, key).
    pub async fn branch_previews(&self, branch: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT project_id, key FROM previews WHERE status = 'active' AND origin = 'api' AND branch = ? \
             ORDER BY project_id",
        )
        .bind(branch)
        .fetch_all(&self.pool)
        .await
    }
}

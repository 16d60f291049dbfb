//! Reads of the replicated state, for the API and the cluster services. Each node reads its own
//! copy; writes go through Raft.

use serde::Serialize;
use sqlx::sqlite::SqlitePool;
use sqlx::Row;

use crate::command::{JoinTokenKind, UnixMillis};

#[derive(Clone)]
pub struct StateReader {
    pool: SqlitePool,
}

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

#[derive(Clone, Debug)]
pub struct ApiTokenRow {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<UnixMillis>,
    pub revoked_at: Option<UnixMillis>,
}

impl StateReader {
    pub fn new(pool: SqlitePool) -> StateReader {
        StateReader { pool }
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

    pub async fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, sqlx::Error> {
        let row = sqlx::query("SELECT id, name, scopes, expires_at, revoked_at FROM api_tokens WHERE token_hash = ?")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| {
            let scopes: String = r.get(2);
            ApiTokenRow {
                id: r.get(0),
                name: r.get(1),
                scopes: serde_json::from_str(&scopes).unwrap_or_default(),
                expires_at: r.get(3),
                revoked_at: r.get(4),
            }
        }))
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

    /// Newest first; `before` is the id of a project, for paging.
    pub async fn projects(&self, limit: u32, before: Option<&str>) -> Result<Vec<Project>, sqlx::Error> {
        let rows = match before {
            Some(before) => {
                sqlx::query(
                    "SELECT p.id, p.name, p.created_at FROM projects p, projects b WHERE b.id = ? \
                     AND (p.created_at < b.created_at OR (p.created_at = b.created_at AND p.id < b.id)) \
                     ORDER BY p.created_at DESC, p.id DESC LIMIT ?",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT id, name, created_at FROM projects ORDER BY created_at DESC, id DESC LIMIT ?")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.into_iter().map(Self::project_row).collect())
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
}

const AGENT_COLUMNS: &str =
    "id, hostname, labels, version, cpu_millis, memory_bytes, status, last_seen, created_at, revoked_at";

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

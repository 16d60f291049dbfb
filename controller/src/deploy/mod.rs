//! The deploy path on the controller: the leader's dispatcher, which hands queued deployments
//! to agents, and what it does with their reports (DESIGN.md section 4).
//!
//! Everything that must survive a leader change is committed: the queue (deployments `queued`,
//! in `seq` order), each attempt's agent (`AssignDeployment`), every status change and the log
//! lines. What only the current leader needs lives here in memory: which attempt was sent on
//! which agent session. A new leader starts with none, and so sends every attempt in progress
//! again; the agent runs a given attempt at most once and answers a repeat with where it
//! stands, so no deployment is lost or run twice.

pub mod dispatch;
pub mod notify;
pub mod previews;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a deployment's status is reported: the git host, repository and commit of the push or
/// pull request that asked for it (stored as JSON in `deployments.notify`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notify {
    /// `github` or `gitlab`.
    pub provider: String,
    /// `owner/name` (GitHub) or the project's path (GitLab).
    pub repo: String,
    pub sha: String,
    /// The pull or merge request, for a preview.
    pub number: Option<u64>,
}

impl Notify {
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What a deployment deploys, fixed when it is asked for (stored as JSON in `deployments.source`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploySource {
    Git {
        url: String,
        branch: String,
        commit: Option<String>,
        dockerfile: String,
    },
    Image(String),
    Upload {
        size: u64,
        sha256: String,
        chunks: u32,
        dockerfile: String,
    },
    /// The image of an earlier deployment (`of`), run again without a build on the agent that
    /// built it (`agent`), the only one that has it.
    Rollback {
        image: String,
        of: String,
        agent: String,
    },
}

#[derive(Clone, Debug)]
pub struct DeploySettings {
    /// Attempts in progress at once, cluster-wide (`DEPLOYER_MAX_CONCURRENT_DEPLOYMENTS`).
    pub max_concurrent: usize,
    /// Failed attempts tried again (transient failures only).
    pub retries: u32,
    /// Wait before the first retry; doubled for each one after.
    pub retry_base: Duration,
    /// How long a new instance may take to pass its health check.
    pub health_timeout: Duration,
    /// Deployments (sources, images, uploads) kept per service.
    pub keep: u32,
    /// Largest source upload.
    pub max_upload_bytes: u64,
    /// `WEBHOOK_SECRET`: the webhook secret of every project without its own.
    pub webhook_secret: Option<String>,
    /// How long a replaced webhook or deploy hook secret stays valid.
    pub webhook_grace: Duration,
    /// Largest webhook body.
    pub webhook_max_bytes: usize,
    /// A preview without a push for this long is destroyed.
    pub preview_ttl: Duration,
    /// Where deployment statuses are reported.
    pub git_hosts: notify::GitHostSettings,
}

impl Default for DeploySettings {
    fn default() -> Self {
        DeploySettings {
            max_concurrent: 3,
            retries: 3,
            retry_base: Duration::from_secs(2),
            health_timeout: Duration::from_secs(60),
            keep: 5,
            max_upload_bytes: 256 << 20,
            webhook_secret: None,
            webhook_grace: Duration::from_secs(24 * 3600),
            webhook_max_bytes: 5 << 20,
            preview_ttl: Duration::from_secs(7 * 24 * 3600),
            git_hosts: notify::GitHostSettings {
                github_api_url: "https://api.github.com".into(),
                gitlab_url: "https://gitlab.com".into(),
                ..Default::default()
            },
        }
    }
}

/// Size of one stored chunk of an uploaded tarball.
pub const UPLOAD_CHUNK: usize = 256 * 1024;

/// The leader's memory of what it sent: attempt -> the agent session serial it went out on.
#[derive(Default)]
pub struct Dispatcher {
    pub settings: DeploySettings,
    sent: Mutex<HashMap<(String, u32), u64>>,
    wake: tokio::sync::Notify,
    /// Preview teardowns in progress: what the agents answered.
    pub teardowns: previews::Teardowns,
}

impl Dispatcher {
    pub fn new(settings: DeploySettings) -> Dispatcher {
        Dispatcher { settings, ..Default::default() }
    }

    /// Something changed that may let the dispatcher act now rather than at its next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), u64>> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn was_sent(&self, id: &str, attempt: u32, serial: u64) -> bool {
        self.lock().get(&(id.to_string(), attempt)) == Some(&serial)
    }

    fn mark_sent(&self, id: &str, attempt: u32, serial: u64) {
        self.lock().insert((id.to_string(), attempt), serial);
    }

    fn forget(&self, keep: impl Fn(&(String, u32)) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }
}

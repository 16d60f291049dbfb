//! Status back to the git host: the leader sets a commit status for every deployment a push or
//! a pull request asked for (pending while it builds, success with its URL, failure with the
//! reason) and, for a preview, posts (or edits) one comment on the pull or merge request with
//! where the preview answers. Only when credentials are configured; a host that refuses is
//! logged and does not hold anything up.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::command::DeploymentStatus;
use crate::controller::SharedController;
use crate::deploy::Notify;
use crate::githost::{Credentials, GitHost, State, StatusUpdate};
use crate::store::queries::DeploymentRow;
use crate::store::state_machine::StateEvent;

/// How to reach the git hosts (each optional).
#[derive(Clone, Debug, Default)]
pub struct GitHostSettings {
    /// A token (`GITHUB_TOKEN`), or a GitHub App (`GITHUB_APP_ID` and `GITHUB_APP_PRIVATE_KEY`).
    pub github_token: Option<String>,
    pub github_app: Option<(String, String)>,
    pub github_api_url: String,
    /// `GITLAB_ACCESS_TOKEN`.
    pub gitlab_token: Option<String>,
    pub gitlab_url: String,
    /// Roots to trust instead of the system's for the hosts' HTTPS (a private instance).
    pub roots_pem: Option<String>,
}

impl GitHostSettings {
    fn hosts(&self) -> (Option<Arc<GitHost>>, Option<Arc<GitHost>>) {
        let github = match (&self.github_app, &self.github_token) {
            (Some((app_id, key)), _) => {
                Some(Credentials::GithubApp { app_id: app_id.clone(), private_key_pem: key.clone() })
            }
            (None, Some(token)) => Some(Credentials::GithubToken(token.clone())),
            (None, None) => None,
        };
        let github = github.and_then(|credentials| {
            GitHost::new(credentials, &self.github_api_url, self.roots_pem.as_deref())
                .map_err(
                    |e| tracing::error!(error = %e, "cannot set up the GitHub client: no statuses will be reported"),
                )
                .ok()
                .map(Arc::new)
        });
        let gitlab = self.gitlab_token.clone().and_then(|token| {
            GitHost::new(Credentials::GitlabToken(token), &self.gitlab_url, self.roots_pem.as_deref())
                .map_err(
                    |e| tracing::error!(error = %e, "cannot set up the GitLab client: no statuses will be reported"),
                )
                .ok()
                .map(Arc::new)
        });
        (github, gitlab)
    }
}

pub async fn run(c: SharedController, mut events: broadcast::Receiver<StateEvent>) {
    let (github, gitlab) = c.deploys.settings.git_hosts.hosts();
    if github.is_none() && gitlab.is_none() {
        return;
    }
    // What was last reported per deployment (leader memory: a new leader may report again).
    let mut reported: HashMap<String, &'static str> = HashMap::new();
    loop {
        let id = match events.recv().await {
            Ok(StateEvent::DeploymentChanged { id, .. }) => id,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !c.agents.is_active() {
            reported.clear();
            continue;
        }
        let Ok(Some(d)) = c.state.deployment(&id).await else { continue };
        let Ok(notify) = serde_json::from_str::<Notify>(&d.notify) else { continue };
        let host = match notify.provider.as_str() {
            "github" => github.as_ref(),
            "gitlab" => gitlab.as_ref(),
            _ => None,
        };
        let Some(host) = host else { continue };
        let status = d.status();
        let (state, description) = match status {
            DeploymentStatus::Queued | DeploymentStatus::Building | DeploymentStatus::Deploying => {
                (State::Pending, format!("{} ({})", "deploying", status.as_str()))
            }
            DeploymentStatus::Running => (State::Success, "running".to_string()),
            DeploymentStatus::Failed | DeploymentStatus::Cancelled => {
                (State::Failure, d.error.clone().unwrap_or_else(|| status.as_str().to_string()))
            }
            DeploymentStatus::Superseded => continue,
        };
        // Pending once (not again for each step of the build), then the outcome once.
        let pending = matches!(state, State::Pending);
        if reported.get(&d.id).is_some_and(|last| *last == status.as_str() || pending) {
            continue;
        }
        reported.insert(d.id.clone(), status.as_str());
        let c = c.clone();
        let host = host.clone();
        tokio::spawn(async move { report(&c, &host, &d, &notify, state, description).await });
    }
}

async fn report(
    c: &SharedController,
    host: &Arc<GitHost>,
    d: &DeploymentRow,
    notify: &Notify,
    state: State,
    description: String,
) {
    let service =
        c.state.service(&d.project_id, &d.service_id).await.ok().flatten().map(|s| s.name).unwrap_or_default();
    let context = if d.preview.is_empty() {
        format!("deployer/{service}")
    } else {
        format!("deployer/{service} ({})", d.preview)
    };
    let success = matches!(state, State::Success);
    let update = StatusUpdate {
        repo: &notify.repo,
        sha: &notify.sha,
        state,
        target_url: d.url.as_deref().filter(|_| success),
        description: &description.chars().take(140).collect::<String>(),
        context: &context,
    };
    if let Err(e) = host.set_status(&update).await {
        tracing::warn!(deployment = %d.id, repo = %notify.repo, error = %e, "cannot set the commit status");
    }
    let (Some(number), true, Some(url)) = (notify.number, success, d.url.as_deref()) else { return };
    // Where every service of the preview answers: this one's URL with each one's host.
    let project = c.state.project(&d.project_id).await.ok().flatten().map(|p| p.name).unwrap_or_default();
    let own_host = c.ingress.default_host(&service, &project, &d.preview);
    let mut lines = Vec::new();
    for other in c.state.services(&d.project_id).await.unwrap_or_default() {
        let host = c.ingress.default_host(&other.name, &project, &d.preview);
        lines.push(format!("- **{}**: {}", other.name, url.replacen(&own_host, &host, 1)));
    }
    let body = format!(
        "**Preview `{}`** of this request, at `{}`:\n\n{}\n\nIt follows new pushes and is removed when the request \
         is closed.",
        d.preview,
        notify.sha.chars().take(12).collect::<String>(),
        lines.join("\n")
    );
    if let Err(e) = host.upsert_comment(&notify.repo, number, &body).await {
        tracing::warn!(deployment = %d.id, repo = %notify.repo, error = %e, "cannot comment on the request");
    }
}

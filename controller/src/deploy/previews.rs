//! The leader's tending of preview environments: a preview past its expiry is destroyed, and a
//! preview being destroyed has every agent that ran any of its deployments remove its
//! containers, images and sources, again and again until each has confirmed. Until then the
//! preview stays `destroying`, with what is left in its `teardown_error` for the API to show.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use deployer_proto::agent::controller_message::Body as ControllerBody;
use deployer_proto::agent::{ControllerMessage, DestroyPreview, PreviewDestroyed};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::command::Command;
use crate::controller::{Controller, SharedController};
use crate::store::queries::PreviewRow;
use crate::store::state_machine::StateEvent;
use crate::util::now_ms;

/// How often the leader looks at previews when nothing wakes it.
const TEND_EVERY: Duration = Duration::from_secs(2);
/// How long an agent has to answer a teardown before it is asked again.
const ASK_AGAIN: Duration = Duration::from_secs(5);

/// What agents answered about teardowns, and when each was last asked: leader memory only (a
/// new leader asks again, which is harmless: a teardown is idempotent).
#[derive(Default)]
pub struct Teardowns {
    inner: Mutex<HashMap<(String, String), HashMap<String, Asked>>>,
    wake: tokio::sync::Notify,
}

#[derive(Clone, Debug)]
enum Asked {
    Waiting(Instant),
    Done,
    Failed(String),
}

impl Teardowns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), HashMap<String, Asked>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An agent's answer to a `DestroyPreview`.
    pub fn reported(&self, agent_id: &str, report: PreviewDestroyed) {
        let answer = if report.error.is_empty() { Asked::Done } else { Asked::Failed(report.error) };
        self.lock().entry((report.project_id, report.preview)).or_default().insert(agent_id.to_string(), answer);
        self.wake.notify_one();
    }
}

pub async fn run(c: SharedController, mut events: broadcast::Receiver<StateEvent>) {
    loop {
        if c.agents.is_active() {
            if let Err(e) = tend(&c).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot tend the preview environments");
            }
        } else {
            c.deploys.teardowns.lock().clear();
        }
        let changed = async {
            loop {
                match events.recv().await {
                    Ok(StateEvent::PreviewsChanged) | Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        };
        tokio::select! {
            open = changed => if !open { return },
            _ = c.deploys.teardowns.wake.notified() => {}
            _ = tokio::time::sleep(TEND_EVERY) => {}
        }
    }
}

async fn tend(c: &Controller) -> anyhow::Result<()> {
    for preview in c.state.previews_to_tend(now_ms()).await? {
        if preview.status == "active" {
            tracing::info!(project = %preview.project_id, preview = %preview.key, "a preview expired");
            let reason = "it expired (no push within its time to live)".to_string();
            c.propose(Command::DestroyPreview {
                project_id: preview.project_id,
                key: preview.key,
                reason,
                at: now_ms(),
            })
            .await?;
            continue;
        }
        teardown(c, &preview).await?;
    }
    Ok(())
}

/// One round of a teardown: ask the agents that have not confirmed, and record the outcome.
async fn teardown(c: &Controller, preview: &PreviewRow) -> anyhow::Result<()> {
    let deployments = c.state.preview_deployments(&preview.project_id, &preview.key).await?;
    let agents: BTreeSet<String> = deployments.iter().filter_map(|(_, agent)| agent.clone()).collect();
    let ids: Vec<String> = deployments.into_iter().map(|(id, _)| id).collect();
    let project_name = c.state.project(&preview.project_id).await?.map(|p| p.name).unwrap_or_default();
    let key = (preview.project_id.clone(), preview.key.clone());
    let mut left = Vec::new();
    for agent in &agents {
        let asked = c.deploys.teardowns.lock().get(&key).and_then(|a| a.get(agent)).cloned();
        let ask = match &asked {
            Some(Asked::Done) => continue,
            Some(Asked::Waiting(at)) => at.elapsed() >= ASK_AGAIN,
            Some(Asked::Failed(error)) => {
                left.push(format!("agent {agent}: {error}"));
                true
            }
            None => true,
        };
        if !ask {
            continue;
        }
        let Some((serial, _)) = c.agents.session_of(agent) else {
            left.push(format!("agent {agent} is not connected; its part is removed once it is back"));
            continue;
        };
        let message = ControllerMessage {
            body: Some(ControllerBody::DestroyPreview(DestroyPreview {
                project_id: preview.project_id.clone(),
                preview: preview.key.clone(),
                deployment_ids: ids.clone(),
                project_name: project_name.clone(),
            })),
        };
        if c.agents.send(agent, serial, message) {
            c.deploys
                .teardowns
                .lock()
                .entry(key.clone())
                .or_default()
                .insert(agent.clone(), Asked::Waiting(Instant::now()));
        }
    }
    let all_done = {
        let teardowns = c.deploys.teardowns.lock();
        let answers = teardowns.get(&key);
        agents.iter().all(|agent| matches!(answers.and_then(|a| a.get(agent)), Some(Asked::Done)))
    };
    if all_done {
        c.propose(Command::PreviewTeardown {
            project_id: preview.project_id.clone(),
            key: preview.key.clone(),
            error: None,
            at: now_ms(),
        })
        .await?;
        c.deploys.teardowns.lock().remove(&key);
        tracing::info!(project = %preview.project_id, preview = %preview.key, "preview destroyed");
        return Ok(());
    }
    let error = (!left.is_empty()).then(|| left.join("; "));
    // Only a change is committed: a retry every few seconds must not grow the log.
    if error.is_some() && error != preview.teardown_error {
        c.propose(Command::PreviewTeardown {
            project_id: preview.project_id.clone(),
            key: preview.key.clone(),
            error,
            at: now_ms(),
        })
        .await?;
    }
    Ok(())
}

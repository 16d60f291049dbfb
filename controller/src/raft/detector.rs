//! A faster failure detector than openraft 0.9's own election timer.
//!
//! openraft waits `election_timeout_max` (its leader lease) plus a random election timeout, on a
//! tick of 1.5 heartbeats, before a follower stands: 450 to 675 ms with our defaults. Followers
//! here note every AppendEntries from the leader; once none has come for the lease plus a little
//! jitter, the detector starts the election itself. Other voters still refuse to vote while their
//! own lease runs, so this never elects earlier than Raft allows; it only removes the slack.
//! A node that has not heard from any leader since it started is left to openraft's timer, so a
//! restarting node does not disrupt a healthy leader. Granting a vote restarts the count, as in
//! Raft, so the new leader has a lease to send its first heartbeat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::Raft;

/// When this node last heard from a leader, in milliseconds since `base` (0: never).
pub struct LeaderContact {
    base: Instant,
    last_ms: AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact { base: Instant::now(), last_ms: AtomicU64::new(0) }
    }
}

impl LeaderContact {
    pub fn heard(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Time since the leader was last heard from, or None if never.
    fn silence(&self) -> Option<Duration> {
        match self.last_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base.elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }
}

/// Watches for leader silence and starts elections; runs until aborted.
///
/// On start, a node of a multi-voter cluster does not stand for election until it has heard from
/// a leader or `grace` has passed: openraft 0.9 has no pre-vote, and a restarted node that stood
/// at once would raise the term and depose a healthy leader. Each attempt that brings no leader
/// waits one more `lease` before the next, with fresh jitter, so two followers do not duel.
pub async fn run(raft: Raft, contact: Arc<LeaderContact>, lease: Duration, jitter_max: Duration, grace: Duration) {
    let voters = raft.metrics().borrow().membership_config.membership().voter_ids().count();
    let mut held_back = voters > 1;
    if held_back {
        raft.runtime_config().elect(false);
    }
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut patience = lease + jitter(jitter_max);
    // Attempts since a leader was last heard from, and when the latest was made.
    let mut attempts: u32 = 0;
    let mut last_attempt: Option<Instant> = None;
    let mut last_heard = contact.silence();
    let mut last_vote = raft.metrics().borrow().vote;
    loop {
        tick.tick().await;
        // Granting a vote counts as hearing from a leader (Raft's rule for the election timer):
        // the candidate that won gets a whole lease to send its first heartbeat. Without this
        // the other follower, whose timer still ran from the old leader, could stand a moment
        // after the winner was elected and depose it, and the failover waited for a second
        // election.
        {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            if metrics.vote != last_vote {
                if metrics.vote > last_vote && metrics.vote.leader_id().voted_for() != Some(metrics.id) {
                    contact.heard();
                }
                last_vote = metrics.vote;
            }
        }
        if held_back && (contact.silence().is_some() || started.elapsed() > grace) {
            raft.runtime_config().elect(true);
            held_back = false;
        }
        let Some(silence) = contact.silence() else { continue };
        // A leader spoke since our last attempt: start counting afresh.
        if last_heard.is_none_or(|before| silence < before) {
            attempts = 0;
            last_attempt = None;
        }
        last_heard = Some(silence);
        let quiet = match last_attempt {
            Some(at) => silence.min(at.elapsed()),
            None => silence,
        };
        if quiet < patience {
            continue;
        }
        let metrics = raft.metrics().borrow().clone();
        let voter = metrics.membership_config.membership().voter_ids().any(|id| id == metrics.id);
        if metrics.state != ServerState::Follower || !voter {
            continue;
        }
        tracing::info!(silence_ms = silence.as_millis() as u64, attempts, "leader silent; starting an election");
        if raft.trigger().elect().await.is_err() {
            return;
        }
        attempts = attempts.saturating_add(1);
        last_attempt = Some(Instant::now());
        patience = lease * (attempts + 1) + jitter(jitter_max);
    }
}

fn jitter(max: Duration) -> Duration {
    let max_ms = max.as_millis() as u64;
    if max_ms == 0 {
        return Duration::ZERO;
    }
    let random = u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or([0; 8]));
    Duration::from_millis(random % max_ms)
}

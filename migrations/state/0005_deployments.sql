-- Deployments: the durable queue and history of a service's releases. `seq` orders the queue
-- (assigned at apply, so every node agrees); `attempt` counts the times it was handed to an
-- agent; `requeues` the times it was moved off an agent that went down; `excluded` lists those
-- agents. A retried attempt waits until `not_before`.
CREATE TABLE deployments (
    id          TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL UNIQUE,
    project_id  TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    service_id  TEXT NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    status      TEXT NOT NULL CHECK (status IN
                    ('queued', 'building', 'deploying', 'running', 'failed', 'cancelled', 'superseded')),
    source      TEXT NOT NULL,              -- JSON: what to deploy, resolved when it was asked for
    ref         TEXT,                       -- the branch or commit asked for, if any
    attempt     INTEGER NOT NULL DEFAULT 0,
    requeues    INTEGER NOT NULL DEFAULT 0,
    excluded    TEXT NOT NULL DEFAULT '[]', -- JSON array of agent ids
    not_before  INTEGER NOT NULL DEFAULT 0,
    agent_id    TEXT,
    image       TEXT,
    commit_sha  TEXT,
    url         TEXT,
    error       TEXT,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    healthy_at  INTEGER,                    -- when it first ran healthy: a rollback target
    finished_at INTEGER,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX deployments_service ON deployments (service_id, seq DESC);
CREATE INDEX deployments_project ON deployments (project_id, seq DESC);
CREATE INDEX deployments_active ON deployments (status, seq)
    WHERE status IN ('queued', 'building', 'deploying');

-- Log lines of a deployment, numbered at apply (`n`). Lines an agent sent carry the attempt
-- and the agent's own sequence number, so a line sent again after a reconnect is kept once.
CREATE TABLE deployment_logs (
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    n             INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    agent_seq     INTEGER,
    level         TEXT NOT NULL,
    message       TEXT NOT NULL,
    at            INTEGER NOT NULL,
    phase         TEXT NOT NULL,
    step          TEXT,
    PRIMARY KEY (deployment_id, n)
);
CREATE UNIQUE INDEX deployment_logs_agent ON deployment_logs (deployment_id, attempt, agent_seq)
    WHERE agent_seq IS NOT NULL;

-- Uploaded source tarballs, in chunks, kept until their deployment is cleaned up.
CREATE TABLE uploads (
    id         TEXT NOT NULL,
    chunk      INTEGER NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (id, chunk)
);

-- The agent registry. A row is created when an agent joins with a token; its status changes
-- only by committed commands of the leader's liveness tracking. A revoked agent keeps its row
-- (so its certificate stays refused) but is no longer listed.
CREATE TABLE agents (
    id           TEXT PRIMARY KEY,
    hostname     TEXT NOT NULL,
    labels       TEXT NOT NULL,             -- JSON object
    version      TEXT NOT NULL DEFAULT '',
    cpu_millis   INTEGER NOT NULL DEFAULT 0,
    memory_bytes INTEGER NOT NULL DEFAULT 0,
    status       TEXT NOT NULL CHECK (status IN ('ready', 'down', 'draining')),
    last_seen    INTEGER NOT NULL,
    token_id     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX agents_created ON agents (created_at DESC, id DESC);

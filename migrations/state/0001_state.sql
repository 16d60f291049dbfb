-- The replicated state machine of the controller cluster. Every row here is written only by
-- applying committed Raft commands; a snapshot is a consistent copy of this whole database.

-- Which log entry was applied last and the membership it carried (one row).
CREATE TABLE raft_applied (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    last_applied TEXT,
    membership   TEXT NOT NULL
);

-- The cluster CA. Its private key is sealed with the cluster key, which never enters this database.
CREATE TABLE cluster (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    ca_cert_pem   TEXT NOT NULL,
    ca_key_sealed BLOB NOT NULL,
    created_at    INTEGER NOT NULL
);

-- Join tokens; only the sha256 of the secret is kept.
CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('controller', 'agent')),
    secret_hash TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- API tokens; only the sha256 of the token is kept. Scopes: JSON array.
CREATE TABLE api_tokens (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    scopes     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);

CREATE TABLE projects (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE INDEX projects_created ON projects (created_at DESC, id DESC);

-- People and what they may do: users, their dashboard sessions, API tokens acting as them,
-- per-project roles, and the audit log of every mutating call.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,              -- Argon2id, PHC string
    admin         INTEGER NOT NULL DEFAULT 0, -- cluster administrator
    created_at    INTEGER NOT NULL
);

-- Dashboard sessions; only the sha256 of the cookie value is kept.
CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);

-- A token acts as its user (NULL: the cluster's first admin token, which belongs to no user).
ALTER TABLE api_tokens ADD COLUMN user_id TEXT REFERENCES users (id) ON DELETE CASCADE;

CREATE TABLE collaborators (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'developer', 'admin', 'owner')),
    added_at   INTEGER NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX collaborators_user ON collaborators (user_id);

-- Who did what, when, from where. `seq` orders entries; it is assigned on apply, the same on
-- every node (rows are never deleted, and a snapshot copies them as they are).
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    project_id TEXT,
    source     TEXT NOT NULL
);
CREATE INDEX audit_project ON audit (project_id, seq);

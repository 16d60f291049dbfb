-- Preview environments: one per open pull or merge request (or made by hand for a branch),
-- every service of the project deployed again from its head at `<service>-<project>-<key>`.
-- A preview's deployments carry its key; the service's own have ''.
ALTER TABLE deployments ADD COLUMN preview TEXT NOT NULL DEFAULT '';
-- Where to report the deployment's status (JSON: provider, repo, sha, number), '' for nowhere.
ALTER TABLE deployments ADD COLUMN notify TEXT NOT NULL DEFAULT '';
CREATE INDEX deployments_preview ON deployments (project_id, preview) WHERE preview != '';

ALTER TABLE projects ADD COLUMN previews_enabled INTEGER NOT NULL DEFAULT 1;

CREATE TABLE previews (
    id               TEXT PRIMARY KEY,
    project_id       TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    key              TEXT NOT NULL,             -- pr-<n>, or a branch slug
    origin           TEXT NOT NULL,             -- github, gitlab, api
    number           INTEGER,                   -- the pull or merge request
    branch           TEXT NOT NULL,
    commit_sha       TEXT NOT NULL DEFAULT '',
    status           TEXT NOT NULL CHECK (status IN ('active', 'destroying', 'destroyed')),
    expires_at       INTEGER NOT NULL,
    teardown_error   TEXT,
    teardown_tries   INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    destroyed_at     INTEGER
);
-- One live preview per key and project; destroyed ones stay listed as history.
CREATE UNIQUE INDEX previews_live ON previews (project_id, key) WHERE status != 'destroyed';
CREATE INDEX previews_status ON previews (status, expires_at);

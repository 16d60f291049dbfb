-- Services of a project: their spec (JSON, without secrets), their secrets sealed with the
-- cluster key, and the custom domains they claim (one service per domain).
CREATE TABLE services (
    id         TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (project_id, name)
);

CREATE TABLE service_secrets (
    service_id TEXT NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    sealed     BLOB NOT NULL,             -- AES-256-GCM, AAD "secret:<service id>:<name>"
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (service_id, name)
);

CREATE TABLE service_domains (
    domain     TEXT PRIMARY KEY,
    service_id TEXT NOT NULL REFERENCES services (id) ON DELETE CASCADE
);
CREATE INDEX service_domains_service ON service_domains (service_id);

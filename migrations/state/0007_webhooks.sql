-- Git webhooks: deliveries already handled (so a redelivery deploys nothing twice), each
-- project's own webhook secret (with the one it replaced, valid until `previous_until`), and
-- each service's generic deploy hook secret. Secrets are sealed with the cluster key.
CREATE TABLE webhook_deliveries (
    provider     TEXT NOT NULL,              -- github, gitlab, deploy
    delivery_id  TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    deployments  INTEGER NOT NULL,
    PRIMARY KEY (provider, delivery_id)
);
CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);

CREATE TABLE project_webhook_secrets (
    project_id      TEXT PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    sealed          BLOB NOT NULL,           -- AAD "webhook-secret:<project id>"
    previous_sealed BLOB,
    previous_until  INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE service_deploy_hooks (
    service_id      TEXT PRIMARY KEY REFERENCES services (id) ON DELETE CASCADE,
    sealed          BLOB NOT NULL,           -- AAD "deploy-hook:<service id>"
    previous_sealed BLOB,
    previous_until  INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL
);

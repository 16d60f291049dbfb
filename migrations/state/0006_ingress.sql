-- Ingress: where each agent's proxy answers, the CA of the default host names' certificates,
-- and the certificates of custom domains obtained by ACME (keys sealed with the cluster key).
ALTER TABLE agents ADD COLUMN ingress TEXT NOT NULL DEFAULT '';            -- host:port, plain HTTP; '' = none
ALTER TABLE agents ADD COLUMN ingress_https_port INTEGER NOT NULL DEFAULT 0;

CREATE TABLE ingress_ca (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem   TEXT NOT NULL,
    key_sealed BLOB NOT NULL,                  -- AES-256-GCM, AAD "ingress-ca-key"
    created_at INTEGER NOT NULL
);

CREATE TABLE acme_account (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    directory_url       TEXT NOT NULL,
    credentials_sealed  BLOB NOT NULL,         -- AAD "acme-account"
    created_at          INTEGER NOT NULL
);

-- One row per custom domain the leader has tried to certify. A failure keeps the last good
-- certificate (if any) and records why, with when to try again.
CREATE TABLE certificates (
    domain          TEXT PRIMARY KEY,
    cert_chain_pem  TEXT NOT NULL DEFAULT '',
    key_sealed      BLOB,                      -- AAD "certificate:<domain>"
    not_before      INTEGER NOT NULL DEFAULT 0,
    not_after       INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    retry_at        INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL
);

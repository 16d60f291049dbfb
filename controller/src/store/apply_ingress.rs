//! Applying the ingress commands: the default host names' CA, the ACME account and the custom
//! domains' certificates. Keys arrive sealed with the cluster key; apply never sees them in clear.

use rusqlite::{params, Transaction};

use super::apply::exec;
use super::state_machine::StateEvent;
use crate::command::{Command, CommandResponse, Rejection};

pub(super) fn apply(
    tx: &Transaction<'_>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> rusqlite::Result<CommandResponse> {
    match command {
        Command::SetIngressCa { cert_pem, key_sealed_hex, at } => {
            let Ok(key) = hex::decode(&key_sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed key is not hex"));
            };
            let done = exec(
                tx,
                "INSERT INTO ingress_ca (id, cert_pem, key_sealed, created_at) VALUES (1, ?, ?, ?) \
                 ON CONFLICT (id) DO NOTHING",
                params![cert_pem, key, at],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::Conflict, "the ingress CA exists already"));
            }
        }
        Command::SetAcmeAccount { directory_url, credentials_sealed_hex, at } => {
            let Ok(credentials) = hex::decode(&credentials_sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed credentials are not hex"));
            };
            exec(
                tx,
                "INSERT INTO acme_account (id, directory_url, credentials_sealed, created_at) VALUES (1, ?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET directory_url = excluded.directory_url, \
                 credentials_sealed = excluded.credentials_sealed, created_at = excluded.created_at",
                params![directory_url, credentials, at],
            )?;
            return Ok(CommandResponse::Applied);
        }
        Command::PutCertificate { domain, cert_chain_pem, key_sealed_hex, not_before, not_after, at } => {
            let Ok(key) = hex::decode(&key_sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed key is not hex"));
            };
            exec(
                tx,
                "INSERT INTO certificates (domain, cert_chain_pem, key_sealed, not_before, not_after, error, \
                 retry_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, NULL, 0, ?6) \
                 ON CONFLICT (domain) DO UPDATE SET cert_chain_pem = ?2, key_sealed = ?3, not_before = ?4, \
                 not_after = ?5, error = NULL, retry_at = 0, updated_at = ?6",
                params![domain, cert_chain_pem, key, not_before, not_after, at],
            )?;
        }
        Command::CertificateFailed { domain, error, retry_at, at } => {
            exec(
                tx,
                "INSERT INTO certificates (domain, error, retry_at, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (domain) DO UPDATE SET error = ?2, retry_at = ?3, updated_at = ?4",
                params![domain, error, retry_at, at],
            )?;
            return Ok(CommandResponse::Applied);
        }
        other => {
            return Ok(CommandResponse::rejected(
                Rejection::Invalid,
                format!("not an ingress command: {}", other.kind()),
            ))
        }
    }
    events.push(StateEvent::IngressChanged);
    Ok(CommandResponse::Applied)
}

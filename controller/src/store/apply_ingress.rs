//! Applying the ingress commands: the default host names' CA, the ACME account and the custom
//! domains' certificates. Keys arrive sealed with the cluster key; apply never sees them in clear.

use sqlx::{Sqlite, Transaction};

use super::state_machine::StateEvent;
use crate::command::{Command, CommandResponse, Rejection};

pub(super) async fn apply(
    tx: &mut Transaction<'_, Sqlite>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> Result<CommandResponse, sqlx::Error> {
    match command {
        Command::SetIngressCa { cert_pem, key_sealed_hex, at } => {
            let Ok(key) = hex::decode(&key_sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed key is not hex"));
            };
            let done = sqlx::query(
                "INSERT INTO ingress_ca (id, cert_pem, key_sealed, created_at) VALUES (1, ?, ?, ?) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(cert_pem)
            .bind(key)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::Conflict, "the ingress CA exists already"));
            }
        }
        Command::SetAcmeAccount { directory_url, credentials_sealed_hex, at } => {
            let Ok(credentials) = hex::decode(&credentials_sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed credentials are not hex"));
            };
            sqlx::query(
                "INSERT INTO acme_account (id, directory_url, credentials_sealed, created_at) VALUES (1, ?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET directory_url = excluded.directory_url, \
                 credentials_sealed = excluded.credentials_sealed, created_at = excluded.created_at",
            )
            .bind(directory_url)
            .bind(credentials)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            return Ok(CommandResponse::Applied);
        }
        Command::PutCertificate { domain, cert_chain_pem, key_sealed_hex, not_before, not_after, at } => {
            let Ok(key) = hex::decode(&key_sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed key is not hex"));
            };
            sqlx::query(
                "INSERT INTO certificates (domain, cert_chain_pem, key_sealed, not_before, not_after, error, \
                 retry_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, NULL, 0, ?6) \
                 ON CONFLICT (domain) DO UPDATE SET cert_chain_pem = ?2, key_sealed = ?3, not_before = ?4, \
                 not_after = ?5, error = NULL, retry_at = 0, updated_at = ?6",
            )
            .bind(domain)
            .bind(cert_chain_pem)
            .bind(key)
            .bind(not_before)
            .bind(not_after)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        Command::CertificateFailed { domain, error, retry_at, at } => {
            sqlx::query(
                "INSERT INTO certificates (domain, error, retry_at, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (domain) DO UPDATE SET error = ?2, retry_at = ?3, updated_at = ?4",
            )
            .bind(domain)
            .bind(error)
            .bind(retry_at)
            .bind(at)
            .execute(&mut **tx)
            .await?;
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

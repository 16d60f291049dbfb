//! Users, dashboard sessions and API tokens.
//!
//! - `POST /api/v1/users` (cluster admins): `{"email","password","admin"?}` -> `{"id","email","admin"}`.
//! - `POST /api/v1/auth/login`: `{"email","password"}` -> session cookie + `{"user"}`;
//!   `POST /api/v1/auth/logout` ends it. Failed logins are slowed down, then refused for a while.
//! - `GET /api/v1/me`: who the caller is.
//! - `POST /api/v1/tokens`, `GET /api/v1/tokens`, `DELETE /api/v1/tokens/{id}`: API tokens acting
//!   as the caller, with scopes no wider than the caller's own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{Path, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{AppendHeaders, IntoResponse};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use deployer_common::token::{hash_secret, random_hex};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, ClientAddr, Credential, SCOPES, SESSION_COOKIE};
use super::error::{
    applied, ApiError, BadRequest, Conflict, ErrorBody, Forbidden, NotFound, PayloadTooLarge, TooManyRequests,
    Unauthorized, Unavailable, Unprocessable, UnsupportedMediaType,
};
use super::json::ApiJson;
use super::AppState;
use crate::command::Command;
use crate::store::queries::{ApiTokenRow, UserRow};
use crate::util::{new_id, now_ms, rfc3339};

/// Dashboard sessions last a week.
const SESSION_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
const MIN_PASSWORD: usize = 10;
const MAX_PASSWORD: usize = 256;
/// Longest API token lifetime: one year.
const MAX_TOKEN_TTL_S: u64 = 365 * 24 * 3600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/me", get(me))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
}

#[derive(Serialize, ToSchema)]
pub struct UserView {
    id: String,
    email: String,
    admin: bool,
    created_at: String,
}

impl From<UserRow> for UserView {
    fn from(u: UserRow) -> UserView {
        UserView { id: u.id, email: u.email, admin: u.admin, created_at: rfc3339(u.created_at) }
    }
}

/// A plausible email address: one `@`, something on each side, no spaces, at most 254 bytes.
pub fn validate_email(email: &str) -> Result<(), String> {
    let ok = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !domain.starts_with('.')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("email {email:?} is not a valid address"))
    }
}

/// Argon2id with the crate's defaults (19 MiB, 2 passes), off the async threads.
async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(&hex::decode(random_hex(16)).unwrap_or_default())
            .map_err(|e| ApiError::internal("password salt", e))?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ApiError::internal("password hashing", e))
    })
    .await
    .map_err(|e| ApiError::internal("password hashing", e))?
}

async fn verify_password(password: String, phc: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&phc).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
    })
    .await
    .unwrap_or(false)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    #[schema(example = "ada@example.com", pattern = r"^[^@\s]+@[^@\s.][^@\s]*$", max_length = 254)]
    email: String,
    /// 10 to 256 characters.
    #[schema(min_length = 10, max_length = 256)]
    password: String,
    /// A cluster administrator (default false).
    #[serde(default)]
    admin: bool,
}

/// Creates a user (cluster administrators).
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "users",
    operation_id = "create_user",
    security(("bearer" = []), ("session" = [])),
    request_body(content = CreateUser, content_type = "application/json"),
    responses(
        (status = 201, description = "The new user", body = UserView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn create_user(
    State(c): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    caller.require_cluster_admin()?;
    let email = body.email.trim().to_string();
    validate_email(&email).map_err(ApiError::validation)?;
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&body.password.chars().count()) {
        return Err(ApiError::validation(format!("password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long")));
    }
    let password_hash = hash_password(body.password).await?;
    let user = UserRow { id: new_id(), email: email.clone(), admin: body.admin, created_at: now_ms() };
    let command = Command::CreateUser {
        id: user.id.clone(),
        email,
        password_hash,
        admin: user.admin,
        created_at: user.created_at,
    };
    applied(c.propose(caller.audited("user.create", &user.email, None, command)).await?)?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// Every user (cluster administrators).
#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "users",
    operation_id = "list_users",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "The users", body = Vec<UserView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn list_users(State(c): State<AppState>, caller: Caller) -> Result<Json<Vec<UserView>>, ApiError> {
    caller.require_cluster_admin()?;
    c.read_barrier().await?;
    Ok(Json(c.state.users().await?.into_iter().map(UserView::from).collect()))
}

/// Failed logins by email and by client address. Each failure slows the next answer down
/// (200 ms more each time, up to 5 s); after 10 failures within 15 minutes, logins for that
/// email or from that address are refused until the window passes. Kept per node, in memory.
#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);
const THROTTLE_LOCK_AFTER: u32 = 10;
const THROTTLE_STEP: Duration = Duration::from_millis(200);
const THROTTLE_MAX_DELAY: Duration = Duration::from_secs(5);
const THROTTLE_KEYS_MAX: usize = 100_000;

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Failures counted against `keys` within the window.
    fn failures(&self, keys: &[String]) -> u32 {
        let map = self.lock();
        keys.iter()
            .filter_map(|k| map.get(k))
            .filter(|(_, since)| since.elapsed() < THROTTLE_WINDOW)
            .map(|(n, _)| *n)
            .max()
            .unwrap_or(0)
    }

    fn failed(&self, keys: &[String]) -> u32 {
        let mut map = self.lock();
        if map.len() >= THROTTLE_KEYS_MAX {
            map.retain(|_, (_, since)| since.elapsed() < THROTTLE_WINDOW);
        }
        let mut worst = 0;
        for k in keys {
            let entry = map.entry(k.clone()).or_insert((0, Instant::now()));
            if entry.1.elapsed() >= THROTTLE_WINDOW {
                *entry = (0, Instant::now());
            }
            entry.0 += 1;
            worst = worst.max(entry.0);
        }
        worst
    }

    fn succeeded(&self, keys: &[String]) {
        let mut map = self.lock();
        for k in keys {
            map.remove(k);
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

#[derive(Serialize, ToSchema)]
struct LoggedIn {
    user: UserView,
    expires_at: String,
}

fn session_cookie(value: &str, max_age_s: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_s}{secure}")
}

/// Whether the client reached us over TLS (through a proxy that says so).
fn over_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// Logs in to the dashboard: sets the session cookie `deployer_session`; needs no credentials.
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "users",
    operation_id = "login",
    request_body(content = Login, content_type = "application/json"),
    responses(
        (
            status = 200,
            description = "Logged in",
            body = LoggedIn,
            headers(("Set-Cookie" = String, description = "The session cookie `deployer_session` (HttpOnly)")),
        ),
        (status = 400, response = BadRequest),
        (status = 401, description = "Wrong email or password", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
async fn login(
    State(c): State<AppState>,
    ClientAddr(source): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Login>,
) -> Result<impl IntoResponse, ApiError> {
    let email = body.email.trim().to_lowercase();
    let keys = vec![format!("email:{email}"), format!("ip:{source}")];
    if c.logins.failures(&keys) >= THROTTLE_LOCK_AFTER {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many failed logins for this account or address; wait 15 minutes and try again",
        ));
    }
    c.read_barrier().await?;
    let found = c.state.user_by_email(&email).await?;
    // A missing user costs the same as a wrong password, so timing does not tell them apart.
    let phc = found.as_ref().map(|(_, h)| h.clone()).unwrap_or_else(|| DUMMY_HASH.to_string());
    let ok = verify_password(body.password, phc).await && found.is_some();
    let Some((user, _)) = found.filter(|_| ok) else {
        let failures = c.logins.failed(&keys);
        tokio::time::sleep((THROTTLE_STEP * failures).min(THROTTLE_MAX_DELAY)).await;
        return Err(ApiError::unauthorized("wrong email or password"));
    };
    c.logins.succeeded(&keys);
    let value = random_hex(32);
    let now = now_ms();
    let expires_at = now + SESSION_TTL_MS;
    let session_id = new_id();
    let command = Command::CreateSession {
        id: session_id.clone(),
        user_id: user.id.clone(),
        token_hash: hash_secret(&value),
        created_at: now,
        expires_at,
    };
    // The session id, never its secret, is the audit entry's target.
    let entry = crate::command::AuditEntry {
        id: new_id(),
        at: now,
        actor: format!("user:{}", user.email),
        action: "auth.login".into(),
        target: session_id,
        project_id: None,
        source,
    };
    applied(c.propose(Command::Audited { entry, command: Box::new(command) }).await?)?;
    let cookie = session_cookie(&value, SESSION_TTL_MS / 1000, over_tls(&headers));
    Ok((AppendHeaders([(SET_COOKIE, cookie)]), Json(LoggedIn { user: user.into(), expires_at: rfc3339(expires_at) })))
}

/// An Argon2id hash of a random password, verified against when the email is unknown.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$L1/bq4MSzuaGbzwWxAyBxRNWj0lk5n2H8xsyBD1vRc0";

/// Ends the caller's dashboard session and clears its cookie.
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    tag = "users",
    operation_id = "logout",
    security(("bearer" = []), ("session" = [])),
    responses(
        (
            status = 204,
            description = "Logged out",
            headers(("Set-Cookie" = String, description = "Clears the session cookie")),
        ),
        (status = 400, description = "The caller used an API token, not a session", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 503, response = Unavailable),
    )
)]
async fn logout(State(c): State<AppState>, caller: Caller, headers: HeaderMap) -> Result<impl IntoResponse, ApiError> {
    let Credential::Session { token_hash, .. } = &caller.credential else {
        return Err(ApiError::bad_request(
            "logout ends a dashboard session; revoke an API token with DELETE /api/v1/tokens/{id}",
        ));
    };
    let command = Command::RevokeSession { token_hash: token_hash.clone(), at: now_ms() };
    let target = match &caller.credential {
        Credential::Session { id, .. } => id.clone(),
        Credential::Token { .. } => String::new(),
    };
    applied(c.propose(caller.audited("auth.logout", &target, None, command)).await?)?;
    Ok((StatusCode::NO_CONTENT, AppendHeaders([(SET_COOKIE, session_cookie("", 0, over_tls(&headers)))])))
}

#[derive(Serialize, ToSchema)]
struct Me {
    /// `null` for the cluster's first admin token, which belongs to no user.
    user: Option<UserView>,
    scopes: Vec<String>,
    cluster_admin: bool,
    /// `token` or `session`.
    #[schema(value_type = String, example = "token")]
    via: &'static str,
}

/// Who the caller is, and what they may do.
#[utoipa::path(
    get,
    path = "/api/v1/me",
    tag = "users",
    operation_id = "me",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "The caller", body = Me),
        (status = 401, response = Unauthorized),
        (status = 503, response = Unavailable),
    )
)]
async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        cluster_admin: caller.is_cluster_admin(),
        via: match caller.credential {
            Credential::Token { .. } => "token",
            Credential::Session { .. } => "session",
        },
        user: caller.user.map(UserView::from),
        scopes: caller.scopes,
    })
}

#[derive(Deserialize, ToSchema)]
#[schema(as = CreateApiToken)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    /// 1 to 100 characters.
    #[schema(example = "ci")]
    name: String,
    /// Some of `read`, `deploy`, `write`, `admin`, none beyond the caller's own.
    #[schema(example = json!(["deploy"]), pattern = "^(read|deploy|write|admin)$", min_items = 1)]
    scopes: Vec<String>,
    /// Lifetime in seconds, at most a year; no expiry when absent.
    #[schema(minimum = 1, maximum = 31536000)]
    expires_in_s: Option<u64>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = CreatedApiToken)]
struct CreatedToken {
    id: String,
    name: String,
    token: String,
    scopes: Vec<String>,
    expires_at: Option<String>,
}

/// Creates an API token that acts as the caller, limited to its scopes.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "users",
    operation_id = "create_api_token",
    security(("bearer" = []), ("session" = [])),
    request_body(content = CreateToken, content_type = "application/json"),
    responses(
        (
            status = 201,
            description = "The token, shown once",
            body = CreatedToken,
            links(
                ("RevokeApiToken" = (operation_id = "revoke_api_token", parameters(("id" = "$response.body#/id")))),
            ),
        ),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn create_token(
    State(c): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let name = body.name.trim().to_string();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::validation("name must be 1 to 100 characters without control characters"));
    }
    if body.scopes.is_empty() {
        return Err(ApiError::validation("scopes must name at least one of read, deploy, write, admin"));
    }
    let mut scopes = Vec::new();
    for s in &body.scopes {
        if !SCOPES.contains(&s.as_str()) {
            return Err(ApiError::validation(format!("unknown scope {s:?}: use read, deploy, write or admin")));
        }
        // Least privilege: a token never grants more than its maker holds.
        if !caller.has_scope(s) {
            return Err(ApiError::forbidden(format!("you cannot grant the \"{s}\" scope, which you do not hold")));
        }
        if !scopes.contains(s) {
            scopes.push(s.clone());
        }
    }
    let expires_at = match body.expires_in_s {
        None => None,
        Some(s) if (1..=MAX_TOKEN_TTL_S).contains(&s) => Some(now_ms() + (s as i64) * 1000),
        Some(_) => return Err(ApiError::validation(format!("expires_in_s must be between 1 and {MAX_TOKEN_TTL_S}"))),
    };
    let token = format!("dpl_{}", random_hex(32));
    let id = new_id();
    let command = Command::CreateApiToken {
        id: id.clone(),
        name: name.clone(),
        token_hash: hash_secret(&token),
        scopes: scopes.clone(),
        created_at: now_ms(),
        expires_at,
        user_id: caller.user.as_ref().map(|u| u.id.clone()),
    };
    applied(c.propose(caller.audited("token.create", &name, None, command)).await?)?;
    Ok((StatusCode::CREATED, Json(CreatedToken { id, name, token, scopes, expires_at: expires_at.map(rfc3339) })))
}

#[derive(Serialize, ToSchema)]
#[schema(as = ApiTokenView)]
struct TokenView {
    id: String,
    name: String,
    scopes: Vec<String>,
    user: Option<String>,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
}

impl From<ApiTokenRow> for TokenView {
    fn from(t: ApiTokenRow) -> TokenView {
        TokenView {
            id: t.id,
            name: t.name,
            scopes: t.scopes,
            user: t.user.map(|u| u.email),
            created_at: rfc3339(t.created_at),
            expires_at: t.expires_at.map(rfc3339),
            revoked_at: t.revoked_at.map(rfc3339),
        }
    }
}

/// The caller's own tokens; a cluster administrator sees everyone's.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "users",
    operation_id = "list_api_tokens",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "API tokens (never their secrets)", body = Vec<TokenView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn list_tokens(State(c): State<AppState>, caller: Caller) -> Result<Json<Vec<TokenView>>, ApiError> {
    caller.require("read")?;
    c.read_barrier().await?;
    let owner = if caller.is_cluster_admin() { None } else { caller.user.as_ref().map(|u| u.id.as_str()) };
    Ok(Json(c.state.api_tokens(owner).await?.into_iter().map(TokenView::from).collect()))
}

/// Revokes one of the caller's API tokens (any token, for a cluster administrator).
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    tag = "users",
    operation_id = "revoke_api_token",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The API token's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn revoke_token(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require("read")?;
    let only_own = if caller.is_cluster_admin() { None } else { caller.user.as_ref().map(|u| u.id.clone()) };
    let command = Command::RevokeApiToken { id: id.clone(), user_id: only_own, at: now_ms() };
    applied(c.propose(caller.audited("token.revoke", &id, None, command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

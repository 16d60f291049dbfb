//! Git webhooks and deploy hooks: `POST /webhooks/github`, `/webhooks/gitlab` and
//! `/webhooks/deploy/{serviceId}`, and the secrets behind them.
//!
//! A delivery is authenticated before anything in it is parsed: GitHub's `X-Hub-Signature-256`
//! (HMAC-SHA256 of the raw body) or GitLab's `X-Gitlab-Token`, checked in constant time against
//! every secret that may be valid (the default `WEBHOOK_SECRET`, each project's own, and the
//! ones they replaced while their grace lasts). A secret only deploys the projects it belongs
//! to: a project's own secret its services, the default secret the projects without one. The
//! delivery and the deployments it creates are committed together, keyed by the host's
//! delivery id, so a redelivery deploys nothing twice.

use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{
    applied, ApiError, BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable, Unprocessable,
    UnsupportedMediaType,
};
use super::json::ApiJson;
use super::services::{ServiceSpec, Source};
use super::AppState;
use crate::command::{Command, CommandResponse, Rejection};
use crate::deploy::{DeploySource, Notify};
use crate::store::queries::RotatedSecret;
use crate::util::{new_id, now_ms, rfc3339};
use crate::webhooks::payload::{self, Event, PrAction, PullRequest, Push};
use crate::webhooks::verify;

/// Shortest secret accepted for a project's webhooks.
const MIN_SECRET: usize = 16;

pub fn router(state: &AppState) -> Router<AppState> {
    let limit = DefaultBodyLimit::max(state.deploys.settings.webhook_max_bytes);
    Router::new()
        .route("/webhooks/github", post(github).layer(limit))
        .route("/webhooks/gitlab", post(gitlab).layer(limit))
        .route("/webhooks/deploy/{service_id}", post(deploy_hook).layer(limit))
        .route("/api/v1/projects/{project_id}/webhook-secret", put(set_secret).delete(clear_secret))
        .route("/api/v1/projects/{project_id}/services/{service_id}/deploy-hook", post(rotate_hook))
}

/// What a delivery did.
#[derive(Serialize, ToSchema)]
struct DeliveryView {
    /// `deployed`, `destroyed` (a closed pull request's preview is being torn down), `duplicate`
    /// (this delivery was handled before: nothing done again), `ignored` (an event or a push
    /// that deploys nothing) or `pong`.
    #[schema(example = "deployed")]
    outcome: &'static str,
    /// The deployments created, queued.
    deployments: Vec<String>,
    /// Why nothing was deployed, when nothing was.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

fn delivery(
    status: StatusCode,
    outcome: &'static str,
    deployments: Vec<String>,
    message: Option<String>,
) -> (StatusCode, Json<DeliveryView>) {
    (status, Json(DeliveryView { outcome, deployments, message }))
}

type DeliveryAnswer = Result<(StatusCode, Json<DeliveryView>), ApiError>;

/// Whom a valid secret speaks for.
#[derive(Clone, Debug, PartialEq)]
enum Scope {
    /// The default secret: projects without one of their own.
    Default,
    Project(String),
}

/// Every secret valid now, with whom it speaks for; and the projects that have their own.
async fn candidate_secrets(c: &AppState) -> Result<(Vec<Vec<u8>>, Vec<Scope>, BTreeSet<String>), ApiError> {
    let now = now_ms();
    let mut secrets = Vec::new();
    let mut scopes = Vec::new();
    if let Some(default) = &c.deploys.settings.webhook_secret {
        secrets.push(default.as_bytes().to_vec());
        scopes.push(Scope::Default);
    }
    let mut own = BTreeSet::new();
    for row in c.state.webhook_secrets().await? {
        own.insert(row.owner.clone());
        let aad = format!("webhook-secret:{}", row.owner);
        for secret in valid_secrets(c, &row, aad.as_bytes(), now) {
            secrets.push(secret);
            scopes.push(Scope::Project(row.owner.clone()));
        }
    }
    Ok((secrets, scopes, own))
}

/// The current secret of a rotated pair, and the previous one while its grace lasts.
fn valid_secrets(c: &AppState, row: &RotatedSecret, aad: &[u8], now: i64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Ok(secret) = c.key.open(&row.sealed, aad) {
        out.push(secret);
    }
    if let Some(previous) = row.previous_sealed.as_ref().filter(|_| row.previous_until > now) {
        if let Ok(secret) = c.key.open(previous, aad) {
            out.push(secret);
        }
    }
    out
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

fn body_or_413(c: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the delivery is larger than {} bytes, this cluster's limit",
                    c.deploys.settings.webhook_max_bytes
                ),
            )
        } else {
            ApiError::bad_request(format!("cannot read the delivery: {e}"))
        }
    })
}

/// A GitHub delivery (`ping`, `push`, `pull_request`; any other event is answered 202 and
/// ignored). Signed with `X-Hub-Signature-256`; idempotent by `X-GitHub-Delivery`.
#[utoipa::path(
    post,
    path = "/webhooks/github",
    tag = "webhooks",
    operation_id = "github_webhook",
    request_body(content = Vec<u8>, content_type = "application/json", description = "GitHub's webhook payload, as signed"),
    params(
        ("X-GitHub-Event" = String, Header, description = "The event"),
        ("X-GitHub-Delivery" = String, Header, description = "The delivery's id"),
        ("X-Hub-Signature-256" = String, Header, description = "sha256=<HMAC-SHA256 of the body with the webhook secret, hex>"),
    ),
    responses(
        (status = 200, description = "Handled before (a redelivery), or a ping", body = DeliveryView),
        (status = 202, description = "Accepted: the deployments it queued, if any", body = DeliveryView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 503, response = Unavailable),
    )
)]
async fn github(State(c): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> DeliveryAnswer {
    let body = body_or_413(&c, body)?;
    let signature = header(&headers, "x-hub-signature-256").ok_or_else(|| {
        ApiError::unauthorized(
            "X-Hub-Signature-256 is missing: give the webhook a secret (WEBHOOK_SECRET or the project's)",
        )
    })?;
    c.read_barrier().await?;
    let (secrets, scopes, own) = candidate_secrets(&c).await?;
    let index = verify::which_secret(&secrets, &body, signature)
        .ok_or_else(|| ApiError::unauthorized("the signature matches no webhook secret"))?;
    let event = header(&headers, "x-github-event").ok_or_else(|| ApiError::bad_request("X-GitHub-Event is missing"))?;
    let delivery_id = header(&headers, "x-github-delivery")
        .ok_or_else(|| ApiError::bad_request("X-GitHub-Delivery is missing"))?
        .to_string();
    let event = payload::parse_github(event, &body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    handle(&c, "github", delivery_id, event, &scopes[index], &own).await
}

/// A GitLab delivery (`Push Hook`, `Merge Request Hook`; any other is answered 202 and ignored).
/// Authenticated by `X-Gitlab-Token`; idempotent by `X-Gitlab-Event-UUID` (or
/// `Idempotency-Key`).
#[utoipa::path(
    post,
    path = "/webhooks/gitlab",
    tag = "webhooks",
    operation_id = "gitlab_webhook",
    request_body(content = Vec<u8>, content_type = "application/json", description = "GitLab's webhook payload"),
    params(
        ("X-Gitlab-Event" = String, Header, description = "The event"),
        ("X-Gitlab-Token" = String, Header, description = "The webhook secret"),
        ("X-Gitlab-Event-UUID" = Option<String>, Header, description = "The delivery's id"),
    ),
    responses(
        (status = 200, description = "Handled before (a redelivery)", body = DeliveryView),
        (status = 202, description = "Accepted: the deployments it queued, if any", body = DeliveryView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 503, response = Unavailable),
    )
)]
async fn gitlab(State(c): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> DeliveryAnswer {
    let body = body_or_413(&c, body)?;
    let token = header(&headers, "x-gitlab-token").ok_or_else(|| {
        ApiError::unauthorized(
            "X-Gitlab-Token is missing: give the webhook a secret token (WEBHOOK_SECRET or the project's)",
        )
    })?;
    c.read_barrier().await?;
    let (secrets, scopes, own) = candidate_secrets(&c).await?;
    let index = verify::which_token(&secrets, token.as_bytes())
        .ok_or_else(|| ApiError::unauthorized("the token matches no webhook secret"))?;
    let event = header(&headers, "x-gitlab-event").ok_or_else(|| ApiError::bad_request("X-Gitlab-Event is missing"))?;
    // Without an id, the body stands for it: the same payload sent again is the same delivery.
    let delivery_id = header(&headers, "x-gitlab-event-uuid")
        .or_else(|| header(&headers, "idempotency-key"))
        .map(str::to_string)
        .unwrap_or_else(|| format!("sha256:{}", hex::encode(ring::digest::digest(&ring::digest::SHA256, &body))));
    let event = payload::parse_gitlab(event, &body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    handle(&c, "gitlab", delivery_id, event, &scopes[index], &own).await
}

async fn handle(
    c: &AppState,
    provider: &'static str,
    delivery_id: String,
    event: Event,
    scope: &Scope,
    own: &BTreeSet<String>,
) -> DeliveryAnswer {
    if delivery_id.len() > 200 {
        return Err(ApiError::bad_request("the delivery id is longer than 200 characters"));
    }
    let push = match event {
        Event::Ping => return Ok(delivery(StatusCode::OK, "pong", Vec::new(), None)),
        Event::Ignored { kind } => {
            return Ok(delivery(
                StatusCode::ACCEPTED,
                "ignored",
                Vec::new(),
                Some(format!("{kind} events deploy nothing")),
            ))
        }
        Event::PullRequest(pr) => return pull_request(c, provider, delivery_id, pr, scope, own).await,
        Event::Push(push) => push,
    };
    let (Some(branch), Some(commit), false) = (push.branch.clone(), push.commit.clone(), push.deleted) else {
        let message =
            format!("a push to {} that is not a new commit on a branch (a tag, or a deletion)", push.repo.full_name);
        return Ok(delivery(StatusCode::ACCEPTED, "ignored", Vec::new(), Some(message)));
    };
    let mut commands = deployments_for(c, &push, &branch, &commit, scope, own, provider).await?;
    // A preview made by hand for this branch follows it too.
    let hand_made = c.state.branch_previews(&branch).await?;
    let repo: BTreeSet<String> = push.repo.urls.iter().filter_map(|u| payload::normalize_repo_url(u)).collect();
    let projects = match hand_made.is_empty() {
        true => BTreeSet::new(),
        false => projects_building(c, &repo, scope, own).await?,
    };
    for (project_id, key) in hand_made {
        if projects.contains(&project_id) {
            let notify = Notify {
                provider: provider.to_string(),
                repo: push.repo.full_name.clone(),
                sha: commit.to_lowercase(),
                number: None,
            };
            let created_by = format!("webhook:{provider}");
            commands.push(
                super::previews::open_command(
                    c,
                    &project_id,
                    &key,
                    "api",
                    None,
                    &branch,
                    Some(&commit),
                    Some(&repo),
                    &created_by,
                    Some(notify),
                )
                .await?,
            );
        }
    }
    if commands.is_empty() {
        // Nothing to deploy, nothing to remember: no write for a push no service follows.
        let message = format!("no service deploys branch {branch} of {}", push.repo.full_name);
        return Ok(delivery(StatusCode::ACCEPTED, "ignored", Vec::new(), Some(message)));
    }
    match commit_delivery(c, provider, delivery_id, commands).await? {
        Committed::Duplicate(message) => Ok(delivery(StatusCode::OK, "duplicate", Vec::new(), Some(message))),
        Committed::Done { created, .. } if created.is_empty() => {
            let message = format!("no service deploys branch {branch} of {}", push.repo.full_name);
            Ok(delivery(StatusCode::ACCEPTED, "ignored", created, Some(message)))
        }
        Committed::Done { created, .. } => Ok(delivery(StatusCode::ACCEPTED, "deployed", created, None)),
    }
}

/// What committing a delivery did.
enum Committed {
    /// Handled before: nothing done again.
    Duplicate(String),
    /// The deployments created (of commands applied), and why the others were refused.
    Done { created: Vec<String>, refused: Vec<ApiError> },
}

/// Commits a delivery with what it asks for, all at once, exactly once per delivery id.
async fn commit_delivery(
    c: &AppState,
    provider: &str,
    delivery_id: String,
    commands: Vec<Command>,
) -> Result<Committed, ApiError> {
    let ids: Vec<Vec<String>> = commands.iter().map(deployment_ids).collect();
    let command =
        Command::WebhookDelivery { provider: provider.into(), delivery_id, deployments: commands, at: now_ms() };
    let responses = match c.propose(command).await? {
        CommandResponse::Rejected { reason: Rejection::Conflict, message } => return Ok(Committed::Duplicate(message)),
        CommandResponse::Batch { responses } => responses,
        other => {
            applied(other)?;
            Vec::new()
        }
    };
    c.deploys.wake();
    let mut created = Vec::new();
    let mut refused = Vec::new();
    for (response, ids) in responses.into_iter().zip(ids) {
        match applied(response) {
            Ok(()) => created.extend(ids),
            Err(e) => refused.push(e),
        }
    }
    Ok(Committed::Done { created, refused })
}

/// Opens, moves or closes the preview `pr-<n>` of every project that builds the repository and
/// that `scope` speaks for.
async fn pull_request(
    c: &AppState,
    provider: &'static str,
    delivery_id: String,
    pr: PullRequest,
    scope: &Scope,
    own: &BTreeSet<String>,
) -> DeliveryAnswer {
    let ignored = |message: String| Ok(delivery(StatusCode::ACCEPTED, "ignored", Vec::new(), Some(message)));
    if let PrAction::Other(action) = &pr.action {
        return ignored(format!("pull request #{}: {action} changes no preview", pr.number));
    }
    if !pr.head_repo_urls.is_empty() {
        return ignored(format!(
            "pull request #{} comes from a fork: it is not previewed (its code is not trusted to run here)",
            pr.number
        ));
    }
    let repo: BTreeSet<String> = pr.repo.urls.iter().filter_map(|u| payload::normalize_repo_url(u)).collect();
    let projects = projects_building(c, &repo, scope, own).await?;
    let key = format!("pr-{}", pr.number);
    let mut commands = Vec::new();
    for project_id in projects {
        match pr.action {
            PrAction::Opened | PrAction::Updated => {
                if c.state.previews_enabled(&project_id).await? != Some(true) {
                    continue;
                }
                let command = super::previews::open_command(
                    c,
                    &project_id,
                    &key,
                    provider,
                    Some(pr.number),
                    &pr.head_branch,
                    Some(&pr.head_commit),
                    Some(&repo),
                    &format!("webhook:{provider}"),
                    Some(Notify {
                        provider: provider.to_string(),
                        repo: pr.repo.full_name.clone(),
                        sha: pr.head_commit.to_lowercase(),
                        number: Some(pr.number),
                    }),
                )
                .await?;
                commands.push(command);
            }
            PrAction::Closed => {
                if c.state.live_preview(&project_id, &key).await?.is_some_and(|p| p.status == "active") {
                    let reason =
                        format!("pull request #{} was {}", pr.number, if pr.merged { "merged" } else { "closed" });
                    commands.push(Command::DestroyPreview { project_id, key: key.clone(), reason, at: now_ms() });
                }
            }
            PrAction::Other(_) => {}
        }
    }
    if commands.is_empty() {
        return ignored(format!("no project previews pull request #{} of {}", pr.number, pr.repo.full_name));
    }
    let closing = matches!(pr.action, PrAction::Closed);
    match commit_delivery(c, provider, delivery_id, commands).await? {
        Committed::Duplicate(message) => Ok(delivery(StatusCode::OK, "duplicate", Vec::new(), Some(message))),
        Committed::Done { created, refused } => {
            let message =
                (!refused.is_empty()).then(|| refused.into_iter().map(|e| e.message).collect::<Vec<_>>().join("; "));
            let outcome = match (closing, created.is_empty()) {
                (true, _) => "destroyed",
                (false, true) => "ignored",
                (false, false) => "deployed",
            };
            Ok(delivery(StatusCode::ACCEPTED, outcome, created, message))
        }
    }
}

/// The deployments a command creates.
fn deployment_ids(command: &Command) -> Vec<String> {
    match command {
        Command::CreateDeployment { id, .. } => vec![id.clone()],
        Command::PutPreview { deployments, .. } => deployments.iter().flat_map(deployment_ids).collect(),
        _ => Vec::new(),
    }
}

/// The projects with a git service built from the repository `repo` (normalized URLs) that
/// `scope` speaks for.
async fn projects_building(
    c: &AppState,
    repo: &BTreeSet<String>,
    scope: &Scope,
    own: &BTreeSet<String>,
) -> Result<BTreeSet<String>, ApiError> {
    let mut projects = BTreeSet::new();
    for (_, project_id, _, spec) in c.state.git_services().await? {
        let allowed = match scope {
            Scope::Default => !own.contains(&project_id),
            Scope::Project(p) => *p == project_id,
        };
        let Ok(spec) = serde_json::from_str::<ServiceSpec>(&spec) else { continue };
        let Source::Git { url, .. } = spec.source else { continue };
        if allowed && payload::normalize_repo_url(&url).is_some_and(|u| repo.contains(&u)) {
            projects.insert(project_id);
        }
    }
    Ok(projects)
}

/// A deployment of every git service that builds this repository's pushed branch, in the
/// projects `scope` speaks for.
async fn deployments_for(
    c: &AppState,
    push: &Push,
    branch: &str,
    commit: &str,
    scope: &Scope,
    own: &BTreeSet<String>,
    provider: &str,
) -> Result<Vec<Command>, ApiError> {
    let pushed: BTreeSet<String> = push.repo.urls.iter().filter_map(|u| payload::normalize_repo_url(u)).collect();
    let mut commands = Vec::new();
    for (service_id, project_id, _name, spec) in c.state.git_services().await? {
        let allowed = match scope {
            Scope::Default => !own.contains(&project_id),
            Scope::Project(p) => *p == project_id,
        };
        if !allowed {
            continue;
        }
        let Ok(spec) = serde_json::from_str::<ServiceSpec>(&spec) else { continue };
        let Source::Git { url, branch: wanted, dockerfile } = spec.source else { continue };
        let same_repo = payload::normalize_repo_url(&url).is_some_and(|u| pushed.contains(&u));
        if !same_repo || wanted != branch {
            continue;
        }
        let source =
            DeploySource::Git { url, branch: branch.to_string(), commit: Some(commit.to_lowercase()), dockerfile };
        commands.push(Command::CreateDeployment {
            id: new_id(),
            project_id,
            service_id,
            source: serde_json::to_value(&source).map_err(|e| ApiError::internal("deployment source", e))?,
            reference: Some(commit.to_lowercase()),
            created_by: format!("webhook:{provider}"),
            preview: String::new(),
            notify: Notify {
                provider: provider.to_string(),
                repo: push.repo.full_name.clone(),
                sha: commit.to_lowercase(),
                number: None,
            }
            .json(),
            at: now_ms(),
        });
    }
    Ok(commands)
}

/// Optional body of a deploy hook call.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct HookInput {
    /// A branch, or a commit of 7 to 40 hex digits, for a git service (default: its branch).
    #[serde(rename = "ref")]
    reference: Option<String>,
}

/// Deploys one service, for CI systems and other git hosts. Authenticated by the service's deploy
/// hook secret, as `X-Deployer-Token: <secret>` or as `X-Hub-Signature-256` over the body;
/// idempotent by `X-Deployer-Delivery` when given.
#[utoipa::path(
    post,
    path = "/webhooks/deploy/{service_id}",
    tag = "webhooks",
    operation_id = "deploy_hook",
    params(
        ("service_id" = String, Path, description = "The service's id"),
        ("X-Deployer-Token" = Option<String>, Header, description = "The service's deploy hook secret"),
        ("X-Hub-Signature-256" = Option<String>, Header, description = "Or: sha256=<HMAC-SHA256 of the body with that secret, hex>"),
        ("X-Deployer-Delivery" = Option<String>, Header, description = "An id: a second call with it deploys nothing"),
    ),
    request_body(content = Option<HookInput>, content_type = "application/json"),
    responses(
        (status = 200, description = "Handled before", body = DeliveryView),
        (status = 202, description = "The deployment queued", body = DeliveryView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn deploy_hook(
    State(c): State<AppState>,
    Path(service_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> DeliveryAnswer {
    let body = body_or_413(&c, body)?;
    let refused = || {
        ApiError::unauthorized("no valid deploy hook secret for this service (X-Deployer-Token or X-Hub-Signature-256)")
    };
    let token = header(&headers, "x-deployer-token");
    let signature = header(&headers, "x-hub-signature-256");
    if token.is_none() && signature.is_none() {
        return Err(refused());
    }
    c.read_barrier().await?;
    let hook = c.state.deploy_hook(&service_id).await?;
    let project_id = c.state.service_project(&service_id).await?;
    let (Some(hook), Some(project_id)) = (hook, project_id) else { return Err(refused()) };
    let secrets = valid_secrets(&c, &hook, format!("deploy-hook:{service_id}").as_bytes(), now_ms());
    let valid = match (token, signature) {
        (Some(token), _) => verify::which_token(&secrets, token.as_bytes()),
        (None, Some(signature)) => verify::which_secret(&secrets, &body, signature),
        (None, None) => None,
    };
    if valid.is_none() {
        return Err(refused());
    }
    let input: HookInput = if body.iter().all(u8::is_ascii_whitespace) {
        HookInput::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?
    };
    if let Some(r) = &input.reference {
        super::deployments::check_ref(r)?;
    }
    let row = c.state.service(&project_id, &service_id).await?.ok_or_else(refused)?;
    let spec: ServiceSpec =
        serde_json::from_value(row.spec).map_err(|e| ApiError::internal("stored service spec", e))?;
    let source = match spec.source {
        Source::Git { url, branch, dockerfile } => {
            let (branch, commit) = match &input.reference {
                Some(r) if super::deployments::is_commit(r) => (branch, Some(r.to_lowercase())),
                Some(r) => (r.clone(), None),
                None => (branch, None),
            };
            DeploySource::Git { url, branch, commit, dockerfile }
        }
        Source::Image(image) if input.reference.is_none() => DeploySource::Image(image),
        Source::Image(_) => return Err(ApiError::validation("ref: this service runs an image; it takes no ref")),
        Source::Upload {} => {
            return Err(ApiError::validation(
                "this service deploys uploaded sources: POST them to .../upload with a token",
            ))
        }
    };
    let create = Command::CreateDeployment {
        id: new_id(),
        project_id,
        service_id: service_id.clone(),
        source: serde_json::to_value(&source).map_err(|e| ApiError::internal("deployment source", e))?,
        reference: input.reference,
        created_by: "webhook:deploy".into(),
        preview: String::new(),
        notify: String::new(),
        at: now_ms(),
    };
    let delivery_id =
        header(&headers, "x-deployer-delivery").map(|d| format!("{service_id}:{d}")).unwrap_or_else(new_id);
    if delivery_id.len() > 300 {
        return Err(ApiError::bad_request("X-Deployer-Delivery is longer than 200 characters"));
    }
    match commit_delivery(&c, "deploy", delivery_id, vec![create]).await? {
        Committed::Duplicate(message) => Ok(delivery(StatusCode::OK, "duplicate", Vec::new(), Some(message))),
        Committed::Done { mut refused, .. } if !refused.is_empty() => Err(refused.remove(0)),
        Committed::Done { created, .. } => Ok(delivery(StatusCode::ACCEPTED, "deployed", created, None)),
    }
}

/// A project's own webhook secret.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SecretInput {
    /// At least 16 characters; the same secret goes into the git host's webhook settings.
    #[schema(min_length = 16, max_length = 256)]
    secret: String,
}

/// Gives the project a webhook secret of its own (project admins): only it signs deliveries for
/// the project's services from now on, and the one it replaces stays valid for the grace period
/// (`--webhook-grace-s`, a day) so the git host's settings can be changed meanwhile.
#[utoipa::path(
    put,
    path = "/api/v1/projects/{project_id}/webhook-secret",
    tag = "webhooks",
    operation_id = "set_webhook_secret",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id")),
    request_body(content = SecretInput, content_type = "application/json"),
    responses(
        (status = 204, description = "Set"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn set_secret(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
    ApiJson(input): ApiJson<SecretInput>,
) -> Result<StatusCode, ApiError> {
    caller.require_project(&c, &project_id, "admin", Role::Admin).await?;
    let length = input.secret.chars().count();
    if !(MIN_SECRET..=256).contains(&length) || input.secret.chars().any(char::is_control) {
        return Err(ApiError::validation(format!(
            "secret: {MIN_SECRET} to 256 characters, no control characters (a random one: openssl rand -hex 32)"
        )));
    }
    let sealed = c.key.seal(input.secret.as_bytes(), format!("webhook-secret:{project_id}").as_bytes());
    let command = Command::SetWebhookSecret {
        project_id: project_id.clone(),
        sealed_hex: Some(hex::encode(sealed)),
        previous_until: now_ms() + c.deploys.settings.webhook_grace.as_millis() as i64,
        at: now_ms(),
    };
    applied(c.propose(caller.audited("project.webhook_secret.set", &project_id, Some(&project_id), command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes the project's own webhook secret: the default one (`WEBHOOK_SECRET`) applies again
/// (project admins).
#[utoipa::path(
    delete,
    path = "/api/v1/projects/{project_id}/webhook-secret",
    tag = "webhooks",
    operation_id = "clear_webhook_secret",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn clear_secret(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_project(&c, &project_id, "admin", Role::Admin).await?;
    let command =
        Command::SetWebhookSecret { project_id: project_id.clone(), sealed_hex: None, previous_until: 0, at: now_ms() };
    applied(c.propose(caller.audited("project.webhook_secret.clear", &project_id, Some(&project_id), command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new deploy hook secret, shown once.
#[derive(Serialize, ToSchema)]
struct HookView {
    /// Where to POST (relative to the API's address).
    #[schema(example = "/webhooks/deploy/8f0c…")]
    path: String,
    secret: String,
    /// Until when the secret it replaced keeps working (`null` when there was none).
    previous_valid_until: Option<String>,
}

/// Makes (or replaces) the service's deploy hook secret (project admins). The secret is shown
/// this once; the one it replaces stays valid for the grace period.
#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/services/{service_id}/deploy-hook",
    tag = "webhooks",
    operation_id = "rotate_deploy_hook",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
    ),
    responses(
        (status = 201, description = "The new secret", body = HookView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn rotate_hook(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<HookView>), ApiError> {
    caller.require_project(&c, &project_id, "admin", Role::Admin).await?;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ApiError::unavailable("no randomness available"))?;
    let secret = hex::encode(bytes);
    let had = c.state.deploy_hook(&service_id).await?.is_some();
    let previous_until = now_ms() + c.deploys.settings.webhook_grace.as_millis() as i64;
    let sealed = c.key.seal(secret.as_bytes(), format!("deploy-hook:{service_id}").as_bytes());
    let command = Command::SetDeployHook {
        project_id: project_id.clone(),
        service_id: service_id.clone(),
        sealed_hex: hex::encode(sealed),
        previous_until,
        at: now_ms(),
    };
    applied(c.propose(caller.audited("service.deploy_hook.rotate", &service_id, Some(&project_id), command)).await?)?;
    Ok((
        StatusCode::CREATED,
        Json(HookView {
            path: format!("/webhooks/deploy/{service_id}"),
            secret,
            previous_valid_until: had.then(|| rfc3339(previous_until)),
        }),
    ))
}

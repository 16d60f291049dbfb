//! `/api/v1/projects/{projectId}/services`: what a project runs.
//!
//! A service's spec: where its source comes from (a git repository, an image, or uploads), the
//! port it listens on, environment variables, secrets, replicas, resources, a health check,
//! the services it depends on and its custom domains. Secrets are sealed with the cluster key
//! by the proposer before they enter the Raft log, and are never returned: a listing shows
//! their names with a masked value. Project viewers read; project admins create, edit and
//! delete.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{
    applied, ApiError, BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    Unprocessable, UnsupportedMediaType,
};
use super::json::ApiJson;
use super::projects::validate_name;
use super::AppState;
use crate::command::Command;
use crate::store::queries::ServiceRow;
use crate::util::{new_id, now_ms, rfc3339};

/// How a secret's value is shown.
pub const MASK: &str = "********";

const MAX_VARS: usize = 200;
const MAX_VALUE: usize = 32 * 1024;
const MAX_DOMAINS: usize = 50;
const MAX_DEPENDS: usize = 50;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/projects/{project_id}/services", get(list).post(create))
        .route("/api/v1/projects/{project_id}/services/{service_id}", get(show).patch(update).delete(remove))
}

/// Where a service's code comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    Git {
        /// `https://`, `http://`, `git://`, `ssh://`, `file://` or `user@host:path`.
        #[schema(example = "https://git.example.com/shop.git", pattern = r"^\S+$", max_length = 2048)]
        url: String,
        #[serde(default = "default_branch")]
        branch: String,
        #[serde(default = "default_dockerfile")]
        dockerfile: String,
    },
    /// An image reference, e.g. `nginx:1.27`.
    Image(String),
    /// Source uploads (`POST .../upload`).
    Upload {},
}

fn default_branch() -> String {
    "main".into()
}

fn default_dockerfile() -> String {
    "Dockerfile".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Thousandths of a CPU, 10 to 256000 (default 500).
    #[serde(default = "default_cpu")]
    #[schema(minimum = 10, maximum = 256000)]
    pub cpu_millis: u64,
    /// 16 MiB to 1 TiB (default 512 MiB).
    #[serde(default = "default_memory")]
    #[schema(minimum = 16777216_u64, maximum = 1099511627776_u64)]
    pub memory_bytes: u64,
}

fn default_cpu() -> u64 {
    500
}

fn default_memory() -> u64 {
    512 << 20
}

impl Default for Resources {
    fn default() -> Self {
        Resources { cpu_millis: default_cpu(), memory_bytes: default_memory() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// A URL path starting with `/` (default `/`).
    #[serde(default = "default_health_path")]
    #[schema(example = "/healthz", pattern = r"^/\S*$", max_length = 1024)]
    pub path: String,
    /// Seconds a new instance may take to answer it with a 2xx or 3xx (default: the
    /// controller's `--health-timeout-s`, 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_s: Option<u32>,
}

/// Relaxations of the hardened container defaults. Each one is off unless set here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// A writable root filesystem (default: read-only, with a tmpfs on `/tmp`).
    #[serde(default)]
    pub writable_root: bool,
    /// Run as the image's user even when it is root (default: an image without a user, or
    /// with root, runs as 65534:65534).
    #[serde(default)]
    pub run_as_root: bool,
    /// Linux capabilities added back (default: all dropped; `NET_BIND_SERVICE` is added when
    /// the port is below 1024).
    #[serde(default)]
    #[schema(example = json!(["CHOWN"]), max_items = 40)]
    pub capabilities: Vec<String>,
    /// Most processes in the container (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 16, maximum = 1000000)]
    pub pids_limit: Option<i64>,
}

fn default_health_path() -> String {
    "/".into()
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck { path: default_health_path(), timeout_s: None }
    }
}

/// The stored spec: every field present, secrets apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceSpec {
    pub source: Source,
    pub port: u16,
    pub env: BTreeMap<String, String>,
    pub replicas: u32,
    pub resources: Resources,
    pub health_check: HealthCheck,
    pub depends_on: Vec<String>,
    pub domains: Vec<String>,
    #[serde(default)]
    pub security: Security,
}

/// A create (every field but `name` and `source` optional) or a patch (every field optional;
/// `null` in `env` or `secrets` removes that variable).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ServiceInput {
    /// Required on create, a DNS label; cannot be changed.
    #[schema(example = "web", pattern = "^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")]
    name: Option<String>,
    /// Required on create.
    source: Option<Source>,
    /// The port the service listens on (default 8080).
    #[schema(minimum = 1, maximum = 65535)]
    port: Option<u16>,
    /// Environment variables; on a patch, `null` removes one.
    env: Option<BTreeMap<String, Option<String>>>,
    /// Secret variables, sealed and never shown again; on a patch, `null` removes one.
    secrets: Option<BTreeMap<String, Option<String>>>,
    /// 0 to 100 (default 1).
    #[schema(maximum = 100)]
    replicas: Option<u32>,
    resources: Option<Resources>,
    health_check: Option<HealthCheck>,
    /// Names of services of the same project that this one needs.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$", max_items = 50)]
    depends_on: Option<Vec<String>>,
    /// Host names routed to this service, each claimed by one service only.
    #[schema(pattern = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", max_items = 50)]
    domains: Option<Vec<String>>,
    /// Relaxations of the hardened container defaults.
    security: Option<Security>,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceView {
    id: String,
    project_id: String,
    name: String,
    #[serde(flatten)]
    spec: ServiceSpec,
    /// Secret names, each with a masked value.
    #[schema(value_type = BTreeMap<String, String>)]
    secrets: BTreeMap<String, &'static str>,
    /// The host name it answers at on every agent's ingress once it runs.
    #[schema(example = "web-shop.apps.example.com")]
    host: String,
    /// Its custom domains' certificates.
    certificates: Vec<CertificateView>,
    created_at: String,
    updated_at: String,
}

/// A custom domain's certificate.
#[derive(Serialize, ToSchema)]
struct CertificateView {
    domain: String,
    /// `issued`; `pending` (not ordered yet: ordered once the service runs); `failed` (the last
    /// order failed, see `error`; a certificate issued before keeps serving); `none` (no ACME
    /// directory is configured: the domain is served over plain HTTP).
    #[schema(example = "issued")]
    status: &'static str,
    expires_at: Option<String>,
    error: Option<String>,
    /// When a failed order is tried again.
    retry_at: Option<String>,
}

/// What the views need to show hosts and certificates.
struct IngressInfo {
    project_name: String,
    ingress: std::sync::Arc<crate::ingress::Ingress>,
    certificates: std::collections::HashMap<String, crate::store::queries::CertificateRow>,
}

impl IngressInfo {
    async fn load(c: &AppState, project_id: &str) -> Result<IngressInfo, ApiError> {
        let project_name = c.state.project(project_id).await?.map(|p| p.name).unwrap_or_default();
        let certificates = c.state.certificates().await?.into_iter().map(|r| (r.domain.clone(), r)).collect();
        Ok(IngressInfo { project_name, ingress: c.ingress.clone(), certificates })
    }

    fn host(&self, service: &str) -> String {
        self.ingress.default_host(service, &self.project_name, "")
    }

    fn certificates(&self, domains: &[String]) -> Vec<CertificateView> {
        domains
            .iter()
            .map(|domain| {
                let row = self.certificates.get(domain);
                let issued = row.filter(|r| !r.cert_chain_pem.is_empty());
                let error = row.and_then(|r| r.error.clone());
                let status = match (&error, issued) {
                    (Some(_), _) => "failed",
                    (None, Some(_)) => "issued",
                    (None, None) if self.ingress.settings.acme.is_some() => "pending",
                    (None, None) => "none",
                };
                CertificateView {
                    domain: domain.clone(),
                    status,
                    expires_at: issued.map(|r| rfc3339(r.not_after)),
                    retry_at: row.filter(|_| error.is_some()).map(|r| rfc3339(r.retry_at)),
                    error,
                }
            })
            .collect()
    }
}

impl ServiceView {
    fn new(row: ServiceRow, info: &IngressInfo) -> Result<ServiceView, ApiError> {
        let spec: ServiceSpec =
            serde_json::from_value(row.spec).map_err(|e| ApiError::internal("stored service spec", e))?;
        Ok(ServiceView {
            host: info.host(&row.name),
            certificates: info.certificates(&spec.domains),
            id: row.id,
            project_id: row.project_id,
            name: row.name,
            spec,
            secrets: row.secret_names.into_iter().map(|n| (n, MASK)).collect(),
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
        })
    }
}

/// Environment and secret names: a letter or `_`, then letters, digits and `_`.
fn validate_var_name(field: &str, name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let ok = name.len() <= 256
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(format!(
            "{field}: {name:?} is not a variable name (a letter or _, then letters, digits and _)"
        )))
    }
}

/// A host name: dot-separated labels of letters, digits and `-`, at least two labels.
pub fn validate_domain(domain: &str) -> Result<(), String> {
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() <= 253 && labels.len() >= 2 && labels.iter().all(label_ok) {
        Ok(())
    } else {
        Err(format!("domains: {domain:?} is not a valid host name (lowercase labels separated by dots)"))
    }
}

fn validate_source(source: &Source) -> Result<(), ApiError> {
    match source {
        Source::Git { url, branch, dockerfile } => {
            let scheme_ok = ["https://", "http://", "git://", "file://"].iter().any(|s| url.starts_with(s));
            if !scheme_ok || url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ApiError::validation(format!(
                    "source.git.url: {url:?} is not a git URL Deployer can fetch (https://, http://, git://, or \
                     file:// where the operator allows it; ssh is not supported: agents hold no SSH keys, \
                     use https with GIT_USERNAME and GIT_PASSWORD secrets)"
                )));
            }
            if let Some(rest) = url.split_once("://").map(|(_, r)| r) {
                if rest.split('/').next().is_some_and(|authority| authority.contains('@')) {
                    return Err(ApiError::validation(
                        "source.git.url: credentials do not belong in the URL; set the secrets GIT_USERNAME and \
                         GIT_PASSWORD instead",
                    ));
                }
            }
            if branch.is_empty()
                || branch.len() > 255
                || branch.starts_with('-')
                || branch.contains("..")
                || branch.chars().any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
            {
                return Err(ApiError::validation(format!("source.git.branch: {branch:?} is not a valid branch name")));
            }
            let path = std::path::Path::new(dockerfile);
            if dockerfile.is_empty()
                || path.is_absolute()
                || path.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(ApiError::validation(format!(
                    "source.git.dockerfile: {dockerfile:?} must be a relative path inside the repository"
                )));
            }
        }
        Source::Image(reference) => {
            if reference.is_empty()
                || reference.len() > 512
                || reference.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(ApiError::validation(format!("source.image: {reference:?} is not an image reference")));
            }
        }
        Source::Upload {} => {}
    }
    Ok(())
}

fn validate_spec(spec: &ServiceSpec, secrets: &BTreeMap<String, ()>) -> Result<(), ApiError> {
    validate_source(&spec.source)?;
    if spec.port == 0 {
        return Err(ApiError::validation("port must be between 1 and 65535"));
    }
    if spec.env.len() > MAX_VARS {
        return Err(ApiError::validation(format!("env: at most {MAX_VARS} variables")));
    }
    for (name, value) in &spec.env {
        validate_var_name("env", name)?;
        if value.len() > MAX_VALUE {
            return Err(ApiError::validation(format!("env.{name}: at most {MAX_VALUE} bytes")));
        }
        if secrets.contains_key(name) {
            return Err(ApiError::validation(format!("{name} is both in env and in secrets; keep one")));
        }
    }
    if spec.replicas > 100 {
        return Err(ApiError::validation("replicas must be between 0 and 100"));
    }
    if !(10..=256_000).contains(&spec.resources.cpu_millis) {
        return Err(ApiError::validation("resources.cpu_millis must be between 10 and 256000"));
    }
    if !((16 << 20)..=(1 << 40)).contains(&spec.resources.memory_bytes) {
        return Err(ApiError::validation("resources.memory_bytes must be between 16 MiB and 1 TiB"));
    }
    if spec.health_check.timeout_s.is_some_and(|t| !(1..=3600).contains(&t)) {
        return Err(ApiError::validation("health_check.timeout_s must be between 1 and 3600"));
    }
    let sec = &spec.security;
    if sec.capabilities.len() > 40
        || sec
            .capabilities
            .iter()
            .any(|c| c.is_empty() || c.len() > 32 || !c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
    {
        return Err(ApiError::validation(
            "security.capabilities: at most 40 Linux capability names like NET_ADMIN (upper case, without CAP_)",
        ));
    }
    if sec.pids_limit.is_some_and(|p| !(16..=1_000_000).contains(&p)) {
        return Err(ApiError::validation("security.pids_limit must be between 16 and 1000000"));
    }
    let path = &spec.health_check.path;
    if !path.starts_with('/') || path.len() > 1024 || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::validation("health_check.path must be a URL path starting with /"));
    }
    if spec.depends_on.len() > MAX_DEPENDS {
        return Err(ApiError::validation(format!("depends_on: at most {MAX_DEPENDS} services")));
    }
    for dep in &spec.depends_on {
        validate_name(dep).map_err(|e| ApiError::validation(format!("depends_on: {dep:?}: {e}")))?;
    }
    if spec.domains.len() > MAX_DOMAINS {
        return Err(ApiError::validation(format!("domains: at most {MAX_DOMAINS}")));
    }
    for domain in &spec.domains {
        validate_domain(domain).map_err(ApiError::validation)?;
    }
    Ok(())
}

/// Seals a secret for the state: bound to its service and name, so a sealed value cannot be
/// moved to another.
fn seal(c: &crate::controller::Controller, service_id: &str, name: &str, value: &str) -> String {
    hex::encode(c.key.seal(value.as_bytes(), format!("secret:{service_id}:{name}").as_bytes()))
}

fn dedup(list: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Creates a service in the project (project admins).
#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/services",
    tag = "services",
    operation_id = "create_service",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id")),
    request_body(content = ServiceInput, content_type = "application/json"),
    responses(
        (
            status = 201,
            description = "The new service",
            body = ServiceView,
            links(
                (
                    "ShowService" = (
                        operation_id = "show_service",
                        parameters(
                            ("project_id" = "$response.body#/project_id"),
                            ("service_id" = "$response.body#/id"),
                        )
                    )
                ),
                (
                    "UpdateService" = (
                        operation_id = "update_service",
                        parameters(
                            ("project_id" = "$response.body#/project_id"),
                            ("service_id" = "$response.body#/id"),
                        )
                    )
                ),
                (
                    "DeleteService" = (
                        operation_id = "delete_service",
                        parameters(
                            ("project_id" = "$response.body#/project_id"),
                            ("service_id" = "$response.body#/id"),
                        )
                    )
                ),
            ),
        ),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn create(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<ServiceInput>,
) -> Result<(StatusCode, Json<ServiceView>), ApiError> {
    c.read_barrier().await?;
    caller.require_project(&c, &project_id, "write", Role::Admin).await?;
    let name = body.name.ok_or_else(|| ApiError::validation("name is required"))?;
    validate_name(&name).map_err(|e| ApiError::validation(format!("name: {e}")))?;
    let source = body.source.ok_or_else(|| {
        ApiError::validation(
            "source is required: {\"git\":{\"url\",\"branch\",\"dockerfile\"}}, {\"image\":\"ref\"} or {\"upload\":{}}",
        )
    })?;
    let spec = ServiceSpec {
        source,
        port: body.port.unwrap_or(8080),
        env: body.env.unwrap_or_default().into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect(),
        replicas: body.replicas.unwrap_or(1),
        resources: body.resources.unwrap_or_default(),
        health_check: body.health_check.unwrap_or_default(),
        depends_on: dedup(body.depends_on.unwrap_or_default()),
        domains: dedup(body.domains.unwrap_or_default()),
        security: body.security.unwrap_or_default(),
    };
    let secrets: BTreeMap<String, String> =
        body.secrets.unwrap_or_default().into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
    check_secrets(&secrets)?;
    validate_spec(&spec, &secrets.keys().map(|k| (k.clone(), ())).collect())?;
    let id = new_id();
    let at = now_ms();
    let command = Command::PutService {
        id: id.clone(),
        project_id: project_id.clone(),
        name: name.clone(),
        create: true,
        spec: serde_json::to_value(&spec).map_err(|e| ApiError::internal("service spec", e))?,
        depends_on: spec.depends_on.clone(),
        domains: spec.domains.clone(),
        set_secrets: secrets.iter().map(|(k, v)| (k.clone(), seal(&c, &id, k, v))).collect(),
        unset_secrets: Vec::new(),
        at,
    };
    applied(c.propose(caller.audited("service.create", &name, Some(&project_id), command)).await?)?;
    let info = IngressInfo::load(&c, &project_id).await?;
    let view = ServiceView {
        host: info.host(&name),
        certificates: info.certificates(&spec.domains),
        id,
        project_id,
        name,
        spec,
        secrets: secrets.into_keys().map(|k| (k, MASK)).collect(),
        created_at: rfc3339(at),
        updated_at: rfc3339(at),
    };
    Ok((StatusCode::CREATED, Json(view)))
}

fn check_secrets(secrets: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if secrets.len() > MAX_VARS {
        return Err(ApiError::validation(format!("secrets: at most {MAX_VARS}")));
    }
    for (name, value) in secrets {
        validate_var_name("secrets", name)?;
        if value.len() > MAX_VALUE {
            return Err(ApiError::validation(format!("secrets.{name}: at most {MAX_VALUE} bytes")));
        }
    }
    Ok(())
}

/// Changes a service's spec: the fields sent replace those stored (project admins).
#[utoipa::path(
    patch,
    path = "/api/v1/projects/{project_id}/services/{service_id}",
    tag = "services",
    operation_id = "update_service",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
    ),
    request_body(content = ServiceInput, content_type = "application/json"),
    responses(
        (status = 200, description = "The service as changed", body = ServiceView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn update(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<ServiceInput>,
) -> Result<Json<ServiceView>, ApiError> {
    c.read_barrier().await?;
    caller.require_project(&c, &project_id, "write", Role::Admin).await?;
    let row = c
        .state
        .service(&project_id, &service_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no service with id {service_id} in this project")))?;
    if body.name.as_ref().is_some_and(|n| *n != row.name) {
        return Err(ApiError::validation(
            "name cannot be changed (host names are made from it); create a new service instead",
        ));
    }
    let mut spec: ServiceSpec =
        serde_json::from_value(row.spec.clone()).map_err(|e| ApiError::internal("stored service spec", e))?;
    if let Some(source) = body.source {
        spec.source = source;
    }
    if let Some(port) = body.port {
        spec.port = port;
    }
    for (k, v) in body.env.unwrap_or_default() {
        match v {
            Some(v) => spec.env.insert(k, v),
            None => spec.env.remove(&k),
        };
    }
    if let Some(r) = body.replicas {
        spec.replicas = r;
    }
    if let Some(r) = body.resources {
        spec.resources = r;
    }
    if let Some(h) = body.health_check {
        spec.health_check = h;
    }
    if let Some(d) = body.depends_on {
        spec.depends_on = dedup(d);
    }
    if let Some(d) = body.domains {
        spec.domains = dedup(d);
    }
    if let Some(s) = body.security {
        spec.security = s;
    }
    let mut set = BTreeMap::new();
    let mut unset = Vec::new();
    for (k, v) in body.secrets.unwrap_or_default() {
        match v {
            Some(v) => {
                set.insert(k, v);
            }
            None => {
                validate_var_name("secrets", &k)?;
                unset.push(k);
            }
        }
    }
    check_secrets(&set)?;
    let mut names: BTreeMap<String, ()> = row.secret_names.iter().map(|n| (n.clone(), ())).collect();
    for k in &unset {
        names.remove(k);
    }
    names.extend(set.keys().map(|k| (k.clone(), ())));
    validate_spec(&spec, &names)?;
    let at = now_ms();
    let command = Command::PutService {
        id: row.id.clone(),
        project_id: project_id.clone(),
        name: row.name.clone(),
        create: false,
        spec: serde_json::to_value(&spec).map_err(|e| ApiError::internal("service spec", e))?,
        depends_on: spec.depends_on.clone(),
        domains: spec.domains.clone(),
        set_secrets: set.iter().map(|(k, v)| (k.clone(), seal(&c, &row.id, k, v))).collect(),
        unset_secrets: unset,
        at,
    };
    applied(c.propose(caller.audited("service.update", &row.name, Some(&project_id), command)).await?)?;
    let info = IngressInfo::load(&c, &project_id).await?;
    Ok(Json(ServiceView {
        host: info.host(&row.name),
        certificates: info.certificates(&spec.domains),
        id: row.id,
        project_id,
        name: row.name,
        spec,
        secrets: names.into_keys().map(|k| (k, MASK)).collect(),
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(at),
    }))
}

/// The project's services.
#[utoipa::path(
    get,
    path = "/api/v1/projects/{project_id}/services",
    tag = "services",
    operation_id = "list_services",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id")),
    responses(
        (status = 200, description = "The services", body = Vec<ServiceView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn list(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
) -> Result<Json<Vec<ServiceView>>, ApiError> {
    c.read_barrier().await?;
    caller.require_project(&c, &project_id, "read", Role::Viewer).await?;
    let rows = c.state.services(&project_id).await?;
    let info = IngressInfo::load(&c, &project_id).await?;
    Ok(Json(rows.into_iter().map(|row| ServiceView::new(row, &info)).collect::<Result<_, _>>()?))
}

/// One service.
#[utoipa::path(
    get,
    path = "/api/v1/projects/{project_id}/services/{service_id}",
    tag = "services",
    operation_id = "show_service",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
    ),
    responses(
        (status = 200, description = "The service", body = ServiceView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn show(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
) -> Result<Json<ServiceView>, ApiError> {
    c.read_barrier().await?;
    caller.require_project(&c, &project_id, "read", Role::Viewer).await?;
    let row = c
        .state
        .service(&project_id, &service_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no service with id {service_id} in this project")))?;
    let info = IngressInfo::load(&c, &project_id).await?;
    Ok(Json(ServiceView::new(row, &info)?))
}

/// Deletes a service no other service depends on (project admins).
#[utoipa::path(
    delete,
    path = "/api/v1/projects/{project_id}/services/{service_id}",
    tag = "services",
    operation_id = "delete_service",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 503, response = Unavailable),
    )
)]
async fn remove(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    c.read_barrier().await?;
    caller.require_project(&c, &project_id, "write", Role::Admin).await?;
    let row = c
        .state
        .service(&project_id, &service_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no service with id {service_id} in this project")))?;
    let command = Command::DeleteService { id: service_id, project_id: project_id.clone() };
    applied(c.propose(caller.audited("service.delete", &row.name, Some(&project_id), command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_host_names() {
        for ok in ["example.com", "a.b.c.example.org", "x-1.io"] {
            assert!(validate_domain(ok).is_ok(), "{ok}");
        }
        for bad in ["localhost", "Example.com", "-a.com", "a..com", "a.com.", "a_b.com", "ü.com", ""] {
            assert!(validate_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sources_are_checked() {
        let git = |url: &str, branch: &str, dockerfile: &str| Source::Git {
            url: url.into(),
            branch: branch.into(),
            dockerfile: dockerfile.into(),
        };
        assert!(validate_source(&git("https://example.com/a.git", "main", "Dockerfile")).is_ok());
        assert!(validate_source(&git("git://example.com/a/b.git", "feature/x", "docker/Dockerfile")).is_ok());
        // Agents hold no SSH keys; credentials belong in secrets.
        assert!(validate_source(&git("git@example.com:a/b.git", "main", "Dockerfile")).is_err());
        assert!(validate_source(&git("ssh://git@example.com/a/b.git", "main", "Dockerfile")).is_err());
        assert!(validate_source(&git("https://me:pw@example.com/a.git", "main", "Dockerfile")).is_err());
        assert!(validate_source(&git("ftp://x", "main", "Dockerfile")).is_err());
        assert!(validate_source(&git("https://x", "a..b", "Dockerfile")).is_err());
        assert!(validate_source(&git("https://x", "main", "../Dockerfile")).is_err());
        assert!(validate_source(&git("https://x", "main", "/etc/passwd")).is_err());
        assert!(validate_source(&Source::Image("nginx:1.27".into())).is_ok());
        assert!(validate_source(&Source::Image("bad ref".into())).is_err());
    }
}

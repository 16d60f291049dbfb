//! `GET /api/openapi.json`: the OpenAPI description of the whole API, generated from the
//! handlers' `#[utoipa::path]` annotations and the request and response types' `ToSchema`
//! derives. Served without credentials.
//!
//! A route is described by annotating its handler and listing the handler in [`ApiDoc`]'s
//! `paths`; the tests below read every `.route(` of this module's files and fail on a route the
//! description lacks (or describes but nobody serves).

use std::sync::LazyLock;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{
    ApiError, BadRequest, Conflict, ErrorBody, Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unauthorized,
    Unavailable, Unprocessable, UnsupportedMediaType,
};
use super::{agents, audit, cluster, deployments, health, previews, projects, services, users, webhooks, AppState};
use crate::api::auth::SESSION_COOKIE;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Deployer API",
        description = "The control plane of Deployer. Authenticate with `Authorization: Bearer <API token>` or \
                       the dashboard's session cookie. Errors are `{\"error\":{\"code\",\"message\"}}`."
    ),
    paths(
        health::health,
        openapi_json,
        cluster::cluster,
        cluster::ingress_ca,
        cluster::list_tokens,
        cluster::create_token,
        cluster::revoke_token,
        agents::list,
        agents::show,
        agents::revoke,
        users::list_users,
        users::create_user,
        users::login,
        users::logout,
        users::me,
        users::list_tokens,
        users::create_token,
        users::revoke_token,
        projects::list,
        projects::create,
        projects::show,
        projects::remove,
        projects::list_collaborators,
        projects::add_collaborator,
        projects::remove_collaborator,
        services::list,
        services::create,
        services::show,
        services::update,
        services::remove,
        deployments::deploy,
        deployments::upload,
        deployments::rollback,
        deployments::list,
        deployments::show,
        deployments::logs,
        deployments::ws_logs,
        deployments::ws_project,
        audit::list,
        webhooks::github,
        webhooks::gitlab,
        webhooks::deploy_hook,
        webhooks::set_secret,
        webhooks::clear_secret,
        webhooks::rotate_hook,
        previews::list,
        previews::create,
        previews::remove,
        previews::settings,
    ),
    components(
        schemas(ErrorBody),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            Conflict,
            PayloadTooLarge,
            UnsupportedMediaType,
            Unprocessable,
            TooManyRequests,
            Unavailable
        )
    ),
    modifiers(&SecurityAddon),
    tags(
        (name = "health", description = "Liveness"),
        (name = "cluster", description = "Membership and join tokens"),
        (name = "agents", description = "The hosts that run services"),
        (name = "users", description = "Users, dashboard sessions and API tokens"),
        (name = "projects", description = "Projects and their collaborators"),
        (name = "services", description = "What a project runs"),
        (name = "deployments", description = "Releases of a service, their logs and live streams"),
        (name = "audit", description = "Who did what, when"),
        (name = "webhooks", description = "Git hosts' webhooks and deploy hooks"),
        (name = "previews", description = "Preview environments of pull requests and branches"),
        (name = "openapi", description = "This description"),
    )
)]
pub struct ApiDoc;

/// The two ways to authenticate: an API token, or the dashboard's session cookie.
struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token: `Authorization: Bearer <token>`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                SESSION_COOKIE,
                "The dashboard's session, set by POST /api/v1/auth/login",
            ))),
        );
    }
}

/// The description as JSON, made once.
static DOCUMENT: LazyLock<Result<String, String>> = LazyLock::new(|| {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).map_err(|e| e.to_string())?;
    camel_case_links(&mut doc);
    serde_json::to_string(&doc).map_err(|e| e.to_string())
});

/// utoipa 5.5 writes a response link's fields in snake case (`operation_id`), which is not
/// OpenAPI: it spells them `operationId`, `operationRef` and `requestBody`.
fn camel_case_links(doc: &mut serde_json::Value) {
    let operations =
        doc["paths"].as_object_mut().into_iter().flat_map(|p| p.values_mut()).filter_map(|i| i.as_object_mut());
    for operation in operations.flat_map(|item| item.values_mut()) {
        let responses = operation["responses"].as_object_mut().into_iter().flat_map(|r| r.values_mut());
        for links in responses.filter_map(|r| r.get_mut("links")).filter_map(|l| l.as_object_mut()) {
            for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
                for (from, to) in [
                    ("operation_id", "operationId"),
                    ("operation_ref", "operationRef"),
                    ("request_body", "requestBody"),
                ] {
                    if let Some(v) = link.remove(from) {
                        link.insert(to.to_string(), v);
                    }
                }
            }
        }
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/api/openapi.json", get(openapi_json))
}

/// This OpenAPI description; needs no credentials.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "openapi",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI description of this API", body = Object))
)]
async fn openapi_json() -> Result<impl IntoResponse, ApiError> {
    let json = DOCUMENT.as_ref().map_err(|e| ApiError::internal("OpenAPI description", e))?;
    Ok(([(CONTENT_TYPE, "application/json")], json.as_str()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::to_bytes;
    use serde_json::Value;

    use super::*;

    fn document() -> Value {
        serde_json::from_str(DOCUMENT.as_ref().expect("description")).expect("JSON")
    }

    /// `(METHOD, path)` of every `.route("path", get(..).post(..))` in this module's source files.
    fn routes_in_source() -> BTreeSet<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
        // Spelled in two parts so that this test's own source holds no route call.
        let call = concat!(".", "route(");
        let mut routes = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).expect("src/api") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("source");
            let text: String =
                source.lines().filter(|l| !l.trim_start().starts_with("//")).flat_map(|l| [l, "\n"]).collect();
            for (at, _) in text.match_indices(call) {
                let rest = text[at + call.len()..].trim_start();
                let (route, rest) = rest
                    .strip_prefix('"')
                    .and_then(|r| r.split_once('"'))
                    .unwrap_or_else(|| panic!("{}: a route call whose path is not a literal", path.display()));
                // The method routers, up to the `)` that closes `.route(`.
                let mut depth = 1;
                let end = rest
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '(' => 1,
                            ')' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map(|(i, _)| i)
                    .expect("closing parenthesis");
                let methods = &rest[..end];
                let mut found = false;
                for method in ["get", "post", "put", "patch", "delete"] {
                    let call = format!("{method}(");
                    let named = methods
                        .match_indices(&call)
                        .any(|(i, _)| i == 0 || !methods[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
                    if named {
                        routes.insert((method.to_uppercase(), route.to_string()));
                        found = true;
                    }
                }
                assert!(found, "{}: no method router found for {route}", path.display());
            }
        }
        routes
    }

    fn routes_documented() -> BTreeSet<(String, String)> {
        let doc = document();
        let mut routes = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
        routes
    }

    #[test]
    fn every_route_is_described_and_every_description_is_a_route() {
        let served = routes_in_source();
        let documented = routes_documented();
        assert!(served.len() >= 30, "the source scan found only {served:?}");
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "routes without a description: annotate their handlers with #[utoipa::path] and list them in \
             ApiDoc: {undocumented:?}"
        );
        assert!(unserved.is_empty(), "described routes that no router serves: {unserved:?}");
    }

    #[test]
    fn operations_name_their_auth_bodies_and_errors() {
        let doc = document();
        assert_eq!(doc["info"]["title"], "Deployer API");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
        let open = ["/api/v1/health", "/api/v1/auth/login", "/api/openapi.json"];
        // Git hosts sign what they send: no bearer token, a signature or secret token instead.
        let signed = |path: &str| path.starts_with("/webhooks/");
        let mut operation_ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                let what = format!("{method} {path}");
                let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{what}: no operation_id"));
                assert!(operation_ids.insert(id.to_string()), "{what}: operation_id {id} is taken");
                assert!(op["tags"].as_array().is_some_and(|t| t.len() == 1), "{what}: one tag");
                let security = op["security"].as_array();
                if open.contains(&path.as_str()) || signed(path) {
                    assert!(security.is_none(), "{what} needs no credentials");
                    if signed(path) {
                        assert!(op["responses"]["401"].is_object(), "{what}: 401 for a bad signature");
                    }
                } else {
                    let schemes: Vec<_> = security
                        .unwrap_or_else(|| panic!("{what}: no security"))
                        .iter()
                        .flat_map(|s| s.as_object().expect("requirement").keys().cloned())
                        .collect();
                    assert_eq!(schemes, ["bearer", "session"], "{what}");
                    assert!(op["responses"]["401"].is_object(), "{what}: 401");
                }
                let responses = op["responses"].as_object().expect("responses");
                // A WebSocket's success is the switch of protocols.
                assert!(responses.keys().any(|s| s.starts_with('2') || s == "101"), "{what}: a success answer");
                for (status, response) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        let body = &response["content"]["application/json"]["schema"]["$ref"];
                        let reference = response["$ref"].as_str();
                        assert!(
                            body == "#/components/schemas/ErrorBody"
                                || reference.is_some_and(|r| r.starts_with("#/components/responses/")),
                            "{what}: {status} is not an ErrorBody: {response}"
                        );
                    }
                }
                if method == "post" || method == "patch" {
                    let body = &op["requestBody"]["content"]["application/json"]["schema"];
                    let has_body = body.is_object();
                    // Logout and a new deploy hook secret are the writes without a body; an upload's
                    // body is a tarball.
                    let upload = op["requestBody"]["content"]["application/octet-stream"].is_object();
                    let bodiless = path == "/api/v1/auth/logout" || path.ends_with("/deploy-hook");
                    assert!(has_body || upload || bodiless, "{what}: no JSON request body");
                    // A git host's delivery is checked as the raw bytes it signed.
                    if has_body && !signed(path) {
                        for status in ["400", "413", "415", "422"] {
                            assert!(op["responses"][status].is_object(), "{what}: {status}");
                        }
                    }
                }
            }
        }
        // Every response link names an operation of this description, in OpenAPI's spelling.
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                for (status, response) in op["responses"].as_object().expect("responses") {
                    for (name, link) in response["links"].as_object().into_iter().flatten() {
                        let target = link["operationId"]
                            .as_str()
                            .unwrap_or_else(|| panic!("{method} {path} {status}: link {name}: {link}"));
                        assert!(operation_ids.contains(target), "{method} {path} {status}: link {name} to {target}");
                    }
                }
            }
        }
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["session"]["in"], "cookie");
        assert_eq!(schemes["session"]["name"], SESSION_COOKIE);
    }

    /// Every schema a description refers to exists.
    #[test]
    fn references_resolve() {
        fn walk(v: &Value, doc: &Value, missing: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        let pointer = r.strip_prefix('#').unwrap_or(r);
                        if doc.pointer(pointer).is_none() {
                            missing.push(r.clone());
                        }
                    }
                    map.values().for_each(|v| walk(v, doc, missing));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, doc, missing)),
                _ => {}
            }
        }
        let doc = document();
        let mut missing = Vec::new();
        walk(&doc, &doc, &mut missing);
        assert!(missing.is_empty(), "unresolved references: {missing:?}");
    }

    /// The documented error body is what an error answer carries.
    #[tokio::test]
    async fn error_answers_match_the_error_body_schema() {
        let response = ApiError::conflict("taken").into_response();
        assert_eq!(response.status(), 409);
        let bytes = to_bytes(response.into_body(), 1 << 16).await.expect("body");
        let body: ErrorBody = serde_json::from_slice(&bytes).expect("an ErrorBody");
        assert_eq!((body.error.code.as_str(), body.error.message.as_str()), ("conflict", "taken"));
    }
}

//! `/api/v1/rules`: deploy rule files (`POST`, body: the file's text; `?shadow=true` deploys
//! them as shadows of the running rules), list rules with their counters and the rule files'
//! states (`GET`), one rule (`GET /{name}`), remove a rule (`DELETE /{name}`), and a
//! shadow's comparison, promotion and removal (`/{name}/shadow`). Errors are `{"error": {"code", "message"}}`; a rule that does not
//! compile answers 400 with the diagnostics rendered as `file:line:column`, line and caret.

use ferrite_engine::auth::{Action, Caller, Resource};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrite_engine::ErrorClass;
use ferrite_engine::api_doc::ErrorBody;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::Error;
use crate::files::{FileStatus, RuleFiles};
use crate::runtime::{RuleEngine, RuleInfo, ShadowReport};

/// What the routes need.
#[derive(Debug, Clone)]
pub struct RulesApi {
    /// The rule engine.
    pub engine: Arc<RuleEngine>,
    /// The watched rules directory, if any.
    pub files: Option<Arc<RuleFiles>>,
}

/// Asks the request's [`Caller`] for `query` (reading rules) or `manage_rules` (anything
/// else) before a handler runs, and records successful changes in the audit trail.
async fn enforce(
    axum::Extension(caller): axum::Extension<Caller>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let name = path.strip_prefix("/api/v1/rules/").map(|n| n.split('/').next().unwrap_or(n).to_owned());
    // Rules live in the caller's tenant: names are looked up among its rules only.
    let tenant = caller.tenant();
    let (action, resource) = match (&method, &name) {
        (&axum::http::Method::GET, None) => (Action::Query, Resource::tenant(tenant)),
        (&axum::http::Method::GET, Some(n)) => (Action::Query, Resource::rule(tenant, n)),
        (_, Some(n)) => (Action::ManageRules, Resource::rule(tenant, n)),
        (_, None) => (Action::ManageRules, Resource::tenant(tenant)),
    };
    if let Err(e) = caller.check(action, &resource) {
        return error(StatusCode::FORBIDDEN, "forbidden", e.to_string());
    }
    let response = next.run(request).await;
    if action == Action::ManageRules && response.status().is_success() {
        caller.record("rules_changed", &format!("{method} {path}: {}", response.status()));
    }
    response
}

/// The routes, to merge into the server's router behind authentication (they need the
/// request's [`Caller`]).
pub fn router(api: RulesApi) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(deploy, list))
        .routes(routes!(one, remove))
        .routes(routes!(shadow_report, remove_shadow))
        .routes(routes!(promote))
        .route_layer(axum::middleware::from_fn(enforce))
        .with_state(api)
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(ErrorBody::new(code, message))).into_response()
}

fn from_error(e: &Error, text: Option<&str>) -> Response {
    match (e, e.class()) {
        (Error::Invalid(_), _) => {
            error(StatusCode::BAD_REQUEST, "invalid_rule", e.render("request", text.unwrap_or("")))
        }
        (Error::NotFound(_), _) => error(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        (_, ErrorClass::User) => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        _ => {
            tracing::error!(error = %e, "rules API failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log".into())
        }
    }
}

/// The engine's key of rule `name` of `tenant`.
fn key(tenant: &str, name: &str) -> String {
    if tenant == ferrite_engine::ids::DEFAULT_TENANT { name.to_owned() } else { format!("{tenant}/{name}") }
}

/// Names as the caller's tenant knows them (rule and stream keys without the tenant).
fn local(name: &str) -> String {
    crate::inspect::split_rule_key(name).1.to_owned()
}

/// An engine error about rule `name`, with the rule named as the caller knows it.
fn unscoped(e: Error, name: &str) -> Error {
    match e {
        Error::NotFound(what) if what.ends_with("(shadow)") => Error::NotFound(format!("{name} (shadow)")),
        Error::NotFound(_) => Error::NotFound(name.to_owned()),
        e => e,
    }
}

fn localize(mut info: crate::runtime::RuleInfo) -> crate::runtime::RuleInfo {
    info.name = local(&info.name);
    info.inputs = info.inputs.iter().map(|s| local(s)).collect();
    info.insert_into = info.insert_into.as_deref().map(local);
    info
}

/// The rules a deployment started.
#[derive(Debug, Serialize, ToSchema)]
struct Deployed {
    /// The rules now running (absent for a shadow deployment).
    #[serde(skip_serializing_if = "Option::is_none")]
    deployed: Option<Vec<String>>,
    /// The rules now running as shadows (with `?shadow=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    shadowed: Option<Vec<String>>,
}

/// Rules that wait for their input streams to exist.
#[derive(Debug, Serialize, ToSchema)]
struct Waiting {
    /// The rules.
    waiting: Vec<String>,
    /// What happens next.
    message: &'static str,
    /// The diagnostics, as for a failed file.
    error: Option<String>,
}

/// Every rule of the tenant and the rule files' states.
#[derive(Debug, Serialize, ToSchema)]
struct RuleList {
    rules: Vec<RuleInfo>,
    files: Vec<FileStatus>,
}

/// A shadow that replaced its live rule.
#[derive(Debug, Serialize, ToSchema)]
struct Promoted {
    promoted: String,
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct DeployParams {
    /// `true` deploys the rules as shadows of the running ones, for comparison.
    shadow: Option<bool>,
}

/// Deploys a rule file's text (one or more rules and stream declarations).
#[utoipa::path(
    post,
    path = "/api/v1/rules",
    tag = "rules",
    params(DeployParams),
    request_body(description = "A rule file's text (see docs/rules.md)", content_type = "text/plain", content = String),
    responses(
        (status = 201, description = "Deployed (or deployed as shadows)", body = Deployed),
        (status = 202, description = "Valid, but its input streams do not exist yet: deployed when they do", body = Waiting),
        (status = 400, description = "The rules do not compile (diagnostics with line, column and caret)", body = ErrorBody),
        (status = 403, description = "The caller may not do this to its tenant's rules", body = ErrorBody),
    ),
)]
async fn deploy(
    State(api): State<RulesApi>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<std::collections::HashMap<String, String>>,
    body: String,
) -> Response {
    let tenant = caller.tenant();
    let locals = |names: Vec<String>| names.iter().map(|n| local(n)).collect::<Vec<_>>();
    if params.get("shadow").is_some_and(|v| v == "true" || v == "1") {
        return match api.engine.deploy_shadow_in(tenant, &body) {
            Ok(names) => {
                (StatusCode::CREATED, Json(Deployed { deployed: None, shadowed: Some(locals(names)) })).into_response()
            }
            Err(e) => from_error(&e, Some(&body)),
        };
    }
    match api.engine.deploy_in(tenant, &body, None) {
        Ok(names) => {
            (StatusCode::CREATED, Json(Deployed { deployed: Some(locals(names)), shadowed: None })).into_response()
        }
        // Rules over streams nobody has written yet wait for them, as a rule file does.
        Err(crate::Error::Invalid(ds)) if ds.iter().all(|d| d.code == Some("unknown-stream")) => {
            let error = crate::Error::Invalid(ds);
            let Some(files) = &api.files else { return from_error(&error, Some(&body)) };
            let rules = crate::syntax::parse(&body).map(|f| f.rules.iter().map(|r| r.name.value.clone()).collect());
            let status =
                files.wait_for_streams(tenant, &body, rules.unwrap_or_default(), error.render("request", &body));
            let message = "the rules name streams that do not exist yet; they are deployed as soon as their streams \
                           receive data (GET /api/v1/rules shows them under `files` until then)";
            (StatusCode::ACCEPTED, Json(Waiting { waiting: status.rules, message, error: status.error }))
                .into_response()
        }
        Err(e) => from_error(&e, Some(&body)),
    }
}

/// Lists the tenant's rules with their counters, and the rule files' states.
#[utoipa::path(get, path = "/api/v1/rules", tag = "rules",
    responses((status = 200, description = "The rules", body = RuleList), (status = 403, description = "The caller may not do this to its tenant's rules", body = ErrorBody),))]
async fn list(State(api): State<RulesApi>, Extension(caller): Extension<Caller>) -> Response {
    let tenant = caller.tenant();
    let files = api.files.as_ref().map(|f| f.statuses(tenant)).unwrap_or_default();
    let rules: Vec<_> = api
        .engine
        .list()
        .into_iter()
        .filter(|r| crate::inspect::split_rule_key(&r.name).0 == tenant)
        .map(localize)
        .collect();
    Json(RuleList { rules, files }).into_response()
}

/// Shows one rule: its text, inputs, counters and event-time settings.
#[utoipa::path(get, path = "/api/v1/rules/{name}", tag = "rules", params(("name" = String, Path, description = "The rule's name")),
    responses((status = 200, description = "The rule", body = RuleInfo), (status = 403, description = "The caller may not do this to its tenant's rules", body = ErrorBody),(status = 404, description = "No such rule in the caller's tenant", body = ErrorBody),))]
async fn one(State(api): State<RulesApi>, Extension(caller): Extension<Caller>, Path(name): Path<String>) -> Response {
    match api.engine.info(&key(caller.tenant(), &name)) {
        Ok(info) => Json(localize(info)).into_response(),
        Err(e) => from_error(&unscoped(e, &name), None),
    }
}

/// Removes a rule (or a rule waiting for its streams).
#[utoipa::path(delete, path = "/api/v1/rules/{name}", tag = "rules", params(("name" = String, Path, description = "The rule's name")),
    responses((status = 204, description = "Removed"), (status = 403, description = "The caller may not do this to its tenant's rules", body = ErrorBody),(status = 404, description = "No such rule in the caller's tenant", body = ErrorBody),))]
async fn remove(
    State(api): State<RulesApi>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    let tenant = caller.tenant();
    match api.engine.remove(&key(tenant, &name)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) if api.files.as_ref().is_some_and(|f| f.forget_waiting(tenant, &name)) => {
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => from_error(&unscoped(e, &name), None),
    }
}

/// Compares a shadow's output with its live rule's since the shadow was deployed.
#[utoipa::path(get, path = "/api/v1/rules/{name}/shadow", tag = "rules", params(("name" = String, Path, description = "The rule's name")),
    responses((status = 200, description = "The comparison", body = ShadowReport), (status = 403, description = "The caller may not do this to its tenant's rules", body = ErrorBody),(status = 404, description = "No such rule in the caller's tenant", body = ErrorBody),))]
async fn shadow_report(
    State(api): State<RulesApi>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match api.engine.shadow_report(&key(caller.tenant(), &name)) {
        Ok(mut r) => {
            r.name = local(&r.name);
            Json(r).into_response()
        }
        Err(e) => from_error(&unscoped(e, &name), None),
    }
}

/// Removes a rule's shadow; the live rule runs on.
#[utoipa::path(delete, path = "/api/v1/rules/{name}/shadow", tag = "rules", params(("name" = String, Path, description = "The rule's name")),
    responses((status = 204, description = "Removed"), (status = 403, description = "The caller may not do this to its tenant's rules", body = ErrorBody),(status = 404, description = "No such rule in the caller's tenant", body = ErrorBody),))]
async fn remove_shadow(
    State(api): State<RulesApi>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match api.engine.remove_shadow(&key(caller.tenant(), &name)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => from_error(&unscoped(e, &name), None),
    }
}

/// Replaces a live rule with its shadow.
#[utoipa::path(post, path = "/api/v1/rules/{name}/shadow/promote", tag = "rules", params(("name" = String, Path, description = "The rule's name")),
    responses((status = 200, description = "Promoted", body = Promoted), (status = 403, description = "The caller may not do this to its tenant's rules", body = ErrorBody),(status = 404, description = "No such rule in the caller's tenant", body = ErrorBody),))]
async fn promote(
    State(api): State<RulesApi>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match api.engine.promote(&key(caller.tenant(), &name)) {
        Ok(()) => (StatusCode::OK, Json(Promoted { promoted: name })).into_response(),
        Err(e) => from_error(&unscoped(e, &name), None),
    }
}

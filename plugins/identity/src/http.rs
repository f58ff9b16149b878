//! The identity plugin's HTTP routes: the OAuth2 authorization server (token, device
//! authorization, revocation, introspection, discovery, JWKS) and the admin API (tenants,
//! clients, users, tokens, keys, policies).

// Handlers return early with a finished response; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Form, Json, Router};
use base64::Engine;
use ferrite_engine::auth::{Action, Caller, Principal, PrincipalKind, RequestContext, Resource, Transport};
use ferrite_plugin::{error_response, forbidden};
use serde::Deserialize;

use crate::error::Error;
use crate::service::{DEVICE_CODE_INTERVAL, DEVICE_CODE_TTL, Grant, GrantError, Identity, now};
use crate::store::ClientRecord;

/// The peer's address, when the server was started with connection info.
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())))
    }
}

type Shared = Arc<Identity>;

/// Routes any client may call.
pub fn public_routes(identity: Shared) -> Router {
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/oauth2/device_authorization", post(device_authorization))
        .route("/oauth2/revoke", post(revoke))
        .route("/oauth2/introspect", post(introspect))
        .route("/oauth2/jwks", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/oauth-authorization-server", get(discovery))
        .route("/api/v1/login", post(login))
        .with_state(identity)
}

/// Routes behind authentication.
pub fn protected_routes(identity: Shared) -> Router {
    Router::new()
        .route("/api/v1/tenants", post(add_tenant).get(list_tenants))
        .route("/api/v1/clients", post(add_client).get(list_clients))
        .route("/api/v1/clients/{id}", delete(remove_client))
        .route("/api/v1/users", post(add_user).get(list_users))
        .route("/api/v1/users/{name}/password", post(set_password))
        .route("/api/v1/tokens", post(create_token).get(list_tokens))
        .route("/api/v1/tokens/{jti}", delete(revoke_api_token))
        .route("/api/v1/keys/rotate", post(rotate_key))
        .route("/api/v1/policies", get(list_policies))
        .route("/api/v1/policies/{id}", put(put_policy).delete(delete_policy))
        .route("/api/v1/policies/check", post(check_policy))
        .route("/api/v1/device-codes/{code}/approve", post(approve_code))
        .route("/api/v1/device-codes/{code}/deny", post(deny_code))
        .with_state(identity)
}

// ---- OAuth2 ----

fn oauth_error(status: StatusCode, e: &GrantError) -> Response {
    let mut resp =
        (status, Json(serde_json::json!({ "error": e.error, "error_description": e.description }))).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn grant_error(e: GrantError, basic: bool) -> Response {
    match e.error {
        "invalid_client" => {
            let mut resp = oauth_error(StatusCode::UNAUTHORIZED, &e);
            if basic {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"ferrite\""));
            }
            resp
        }
        "slow_down" if e.retry_after.is_some() => {
            let mut resp = oauth_error(StatusCode::TOO_MANY_REQUESTS, &e);
            let secs = e.retry_after.map(|d| d.as_secs() + 1).unwrap_or(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
        "server_error" => oauth_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        _ => oauth_error(StatusCode::BAD_REQUEST, &e),
    }
}

fn grant_response(g: Grant) -> Response {
    let mut body = serde_json::json!({
        "access_token": g.access_token, "token_type": "Bearer", "expires_in": g.expires_in, "scope": g.scope,
    });
    if let Some(r) = g.refresh_token {
        body["refresh_token"] = r.into();
    }
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Client credentials from HTTP Basic (RFC 6749 §2.3.1) or the form; `true` when Basic.
fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Option<(String, String, bool)>, GrantError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or("");
        if let Some(encoded) = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic ")) {
            let bad = || GrantError::new("invalid_client", "malformed HTTP Basic credentials");
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (id, secret) = text.split_once(':').ok_or_else(bad)?;
            let unescape = |s: &str| form_urlencoded_decode(s);
            return Ok(Some((unescape(id), unescape(secret), true)));
        }
    }
    match (form.get("client_id"), form.get("client_secret")) {
        (Some(id), Some(secret)) => Ok(Some((id.clone(), secret.clone(), false))),
        _ => Ok(None),
    }
}

/// Decodes `application/x-www-form-urlencoded` escapes (RFC 6749 encodes Basic credentials so).
fn form_urlencoded_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

/// The longest a refused credential check is held back.
const MAX_HOLD_BACK: Duration = Duration::from_secs(2);

/// Holds the answer to a failed credential check back (rate limiting, not synchronisation):
/// guessing gets slower with each failure.
async fn hold_back(e: &GrantError) {
    if !e.hold_back.is_zero() {
        tokio::time::sleep(e.hold_back.min(MAX_HOLD_BACK)).await;
    }
}

async fn authenticate_client(
    identity: &Identity,
    creds: Option<(String, String, bool)>,
    peer: Option<IpAddr>,
) -> Result<(ClientRecord, bool), Response> {
    let Some((id, secret, basic)) = creds else {
        let e = GrantError::new(
            "invalid_client",
            "client authentication is required: HTTP Basic, or client_id and client_secret in the form",
        );
        return Err(grant_error(e, false));
    };
    match identity.authenticate_client(&id, &secret, peer) {
        Ok(c) => Ok((c, basic)),
        Err(e) => {
            hold_back(&e).await;
            Err(grant_error(e, basic))
        }
    }
}

async fn token(
    State(identity): State<Shared>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let creds = match client_credentials(&headers, &form) {
        Ok(c) => c,
        Err(e) => return grant_error(e, true),
    };
    let scope = form.get("scope").cloned().unwrap_or_default();
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    let result = match grant_type {
        "client_credentials" => match authenticate_client(&identity, creds, peer).await {
            Ok((client, _)) => identity.client_credentials(&client, &scope).await,
            Err(resp) => return resp,
        },
        "refresh_token" => {
            let Some(refresh) = form.get("refresh_token") else {
                return grant_error(GrantError::new("invalid_request", "refresh_token is missing"), false);
            };
            let client_id = match creds {
                Some(c) => match authenticate_client(&identity, Some(c), peer).await {
                    Ok((client, _)) => Some(client.id),
                    Err(resp) => return resp,
                },
                None => form.get("client_id").cloned(),
            };
            identity.refresh(refresh, client_id.as_deref()).await
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let (Some(code), Some(client_id)) =
                (form.get("device_code"), form.get("client_id").cloned().or(creds.map(|c| c.0)))
            else {
                return grant_error(
                    GrantError::new("invalid_request", "device_code and client_id are required"),
                    false,
                );
            };
            identity.device_code_grant(code, &client_id).await
        }
        "" => Err(GrantError::new("invalid_request", "grant_type is missing")),
        other => Err(GrantError::new(
            "unsupported_grant_type",
            format!(
                "grant type {other:?} is not supported: use client_credentials, refresh_token or urn:ietf:params:oauth:grant-type:device_code"
            ),
        )),
    };
    match result {
        Ok(g) => grant_response(g),
        Err(e) => grant_error(e, false),
    }
}

async fn device_authorization(
    State(identity): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(client_id) = form.get("client_id") else {
        return grant_error(GrantError::new("invalid_request", "client_id is missing"), false);
    };
    let scope = form.get("scope").cloned().unwrap_or_default();
    match identity.device_authorization(client_id, &scope).await {
        Ok((device_code, user_code)) => {
            let base = base_url(&headers);
            Json(serde_json::json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": format!("{base}/api/v1/device-codes/{{user_code}}/approve"),
                "verification_uri_complete": format!("{base}/api/v1/device-codes/{user_code}/approve"),
                "expires_in": DEVICE_CODE_TTL,
                "interval": DEVICE_CODE_INTERVAL,
            }))
            .into_response()
        }
        Err(e) => grant_error(e, false),
    }
}

/// Revocation and introspection accept client authentication or a bearer token that may
/// manage identity.
async fn authorized_caller(
    identity: &Identity,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    peer: Option<IpAddr>,
) -> Result<Option<Principal>, Response> {
    use ferrite_engine::auth::{AccessControl, Credentials};
    let scheme_is_bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().get(..7))
        .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "));
    if scheme_is_bearer {
        let token = ferrite_plugin::bearer(headers).map_err(|e| ferrite_plugin::unauthorized(&e))?.unwrap_or("");
        let ctx = RequestContext::new(Transport::Http, peer);
        let p =
            identity.authenticate(&Credentials::Bearer(token), &ctx).map_err(|e| ferrite_plugin::unauthorized(&e))?;
        if !identity.authorize(&p, Action::ManageIdentity, &Resource::tenant(&p.tenant), &ctx).allowed {
            return Err(error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                "revocation and introspection need manage_identity or client authentication",
            ));
        }
        return Ok(Some(p));
    }
    let creds = client_credentials(headers, form).map_err(|e| grant_error(e, true))?;
    authenticate_client(identity, creds, peer).await?;
    Ok(None)
}

async fn revoke(
    State(identity): State<Shared>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let by = match authorized_caller(&identity, &headers, &form, peer).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let Some(token) = form.get("token") else {
        return grant_error(GrantError::new("invalid_request", "token is missing"), false);
    };
    match identity.revoke_token(token, by.as_ref()).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => api_error(e),
    }
}

async fn introspect(
    State(identity): State<Shared>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(resp) = authorized_caller(&identity, &headers, &form, peer).await {
        return resp;
    }
    let token = form.get("token").map(String::as_str).unwrap_or("");
    match identity.verify_token(token) {
        Ok(c) => Json(serde_json::json!({
            "active": true, "sub": c.sub, "client_id": c.client_id, "scope": c.scope, "exp": c.exp, "iat": c.iat,
            "nbf": c.nbf, "iss": c.iss, "aud": c.aud, "jti": c.jti, "tenant": c.tenant, "token_type": "Bearer",
            "kind": c.kind,
        }))
        .into_response(),
        Err(_) => Json(serde_json::json!({ "active": false })).into_response(),
    }
}

async fn jwks(State(identity): State<Shared>) -> Response {
    Json(identity.jwks()).into_response()
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost:8080");
    format!("http://{host}")
}

async fn discovery(State(identity): State<Shared>, headers: HeaderMap) -> Response {
    let base = base_url(&headers);
    Json(serde_json::json!({
        "issuer": identity.issuer(),
        "token_endpoint": format!("{base}/oauth2/token"),
        "device_authorization_endpoint": format!("{base}/oauth2/device_authorization"),
        "revocation_endpoint": format!("{base}/oauth2/revoke"),
        "introspection_endpoint": format!("{base}/oauth2/introspect"),
        "jwks_uri": format!("{base}/oauth2/jwks"),
        "grant_types_supported": ["client_credentials", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
    }))
    .into_response()
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

async fn login(State(identity): State<Shared>, Peer(peer): Peer, Json(body): Json<Login>) -> Response {
    match identity.login(&body.username, &body.password, peer).await {
        Ok(g) => grant_response(g),
        Err(e) => {
            hold_back(&e).await;
            let status = if e.error == "slow_down" { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::UNAUTHORIZED };
            error_response(status, e.error, &e.description)
        }
    }
}

// ---- the admin API ----

fn api_error(e: Error) -> Response {
    match e {
        Error::NotFound(m) => error_response(StatusCode::NOT_FOUND, "not_found", &m),
        Error::Invalid(m) => error_response(StatusCode::BAD_REQUEST, "invalid", &m),
        Error::Policy(m) => error_response(StatusCode::BAD_REQUEST, "invalid_policy", &m),
        other => error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", &other.to_string()),
    }
}

fn check(caller: &Caller, action: Action, resource: Resource) -> Result<(), Response> {
    caller.check(action, &resource).map_err(|e| forbidden(&e))
}

#[derive(Deserialize)]
struct NewTenant {
    id: String,
}

async fn add_tenant(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<NewTenant>,
) -> Response {
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&body.id)) {
        return r;
    }
    match identity.add_tenant(&body.id, &caller.principal).await {
        Ok(true) => (StatusCode::CREATED, Json(serde_json::json!({ "id": body.id }))).into_response(),
        Ok(false) => error_response(StatusCode::CONFLICT, "exists", &format!("tenant {:?} already exists", body.id)),
        Err(e) => api_error(e),
    }
}

async fn list_tenants(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let tenants: Vec<String> = identity
        .tenants()
        .into_iter()
        .filter(|t| caller.allowed(Action::ManageIdentity, &Resource::tenant(t)))
        .collect();
    Json(serde_json::json!({ "tenants": tenants })).into_response()
}

#[derive(Deserialize)]
struct NewClient {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, rename = "type")]
    device_type: Option<String>,
    #[serde(default)]
    children: Vec<String>,
}

async fn add_client(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<NewClient>,
) -> Response {
    let tenant = body.tenant.unwrap_or_else(|| caller.tenant().to_owned());
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&tenant)) {
        return r;
    }
    let record = ClientRecord {
        id: body.id.unwrap_or_default(),
        tenant: tenant.clone(),
        kind: body.kind.unwrap_or_else(|| "service".into()),
        secret_hash: String::new(),
        roles: body.roles,
        device_type: body.device_type,
        children: body.children,
        disabled: false,
        next_secret_hash: None,
    };
    let kind = record.kind.clone();
    match identity.add_client(record, Some(&caller.principal)).await {
        Ok((id, secret)) => (
            StatusCode::CREATED,
            Json(serde_json::json!({ "client_id": id, "client_secret": secret, "tenant": tenant, "kind": kind })),
        )
            .into_response(),
        Err(e) => api_error(e),
    }
}

async fn list_clients(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let clients: Vec<_> = identity
        .clients()
        .into_iter()
        .filter(|c| caller.allowed(Action::ManageIdentity, &Resource::tenant(&c.tenant)))
        .map(|c| serde_json::json!({ "client_id": c.id, "tenant": c.tenant, "kind": c.kind, "roles": c.roles, "type": c.device_type, "children": c.children, "disabled": c.disabled }))
        .collect();
    Json(serde_json::json!({ "clients": clients })).into_response()
}

async fn remove_client(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let Some(tenant) = identity.tenant_of(&id) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", &format!("no client {id:?}"));
    };
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&tenant)) {
        return r;
    }
    match identity.remove_client(&id, &caller.principal).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => api_error(e),
    }
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    password: Option<String>,
}

async fn add_user(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<NewUser>,
) -> Response {
    let tenant = body.tenant.unwrap_or_else(|| caller.tenant().to_owned());
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&tenant)) {
        return r;
    }
    if body.roles.iter().any(|r| r == "platform-admin") && !caller.principal.has_role("platform-admin") {
        return error_response(StatusCode::FORBIDDEN, "forbidden", "only a platform admin may grant platform-admin");
    }
    match identity.add_user(&body.name, &tenant, body.roles.clone(), body.password.as_deref(), &caller.principal).await
    {
        Ok(()) => {
            (StatusCode::CREATED, Json(serde_json::json!({ "name": body.name, "tenant": tenant, "roles": body.roles })))
                .into_response()
        }
        Err(e) => api_error(e),
    }
}

async fn list_users(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let users: Vec<_> = identity
        .users()
        .into_iter()
        .filter(|u| caller.allowed(Action::ManageIdentity, &Resource::tenant(&u.tenant)))
        .map(|u| serde_json::json!({ "name": u.name, "tenant": u.tenant, "roles": u.roles, "disabled": u.disabled }))
        .collect();
    Json(serde_json::json!({ "users": users })).into_response()
}

#[derive(Deserialize)]
struct NewPassword {
    password: String,
}

async fn set_password(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(body): Json<NewPassword>,
) -> Response {
    let Some(tenant) = identity.tenant_of(&name) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", &format!("no user {name:?}"));
    };
    // A user may change their own password; otherwise manage_identity on their tenant.
    if *caller.principal.id != name
        && let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&tenant))
    {
        return r;
    }
    match identity.set_password(&name, &body.password, &caller.principal).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => api_error(e),
    }
}

#[derive(Deserialize)]
struct NewToken {
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
}

async fn create_token(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<NewToken>,
) -> Response {
    let subject = body.subject.unwrap_or_else(|| caller.principal.id.to_string());
    let Some(tenant) = identity.tenant_of(&subject) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", &format!("no user or client {subject:?}"));
    };
    if *caller.principal.id != subject
        && let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&tenant))
    {
        return r;
    }
    let ttl = match body.ttl.as_deref().map(humantime_secs) {
        None => Duration::from_secs(90 * 24 * 3600),
        Some(Ok(d)) => d,
        Some(Err(m)) => return error_response(StatusCode::BAD_REQUEST, "invalid", &m),
    };
    let description = body.description.unwrap_or_else(|| format!("created by {}", caller.principal.id));
    match identity.create_api_token(&subject, &description, ttl).await {
        Ok((token, r)) => (
            StatusCode::CREATED,
            Json(serde_json::json!({ "token": token, "jti": r.jti, "subject": r.subject, "tenant": r.tenant, "expires_at": r.expires_at })),
        )
            .into_response(),
        Err(e) => api_error(e),
    }
}

/// Parses `90d`, `12h`, `30m`, `45s`.
fn humantime_secs(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("ttl {s:?}: expected a number and a unit (s, m, h, d)"))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("ttl {s:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

async fn list_tokens(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    match identity.api_tokens().await {
        Ok(tokens) => {
            let tokens: Vec<_> = tokens
                .into_iter()
                .filter(|t| *t.subject == *caller.principal.id || caller.allowed(Action::ManageIdentity, &Resource::tenant(&t.tenant)))
                .map(|t| serde_json::json!({ "jti": t.jti, "subject": t.subject, "kind": t.kind, "tenant": t.tenant, "description": t.description, "expires_at": t.expires_at, "created_at": t.created_at }))
                .collect();
            Json(serde_json::json!({ "tokens": tokens })).into_response()
        }
        Err(e) => api_error(e),
    }
}

async fn revoke_api_token(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(jti): Path<String>,
) -> Response {
    let tokens = match identity.api_tokens().await {
        Ok(t) => t,
        Err(e) => return api_error(e),
    };
    let Some(t) = tokens.into_iter().find(|t| t.jti == jti) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", &format!("no live API token {jti:?}"));
    };
    if *t.subject != *caller.principal.id
        && let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&t.tenant))
    {
        return r;
    }
    match identity.revoke_jti(&jti, t.expires_at, Some(&caller.principal)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => api_error(e),
    }
}

async fn rotate_key(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    if !caller.principal.has_role("platform-admin") {
        return error_response(StatusCode::FORBIDDEN, "forbidden", "only a platform admin may rotate the signing key");
    }
    match identity.rotate_key(Some(&caller.principal)).await {
        Ok(kid) => Json(serde_json::json!({ "kid": kid })).into_response(),
        Err(e) => api_error(e),
    }
}

async fn list_policies(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(caller.tenant())) {
        return r;
    }
    let docs: Vec<_> = identity
        .policy_documents()
        .into_iter()
        .map(|(source, text)| serde_json::json!({ "source": source, "text": text }))
        .collect();
    Json(serde_json::json!({ "policies": docs })).into_response()
}

async fn put_policy(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    text: String,
) -> Response {
    if !caller.principal.has_role("platform-admin") {
        return error_response(StatusCode::FORBIDDEN, "forbidden", "only a platform admin may change policies");
    }
    match identity.put_policy(&id, &text, &caller.principal).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => api_error(e),
    }
}

async fn delete_policy(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    if !caller.principal.has_role("platform-admin") {
        return error_response(StatusCode::FORBIDDEN, "forbidden", "only a platform admin may change policies");
    }
    match identity.delete_policy(&id, &caller.principal).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => {
            error_response(StatusCode::NOT_FOUND, "not_found", &format!("no policy {id:?} stored through the API"))
        }
        Err(e) => api_error(e),
    }
}

#[derive(Deserialize)]
struct CheckRequest {
    principal: String,
    action: String,
    resource: String,
}

async fn check_policy(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CheckRequest>,
) -> Response {
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(caller.tenant())) {
        return r;
    }
    match explain(&identity, &body.principal, &body.action, &body.resource) {
        Ok(v) => Json(v).into_response(),
        Err(m) => error_response(StatusCode::BAD_REQUEST, "invalid", &m),
    }
}

/// Parses `kind::"id"` (or `kind::id`).
fn parse_ref(s: &str) -> Result<(String, String), String> {
    let (kind, id) = s.split_once("::").ok_or_else(|| format!("{s:?}: expected kind::\"id\", like device::\"d1\""))?;
    Ok((kind.trim().to_ascii_lowercase(), id.trim().trim_matches('"').to_owned()))
}

/// The decision for a textual question, with the policies that decided it.
pub fn explain(
    identity: &Identity,
    principal: &str,
    action: &str,
    resource: &str,
) -> Result<serde_json::Value, String> {
    let (pkind, pid) = parse_ref(principal)?;
    let kind =
        PrincipalKind::parse(&pkind).ok_or_else(|| format!("principal kind {pkind:?}: use user, device or service"))?;
    let action_v = Action::parse(action).ok_or_else(|| {
        format!("unknown action {action:?}: {}", Action::ALL.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "))
    })?;
    // What the store knows of the principal (tenant, roles, children), asked as `kind`.
    let p = match identity.known_principal(&pid) {
        Some(known) => Principal { kind, ..known },
        None => Principal::new(kind, &pid, ferrite_engine::ids::DEFAULT_TENANT),
    };
    let r = parse_resource(resource, &p.tenant)?;
    let ctx = RequestContext::new(Transport::Local, None);
    let d = identity.explain(&p, action_v, &r, &ctx).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "decision": if d.allowed { "allow" } else { "deny" },
        "policies": d.policies,
        "principal": p.to_string(),
        "action": action_v.as_str(),
        "resource": r.to_string(),
    }))
}

/// Parses `topic::"devices/d1/telemetry"`, `stream::"telemetry"`, `tenant::"a"`, `rule::"r"`,
/// `device::"d1"` (stream, rule and device in `tenant` unless written `tenant/name`).
pub fn parse_resource(s: &str, tenant: &str) -> Result<Resource, String> {
    let (kind, id) = parse_ref(s)?;
    let (t, name) = match id.split_once('/') {
        Some((t, n)) if kind != "topic" => (t.to_owned(), n.to_owned()),
        _ => (tenant.to_owned(), id.clone()),
    };
    Ok(match kind.as_str() {
        "topic" => Resource::topic(&id),
        "stream" => Resource::stream(&t, &name),
        "rule" => Resource::rule(&t, &name),
        "device" => Resource::Device { tenant: t.into(), id: name.into() },
        "tenant" => Resource::tenant(&id),
        other => return Err(format!("resource kind {other:?}: use topic, stream, rule, device or tenant")),
    })
}

async fn approve_code(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(code): Path<String>,
) -> Response {
    decide_code(&identity, &caller, &code, true).await
}

async fn deny_code(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(code): Path<String>,
) -> Response {
    decide_code(&identity, &caller, &code, false).await
}

async fn decide_code(identity: &Identity, caller: &Caller, code: &str, approve: bool) -> Response {
    if caller.principal.kind != PrincipalKind::User {
        return error_response(StatusCode::FORBIDDEN, "forbidden", "only a user may approve a device code");
    }
    match identity.decide_device_code(code, &caller.principal, approve).await {
        Ok(client) => Json(serde_json::json!({ "client_id": client, "status": if approve { "approved" } else { "denied" }, "at": now() })).into_response(),
        Err(e) => api_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_escapes_and_durations_parse() {
        assert_eq!(form_urlencoded_decode("a%3Ab+c"), "a:b c");
        assert_eq!(form_urlencoded_decode("100%"), "100%");
        assert_eq!(humantime_secs("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert!(humantime_secs("9y").is_err());
        assert_eq!(
            parse_resource("topic::\"devices/d2/telemetry\"", "default"),
            Ok(Resource::topic("devices/d2/telemetry"))
        );
        assert_eq!(parse_resource("stream::\"b/x\"", "default"), Ok(Resource::stream("b", "x")));
    }
}

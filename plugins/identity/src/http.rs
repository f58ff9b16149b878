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
use axum::{Extension, Form, Json};
use base64::Engine;
use ferrite_engine::api_doc::ErrorBody;
use ferrite_engine::auth::{Action, Caller, Principal, PrincipalKind, RequestContext, Resource, Transport};
use ferrite_plugin::{error_response, forbidden};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
pub fn public_routes(identity: Shared) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(token))
        .routes(routes!(device_authorization))
        .routes(routes!(revoke))
        .routes(routes!(introspect))
        .routes(routes!(jwks))
        .routes(routes!(discovery))
        .routes(routes!(authorization_server))
        .routes(routes!(login))
        .with_state(identity)
}

/// Routes behind authentication.
pub fn protected_routes(identity: Shared) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(add_tenant, list_tenants))
        .routes(routes!(add_client, list_clients))
        .routes(routes!(remove_client))
        .routes(routes!(add_user, list_users))
        .routes(routes!(set_password))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_api_token))
        .routes(routes!(rotate_key))
        .routes(routes!(list_policies))
        .routes(routes!(put_policy, delete_policy))
        .routes(routes!(check_policy))
        .routes(routes!(approve_code))
        .routes(routes!(deny_code))
        .with_state(identity)
}

/// An OAuth2 error (RFC 6749 §5.2).
#[derive(Debug, Serialize, ToSchema)]
struct OAuthError {
    /// `invalid_request`, `invalid_client`, `invalid_grant`, `unsupported_grant_type`, `slow_down`, ...
    error: &'static str,
    /// What went wrong.
    error_description: String,
}

/// An access token (RFC 6749 §5.1).
#[derive(Debug, Serialize, ToSchema)]
struct TokenAnswer {
    access_token: String,
    /// Always `Bearer`.
    token_type: &'static str,
    /// Seconds until the token expires.
    expires_in: i64,
    scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
}

/// The form of a token request (RFC 6749 §4.4, §6; RFC 8628 §3.4). Client credentials go in
/// HTTP Basic or in `client_id` and `client_secret`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
struct TokenForm {
    /// `client_credentials`, `refresh_token` or `urn:ietf:params:oauth:grant-type:device_code`.
    grant_type: String,
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
    refresh_token: Option<String>,
    device_code: Option<String>,
}

/// The form of a device authorization request (RFC 8628 §3.1).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
struct DeviceAuthorizationForm {
    client_id: String,
    scope: Option<String>,
}

/// The form of a revocation (RFC 7009) or introspection (RFC 7662) request, with client
/// authentication (HTTP Basic or the form) or a bearer token that may manage identity.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
struct TokenQueryForm {
    token: String,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// A device authorization (RFC 8628 §3.2).
#[derive(Debug, Serialize, ToSchema)]
struct DeviceAuthorization {
    device_code: String,
    /// The code a user approves.
    user_code: String,
    verification_uri: String,
    verification_uri_complete: String,
    /// Seconds the codes stay valid.
    expires_in: i64,
    /// Seconds to wait between polls.
    interval: i64,
}

/// A token's state (RFC 7662 §2.2); only `active` when it is not.
#[derive(Debug, Default, Serialize, ToSchema)]
struct Introspection {
    active: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    claims: Option<IntrospectedClaims>,
}

/// The claims of an active token.
#[derive(Debug, Serialize, ToSchema)]
struct IntrospectedClaims {
    sub: String,
    client_id: String,
    scope: String,
    exp: i64,
    iat: i64,
    nbf: i64,
    iss: String,
    aud: String,
    jti: String,
    tenant: String,
    token_type: &'static str,
    /// `user`, `device` or `service`.
    kind: String,
}

/// OAuth 2.0 authorization server metadata (RFC 8414).
#[derive(Debug, Serialize, ToSchema)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
    device_authorization_endpoint: String,
    revocation_endpoint: String,
    introspection_endpoint: String,
    jwks_uri: String,
    grant_types_supported: [&'static str; 3],
    token_endpoint_auth_methods_supported: [&'static str; 2],
    id_token_signing_alg_values_supported: [&'static str; 1],
    response_types_supported: [&'static str; 1],
    subject_types_supported: [&'static str; 1],
}

// ---- OAuth2 ----

fn oauth_error(status: StatusCode, e: &GrantError) -> Response {
    let body = OAuthError { error: e.error, error_description: e.description.clone() };
    let mut resp = (status, Json(body)).into_response();
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
    let body = TokenAnswer {
        access_token: g.access_token,
        token_type: "Bearer",
        expires_in: g.expires_in,
        scope: g.scope,
        refresh_token: g.refresh_token,
    };
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

/// The OAuth2 token endpoint: client credentials, refresh tokens and the device code grant.
#[utoipa::path(post, path = "/oauth2/token", tag = "identity", security(()),
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "An access token", body = TokenAnswer),
        (status = 400, description = "An OAuth2 error (RFC 6749 §5.2)", body = OAuthError),
        (status = 401, description = "The client did not authenticate", body = OAuthError),
        (status = 429, description = "`slow_down`: too many attempts (see Retry-After)", body = OAuthError),
    ))]
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

/// Starts the device authorization grant (RFC 8628) for a device without a keyboard.
#[utoipa::path(post, path = "/oauth2/device_authorization", tag = "identity", security(()),
    request_body(content = DeviceAuthorizationForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "The device and user codes", body = DeviceAuthorization),
        (status = 400, description = "An OAuth2 error (RFC 6749 §5.2)", body = OAuthError),
        (status = 401, description = "The client did not authenticate", body = OAuthError),
        (status = 429, description = "`slow_down`: too many attempts (see Retry-After)", body = OAuthError),
    ))]
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
            Json(DeviceAuthorization {
                device_code,
                verification_uri: format!("{base}/api/v1/device-codes/{{user_code}}/approve"),
                verification_uri_complete: format!("{base}/api/v1/device-codes/{user_code}/approve"),
                user_code,
                expires_in: DEVICE_CODE_TTL,
                interval: DEVICE_CODE_INTERVAL,
            })
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

/// Revokes an access or refresh token (RFC 7009).
#[utoipa::path(post, path = "/oauth2/revoke", tag = "identity", security(()),
    request_body(content = TokenQueryForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Revoked (or already unknown)"),
        (status = 400, description = "An OAuth2 error (RFC 6749 §5.2)", body = OAuthError),
        (status = 401, description = "The client did not authenticate", body = OAuthError),
        (status = 429, description = "`slow_down`: too many attempts (see Retry-After)", body = OAuthError),
        (status = 403, description = "The caller may not manage identity here", body = ErrorBody),
    ))]
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

/// Says whether a token is active, and its claims (RFC 7662).
#[utoipa::path(post, path = "/oauth2/introspect", tag = "identity", security(()),
    request_body(content = TokenQueryForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "The token's state", body = Introspection),
        (status = 400, description = "An OAuth2 error (RFC 6749 §5.2)", body = OAuthError),
        (status = 401, description = "The client did not authenticate", body = OAuthError),
        (status = 429, description = "`slow_down`: too many attempts (see Retry-After)", body = OAuthError),
        (status = 403, description = "The caller may not manage identity here", body = ErrorBody),
    ))]
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
        Ok(c) => Json(Introspection {
            active: true,
            claims: Some(IntrospectedClaims {
                sub: c.sub,
                client_id: c.client_id,
                scope: c.scope,
                exp: c.exp,
                iat: c.iat,
                nbf: c.nbf,
                iss: c.iss,
                aud: c.aud,
                jti: c.jti,
                tenant: c.tenant,
                token_type: "Bearer",
                kind: c.kind,
            }),
        })
        .into_response(),
        Err(_) => Json(Introspection::default()).into_response(),
    }
}

/// The public keys that verify Ferrite's tokens (JWKS, RFC 7517).
#[utoipa::path(get, path = "/oauth2/jwks", tag = "identity", security(()),
    responses((status = 200, description = "The key set", body = Object)))]
async fn jwks(State(identity): State<Shared>) -> Response {
    Json(identity.jwks()).into_response()
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost:8080");
    format!("http://{host}")
}

fn metadata(identity: &Identity, headers: &HeaderMap) -> Response {
    let base = base_url(headers);
    Json(Discovery {
        issuer: identity.issuer().to_owned(),
        token_endpoint: format!("{base}/oauth2/token"),
        device_authorization_endpoint: format!("{base}/oauth2/device_authorization"),
        revocation_endpoint: format!("{base}/oauth2/revoke"),
        introspection_endpoint: format!("{base}/oauth2/introspect"),
        jwks_uri: format!("{base}/oauth2/jwks"),
        grant_types_supported: ["client_credentials", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        token_endpoint_auth_methods_supported: ["client_secret_basic", "client_secret_post"],
        id_token_signing_alg_values_supported: ["EdDSA"],
        response_types_supported: ["token"],
        subject_types_supported: ["public"],
    })
    .into_response()
}

/// OpenID Connect discovery: the authorization server's endpoints and capabilities.
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "identity", security(()),
    responses((status = 200, description = "The metadata", body = Discovery)))]
async fn discovery(State(identity): State<Shared>, headers: HeaderMap) -> Response {
    metadata(&identity, &headers)
}

/// OAuth 2.0 authorization server metadata (RFC 8414), the same document as OpenID discovery.
#[utoipa::path(get, path = "/.well-known/oauth-authorization-server", tag = "identity", security(()),
    responses((status = 200, description = "The metadata", body = Discovery)))]
async fn authorization_server(State(identity): State<Shared>, headers: HeaderMap) -> Response {
    metadata(&identity, &headers)
}

/// A user's name and password.
#[derive(Deserialize, ToSchema)]
struct Login {
    username: String,
    password: String,
}

/// Logs a user in with a name and password; answers a token as the token endpoint does.
#[utoipa::path(post, path = "/api/v1/login", tag = "identity", security(()),
    request_body = Login,
    responses(
        (status = 200, description = "An access token", body = TokenAnswer),
        (status = 401, description = "Wrong name or password", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody),
    ))]
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

/// A new tenant.
#[derive(Deserialize, Serialize, ToSchema)]
struct NewTenant {
    /// Its id (letters, digits, `-`, `_`).
    id: String,
}

/// The tenants the caller may manage.
#[derive(Serialize, ToSchema)]
struct TenantList {
    tenants: Vec<String>,
}

/// Creates a tenant.
#[utoipa::path(post, path = "/api/v1/tenants", tag = "identity", request_body = NewTenant,
    responses((status = 201, description = "Created", body = NewTenant), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody),
        (status = 409, description = "It exists", body = ErrorBody)))]
async fn add_tenant(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<NewTenant>,
) -> Response {
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(&body.id)) {
        return r;
    }
    match identity.add_tenant(&body.id, &caller.principal).await {
        Ok(true) => (StatusCode::CREATED, Json(NewTenant { id: body.id })).into_response(),
        Ok(false) => error_response(StatusCode::CONFLICT, "exists", &format!("tenant {:?} already exists", body.id)),
        Err(e) => api_error(e),
    }
}

/// Lists the tenants the caller may manage.
#[utoipa::path(get, path = "/api/v1/tenants", tag = "identity",
    responses((status = 200, description = "The tenants", body = TenantList)))]
async fn list_tenants(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let tenants: Vec<String> = identity
        .tenants()
        .into_iter()
        .filter(|t| caller.allowed(Action::ManageIdentity, &Resource::tenant(t)))
        .collect();
    Json(TenantList { tenants }).into_response()
}

/// A new OAuth2 client (a service or a device).
#[derive(Deserialize, ToSchema)]
struct NewClient {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    /// `service` (default) or `device`.
    #[serde(default)]
    kind: Option<String>,
    /// A device's type.
    #[serde(default, rename = "type")]
    device_type: Option<String>,
    /// The devices a gateway publishes for.
    #[serde(default)]
    children: Vec<String>,
}

/// A new client and its secret (shown once).
#[derive(Serialize, ToSchema)]
struct NewClientAnswer {
    client_id: String,
    client_secret: String,
    tenant: String,
    kind: String,
}

/// A client, without its secret.
#[derive(Serialize, ToSchema)]
struct ClientInfo {
    client_id: String,
    tenant: String,
    kind: String,
    roles: Vec<String>,
    #[serde(rename = "type")]
    device_type: Option<String>,
    children: Vec<String>,
    disabled: bool,
}

/// The clients the caller may manage.
#[derive(Serialize, ToSchema)]
struct ClientList {
    clients: Vec<ClientInfo>,
}

/// Creates an OAuth2 client (a service or a device) and answers its secret, once.
#[utoipa::path(post, path = "/api/v1/clients", tag = "identity", request_body = NewClient,
    responses((status = 201, description = "Created", body = NewClientAnswer), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody)))]
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
        Ok((id, secret)) => {
            (StatusCode::CREATED, Json(NewClientAnswer { client_id: id, client_secret: secret, tenant, kind }))
                .into_response()
        }
        Err(e) => api_error(e),
    }
}

/// Lists the clients the caller may manage.
#[utoipa::path(get, path = "/api/v1/clients", tag = "identity",
    responses((status = 200, description = "The clients", body = ClientList)))]
async fn list_clients(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let clients: Vec<_> = identity
        .clients()
        .into_iter()
        .filter(|c| caller.allowed(Action::ManageIdentity, &Resource::tenant(&c.tenant)))
        .map(|c| ClientInfo {
            client_id: c.id,
            tenant: c.tenant,
            kind: c.kind,
            roles: c.roles,
            device_type: c.device_type,
            children: c.children,
            disabled: c.disabled,
        })
        .collect();
    Json(ClientList { clients }).into_response()
}

/// Removes a client; its tokens stop working.
#[utoipa::path(delete, path = "/api/v1/clients/{id}", tag = "identity",
    params(("id" = String, Path, description = "The client id")),
    responses((status = 204, description = "Removed"), (status = 403, description = "The caller may not manage identity here", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
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

/// A new user.
#[derive(Deserialize, ToSchema)]
struct NewUser {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    /// Without one, the user cannot log in until one is set.
    #[serde(default)]
    password: Option<String>,
}

/// A user.
#[derive(Serialize, ToSchema)]
struct UserInfo {
    name: String,
    tenant: String,
    roles: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled: Option<bool>,
}

/// The users the caller may manage.
#[derive(Serialize, ToSchema)]
struct UserList {
    users: Vec<UserInfo>,
}

/// Creates a user.
#[utoipa::path(post, path = "/api/v1/users", tag = "identity", request_body = NewUser,
    responses((status = 201, description = "Created", body = UserInfo), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody)))]
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
        Ok(()) => (StatusCode::CREATED, Json(UserInfo { name: body.name, tenant, roles: body.roles, disabled: None }))
            .into_response(),
        Err(e) => api_error(e),
    }
}

/// Lists the users the caller may manage.
#[utoipa::path(get, path = "/api/v1/users", tag = "identity",
    responses((status = 200, description = "The users", body = UserList)))]
async fn list_users(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let users: Vec<_> = identity
        .users()
        .into_iter()
        .filter(|u| caller.allowed(Action::ManageIdentity, &Resource::tenant(&u.tenant)))
        .map(|u| UserInfo { name: u.name, tenant: u.tenant, roles: u.roles, disabled: Some(u.disabled) })
        .collect();
    Json(UserList { users }).into_response()
}

/// A new password.
#[derive(Deserialize, ToSchema)]
struct NewPassword {
    password: String,
}

/// Sets a user's password (their own, or any in a tenant the caller manages).
#[utoipa::path(post, path = "/api/v1/users/{name}/password", tag = "identity",
    params(("name" = String, Path, description = "The user")), request_body = NewPassword,
    responses((status = 204, description = "Set"), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
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

/// A new API token.
#[derive(Deserialize, ToSchema)]
struct NewToken {
    /// The user or client it acts as (default: the caller).
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// Its lifetime: `90d` (default), `12h`, `30m`, `45s`.
    #[serde(default)]
    ttl: Option<String>,
}

/// A new API token (shown once).
#[derive(Serialize, ToSchema)]
struct NewTokenAnswer {
    token: String,
    jti: String,
    subject: String,
    tenant: String,
    /// Unix seconds.
    expires_at: i64,
}

/// A live API token, without its secret.
#[derive(Serialize, ToSchema)]
struct TokenInfo {
    jti: String,
    subject: String,
    kind: String,
    tenant: String,
    description: String,
    expires_at: i64,
    created_at: i64,
}

/// The live API tokens the caller may see.
#[derive(Serialize, ToSchema)]
struct TokenList {
    tokens: Vec<TokenInfo>,
}

/// The new signing key.
#[derive(Serialize, ToSchema)]
struct RotatedKey {
    kid: String,
}

/// A policy document and where it came from.
#[derive(Serialize, ToSchema)]
struct PolicyDocument {
    /// `builtin`, a file, or `api:ID`.
    source: String,
    /// Its Cedar text.
    text: String,
}

/// The policies in force.
#[derive(Serialize, ToSchema)]
struct PolicyList {
    policies: Vec<PolicyDocument>,
}

/// A device code's new state.
#[derive(Serialize, ToSchema)]
struct CodeDecision {
    client_id: String,
    /// `approved` or `denied`.
    status: &'static str,
    /// Unix seconds.
    at: i64,
}

/// Creates a long-lived API token for the caller or, with `manage_identity`, another subject.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "identity", request_body = NewToken,
    responses((status = 201, description = "Created (the token is shown once)", body = NewTokenAnswer), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
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
            Json(NewTokenAnswer { token, jti: r.jti, subject: r.subject, tenant: r.tenant, expires_at: r.expires_at }),
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

/// Lists the live API tokens the caller may see.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "identity",
    responses((status = 200, description = "The tokens", body = TokenList)))]
async fn list_tokens(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    match identity.api_tokens().await {
        Ok(tokens) => {
            let tokens: Vec<_> = tokens
                .into_iter()
                .filter(|t| {
                    *t.subject == *caller.principal.id
                        || caller.allowed(Action::ManageIdentity, &Resource::tenant(&t.tenant))
                })
                .map(|t| TokenInfo {
                    jti: t.jti,
                    subject: t.subject,
                    kind: t.kind,
                    tenant: t.tenant,
                    description: t.description,
                    expires_at: t.expires_at,
                    created_at: t.created_at,
                })
                .collect();
            Json(TokenList { tokens }).into_response()
        }
        Err(e) => api_error(e),
    }
}

/// Revokes an API token by its id.
#[utoipa::path(delete, path = "/api/v1/tokens/{jti}", tag = "identity",
    params(("jti" = String, Path, description = "The token's id")),
    responses((status = 204, description = "Revoked"), (status = 403, description = "The caller may not manage identity here", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
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

/// Rotates the token signing key (platform admins); tokens signed by the old key stay valid until they expire.
#[utoipa::path(post, path = "/api/v1/keys/rotate", tag = "identity",
    responses((status = 200, description = "The new key's id", body = RotatedKey), (status = 403, description = "The caller may not manage identity here", body = ErrorBody)))]
async fn rotate_key(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    if !caller.principal.has_role("platform-admin") {
        return error_response(StatusCode::FORBIDDEN, "forbidden", "only a platform admin may rotate the signing key");
    }
    match identity.rotate_key(Some(&caller.principal)).await {
        Ok(kid) => Json(RotatedKey { kid }).into_response(),
        Err(e) => api_error(e),
    }
}

/// Lists the Cedar policies in force.
#[utoipa::path(get, path = "/api/v1/policies", tag = "identity",
    responses((status = 200, description = "The policies", body = PolicyList), (status = 403, description = "The caller may not manage identity here", body = ErrorBody)))]
async fn list_policies(State(identity): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(r) = check(&caller, Action::ManageIdentity, Resource::tenant(caller.tenant())) {
        return r;
    }
    let docs: Vec<_> =
        identity.policy_documents().into_iter().map(|(source, text)| PolicyDocument { source, text }).collect();
    Json(PolicyList { policies: docs }).into_response()
}

/// Stores a Cedar policy document under an id (platform admins); it takes effect at once.
#[utoipa::path(put, path = "/api/v1/policies/{id}", tag = "identity",
    params(("id" = String, Path, description = "The document's id")),
    request_body(description = "Cedar policy text", content_type = "text/plain", content = String),
    responses((status = 204, description = "Stored"), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody)))]
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

/// Deletes a policy document stored through the API (platform admins).
#[utoipa::path(delete, path = "/api/v1/policies/{id}", tag = "identity",
    params(("id" = String, Path, description = "The document's id")),
    responses((status = 204, description = "Deleted"), (status = 403, description = "The caller may not manage identity here", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
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

/// A policy question: may this principal do this action on this resource?
#[derive(Deserialize, ToSchema)]
struct CheckRequest {
    /// `user::"alice"`, `device::"d1"` or `service::"s"`.
    principal: String,
    /// `ingest`, `query`, `subscribe`, `manage_devices`, ...
    action: String,
    /// `topic::"devices/d1/telemetry"`, `stream::"telemetry"`, `tenant::"a"`, `rule::"r"`, `device::"d1"`.
    resource: String,
}

/// A policy decision and the policies that made it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Decision {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The ids of the deciding policies (empty for a default deny).
    pub policies: Vec<String>,
    /// The principal as asked.
    pub principal: String,
    /// The action as asked.
    pub action: &'static str,
    /// The resource as asked.
    pub resource: String,
}

/// Answers a policy question and names the policies that decided it.
#[utoipa::path(post, path = "/api/v1/policies/check", tag = "identity", request_body = CheckRequest,
    responses((status = 200, description = "The decision", body = Decision), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody)))]
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
pub fn explain(identity: &Identity, principal: &str, action: &str, resource: &str) -> Result<Decision, String> {
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
    Ok(Decision {
        decision: if d.allowed { "allow" } else { "deny" },
        policies: d.policies,
        principal: p.to_string(),
        action: action_v.as_str(),
        resource: r.to_string(),
    })
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

/// Approves a device code (users only): the device polling with it receives its token.
#[utoipa::path(post, path = "/api/v1/device-codes/{code}/approve", tag = "identity",
    params(("code" = String, Path, description = "The user code")),
    responses((status = 200, description = "Approved", body = CodeDecision), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
async fn approve_code(
    State(identity): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(code): Path<String>,
) -> Response {
    decide_code(&identity, &caller, &code, true).await
}

/// Denies a device code (users only).
#[utoipa::path(post, path = "/api/v1/device-codes/{code}/deny", tag = "identity",
    params(("code" = String, Path, description = "The user code")),
    responses((status = 200, description = "Denied", body = CodeDecision), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "The caller may not manage identity here", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
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
        Ok(client) => {
            let status = if approve { "approved" } else { "denied" };
            Json(CodeDecision { client_id: client, status, at: now() }).into_response()
        }
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

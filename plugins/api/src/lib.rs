//! The plugin API: the trait a service hosted around the engine implements (identity,
//! devices, actuation), and the HTTP authentication middleware every protected route sits
//! behind. The engine-side half (what a plugin is given, the enforcement-point traits) is
//! `ferrite_engine::plugin` and `ferrite_engine::auth`; this crate adds what needs HTTP
//! types. See docs/adr/0002-plugins.md.

pub mod events;
pub mod secret;
pub mod sql;
pub mod throttle;
pub mod usage;

pub use events::EventLog;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferrite_engine::auth::{
    AccessControl, AuthError, Caller, ClientCertificate, Credentials, Denied, Principal, RequestContext, TENANT_HEADER,
    Transport,
};
use ferrite_engine::plugin::PluginContext;

/// A boxed future, for the trait's async methods (it must stay object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a plugin could not start.
#[derive(Debug, thiserror::Error)]
#[error("plugin {plugin}: {message}")]
pub struct PluginError {
    /// The plugin's name.
    pub plugin: &'static str,
    /// What went wrong, and how to fix it.
    pub message: String,
}

/// A plugin's HTTP routes, each documented in the OpenAPI document (`#[utoipa::path]` on
/// its handler, registered with `utoipa_axum::routes!`).
#[derive(Default)]
pub struct Routes {
    /// Routes any client may call (OAuth2 endpoints, discovery documents).
    pub public: utoipa_axum::router::OpenApiRouter,
    /// Routes behind authentication: handlers find the [`Caller`] in the request's
    /// extensions and call [`Caller::check`] before they act.
    pub protected: utoipa_axum::router::OpenApiRouter,
}

/// A service hosted around the engine. The server starts every plugin in order at boot
/// (after storage and the engine, before the listeners), merges their routes, and stops
/// them in reverse order at shutdown.
pub trait Plugin: Send + Sync {
    /// A short name (`identity`, `device`): its storage directory, its log target.
    fn name(&self) -> &'static str;

    /// Starts the plugin's own work (background tasks, stream subscriptions).
    fn start<'a>(&'a self, context: &'a PluginContext) -> BoxFuture<'a, Result<(), PluginError>>;

    /// The plugin's HTTP routes.
    fn routes(&self) -> Routes;

    /// Stops what [`Plugin::start`] started; called once, at shutdown.
    fn stop(&self) -> BoxFuture<'_, ()>;
}

/// The JSON error body every Ferrite endpoint answers with: `{"error": {"code", "message"}}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(ferrite_engine::api_doc::ErrorBody::new(code, message))).into_response()
}

/// HTTP 401 for an authentication failure, with the `WWW-Authenticate` challenge of RFC 6750.
pub fn unauthorized(e: &AuthError) -> Response {
    let mut resp = error_response(StatusCode::UNAUTHORIZED, e.code(), &e.to_string());
    let challenge = match e {
        AuthError::Missing => "Bearer realm=\"ferrite\"".to_owned(),
        _ => "Bearer realm=\"ferrite\", error=\"invalid_token\"".to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// HTTP 403 for a policy denial.
pub fn forbidden(e: &Denied) -> Response {
    error_response(StatusCode::FORBIDDEN, "forbidden", &e.to_string())
}

/// A plugin handler's error answer, `{"error": {"code", "message"}}` (boxed: responses are
/// large). A plugin converts its own error enum into it; a policy denial converts to 403.
pub struct ApiError(Box<Response>);

impl ApiError {
    /// An answer with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &str, message: &str) -> Self {
        Self(Box::new(error_response(status, code, message)))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> Self {
        Self(Box::new(forbidden(&e)))
    }
}

/// Middleware for the whole HTTP app: an error answer to a request that carried a body says
/// `Connection: close`. A refusal (401, 403, 413, ...) often leaves the body unread, and then
/// the server cannot reuse the connection; without the header a client's pool would send its
/// next request into a closed socket.
pub async fn close_after_error(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    let mut response = next.run(request).await;
    if has_body && (response.status().is_client_error() || response.status().is_server_error()) {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The longest `Authorization` header accepted; longer ones are refused before any parsing.
pub const MAX_AUTHORIZATION_BYTES: usize = 8 * 1024;

/// Puts `router` behind authentication: every request must carry a valid bearer token
/// (401 otherwise); the resulting [`Caller`] goes into the request's extensions.
pub fn protect(router: Router, access: Arc<dyn AccessControl>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(access, authenticate))
}

async fn authenticate(State(access): State<Arc<dyn AccessControl>>, mut request: Request, next: Next) -> Response {
    let source = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let mut context = RequestContext::new(Transport::Http, source);
    context.tls = request.extensions().get::<usage::OverTls>().is_some();
    let tenant = match acting_tenant(request.headers(), access.as_ref()) {
        Ok(t) => t,
        Err(response) => return *response,
    };
    if !access.enabled() {
        let caller = Caller::new(Principal::anonymous(), context, access);
        request.extensions_mut().insert(match &tenant {
            Some(t) => caller.in_tenant(t),
            None => caller,
        });
        return next.run(request).await;
    }
    let v1_token = influx_v1_token(&request);
    let token = match v1_token.as_deref() {
        Some(t) => Ok(Some(t)),
        None => bearer(request.headers()),
    };
    let principal = match token {
        Err(e) => return unauthorized(&e),
        // No token: a verified client certificate is the device's credential (mutual TLS).
        Ok(None) => match request.extensions().get::<ClientCertificate>() {
            None => return unauthorized(&AuthError::Missing),
            Some(ClientCertificate(subject)) => {
                let credentials = Credentials::Certificate { subject, client_id: subject, username: None };
                match access.authenticate(&credentials, &context) {
                    Ok(p) => p,
                    Err(e) => return unauthorized(&e),
                }
            }
        },
        Ok(Some(token)) => match access.authenticate(&Credentials::Bearer(token), &context) {
            Ok(p) => p,
            Err(e) => return unauthorized(&e),
        },
    };
    let caller = Caller::new(principal, context, access);
    request.extensions_mut().insert(match &tenant {
        Some(t) => caller.in_tenant(t),
        None => caller,
    });
    next.run(request).await
}

/// The tenant a request names with the `Ferrite-Tenant` header, if any: 400 when it is not
/// a valid tenant id, 404 when no such tenant exists.
fn acting_tenant(headers: &axum::http::HeaderMap, access: &dyn AccessControl) -> Result<Option<String>, Box<Response>> {
    let Some(value) = headers.get(TENANT_HEADER) else { return Ok(None) };
    let bad = |status, code, message: String| Box::new(error_response(status, code, &message));
    let tenant = value
        .to_str()
        .map_err(|_| bad(StatusCode::BAD_REQUEST, "invalid_tenant", "the Ferrite-Tenant header is not ASCII".into()))?;
    ferrite_engine::validate_tenant(tenant)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, "invalid_tenant", format!("Ferrite-Tenant header: {e}")))?;
    if !access.tenant_exists(tenant) {
        return Err(bad(
            StatusCode::NOT_FOUND,
            "unknown_tenant",
            format!("no tenant {tenant:?} (the Ferrite-Tenant header); create it with POST /api/v1/tenants"),
        ));
    }
    Ok(Some(tenant.to_owned()))
}

/// The bearer token of a request, if it has an `Authorization` header; an error for an
/// oversized header or another scheme.
pub fn bearer(headers: &axum::http::HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(AuthError::InvalidToken(format!(
            "the Authorization header is {} bytes, more than the {MAX_AUTHORIZATION_BYTES} accepted",
            value.len()
        )));
    }
    let value = value.to_str().map_err(|_| AuthError::InvalidToken("the Authorization header is not ASCII".into()))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    // `Token` is the scheme of InfluxDB's clients (Telegraf, the v2 and v3 libraries).
    let known = scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token");
    if !known || token.trim().is_empty() {
        return Err(AuthError::InvalidToken(format!(
            "expected `Authorization: Bearer <token>` (or `Token <token>`), got the {scheme:?} scheme"
        )));
    }
    Ok(Some(token.trim()))
}

/// The token of an InfluxDB 1.x request to `/write`, as its clients send one: the password
/// of HTTP Basic credentials, or the `p` query parameter (the user name is not used; a
/// Ferrite token is the password, as with InfluxDB 2's 1.x compatibility API). `None`
/// elsewhere, and when the request carries neither.
fn influx_v1_token(request: &Request) -> Option<String> {
    if request.uri().path() != "/write" {
        return None;
    }
    let headers = request.headers();
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        return (!password.is_empty()).then(|| password.to_owned());
    }
    // The query string as the handler reads it (percent-decoded by the same extractor).
    let axum::extract::Query(mut query) =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(request.uri()).ok()?;
    query.remove("p").filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use ferrite_engine::auth::{Action, AllowAll, Decision, PrincipalKind, Resource};

    use super::*;

    /// Accepts the token `good` as device d1, which may query tenant `default` only.
    struct OneToken;

    impl AccessControl for OneToken {
        fn enabled(&self) -> bool {
            true
        }
        fn authenticate(&self, c: &Credentials<'_>, _: &RequestContext) -> Result<Principal, AuthError> {
            match c {
                Credentials::Bearer("good") => Ok(Principal::new(PrincipalKind::Device, "d1", "default")),
                _ => Err(AuthError::InvalidToken("unknown".into())),
            }
        }
        fn authorize(&self, _: &Principal, a: Action, r: &Resource, _: &RequestContext) -> Decision {
            if a == Action::Query && *r == Resource::tenant("default") { Decision::allow() } else { Decision::deny() }
        }
        fn generation(&self) -> u64 {
            0
        }
        fn still_valid(&self, _: &Principal) -> bool {
            true
        }
    }

    async fn handler(axum::Extension(caller): axum::Extension<Caller>) -> Response {
        match caller.check(Action::Query, &Resource::tenant("other")) {
            Ok(()) => "ok".into_response(),
            Err(e) => forbidden(&e),
        }
    }

    async fn call(access: Arc<dyn AccessControl>, auth: Option<&str>) -> (StatusCode, String) {
        use tower::ServiceExt;
        let app = protect(Router::new().route("/x", get(handler)), access);
        let mut req = Request::builder().uri("/x");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let resp = app.oneshot(req.body(Body::empty()).expect("request")).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn missing_malformed_and_oversized_credentials_get_401_and_denials_403() {
        let access: Arc<dyn AccessControl> = Arc::new(OneToken);
        let (s, body) = call(access.clone(), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(body.contains("unauthenticated"), "{body}");
        assert_eq!(call(access.clone(), Some("Basic abc")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(access.clone(), Some("Bearer bad")).await.0, StatusCode::UNAUTHORIZED);
        let huge = format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION_BYTES + 1));
        let (s, body) = call(access.clone(), Some(&huge)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(body.contains("more than"), "{body}");
        let (s, body) = call(access, Some("Bearer good")).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(body.contains("denied by policy"), "{body}");
        // With identity off, the anonymous admin passes without any header.
        assert_eq!(call(Arc::new(AllowAll), None).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn error_answers_to_requests_with_a_body_close_the_connection() {
        use tower::ServiceExt;
        let app = Router::new()
            .route("/refuse", axum::routing::post(|| async { StatusCode::FORBIDDEN }))
            .route("/ok", axum::routing::post(|| async { StatusCode::OK }))
            .layer(axum::middleware::from_fn(close_after_error));
        let send = |path: &str, body: &'static str| {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header(header::CONTENT_LENGTH, body.len())
                .body(Body::from(body))
                .expect("request");
            app.clone().oneshot(req)
        };
        let closes = |r: &Response| r.headers().get(header::CONNECTION).is_some_and(|v| v == "close");
        assert!(closes(&send("/refuse", "unread body").await.expect("infallible")));
        assert!(!closes(&send("/refuse", "").await.expect("infallible")));
        assert!(!closes(&send("/ok", "body").await.expect("infallible")));
    }
}

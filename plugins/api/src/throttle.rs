//! Rate limits on the HTTP API: after authentication, each request takes a token from its
//! principal's and its tenant's bucket for its class (ingest, query, management); over the
//! limit it is answered 429 `rate_limited` with `Retry-After` (seconds) and a message that
//! names the limit, and counted in `ferrite_throttled_total{class, scope}`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use ferrite_engine::limits::{Class, RateLimiter, retry_after_secs};
use ferrite_engine::{Caller, Metrics};

/// The class of an HTTP request, by its route.
pub fn class_of(method: &Method, path: &str) -> Class {
    let ingest = (path.starts_with("/api/v1/streams/") && path.ends_with("/events"))
        || matches!(path, "/api/v2/write" | "/write" | "/api/v3/write_lp");
    match (method, path) {
        (&Method::POST, _) if ingest => Class::Ingest,
        (_, "/api/v1/sql") => Class::Query,
        _ => Class::Management,
    }
}

/// Wraps `router` (whose requests already carry their [`Caller`]) with the limits; without
/// any limit configured, the router is returned as it is and requests pay nothing.
pub fn throttle(router: Router, limiter: Arc<RateLimiter>, metrics: Arc<Metrics>) -> Router {
    if !limiter.is_active() {
        return router;
    }
    router.layer(axum::middleware::from_fn_with_state((limiter, metrics), check))
}

async fn check(
    State((limiter, metrics)): State<(Arc<RateLimiter>, Arc<Metrics>)>,
    request: Request,
    next: Next,
) -> Response {
    let Some(caller) = request.extensions().get::<Caller>() else { return next.run(request).await };
    let class = class_of(request.method(), request.uri().path());
    match limiter.check(class, &caller.principal.id, caller.tenant(), 1.0) {
        Ok(()) => next.run(request).await,
        Err(t) => {
            metrics.inc("ferrite_throttled_total", &[("class", class.as_str()), ("scope", t.scope)], 1);
            tracing::info!(principal = %caller.principal.id, tenant = caller.tenant(), "request throttled: {t}");
            let message = format!("{t} (HTTP 429: wait for Retry-After, then send again)");
            let mut resp = crate::error_response(StatusCode::TOO_MANY_REQUESTS, "rate_limited", &message);
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs(t.retry_after).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_fall_in_their_classes() {
        assert_eq!(class_of(&Method::POST, "/api/v1/streams/telemetry/events"), Class::Ingest);
        assert_eq!(class_of(&Method::POST, "/api/v2/write"), Class::Ingest);
        assert_eq!(class_of(&Method::POST, "/write"), Class::Ingest);
        assert_eq!(class_of(&Method::POST, "/api/v3/write_lp"), Class::Ingest);
        assert_eq!(class_of(&Method::POST, "/api/v1/sql"), Class::Query);
        assert_eq!(class_of(&Method::GET, "/api/v1/streams"), Class::Management);
        assert_eq!(class_of(&Method::POST, "/api/v1/devices"), Class::Management);
    }
}

//! The HTTP side of API usage as data: each authenticated request becomes a row of its
//! tenant's `api_usage` stream (see [`ferrite_engine::usage`]), with its route template,
//! status, time to the response head and bytes in and out. Requests refused by
//! authentication are in the `audit` stream instead (they have no principal to bill).

use std::time::{Instant, SystemTime};

use axum::Router;
use axum::body::HttpBody;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use ferrite_engine::Caller;
use ferrite_engine::usage::{UsageLog, UsageRecord};

/// Marks requests that arrived over TLS (set by the HTTPS listener's router).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Records every request of `router` (whose requests already carry their [`Caller`]) in
/// `log`; with usage off, the router is returned as it is.
pub fn record_usage(router: Router, log: UsageLog) -> Router {
    if !log.is_on() {
        return router;
    }
    router.layer(axum::middleware::from_fn_with_state(log, record))
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn declared_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

async fn record(State(log): State<UsageLog>, request: Request, next: Next) -> Response {
    let Some(caller) = request.extensions().get::<Caller>() else { return next.run(request).await };
    let (principal, tenant) = (caller.principal.id.clone(), caller.tenant().into());
    let at = SystemTime::now();
    let started = Instant::now();
    let method = method_name(request.method());
    let class = crate::throttle::class_of(request.method(), request.uri().path()).as_str();
    let route = match request.extensions().get::<MatchedPath>() {
        Some(p) => p.as_str().to_owned(),
        None => request.uri().path().to_owned(),
    };
    let transport = if request.extensions().get::<OverTls>().is_some() { "https" } else { "http" };
    let bytes_in = declared_length(request.headers()).unwrap_or(0);
    let response = next.run(request).await;
    let bytes_out = response.body().size_hint().exact().or_else(|| declared_length(response.headers())).unwrap_or(0);
    log.record(UsageRecord {
        at,
        tenant,
        principal,
        transport,
        class,
        route,
        method,
        status: response.status().as_u16(),
        reason: "",
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        bytes_in,
        bytes_out,
        messages: 0,
    });
    response
}

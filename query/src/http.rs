//! SQL and catalog endpoints:
//!
//! - `POST /api/v1/sql` with `{"sql": "..."}`: JSON (an array of row objects) by default;
//!   CSV with `Accept: text/csv`; Arrow IPC stream with
//!   `Accept: application/vnd.apache.arrow.stream`.
//! - `GET /api/v1/streams`: every stream, its columns and row counts.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use ferrite_engine::auth::{AUDIT_STREAM, Action, Caller, Resource};
use ferrite_engine::clock::{format_duration, parse_duration};
use ferrite_engine::{ErrorClass, StreamName};
use serde::Deserialize;
use serde_json::json;

use crate::{Error, QueryService, Scope};

/// Media type of Arrow IPC streams.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// `Ok(what the caller sees)` when the caller may query its tenant, the 403 otherwise: the
/// tenant's streams, less `audit` without `read_audit`.
fn scope(caller: &Caller) -> Result<Scope, ApiError> {
    let tenant = caller.tenant();
    if let Err(e) = caller.check(Action::Query, &Resource::tenant(tenant)) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()));
    }
    let scope = Scope::tenant(tenant);
    if caller.access.enabled() && !caller.allowed(Action::ReadAudit, &Resource::tenant(tenant)) {
        return Ok(scope.hiding(AUDIT_STREAM));
    }
    Ok(scope)
}

/// The query routes, to merge into the server's router behind authentication (they need
/// the request's [`Caller`]).
pub fn router(service: Arc<QueryService>) -> Router {
    Router::new()
        .route("/api/v1/sql", post(post_sql))
        .route("/api/v1/streams", get(get_streams))
        .route("/api/v1/streams/{stream}/retention", put(put_retention))
        .with_state(service)
}

/// `{"error": {"code", "message"}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError(StatusCode, &'static str, String, Option<u64>);

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self(status, code, message, None)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        if let Error::QuotaExceeded(q) = &e {
            let retry = ferrite_engine::limits::retry_after_secs(q.retry_after);
            return ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                e.code(),
                format!("{e} (HTTP 429: retry after {retry} s)"),
                Some(retry),
            );
        }
        match e.class() {
            ErrorClass::User => ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()),
            _ => {
                tracing::error!(error = %e, "query failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(json!({"error": {"code": self.1, "message": self.2}}))).into_response();
        if let Some(secs) = self.3 {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
}

/// Output formats of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON array of row objects.
    Json,
    /// CSV with a header row.
    Csv,
    /// Arrow IPC stream.
    Arrow,
}

impl Format {
    /// Picks the format from an `Accept` header.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains(ARROW_STREAM) || a.contains("application/vnd.apache.arrow") => Format::Arrow,
            Some(a) if a.contains("text/csv") => Format::Csv,
            _ => Format::Json,
        }
    }

    /// Its media type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => ARROW_STREAM,
        }
    }
}

/// Encodes query results in `format`.
pub fn encode(format: Format, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, Error> {
    let enc = |e: datafusion::arrow::error::ArrowError| Error::Encode(e.to_string());
    let mut out = Vec::new();
    match format {
        Format::Json => {
            // Explicit nulls: every row object has every column, like a SQL row.
            let mut w = datafusion::arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, datafusion::arrow::json::writer::JsonArray>(&mut out);
            for b in batches {
                w.write(b).map_err(enc)?;
            }
            w.finish().map_err(enc)?;
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
        }
        Format::Csv => {
            let mut w = datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            if batches.is_empty() {
                let header = schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(",");
                drop(w);
                out.extend_from_slice(header.as_bytes());
                out.push(b'\n');
            } else {
                for b in batches {
                    w.write(b).map_err(enc)?;
                }
            }
        }
        Format::Arrow => {
            let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, schema).map_err(enc)?;
            for b in batches {
                w.write(b).map_err(enc)?;
            }
            w.finish().map_err(enc)?;
        }
    }
    Ok(out)
}

async fn post_sql(
    State(service): State<Arc<QueryService>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let scope = match scope(&caller) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let request: SqlRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected a JSON body {{\"sql\": \"...\"}}: {e}"),
            )
            .into_response();
        }
    };
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    if let Err(e) = service.take_query(&scope.tenant) {
        return ApiError::from(e).into_response();
    }
    let result = match service.sql_in(&scope, &request.sql).await {
        Ok(r) => r,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match encode(format, &result.schema, &result.batches) {
        Ok(bytes) => ([(header::CONTENT_TYPE, format.content_type())], bytes).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn get_streams(State(service): State<Arc<QueryService>>, Extension(caller): Extension<Caller>) -> Response {
    let scope = match scope(&caller) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let stats = service.storage().stats();
    let streams: Vec<serde_json::Value> = service
        .catalog()
        .list_in(&scope.tenant)
        .iter()
        .filter(|s| !scope.hidden.iter().any(|h| h == s.name.local()))
        .map(|s| {
            let st = stats.get(s.name.as_str()).copied().unwrap_or_default();
            let columns: Vec<serde_json::Value> = s
                .arrow
                .fields()
                .iter()
                .map(|f| {
                    let ty = match f.name().as_str() {
                        "time" => "timestamp",
                        "device_id" => "string",
                        name => s.field_type(name).map(|t| t.name()).unwrap_or("unknown"),
                    };
                    let mut c = json!({"name": f.name(), "type": ty, "nullable": f.is_nullable()});
                    if let Some(d) = service.catalog().declared(&s.name, f.name()) {
                        c["declared"] = json!(true);
                        if let Some(u) = d.unit {
                            c["unit"] = json!(u);
                        }
                        if d.tag {
                            c["tag"] = json!(true);
                        }
                    }
                    c
                })
                .collect();
            let retention = service.catalog().retention(&s.name).map(format_duration);
            json!({
                "name": s.name.local(),
                "columns": columns,
                "rows": {"hot": st.hot_rows, "archived": st.archived_rows},
                "archive": {"files": st.files, "bytes": st.archived_bytes},
                "retention": retention,
            })
        })
        .collect();
    Json(json!({ "streams": streams })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionRequest {
    /// `"90d"`, or `null` to keep rows for ever.
    retention: Option<String>,
}

/// `PUT /api/v1/streams/{stream}/retention` `{"retention": "90d" | null}`: a stream setting,
/// like a rule file's `stream NAME { retention 90d }`; needs `manage_rules` on the tenant.
async fn put_retention(
    State(service): State<Arc<QueryService>>,
    Extension(caller): Extension<Caller>,
    Path(stream): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let tenant = caller.tenant();
    if let Err(e) = caller.check(Action::ManageRules, &Resource::tenant(tenant)) {
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()).into_response();
    }
    let name = match StreamName::in_tenant(tenant, &stream) {
        Ok(n) => n,
        Err(e) => return ApiError::new(StatusCode::BAD_REQUEST, "invalid_stream_name", e.to_string()).into_response(),
    };
    let request: RetentionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("expected a JSON body {{\"retention\": \"90d\"}} (or null for ever): {e}");
            return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg).into_response();
        }
    };
    let retention = match request.retention.as_deref().map(|t| (t, parse_duration(t.trim()))) {
        None => None,
        Some((_, Some(d))) => Some(d),
        Some((t, None)) => {
            let msg = format!("retention {t:?} is not a duration: write e.g. \"90d\", \"36h\" or \"1h30m\"");
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_retention", msg).into_response();
        }
    };
    if let Err(e) = service.catalog().set_retention(&name, retention) {
        let status =
            if e.class() == ErrorClass::User { StatusCode::BAD_REQUEST } else { StatusCode::INTERNAL_SERVER_ERROR };
        return ApiError::new(status, "invalid_retention", e.to_string()).into_response();
    }
    caller.record(
        "stream_retention_set",
        &format!("{}: {}", name.local(), retention.map_or("none".into(), format_duration)),
    );
    Json(json!({"name": name.local(), "retention": retention.map(format_duration)})).into_response()
}

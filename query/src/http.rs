//! SQL and catalog endpoints:
//!
//! - `POST /api/v1/sql` with `{"sql": "..."}`: JSON (an array of row objects) by default;
//!   CSV with `Accept: text/csv`; Arrow IPC stream with
//!   `Accept: application/vnd.apache.arrow.stream`.
//! - `GET /api/v1/streams`: every stream, its columns and row counts.

use std::sync::Arc;

use axum::extract::Path;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use ferrite_engine::api_doc::ErrorBody;
use ferrite_engine::auth::{AUDIT_STREAM, Action, Caller, Resource};
use ferrite_engine::clock::{format_duration, parse_duration};
use ferrite_engine::{ErrorClass, StreamName};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
pub fn router(service: Arc<QueryService>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(post_sql))
        .routes(routes!(get_streams))
        .routes(routes!(put_retention))
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
        let mut response = (self.0, Json(ErrorBody::new(self.1, self.2))).into_response();
        if let Some(secs) = self.3 {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

/// A SQL request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    /// One SQL statement (DataFusion's dialect) over the caller's tenant's streams.
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

/// Runs a SQL query over the hot buffer and the archive of the caller's tenant.
#[utoipa::path(
    post,
    path = "/api/v1/sql",
    tag = "query",
    request_body = SqlRequest,
    params(("Accept" = Option<String>, Header, description = "`application/json` (default), `text/csv` or `application/vnd.apache.arrow.stream`")),
    responses(
        (status = 200, description = "The rows: a JSON array of row objects, CSV with a header, or an Arrow IPC stream, by `Accept`",
            content(
                (Vec<Object> = "application/json"),
                (String = "text/csv"),
                (Vec<u8> = "application/vnd.apache.arrow.stream"),
            )),
        (status = 400, description = "The body or the SQL is invalid (the message says where)", body = ErrorBody),
        (status = 403, description = "The caller may not query its tenant", body = ErrorBody),
        (status = 429, description = "Over the tenant's daily query quota (see Retry-After)", body = ErrorBody),
    ),
)]
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

/// Every stream of the tenant.
#[derive(Debug, Serialize, ToSchema)]
struct StreamList {
    streams: Vec<StreamInfo>,
}

/// A stream: its columns, row counts, archive and retention.
#[derive(Debug, Serialize, ToSchema)]
struct StreamInfo {
    /// The stream's name in its tenant.
    name: String,
    columns: Vec<ColumnInfo>,
    rows: RowCounts,
    archive: ArchiveInfo,
    /// How long rows are kept (`90d`), or null for ever.
    retention: Option<String>,
}

/// A column of a stream.
#[derive(Debug, Serialize, ToSchema)]
struct ColumnInfo {
    name: String,
    /// `timestamp`, `string`, `float`, `integer`, `unsigned`, `boolean`, ...
    #[serde(rename = "type")]
    column_type: String,
    nullable: bool,
    /// Declared in a `stream` declaration (rather than inferred).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    declared: bool,
    /// The declared unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    /// Declared as a tag.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    tag: bool,
}

/// Rows in memory and in Parquet.
#[derive(Debug, Serialize, ToSchema)]
struct RowCounts {
    hot: u64,
    archived: u64,
}

/// The stream's Parquet files.
#[derive(Debug, Serialize, ToSchema)]
struct ArchiveInfo {
    files: u64,
    bytes: u64,
}

/// Lists the tenant's streams with their columns, row counts and retention.
#[utoipa::path(
    get,
    path = "/api/v1/streams",
    tag = "query",
    responses(
        (status = 200, description = "The streams", body = StreamList),
        (status = 403, description = "The caller may not query its tenant", body = ErrorBody),
    ),
)]
async fn get_streams(State(service): State<Arc<QueryService>>, Extension(caller): Extension<Caller>) -> Response {
    let scope = match scope(&caller) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let stats = service.storage().stats();
    let streams: Vec<StreamInfo> = service
        .catalog()
        .list_in(&scope.tenant)
        .iter()
        .filter(|s| !scope.hidden.iter().any(|h| h == s.name.local()))
        .map(|s| {
            let st = stats.get(s.name.as_str()).copied().unwrap_or_default();
            let columns = s
                .arrow
                .fields()
                .iter()
                .map(|f| {
                    let ty = match f.name().as_str() {
                        "time" => "timestamp",
                        "device_id" => "string",
                        name => s.field_type(name).map(|t| t.name()).unwrap_or("unknown"),
                    };
                    let declared = service.catalog().declared(&s.name, f.name());
                    ColumnInfo {
                        name: f.name().clone(),
                        column_type: ty.to_owned(),
                        nullable: f.is_nullable(),
                        declared: declared.is_some(),
                        unit: declared.as_ref().and_then(|d| d.unit.clone()),
                        tag: declared.is_some_and(|d| d.tag),
                    }
                })
                .collect();
            StreamInfo {
                name: s.name.local().to_owned(),
                columns,
                rows: RowCounts { hot: st.hot_rows as u64, archived: st.archived_rows },
                archive: ArchiveInfo { files: st.files as u64, bytes: st.archived_bytes },
                retention: service.catalog().retention(&s.name).map(format_duration),
            }
        })
        .collect();
    Json(StreamList { streams }).into_response()
}

/// A stream's retention.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RetentionRequest {
    /// `"90d"`, or `null` to keep rows for ever.
    retention: Option<String>,
}

/// `PUT /api/v1/streams/{stream}/retention` `{"retention": "90d" | null}`: a stream setting,
/// like a rule file's `stream NAME { retention 90d }`; needs `manage_rules` on the tenant.
#[utoipa::path(
    put,
    path = "/api/v1/streams/{stream}/retention",
    tag = "query",
    params(("stream" = String, Path, description = "The stream")),
    request_body = RetentionRequest,
    responses(
        (status = 200, description = "The stream's new retention", body = StreamRetention),
        (status = 400, description = "Not a duration, or an invalid stream name", body = ErrorBody),
        (status = 403, description = "The caller may not manage rules in its tenant", body = ErrorBody),
    ),
)]
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
    Json(StreamRetention { name: name.local().to_owned(), retention: retention.map(format_duration) }).into_response()
}

/// A stream's retention, as set.
#[derive(Debug, Serialize, ToSchema)]
struct StreamRetention {
    name: String,
    /// How long rows are kept, or null for ever.
    retention: Option<String>,
}

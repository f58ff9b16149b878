//! HTTP ingest routes:
//!
//! - `POST /api/v1/streams/{stream}/events`: a JSON object, a JSON array of objects, or
//!   NDJSON (`Content-Type: application/x-ndjson`); every event carries `device_id`.
//! - `POST /api/v2/write?bucket=...&precision=...`: InfluxDB line protocol.
//! - `POST /write?db=...&precision=...`: the same, as InfluxDB 1.x answers it.
//! - `POST /api/v3/write_lp?db=...&precision=...&accept_partial=...&no_sync=...`: the same, as
//!   InfluxDB 3 answers it.
//!
//! Both answer only once the accepted events are committed to the write-ahead log.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use ferrite_engine::api_doc::ErrorBody;
use ferrite_engine::auth::{Action, Caller, Resource};
use ferrite_engine::{ErrorClass, StreamName};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::Error;
use crate::line_protocol::Precision;
use crate::pipeline::{Durability, IngestReport, Ingestor, LineOptions, Payload, Transport};

/// An error answered as `{"error": {"code", "message"}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Box<serde_json::Value>>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: None, retry_after: None }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let retry_after = match &e {
            Error::Overloaded { retry_after } | Error::Busy { retry_after, .. } | Error::Shed { retry_after, .. } => {
                Some(*retry_after)
            }
            // The disk or the WAL failed (full, an I/O error): nothing was acknowledged, and
            // a retry succeeds once the operator frees space.
            Error::Commit(_) => Some(crate::pipeline::RETRY_AFTER_SECS),
            Error::QuotaExceeded(q) => Some(ferrite_engine::limits::retry_after_secs(q.retry_after)),
            _ => None,
        };
        let status = match (&e, e.class()) {
            (Error::PayloadTooLarge { .. }, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (Error::QuotaExceeded(_), _) => StatusCode::TOO_MANY_REQUESTS,
            (
                Error::ShuttingDown
                | Error::Overloaded { .. }
                | Error::Busy { .. }
                | Error::Shed { .. }
                | Error::Commit(_)
                | Error::Engine(ferrite_engine::Error::ShuttingDown),
                _,
            ) => StatusCode::SERVICE_UNAVAILABLE,
            (_, ErrorClass::User) => StatusCode::BAD_REQUEST,
            (_, ErrorClass::External | ErrorClass::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = e.code();
        let message = if let Error::Commit(_) = &e {
            // The detail (a path, the OS error) is for the operator's log, not the client.
            tracing::error!(error = %e, "ingest failed");
            "the events could not be committed to the write-ahead log (the server's disk failed or is full); \
             nothing was kept: retry later"
                .to_owned()
        } else if retry_after.is_some() {
            e.to_string()
        } else if status.is_server_error() {
            tracing::error!(error = %e, "ingest failed");
            e.to_string()
        } else {
            e.to_string()
        };
        Self { retry_after, ..Self::new(status, code, message) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody::new(self.code, self.message).with_details(self.details.map(|d| *d));
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

impl From<ferrite_engine::auth::Denied> for ApiError {
    fn from(e: ferrite_engine::auth::Denied) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
    }
}

/// The ingest routes, to merge into the server's router behind authentication: every
/// handler needs the request's [`Caller`] and asks it for `ingest` before it decodes.
pub fn router(ingestor: Arc<Ingestor>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(post_events))
        .routes(routes!(post_line_protocol))
        .routes(routes!(post_v1_write))
        .routes(routes!(post_v3_write))
        .with_state(ingestor)
}

/// How long a request body may take to arrive once it has room: a client trickling its body
/// would otherwise hold that room for as long as it likes.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn read_body(ingestor: &Ingestor, body: Body) -> Result<Bytes, ApiError> {
    let limit = ingestor.max_payload_bytes();
    let Ok(read) = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s; send it faster or in smaller requests",
                BODY_TIMEOUT.as_secs()
            ),
        ));
    };
    match read {
        Ok(b) => Ok(b),
        Err(e) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                ingestor.metrics().inc(
                    "ferrite_rejected_events_total",
                    &[("transport", "http"), ("reason", "payload_too_large")],
                    1,
                );
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request body exceeds the limit of {limit} bytes; split it into smaller requests"),
                ))
            } else {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_body", format!("cannot read the request body: {e}")))
            }
        }
    }
}

/// One rejected event of a batch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rejected {
    /// Its position in the batch (0-based; the line for NDJSON and line protocol).
    pub index: usize,
    /// Why, as a stable code.
    pub code: String,
    /// Why, and how to fix it.
    pub message: String,
}

/// The answer to a batch of events: the accepted ones are committed, the rejected ones are
/// listed (the rest of the batch is not lost because of them).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IngestAnswer {
    /// Events committed to the write-ahead log.
    pub accepted: usize,
    /// Events refused.
    pub rejected: usize,
    /// Why each refused event was refused.
    pub errors: Vec<Rejected>,
}

fn rejections(report: &IngestReport) -> Vec<Rejected> {
    report
        .rejections
        .iter()
        .map(|r| Rejected { index: r.index, code: r.reason.to_string(), message: r.message.clone() })
        .collect()
}

fn rejection_details(report: &IngestReport) -> serde_json::Value {
    serde_json::to_value(rejections(report)).unwrap_or_default()
}

/// Writes events to a stream: a JSON object, a JSON array of objects, or NDJSON.
#[utoipa::path(
    post,
    path = "/api/v1/streams/{stream}/events",
    tag = "ingest",
    params(("stream" = String, Path, description = "The stream (created on first write)")),
    request_body(
        description = "A JSON object, a JSON array of objects, or NDJSON (`Content-Type: application/x-ndjson`); every event carries `device_id` (a device's own id is implied)",
        content(
            (Object = "application/json"),
            (String = "application/x-ndjson"),
        ),
    ),
    responses(
        (status = 200, description = "Committed to the write-ahead log; refused events listed", body = IngestAnswer),
        (status = 400, description = "Every event was refused, or the stream name is invalid", body = ErrorBody),
        (status = 403, description = "The caller may not ingest into this stream", body = ErrorBody),
        (status = 408, description = "The body took longer than 30 s to arrive", body = ErrorBody),
        (status = 413, description = "The body is over the payload limit", body = ErrorBody),
        (status = 415, description = "A device posted NDJSON", body = ErrorBody),
        (status = 429, description = "Over a rate limit or daily quota (see Retry-After)", body = ErrorBody),
        (status = 503, description = "At capacity, overloaded, shutting down, or the write-ahead log could not be written (see Retry-After)", body = ErrorBody),
    ),
)]
async fn post_events(
    State(ingestor): State<Arc<Ingestor>>,
    Extension(caller): Extension<Caller>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The stream is the caller's tenant's: a name never reaches another tenant's stream.
    let stream = StreamName::in_tenant(caller.tenant(), &stream)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_stream_name", e.to_string()))?;
    caller.check(Action::Ingest, &Resource::stream(stream.tenant(), stream.local()))?;
    // Room for the payload before its body is read: a node at capacity answers 503 `busy`
    // after a bounded wait instead of holding the bodies of every client that keeps sending.
    let room = ingestor.admit(Transport::Http).await.map_err(ApiError::from)?;
    let bytes = read_body(&ingestor, body).await?;
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("ndjson") || ct.contains("jsonlines") || ct.contains("json-seq"));
    // A device posts only its own events: each is bound to it (a `device_id` naming another
    // device is rejected, as on its MQTT topic).
    let own =
        (caller.principal.kind == ferrite_engine::auth::PrincipalKind::Device).then(|| caller.principal.id.to_string());
    let payload = match (ndjson, own) {
        (true, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a device posts its events as a JSON object or array (its MQTT payload), not NDJSON",
            ));
        }
        (false, Some(device)) => Payload::Json { stream, device: Some(device) },
        (true, None) => Payload::Ndjson { stream },
        (false, None) => Payload::Json { stream, device: None },
    };
    let report = ingestor.ingest_admitted(room, Transport::Http, payload, bytes, Durability::Committed).await?;
    if report.accepted == 0 && report.rejected > 0 {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_events",
            format!("all {} events were rejected; first: {}", report.rejected, report.rejections[0].message),
        );
        e.details = Some(Box::new(rejection_details(&report)));
        return Err(e);
    }
    Ok(Json(IngestAnswer { accepted: report.accepted, rejected: report.rejected, errors: rejections(&report) })
        .into_response())
}

/// The query parameters of an InfluxDB v2 write.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct WriteParams {
    /// Accepted for InfluxDB clients; the measurement names the stream.
    #[allow(dead_code)]
    bucket: Option<String>,
    /// Accepted for InfluxDB clients; the caller's tenant is used.
    #[allow(dead_code)]
    org: Option<String>,
    /// Timestamp unit: `ns` (default), `us`, `ms` or `s`.
    precision: Option<String>,
    /// The tag that names the device, over the stream's declared one and the defaults.
    device_tag: Option<String>,
    /// The device of lines without a device tag.
    default_device: Option<String>,
}

/// Writes InfluxDB line protocol; each measurement is a stream.
#[utoipa::path(
    post,
    path = "/api/v2/write",
    tag = "ingest",
    params(WriteParams),
    request_body(description = "InfluxDB line protocol, one point per line", content_type = "text/plain", content = String),
    responses(
        (status = 204, description = "Every line committed to the write-ahead log"),
        (status = 400, description = "Some lines refused (the others were written), or a bad precision", body = ErrorBody),
        (status = 403, description = "The caller may not ingest into its tenant", body = ErrorBody),
        (status = 408, description = "The body took longer than 30 s to arrive", body = ErrorBody),
        (status = 413, description = "The body is over the payload limit", body = ErrorBody),
        (status = 429, description = "Over a rate limit or daily quota (see Retry-After)", body = ErrorBody),
        (status = 503, description = "At capacity, overloaded, shutting down, or the write-ahead log could not be written (see Retry-After)", body = ErrorBody),
    ),
)]
async fn post_line_protocol(
    State(ingestor): State<Arc<Ingestor>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<WriteParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let precision = precision(params.precision.as_deref(), "ns, us, ms, s")?;
    let options =
        LineOptions { device_tag: params.device_tag, default_device: params.default_device, all_or_nothing: false };
    let (report, _) = write_lines(&ingestor, &caller, precision, options, Durability::Committed, body).await?;
    if report.rejected == 0 {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut e = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_line_protocol",
        format!(
            "{} of {} lines rejected (the other lines were written); first: {}",
            report.rejected,
            report.rejected + report.accepted,
            report.rejections[0].message
        ),
    );
    e.details = Some(Box::new(json!({"accepted": report.accepted, "errors": rejections(&report)})));
    Err(e)
}

/// The timestamp unit of a write, `ns` when absent; the 400 when it is not one of `expected`.
fn precision(p: Option<&str>, expected: &str) -> Result<Precision, ApiError> {
    match p {
        None => Ok(Precision::Nanoseconds),
        Some(p) => Precision::parse(p).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_precision",
                format!("precision `{p}` is not one of {expected}"),
            )
        }),
    }
}

/// Writes a line-protocol body into the caller's tenant.
async fn write_lines(
    ingestor: &Ingestor,
    caller: &Caller,
    precision: Precision,
    options: LineOptions,
    durability: Durability,
    body: Body,
) -> Result<(IngestReport, Bytes), ApiError> {
    // A line-protocol body may name any measurement of the caller's tenant: the caller must
    // be allowed to ingest into that tenant as a whole.
    caller.check(Action::Ingest, &Resource::tenant(caller.tenant()))?;
    let room = ingestor.admit(Transport::LineProtocol).await.map_err(ApiError::from)?;
    let bytes = read_body(ingestor, body).await?;
    // A JSON body (an InfluxDB 2.x JSON point, or Ferrite's events) is no line: say so once
    // instead of rejecting every line of it.
    if matches!(bytes.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'[')) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "json_body",
            "the body is JSON, and this endpoint takes InfluxDB line protocol (`measurement,tag=v field=1 \
             1700000000000000000`, one point per line); send JSON events to POST \
             /api/v1/streams/{stream}/events instead",
        ));
    }
    let payload = Payload::LineProtocol { precision, tenant: caller.tenant().into(), options };
    let report = ingestor.ingest_admitted(room, Transport::LineProtocol, payload, bytes.clone(), durability).await?;
    Ok((report, bytes))
}

/// The tenant an InfluxDB `db` names: with identity on, a tenant of that name other than
/// the caller's own is acted in (the caller's policies decide whether it may write there);
/// any other `db` (and every `db` with identity off, where tenants do not exist) is ignored,
/// as InfluxDB 2's compatibility API ignores a database without a mapping.
fn in_db(caller: Caller, db: Option<&str>) -> Caller {
    match db {
        Some(db)
            if caller.access.enabled()
                && db != caller.tenant()
                && ferrite_engine::validate_tenant(db).is_ok()
                && caller.access.tenant_exists(db) =>
        {
            caller.in_tenant(db)
        }
        _ => caller,
    }
}

/// The lines of `body` that `report` rejected, with their text, for the InfluxDB answers.
fn rejected_lines(body: &[u8], report: &IngestReport) -> Vec<(usize, String, String)> {
    let text = String::from_utf8_lossy(body);
    let lines: Vec<&str> = text.split('\n').collect();
    report
        .rejections
        .iter()
        .map(|r| {
            let line = lines.get(r.index).map(|l| l.trim_end_matches('\r')).unwrap_or("");
            (r.index + 1, line.chars().take(1024).collect(), r.message.clone())
        })
        .collect()
}

/// InfluxDB's error answer, 1.x and 3.x alike: `{"error": "..."}` with a status, and
/// `Retry-After` where the Ferrite error had one.
fn influx_error(e: ApiError) -> Response {
    let mut response = (e.status, Json(json!({ "error": e.message }))).into_response();
    if let Some(secs) = e.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    response
}

/// The query parameters of an InfluxDB 1.x write.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct V1WriteParams {
    /// A tenant's name to write into (with identity on, when such a tenant exists); ignored otherwise.
    db: Option<String>,
    /// Accepted for InfluxDB clients; retention is a stream setting.
    #[allow(dead_code)]
    rp: Option<String>,
    /// Timestamp unit: `n` or `ns` (default), `u`, `ms`, `s`, `m`, `h`.
    precision: Option<String>,
    /// Accepted for InfluxDB clients (one node: every write is as consistent as it gets).
    #[allow(dead_code)]
    consistency: Option<String>,
    /// Accepted for InfluxDB clients; the token is in `p`.
    #[allow(dead_code)]
    u: Option<String>,
    /// A Ferrite token (InfluxDB 1.x's password), when not in the `Authorization` header.
    #[allow(dead_code)]
    p: Option<String>,
    /// The tag that names the device, over the stream's declared one and the defaults.
    device_tag: Option<String>,
    /// The device of lines without a device tag.
    default_device: Option<String>,
}

/// InfluxDB 1.x's error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct V1Error {
    /// What went wrong.
    error: String,
}

/// Writes line protocol as InfluxDB 1.x's `/write` does (the TSBS loader, Telegraf's
/// `influxdb` output, the 1.x client libraries). Tokens come as `Authorization: Token` or
/// `Bearer`, as Basic credentials' password, or as `p`.
#[utoipa::path(
    post,
    path = "/write",
    tag = "ingest",
    params(V1WriteParams),
    request_body(description = "InfluxDB line protocol, one point per line", content_type = "text/plain", content = String),
    responses(
        (status = 204, description = "Every line committed to the write-ahead log"),
        (status = 400, description = "`partial write`: some lines refused (the others were written), or a bad precision", body = V1Error),
        (status = 401, description = "No or a bad token", body = ErrorBody),
        (status = 403, description = "The caller may not write into the tenant", body = V1Error),
        (status = 408, description = "The body took longer than 30 s to arrive", body = V1Error),
        (status = 413, description = "The body is over the payload limit", body = V1Error),
        (status = 429, description = "Over a rate limit or daily quota (see Retry-After)", body = V1Error),
        (status = 503, description = "At capacity, overloaded, shutting down, or the write-ahead log could not be written (see Retry-After)", body = V1Error),
    ),
)]
async fn post_v1_write(
    State(ingestor): State<Arc<Ingestor>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<V1WriteParams>,
    body: Body,
) -> Response {
    let caller = in_db(caller, params.db.as_deref());
    let precision = match precision(params.precision.as_deref(), "n, ns, u, ms, s, m, h") {
        Ok(p) => p,
        Err(e) => return influx_error(e),
    };
    let options =
        LineOptions { device_tag: params.device_tag, default_device: params.default_device, all_or_nothing: false };
    let (report, body) = match write_lines(&ingestor, &caller, precision, options, Durability::Committed, body).await {
        Ok(r) => r,
        Err(e) => return influx_error(e),
    };
    if report.rejected == 0 {
        return StatusCode::NO_CONTENT.into_response();
    }
    // InfluxDB 1.x's shape: the valid points are written, the answer says which were not.
    let lines = rejected_lines(&body, &report);
    let first = lines.first().map(|(n, line, m)| format!("line {n} {line:?}: {m}")).unwrap_or_default();
    let message = format!("partial write: {first} dropped={}", report.rejected);
    (StatusCode::BAD_REQUEST, Json(V1Error { error: message })).into_response()
}

/// The query parameters of an InfluxDB 3 write.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct V3WriteParams {
    /// A tenant's name to write into (with identity on, when such a tenant exists); ignored otherwise.
    db: Option<String>,
    /// `auto` (the default: each timestamp's unit guessed from its magnitude), `nanosecond`,
    /// `microsecond`, `millisecond`, `second` (or `ns`, `us`, `ms`, `s`).
    precision: Option<String>,
    /// `true` (default): valid lines are written and the invalid ones listed; `false`: one
    /// invalid line refuses the whole request.
    accept_partial: Option<bool>,
    /// `true`: answer once the lines are queued to the engine, before they are committed to
    /// the write-ahead log (a crash may lose them).
    no_sync: Option<bool>,
    /// The tag that names the device, over the stream's declared one and the defaults.
    device_tag: Option<String>,
    /// The device of lines without a device tag.
    default_device: Option<String>,
}

/// One line InfluxDB 3 refused.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct V3LineError {
    original_line: String,
    line_number: usize,
    error_message: String,
}

/// InfluxDB 3's error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct V3Error {
    error: String,
    /// The refused lines, when some were.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    data: Vec<V3LineError>,
}

/// Writes line protocol as InfluxDB 3's `/api/v3/write_lp` does.
#[utoipa::path(
    post,
    path = "/api/v3/write_lp",
    tag = "ingest",
    params(V3WriteParams),
    request_body(description = "InfluxDB line protocol, one point per line", content_type = "text/plain", content = String),
    responses(
        (status = 204, description = "Every line written"),
        (status = 400, description = "Invalid lines (listed; with `accept_partial=false` nothing was written), or a bad precision", body = V3Error),
        (status = 401, description = "No or a bad token", body = ErrorBody),
        (status = 403, description = "The caller may not write into the tenant", body = V3Error),
        (status = 408, description = "The body took longer than 30 s to arrive", body = V3Error),
        (status = 413, description = "The body is over the payload limit", body = V3Error),
        (status = 429, description = "Over a rate limit or daily quota (see Retry-After)", body = V3Error),
        (status = 503, description = "At capacity, overloaded, shutting down, or the write-ahead log could not be written (see Retry-After)", body = V3Error),
    ),
)]
async fn post_v3_write(
    State(ingestor): State<Arc<Ingestor>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<V3WriteParams>,
    body: Body,
) -> Response {
    let caller = in_db(caller, params.db.as_deref());
    let unit = params.precision.as_deref().unwrap_or("auto");
    let precision = match precision(Some(unit), "auto, nanosecond, microsecond, millisecond, second") {
        Ok(p) => p,
        Err(e) => return influx_error(e),
    };
    let all_or_nothing = !params.accept_partial.unwrap_or(true);
    let options = LineOptions { device_tag: params.device_tag, default_device: params.default_device, all_or_nothing };
    let durability = if params.no_sync.unwrap_or(false) { Durability::Queued } else { Durability::Committed };
    let (report, body) = match write_lines(&ingestor, &caller, precision, options, durability, body).await {
        Ok(r) => r,
        Err(e) => return influx_error(e),
    };
    if report.rejected == 0 {
        return StatusCode::NO_CONTENT.into_response();
    }
    let data = rejected_lines(&body, &report)
        .into_iter()
        .map(|(line_number, original_line, error_message)| V3LineError { original_line, line_number, error_message })
        .collect();
    let error = if all_or_nothing {
        format!("parsing failed for write_lp endpoint: {} invalid lines, nothing written", report.rejected)
    } else {
        format!(
            "partial write of line protocol occurred: {} lines written, {} refused",
            report.accepted, report.rejected
        )
    };
    (StatusCode::BAD_REQUEST, Json(V3Error { error, data })).into_response()
}

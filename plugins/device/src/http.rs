//! `/api/v1/devices`: the registry's HTTP API (register one or many, list with filters and
//! paging, show, change, disable, enable, approve, rotate credentials, decommission),
//! provisioning secrets, and self-registration (the one public route). Every change is
//! decided by policy (`manage_devices` on the device) and audited; reads need `query` on the
//! tenant. A device of another tenant does not exist for the caller (404).

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferrite_engine::api_doc::ErrorBody;
use ferrite_engine::auth::{Action, Caller, Resource};
use ferrite_engine::plugin::PurgeReport;
use ferrite_plugin::{ApiError, error_response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::Error;
use crate::model::{DeviceInput, Location, Status};
use crate::registry::{Credentials, DeviceView, Filter, ImportReport, ImportRows, Registry};

/// Largest import body; larger ones are refused whole (413).
pub const MAX_IMPORT_BYTES: usize = 16 * 1024 * 1024;

type Shared = Arc<Registry>;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_device"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::Credentials(_) => (StatusCode::BAD_REQUEST, "credentials"),
            Error::Purge(_) => {
                tracing::error!(error = %e, "purging a device's data failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "purge_failed")
            }
            Error::Store(_) => {
                tracing::error!(error = %e, "device registry failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, &e.to_string())
    }
}

/// What a handler answers.
type Answer = Result<Response, ApiError>;

/// Whether the caller may `action` on device `id` (or the tenant as a whole).
fn allowed(caller: &Caller, action: Action, id: Option<&str>) -> Result<(), ApiError> {
    let tenant = caller.tenant();
    let resource = match id {
        Some(id) => Resource::Device { tenant: tenant.into(), id: id.into() },
        None => Resource::tenant(tenant),
    };
    Ok(caller.check(action, &resource)?)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| Error::Invalid(format!("the body is not the expected JSON: {e}")).into())
}

/// The routes behind authentication.
pub fn protected_routes(registry: Shared) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(add, list))
        .routes(routes!(import))
        .routes(routes!(show, change, remove))
        .routes(routes!(act))
        .routes(routes!(add_provisioning_secret))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(registry)
}

/// The routes any client may call: self-registration with a provisioning secret.
pub fn public_routes(registry: Shared) -> OpenApiRouter {
    OpenApiRouter::new().routes(routes!(self_register)).with_state(registry)
}

/// A registered device and its credentials (shown once; absent with identity off).
#[derive(Debug, Serialize, ToSchema)]
struct Registered<'a> {
    #[serde(flatten)]
    device: &'a DeviceView,
    credentials: &'a Option<Credentials>,
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
struct DeviceList {
    devices: Vec<DeviceView>,
    /// The `after` of the next page, when there is one.
    next: Option<String>,
}

/// New credentials (shown once).
#[derive(Debug, Serialize, ToSchema)]
struct Rotated {
    id: String,
    credentials: Option<Credentials>,
}

/// A new provisioning secret (shown once).
#[derive(Debug, Serialize, ToSchema)]
struct ProvisioningSecret {
    secret: String,
    /// Milliseconds since the epoch.
    expires_at: i64,
    tenant: String,
}

/// A self-registration: the device's fields and a provisioning secret.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
struct SelfRegistration {
    /// The secret an operator created with `POST /api/v1/provisioning-secrets`.
    provisioning_secret: String,
    #[serde(flatten)]
    device: DeviceInput,
}

/// What a device action answers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
enum ActionAnswer {
    /// `disable`, `enable`, `approve`: the device.
    Device(Box<DeviceView>),
    /// `rotate`: the new credentials.
    Rotated(Rotated),
    /// `purge`: what was deleted.
    Purged(PurgeReport),
}

/// Past the limit a body is read on and dropped up to this many bytes, so that the client
/// finishes sending and reads the 413 instead of meeting a closed socket.
const DRAIN_MAX: usize = 64 * 1024 * 1024;

async fn body(body: axum::body::Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut kept = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Invalid(format!("cannot read the request body: {e}")))?;
        total += chunk.len();
        if total <= limit {
            kept.extend_from_slice(&chunk);
        } else if total > DRAIN_MAX {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("the body is over {limit} bytes; split it into smaller requests"),
        ));
    }
    Ok(kept.freeze())
}

/// Bodies of single-device requests.
const MAX_BODY: usize = 64 * 1024;

/// Registers a device and answers its credentials, once.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = DeviceInput,
    responses((status = 201, description = "Registered", body = Registered), (status = 400, description = "Invalid device fields (the message says which)", body = ErrorBody), (status = 403, description = "The caller may not manage devices here", body = ErrorBody),
        (status = 409, description = "The id is taken", body = ErrorBody)))]
async fn add(State(r): State<Shared>, Extension(caller): Extension<Caller>, b: axum::body::Body) -> Answer {
    let input: DeviceInput = parse_json(&body(b, MAX_BODY).await?)?;
    allowed(&caller, Action::ManageDevices, input.id.as_deref())?;
    let (view, credentials) = r.add(caller.tenant(), &input).await?;
    caller.record("device_added", &view.device.id);
    Ok((StatusCode::CREATED, axum::Json(Registered { device: &view, credentials: &credentials })).into_response())
}

/// Filters and paging of a device listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Only devices of this type.
    #[serde(rename = "type")]
    device_type: Option<String>,
    /// `pending`, `active` or `disabled`.
    status: Option<String>,
    /// Only members of this group.
    group: Option<String>,
    /// Only devices with this tag.
    tag: Option<String>,
    /// Only devices behind this gateway.
    parent: Option<String>,
    /// Only devices with (or without) an MQTT session now.
    online: Option<bool>,
    /// The `next` of the previous page.
    after: Option<String>,
    /// Page size, 1 to 10,000 (default 1,000).
    limit: Option<usize>,
}

/// Lists the tenant's devices, filtered and paged.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(ListParams),
    responses((status = 200, description = "A page of devices", body = DeviceList), (status = 400, description = "Invalid device fields (the message says which)", body = ErrorBody), (status = 403, description = "The caller may not manage devices here", body = ErrorBody)))]
async fn list(
    State(r): State<Shared>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    allowed(&caller, Action::Query, None)?;
    let Query(p) = params.map_err(|e| {
        Error::Invalid(format!("{e} (parameters: type, status, group, tag, parent, online, after, limit)"))
    })?;
    let filter = Filter {
        device_type: p.device_type,
        status: p.status.as_deref().map(Status::parse).transpose()?,
        group: p.group,
        tag: p.tag,
        parent: p.parent,
        online: p.online,
        after: p.after,
        limit: p.limit.unwrap_or(1000).clamp(1, 10_000),
    };
    let (devices, next) = r.list(caller.tenant(), &filter);
    Ok(axum::Json(DeviceList { devices, next }).into_response())
}

/// Shows a device, with whether it is online and when it was last seen.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "The device id")),
    responses((status = 200, description = "The device", body = DeviceView), (status = 403, description = "The caller may not manage devices here", body = ErrorBody), (status = 404, description = "No such device in the caller's tenant", body = ErrorBody)))]
async fn show(State(r): State<Shared>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Answer {
    allowed(&caller, Action::Query, None)?;
    let d = r.get(caller.tenant(), &id)?;
    Ok(axum::Json(r.view(&d)).into_response())
}

/// Changes a device's fields (those given).
#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "The device id")), request_body = DeviceInput,
    responses((status = 200, description = "The changed device", body = DeviceView), (status = 400, description = "Invalid device fields (the message says which)", body = ErrorBody), (status = 403, description = "The caller may not manage devices here", body = ErrorBody), (status = 404, description = "No such device in the caller's tenant", body = ErrorBody)))]
async fn change(
    State(r): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    b: axum::body::Body,
) -> Answer {
    allowed(&caller, Action::ManageDevices, Some(&id))?;
    let input: DeviceInput = parse_json(&body(b, MAX_BODY).await?)?;
    let view = r.update(caller.tenant(), &id, &input).await?;
    caller.record("device_changed", &id);
    Ok(axum::Json(view).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RemoveQuery {
    /// Also delete the device's rows from every stream of the tenant.
    #[serde(default)]
    purge: bool,
}

/// Decommissions a device: its credentials are revoked and its sessions closed; with
/// `?purge=true` its data goes too (answering the purge report instead of 204).
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "The device id"), RemoveQuery),
    responses((status = 204, description = "Decommissioned"), (status = 200, description = "Decommissioned and purged", body = PurgeReport), (status = 403, description = "The caller may not manage devices here", body = ErrorBody), (status = 404, description = "No such device in the caller's tenant", body = ErrorBody)))]
async fn remove(
    State(r): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Answer {
    allowed(&caller, Action::ManageDevices, Some(&id))?;
    r.remove(caller.tenant(), &id).await?;
    caller.record("device_removed", &id);
    if !q.purge {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let report = r.purge(caller.tenant(), &id).await.map_err(|e| match e {
        Error::Purge(m) => Error::Purge(format!(
            "the device was removed, but its data was not purged ({m}); retry with POST /api/v1/devices/{id}/purge"
        )),
        other => other,
    });
    let report = match report {
        Ok(report) => report,
        // Removed, and no data to purge: nothing was left behind.
        Err(Error::NotFound(_)) => ferrite_engine::plugin::PurgeReport { device_id: id.clone(), ..Default::default() },
        Err(e) => return Err(e.into()),
    };
    caller.record("device_data_purged", &format!("{id}: {} rows", report.rows_deleted));
    Ok(axum::Json(report).into_response())
}

/// Acts on a device: `disable`, `enable`, `approve` (a self-registered one), `rotate` its credentials, or `purge` its data.
#[utoipa::path(post, path = "/api/v1/devices/{id}/{action}", tag = "devices",
    params(("id" = String, Path, description = "The device id"),
        ("action" = String, Path, description = "`disable`, `enable`, `approve`, `rotate` or `purge`")),
    responses((status = 200, description = "Done", body = ActionAnswer), (status = 400, description = "Invalid device fields (the message says which)", body = ErrorBody), (status = 403, description = "The caller may not manage devices here", body = ErrorBody), (status = 404, description = "No such device in the caller's tenant", body = ErrorBody)))]
async fn act(
    State(r): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
) -> Answer {
    allowed(&caller, Action::ManageDevices, Some(&id))?;
    let tenant = caller.tenant();
    if action == "purge" {
        let report = r.purge(tenant, &id).await?;
        caller.record("device_data_purged", &format!("{id}: {} rows", report.rows_deleted));
        return Ok(axum::Json(ActionAnswer::Purged(report)).into_response());
    }
    let device = |v: DeviceView| ActionAnswer::Device(Box::new(v));
    let answer = match action.as_str() {
        "disable" => device(r.set_status(tenant, &id, Status::Disabled).await?),
        "enable" => device(r.set_status(tenant, &id, Status::Active).await?),
        "approve" => {
            if r.get(tenant, &id)?.status != Status::Pending {
                return Err(Error::Invalid(format!("device {id:?} is not pending approval")).into());
            }
            device(r.set_status(tenant, &id, Status::Active).await?)
        }
        "rotate" => ActionAnswer::Rotated(Rotated { id: id.clone(), credentials: r.rotate(tenant, &id).await? }),
        other => {
            return Err(Error::NotFound(format!(
                "no device action {other:?}: use disable, enable, approve, rotate or purge"
            ))
            .into());
        }
    };
    caller.record("device_changed", &format!("{action} {id}"));
    Ok(axum::Json(answer).into_response())
}

/// Registers many devices from a JSON array or a CSV (`Content-Type: text/csv`); a bad row refuses only itself.
#[utoipa::path(post, path = "/api/v1/devices/import", tag = "devices",
    request_body(description = "A JSON array of devices, or a CSV with a header (id, name, type, owner, level, parent, tags, groups, firmware, lat, lon, attr.NAME)",
        content((Vec<DeviceInput> = "application/json"), (String = "text/csv"))),
    responses((status = 200, description = "What was registered and refused", body = ImportReport), (status = 400, description = "Invalid device fields (the message says which)", body = ErrorBody), (status = 403, description = "The caller may not manage devices here", body = ErrorBody),
        (status = 413, description = "Over 16 MiB", body = ErrorBody)))]
async fn import(
    State(r): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    b: axum::body::Body,
) -> Answer {
    allowed(&caller, Action::ManageDevices, None)?;
    let bytes = body(b, MAX_IMPORT_BYTES).await?;
    let csv = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/csv") || ct.starts_with("application/csv"));
    let rows = if csv { csv_rows(&bytes)? } else { json_rows(&bytes)? };
    let report = r.import(caller.tenant(), rows).await?;
    caller.record("devices_imported", &format!("{} created, {} refused", report.created, report.failed.len()));
    Ok(axum::Json(report).into_response())
}

/// A JSON array of devices: each element a row (1-based), parsed on its own so that one bad
/// element refuses only itself.
fn json_rows(bytes: &[u8]) -> Result<ImportRows, Error> {
    let items: Vec<Value> = serde_json::from_slice(bytes)
        .map_err(|e| Error::Invalid(format!("expected a JSON array of devices (or Content-Type: text/csv): {e}")))?;
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i + 1, serde_json::from_value::<DeviceInput>(v).map_err(|e| e.to_string())))
        .collect())
}

/// A CSV with a header: `id, name, type, owner, level, parent, tags, groups, firmware, lat,
/// lon`, and `attr.NAME` columns for attributes; tags and groups separated by `;`.
fn csv_rows(bytes: &[u8]) -> Result<ImportRows, Error> {
    const KNOWN: [&str; 11] =
        ["id", "name", "type", "owner", "level", "parent", "tags", "groups", "firmware", "lat", "lon"];
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(false).from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| Error::Invalid(format!("the CSV header does not read: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    if let Some(bad) = header.iter().find(|h| !KNOWN.contains(&h.as_str()) && !h.starts_with("attr.")) {
        return Err(Error::Invalid(format!("unknown CSV column {bad:?}: use {} or attr.NAME", KNOWN.join(", "))));
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let row = i + 1;
        let parsed = record.map_err(|e| e.to_string()).and_then(|rec| {
            let mut input = DeviceInput::default();
            let mut attributes = Map::new();
            let (mut lat, mut lon) = (None, None);
            let list = |v: &str| v.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
            for (name, value) in header.iter().zip(rec.iter()) {
                if value.is_empty() {
                    continue;
                }
                let v = value.to_owned();
                match name.as_str() {
                    "id" => input.id = Some(v),
                    "name" => input.name = Some(v),
                    "type" => input.device_type = Some(v),
                    "owner" => input.owner = Some(v),
                    "level" => input.level = Some(v),
                    "parent" => input.parent = Some(v),
                    "tags" => input.tags = Some(list(value)),
                    "groups" => input.groups = Some(list(value)),
                    "firmware" => input.firmware = Some(v),
                    "lat" => lat = Some(value.parse::<f64>().map_err(|_| format!("lat {value:?} is not a number"))?),
                    "lon" => lon = Some(value.parse::<f64>().map_err(|_| format!("lon {value:?} is not a number"))?),
                    attr => {
                        attributes.insert(attr.trim_start_matches("attr.").to_owned(), Value::String(v));
                    }
                }
            }
            match (lat, lon) {
                (Some(lat), Some(lon)) => input.location = Some(Location { lat, lon }),
                (None, None) => {}
                _ => return Err("lat and lon go together".to_owned()),
            }
            if !attributes.is_empty() {
                input.attributes = Some(attributes);
            }
            Ok(input)
        });
        rows.push((row, parsed));
    }
    Ok(rows)
}

/// A new provisioning secret: devices of a type register themselves with it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ProvisioningRequest {
    /// The type of the devices that register with it.
    #[serde(rename = "type", default)]
    device_type: String,
    #[serde(default)]
    description: String,
    /// How many days it stays valid (default 30).
    ttl_days: Option<u32>,
}

/// Creates a provisioning secret with which devices register themselves (as `pending`).
#[utoipa::path(post, path = "/api/v1/provisioning-secrets", tag = "devices", request_body = ProvisioningRequest,
    responses((status = 201, description = "The secret (shown once)", body = ProvisioningSecret), (status = 400, description = "Invalid device fields (the message says which)", body = ErrorBody), (status = 403, description = "The caller may not manage devices here", body = ErrorBody)))]
async fn add_provisioning_secret(
    State(r): State<Shared>,
    Extension(caller): Extension<Caller>,
    b: axum::body::Body,
) -> Answer {
    allowed(&caller, Action::ManageDevices, None)?;
    let req: ProvisioningRequest = parse_json(&body(b, MAX_BODY).await?)?;
    let days = i64::from(req.ttl_days.unwrap_or(30).clamp(1, 3650));
    let expires_at = crate::registry::now_ms() + days * 24 * 3600 * 1000;
    let secret = r.add_provisioning_secret(caller.tenant(), &req.device_type, &req.description, expires_at).await?;
    caller.record("provisioning_secret_added", &req.description);
    let answer = ProvisioningSecret { secret, expires_at, tenant: caller.tenant().to_owned() };
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// A device registers itself with a provisioning secret; it waits as `pending` until approved.
#[utoipa::path(post, path = "/api/v1/devices/register", tag = "devices", security(()), request_body = SelfRegistration,
    responses((status = 201, description = "Registered", body = Registered), (status = 400, description = "Invalid device fields (the message says which)", body = ErrorBody),
        (status = 401, description = "The provisioning secret is wrong or expired", body = ErrorBody)))]
async fn self_register(State(r): State<Shared>, b: axum::body::Body) -> Answer {
    let mut v: Map<String, Value> = parse_json(&body(b, MAX_BODY).await?)?;
    let Some(Value::String(secret)) = v.remove("provisioning_secret") else {
        return Err(Error::Invalid("`provisioning_secret` is required".into()).into());
    };
    let input: DeviceInput = serde_json::from_value(Value::Object(v)).map_err(|e| Error::Invalid(e.to_string()))?;
    match r.self_register(&secret, &input).await {
        Ok((view, credentials)) => {
            Ok((StatusCode::CREATED, axum::Json(Registered { device: &view, credentials: &credentials }))
                .into_response())
        }
        Err(Error::Invalid(m)) if m.contains("provisioning secret") => {
            Ok(error_response(StatusCode::UNAUTHORIZED, "invalid_provisioning_secret", &m))
        }
        Err(e) => Err(e.into()),
    }
}

//! `POST /api/v1/devices/{id}/commands` (202 with the command's id and status; 422
//! `command_refused` naming the violated limit; 403 when the policy denies), `GET
//! /api/v1/devices/{id}/commands/{command_id}`, and `PUT`/`GET /api/v1/device-types/{type}`.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferrite_engine::api_doc::ErrorBody;
use ferrite_engine::auth::{Action, Caller, Resource};
use ferrite_plugin::ApiError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::command::Command;
use crate::error::Error;
use crate::jobs::{JobRequest, JobView};
use crate::ota::{Artifact, CampaignDevice, CampaignRequest, CampaignView, TrustedKey};
use crate::service::{Actuation, CommandRequest};
use crate::twin::TwinView;
use crate::types::DeviceType;

/// What the routes need.
#[derive(Clone)]
pub struct Services {
    /// Commands.
    pub actuation: Arc<Actuation>,
    /// Twins.
    pub twins: Arc<crate::twin::Twins>,
    /// Bulk jobs.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// The device registry (job targets by group).
    pub registry: Arc<ferrite_device::Registry>,
    /// SQL (job targets by query).
    pub queries: Arc<dyn ferrite_engine::plugin::DeviceQuery>,
    /// Software updates.
    pub ota: Arc<crate::ota::Ota>,
}

type Shared = Services;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_command"),
            Error::Limit(_) => (StatusCode::UNPROCESSABLE_ENTITY, "command_refused"),
            Error::Denied(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::Stale(_) => (StatusCode::CONFLICT, "stale_version"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Store(_) => {
                tracing::error!(error = %e, "actuation failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, &e.to_string())
    }
}

type Answer = Result<Response, ApiError>;

/// Largest command or type body.
const MAX_BODY: usize = 64 * 1024;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.len() > MAX_BODY {
        return Err(Error::Invalid(format!("the body is over {MAX_BODY} bytes")).into());
    }
    serde_json::from_slice(body).map_err(|e| Error::Invalid(format!("the body is not the expected JSON: {e}")).into())
}

/// The routes behind authentication.
pub fn protected_routes(services: Shared) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(submit))
        .routes(routes!(show))
        .routes(routes!(show_twin, patch_twin))
        .routes(routes!(rotate))
        .routes(routes!(show_type, put_type))
        .routes(routes!(start_job))
        .routes(routes!(show_job))
        .routes(routes!(stop_job))
        .routes(routes!(list_keys, add_key))
        .routes(routes!(remove_key))
        .routes(
            routes!(list_artifacts, upload)
                .layer(axum::extract::DefaultBodyLimit::max(crate::ota::DEFAULT_MAX_ARTIFACT_BYTES)),
        )
        .routes(routes!(show_artifact))
        .routes(routes!(download))
        .routes(routes!(start_campaign))
        .routes(routes!(show_campaign))
        .routes(routes!(campaign_devices))
        .routes(routes!(stop_campaign))
        .with_state(services)
}

/// An accepted command: where to follow it.
#[derive(Debug, Serialize, ToSchema)]
struct Accepted {
    /// The command's id.
    id: String,
    status: crate::command::Status,
    /// When it expires unless answered, milliseconds since the epoch.
    expires_at: i64,
}

impl From<&Command> for Accepted {
    fn from(c: &Command) -> Self {
        Self { id: c.id.clone(), status: c.status, expires_at: c.expires_at }
    }
}

/// Sends a command to a device; it is checked against the device type's schema and limits, queued until the device is online, and followed to its result.
#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "commands", params(("id" = String, Path, description = "The device id")), request_body = CommandRequest,
    responses((status = 202, description = "Accepted", body = Accepted), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody),
        (status = 422, description = "Refused by a limit of the device type (rate, parameters)", body = ErrorBody)))]
async fn submit(
    State(Services { actuation: a, .. }): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let request: CommandRequest = parse(&body)?;
    let c = a.submit(&caller.principal, None, &caller.context, caller.tenant(), &id, request).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted::from(&c))).into_response())
}

/// Shows a command: its status and the device's result.
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands/{command}", tag = "commands",
    params(("id" = String, Path, description = "The device id"), ("command" = String, Path, description = "The command id")),
    responses((status = 200, description = "The command", body = Command), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn show(
    State(Services { actuation: a, .. }): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((id, command)): Path<(String, String)>,
) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    let c = a.command(caller.tenant(), &command).await?;
    if c.device_id != id {
        return Err(Error::NotFound(format!("no command {command:?} for device {id:?}")).into());
    }
    Ok(axum::Json(c).into_response())
}

/// Sets a device type: its commands' parameter schemas and its rate limit.
#[utoipa::path(put, path = "/api/v1/device-types/{name}", tag = "commands",
    params(("name" = String, Path, description = "The device type")), request_body = DeviceType,
    responses((status = 200, description = "The type as stored", body = DeviceType), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody)))]
async fn put_type(
    State(Services { actuation: a, .. }): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    caller.check(Action::ManageDevices, &Resource::tenant(caller.tenant()))?;
    let t: DeviceType = parse(&body)?;
    a.put_type(caller.tenant(), &name, t).await?;
    caller.record("device_type_changed", &name);
    Ok(axum::Json(a.device_type(caller.tenant(), &name).as_ref()).into_response())
}

/// Shows a device type (the standard commands when none was set).
#[utoipa::path(get, path = "/api/v1/device-types/{name}", tag = "commands",
    params(("name" = String, Path, description = "The device type")),
    responses((status = 200, description = "The type", body = DeviceType), (status = 403, description = "Denied by policy", body = ErrorBody)))]
async fn show_type(
    State(Services { actuation: a, .. }): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(a.device_type(caller.tenant(), &name).as_ref()).into_response())
}

/// Shows a device's twin: desired and reported state, and their difference.
#[utoipa::path(get, path = "/api/v1/devices/{id}/twin", tag = "commands", params(("id" = String, Path, description = "The device id")),
    responses((status = 200, description = "The twin", body = TwinView), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn show_twin(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.twins.get(caller.tenant(), &id)?.view()).into_response())
}

/// A change of a twin's desired state.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TwinPatch {
    /// Keys to set (`null` removes one).
    #[schema(value_type = Object)]
    desired: serde_json::Map<String, serde_json::Value>,
    /// The version this change is based on: a stale one is refused (409).
    version: Option<i64>,
}

/// Changes a twin's desired state; the device receives the change on `devices/{id}/shadow/desired`.
#[utoipa::path(patch, path = "/api/v1/devices/{id}/twin", tag = "commands", params(("id" = String, Path, description = "The device id")), request_body = TwinPatch,
    responses((status = 200, description = "The twin", body = TwinView), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The version is stale", body = ErrorBody)))]
async fn patch_twin(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    caller.check(Action::Actuate, &Resource::Device { tenant: caller.tenant().into(), id: id.as_str().into() })?;
    let patch: TwinPatch = parse(&body)?;
    let twin = s.twins.set_desired(caller.tenant(), &id, &patch.desired, patch.version).await?;
    caller.record("twin_changed", &format!("{id} desired version {}", twin.version));
    Ok(axum::Json(twin.view()).into_response())
}

/// The devices of a job's or a campaign's target.
async fn resolve(s: &Services, caller: &Caller, target: &crate::jobs::Target) -> Result<Vec<String>, ApiError> {
    let tenant = caller.tenant();
    Ok(match target {
        crate::jobs::Target::Devices(d) => d.clone(),
        crate::jobs::Target::Group(g) => {
            s.registry.all(tenant).into_iter().filter(|v| v.device.groups.contains(g)).map(|v| v.device.id).collect()
        }
        crate::jobs::Target::Sql(sql) => {
            caller.check(Action::Query, &Resource::tenant(tenant))?;
            s.queries.device_ids(tenant, sql).await.map_err(|e| Error::Invalid(format!("the target's query: {e}")))?
        }
    })
}

/// Starts a bulk job: one command to many devices (a list, a group or a SQL query), paced, stopped past a failure rate.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "commands", request_body = JobRequest,
    responses((status = 202, description = "Started", body = JobView), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody)))]
async fn start_job(State(s): State<Shared>, Extension(caller): Extension<Caller>, body: axum::body::Bytes) -> Answer {
    let tenant = caller.tenant().to_owned();
    caller.check(Action::Actuate, &Resource::tenant(&tenant))?;
    let request: crate::jobs::JobRequest = parse(&body)?;
    let devices = resolve(&s, &caller, &request.target).await?;
    let view = s.jobs.start(
        s.actuation.clone(),
        caller.principal.clone(),
        caller.context.clone(),
        &tenant,
        request,
        devices,
    )?;
    caller.record("job_started", &format!("{} {} to {} devices", view.id, view.command, view.total));
    Ok((StatusCode::ACCEPTED, axum::Json(view)).into_response())
}

/// Shows a job's progress.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "commands", params(("id" = String, Path, description = "The job id")),
    responses((status = 200, description = "The job", body = JobView), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn show_job(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.jobs.get(caller.tenant(), &id)?).into_response())
}

/// Stops a job: no further command is sent.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/stop", tag = "commands", params(("id" = String, Path, description = "The job id")),
    responses((status = 200, description = "The job", body = JobView), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn stop_job(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Answer {
    caller.check(Action::Actuate, &Resource::tenant(caller.tenant()))?;
    let view = s.jobs.stop(caller.tenant(), &id)?;
    caller.record("job_stopped", &id);
    Ok(axum::Json(view).into_response())
}

/// A credential rotation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    /// Seconds the device has to confirm before the old secret stops working anyway.
    #[serde(default = "default_deadline")]
    deadline_secs: u64,
}

fn default_deadline() -> u64 {
    3600
}

/// Rotates a device's credentials: the device receives its new secret as a command and confirms it.
#[utoipa::path(post, path = "/api/v1/devices/{id}/credentials/rotate", tag = "devices", params(("id" = String, Path, description = "The device id")),
    request_body(content = Option<RotateRequest>, description = "Optional; the deadline defaults to an hour"),
    responses((status = 202, description = "The rotation command", body = Accepted), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn rotate(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    caller
        .check(Action::ManageDevices, &Resource::Device { tenant: caller.tenant().into(), id: id.as_str().into() })?;
    let request: RotateRequest =
        if body.is_empty() { RotateRequest { deadline_secs: default_deadline() } } else { parse(&body)? };
    let c = s
        .actuation
        .rotate_credentials(&caller.principal, &caller.context, caller.tenant(), &id, request.deadline_secs)
        .await?;
    caller.record("credential_rotation_started", &id);
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted::from(&c))).into_response())
}

/// A key to trust.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    public_key: String,
    #[serde(default)]
    name: String,
}

/// Trusts an Ed25519 public key for the tenant's firmware signatures.
#[utoipa::path(post, path = "/api/v1/ota/keys", tag = "ota", request_body = KeyRequest,
    responses((status = 201, description = "Trusted", body = TrustedKey), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody)))]
async fn add_key(State(s): State<Shared>, Extension(caller): Extension<Caller>, body: axum::body::Bytes) -> Answer {
    caller.check(Action::ManageDevices, &Resource::tenant(caller.tenant()))?;
    let k: KeyRequest = parse(&body)?;
    let v = s.ota.trust_key(caller.tenant(), &k.public_key, &k.name).await?;
    caller.record("ota_key_trusted", &k.public_key);
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

/// Lists the tenant's trusted firmware keys.
#[utoipa::path(get, path = "/api/v1/ota/keys", tag = "ota",
    responses((status = 200, description = "The keys", body = Vec<TrustedKey>), (status = 403, description = "Denied by policy", body = ErrorBody)))]
async fn list_keys(State(s): State<Shared>, Extension(caller): Extension<Caller>) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    let keys: Vec<TrustedKey> = s
        .ota
        .keys(caller.tenant())
        .await?
        .into_iter()
        .map(|(public_key, name)| TrustedKey { public_key, name })
        .collect();
    Ok(axum::Json(keys).into_response())
}

/// Stops trusting a firmware key.
#[utoipa::path(delete, path = "/api/v1/ota/keys/{key}", tag = "ota", params(("key" = String, Path, description = "The public key, hex")),
    responses((status = 204, description = "Removed"), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn remove_key(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(key): Path<String>) -> Answer {
    caller.check(Action::ManageDevices, &Resource::tenant(caller.tenant()))?;
    s.ota.distrust_key(caller.tenant(), &key).await?;
    caller.record("ota_key_removed", &key);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Uploads a signed firmware artifact; the signature is checked against the trusted keys before it is stored.
#[utoipa::path(post, path = "/api/v1/ota/artifacts", tag = "ota", params(crate::ota::Upload),
    request_body(description = "The artifact's bytes", content_type = "application/octet-stream", content = Vec<u8>),
    responses((status = 201, description = "Stored", body = Artifact), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody),
        (status = 413, description = "Over the artifact size limit", body = ErrorBody)))]
async fn upload(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    meta: Result<axum::extract::Query<crate::ota::Upload>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Answer {
    caller.check(Action::ManageDevices, &Resource::tenant(caller.tenant()))?;
    let axum::extract::Query(meta) = meta.map_err(|e| {
        Error::Invalid(format!(
            "the upload's query parameters: {} (send version, device_type and signature as `ferrite ota sign` wrote them)",
            e.body_text()
        ))
    })?;
    let outcome = s.ota.upload(caller.tenant(), &caller.principal.to_string(), meta, body).await;
    match &outcome {
        Ok(a) => {
            caller.record("ota_artifact_uploaded", &format!("{} version {} for {}", a.id, a.version, a.device_type))
        }
        Err(e) => caller.record("ota_artifact_refused", &e.to_string()),
    }
    Ok((StatusCode::CREATED, axum::Json(outcome?)).into_response())
}

/// Lists the tenant's artifacts.
#[utoipa::path(get, path = "/api/v1/ota/artifacts", tag = "ota",
    responses((status = 200, description = "The artifacts", body = Vec<Artifact>), (status = 403, description = "Denied by policy", body = ErrorBody)))]
async fn list_artifacts(State(s): State<Shared>, Extension(caller): Extension<Caller>) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.ota.artifacts(caller.tenant()).await?).into_response())
}

/// A device reads an artifact a campaign sent it; anyone else needs the query right.
fn may_read_artifact(s: &Services, caller: &Caller, id: &str) -> Result<(), ApiError> {
    if caller.principal.kind == ferrite_engine::auth::PrincipalKind::Device {
        if s.ota.may_download(&caller.principal.id, id) {
            return Ok(());
        }
        return Err(Error::Denied(format!(
            "device {} is in no running campaign of artifact {id}",
            caller.principal.id
        ))
        .into());
    }
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(())
}

/// Shows an artifact (a device may read one a running campaign sent it).
#[utoipa::path(get, path = "/api/v1/ota/artifacts/{id}", tag = "ota", params(("id" = String, Path, description = "The artifact id")),
    responses((status = 200, description = "The artifact", body = Artifact), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn show_artifact(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Answer {
    may_read_artifact(&s, &caller, &id)?;
    Ok(axum::Json(s.ota.artifact(caller.tenant(), &id).await?).into_response())
}

/// Downloads an artifact's bytes, whole or by `Range` (resumable).
#[utoipa::path(get, path = "/api/v1/ota/artifacts/{id}/content", tag = "ota",
    params(("id" = String, Path, description = "The artifact id"), ("Range" = Option<String>, Header, description = "`bytes=START-END`")),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 416, description = "The range is outside the artifact"),
        (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn download(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Answer {
    use axum::http::header;
    may_read_artifact(&s, &caller, &id)?;
    let artifact = s.ota.artifact(caller.tenant(), &id).await?;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(h) => match crate::ota::parse_range(h, artifact.size) {
            Ok(r) => r,
            Err(crate::ota::Unsatisfiable) => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{}", artifact.size))],
                )
                    .into_response());
            }
        },
    };
    let bytes = s.ota.content(&artifact, range).await?;
    let common = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::ACCEPT_RANGES, "bytes".to_owned()),
        (header::ETAG, format!("\"{}\"", artifact.sha256)),
    ];
    Ok(match range {
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            common,
            [(header::CONTENT_RANGE, format!("bytes {a}-{b}/{}", artifact.size))],
            bytes,
        )
            .into_response(),
        None => (StatusCode::OK, common, bytes).into_response(),
    })
}

/// Starts a firmware campaign: waves of devices, stopped past a failure rate.
#[utoipa::path(post, path = "/api/v1/ota/campaigns", tag = "ota", request_body = CampaignRequest,
    responses((status = 202, description = "Started", body = CampaignView), (status = 400, description = "Invalid request (the message says why)", body = ErrorBody), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn start_campaign(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Answer {
    caller.check(Action::Actuate, &Resource::tenant(caller.tenant()))?;
    caller.check(Action::ManageDevices, &Resource::tenant(caller.tenant()))?;
    let request: crate::ota::CampaignRequest = parse(&body)?;
    let devices = resolve(&s, &caller, &request.target).await?;
    let view = s.ota.start(caller.principal.clone(), caller.context.clone(), caller.tenant(), request, devices).await?;
    caller.record("ota_campaign_started", &format!("{} version {} to {} devices", view.id, view.version, view.total));
    Ok((StatusCode::ACCEPTED, axum::Json(view)).into_response())
}

/// Shows a campaign's progress, wave by wave.
#[utoipa::path(get, path = "/api/v1/ota/campaigns/{id}", tag = "ota", params(("id" = String, Path, description = "The campaign id")),
    responses((status = 200, description = "The campaign", body = CampaignView), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn show_campaign(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.ota.campaign(caller.tenant(), &id)?).into_response())
}

/// Lists a campaign's devices with their states.
#[utoipa::path(get, path = "/api/v1/ota/campaigns/{id}/devices", tag = "ota", params(("id" = String, Path, description = "The campaign id")),
    responses((status = 200, description = "The devices", body = Vec<CampaignDevice>), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn campaign_devices(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.ota.campaign_devices(caller.tenant(), &id)?).into_response())
}

/// Stops a campaign: no further wave starts.
#[utoipa::path(post, path = "/api/v1/ota/campaigns/{id}/stop", tag = "ota", params(("id" = String, Path, description = "The campaign id")),
    responses((status = 200, description = "The campaign", body = CampaignView), (status = 403, description = "Denied by policy", body = ErrorBody), (status = 404, description = "Not found in the caller's tenant", body = ErrorBody)))]
async fn stop_campaign(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Answer {
    caller.check(Action::Actuate, &Resource::tenant(caller.tenant()))?;
    let view = s.ota.stop(caller.tenant(), &id).await?;
    caller.record("ota_campaign_stopped", &id);
    Ok(axum::Json(view).into_response())
}

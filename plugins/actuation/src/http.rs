//! `POST /api/v1/devices/{id}/commands` (202 with the command's id and status; 422
//! `command_refused` naming the violated limit; 403 when the policy denies), `GET
//! /api/v1/devices/{id}/commands/{command_id}`, and `PUT`/`GET /api/v1/device-types/{type}`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferrite_engine::auth::{Action, Caller, Resource};
use ferrite_plugin::ApiError;
use serde_json::json;

use crate::error::Error;
use crate::service::{Actuation, CommandRequest};
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
pub fn protected_routes(services: Shared) -> Router {
    Router::new()
        .route("/api/v1/devices/{id}/commands", post(submit))
        .route("/api/v1/devices/{id}/commands/{command}", get(show))
        .route("/api/v1/devices/{id}/twin", get(show_twin).patch(patch_twin))
        .route("/api/v1/devices/{id}/credentials/rotate", post(rotate))
        .route("/api/v1/device-types/{name}", get(show_type).put(put_type))
        .route("/api/v1/jobs", post(start_job))
        .route("/api/v1/jobs/{id}", get(show_job))
        .route("/api/v1/jobs/{id}/stop", post(stop_job))
        .route("/api/v1/ota/keys", get(list_keys).post(add_key))
        .route("/api/v1/ota/keys/{key}", axum::routing::delete(remove_key))
        .route(
            "/api/v1/ota/artifacts",
            get(list_artifacts)
                .post(upload)
                .layer(axum::extract::DefaultBodyLimit::max(crate::ota::DEFAULT_MAX_ARTIFACT_BYTES)),
        )
        .route("/api/v1/ota/artifacts/{id}", get(show_artifact))
        .route("/api/v1/ota/artifacts/{id}/content", get(download))
        .route("/api/v1/ota/campaigns", post(start_campaign))
        .route("/api/v1/ota/campaigns/{id}", get(show_campaign))
        .route("/api/v1/ota/campaigns/{id}/devices", get(campaign_devices))
        .route("/api/v1/ota/campaigns/{id}/stop", post(stop_campaign))
        .with_state(services)
}

async fn submit(
    State(Services { actuation: a, .. }): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let request: CommandRequest = parse(&body)?;
    let c = a.submit(&caller.principal, None, &caller.context, caller.tenant(), &id, request).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"id": c.id, "status": c.status, "expires_at": c.expires_at})))
        .into_response())
}

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

async fn show_type(
    State(Services { actuation: a, .. }): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(a.device_type(caller.tenant(), &name).as_ref()).into_response())
}

async fn show_twin(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.twins.get(caller.tenant(), &id)?.view()).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TwinPatch {
    desired: serde_json::Map<String, serde_json::Value>,
    version: Option<i64>,
}

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

async fn show_job(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.jobs.get(caller.tenant(), &id)?).into_response())
}

async fn stop_job(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Answer {
    caller.check(Action::Actuate, &Resource::tenant(caller.tenant()))?;
    let view = s.jobs.stop(caller.tenant(), &id)?;
    caller.record("job_stopped", &id);
    Ok(axum::Json(view).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    /// Seconds the device has to confirm before the old secret stops working anyway.
    #[serde(default = "default_deadline")]
    deadline_secs: u64,
}

fn default_deadline() -> u64 {
    3600
}

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
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"id": c.id, "status": c.status, "expires_at": c.expires_at})))
        .into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    public_key: String,
    #[serde(default)]
    name: String,
}

async fn add_key(State(s): State<Shared>, Extension(caller): Extension<Caller>, body: axum::body::Bytes) -> Answer {
    caller.check(Action::ManageDevices, &Resource::tenant(caller.tenant()))?;
    let k: KeyRequest = parse(&body)?;
    let v = s.ota.trust_key(caller.tenant(), &k.public_key, &k.name).await?;
    caller.record("ota_key_trusted", &k.public_key);
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn list_keys(State(s): State<Shared>, Extension(caller): Extension<Caller>) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    let keys: Vec<_> =
        s.ota.keys(caller.tenant()).await?.into_iter().map(|(k, n)| json!({"public_key": k, "name": n})).collect();
    Ok(axum::Json(keys).into_response())
}

async fn remove_key(State(s): State<Shared>, Extension(caller): Extension<Caller>, Path(key): Path<String>) -> Answer {
    caller.check(Action::ManageDevices, &Resource::tenant(caller.tenant()))?;
    s.ota.distrust_key(caller.tenant(), &key).await?;
    caller.record("ota_key_removed", &key);
    Ok(StatusCode::NO_CONTENT.into_response())
}

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

async fn show_artifact(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Answer {
    may_read_artifact(&s, &caller, &id)?;
    Ok(axum::Json(s.ota.artifact(caller.tenant(), &id).await?).into_response())
}

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

async fn show_campaign(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.ota.campaign(caller.tenant(), &id)?).into_response())
}

async fn campaign_devices(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Answer {
    caller.check(Action::Query, &Resource::tenant(caller.tenant()))?;
    Ok(axum::Json(s.ota.campaign_devices(caller.tenant(), &id)?).into_response())
}

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

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

async fn start_job(State(s): State<Shared>, Extension(caller): Extension<Caller>, body: axum::body::Bytes) -> Answer {
    let tenant = caller.tenant().to_owned();
    caller.check(Action::Actuate, &Resource::tenant(&tenant))?;
    let request: crate::jobs::JobRequest = parse(&body)?;
    let devices = match &request.target {
        crate::jobs::Target::Devices(d) => d.clone(),
        crate::jobs::Target::Group(g) => {
            s.registry.all(&tenant).into_iter().filter(|v| v.device.groups.contains(g)).map(|v| v.device.id).collect()
        }
        crate::jobs::Target::Sql(sql) => {
            caller.check(Action::Query, &Resource::tenant(&tenant))?;
            s.queries.device_ids(&tenant, sql).await.map_err(|e| Error::Invalid(format!("the job's query: {e}")))?
        }
    };
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

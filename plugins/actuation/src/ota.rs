//! Software updates over the air: signed artifacts and campaigns that roll them out in
//! waves.
//!
//! - An **artifact** is uploaded with its version, the device type it is for, and an
//!   Ed25519 signature over its SHA-256 (`ferrite ota sign`). The signature must verify
//!   with one of the tenant's trusted OTA keys, or the upload is refused. Artifacts are
//!   stored through object_store beside the archive (`_artifacts/{tenant}/{id}`), and
//!   devices download them with their own token, with range requests so that a cut
//!   download resumes.
//! - A **campaign** sends an `install` command to the devices of a group, a list, or a SQL
//!   query's result, in waves (cumulative percentages of the fleet, each after a delay).
//!   A wave ends when every device of it answered or timed out. When its share of failed
//!   devices passes the campaign's threshold, the campaign stops and later waves get
//!   nothing. Each device's state (`pending`, `sent`, `downloading`, `verifying`,
//!   `installing`, `succeeded`, `failed`, `rolled_back`) is a row of the `ota` stream:
//!   the server writes the states it knows, and the device reports its progress on
//!   `devices/{id}/ota/status`.
//!
//! Campaigns run in the server's memory; their views are stored at every change of wave
//! and at the end, so a restart keeps their record (a campaign a restart interrupted is
//! `stopped`, with that reason).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrite_engine::Metrics;
use ferrite_engine::auth::{Principal, RequestContext};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::Row;

use crate::command::Status;
use crate::error::{Error, Result};
use crate::jobs::Target;
use crate::service::{Actuation, CommandRequest, now_ms};

/// The standard command a campaign sends.
pub const INSTALL: &str = "install";
/// The stream of each device's update states.
pub const OTA_STREAM: &str = "ota";
/// Where artifacts live in the archive's object store.
pub const ARTIFACTS_PREFIX: &str = "_artifacts";
/// Largest artifact accepted by default.
pub const DEFAULT_MAX_ARTIFACT_BYTES: usize = 256 * 1024 * 1024;
/// How long a device has for one install (download, verify, install, health check) when the
/// campaign sets no timeout.
pub const DEFAULT_INSTALL_TIMEOUT: Duration = Duration::from_secs(1800);
/// Most devices one campaign targets.
pub const MAX_CAMPAIGN_DEVICES: usize = 100_000;
/// Most installs of one campaign in flight at once.
const CONCURRENCY: usize = 200;

/// A device's place in a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Waiting for its wave.
    Pending,
    /// Its `install` command was queued (it reaches the device when it connects).
    Sent,
    /// The device is downloading the artifact.
    Downloading,
    /// The device is checking the artifact's digest and signature.
    Verifying,
    /// The device is writing the inactive slot and switching to it.
    Installing,
    /// The device runs the new version and its health check passed.
    Succeeded,
    /// The install failed before the switch (download, verification), or the device did
    /// not answer in time, or refused; it stays on its version.
    Failed,
    /// The new version failed its health check; the device went back to the old slot.
    RolledBack,
}

impl DeviceState {
    /// Its name in the API and the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Downloading => "downloading",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "downloading" => Self::Downloading,
            "verifying" => Self::Verifying,
            "installing" => Self::Installing,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "rolled_back" => Self::RolledBack,
            _ => return None,
        })
    }

    fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::RolledBack)
    }
}

/// A stored artifact.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Artifact {
    /// Its id.
    pub id: String,
    /// Its tenant.
    #[serde(skip)]
    pub tenant: String,
    /// The software version it installs.
    pub version: String,
    /// The device type it is for.
    pub device_type: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Ed25519 signature over the SHA-256, hex.
    pub signature: String,
    /// The trusted key the signature verified with, hex.
    pub public_key: String,
    /// Who uploaded it.
    pub created_by: String,
    /// When, milliseconds since the epoch.
    pub created_at: i64,
}

impl Artifact {
    /// Where a device downloads it (a path on the HTTP API).
    pub fn url(&self) -> String {
        format!("/api/v1/ota/artifacts/{}/content", self.id)
    }
}

/// What an upload states about its body.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Upload {
    /// The software version.
    pub version: String,
    /// The device type it is for.
    pub device_type: String,
    /// Ed25519 signature over the body's SHA-256, hex.
    pub signature: Option<String>,
    /// The key that made it, hex (optional: every trusted key is tried).
    pub public_key: Option<String>,
    /// The body's SHA-256 as the signer saw it, hex (optional: checked when given).
    pub sha256: Option<String>,
}

/// One wave of a campaign.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Share of the campaign's devices reached once this wave is sent, cumulative, 1-100.
    pub percent: f64,
    /// Seconds to wait after the previous wave ended before this one starts.
    #[serde(default)]
    pub delay_secs: u64,
}

/// A campaign as a client asks for it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    /// The artifact to install.
    pub artifact: String,
    /// Which devices.
    pub target: Target,
    /// The waves (default: one wave of every device).
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// Stop when a wave's share of failed devices passes this.
    #[serde(default = "default_failure_rate")]
    pub max_failure_rate: f64,
    /// Seconds a device has for one install.
    pub timeout_secs: Option<u64>,
}

fn default_failure_rate() -> f64 {
    0.2
}

/// Where a campaign is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CampaignStatus {
    /// Sending waves.
    Running,
    /// Every wave was sent and ended.
    Completed,
    /// Stopped at a failure threshold, by a client, or by a restart.
    Stopped,
}

/// One wave's progress.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WaveView {
    /// Its cumulative share.
    pub percent: f64,
    /// Its delay.
    pub delay_secs: u64,
    /// Devices in it.
    pub devices: usize,
    /// Succeeded so far.
    pub succeeded: usize,
    /// Failed or rolled back so far (refused and timed-out installs count as failed).
    pub failed: usize,
    /// `pending`, `running` or `done`.
    pub status: String,
}

/// A campaign's progress.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CampaignView {
    /// Its id.
    pub id: String,
    /// The artifact.
    pub artifact: String,
    /// Its version.
    pub version: String,
    /// Where it is.
    pub status: CampaignStatus,
    /// Why it stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The threshold.
    pub max_failure_rate: f64,
    /// Devices targeted.
    pub total: usize,
    /// Devices per state.
    pub states: std::collections::BTreeMap<String, usize>,
    /// The waves.
    pub waves: Vec<WaveView>,
    /// Started, milliseconds since the epoch.
    pub created_at: i64,
    /// Who started it.
    pub created_by: String,
    /// Targeted devices left out: of another type than the artifact's, or not registered.
    #[serde(default)]
    pub skipped: std::collections::BTreeMap<String, usize>,
}

struct Campaign {
    tenant: String,
    artifact: Artifact,
    view: Mutex<CampaignView>,
    /// Each device's state and wave, in rollout order.
    devices: Mutex<Vec<(String, DeviceState, usize)>>,
    index: HashMap<String, usize>,
    stop: AtomicBool,
}

impl Campaign {
    fn set_state(&self, device: &str, state: DeviceState) -> Option<DeviceState> {
        let i = *self.index.get(device)?;
        let mut devices = self.devices.lock();
        let (_, old, _) = &mut devices[i];
        let previous = *old;
        if previous.is_final() || previous == state {
            return None;
        }
        *old = state;
        drop(devices);
        let mut v = self.view.lock();
        if let Some(n) = v.states.get_mut(previous.as_str()) {
            *n = n.saturating_sub(1);
        }
        *v.states.entry(state.as_str().to_owned()).or_default() += 1;
        Some(previous)
    }
}

/// An Ed25519 public key that the tenant's artifacts may be signed with.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TrustedKey {
    /// 32 bytes, hex.
    pub public_key: String,
    /// What the operator called it.
    pub name: String,
}

/// One device of a campaign.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CampaignDevice {
    /// The device.
    pub device_id: String,
    /// Where its update is.
    pub state: DeviceState,
    /// Its wave, from 1.
    pub wave: usize,
}

/// The OTA service.
pub struct Ota {
    pool: sqlx::AnyPool,
    objects: Arc<dyn ObjectStore>,
    actuation: Arc<Actuation>,
    registry: Arc<ferrite_device::Registry>,
    log: ferrite_plugin::EventLog,
    metrics: Arc<Metrics>,
    max_artifact_bytes: usize,
    campaigns: Mutex<HashMap<String, Arc<Campaign>>>,
    /// Device id to the running campaign that sent it an install.
    active: Mutex<HashMap<String, Arc<Campaign>>>,
}

impl std::fmt::Debug for Ota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ota").field("campaigns", &self.campaigns.lock().len()).finish()
    }
}

fn db(what: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| Error::Store(format!("{what}: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(field: &str, s: &str, len: usize) -> Result<Vec<u8>> {
    let s = s.trim();
    let bad = || Error::Invalid(format!("`{field}` must be {len} bytes as {} hex digits", len * 2));
    if s.len() != len * 2 {
        return Err(bad());
    }
    (0..len).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())).collect()
}

fn artifact_path(tenant: &str, id: &str) -> ObjectPath {
    ObjectPath::from(format!("{ARTIFACTS_PREFIX}/{tenant}/{id}"))
}

impl Ota {
    /// The service over the actuation store's pool, storing artifacts in `objects`.
    pub async fn open(
        pool: sqlx::AnyPool,
        objects: Arc<dyn ObjectStore>,
        actuation: Arc<Actuation>,
        registry: Arc<ferrite_device::Registry>,
        log: ferrite_plugin::EventLog,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let ota = Arc::new(Self {
            pool,
            objects,
            actuation,
            registry,
            log,
            metrics,
            max_artifact_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
            campaigns: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
        });
        // Campaigns a restart interrupted keep their record, stopped.
        let rows = sqlx::query("SELECT id, tenant, view FROM ota_campaigns")
            .fetch_all(&ota.pool)
            .await
            .map_err(db("load campaigns"))?;
        for r in rows {
            let (id, tenant, text): (String, String, String) = (
                r.try_get(0).map_err(db("campaign"))?,
                r.try_get(1).map_err(db("campaign"))?,
                r.try_get(2).map_err(db("campaign"))?,
            );
            let Ok(mut view) = serde_json::from_str::<CampaignView>(&text) else {
                tracing::warn!(campaign = %id, "a stored campaign that does not parse is skipped");
                continue;
            };
            let Some(artifact) = ota.artifact_opt(&tenant, &view.artifact).await? else { continue };
            if view.status == CampaignStatus::Running {
                view.status = CampaignStatus::Stopped;
                view.reason = Some("interrupted by a server restart; start a new campaign for the devices left".into());
            }
            let campaign = Arc::new(Campaign {
                tenant,
                artifact,
                view: Mutex::new(view),
                devices: Mutex::new(Vec::new()),
                index: HashMap::new(),
                stop: AtomicBool::new(true),
            });
            ota.save(&campaign).await;
            ota.campaigns.lock().insert(id, campaign);
        }
        Ok(ota)
    }

    /// Adds an Ed25519 public key (hex) the tenant's artifacts may be signed with.
    pub async fn trust_key(&self, tenant: &str, public_key: &str, name: &str) -> Result<TrustedKey> {
        let key = unhex("public_key", public_key, 32)?;
        let key = hex(&key);
        sqlx::query(
            "INSERT INTO ota_keys (tenant, public_key, name, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, public_key) DO UPDATE SET name = excluded.name",
        )
        .bind(tenant.to_owned())
        .bind(key.clone())
        .bind(name.to_owned())
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db("store an OTA key"))?;
        Ok(TrustedKey { public_key: key, name: name.to_owned() })
    }

    /// The tenant's trusted keys.
    pub async fn keys(&self, tenant: &str) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT public_key, name FROM ota_keys WHERE tenant = $1 ORDER BY created_at")
            .bind(tenant.to_owned())
            .fetch_all(&self.pool)
            .await
            .map_err(db("list OTA keys"))?;
        rows.iter().map(|r| Ok((r.try_get(0).map_err(db("key"))?, r.try_get(1).map_err(db("key"))?))).collect()
    }

    /// Removes a trusted key (artifacts it signed stay).
    pub async fn distrust_key(&self, tenant: &str, public_key: &str) -> Result<()> {
        let n = sqlx::query("DELETE FROM ota_keys WHERE tenant = $1 AND public_key = $2")
            .bind(tenant.to_owned())
            .bind(public_key.trim().to_ascii_lowercase())
            .execute(&self.pool)
            .await
            .map_err(db("remove an OTA key"))?
            .rows_affected();
        if n == 0 {
            return Err(Error::NotFound(format!("no trusted OTA key {public_key:?}")));
        }
        Ok(())
    }

    /// Checks and stores an artifact: its signature must verify with a trusted key.
    pub async fn upload(&self, tenant: &str, by: &str, meta: Upload, body: bytes::Bytes) -> Result<Artifact> {
        if body.is_empty() {
            return Err(Error::Invalid("the artifact is empty".into()));
        }
        if body.len() > self.max_artifact_bytes {
            return Err(Error::Limit(format!(
                "the artifact is {} bytes, over the limit of {}",
                body.len(),
                self.max_artifact_bytes
            )));
        }
        for (field, v) in [("version", &meta.version), ("device_type", &meta.device_type)] {
            if v.trim().is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                return Err(Error::Invalid(format!("`{field}` must be a non-empty text of at most 256 bytes")));
            }
        }
        let signature = meta.signature.as_deref().ok_or_else(|| {
            Error::Invalid("the artifact is unsigned: sign it with `ferrite ota sign` and pass `signature`".into())
        })?;
        let signature = unhex("signature", signature, 64)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        if let Some(stated) = &meta.sha256
            && !stated.trim().eq_ignore_ascii_case(&hex(digest.as_ref()))
        {
            self.metrics.inc("ferrite_ota_uploads_refused_total", &[("reason", "digest")], 1);
            return Err(Error::Limit(format!(
                "the body's SHA-256 is {}, not the signed {stated}: the file changed after signing",
                hex(digest.as_ref())
            )));
        }
        let trusted = self.keys(tenant).await?;
        if trusted.is_empty() {
            return Err(Error::Limit(
                "this tenant trusts no OTA key yet: register the public key first (POST /api/v1/ota/keys)".into(),
            ));
        }
        let candidates: Vec<&String> = match &meta.public_key {
            Some(k) => {
                let k = hex(&unhex("public_key", k, 32)?);
                let found = trusted.iter().map(|(t, _)| t).find(|t| **t == k);
                vec![found.ok_or_else(|| {
                    self.metrics.inc("ferrite_ota_uploads_refused_total", &[("reason", "untrusted_key")], 1);
                    Error::Limit(format!("public key {k} is not one of this tenant's trusted OTA keys"))
                })?]
            }
            None => trusted.iter().map(|(t, _)| t).collect(),
        };
        let key = candidates.into_iter().find(|k| {
            let Ok(bytes) = unhex("public_key", k, 32) else { return false };
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, bytes)
                .verify(digest.as_ref(), &signature)
                .is_ok()
        });
        let Some(key) = key else {
            self.metrics.inc("ferrite_ota_uploads_refused_total", &[("reason", "signature")], 1);
            return Err(Error::Limit(
                "the signature does not verify over the artifact's SHA-256 with a trusted OTA key: \
                 the file was changed after signing, or signed with another key"
                    .into(),
            ));
        };
        let artifact = Artifact {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: tenant.to_owned(),
            version: meta.version.trim().to_owned(),
            device_type: meta.device_type.trim().to_owned(),
            size: body.len() as u64,
            sha256: hex(digest.as_ref()),
            signature: hex(&signature),
            public_key: key.clone(),
            created_by: by.to_owned(),
            created_at: now_ms(),
        };
        self.objects
            .put(&artifact_path(tenant, &artifact.id), body.into())
            .await
            .map_err(|e| Error::Store(format!("write the artifact: {e}")))?;
        sqlx::query(
            "INSERT INTO ota_artifacts (id, tenant, version, device_type, size, sha256, signature, public_key, \
             created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(artifact.id.clone())
        .bind(tenant.to_owned())
        .bind(artifact.version.clone())
        .bind(artifact.device_type.clone())
        .bind(artifact.size as i64)
        .bind(artifact.sha256.clone())
        .bind(artifact.signature.clone())
        .bind(artifact.public_key.clone())
        .bind(artifact.created_by.clone())
        .bind(artifact.created_at)
        .execute(&self.pool)
        .await
        .map_err(db("store the artifact"))?;
        self.metrics.inc("ferrite_ota_artifacts_total", &[], 1);
        Ok(artifact)
    }

    async fn artifact_opt(&self, tenant: &str, id: &str) -> Result<Option<Artifact>> {
        let row = sqlx::query(
            "SELECT id, tenant, version, device_type, size, sha256, signature, public_key, created_by, created_at \
             FROM ota_artifacts WHERE id = $1 AND tenant = $2",
        )
        .bind(id.to_owned())
        .bind(tenant.to_owned())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read an artifact"))?;
        row.map(|r| {
            Ok(Artifact {
                id: r.try_get(0).map_err(db("artifact"))?,
                tenant: r.try_get(1).map_err(db("artifact"))?,
                version: r.try_get(2).map_err(db("artifact"))?,
                device_type: r.try_get(3).map_err(db("artifact"))?,
                size: r.try_get::<i64, _>(4).map_err(db("artifact"))? as u64,
                sha256: r.try_get(5).map_err(db("artifact"))?,
                signature: r.try_get(6).map_err(db("artifact"))?,
                public_key: r.try_get(7).map_err(db("artifact"))?,
                created_by: r.try_get(8).map_err(db("artifact"))?,
                created_at: r.try_get(9).map_err(db("artifact"))?,
            })
        })
        .transpose()
    }

    /// Artifact `id` of `tenant`.
    pub async fn artifact(&self, tenant: &str, id: &str) -> Result<Artifact> {
        self.artifact_opt(tenant, id).await?.ok_or_else(|| Error::NotFound(format!("no artifact {id:?}")))
    }

    /// The tenant's artifacts, newest first.
    pub async fn artifacts(&self, tenant: &str) -> Result<Vec<Artifact>> {
        let rows = sqlx::query("SELECT id FROM ota_artifacts WHERE tenant = $1 ORDER BY created_at DESC")
            .bind(tenant.to_owned())
            .fetch_all(&self.pool)
            .await
            .map_err(db("list artifacts"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get(0).map_err(db("artifact"))?;
            out.extend(self.artifact_opt(tenant, &id).await?);
        }
        Ok(out)
    }

    /// Whether `device` may download artifact `id`: a campaign sent it an install of it.
    pub fn may_download(&self, device: &str, id: &str) -> bool {
        self.active.lock().get(device).is_some_and(|c| c.artifact.id == id)
    }

    /// Bytes `range` (start, inclusive end) of artifact `id`, or all of it.
    pub async fn content(&self, artifact: &Artifact, range: Option<(u64, u64)>) -> Result<bytes::Bytes> {
        let path = artifact_path(&artifact.tenant, &artifact.id);
        let read = match range {
            Some((start, end)) => self.objects.get_range(&path, start..end + 1).await,
            None => match self.objects.get(&path).await {
                Ok(g) => g.bytes().await,
                Err(e) => Err(e),
            },
        };
        read.map_err(|e| Error::Store(format!("read artifact {}: {e}", artifact.id)))
    }

    /// Starts a campaign of `artifact` to `devices` (resolved from its target, rollout
    /// order); its first view.
    pub async fn start(
        self: &Arc<Self>,
        sender: Principal,
        context: RequestContext,
        tenant: &str,
        request: CampaignRequest,
        mut devices: Vec<String>,
    ) -> Result<CampaignView> {
        let artifact = self.artifact(tenant, &request.artifact).await?;
        devices.sort();
        devices.dedup();
        if devices.is_empty() {
            return Err(Error::Invalid("the target holds no device".into()));
        }
        // An artifact is for one device type: devices of another type are left out (a
        // group may mix types), unknown devices too; both are counted in the view.
        let targeted = devices.len();
        let mut other_type = 0;
        let mut unknown = 0;
        devices.retain(|d| match self.registry.get(tenant, d) {
            Ok(dev) if dev.device_type == artifact.device_type => true,
            Ok(_) => {
                other_type += 1;
                false
            }
            Err(_) => {
                unknown += 1;
                false
            }
        });
        if devices.is_empty() {
            return Err(Error::Invalid(format!(
                "none of the {targeted} targeted devices is a registered device of type {:?}, the artifact's",
                artifact.device_type
            )));
        }
        if devices.len() > MAX_CAMPAIGN_DEVICES {
            return Err(Error::Invalid(format!(
                "{} devices, over the limit of {MAX_CAMPAIGN_DEVICES} per campaign",
                devices.len()
            )));
        }
        if !(0.0..=1.0).contains(&request.max_failure_rate) {
            return Err(Error::Invalid("max_failure_rate must be between 0 and 1".into()));
        }
        let waves = if request.waves.is_empty() { vec![Wave { percent: 100.0, delay_secs: 0 }] } else { request.waves };
        let mut last = 0.0;
        for w in &waves {
            if !(w.percent > last && w.percent <= 100.0) {
                return Err(Error::Invalid(
                    "wave percentages must rise, each over the one before, up to 100 (they are cumulative)".into(),
                ));
            }
            last = w.percent;
        }
        if last < 100.0 {
            return Err(Error::Invalid(format!("the last wave reaches {last}% of the devices: it must reach 100")));
        }
        for d in &devices {
            if let Some(c) = self.active.lock().get(d)
                && c.view.lock().status == CampaignStatus::Running
            {
                return Err(Error::Limit(format!(
                    "device {d:?} is in running campaign {}: stop it first",
                    c.view.lock().id
                )));
            }
        }
        // Device i is in the first wave whose cut passes it.
        let total = devices.len();
        let cuts: Vec<usize> =
            waves.iter().map(|w| ((w.percent / 100.0 * total as f64).ceil() as usize).clamp(1, total)).collect();
        let wave_of = |i: usize| cuts.iter().position(|&c| i < c).unwrap_or(cuts.len() - 1);
        let mut wave_views: Vec<WaveView> = waves
            .iter()
            .map(|w| WaveView {
                percent: w.percent,
                delay_secs: w.delay_secs,
                devices: 0,
                succeeded: 0,
                failed: 0,
                status: "pending".into(),
            })
            .collect();
        let list: Vec<(String, DeviceState, usize)> = devices
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let w = wave_of(i);
                wave_views[w].devices += 1;
                (d, DeviceState::Pending, w)
            })
            .collect();
        let id = uuid::Uuid::new_v4().to_string();
        let view = CampaignView {
            id: id.clone(),
            artifact: artifact.id.clone(),
            version: artifact.version.clone(),
            status: CampaignStatus::Running,
            reason: None,
            max_failure_rate: request.max_failure_rate,
            total,
            states: [(DeviceState::Pending.as_str().to_owned(), total)].into_iter().collect(),
            waves: wave_views,
            created_at: now_ms(),
            created_by: sender.to_string(),
            skipped: [("other_type".to_owned(), other_type), ("unknown".to_owned(), unknown)]
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect(),
        };
        let index = list.iter().enumerate().map(|(i, (d, _, _))| (d.clone(), i)).collect();
        let campaign = Arc::new(Campaign {
            tenant: tenant.to_owned(),
            artifact,
            view: Mutex::new(view.clone()),
            devices: Mutex::new(list),
            index,
            stop: AtomicBool::new(false),
        });
        let ids: Vec<String> = campaign.devices.lock().iter().map(|(d, _, _)| d.clone()).collect();
        for d in &ids {
            self.row(&campaign, d, DeviceState::Pending, None);
        }
        self.campaigns.lock().insert(id, campaign.clone());
        self.save(&campaign).await;
        let timeout = request.timeout_secs.map_or(DEFAULT_INSTALL_TIMEOUT, Duration::from_secs);
        let ota = self.clone();
        tokio::spawn(async move { ota.run(campaign, sender, context, timeout).await });
        Ok(view)
    }

    /// Campaign `id` of `tenant`.
    pub fn campaign(&self, tenant: &str, id: &str) -> Result<CampaignView> {
        let c = self.campaigns.lock().get(id).cloned().filter(|c| c.tenant == tenant);
        c.map(|c| c.view.lock().clone()).ok_or_else(|| Error::NotFound(format!("no campaign {id:?}")))
    }

    /// Each device of campaign `id` with its state and wave.
    pub fn campaign_devices(&self, tenant: &str, id: &str) -> Result<Vec<CampaignDevice>> {
        let c = self.campaigns.lock().get(id).cloned().filter(|c| c.tenant == tenant);
        let c = c.ok_or_else(|| Error::NotFound(format!("no campaign {id:?}")))?;
        let devices = c.devices.lock();
        Ok(devices.iter().map(|(d, s, w)| CampaignDevice { device_id: d.clone(), state: *s, wave: w + 1 }).collect())
    }

    /// Stops campaign `id`: no further wave starts; installs already sent run on.
    pub async fn stop(&self, tenant: &str, id: &str) -> Result<CampaignView> {
        let c = self.campaigns.lock().get(id).cloned().filter(|c| c.tenant == tenant);
        let c = c.ok_or_else(|| Error::NotFound(format!("no campaign {id:?}")))?;
        c.stop.store(true, Ordering::Relaxed);
        {
            let mut v = c.view.lock();
            if v.status == CampaignStatus::Running && v.reason.is_none() {
                v.reason = Some("stopped by a client".into());
            }
        }
        let view = c.view.lock().clone();
        Ok(view)
    }

    async fn run(
        self: Arc<Self>,
        campaign: Arc<Campaign>,
        sender: Principal,
        context: RequestContext,
        timeout: Duration,
    ) {
        let waves = campaign.view.lock().waves.len();
        let label = format!("ota campaign {}", campaign.view.lock().id);
        for wave in 0..waves {
            let delay = campaign.view.lock().waves[wave].delay_secs;
            if wave > 0 && delay > 0 {
                tokio::time::sleep(Duration::from_secs(delay)).await;
            }
            if campaign.stop.load(Ordering::Relaxed) {
                break;
            }
            campaign.view.lock().waves[wave].status = "running".into();
            self.save(&campaign).await;
            let members: Vec<String> =
                campaign.devices.lock().iter().filter(|(_, _, w)| *w == wave).map(|(d, _, _)| d.clone()).collect();
            let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
            let mut waits = tokio::task::JoinSet::new();
            for device in members {
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                let request = CommandRequest {
                    name: INSTALL.into(),
                    params: install_params(&campaign),
                    timeout: Some(timeout.as_secs()),
                };
                self.active.lock().insert(device.clone(), campaign.clone());
                match self.actuation.submit_install(&sender, &label, &context, &campaign.tenant, &device, request).await
                {
                    Ok((_, done)) => {
                        self.advance(&campaign, &device, DeviceState::Sent, None);
                        let (ota, campaign) = (self.clone(), campaign.clone());
                        waits.spawn(async move {
                            let outcome = done.await.unwrap_or((Status::Expired, Value::Null));
                            drop(permit);
                            ota.finish(&campaign, &device, outcome);
                        });
                    }
                    Err(e) => {
                        drop(permit);
                        tracing::warn!(device = %device, error = %e, "ota install refused");
                        self.advance(&campaign, &device, DeviceState::Failed, Some(format!("refused: {e}")));
                        self.active.lock().remove(&device);
                    }
                }
            }
            while waits.join_next().await.is_some() {}
            let (succeeded, failed) = {
                let devices = campaign.devices.lock();
                let of_wave = devices.iter().filter(|(_, _, w)| *w == wave);
                let succeeded = of_wave.clone().filter(|(_, s, _)| *s == DeviceState::Succeeded).count();
                (succeeded, of_wave.filter(|(_, s, _)| *s != DeviceState::Succeeded).count())
            };
            let over = {
                let mut v = campaign.view.lock();
                let w = &mut v.waves[wave];
                (w.succeeded, w.failed, w.status) = (succeeded, failed, "done".into());
                let finished = succeeded + failed;
                let over = finished > 0 && failed as f64 > v.max_failure_rate * finished as f64;
                if over {
                    v.status = CampaignStatus::Stopped;
                    v.reason = Some(format!(
                        "wave {} failed on {failed} of {finished} devices, over the threshold of {:.0}%",
                        wave + 1,
                        v.max_failure_rate * 100.0
                    ));
                }
                over
            };
            if over {
                self.metrics.inc("ferrite_ota_campaigns_stopped_total", &[("reason", "threshold")], 1);
                campaign.stop.store(true, Ordering::Relaxed);
            }
            self.save(&campaign).await;
        }
        {
            let mut v = campaign.view.lock();
            if v.status == CampaignStatus::Running {
                v.status = if campaign.stop.load(Ordering::Relaxed) {
                    CampaignStatus::Stopped
                } else {
                    CampaignStatus::Completed
                };
            }
        }
        self.active.lock().retain(|_, c| !Arc::ptr_eq(c, &campaign));
        self.save(&campaign).await;
    }

    /// Records a device's install outcome from its command's end.
    fn finish(&self, campaign: &Arc<Campaign>, device: &str, (status, result): (Status, Value)) {
        let reported = result.get("state").and_then(Value::as_str).and_then(DeviceState::parse);
        let detail = result.get("error").and_then(Value::as_str).map(str::to_owned);
        let state = match status {
            Status::Succeeded => DeviceState::Succeeded,
            Status::Failed if reported == Some(DeviceState::RolledBack) => DeviceState::RolledBack,
            Status::Failed => DeviceState::Failed,
            _ => DeviceState::Failed,
        };
        let detail = match status {
            Status::Expired => Some("no answer before the install timeout".to_owned()),
            _ => detail,
        };
        self.advance(campaign, device, state, detail);
        if state == DeviceState::Succeeded {
            let (registry, tenant, device, version) =
                (self.registry.clone(), campaign.tenant.clone(), device.to_owned(), campaign.artifact.version.clone());
            self.log.runtime().spawn(async move {
                let input = ferrite_device::model::DeviceInput { firmware: Some(version), ..Default::default() };
                if let Err(e) = registry.update(&tenant, &device, &input).await {
                    tracing::warn!(device = %device, error = %e, "the new firmware version was not recorded");
                }
            });
        }
        self.active.lock().remove(device);
    }

    /// Moves `device` to `state` and writes the row.
    fn advance(&self, campaign: &Campaign, device: &str, state: DeviceState, detail: Option<String>) {
        if campaign.set_state(device, state).is_some() {
            self.metrics.inc("ferrite_ota_device_states_total", &[("state", state.as_str())], 1);
            self.row(campaign, device, state, detail.as_deref());
        }
    }

    fn row(&self, campaign: &Campaign, device: &str, state: DeviceState, detail: Option<&str>) {
        let wave = campaign.index.get(device).and_then(|&i| campaign.devices.lock().get(i).map(|(_, _, w)| w + 1));
        let id = campaign.view.lock().id.clone();
        let mut row = Map::new();
        row.insert("device_id".into(), device.into());
        row.insert("campaign".into(), id.into());
        row.insert("artifact".into(), campaign.artifact.id.clone().into());
        row.insert("version".into(), campaign.artifact.version.clone().into());
        row.insert("state".into(), state.as_str().into());
        row.insert("wave".into(), wave.unwrap_or(0).into());
        if let Some(d) = detail {
            row.insert("detail".into(), d.into());
        }
        self.log.append(&campaign.tenant, OTA_STREAM, &Value::Object(row), "ferrite_ota_rows_dropped_total");
    }

    /// A device's progress report on `devices/{id}/ota/status`:
    /// `{"campaign", "state", "detail"?}`.
    pub fn reported(&self, topic: &str, payload: &[u8]) {
        let device = topic.split('/').nth(1).unwrap_or_default();
        let refuse = |reason: &'static str, detail: &str| {
            self.metrics.inc("ferrite_ota_reports_refused_total", &[("reason", reason)], 1);
            tracing::warn!(device, reason, "ota status refused: {detail}");
        };
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return refuse("malformed", "not JSON");
        };
        let Some(state) = v.get("state").and_then(Value::as_str).and_then(DeviceState::parse) else {
            return refuse(
                "malformed",
                "`state` is not downloading, verifying, installing, succeeded, failed or rolled_back",
            );
        };
        let Some(campaign) = self.active.lock().get(device).cloned() else {
            return refuse("unknown_campaign", "the device is in no running campaign");
        };
        if v.get("campaign").and_then(Value::as_str) != Some(campaign.view.lock().id.as_str()) {
            return refuse("unknown_campaign", "not the campaign the device is in");
        }
        // The final state comes from the install command's answer, which also ends the
        // command; a progress report only moves the device forward.
        if state.is_final() && state != DeviceState::RolledBack {
            return;
        }
        let detail = v.get("detail").and_then(Value::as_str).map(str::to_owned);
        self.advance(&campaign, device, state, detail);
    }

    async fn save(&self, campaign: &Campaign) {
        let view = campaign.view.lock().clone();
        let Ok(text) = serde_json::to_string(&view) else { return };
        let written = sqlx::query(
            "INSERT INTO ota_campaigns (id, tenant, view, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET view = excluded.view, updated_at = excluded.updated_at",
        )
        .bind(view.id.clone())
        .bind(campaign.tenant.clone())
        .bind(text)
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        if let Err(e) = written {
            tracing::warn!(campaign = %view.id, error = %e, "campaign record not stored");
        }
    }
}

fn install_params(campaign: &Campaign) -> Map<String, Value> {
    let a = &campaign.artifact;
    let mut p = Map::new();
    p.insert("campaign".into(), campaign.view.lock().id.clone().into());
    p.insert("artifact".into(), a.id.clone().into());
    p.insert("version".into(), a.version.clone().into());
    p.insert("url".into(), a.url().into());
    p.insert("size".into(), a.size.into());
    p.insert("sha256".into(), a.sha256.clone().into());
    p.insert("signature".into(), a.signature.clone().into());
    p
}

/// A `Range` header no byte of the artifact satisfies (HTTP 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses an HTTP `Range: bytes=a-b` header against a length: the inclusive range (`None`:
/// send it whole), or [`Unsatisfiable`].
pub fn parse_range(header: &str, len: u64) -> std::result::Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        // Several ranges: answered whole (allowed by RFC 9110).
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if n == 0 {
            return Err(Unsatisfiable);
        }
        (len.saturating_sub(n), len.saturating_sub(1))
    } else {
        let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| Unsatisfiable)?.min(len - 1)
        };
        (start, end)
    };
    if len == 0 || range.0 >= len || range.0 > range.1 {
        return Err(Unsatisfiable);
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=9-3", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        assert_eq!(hex(&unhex("k", "00ff10", 3).unwrap_or_default()), "00ff10");
        assert!(unhex("k", "00ff1", 3).is_err());
        assert!(unhex("k", "zzff10", 3).is_err());
    }
}

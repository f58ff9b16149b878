//! The registry: every device in memory (lookups on the publish path, the `devices` SQL
//! table) and in the store; registration with credentials from the identity service;
//! lifecycle (approve, disable, enable, rotate, remove); availability from MQTT sessions and
//! last seen from telemetry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferrite_engine::Metrics;
use ferrite_engine::plugin::{
    DeviceCredentials, DeviceData, DeviceIdentity, EventWriter, Presence, PurgeReport, TopicPublisher,
};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{Device, DeviceInput, Status};
use crate::store::{ProvisioningSecret, Store};

/// The stream of availability changes (`online` / `offline`, with the reason).
pub const STATUS_STREAM: &str = "device_status";

/// The stream of position changes reported by devices.
pub const LOCATION_STREAM: &str = "device_location";

/// A move shorter than this (metres) is not a new position.
pub const MIN_MOVE_METRES: f64 = 10.0;

/// Most rows one import may hold.
pub const MAX_IMPORT_ROWS: usize = 50_000;

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A device with what is known of it now (sessions, last seen).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceView {
    /// The registered device.
    #[serde(flatten)]
    pub device: Device,
    /// Whether it has an MQTT session now.
    pub online: bool,
    /// When it last sent telemetry or connected, milliseconds since the epoch.
    pub last_seen: Option<i64>,
}

/// Credentials handed out once.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Credentials {
    /// The client id for the token endpoint (the device id; the MQTT username).
    pub client_id: String,
    /// The secret (shown once).
    pub client_secret: String,
}

/// One rejected row of an import.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ImportFailure {
    /// Its row (1 = the first device; a CSV's header is row 0).
    pub row: usize,
    /// Its id, if it had one.
    pub id: Option<String>,
    /// Why it was refused.
    pub error: String,
}

/// What an import did.
#[derive(Debug, Clone, Serialize, Default, utoipa::ToSchema)]
pub struct ImportReport {
    /// Devices registered.
    pub created: usize,
    /// Rows refused, with why.
    pub failed: Vec<ImportFailure>,
    /// The new devices' credentials (absent with identity off).
    pub credentials: Vec<Credentials>,
}

/// The rows of an import: each row's number and its device, or why it does not parse.
pub type ImportRows = Vec<(usize, std::result::Result<DeviceInput, String>)>;

/// Filters and paging of a listing.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this type.
    pub device_type: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// Only members of this group.
    pub group: Option<String>,
    /// Only devices with this tag.
    pub tag: Option<String>,
    /// Only children of this gateway.
    pub parent: Option<String>,
    /// Only online (`true`) or offline devices.
    pub online: Option<bool>,
    /// Ids after this one (paging).
    pub after: Option<String>,
    /// At most this many.
    pub limit: usize,
}

/// The registry.
pub struct Registry {
    store: Store,
    devices: RwLock<HashMap<String, Arc<Device>>>,
    /// Open MQTT sessions per device.
    sessions: Mutex<HashMap<String, u32>>,
    /// Devices online without an MQTT session of their own (Sparkplug B), each counted as
    /// one session in `sessions`.
    external: Mutex<std::collections::HashSet<String>>,
    /// Last seen per device, and whether the store is behind.
    seen: Mutex<HashMap<String, (i64, bool)>>,
    seen_dirty: AtomicBool,
    /// Devices whose reported position the store does not have yet.
    moved: Mutex<std::collections::HashSet<String>>,
    credentials: Arc<dyn DeviceCredentials>,
    publisher: Arc<dyn TopicPublisher>,
    /// Erases a device's rows from the streams.
    data: Arc<dyn DeviceData>,
    /// `device_status` and `device_location` (written from the engine's shards too).
    log: ferrite_plugin::EventLog,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("devices", &self.devices.read().len()).finish()
    }
}

impl Registry {
    /// Loads the registry from `store`.
    pub async fn open(
        store: Store,
        credentials: Arc<dyn DeviceCredentials>,
        publisher: Arc<dyn TopicPublisher>,
        events: Arc<dyn EventWriter>,
        data: Arc<dyn DeviceData>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let devices = store.devices().await?.into_iter().map(|d| (d.id.clone(), Arc::new(d))).collect();
        let seen = store.last_seen().await?.into_iter().map(|(id, at)| (id, (at, false))).collect();
        Ok(Arc::new(Self {
            store,
            devices: RwLock::new(devices),
            sessions: Mutex::new(HashMap::new()),
            external: Mutex::default(),
            seen: Mutex::new(seen),
            seen_dirty: AtomicBool::new(false),
            moved: Mutex::new(std::collections::HashSet::new()),
            credentials,
            publisher,
            data,
            log: ferrite_plugin::EventLog::new(events, metrics.clone()),
            metrics,
        }))
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many devices are registered.
    pub fn len(&self) -> usize {
        self.devices.read().len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.devices.read().is_empty()
    }

    /// Device `id` of any tenant (the publish path's lookup).
    pub fn lookup(&self, id: &str) -> Option<Arc<Device>> {
        self.devices.read().get(id).cloned()
    }

    /// Device `id` of `tenant`; another tenant's device does not exist for the caller.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Arc<Device>> {
        self.lookup(id)
            .filter(|d| d.tenant == tenant)
            .ok_or_else(|| Error::NotFound(format!("no device {id:?} in tenant {tenant:?}")))
    }

    /// The device with its sessions and last seen.
    pub fn view(&self, device: &Device) -> DeviceView {
        DeviceView {
            online: self.sessions.lock().get(&device.id).is_some_and(|n| *n > 0),
            last_seen: self.seen.lock().get(&device.id).map(|(at, _)| *at),
            device: device.clone(),
        }
    }

    /// `tenant`'s devices that pass `filter`, by id; and the id to continue after, if more.
    pub fn list(&self, tenant: &str, filter: &Filter) -> (Vec<DeviceView>, Option<String>) {
        let limit = if filter.limit == 0 { 1000 } else { filter.limit };
        let devices = self.devices.read();
        let mut matching: Vec<&Arc<Device>> = devices
            .values()
            .filter(|d| d.tenant == tenant)
            .filter(|d| filter.after.as_ref().is_none_or(|a| d.id.as_str() > a.as_str()))
            .filter(|d| filter.device_type.as_ref().is_none_or(|t| &d.device_type == t))
            .filter(|d| filter.status.is_none_or(|s| d.status == s))
            .filter(|d| filter.group.as_ref().is_none_or(|g| d.groups.contains(g)))
            .filter(|d| filter.tag.as_ref().is_none_or(|t| d.tags.contains(t)))
            .filter(|d| filter.parent.as_ref().is_none_or(|p| d.parent.as_ref() == Some(p)))
            .collect();
        matching.sort_by(|a, b| a.id.cmp(&b.id));
        let mut out = Vec::new();
        let mut next = None;
        for d in matching {
            let view = self.view(d);
            if filter.online.is_some_and(|o| o != view.online) {
                continue;
            }
            if out.len() == limit {
                next = out.last().map(|v: &DeviceView| v.device.id.clone());
                break;
            }
            out.push(view);
        }
        (out, next)
    }

    /// Every device of `tenant` (the SQL table).
    pub fn all(&self, tenant: &str) -> Vec<DeviceView> {
        let devices = self.devices.read();
        let mut out: Vec<DeviceView> = devices.values().filter(|d| d.tenant == tenant).map(|d| self.view(d)).collect();
        out.sort_by(|a, b| a.device.id.cmp(&b.device.id));
        out
    }

    fn identity_of(d: &Device) -> DeviceIdentity {
        DeviceIdentity {
            tenant: d.tenant.clone(),
            id: d.id.clone(),
            device_type: Some(d.device_type.clone()),
            children: Vec::new(),
        }
    }

    /// Registers one device of `tenant`; its credentials, shown once.
    pub async fn add(&self, tenant: &str, input: &DeviceInput) -> Result<(DeviceView, Option<Credentials>)> {
        let device = input.into_device(tenant, now_ms())?;
        let mut report = self.register(vec![(1, device.clone())], Status::Active).await?;
        if let Some(f) = report.failed.pop() {
            return Err(if f.error.contains("already exists") {
                Error::Conflict(f.error)
            } else {
                Error::Invalid(f.error)
            });
        }
        Ok((self.view(&device), report.credentials.pop()))
    }

    /// Registers many devices of `tenant` (an import): every valid row is kept, every other
    /// one reported with its reason.
    pub async fn import(&self, tenant: &str, rows: ImportRows) -> Result<ImportReport> {
        if rows.len() > MAX_IMPORT_ROWS {
            return Err(Error::Invalid(format!(
                "{} rows in one import, over the limit of {MAX_IMPORT_ROWS}; split the file",
                rows.len()
            )));
        }
        let now = now_ms();
        let mut failed = Vec::new();
        let mut valid = Vec::with_capacity(rows.len());
        for (row, input) in rows {
            match input.and_then(|i| i.into_device(tenant, now).map_err(|e| e.to_string())) {
                Ok(d) => valid.push((row, d)),
                Err(error) => failed.push(ImportFailure { row, id: None, error }),
            }
        }
        let mut report = self.register(valid, Status::Active).await?;
        report.failed.extend(failed);
        report.failed.sort_by_key(|f| f.row);
        Ok(report)
    }

    /// Registers devices with `status`: refuses ids taken (here or in the same batch),
    /// issues credentials, stores the rest in one transaction.
    async fn register(&self, rows: Vec<(usize, Device)>, status: Status) -> Result<ImportReport> {
        let mut report = ImportReport::default();
        let mut seen_ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut accepted: Vec<(usize, Device)> = Vec::with_capacity(rows.len());
        {
            let devices = self.devices.read();
            for (row, mut d) in rows {
                d.status = status;
                let taken = if devices.contains_key(&d.id) {
                    Some("a device with this id already exists".to_owned())
                } else {
                    seen_ids.get(&d.id).map(|first| format!("the id is a duplicate of row {first}"))
                };
                match taken {
                    Some(error) => report.failed.push(ImportFailure { row, id: Some(d.id.clone()), error }),
                    None => {
                        seen_ids.insert(d.id.clone(), row);
                        accepted.push((row, d));
                    }
                }
            }
        }
        let identities: Vec<DeviceIdentity> = accepted.iter().map(|(_, d)| Self::identity_of(d)).collect();
        let secrets = self.credentials.register_many(&identities).await;
        let mut stored = Vec::with_capacity(accepted.len());
        for ((row, d), secret) in accepted.into_iter().zip(secrets) {
            match secret {
                Ok(secret) => {
                    if let Some(s) = secret {
                        report.credentials.push(Credentials { client_id: d.id.clone(), client_secret: s });
                    }
                    stored.push(d);
                }
                Err(error) => report.failed.push(ImportFailure { row, id: Some(d.id.clone()), error }),
            }
        }
        // A pending device's credentials exist but are refused until it is approved.
        if status == Status::Pending {
            for d in &stored {
                self.credentials.set_disabled(&d.id, true).await.map_err(Error::Credentials)?;
            }
        }
        if let Err(e) = self.store.insert(&stored).await {
            for d in &stored {
                let _ = self.credentials.remove(&d.id).await;
            }
            return Err(e);
        }
        report.created = stored.len();
        // Gateways of the new devices, and new devices that are gateways of earlier ones.
        let mut gateways: Vec<String> = stored.iter().filter_map(|d| d.parent.clone()).collect();
        gateways.extend(stored.iter().map(|d| d.id.clone()));
        {
            let mut devices = self.devices.write();
            for d in stored {
                devices.insert(d.id.clone(), Arc::new(d));
            }
        }
        self.sync_children(gateways).await;
        self.metrics.inc("ferrite_devices_registered_total", &[], report.created as u64);
        Ok(report)
    }

    /// Changes the fields `input` names of device `id` of `tenant` (not its id).
    pub async fn update(&self, tenant: &str, id: &str, input: &DeviceInput) -> Result<DeviceView> {
        if input.id.as_ref().is_some_and(|i| i != id) {
            return Err(Error::Invalid("a device's id cannot change; register a new device instead".into()));
        }
        let mut d = (*self.get(tenant, id)?).clone();
        let before = d.parent.clone();
        input.apply(&mut d)?;
        let after = d.parent.clone();
        let view = self.save(d).await?;
        if before != after {
            self.sync_children(before.into_iter().chain(after)).await;
        }
        Ok(view)
    }

    /// Tells identity which devices each of `gateways` may act for: the registered devices
    /// whose parent it is. A failure is logged; the next change of the gateway's children
    /// sets the whole list again.
    async fn sync_children(&self, gateways: impl IntoIterator<Item = String>) {
        let mut gateways: Vec<String> = gateways.into_iter().collect();
        gateways.sort();
        gateways.dedup();
        for gw in gateways {
            let children: Vec<String> = {
                let devices = self.devices.read();
                if !devices.contains_key(&gw) {
                    continue;
                }
                devices.values().filter(|d| d.parent.as_deref() == Some(gw.as_str())).map(|d| d.id.clone()).collect()
            };
            let is_gateway = !children.is_empty();
            if let Err(e) = self.credentials.set_children(&gw, children).await {
                tracing::warn!(gateway = %gw, error = %e, "the gateway's children were not updated in identity");
            } else if is_gateway {
                tracing::debug!(gateway = %gw, "gateway children updated");
            }
        }
    }

    async fn save(&self, mut d: Device) -> Result<DeviceView> {
        d.updated_at = now_ms();
        self.store.update(&d).await?;
        let view = self.view(&d);
        self.devices.write().insert(d.id.clone(), Arc::new(d));
        Ok(view)
    }

    /// Moves device `id` of `tenant` to `status`: disabling revokes its credentials' use and
    /// ends its sessions at once; enabling or approving lets it in again.
    pub async fn set_status(&self, tenant: &str, id: &str, status: Status) -> Result<DeviceView> {
        let mut d = (*self.get(tenant, id)?).clone();
        self.credentials.set_disabled(id, status != Status::Active).await.map_err(Error::Credentials)?;
        if status != Status::Active {
            let kicked = self.publisher.disconnect(id);
            tracing::info!(
                device = id,
                sessions = kicked,
                status = status.as_str(),
                "device disabled; its sessions ended"
            );
        }
        d.status = status;
        self.save(d).await
    }

    /// New credentials for device `id` of `tenant`; the old secret stops working at once.
    pub async fn rotate(&self, tenant: &str, id: &str) -> Result<Option<Credentials>> {
        self.get(tenant, id)?;
        let secret = self.credentials.rotate(id).await.map_err(Error::Credentials)?;
        Ok(secret.map(|s| Credentials { client_id: id.to_owned(), client_secret: s }))
    }

    /// Decommissions device `id` of `tenant`: its credentials are revoked, its sessions end
    /// and it leaves the registry (its data stays in the streams).
    pub async fn remove(&self, tenant: &str, id: &str) -> Result<()> {
        let parent = self.get(tenant, id)?.parent.clone();
        self.credentials.remove(id).await.map_err(Error::Credentials)?;
        self.publisher.disconnect(id);
        self.store.remove(id).await?;
        self.devices.write().remove(id);
        self.seen.lock().remove(id);
        self.sync_children(parent).await;
        Ok(())
    }

    /// Deletes every row of device `id` from `tenant`'s streams (but the audit trail). The
    /// device need not be registered (data of a removed device, or of one that was never
    /// registered); an id with neither a registration nor data is not found.
    pub async fn purge(&self, tenant: &str, id: &str) -> Result<PurgeReport> {
        let known = self.get(tenant, id).is_ok();
        let report = self.data.purge_device(tenant, id).await.map_err(Error::Purge)?;
        if !known && report.rows_deleted == 0 {
            return Err(Error::NotFound(format!("no device {id:?} and no data of it in tenant {tenant:?}")));
        }
        Ok(report)
    }

    /// Adds a provisioning secret for `tenant`: devices that present it register themselves
    /// (as `pending`, with type `device_type`) until `expires_at`. The secret, shown once.
    pub async fn add_provisioning_secret(
        &self,
        tenant: &str,
        device_type: &str,
        description: &str,
        expires_at: i64,
    ) -> Result<String> {
        let secret = ferrite_plugin::secret::new_secret().map_err(Error::Store)?;
        let record = ProvisioningSecret {
            secret_hash: ferrite_plugin::secret::hash_secret(&secret),
            tenant: tenant.to_owned(),
            device_type: device_type.to_owned(),
            description: description.to_owned(),
            expires_at,
        };
        self.store.add_provisioning_secret(&record, now_ms()).await?;
        Ok(secret)
    }

    /// A device registering itself with a provisioning secret: it lands in `pending` in the
    /// secret's tenant, with credentials that work once it is approved.
    pub async fn self_register(&self, secret: &str, input: &DeviceInput) -> Result<(DeviceView, Option<Credentials>)> {
        let refused = || Error::Invalid("the provisioning secret is not valid (unknown or expired)".into());
        let hash = ferrite_plugin::secret::hash_secret(secret);
        let p = self.store.provisioning_secret(&hash).await?.ok_or_else(refused)?;
        if !ferrite_plugin::secret::check_secret(secret, &p.secret_hash) || p.expires_at <= now_ms() {
            return Err(refused());
        }
        let mut device = input.into_device(&p.tenant, now_ms())?;
        if !p.device_type.is_empty() {
            device.device_type = p.device_type.clone();
        }
        let mut report = self.register(vec![(1, device.clone())], Status::Pending).await?;
        if let Some(f) = report.failed.pop() {
            return Err(Error::Conflict(f.error));
        }
        device.status = Status::Pending;
        Ok((self.view(&device), report.credentials.pop()))
    }

    /// The registered device a session is, when the session's principal belongs to the
    /// device's tenant (a session of another tenant using the id as its client id is not it).
    fn of_session(&self, session: &Presence) -> Option<Arc<Device>> {
        self.lookup(session.device()).filter(|d| *d.tenant == *session.principal.tenant)
    }

    /// A session started: the device is online (written to `device_status`).
    pub fn connected(&self, session: &Presence) {
        let Some(d) = self.of_session(session) else { return };
        let first = self.session_opened(&d.id);
        self.touch(&d.tenant, &d.id, now_ms());
        if first {
            self.status_event(&d, "online", "connect", of(session));
        }
    }

    /// A session ended: when it was the device's last, the device is offline.
    pub fn disconnected(&self, session: &Presence, reason: &'static str) {
        let Some(d) = self.of_session(session) else { return };
        let last = self.session_closed(&d.id);
        if last {
            self.status_event(&d, "offline", reason, of(session));
        }
    }

    /// Counts a session of device `id`; whether it is its first.
    fn session_opened(&self, id: &str) -> bool {
        let mut s = self.sessions.lock();
        let n = s.entry(id.to_owned()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Counts a session of device `id` gone; whether it was its last.
    fn session_closed(&self, id: &str) -> bool {
        let mut s = self.sessions.lock();
        match s.get_mut(id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                s.remove(id);
                true
            }
            None => false,
        }
    }

    /// A device without an MQTT session of its own (a Sparkplug B node or device) came online
    /// or went offline; it counts as one session of the device while online.
    pub fn availability(&self, tenant: &str, id: &str, online: bool, reason: &'static str) {
        let Some(d) = self.lookup(id).filter(|d| *d.tenant == *tenant) else { return };
        let changed = {
            let mut external = self.external.lock();
            if online { external.insert(id.to_owned()) } else { external.remove(id) }
        };
        if !changed {
            return;
        }
        let edge = if online { self.session_opened(&d.id) } else { self.session_closed(&d.id) };
        if online {
            self.touch(&d.tenant, &d.id, now_ms());
        }
        if edge {
            self.status_event(&d, if online { "online" } else { "offline" }, reason, ("", "sparkplug".into()));
        }
    }

    fn status_event(
        &self,
        d: &Device,
        status: &'static str,
        reason: &'static str,
        (client_id, source): (&str, String),
    ) {
        self.metrics.inc("ferrite_device_status_total", &[("status", status)], 1);
        let event = serde_json::json!({
            "device_id": d.id,
            "ts": now_ms(),
            "status": status,
            "reason": reason,
            "client_id": client_id,
            "source": source,
        });
        self.log.append(&d.tenant, STATUS_STREAM, &event, "ferrite_device_status_dropped_total");
    }

    /// Records that device `id` was seen at `at` (telemetry of `tenant`, a connect). Data
    /// of another tenant naming the device (device ids are free text in events) is not its.
    pub fn touch(&self, tenant: &str, id: &str, at: i64) {
        if self.devices.read().get(id).is_none_or(|d| d.tenant != tenant) {
            return;
        }
        let mut seen = self.seen.lock();
        match seen.get_mut(id) {
            Some((t, dirty)) if *t < at => {
                *t = at;
                *dirty = true;
            }
            Some(_) => return,
            None => {
                seen.insert(id.to_owned(), (at, true));
            }
        }
        self.seen_dirty.store(true, Ordering::Relaxed);
    }

    /// A position reported for device `id` in `tenant`'s telemetry (`lat` and `lon`): a
    /// move of more than [`MIN_MOVE_METRES`] becomes its location and a row of
    /// `device_location`. Another tenant's data cannot move it.
    pub fn locate(&self, tenant: &str, id: &str, lat: f64, lon: f64) {
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return;
        }
        let Some(d) = self.lookup(id).filter(|d| d.tenant == tenant) else { return };
        if let Some(l) = d.location {
            let dy = (lat - l.lat) * 110_540.0;
            let dx = (lon - l.lon) * 111_320.0 * ((lat + l.lat) / 2.0).to_radians().cos();
            if (dx * dx + dy * dy).sqrt() < MIN_MOVE_METRES {
                return;
            }
        }
        let mut next = (*d).clone();
        next.location = Some(crate::model::Location { lat, lon });
        next.updated_at = now_ms();
        self.devices.write().insert(id.to_owned(), Arc::new(next));
        self.moved.lock().insert(id.to_owned());
        let row = serde_json::json!({"device_id": id, "ts": now_ms(), "lat": lat, "lon": lon});
        self.log.append(&d.tenant, LOCATION_STREAM, &row, "ferrite_device_location_dropped_total");
    }

    /// Writes the last-seen times and positions that changed to the store.
    pub async fn flush_seen(&self) -> Result<usize> {
        let moved: Vec<String> = self.moved.lock().drain().collect();
        for id in moved {
            if let Some(d) = self.lookup(&id) {
                self.store.update(&d).await?;
            }
        }
        if !self.seen_dirty.swap(false, Ordering::Relaxed) {
            return Ok(0);
        }
        let changed: Vec<(String, i64)> = {
            let mut seen = self.seen.lock();
            seen.iter_mut()
                .filter(|(_, (_, dirty))| *dirty)
                .map(|(id, (at, dirty))| {
                    *dirty = false;
                    (id.clone(), *at)
                })
                .collect()
        };
        let known: Vec<(String, i64)> = {
            let devices = self.devices.read();
            changed.into_iter().filter(|(id, _)| devices.contains_key(id)).collect()
        };
        self.store.set_last_seen(&known).await?;
        Ok(known.len())
    }
}

/// The client id and source address a status event records of a session.
fn of(session: &Presence) -> (&str, String) {
    (&session.client_id, session.source.map(|s| s.to_string()).unwrap_or_default())
}

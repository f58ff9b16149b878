//! The actuation service: device types and their safety limits, commands from the API and
//! from rules checked against them (and the caller's policy), stored durably, delivered at
//! QoS 1 when the device's session subscribes to its commands, correlated with the device's
//! answers, expired when their timeout passes; every change a row of the `commands` stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ferrite_device::Registry;
use ferrite_device::model::{Level, Status as DeviceStatus};
use ferrite_engine::Metrics;
use ferrite_engine::auth::{AccessControl, Action, Principal, RequestContext, Resource};
use ferrite_engine::plugin::{DeviceCredentials, EventWriter, TopicPublisher};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};

use crate::command::{Command, Status};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::types::{DeviceType, Kind, check_params};

/// The standard command that rotates a device's credentials (only through
/// [`Actuation::rotate_credentials`], which stages the new secret).
pub const ROTATE: &str = "rotate_credentials";

/// The stream of command lifecycle events.
pub const COMMANDS_STREAM: &str = "commands";
/// Timeout of a command whose sender and type set none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest timeout a command may ask for (it waits that long for an offline device).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A command as a sender asks for it.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// The command's name.
    pub name: String,
    /// Its parameters.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// How long it may wait for the device and its answer, seconds.
    pub timeout: Option<u64>,
}

/// Open commands by id, and their ids per device in the order they were accepted (a
/// device's subscribe looks at its own commands only).
#[derive(Default)]
struct OpenCommands {
    by_id: HashMap<String, Command>,
    by_device: HashMap<String, Vec<String>>,
}

impl OpenCommands {
    fn insert(&mut self, c: Command) {
        self.by_device.entry(c.device_id.clone()).or_default().push(c.id.clone());
        self.by_id.insert(c.id.clone(), c);
    }

    fn remove(&mut self, id: &str) {
        if let Some(c) = self.by_id.remove(id)
            && let Some(ids) = self.by_device.get_mut(&c.device_id)
        {
            ids.retain(|i| i != id);
            if ids.is_empty() {
                self.by_device.remove(&c.device_id);
            }
        }
    }

    /// `device`'s queued commands, oldest first.
    fn queued(&self, device: &str) -> Vec<Command> {
        let ids = self.by_device.get(device).map(Vec::as_slice).unwrap_or_default();
        ids.iter().filter_map(|id| self.by_id.get(id)).filter(|c| c.status == Status::Queued).cloned().collect()
    }
}

/// The actuation service.
pub struct Actuation {
    store: Store,
    credentials: Arc<dyn DeviceCredentials>,
    writer: crate::store::Writer,
    registry: Arc<Registry>,
    publisher: Arc<dyn TopicPublisher>,
    /// The `commands` stream.
    log: ferrite_plugin::EventLog,
    access: Arc<dyn AccessControl>,
    metrics: Arc<Metrics>,
    /// Device types by (tenant, name).
    types: RwLock<HashMap<(String, String), Arc<DeviceType>>>,
    /// Open commands by id.
    open: Mutex<OpenCommands>,
    /// Per device: when its recent commands were accepted (the rate limit's window).
    recent: Mutex<HashMap<String, VecDeque<i64>>>,
    /// Who waits for a command to end (bulk jobs), by command id.
    waiters: Mutex<HashMap<String, tokio::sync::oneshot::Sender<(Status, Value)>>>,
}

impl std::fmt::Debug for Actuation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actuation").field("open", &self.open.lock().by_id.len()).finish()
    }
}

fn topic_of(device: &str) -> String {
    format!("devices/{device}/commands")
}

impl Actuation {
    /// Loads types and open commands from `store`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        store: Store,
        credentials: Arc<dyn DeviceCredentials>,
        registry: Arc<Registry>,
        publisher: Arc<dyn TopicPublisher>,
        events: Arc<dyn EventWriter>,
        access: Arc<dyn AccessControl>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let types = store.types().await?.into_iter().map(|(t, n, d)| ((t, n), Arc::new(d))).collect();
        // Loaded oldest first, so each device's ids are in the order they were accepted.
        let mut open = OpenCommands::default();
        for mut c in store.open_commands().await? {
            // A rotation's secret lives only in memory: one a restart interrupted fails, and
            // the device keeps both secrets until a new rotation.
            if c.name == ROTATE {
                c.status = Status::Failed;
                c.result = Some(serde_json::json!({"error": "interrupted by a server restart; rotate again"}));
                c.updated_at = now_ms();
                store.write(&[], std::slice::from_ref(&c)).await?;
                continue;
            }
            open.insert(c);
        }
        let mut recent: HashMap<String, VecDeque<i64>> = HashMap::new();
        for (device, at) in store.accepted_since(now_ms() - 60_000).await? {
            recent.entry(device).or_default().push_back(at);
        }
        Ok(Arc::new(Self {
            writer: crate::store::Writer::start(store.clone()),
            store,
            credentials,
            registry,
            publisher,
            log: ferrite_plugin::EventLog::new(events, metrics.clone()),
            access,
            metrics,
            types: RwLock::new(types),
            open: Mutex::new(open),
            recent: Mutex::new(recent),
            waiters: Mutex::new(HashMap::new()),
        }))
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Defines (or replaces) device type `name` of `tenant`.
    pub async fn put_type(&self, tenant: &str, name: &str, t: DeviceType) -> Result<()> {
        t.validate()?;
        self.store.put_type(tenant, name, &t, now_ms()).await?;
        self.types.write().insert((tenant.to_owned(), name.to_owned()), Arc::new(t));
        Ok(())
    }

    /// Device type `name` of `tenant` (a type nobody defined takes the standard management
    /// commands only, at the default rate).
    pub fn device_type(&self, tenant: &str, name: &str) -> Arc<DeviceType> {
        self.types.read().get(&(tenant.to_owned(), name.to_owned())).cloned().unwrap_or_default()
    }

    /// Checks and queues a command to device `device` of `tenant` from `sender`; the command
    /// (then delivered as soon as the device's session is subscribed). A refusal names the
    /// violated limit and is audited, whoever sent it.
    pub async fn submit(
        self: &Arc<Self>,
        sender: &Principal,
        label: Option<&str>,
        context: &RequestContext,
        tenant: &str,
        device: &str,
        request: CommandRequest,
    ) -> Result<Command> {
        if request.name == ROTATE {
            return Err(Error::Invalid(format!(
                "`{ROTATE}` carries a new secret that the platform makes: use POST \
                 /api/v1/devices/{device}/credentials/rotate"
            )));
        }
        if request.name == crate::ota::INSTALL {
            return Err(Error::Invalid(format!(
                "`{}` installs a signed artifact the platform holds: start a campaign with POST \
                 /api/v1/ota/campaigns",
                crate::ota::INSTALL
            )));
        }
        self.submit_inner(sender, label, context, tenant, device, request, None, None).await
    }

    /// Queues an `install` command of a campaign (its parameters come from a verified
    /// artifact), and a receiver of its final status and result.
    pub(crate) async fn submit_install(
        self: &Arc<Self>,
        sender: &Principal,
        label: &str,
        context: &RequestContext,
        tenant: &str,
        device: &str,
        request: CommandRequest,
    ) -> Result<(Command, tokio::sync::oneshot::Receiver<(Status, Value)>)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let c = self.submit_inner(sender, Some(label), context, tenant, device, request, Some(tx), None).await?;
        Ok((c, rx))
    }

    /// Rotates device `device`'s credentials over the command channel: a new secret is
    /// staged (valid beside the old one) and sent in a `rotate_credentials` command; when the
    /// device answers `succeeded`, or when `deadline_secs` pass, the old secret stops working.
    pub async fn rotate_credentials(
        self: &Arc<Self>,
        sender: &Principal,
        context: &RequestContext,
        tenant: &str,
        device: &str,
        deadline_secs: u64,
    ) -> Result<Command> {
        let mut params = Map::new();
        params.insert("deadline_secs".into(), Value::from(deadline_secs));
        let request = CommandRequest { name: ROTATE.into(), params, timeout: Some(deadline_secs) };
        let label = format!("{sender} (credential rotation)");
        // Checked first (policy, level, rate), so that a refused rotation stages nothing.
        let mut probe = request.clone();
        self.check(sender, context, tenant, device, &mut probe, false)?;
        let secret = self
            .credentials
            .stage(device)
            .await
            .map_err(|e| Error::Invalid(format!("cannot stage a new secret: {e}")))?
            .ok_or_else(|| Error::Invalid("identity is off: there are no credentials to rotate".into()))?;
        self.submit_inner(sender, Some(&label), context, tenant, device, request, None, Some(secret)).await
    }

    /// [`Actuation::submit`], and a receiver of the command's final status and result.
    pub async fn submit_watched(
        self: &Arc<Self>,
        sender: &Principal,
        label: Option<&str>,
        context: &RequestContext,
        tenant: &str,
        device: &str,
        request: CommandRequest,
    ) -> Result<(Command, tokio::sync::oneshot::Receiver<(Status, Value)>)> {
        if request.name == ROTATE || request.name == crate::ota::INSTALL {
            return Err(Error::Invalid(format!(
                "`{}` is not a bulk command: rotate each device, or start an OTA campaign",
                request.name
            )));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let c = self.submit_inner(sender, label, context, tenant, device, request, Some(tx), None).await?;
        Ok((c, rx))
    }

    #[allow(clippy::too_many_arguments)]
    async fn submit_inner(
        self: &Arc<Self>,
        sender: &Principal,
        label: Option<&str>,
        context: &RequestContext,
        tenant: &str,
        device: &str,
        mut request: CommandRequest,
        waiter: Option<tokio::sync::oneshot::Sender<(Status, Value)>>,
        secret: Option<String>,
    ) -> Result<Command> {
        match self.check(sender, context, tenant, device, &mut request, true) {
            Ok(timeout) => {
                let now = now_ms();
                let command = Command {
                    id: uuid::Uuid::new_v4().to_string(),
                    tenant: tenant.to_owned(),
                    device_id: device.to_owned(),
                    name: request.name,
                    params: request.params,
                    status: Status::Queued,
                    result: None,
                    sender: label.map_or_else(|| sender.to_string(), str::to_owned),
                    created_at: now,
                    updated_at: now,
                    expires_at: now + timeout.as_millis() as i64,
                    secret,
                };
                self.writer.insert(command.clone()).await?;
                if let Some(w) = waiter {
                    self.waiters.lock().insert(command.id.clone(), w);
                }
                self.open.lock().insert(command.clone());
                self.metrics.inc("ferrite_commands_total", &[("status", "queued")], 1);
                self.event(&command);
                self.flush(device);
                Ok(self.open.lock().by_id.get(&command.id).cloned().unwrap_or(command))
            }
            Err(e) => {
                let reason = match &e {
                    Error::Limit(_) => "limit",
                    Error::Denied(_) => "denied",
                    Error::NotFound(_) => "not_found",
                    _ => "invalid",
                };
                self.metrics.inc("ferrite_commands_refused_total", &[("reason", reason)], 1);
                self.access.record(sender, "command_refused", &format!("{} to {device}: {e}", request.name));
                Err(e)
            }
        }
    }

    /// Every check a command must pass, taking a slot of the rate when `take_slot`; its
    /// timeout.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        sender: &Principal,
        context: &RequestContext,
        tenant: &str,
        device: &str,
        request: &mut CommandRequest,
        take_slot: bool,
    ) -> Result<Duration> {
        let d = self.registry.get(tenant, device).map_err(|e| Error::NotFound(e.to_string()))?;
        let resource = Resource::Device { tenant: tenant.into(), id: device.into() };
        if !self.access.authorize(sender, Action::Actuate, &resource, context).allowed {
            return Err(Error::Denied(format!("{sender} may not actuate device {device:?}: denied by policy")));
        }
        if d.status != DeviceStatus::Active {
            return Err(Error::Limit(format!("device {device:?} is {}: it takes no commands", d.status.as_str())));
        }
        let t = self.device_type(tenant, &d.device_type);
        let spec = t.command(&request.name).ok_or_else(|| {
            let mut known: Vec<String> = t.commands.keys().cloned().collect();
            known.extend(crate::types::standard_commands().into_keys());
            Error::Limit(format!(
                "device type {:?} has no command {:?} (it takes: {})",
                d.device_type,
                request.name,
                known.join(", ")
            ))
        })?;
        let allowed = matches!(
            (spec.kind, d.level),
            (Kind::Actuation, _) | (Kind::Management, Level::Semi | Level::Full) | (Kind::Software, Level::Full)
        );
        if !allowed {
            return Err(Error::Limit(format!(
                "device {device:?} is {}-managed: it refuses {} commands such as {:?}",
                d.level.as_str(),
                match spec.kind {
                    Kind::Software => "software and destructive",
                    _ => "management",
                },
                request.name
            )));
        }
        check_params(&request.name, &spec, &mut request.params)?;
        let timeout = match request.timeout {
            Some(0) => return Err(Error::Invalid("timeout must be at least 1 second".into())),
            Some(s) => Duration::from_secs(s),
            None => spec.timeout_secs.map_or(DEFAULT_TIMEOUT, Duration::from_secs),
        };
        if timeout > MAX_TIMEOUT {
            return Err(Error::Invalid(format!(
                "timeout {}s is over the limit of {}s",
                timeout.as_secs(),
                MAX_TIMEOUT.as_secs()
            )));
        }
        // The rate: every sender together, over the last minute.
        let now = now_ms();
        let mut recent = self.recent.lock();
        let window = recent.entry(device.to_owned()).or_default();
        while window.front().is_some_and(|t| *t <= now - 60_000) {
            window.pop_front();
        }
        if !take_slot {
            return Ok(timeout);
        }
        if window.len() >= t.max_per_minute as usize {
            return Err(Error::Limit(format!(
                "device {device:?} already received {} commands in the last minute, the most its type {:?} allows",
                window.len(),
                d.device_type
            )));
        }
        window.push_back(now);
        Ok(timeout)
    }

    /// Command `id` of `tenant`.
    pub async fn command(&self, tenant: &str, id: &str) -> Result<Command> {
        let open = self.open.lock().by_id.get(id).cloned();
        let c = match open {
            Some(c) => Some(c),
            None => self.store.command(id).await?,
        };
        c.filter(|c| c.tenant == tenant).ok_or_else(|| Error::NotFound(format!("no command {id:?}")))
    }

    /// Sends every queued command of `device` whose session is subscribed to its commands,
    /// oldest first.
    pub fn flush(self: &Arc<Self>, device: &str) {
        let queued = self.open.lock().queued(device);
        for c in queued {
            match self.publisher.deliver(device, &topic_of(device), &c.message()) {
                Ok(acked) => {
                    self.transition(&c.id, Status::Sent, None);
                    let me = self.clone();
                    let id = c.id.clone();
                    let device = device.to_owned();
                    self.log.runtime().spawn(async move {
                        match acked.await {
                            Ok(()) => me.transition(&id, Status::Delivered, None),
                            // The session ended first: queued again, and sent at once if the
                            // device has another session already (a takeover), else to the
                            // next one.
                            Err(_) => {
                                me.transition(&id, Status::Queued, None);
                                me.flush(&device);
                            }
                        }
                    });
                }
                // Not connected (or busy): it waits.
                Err(_) => break,
            }
        }
    }

    /// Moves open command `id` to `status` (an answer may carry `result`); records it.
    pub fn transition(&self, id: &str, status: Status, result: Option<Value>) {
        let changed = {
            let mut open = self.open.lock();
            let Some(c) = open.by_id.get_mut(id) else { return };
            // A late PUBACK does not undo an answer, nor does a lost session.
            let rank = |s: Status| match s {
                Status::Queued => 0,
                Status::Sent => 1,
                Status::Delivered => 2,
                _ => 3,
            };
            let back_to_queue = status == Status::Queued && c.status == Status::Sent;
            if rank(status) <= rank(c.status) && !back_to_queue {
                return;
            }
            c.status = status;
            c.updated_at = now_ms();
            if result.is_some() {
                c.result = result;
            }
            let c = c.clone();
            if status.is_final() {
                open.remove(id);
            }
            c
        };
        self.metrics.inc("ferrite_commands_total", &[("status", status.as_str())], 1);
        self.event(&changed);
        if status.is_final()
            && let Some(w) = self.waiters.lock().remove(id)
        {
            let _ = w.send((status, changed.result.clone().unwrap_or(Value::Null)));
        }
        // A rotation ends the old secret when the device confirms, or at its deadline.
        if changed.name == ROTATE && matches!(status, Status::Succeeded | Status::Expired) {
            let (credentials, device) = (self.credentials.clone(), changed.device_id.clone());
            self.log.runtime().spawn(async move {
                match credentials.commit(&device).await {
                    Ok(()) => {
                        tracing::info!(device = %device, "credential rotation committed: the old secret is revoked")
                    }
                    Err(e) => tracing::error!(device = %device, error = %e, "cannot commit a credential rotation"),
                }
            });
        }
        // The store keeps what a restart needs: open commands (stored when accepted) and
        // final outcomes. `sent` and `delivered` live in memory and in the `commands`
        // stream; a restart sends an open command again (delivery is at least once: a
        // device recognises a repeat by its id).
        if !status.is_final() {
            return;
        }
        self.writer.finish(changed);
    }

    /// A device's answer on `devices/{id}/commands/result`: `{"id", "status": "succeeded" |
    /// "failed", "result"}`. An answer for a command that does not exist, is closed, or is
    /// another device's is refused and counted.
    pub fn answer(&self, topic: &str, payload: &[u8]) {
        let device = topic.split('/').nth(1).unwrap_or_default();
        let refuse = |reason: &'static str, detail: String| {
            self.metrics.inc("ferrite_command_results_refused_total", &[("reason", reason)], 1);
            tracing::warn!(device, reason, "{detail}");
        };
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return refuse("malformed", "a command result that is not JSON".into());
        };
        let Some(id) = v.get("id").and_then(Value::as_str) else {
            return refuse("malformed", "a command result without `id`".into());
        };
        let status = match v.get("status").and_then(Value::as_str) {
            Some("succeeded") => Status::Succeeded,
            Some("failed") => Status::Failed,
            other => return refuse("malformed", format!("command {id}: status {other:?} is not succeeded or failed")),
        };
        match self.open.lock().by_id.get(id) {
            None => return refuse("unknown_command", format!("a result for command {id:?}, which is not open")),
            Some(c) if c.device_id != device => {
                return refuse("wrong_device", format!("a result for command {id:?} of device {:?}", c.device_id));
            }
            Some(_) => {}
        }
        self.transition(id, status, Some(v.get("result").cloned().unwrap_or(Value::Null)));
    }

    /// Expires open commands whose timeout passed; how many.
    pub fn expire(&self) -> usize {
        let now = now_ms();
        let due: Vec<String> =
            self.open.lock().by_id.values().filter(|c| c.expires_at <= now).map(|c| c.id.clone()).collect();
        for id in &due {
            self.transition(id, Status::Expired, None);
        }
        due.len()
    }

    fn event(&self, c: &Command) {
        let row = serde_json::json!({
            "device_id": c.device_id,
            "ts": c.updated_at,
            "command_id": c.id,
            "name": c.name,
            "status": c.status.as_str(),
            "sender": c.sender,
            "detail": "",
        });
        self.log.append(&c.tenant, COMMANDS_STREAM, &row, "ferrite_command_events_dropped_total");
    }
}

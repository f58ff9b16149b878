//! What the engine hands a plugin (a service hosted around it: identity, devices,
//! actuation): its own storage directory, the stream catalog, the bus, a way to write
//! events and to publish to devices, and the decision point. The trait a plugin implements,
//! with its HTTP routes, is in the `ferrite-plugin` crate, so that this crate needs no HTTP
//! types (see docs/adr/0002-plugins.md).

use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::AccessControl;
use crate::catalog::StreamCatalog;
use crate::metrics::Metrics;
use crate::shard::{BatchObserver, Engine};

/// What [`EventWriter::write`] returns.
pub type WriteFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Writes events to a stream as if they had been ingested (decoded, committed to the WAL,
/// seen by rules). Plugins use it for their own streams (the identity plugin's `audit`).
pub trait EventWriter: Send + Sync {
    /// Appends NDJSON events (each with `device_id`) to `stream` of `tenant`. Resolves once
    /// they are durable, or with the reason they are not.
    fn write(&self, tenant: &str, stream: &str, ndjson: Vec<u8>) -> WriteFuture;
}

/// Whether MQTT `topic` matches subscription `filter` (both assumed valid): `+` is one
/// level, `#` the rest; topics starting with `$` are not matched by a leading wildcard.
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A boxed future of a plugin-facing trait (they must stay object safe).
pub type PluginFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// An MQTT session as the broker reports it to plugins.
#[derive(Debug, Clone)]
pub struct Presence {
    /// Who the CONNECT authenticated (the device id for a device; `anonymous` with
    /// `--auth off`).
    pub principal: crate::auth::Principal,
    /// The MQTT client id.
    pub client_id: String,
    /// The peer's address.
    pub source: Option<std::net::IpAddr>,
}

impl Presence {
    /// The device this session is: the principal for a device, else the MQTT client id
    /// (sessions of users and services, and every session with `--auth off`).
    pub fn device(&self) -> &str {
        if self.principal.kind == crate::auth::PrincipalKind::Device { &self.principal.id } else { &self.client_id }
    }
}

/// Told when MQTT sessions start and end (availability).
pub trait PresenceObserver: Send + Sync {
    /// A session was accepted (after CONNACK).
    fn connected(&self, session: &Presence);
    /// A session subscribed to `filter` (allowed by policy).
    fn subscribed(&self, _session: &Presence, _filter: &str) {}
    /// A session ended: `disconnect` (clean), `keep_alive` (expired), `will` (dropped, its
    /// last will published), `kicked` ([`TopicPublisher::disconnect`]), `shutdown` or
    /// `error`.
    fn disconnected(&self, session: &Presence, reason: &'static str);
    /// A device without an MQTT session of its own came online (`online`) or went offline:
    /// a Sparkplug B edge node or device, by its births and deaths. `reason` is `birth`,
    /// `death`, `node_death` or `session_ended`.
    fn availability(&self, _tenant: &str, _device: &str, _online: bool, _reason: &'static str) {}
}

/// The MQTT side of the bus, as plugins see it: publish to subscribers (a command to a
/// device, desired state), end a principal's sessions, and learn of sessions.
pub trait TopicPublisher: Send + Sync {
    /// Publishes `payload` on `topic`; returns how many subscribers it reached.
    fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> Result<usize, String>;

    /// Ends every session of principal `id` now (a disabled device); how many there were.
    fn disconnect(&self, id: &str) -> usize;

    /// Has `observer` told of every session's start and end from now on.
    fn observe_presence(&self, observer: Arc<dyn PresenceObserver>);

    /// Sends `payload` at QoS 1 on `topic` to a session of `device` subscribed to it; an
    /// error at once when there is none; otherwise a future that resolves when the device
    /// acknowledges, or fails when its session ends first.
    fn deliver(&self, device: &str, topic: &str, payload: &[u8]) -> Result<Delivery, String>;

    /// Calls `handler` with the topic and payload of every message published on a topic
    /// matching `filter` (command results, reported state). It runs on the publisher's task
    /// and must not block.
    fn subscribe_internal(&self, filter: &str, handler: MessageHandler);
}

/// A subscriber inside the server: called with each matching message's topic and payload.
pub type MessageHandler = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// A QoS 1 delivery in flight: resolves when the device acknowledges.
pub type Delivery = PluginFuture<'static, Result<(), String>>;

/// A device's identity as the identity service keeps it: what the device plugin registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Its tenant.
    pub tenant: String,
    /// Its id (the client id of the token endpoint, the MQTT username).
    pub id: String,
    /// Its type.
    pub device_type: Option<String>,
    /// A gateway's children: it may act for them.
    pub children: Vec<String>,
}

/// Device credentials: the identity service keeps them, the device plugin asks for them.
/// With identity off nothing is issued (every operation succeeds with nothing to give).
pub trait DeviceCredentials: Send + Sync {
    /// Registers the device as a client of the token endpoint; its secret (shown once), or
    /// `None` when identity is off.
    fn register<'a>(&'a self, device: &'a DeviceIdentity) -> PluginFuture<'a, Result<Option<String>, String>>;
    /// [`DeviceCredentials::register`] for many devices at once (a bulk import), one result
    /// per device in order.
    fn register_many<'a>(
        &'a self,
        devices: &'a [DeviceIdentity],
    ) -> PluginFuture<'a, Vec<Result<Option<String>, String>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(devices.len());
            for d in devices {
                out.push(self.register(d).await);
            }
            out
        })
    }
    /// Replaces the device's secret (the old one stops working at once); the new one.
    fn rotate<'a>(&'a self, id: &'a str) -> PluginFuture<'a, Result<Option<String>, String>>;
    /// Gives the device a second secret, valid beside the current one until
    /// [`DeviceCredentials::commit`] (a rotation over the command channel); the new secret.
    fn stage<'a>(&'a self, id: &'a str) -> PluginFuture<'a, Result<Option<String>, String>>;
    /// Makes the staged secret the device's only one: the old one stops working.
    fn commit<'a>(&'a self, id: &'a str) -> PluginFuture<'a, Result<(), String>>;
    /// Disables (refused at once, its tokens with it) or enables the device.
    fn set_disabled<'a>(&'a self, id: &'a str, disabled: bool) -> PluginFuture<'a, Result<(), String>>;
    /// Forgets the device's credentials.
    fn remove<'a>(&'a self, id: &'a str) -> PluginFuture<'a, Result<(), String>>;
    /// Sets the devices gateway `gateway` may act for (its children in the registry). A
    /// gateway's sessions see the change when they next authenticate.
    fn set_children<'a>(&'a self, gateway: &'a str, children: Vec<String>) -> PluginFuture<'a, Result<(), String>> {
        let _ = (gateway, children);
        Box::pin(async { Ok(()) })
    }
}

/// [`DeviceCredentials`] with identity off: nothing to issue or revoke.
#[derive(Debug, Default)]
pub struct NoCredentials;

impl DeviceCredentials for NoCredentials {
    fn register<'a>(&'a self, _: &'a DeviceIdentity) -> PluginFuture<'a, Result<Option<String>, String>> {
        Box::pin(async { Ok(None) })
    }
    fn rotate<'a>(&'a self, _: &'a str) -> PluginFuture<'a, Result<Option<String>, String>> {
        Box::pin(async { Ok(None) })
    }
    fn stage<'a>(&'a self, _: &'a str) -> PluginFuture<'a, Result<Option<String>, String>> {
        Box::pin(async { Ok(None) })
    }
    fn commit<'a>(&'a self, _: &'a str) -> PluginFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn set_disabled<'a>(&'a self, _: &'a str, _: bool) -> PluginFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn remove<'a>(&'a self, _: &'a str) -> PluginFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Runs a read-only SQL query in a tenant and returns its `device_id` column (the targets
/// of a bulk job: `SELECT device_id FROM devices WHERE firmware < '2.3'`).
pub trait DeviceQuery: Send + Sync {
    /// The distinct values of the query's `device_id` column, in order of first appearance.
    fn device_ids<'a>(&'a self, tenant: &'a str, sql: &'a str) -> PluginFuture<'a, Result<Vec<String>, String>>;
}

/// What erasing one device's data did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PurgeReport {
    /// The device.
    pub device_id: String,
    /// Streams that held rows of it.
    pub streams: Vec<String>,
    /// Rows deleted.
    pub rows_deleted: u64,
    /// Archive files rewritten without the rows (or dropped when nothing else was in them).
    pub files_rewritten: u64,
}

/// Erases a device's data (every stream of its tenant but `audit`): the archive files that
/// hold it are rewritten without it, atomically.
pub trait DeviceData: Send + Sync {
    /// Deletes every row of `device` in `tenant`'s streams, received before the call.
    fn purge_device<'a>(&'a self, tenant: &'a str, device: &'a str) -> PluginFuture<'a, Result<PurgeReport, String>>;
}

/// [`DeviceData`] without storage (tools): refuses.
#[derive(Debug, Default)]
pub struct NoDeviceData;

impl DeviceData for NoDeviceData {
    fn purge_device<'a>(&'a self, _: &'a str, _: &'a str) -> PluginFuture<'a, Result<PurgeReport, String>> {
        Box::pin(async { Err("this process has no storage to purge data from; purge through the server".to_owned()) })
    }
}

/// Everything a plugin is given when it starts.
#[derive(Clone)]
pub struct PluginContext {
    /// The plugin's own directory, under the data directory (`{data}/plugins/{name}`).
    pub data_dir: PathBuf,
    /// The stream catalog.
    pub catalog: Arc<StreamCatalog>,
    /// The engine, for observing committed batches ([`PluginContext::subscribe`]); `None`
    /// in tools that run a plugin without the engine (the CLI).
    pub engine: Option<Arc<Engine>>,
    /// Appends events to streams.
    pub events: Arc<dyn EventWriter>,
    /// Publishes to MQTT subscribers.
    pub publisher: Arc<dyn TopicPublisher>,
    /// The decision point every plugin calls before it acts.
    pub access: Arc<dyn AccessControl>,
    /// Device credentials (the identity service, or [`NoCredentials`]).
    pub credentials: Arc<dyn DeviceCredentials>,
    /// Tables a plugin adds beside each tenant's streams in SQL (rows per tenant).
    pub tables: Arc<crate::system::TableSet>,
    /// SQL over a tenant's tables, for plugins that target devices by a query.
    pub queries: Arc<dyn DeviceQuery>,
    /// Erases a device's data (decommission with purge, data-subject requests).
    pub data: Arc<dyn DeviceData>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for PluginContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginContext").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl PluginContext {
    /// Has `observer` see every committed batch of every stream, after the WAL commit.
    /// Returns `false` when there is no engine to subscribe to.
    pub fn subscribe(&self, observer: Arc<dyn BatchObserver>) -> bool {
        match &self.engine {
            Some(engine) => {
                engine.add_observer(observer);
                true
            }
            None => false,
        }
    }
}

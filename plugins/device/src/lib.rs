//! Ferrite's device plugin: the registry of every device (owner, type, management level,
//! gateway parent, attributes, tags, groups, firmware, location, status), provisioning one
//! by one, in bulk (JSON or CSV) and by self-registration with a provisioning secret; the
//! lifecycle (approve, disable, enable, rotate credentials, decommission), with credentials
//! from the identity service; availability (`device_status` from MQTT sessions, last seen
//! from telemetry); and the registry as the SQL table `devices` of each tenant.

pub mod error;
pub mod http;
pub mod model;
pub mod registry;
pub mod store;
pub mod table;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow::array::{Array, AsArray};
use ferrite_engine::plugin::{PluginContext, Presence, PresenceObserver};
use ferrite_engine::{BatchObserver, DEVICE_COLUMN, StreamBatch};
use ferrite_plugin::{BoxFuture, Plugin, PluginError, Routes};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

pub use error::{Error, Result};
pub use registry::Registry;

/// How often last-seen times are written to the store.
const SEEN_FLUSH: Duration = Duration::from_secs(10);

/// The device plugin.
pub struct DevicePlugin {
    store_url: String,
    registry: Arc<OnceLock<Arc<Registry>>>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl DevicePlugin {
    /// The plugin, keeping its registry at `store_url` (`postgres://...`) or, when empty, in
    /// SQLite under its directory.
    pub fn new(store_url: &str) -> Self {
        Self { store_url: store_url.to_owned(), registry: Arc::new(OnceLock::new()), flusher: Mutex::new(None) }
    }

    /// Where the registry will be once started (for plugins built on it).
    pub fn shared_registry(&self) -> Arc<OnceLock<Arc<Registry>>> {
        self.registry.clone()
    }
}

/// Sessions and telemetry, seen by the registry.
struct Observer(Arc<Registry>);

impl PresenceObserver for Observer {
    fn connected(&self, session: &Presence) {
        self.0.connected(session);
    }

    fn disconnected(&self, session: &Presence, reason: &'static str) {
        self.0.disconnected(session, reason);
    }

    fn availability(&self, tenant: &str, device: &str, online: bool, reason: &'static str) {
        self.0.availability(tenant, device, online, reason);
    }
}

impl BatchObserver for Observer {
    fn observe(&self, _shard: usize, batches: &[StreamBatch]) -> Vec<StreamBatch> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let now = registry::now_ms();
        for b in batches {
            let Some(devices) = b.batch.column_by_name(DEVICE_COLUMN).and_then(|c| c.as_string_opt::<i32>()) else {
                continue;
            };
            // A position: the last `lat`/`lon` of each device in the batch.
            let coordinate = |name: &str| {
                b.batch.column_by_name(name).and_then(|c| c.as_primitive_opt::<arrow::datatypes::Float64Type>())
            };
            if let (Some(lat), Some(lon)) = (coordinate("lat"), coordinate("lon")) {
                let mut last: std::collections::HashMap<&str, (f64, f64)> = std::collections::HashMap::new();
                for i in 0..devices.len() {
                    if lat.is_valid(i) && lon.is_valid(i) {
                        last.insert(devices.value(i), (lat.value(i), lon.value(i)));
                    }
                }
                for (d, (la, lo)) in last {
                    self.0.locate(b.stream.tenant(), d, la, lo);
                }
            }
            // Events of one device come in runs: one update per run.
            let mut last: Option<&str> = None;
            for i in 0..devices.len() {
                let d = devices.value(i);
                if last != Some(d) {
                    self.0.touch(b.stream.tenant(), d, now);
                    last = Some(d);
                }
            }
        }
        Vec::new()
    }
}

impl Plugin for DevicePlugin {
    fn name(&self) -> &'static str {
        "device"
    }

    fn start<'a>(&'a self, context: &'a PluginContext) -> BoxFuture<'a, std::result::Result<(), PluginError>> {
        Box::pin(async move {
            let failed = |e: Error| PluginError { plugin: "device", message: e.to_string() };
            let store = store::Store::open(&self.store_url, &context.data_dir.join("device")).await.map_err(failed)?;
            let registry = Registry::open(
                store,
                context.credentials.clone(),
                context.publisher.clone(),
                context.events.clone(),
                context.data.clone(),
                context.metrics.clone(),
            )
            .await
            .map_err(failed)?;
            let observer = Arc::new(Observer(registry.clone()));
            context.publisher.observe_presence(observer.clone());
            context.subscribe(observer);
            context.tables.add(Arc::new(table::DevicesTable(registry.clone())));
            let r = registry.clone();
            *self.flusher.lock() = Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(SEEN_FLUSH);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = r.flush_seen().await {
                        tracing::warn!(error = %e, "cannot record when devices were last seen");
                    }
                }
            }));
            tracing::info!(devices = registry.len(), store = registry.store().backend(), "device registry loaded");
            let _ = self.registry.set(registry);
            Ok(())
        })
    }

    fn routes(&self) -> Routes {
        match self.registry.get() {
            Some(r) => Routes { public: http::public_routes(r.clone()), protected: http::protected_routes(r.clone()) },
            None => Routes::default(),
        }
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(f) = self.flusher.lock().take() {
                f.abort();
            }
            if let Some(r) = self.registry.get() {
                if let Err(e) = r.flush_seen().await {
                    tracing::warn!(error = %e, "cannot record when devices were last seen");
                }
                r.store().close().await;
            }
        })
    }
}

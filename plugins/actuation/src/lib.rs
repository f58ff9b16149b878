//! Ferrite's actuation plugin: the bridge from an HTTP call (or a rule) to an MQTT message
//! to one device, behind safety limits. A device type declares its commands, each
//! parameter's type and bounds, and a rate; with the standard management commands and the
//! device's management level they decide what reaches a device. Commands are durable,
//! delivered at QoS 1 when the device's session subscribes, correlated with its answers,
//! and expire; every step is a row of the `commands` stream.

pub mod command;
pub mod error;
pub mod http;
pub mod jobs;
pub mod ota;
pub mod service;
pub mod store;
pub mod twin;
pub mod types;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferrite_device::Registry;
use ferrite_engine::plugin::{PluginContext, Presence, PresenceObserver, topic_matches};
use ferrite_plugin::{BoxFuture, Plugin, PluginError, Routes};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

pub use error::{Error, Result};
pub use service::{Actuation, CommandRequest};

/// How often expired commands are looked for.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// The actuation plugin.
pub struct ActuationPlugin {
    store_url: String,
    artifacts: Option<Arc<dyn object_store::ObjectStore>>,
    registry: Arc<OnceLock<Arc<Registry>>>,
    actuation: Arc<OnceLock<Arc<Actuation>>>,
    routes: OnceLock<http::Services>,
    expiry: Mutex<Option<JoinHandle<()>>>,
}

impl ActuationPlugin {
    /// The plugin over the device plugin's registry (started before it), storing at
    /// `store_url` (or SQLite under its directory).
    pub fn new(store_url: &str, registry: Arc<OnceLock<Arc<Registry>>>) -> Self {
        Self {
            store_url: store_url.to_owned(),
            artifacts: None,
            registry,
            actuation: Arc::new(OnceLock::new()),
            routes: OnceLock::new(),
            expiry: Mutex::new(None),
        }
    }

    /// Stores OTA artifacts in `store` (the archive's object store); without it they go
    /// under the plugin's own directory.
    pub fn with_artifacts(mut self, store: Arc<dyn object_store::ObjectStore>) -> Self {
        self.artifacts = Some(store);
        self
    }

    /// The service, once started (for the rules' command path).
    pub fn handle(&self) -> Arc<OnceLock<Arc<Actuation>>> {
        self.actuation.clone()
    }
}

/// A device subscribing to its commands gets what waits for it; to its desired state, the
/// current one.
struct Flusher(Arc<Actuation>, Arc<twin::Twins>);

impl PresenceObserver for Flusher {
    fn connected(&self, _: &Presence) {}

    fn subscribed(&self, session: &Presence, filter: &str) {
        // The session's own device, and the gateway's children it subscribes for.
        let children = session.principal.children.iter().map(String::as_str);
        for device in std::iter::once(session.device()).chain(children) {
            if topic_matches(&format!("devices/{device}/commands"), filter) {
                self.0.flush(device);
            }
            if topic_matches(&format!("devices/{device}/shadow/desired"), filter) {
                self.1.subscribed(device);
            }
        }
    }

    fn disconnected(&self, _: &Presence, _: &'static str) {}
}

impl Plugin for ActuationPlugin {
    fn name(&self) -> &'static str {
        "actuation"
    }

    fn start<'a>(&'a self, context: &'a PluginContext) -> BoxFuture<'a, std::result::Result<(), PluginError>> {
        Box::pin(async move {
            let failed = |m: String| PluginError { plugin: "actuation", message: m };
            let registry =
                self.registry.get().cloned().ok_or_else(|| failed("the device plugin must start first".into()))?;
            let store = store::Store::open(&self.store_url, &context.data_dir.join("actuation"))
                .await
                .map_err(|e| failed(e.to_string()))?;
            let twins = twin::Twins::open(
                store.clone(),
                registry.clone(),
                context.publisher.clone(),
                context.events.clone(),
                context.metrics.clone(),
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
            let a = Actuation::open(
                store,
                context.credentials.clone(),
                registry.clone(),
                context.publisher.clone(),
                context.events.clone(),
                context.access.clone(),
                context.metrics.clone(),
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
            context.publisher.observe_presence(Arc::new(Flusher(a.clone(), twins.clone())));
            let reports = twins.clone();
            context.publisher.subscribe_internal(
                "devices/+/shadow/reported",
                Arc::new(move |topic: &str, payload: &[u8]| reports.reported(topic, payload)),
            );
            let answers = a.clone();
            context.publisher.subscribe_internal(
                "devices/+/commands/result",
                Arc::new(move |topic: &str, payload: &[u8]| answers.answer(topic, payload)),
            );
            let objects: Arc<dyn object_store::ObjectStore> = match &self.artifacts {
                Some(s) => s.clone(),
                None => {
                    let dir = context.data_dir.join("actuation");
                    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
                    Arc::new(
                        object_store::local::LocalFileSystem::new_with_prefix(&dir)
                            .map_err(|e| failed(e.to_string()))?,
                    )
                }
            };
            let ota = ota::Ota::open(
                a.store().pool().clone(),
                objects,
                a.clone(),
                registry.clone(),
                ferrite_plugin::EventLog::new(context.events.clone(), context.metrics.clone()),
                context.metrics.clone(),
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
            let progress = ota.clone();
            context.publisher.subscribe_internal(
                "devices/+/ota/status",
                Arc::new(move |topic: &str, payload: &[u8]| progress.reported(topic, payload)),
            );
            let expiring = a.clone();
            *self.expiry.lock() = Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(EXPIRY_TICK);
                loop {
                    tick.tick().await;
                    expiring.expire();
                }
            }));
            let _ = self.routes.set(http::Services {
                actuation: a.clone(),
                twins,
                jobs: Arc::new(jobs::Jobs::default()),
                ota,
                registry,
                queries: context.queries.clone(),
            });
            let _ = self.actuation.set(a);
            Ok(())
        })
    }

    fn routes(&self) -> Routes {
        match self.routes.get() {
            Some(s) => Routes { public: Default::default(), protected: http::protected_routes(s.clone()) },
            None => Routes::default(),
        }
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(e) = self.expiry.lock().take() {
                e.abort();
            }
            if let Some(a) = self.actuation.get() {
                a.store().close().await;
            }
        })
    }
}

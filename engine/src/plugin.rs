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

/// Publishes a message to MQTT subscribers (a command to a device, desired state).
pub trait TopicPublisher: Send + Sync {
    /// Publishes `payload` on `topic`; returns how many subscribers it reached.
    fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> Result<usize, String>;
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

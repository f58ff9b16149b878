//! A plugin's own streams (`device_status`, `commands`, `device_twin`, ...): one event at a
//! time, written in the background so that callers on any thread (the engine's shards
//! included) never wait for the commit.

use std::sync::Arc;

use ferrite_engine::Metrics;
use ferrite_engine::plugin::EventWriter;

/// Appends events to a plugin's streams.
#[derive(Clone)]
pub struct EventLog {
    runtime: tokio::runtime::Handle,
    events: Arc<dyn EventWriter>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventLog")
    }
}

impl EventLog {
    /// A log over `events`. Made inside the runtime (plugins make it when they start); it
    /// runs its writes there whatever thread appends.
    pub fn new(events: Arc<dyn EventWriter>, metrics: Arc<Metrics>) -> Self {
        Self { runtime: tokio::runtime::Handle::current(), events, metrics }
    }

    /// The runtime the log writes on, for the plugin's other background work.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Appends `row` (a JSON object naming its `device_id`) to `stream` of `tenant`. A write
    /// that fails is counted in `dropped_metric` and logged; nothing waits for it.
    pub fn append(&self, tenant: &str, stream: &'static str, row: &serde_json::Value, dropped_metric: &'static str) {
        let mut line = row.to_string().into_bytes();
        line.push(b'\n');
        let write = self.events.write(tenant, stream, line);
        let metrics = self.metrics.clone();
        self.runtime.spawn(async move {
            if let Err(e) = write.await {
                metrics.inc(dropped_metric, &[], 1);
                tracing::warn!(stream, error = %e, "cannot write a plugin event");
            }
        });
    }
}

//! The device twin: desired state (set through the API, versioned, pushed to the device on
//! every change and whenever it subscribes) and reported state (from
//! `devices/{id}/shadow/reported`); the delta between them; every change a row of the
//! `device_twin` stream.

use std::collections::HashMap;
use std::sync::Arc;

use ferrite_device::Registry;
use ferrite_device::model::Level;
use ferrite_engine::Metrics;
use ferrite_engine::plugin::{EventWriter, TopicPublisher};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::service::now_ms;
use crate::store::Store;

/// The stream of twin changes.
pub const TWIN_STREAM: &str = "device_twin";
/// Largest desired or reported state, as JSON bytes.
pub const MAX_STATE_BYTES: usize = 64 * 1024;

/// A twin as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TwinView {
    /// What the platform wants.
    #[schema(value_type = Object)]
    pub desired: Map<String, Value>,
    /// What the device last reported.
    #[schema(value_type = Object)]
    pub reported: Map<String, Value>,
    /// The desired keys whose reported value differs (what the device still has to do).
    #[schema(value_type = Object)]
    pub delta: Map<String, Value>,
    /// The desired state's version.
    pub version: i64,
    /// The version of the last report.
    pub reported_version: i64,
}

/// One device's twin.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Twin {
    /// What the platform wants.
    pub desired: Map<String, Value>,
    /// Its version: every change of `desired` increments it.
    pub version: i64,
    /// What the device last reported.
    pub reported: Map<String, Value>,
    /// The version of the last report (the device's own, or a count).
    pub reported_version: i64,
}

impl Twin {
    /// The desired keys whose reported value differs (what the device still has to do).
    pub fn delta(&self) -> Map<String, Value> {
        self.desired
            .iter()
            .filter(|(k, v)| self.reported.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The API's view: `{"desired", "reported", "delta", "version", "reported_version"}`.
    pub fn view(&self) -> TwinView {
        TwinView {
            desired: self.desired.clone(),
            reported: self.reported.clone(),
            delta: self.delta(),
            version: self.version,
            reported_version: self.reported_version,
        }
    }

    /// What the device receives on `devices/{id}/shadow/desired`.
    pub fn desired_message(&self) -> Vec<u8> {
        serde_json::json!({"version": self.version, "state": self.desired}).to_string().into_bytes()
    }
}

/// JSON merge patch (RFC 7396) of `patch` into `target`: `null` removes a key, objects merge.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => match target.get_mut(k) {
                Some(Value::Object(t)) => merge(t, p),
                _ => {
                    let mut t = Map::new();
                    merge(&mut t, p);
                    target.insert(k.clone(), Value::Object(t));
                }
            },
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

fn size_check(what: &str, state: &Map<String, Value>) -> Result<()> {
    let size = serde_json::to_vec(state).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > MAX_STATE_BYTES {
        return Err(Error::Limit(format!("{what} state is {size} bytes, over {MAX_STATE_BYTES}")));
    }
    Ok(())
}

/// Every device's twin.
pub struct Twins {
    store: Store,
    registry: Arc<Registry>,
    publisher: Arc<dyn TopicPublisher>,
    /// The `device_twin` stream; its runtime runs deliveries and store writes.
    log: ferrite_plugin::EventLog,
    metrics: Arc<Metrics>,
    twins: Mutex<HashMap<String, Twin>>,
}

impl std::fmt::Debug for Twins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twins").field("twins", &self.twins.lock().len()).finish()
    }
}

impl Twins {
    /// Loads every twin from `store`.
    pub async fn open(
        store: Store,
        registry: Arc<Registry>,
        publisher: Arc<dyn TopicPublisher>,
        events: Arc<dyn EventWriter>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let twins = store.twins().await?.into_iter().collect();
        let log = ferrite_plugin::EventLog::new(events, metrics.clone());
        Ok(Arc::new(Self { store, registry, publisher, log, metrics, twins: Mutex::new(twins) }))
    }

    /// The twin of device `id` of `tenant`.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Twin> {
        self.registry.get(tenant, id).map_err(|e| Error::NotFound(e.to_string()))?;
        Ok(self.twins.lock().get(id).cloned().unwrap_or_default())
    }

    /// Merges `patch` into the desired state of device `id` of `tenant`. With `expected`,
    /// the change applies only to that version (else: refused with the current one). The new
    /// desired state is pushed to the device.
    pub async fn set_desired(
        &self,
        tenant: &str,
        id: &str,
        patch: &Map<String, Value>,
        expected: Option<i64>,
    ) -> Result<Twin> {
        let device = self.registry.get(tenant, id).map_err(|e| Error::NotFound(e.to_string()))?;
        if device.level == Level::None {
            return Err(Error::Limit(format!("device {id:?} is not managed: it takes no desired state")));
        }
        let twin = {
            let mut twins = self.twins.lock();
            let twin = twins.entry(id.to_owned()).or_default();
            if let Some(v) = expected
                && v != twin.version
            {
                return Err(Error::Stale(format!(
                    "the twin of {id:?} is at version {}, not {v}: read it again and retry",
                    twin.version
                )));
            }
            let mut next = twin.clone();
            merge(&mut next.desired, patch);
            size_check("desired", &next.desired)?;
            next.version += 1;
            *twin = next.clone();
            next
        };
        self.store.put_twin(id, &twin, now_ms()).await?;
        self.event(tenant, id, "desired", twin.version, &twin.desired);
        self.push(id, &twin);
        Ok(twin)
    }

    /// Sends the desired state to the device, when it is subscribed to it.
    pub fn push(&self, id: &str, twin: &Twin) {
        if twin.version == 0 {
            return;
        }
        let topic = format!("devices/{id}/shadow/desired");
        if let Ok(acked) = self.publisher.deliver(id, &topic, &twin.desired_message()) {
            self.log.runtime().spawn(async move {
                let _ = acked.await;
            });
        }
    }

    /// The device subscribed to its desired state: it gets the current one.
    pub fn subscribed(&self, id: &str) {
        let twin = self.twins.lock().get(id).cloned();
        if let Some(t) = twin {
            self.push(id, &t);
        }
    }

    /// A report on `devices/{id}/shadow/reported`: `{"version"?, "state": {...}}` (or the
    /// state object alone), merged into the reported state. A report older than the last
    /// one (a lower `version`) is refused and counted.
    pub fn reported(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        let id = topic.split('/').nth(1).unwrap_or_default().to_owned();
        let refuse = |reason: &'static str, detail: String| {
            self.metrics.inc("ferrite_twin_reports_refused_total", &[("reason", reason)], 1);
            tracing::warn!(device = %id, reason, "{detail}");
        };
        let Some(device) = self.registry.lookup(&id) else {
            return refuse("unknown_device", "a reported state from a device the registry does not hold".into());
        };
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(payload) else {
            return refuse("malformed", "a reported state that is not a JSON object".into());
        };
        let version = body.get("version").and_then(Value::as_i64);
        let state = match body.remove("state") {
            Some(Value::Object(s)) => s,
            Some(_) => return refuse("malformed", "`state` is not an object".into()),
            None => {
                body.remove("version");
                body
            }
        };
        let twin = {
            let mut twins = self.twins.lock();
            let twin = twins.entry(id.clone()).or_default();
            if let Some(v) = version
                && v < twin.reported_version
            {
                drop(twins);
                return refuse(
                    "stale",
                    format!("a report of version {v}, older than the last ({})", version.unwrap_or(0)),
                );
            }
            let mut next = twin.clone();
            merge(&mut next.reported, &state);
            if size_check("reported", &next.reported).is_err() {
                drop(twins);
                return refuse("too_large", "a reported state over the limit".into());
            }
            next.reported_version = version.unwrap_or(twin.reported_version + 1);
            *twin = next.clone();
            next
        };
        self.event(&device.tenant, &id, "reported", twin.reported_version, &twin.reported);
        let me = self.clone();
        self.log.runtime().spawn(async move {
            if let Err(e) = me.store.put_twin(&id, &twin, now_ms()).await {
                tracing::error!(error = %e, device = %id, "cannot store a reported state");
            }
        });
    }

    fn event(&self, tenant: &str, id: &str, side: &str, version: i64, state: &Map<String, Value>) {
        let row = serde_json::json!({
            "device_id": id,
            "ts": now_ms(),
            "side": side,
            "version": version,
            "state": Value::Object(state.clone()).to_string(),
        });
        self.log.append(tenant, TWIN_STREAM, &row, "ferrite_twin_events_dropped_total");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_and_delta() {
        let mut desired =
            serde_json::json!({"a": 1, "net": {"ssid": "x", "psk": "y"}}).as_object().cloned().unwrap_or_default();
        let patch = serde_json::json!({"a": null, "b": true, "net": {"psk": null, "channel": 6}});
        merge(&mut desired, patch.as_object().unwrap_or(&Map::new()));
        assert_eq!(Value::Object(desired.clone()), serde_json::json!({"b": true, "net": {"ssid": "x", "channel": 6}}));
        let twin = Twin {
            desired,
            version: 2,
            reported: serde_json::json!({"b": true, "net": {"ssid": "x"}}).as_object().cloned().unwrap_or_default(),
            reported_version: 1,
        };
        assert_eq!(Value::Object(twin.delta()), serde_json::json!({"net": {"ssid": "x", "channel": 6}}));
        assert_eq!(twin.view().version, 2);
    }
}

//! The node's health: named conditions that degrade it (persists failing, WAL commits
//! failing, the hot buffer past its hard bound), shown by `/healthz`, and the overload flag
//! that the doors consult before they accept more data.
//!
//! Storage raises and clears the conditions; ingest waits on [`Health::wait_admitted`]
//! while the node is overloaded and refuses once the wait is over (HTTP 503 with
//! `Retry-After`, MQTT withholds its acknowledgement).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Health conditions and the overload flag of one node.
pub struct Health {
    conditions: Mutex<BTreeMap<&'static str, String>>,
    /// Fast path: whether `conditions` is non-empty (read on every commit).
    any: AtomicBool,
    overloaded: watch::Sender<bool>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("conditions", &*self.conditions.lock()).finish()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self { conditions: Mutex::default(), any: AtomicBool::new(false), overloaded: watch::channel(false).0 }
    }
}

impl Health {
    /// A healthy node.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises (or updates) the condition `component` with a reason a person can act on.
    pub fn degrade(&self, component: &'static str, reason: impl Into<String>) {
        let mut c = self.conditions.lock();
        c.insert(component, reason.into());
        self.any.store(true, Ordering::Release);
    }

    /// Clears the condition `component`, if raised.
    pub fn recover(&self, component: &'static str) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut c = self.conditions.lock();
        c.remove(component);
        self.any.store(!c.is_empty(), Ordering::Release);
    }

    /// The raised conditions, by component.
    pub fn conditions(&self) -> Vec<(String, String)> {
        self.conditions.lock().iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    /// Whether no condition is raised.
    pub fn is_ok(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    /// Sets the overload flag (storage, when the hot buffer passes its hard bound).
    pub fn set_overloaded(&self, on: bool) {
        self.overloaded.send_if_modified(|v| {
            let changed = *v != on;
            *v = on;
            changed
        });
    }

    /// Whether the doors should hold back new data.
    pub fn overloaded(&self) -> bool {
        *self.overloaded.borrow()
    }

    /// Waits up to `max` for the overload to end; `true` when data may be admitted.
    pub async fn wait_admitted(&self, max: Duration) -> bool {
        if !self.overloaded() {
            return true;
        }
        let mut rx = self.overloaded.subscribe();
        matches!(tokio::time::timeout(max, rx.wait_for(|on| !*on)).await, Ok(Ok(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_raise_and_clear() {
        let h = Health::new();
        assert!(h.is_ok());
        h.degrade("persist", "object store unreachable");
        h.degrade("wal", "disk full");
        assert!(!h.is_ok());
        h.recover("persist");
        assert_eq!(h.conditions(), vec![("wal".to_owned(), "disk full".to_owned())]);
        h.recover("wal");
        assert!(h.is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn admission_waits_for_the_overload_to_end() {
        let h = std::sync::Arc::new(Health::new());
        assert!(h.wait_admitted(Duration::ZERO).await);
        h.set_overloaded(true);
        assert!(!h.wait_admitted(Duration::from_millis(1)).await, "still overloaded: refused after the wait");
        let waiter = {
            let h = h.clone();
            tokio::spawn(async move { h.wait_admitted(Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        h.set_overloaded(false);
        assert!(waiter.await.unwrap_or(false), "admitted as soon as the overload ended");
    }
}

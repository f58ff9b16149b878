//! The node's health: named conditions that degrade it (persists failing, WAL commits
//! failing, the hot buffer past its hard bound), shown by `/healthz`, and the overload flag
//! that the doors consult before they accept more data.
//!
//! Storage raises and clears the conditions; ingest waits on [`Health::wait_admitted`]
//! while the node is overloaded and refuses once the wait is over (HTTP 503 with
//! `Retry-After`, MQTT withholds its acknowledgement). Between the hot buffer's soft and hard
//! bounds, storage sets a pressure by which the doors that can ask clients to come back shed
//! a growing share of requests ([`Health::shed`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Health conditions and the overload flag of one node.
pub struct Health {
    conditions: Mutex<BTreeMap<&'static str, String>>,
    /// Fast path: whether `conditions` is non-empty (read on every commit).
    any: AtomicBool,
    overloaded: watch::Sender<bool>,
    /// How far the hot buffer is between its soft bound (0) and its hard bound (1,000), in
    /// thousandths; see [`Health::shed`].
    pressure: AtomicU32,
    /// Counts the requests [`Health::shed`] looks at, to spread its refusals evenly.
    shed_turn: AtomicU32,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("conditions", &*self.conditions.lock()).finish()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self {
            conditions: Mutex::default(),
            any: AtomicBool::new(false),
            overloaded: watch::channel(false).0,
            pressure: AtomicU32::new(0),
            shed_turn: AtomicU32::new(0),
        }
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

    /// Sets how far the hot buffer is past its soft bound towards its hard bound, in
    /// thousandths (clamped to 0..=1000); storage calls it as the buffer grows and shrinks.
    pub fn set_pressure(&self, permille: u32) {
        self.pressure.store(permille.min(1000), Ordering::Relaxed);
    }

    /// How far the hot buffer is past its soft bound towards its hard bound (0..=1000).
    pub fn pressure(&self) -> u32 {
        self.pressure.load(Ordering::Relaxed)
    }

    /// Whether to refuse this request to slow intake while persists catch up: as many
    /// requests in a thousand as the [`Health::pressure`] (none below the soft bound, all at
    /// the hard bound), spread evenly over the requests rather than in bursts. Requests that
    /// can be told to come back (HTTP, CoAP) are shed this way long before the hard bound
    /// stops every door.
    pub fn shed(&self) -> bool {
        let p = self.pressure();
        if p == 0 {
            return false;
        }
        // 617 is prime to 1,000: consecutive turns visit every residue once per thousand.
        let turn = self.shed_turn.fetch_add(1, Ordering::Relaxed) % 1000;
        (turn * 617) % 1000 < p
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
    fn shedding_follows_the_pressure_evenly() {
        let h = Health::new();
        assert!((0..1000).all(|_| !h.shed()), "nothing is shed below the soft bound");
        h.set_pressure(250);
        let shed: Vec<bool> = (0..1000).map(|_| h.shed()).collect();
        assert_eq!(shed.iter().filter(|s| **s).count(), 250);
        let first_hundred = shed[..100].iter().filter(|s| **s).count();
        assert!((20..=30).contains(&first_hundred), "spread evenly, not in a burst: {first_hundred} of 100");
        h.set_pressure(5000);
        assert_eq!(h.pressure(), 1000, "clamped");
        assert!((0..1000).all(|_| h.shed()), "everything at the hard bound");
    }

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

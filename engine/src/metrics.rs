//! A small metrics registry rendered in the Prometheus text format.
//!
//! Counters and histograms are looked up by name and labels once per batch (never per
//! event) and updated with relaxed atomics.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 15] =
    [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (sizes of state).
#[derive(Debug, Default)]
pub struct Gauge(std::sync::atomic::AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

type Key = (&'static str, Vec<(&'static str, String)>);

/// The process-wide registry of counters and histograms. Lookups format the series name
/// into a reused thread-local buffer, so a hit allocates nothing.
#[derive(Default)]
pub struct Metrics {
    counters: RwLock<HashMap<String, (Key, Arc<Counter>)>>,
    gauges: RwLock<HashMap<String, (Key, Arc<Gauge>)>>,
    histograms: RwLock<HashMap<String, (Key, Arc<Histogram>)>>,
}

thread_local! {
    static SERIES: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Looks `name{labels}` up in `map`, creating the entry on first use.
fn lookup<T: Default>(
    map: &RwLock<HashMap<String, (Key, Arc<T>)>>,
    name: &'static str,
    labels: &[(&'static str, &str)],
) -> Arc<T> {
    SERIES.with(|buf| {
        let mut b = buf.borrow_mut();
        b.clear();
        b.push_str(name);
        for (k, v) in labels {
            let _ = write!(b, "\u{1}{k}\u{2}{v}");
        }
        if let Some((_, v)) = map.read().get(b.as_str()) {
            return v.clone();
        }
        map.write().entry(b.clone()).or_insert_with(|| (key(name, labels), Arc::default())).1.clone()
    })
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Help text of every metric Ferrite exports.
fn help(name: &str) -> &'static str {
    match name {
        "ferrite_ingested_events_total" => "Events accepted, by stream and transport.",
        "ferrite_ingested_bytes_total" => "Payload bytes accepted, by stream and transport.",
        "ferrite_rejected_events_total" => "Events rejected, by transport and reason.",
        "ferrite_batches_total" => "Batches committed by the engine shards.",
        "ferrite_wal_commit_seconds" => "Latency of a WAL group commit (write and fsync).",
        "ferrite_wal_bytes_total" => "Bytes appended to the write-ahead log.",
        "ferrite_persist_seconds" => "Latency of persisting one stream's hot data to Parquet.",
        "ferrite_persisted_rows_total" => "Rows written to the Parquet archive.",
        "ferrite_persisted_bytes_total" => "Parquet bytes written to the archive.",
        "ferrite_queries_total" => "SQL queries answered, by outcome.",
        "ferrite_query_seconds" => "Latency of SQL queries.",
        "ferrite_mqtt_connections_total" => "MQTT connections accepted.",
        "ferrite_mqtt_messages_total" => "MQTT PUBLISH packets received, by QoS.",
        "ferrite_rule_events_in_total" => "Events a rule read, by rule.",
        "ferrite_rule_events_out_total" => "Rows a rule emitted, by rule.",
        "ferrite_rule_matches_total" => "Pattern matches and window results that passed `having`, by rule.",
        "ferrite_rule_late_events_total" => "Events a rule sent to the late side stream, by rule.",
        "ferrite_rule_evicted_total" => "Partial matches or windows dropped at a rule's state limit, by rule.",
        "ferrite_rule_errors_total" => "Batches a rule failed to process, by rule.",
        "ferrite_rule_state_size" => "Open windows or partial matches of a rule, by rule and shard.",
        "ferrite_rule_seconds" => "Time a rule spends on one batch, by rule.",
        _ => "Ferrite metric.",
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    (name, labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect())
}

impl Metrics {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter `name` with `labels`, created at zero if new.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Arc<Counter> {
        lookup(&self.counters, name, labels)
    }

    /// Adds `n` to the counter `name` with `labels`.
    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        self.counter(name, labels).add(n);
    }

    /// The gauge `name` with `labels`, created at zero if new.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Arc<Gauge> {
        lookup(&self.gauges, name, labels)
    }

    /// The histogram `name` with `labels`, created empty if new.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Arc<Histogram> {
        lookup(&self.histograms, name, labels)
    }

    /// Current value of a counter (0 if it does not exist); for tests and the API.
    pub fn counter_value(&self, name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
        let k = key(name, labels);
        self.counters.read().values().find(|(key, _)| *key == k).map(|(_, c)| c.get()).unwrap_or(0)
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut last = "";
        let counters: BTreeMap<Key, Arc<Counter>> = self.counters.read().values().cloned().collect();
        let histograms: BTreeMap<Key, Arc<Histogram>> = self.histograms.read().values().cloned().collect();
        for ((name, labels), c) in counters.iter() {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", help(name));
                last = name;
            }
            let _ = writeln!(out, "{name}{} {}", render_labels(labels, None), c.get());
        }
        last = "";
        let gauges: BTreeMap<Key, Arc<Gauge>> = self.gauges.read().values().cloned().collect();
        for ((name, labels), g) in gauges.iter() {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} gauge", help(name));
                last = name;
            }
            let _ = writeln!(out, "{name}{} {}", render_labels(labels, None), g.get());
        }
        last = "";
        for ((name, labels), h) in histograms.iter() {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", help(name));
                last = name;
            }
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                let v = h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{} {v}", render_labels(labels, Some(&bound.to_string())));
            }
            let count = h.count();
            let _ = writeln!(out, "{name}_bucket{} {count}", render_labels(labels, Some("+Inf")));
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{} {sum}", render_labels(labels, None));
            let _ = writeln!(out, "{name}_count{} {count}", render_labels(labels, None));
        }
        out
    }
}

fn render_labels(labels: &[(&'static str, String)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut s = String::from("{");
    let mut first = true;
    for (k, v) in labels.iter().map(|(k, v)| (*k, v.as_str())).chain(le.map(|le| ("le", le))) {
        if !first {
            s.push(',');
        }
        first = false;
        let escaped = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{escaped}\"");
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.inc("ferrite_ingested_events_total", &[("stream", "t"), ("transport", "http")], 3);
        m.histogram("ferrite_wal_commit_seconds", &[]).observe(Duration::from_millis(2));
        let text = m.render();
        assert!(text.contains("ferrite_ingested_events_total{stream=\"t\",transport=\"http\"} 3"));
        assert!(text.contains("# TYPE ferrite_wal_commit_seconds histogram"));
        assert!(text.contains("ferrite_wal_commit_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(text.contains("ferrite_wal_commit_seconds_count 1"));
    }
}

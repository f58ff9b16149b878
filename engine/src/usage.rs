//! API usage as data: every HTTP API call and every MQTT session becomes a row of its
//! tenant's `api_usage` stream (who, which door and route, the outcome, latency, bytes in
//! and out), so that API analytics and alerts ("a client's error rate passed 5%") run on
//! the engine like any other telemetry.
//!
//! Recording never waits: records go to a bounded queue, and a background task writes them
//! in batches (every [`LINGER`], or sooner when 4,096 are waiting), one NDJSON
//! write per tenant; when the queue is full a record is dropped and
//! counted in `ferrite_api_usage_dropped_total`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::Metrics;
use crate::plugin::EventWriter;

/// The stream every tenant's usage rows go to.
pub const USAGE_STREAM: &str = "api_usage";

/// Records queued for the writer at most; past it records are dropped (and counted).
pub const USAGE_QUEUE: usize = 65_536;

/// How long the writer gathers records before writing them: usage costs the write path a
/// few commits a second however busy the API is; a crash loses at most this much of it.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// One API call or MQTT session.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// When the call or session started.
    pub at: std::time::SystemTime,
    /// The caller's tenant.
    pub tenant: Arc<str>,
    /// The caller (a device, user or service id; `anonymous` without identity).
    pub principal: Arc<str>,
    /// `http`, `https`, `mqtt`, `mqtts` or `ws`.
    pub transport: &'static str,
    /// `ingest`, `query`, `management` for HTTP; `session` for MQTT.
    pub class: &'static str,
    /// The route template (`/api/v1/streams/{stream}/events`) or, for MQTT, the client id.
    pub route: String,
    /// The HTTP method, or `CONNECT` for an MQTT session.
    pub method: &'static str,
    /// The HTTP status; for an MQTT session 200 when it ended by DISCONNECT or shutdown,
    /// 499 when the client vanished or its keep-alive expired, 500 on a protocol error.
    pub status: u16,
    /// How the session ended (MQTT), empty for HTTP.
    pub reason: &'static str,
    /// Time to the response head (HTTP), or the session's length (MQTT), in milliseconds.
    pub latency_ms: f64,
    /// Request body bytes (HTTP, as declared), or bytes read (MQTT).
    pub bytes_in: u64,
    /// Response body bytes (HTTP, when known), or bytes written (MQTT).
    pub bytes_out: u64,
    /// PUBLISH packets received (MQTT), 0 for HTTP.
    pub messages: u64,
}

impl UsageRecord {
    fn to_json(&self) -> serde_json::Value {
        let at_ms = self.at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        serde_json::json!({
            "ts": at_ms,
            "device_id": &*self.principal,
            "transport": self.transport,
            "class": self.class,
            "route": self.route,
            "method": self.method,
            "status": self.status,
            "reason": self.reason,
            "latency_ms": self.latency_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "messages": self.messages,
        })
    }
}

/// Where the doors hand their records.
#[derive(Debug, Clone)]
pub struct UsageLog {
    tx: Option<mpsc::Sender<UsageRecord>>,
    metrics: Arc<Metrics>,
}

impl UsageLog {
    /// A log that records nothing (usage off).
    pub fn off(metrics: Arc<Metrics>) -> Self {
        Self { tx: None, metrics }
    }

    /// Starts the writer on the current runtime; it writes through `writer` until
    /// [`UsageWriter::finish`] (or until every handle of the log is dropped), then writes
    /// what is queued and ends.
    pub fn start(writer: Arc<dyn EventWriter>, metrics: Arc<Metrics>) -> (Self, UsageWriter) {
        let (tx, rx) = mpsc::channel(USAGE_QUEUE);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(rx, stopped, writer, metrics.clone()));
        (Self { tx: Some(tx), metrics }, UsageWriter { task, stop })
    }

    /// Whether records are kept at all.
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues `record`; never waits.
    pub fn record(&self, record: UsageRecord) {
        if let Some(tx) = &self.tx
            && tx.try_send(record).is_err()
        {
            self.metrics.inc("ferrite_api_usage_dropped_total", &[], 1);
        }
    }
}

/// The background writer of a [`UsageLog`].
#[derive(Debug)]
pub struct UsageWriter {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl UsageWriter {
    /// Stops taking records, writes those queued, and returns once they are written.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    mut rx: mpsc::Receiver<UsageRecord>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    writer: Arc<dyn EventWriter>,
    metrics: Arc<Metrics>,
) {
    const BATCH: usize = 4096;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let next = tokio::select! {
            r = rx.recv() => r,
            _ = stop.changed() => {
                // No more records: what is queued is still received, then `None`.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = next else { return };
        batch.push(first);
        // Gather for up to LINGER: a few commits a second for usage, however busy the API.
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => batch.push(r),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
                _ = stop.changed() => {
                    rx.close();
                    while batch.len() < BATCH && let Ok(r) = rx.try_recv() {
                        batch.push(r);
                    }
                    break;
                }
            }
        }
        let mut by_tenant: BTreeMap<Arc<str>, Vec<u8>> = BTreeMap::new();
        for r in batch.drain(..) {
            let ndjson = by_tenant.entry(r.tenant.clone()).or_default();
            let _ = serde_json::to_writer(&mut *ndjson, &r.to_json());
            ndjson.push(b'\n');
        }
        for (tenant, ndjson) in by_tenant {
            if let Err(e) = writer.write(&tenant, USAGE_STREAM, ndjson).await {
                metrics.inc("ferrite_api_usage_dropped_total", &[], 1);
                tracing::warn!(tenant = &*tenant, error = %e, "cannot write api_usage rows");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(parking_lot::Mutex<Vec<(String, String, String)>>);

    impl EventWriter for Collect {
        fn write(&self, tenant: &str, stream: &str, ndjson: Vec<u8>) -> crate::plugin::WriteFuture {
            self.0.lock().push((tenant.to_owned(), stream.to_owned(), String::from_utf8_lossy(&ndjson).into_owned()));
            Box::pin(async { Ok(()) })
        }
    }

    fn record(tenant: &str, status: u16) -> UsageRecord {
        UsageRecord {
            at: std::time::SystemTime::now(),
            tenant: tenant.into(),
            principal: "svc-1".into(),
            transport: "http",
            class: "query",
            route: "/api/v1/sql".into(),
            method: "POST",
            status,
            reason: "",
            latency_ms: 1.5,
            bytes_in: 20,
            bytes_out: 100,
            messages: 0,
        }
    }

    #[tokio::test]
    async fn records_are_written_per_tenant_and_the_writer_drains_at_the_end() -> Result<(), String> {
        let sink = Arc::new(Collect(parking_lot::Mutex::new(Vec::new())));
        let metrics = Arc::new(Metrics::new());
        let (log, writer) = UsageLog::start(sink.clone(), metrics.clone());
        log.record(record("acme", 200));
        log.record(record("acme", 429));
        log.record(record("globex", 500));
        // The log is still held (as the listeners hold it): finish drains it anyway.
        writer.finish().await;
        log.record(record("acme", 201));
        assert!(metrics.render().contains("ferrite_api_usage_dropped_total 1"), "a record after the end is dropped");
        let writes = sink.0.lock().clone();
        let rows: usize = writes.iter().map(|(_, _, n)| n.lines().count()).sum();
        assert_eq!(rows, 3);
        assert!(writes.iter().all(|(_, s, _)| s == USAGE_STREAM));
        let acme: Vec<serde_json::Value> = writes
            .iter()
            .filter(|(t, _, _)| t == "acme")
            .flat_map(|(_, _, n)| n.lines().filter_map(|l| serde_json::from_str(l).ok()).collect::<Vec<_>>())
            .collect();
        assert_eq!(acme.len(), 2);
        assert_eq!(acme[1]["status"], 429);
        assert_eq!(acme[0]["device_id"], "svc-1");
        assert_eq!(acme[0]["route"], "/api/v1/sql");
        Ok(())
    }

    #[test]
    fn a_log_that_is_off_records_nothing_and_costs_nothing() {
        let log = UsageLog::off(Arc::new(Metrics::new()));
        assert!(!log.is_on());
        log.record(record("acme", 200));
    }
}

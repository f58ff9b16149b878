//! Overload: far more clients than the server keeps up with, over HTTP and MQTT QoS 1 at
//! once. Back-pressure must reach the clients (HTTP 503 `busy` with `Retry-After` once a
//! request found no room within `ingest_max_wait`; MQTT publishers throttled by the
//! server reading their sockets slower), resident memory must stay under the bound the
//! configuration implies, everything acknowledged must be stored exactly once and nothing
//! refused stored at all, and the server must admit a request again once the load drops.
//!
//! CI floods for 6 s; `FERRITE_OVERLOAD_SECS` makes it longer. The figures for ten times the
//! sustainable rate for a minute come from `benches/src/bin/overload.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::harness::{Server, TIMEOUT};

const HTTP_CLIENTS: u64 = 24;
const EVENTS_PER_REQUEST: u64 = 1_000;
const MQTT_CLIENTS: u64 = 3;
const EVENTS_PER_MESSAGE: u64 = 50;
/// Payloads in flight, and how long a request waits for room: small, so that 24 clients
/// sending back to back are far past what the server admits.
const IN_FLIGHT: usize = 4;
const MAX_WAIT_MS: u64 = 200;
const HOT_MAX_MIB: u64 = 16;

/// Resident memory of `pid` (`VmRSS`) or its peak (`VmHWM`), in MiB.
fn memory_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// What the clients saw: acknowledged ids (as ranges) and the refusals.
#[derive(Default)]
struct Tally {
    /// (first id, count) of every acknowledged request or message.
    acked: Mutex<Vec<(u64, u64)>>,
    busy: AtomicU64,
    /// Refusals without `Retry-After`, or with another code than `busy`/`overloaded`.
    malformed_refusals: Mutex<Vec<String>>,
    /// Answers that are neither a 2xx nor a 503.
    unexpected: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Tally {
    fn ack(&self, first: u64, n: u64) {
        if let Ok(mut a) = self.acked.lock() {
            a.push((first, n));
        }
    }
}

fn ndjson(first: u64, n: u64) -> String {
    let mut body = String::with_capacity(n as usize * 80);
    for id in first..first + n {
        body.push_str(
            &json!({"device_id": format!("ol-{}", id % 64), "ts": 1_767_225_600_000i64 + (id % 3_600_000) as i64, "id": id, "v": 1.5})
                .to_string(),
        );
        body.push('\n');
    }
    body
}

/// One HTTP client posting back to back; each request's events have fresh ids, and a
/// refused request is not sent again (its events must not be stored).
fn http_client(server: &Server, tally: &Tally, client: u64) {
    let agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(TIMEOUT)).build().new_agent();
    let mut next = client * 1_000_000_000;
    while !tally.stop.load(Ordering::SeqCst) {
        let first = next;
        next += EVENTS_PER_REQUEST;
        let sent = agent
            .post(&server.url("/api/v1/streams/telemetry/events"))
            .header("Authorization", &server.bearer())
            .header("Content-Type", "application/x-ndjson")
            .send(ndjson(first, EVENTS_PER_REQUEST));
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => {
                if let Ok(mut u) = tally.unexpected.lock() {
                    u.push(format!("transport error: {e}"));
                }
                continue;
            }
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.body_mut().read_to_string().unwrap_or_default();
        match status {
            200 => tally.ack(first, EVENTS_PER_REQUEST),
            503 => {
                let code = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                if code == "busy" && retry_after.as_deref() == Some("1") {
                    tally.busy.fetch_add(1, Ordering::Relaxed);
                } else if !(code == "overloaded" && retry_after.is_some())
                    && let Ok(mut m) = tally.malformed_refusals.lock()
                {
                    m.push(format!("503 code {code:?} retry-after {retry_after:?}: {body}"));
                }
            }
            _ => {
                if let Ok(mut u) = tally.unexpected.lock() {
                    u.push(format!("{status}: {body}"));
                }
            }
        }
    }
}

/// One MQTT QoS 1 client publishing as fast as its window of 20 unacknowledged messages and
/// the server's reading allow; after the stop, waits for every PUBACK still owed.
fn mqtt_client(server: &Server, tally: &Tally, client: u64) -> anyhow::Result<()> {
    use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
    let name = format!("ol-mqtt-{client}");
    let mut opts = MqttOptions::new(&name, server.mqtt.ip().to_string(), server.mqtt.port());
    opts.set_credentials("admin", server.token.clone());
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(20);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (mqtt, mut connection) = Client::new(opts, 10);
    // Ranges in the order they were handed to the client, then by packet id once written.
    let queued: Arc<Mutex<VecDeque<(u64, u64)>>> = Arc::default();
    let done_publishing = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let topic = format!("devices/{name}/telemetry");
        let poller = {
            let queued = queued.clone();
            let done_publishing = done_publishing.clone();
            scope.spawn(move || -> anyhow::Result<()> {
                let mut written: HashMap<u16, (u64, u64)> = HashMap::new();
                loop {
                    let settled = done_publishing.load(Ordering::SeqCst)
                        && written.is_empty()
                        && queued.lock().map(|q| q.is_empty()).unwrap_or(true);
                    if settled {
                        return Ok(());
                    }
                    match connection.recv_timeout(TIMEOUT) {
                        Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                            let range =
                                queued.lock().ok().and_then(|mut q| q.pop_front()).context("unknown publish")?;
                            written.insert(pkid, range);
                        }
                        Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                            let (first, n) = written.remove(&ack.pkid).context("PUBACK for an unknown packet")?;
                            tally.ack(first, n);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => anyhow::bail!("{name}: connection failed: {e}"),
                        Err(_) => anyhow::bail!("{name}: no event for {TIMEOUT:?} ({} PUBACKs owed)", written.len()),
                    }
                }
            })
        };
        let mut next = (100 + client) * 1_000_000_000;
        while !tally.stop.load(Ordering::SeqCst) {
            let first = next;
            next += EVENTS_PER_MESSAGE;
            let events: Vec<serde_json::Value> = (first..first + EVENTS_PER_MESSAGE)
                .map(|id| json!({"ts": 1_767_225_600_000i64 + (id % 3_600_000) as i64, "id": id, "v": 2.5}))
                .collect();
            queued.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push_back((first, EVENTS_PER_MESSAGE));
            // Blocks while the client's queue is full: the throttling reaches the publisher.
            mqtt.publish(&topic, QoS::AtLeastOnce, false, serde_json::to_vec(&events)?)?;
        }
        done_publishing.store(true, Ordering::SeqCst);
        let polled = poller.join().map_err(|_| anyhow::anyhow!("poller panicked"))?;
        let _ = mqtt.disconnect();
        polled
    })
}

#[test]
fn overload_pushes_back_loses_nothing_and_recovers() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("FERRITE_OVERLOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let dir = tempfile::tempdir()?;
    let in_flight = IN_FLIGHT.to_string();
    let wait = format!("{MAX_WAIT_MS}ms");
    let hot = format!("{HOT_MAX_MIB}MiB");
    let server = Server::start(
        dir.path(),
        &[
            "--shards",
            "2",
            "--ingest-max-in-flight",
            &in_flight,
            "--ingest-max-wait",
            &wait,
            "--hot-buffer-max",
            &hot,
            "--persist-interval",
            "1s",
        ],
    )?;
    let pid = server.pid().context("no server process")?;
    // One request first, so that the stream exists and its schema is settled.
    let tally = Tally::default();
    let (status, v) =
        server.post("/api/v1/streams/telemetry/events", "application/x-ndjson", ndjson(1, 1).as_bytes())?;
    anyhow::ensure!(status == 200, "first write: {status} {v}");
    tally.ack(1, 1);
    let baseline = memory_mib(pid, "VmRSS")?;

    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut mqtt = Vec::new();
        for c in 0..HTTP_CLIENTS {
            let (server, tally) = (&server, &tally);
            scope.spawn(move || http_client(server, tally, c + 1));
        }
        for c in 0..MQTT_CLIENTS {
            let (server, tally) = (&server, &tally);
            mqtt.push(scope.spawn(move || mqtt_client(server, tally, c)));
        }
        // The load's length, not a synchronisation: the clients run until told to stop.
        std::thread::sleep(Duration::from_secs(secs));
        tally.stop.store(true, Ordering::SeqCst);
        for m in mqtt {
            m.join().map_err(|_| anyhow::anyhow!("an MQTT client panicked"))??;
        }
        Ok(())
    })?;
    let flood = started.elapsed();
    let peak = memory_mib(pid, "VmHWM")?;

    // Back-pressure reached the HTTP clients as refusals that say when to retry.
    let unexpected = tally.unexpected.lock().map(|u| u.clone()).unwrap_or_default();
    anyhow::ensure!(
        unexpected.is_empty(),
        "answers other than 200 and 503: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
    let malformed = tally.malformed_refusals.lock().map(|u| u.clone()).unwrap_or_default();
    anyhow::ensure!(
        malformed.is_empty(),
        "503s without a code and Retry-After: {:?}",
        &malformed[..malformed.len().min(5)]
    );
    let busy = tally.busy.load(Ordering::Relaxed);
    anyhow::ensure!(busy > 0, "{HTTP_CLIENTS} clients sending back to back got no 503 busy in {flood:?}");
    anyhow::ensure!(
        server.metric("ferrite_rejected_events_total{transport=\"http\",reason=\"busy\"}")? >= busy,
        "the refusals are counted"
    );

    // The server admits a request again once the load is gone.
    server.wait_for("a request admitted after the flood", |s| {
        let (status, _) =
            s.post("/api/v1/streams/telemetry/events", "application/x-ndjson", ndjson(7, 1).as_bytes())?;
        Ok(status == 200)
    })?;
    tally.ack(7, 1);

    // Memory: the hot buffer's hard bound, the bodies in flight, and room for the decoded
    // batches queued to the shards and the allocator's slack. Without the admission before
    // the body is read, every waiting client's body would be held too.
    let bound = (2 * HOT_MAX_MIB) as f64 + IN_FLIGHT as f64 + 192.0;
    anyhow::ensure!(
        peak - baseline <= bound,
        "resident memory grew from {baseline:.0} MiB to a peak of {peak:.0} MiB, more than the {bound:.0} MiB bound"
    );

    // Everything acknowledged is stored once, and nothing else (refused requests' ids never).
    let acked = tally.acked.lock().map(|a| a.clone()).unwrap_or_default();
    let count: u64 = acked.iter().map(|(_, n)| n).sum();
    // Ids stay under 2^37 and events under 10^6: their sum fits an i64 exactly.
    let sum: u64 = acked.iter().map(|&(first, n)| (first..first + n).sum::<u64>()).sum();
    let row = server.sql("select count(*) as n, count(distinct id) as d, sum(id) as s from telemetry")?;
    let row = row.first().context("no answer")?;
    let stored = row["n"].as_u64().context("count")?;
    let distinct = row["d"].as_u64().context("distinct")?;
    let stored_sum = row["s"].as_u64().context("sum")?;
    eprintln!(
        "overload: {flood:?} of {HTTP_CLIENTS} HTTP + {MQTT_CLIENTS} MQTT clients; {count} events acknowledged, {busy} \
         requests refused busy; memory {baseline:.0} MiB before, peak {peak:.0} MiB"
    );
    anyhow::ensure!(distinct == stored, "{} events stored twice", stored - distinct);
    anyhow::ensure!(stored == count, "{count} events acknowledged, {stored} stored");
    anyhow::ensure!(stored_sum == sum, "the stored ids are not the acknowledged ones");
    Ok(())
}

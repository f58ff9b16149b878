//! The crash loop: SIGKILLs at random moments of a mixed load (HTTP and MQTT QoS 1 ingest,
//! a windowed rule inserting into a derived stream, persists with their checkpoints and
//! compactions every few hundred milliseconds, SQL queries). After the last restart every
//! acknowledged event is in SQL exactly once, and the rule's derived stream equals that of
//! a clean run over the same events.
//!
//! CI runs 5 kills; `FERRITE_CRASH_KILLS=20` (as `scripts/crash_loop.sh` sets it) is the
//! longer run before a release. `FERRITE_CRASH_SEED` replays a run's kill moments.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};

/// Per-device tumbling windows of ten minutes of event time over events one minute apart;
/// `max_delay` 30 s keeps a device's windows from closing by the wall clock during a
/// restart (that would need 90 s of silence), so that each window's content depends on the
/// events alone. The declared fields create the stream when the file is deployed (before
/// any client connects), so the rule sees every event from the first.
const RULES: &str = "stream telemetry { max_delay 30s  field id int  field v float }

rule sums {
    from telemetry[v is not null]
    window tumbling 10m by device_id
    select device_id, count(*) as n, sum(v) as total, min(id) as first_id, max(id) as last_id
    insert into sums
}
";

/// Event time of step 0: 2026-01-01T00:00:00Z, in milliseconds.
const BASE_MS: i64 = 1_767_225_600_000;
const STEP_MS: i64 = 60_000;
const HTTP_DEVICES: u64 = 6;
const MQTT_DEVICES: u64 = 3;
/// The step of the event that closes every window at the end.
const FLUSH_STEP: u64 = 900_000;

fn device(d: u64) -> String {
    format!("crash-{d}")
}

/// An event is known by its id alone: device and step are in it, and so are its time and
/// value (quarters, so that sums are exact in any order).
fn event(d: u64, step: u64) -> Value {
    let id = d * 1_000_000 + step;
    json!({"device_id": device(d), "ts": BASE_MS + step as i64 * STEP_MS, "id": id, "v": (id % 97) as f64 / 4.0})
}

fn flags(rules: &Path) -> Vec<String> {
    [
        "--shards",
        "2",
        "--persist-interval",
        "200ms",
        "--compaction-interval",
        "300ms",
        "--compact-after",
        "0s",
        "--retired-grace",
        "0s",
        "--rules-dir",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([rules.display().to_string()])
    .collect()
}

/// A running server's HTTP and MQTT addresses and admin token.
type Addresses = (SocketAddr, SocketAddr, String);

/// Where the server is now, and what the clients got acknowledged.
#[derive(Default)]
struct Shared {
    /// (generation, its addresses); `None` while the server is down.
    server: Mutex<(u64, Option<Addresses>)>,
    up: Condvar,
    acked: Mutex<Vec<u64>>,
    more: Condvar,
    stop: AtomicBool,
}

impl Shared {
    /// The running server, waiting while it is down; `None` once stopping.
    fn current(&self) -> Option<(u64, SocketAddr, SocketAddr, String)> {
        let mut s = self.server.lock().ok()?;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            if let (generation, Some((http, mqtt, token))) = &*s {
                return Some((*generation, *http, *mqtt, token.clone()));
            }
            s = self.up.wait_timeout(s, Duration::from_millis(200)).ok()?.0;
        }
    }

    /// Waits until the server of `generation` is gone (after a failed request).
    fn wait_past(&self, generation: u64) {
        let Ok(mut s) = self.server.lock() else { return };
        while s.0 == generation && s.1.is_some() && !self.stop.load(Ordering::SeqCst) {
            match self.up.wait_timeout(s, Duration::from_millis(200)) {
                Ok((g, _)) => s = g,
                Err(_) => return,
            }
        }
    }

    fn ack(&self, ids: &[u64]) {
        if let Ok(mut a) = self.acked.lock() {
            a.extend_from_slice(ids);
            self.more.notify_all();
        }
    }

    fn set(&self, server: Option<&Server>) {
        if let Ok(mut s) = self.server.lock() {
            s.0 += 1;
            s.1 = server.map(|x| (x.http, x.mqtt, x.token.clone()));
            self.up.notify_all();
        }
    }
}

/// An HTTP client that gives up on a dead server within seconds.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

/// HTTP: one request per step with an event of each HTTP device; a 2xx acknowledges them.
fn http_client(shared: &Shared) {
    let agent = agent();
    for step in 0.. {
        let Some((generation, http, _, token)) = shared.current() else { return };
        let events: Vec<Value> = (0..HTTP_DEVICES).map(|d| event(d, step)).collect();
        let ids: Vec<u64> = events.iter().filter_map(|e| e["id"].as_u64()).collect();
        let sent = agent
            .post(&format!("http://{http}/api/v1/streams/telemetry/events"))
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(Value::Array(events).to_string());
        match sent {
            Ok(r) if r.status().is_success() => shared.ack(&ids),
            // Not acknowledged (the server died mid-request, or refused): not sent again.
            _ => shared.wait_past(generation),
        }
    }
}

/// MQTT QoS 1: one device's events one at a time; a PUBACK acknowledges one.
fn mqtt_client(shared: &Shared, d: u64) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut step = 0;
    while let Some((generation, _, mqtt, token)) = shared.current() {
        let mut opts = MqttOptions::new(device(d), mqtt.ip().to_string(), mqtt.port());
        opts.set_credentials("admin", token);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(opts, 10);
        'session: loop {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let e = event(d, step);
            step += 1;
            let id = e["id"].as_u64().unwrap_or_default();
            let topic = format!("devices/{}/telemetry", device(d));
            if client.publish(topic, QoS::AtLeastOnce, false, e.to_string()).is_err() {
                break 'session;
            }
            loop {
                match conn.recv_timeout(Duration::from_secs(10)) {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        shared.ack(&[id]);
                        continue 'session;
                    }
                    Ok(Ok(_)) => {}
                    // Connection lost or no answer: this event is not acknowledged.
                    _ => break 'session,
                }
            }
        }
        drop(client);
        shared.wait_past(generation);
    }
}

/// A reader beside the writers: SQL answers (or the errors of a server going down) never
/// disturb the rest.
fn sql_client(shared: &Shared) {
    let agent = agent();
    let queries = ["SELECT count(*) FROM telemetry", "SELECT device_id, sum(n) FROM sums GROUP BY device_id"];
    for k in 0.. {
        let Some((generation, http, _, token)) = shared.current() else { return };
        let sent = agent
            .post(&format!("http://{http}/api/v1/sql"))
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(json!({"sql": queries[k % queries.len()]}).to_string());
        if sent.is_err() {
            shared.wait_past(generation);
        }
    }
}

/// A small deterministic generator for the kill moments.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The derived rows, as comparable tuples.
fn sums(s: &Server) -> anyhow::Result<BTreeMap<(String, String), Vec<String>>> {
    let rows = s.sql("SELECT device_id, CAST(time AS VARCHAR) AS t, n, total, first_id, last_id FROM sums")?;
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in rows {
        let key =
            (r["device_id"].as_str().unwrap_or_default().to_owned(), r["t"].as_str().unwrap_or_default().to_owned());
        let value = format!("n={} total={} ids={}..{}", r["n"], r["total"], r["first_id"], r["last_id"]);
        out.entry(key).or_default().push(value);
    }
    Ok(out)
}

/// Sends the event that closes every window of every device, then waits until the rule
/// has emitted a row for each (device, window) of `telemetry`.
fn flush_windows(s: &Server, label: &str) -> anyhow::Result<()> {
    let devices = HTTP_DEVICES + MQTT_DEVICES;
    let flush: Vec<Value> = (0..devices).map(|d| event(d, FLUSH_STEP)).collect();
    let (status, body) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(flush))?;
    anyhow::ensure!(status == 200, "flush events: {status} {body}");
    let windows = s.sql_count(&format!(
        "SELECT count(*) FROM (SELECT DISTINCT device_id, date_bin(INTERVAL '10 minutes', time) \
         FROM telemetry WHERE id % 1000000 < {FLUSH_STEP})"
    ))?;
    let derived = || s.sql_count(&format!("SELECT count(*) FROM sums WHERE last_id % 1000000 < {FLUSH_STEP}"));
    s.wait_for("a derived row for every window", |_| Ok(derived()? >= windows)).with_context(|| {
        let missing = s.sql(&format!(
            "SELECT device_id, CAST(w AS VARCHAR) AS w, n FROM (SELECT device_id, \
             date_bin(INTERVAL '10 minutes', time) + INTERVAL '10 minutes' AS w, count(*) AS n FROM telemetry \
             WHERE id % 1000000 < {FLUSH_STEP} GROUP BY 1, 2) t \
             WHERE NOT EXISTS (SELECT 1 FROM sums WHERE sums.device_id = t.device_id AND sums.time = t.w)"
        ));
        let first = s.sql(&format!("SELECT device_id, CAST(time AS VARCHAR) AS t, n, first_id, last_id FROM sums WHERE device_id = '{}' ORDER BY time LIMIT 3", device(HTTP_DEVICES)));
        let late = s.sql("SELECT count(*) AS n FROM telemetry_late");
        format!("{label}: {windows} windows in telemetry, {:?} derived rows; without one: {missing:?}; first rows of the first MQTT device: {first:?}; late: {late:?}", derived())
    })
}

#[test]
fn a_crash_loop_under_mixed_load_loses_and_duplicates_nothing_and_rules_match_a_clean_run() -> anyhow::Result<()> {
    let kills: usize = std::env::var("FERRITE_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let seed: u64 = std::env::var("FERRITE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("crash loop: {kills} kills, FERRITE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let rules = tempfile::tempdir()?;
    std::fs::write(rules.path().join("sums.rules"), RULES)?;
    let flags = flags(rules.path());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir()?;

    let shared = Arc::new(Shared::default());
    let mut server = Server::start(dir.path(), &flags)?;
    shared.set(Some(&server));
    let mut clients = Vec::new();
    {
        let sh = shared.clone();
        clients.push(std::thread::spawn(move || http_client(&sh)));
        let sh = shared.clone();
        clients.push(std::thread::spawn(move || sql_client(&sh)));
    }
    for d in HTTP_DEVICES..HTTP_DEVICES + MQTT_DEVICES {
        let sh = shared.clone();
        clients.push(std::thread::spawn(move || mqtt_client(&sh, d)));
    }
    let started = Instant::now();
    for kill in 0..kills {
        // The moment: after a random number of acknowledgements (now and then none, so
        // that a kill lands right after a restart's recovery).
        let wanted = if rng.below(5) == 0 { 0 } else { 20 + rng.below(300) as usize };
        {
            let acked = shared.acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let target = acked.len() + wanted;
            let deadline = Instant::now() + TIMEOUT;
            let mut acked = acked;
            while acked.len() < target {
                anyhow::ensure!(Instant::now() < deadline, "kill {kill}: no progress ({} acknowledged)", acked.len());
                acked = shared
                    .more
                    .wait_timeout(acked, Duration::from_millis(200))
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .0;
            }
        }
        shared.set(None);
        server.kill()?;
        server = Server::start(dir.path(), &flags)?;
        shared.set(Some(&server));
    }
    // A little more load on the last server, then the clients stop.
    {
        let acked = shared.acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let target = acked.len() + 100;
        let mut acked = acked;
        while acked.len() < target {
            acked =
                shared.more.wait_timeout(acked, Duration::from_millis(200)).map_err(|_| anyhow::anyhow!("poisoned"))?.0;
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    shared.up.notify_all();
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    let acked: BTreeSet<u64> = shared.acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.iter().copied().collect();
    eprintln!("crash loop: {} events acknowledged across {kills} kills in {:?}", acked.len(), started.elapsed());

    // Every acknowledged event exactly once (and no event of any kind twice).
    let stored: Vec<u64> = server.sql("SELECT id FROM telemetry")?.iter().filter_map(|r| r["id"].as_u64()).collect();
    let unique: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored.len(), unique.len(), "an event is stored twice");
    let missing: Vec<&u64> = acked.difference(&unique).collect();
    assert!(missing.is_empty(), "acknowledged events missing after the crash loop: {missing:?}");

    // The derived stream against a clean run over the same events.
    flush_windows(&server, "crash loop")?;
    let crashed = sums(&server)?;
    let twice: Vec<_> = crashed.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "windows emitted more than once: {twice:?}");
    server.stop()?;

    let clean_dir = tempfile::tempdir()?;
    let clean = Server::start(clean_dir.path(), &flags)?;
    let mut in_order: Vec<u64> = unique.iter().copied().collect();
    in_order.sort_by_key(|id| (id % 1_000_000, id / 1_000_000));
    for chunk in in_order.chunks(500) {
        let events: Vec<Value> = chunk.iter().map(|id| event(id / 1_000_000, id % 1_000_000)).collect();
        let (status, body) = clean.post_json("/api/v1/streams/telemetry/events", &Value::Array(events))?;
        anyhow::ensure!(status == 200, "clean run: {status} {body}");
    }
    flush_windows(&clean, "clean run")?;
    let reference = sums(&clean)?;
    let windows = reference.len();
    anyhow::ensure!(windows > 0, "the clean run derived nothing");
    let differ: Vec<String> = reference
        .keys()
        .chain(crashed.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| reference.get(*k) != crashed.get(*k))
        .map(|k| format!("{k:?}: clean {:?}, crash loop {:?}", reference.get(k), crashed.get(k)))
        .collect();
    assert!(differ.is_empty(), "derived rows differ from a clean run ({} windows):\n{}", windows, differ.join("\n"));
    eprintln!("crash loop: {} events stored, {windows} derived windows equal to the clean run's", unique.len());
    clean.stop().context("stopping the clean run")?;
    Ok(())
}

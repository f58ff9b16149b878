//! Latency from ingest to a window's emitted row, under load: a release `ferrite serve`
//! runs a tumbling one-second window per device over every event, and a 100 ms one over
//! each client's probe device that publishes its row on MQTT (ten windows a second per
//! client, so that p99 rests on hundreds of samples). Event time advances with the wall
//! clock (the load events carry no `ts`, so the server stamps them on arrival; the probe
//! events carry the client's send time), so every device's windows close and emit all
//! through the run.
//!
//! A window `[s, s+100ms)` of a probe device closes when the first probe event at or after
//! its end is committed; the latency reported is from just before the POST carrying that
//! closing event to the moment the window's row arrives at an MQTT subscriber: HTTP,
//! decode, WAL group commit with fsync, the window operator, the broker. Each client thread
//! has its own probe device and sends sequentially, so the closing event of a window is the
//! probe right after the window's last one. Reports p50, p99 and max.
//!
//! `cargo run --release -p ferrite-benches --bin rules_latency -- [events_per_s] [seconds] [threads]`

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrite_benches::readings;
use ferrite_benches::server::Ferrite;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const RULES: &str = "
rule load { from readings window tumbling 1s by device_id select device_id, window_end, avg(velocity) as v, count(*) as n insert into load_out }
rule probe_windows {
    from readings[probe is not null]
    window tumbling 100ms by device_id
    select device_id, max(probe) as last, count(*) as n
    then publish 'windows/{device_id}' {\"last\": \"{last}\"}
}
";

/// Send instants of probe events, by (thread, sequence number).
type Sent = Arc<Mutex<HashMap<(usize, u64), Instant>>>;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The load part of every request: 1,000 readings of 100 devices, without `ts`.
fn load_events() -> Result<String, String> {
    let mut rows: Vec<serde_json::Value> =
        readings(1000, 100).iter().map(serde_json::to_value).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    for r in &mut rows {
        if let Some(o) = r.as_object_mut() {
            o.remove("ts");
        }
    }
    let text = serde_json::to_string(&rows).map_err(|e| e.to_string())?;
    Ok(text[1..text.len() - 1].to_owned()) // the elements, to splice after the probe
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let rate: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(400_000.0);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-latency-{}", std::process::id()));
    let server = Ferrite::start(&dir, &[])?;
    let base = format!("http://{}", server.http);
    let agent = ureq::Agent::config_builder().http_status_as_error(true).build().new_agent();
    let load = Arc::new(load_events()?);
    // Create the stream and its columns, then deploy the rules.
    let first = format!(r#"[{{"device_id":"probe-setup","probe":0}},{load}]"#);
    agent.post(&format!("{base}/api/v1/streams/readings/events")).send(first.as_str()).map_err(|e| e.to_string())?;
    agent.post(&format!("{base}/api/v1/rules")).send(RULES).map_err(|e| format!("deploying the rules: {e}"))?;

    let sent: Sent = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let windows = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders_done = Arc::new(AtomicBool::new(false));
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel::<()>();
    let subscriber = {
        let (sent, latencies, senders_done, windows) =
            (sent.clone(), latencies.clone(), senders_done.clone(), windows.clone());
        let mqtt = server.mqtt;
        std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let mut opts = MqttOptions::new("latency-probe", mqtt.ip().to_string(), mqtt.port());
                opts.set_keep_alive(Duration::from_secs(30));
                let (client, mut ev) = AsyncClient::new(opts, 100);
                client.subscribe("windows/+", QoS::AtMostOnce).await.map_err(|e| e.to_string())?;
                let mut drain_until: Option<Instant> = None;
                loop {
                    if senders_done.load(Ordering::SeqCst) {
                        // Windows still open at the end close only with later events: wait
                        // briefly for the rows already on their way, then stop.
                        let until = *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                        if Instant::now() > until {
                            break;
                        }
                    }
                    match tokio::time::timeout(Duration::from_millis(100), ev.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            let _ = subscribed_tx.send(());
                        }
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            let now = Instant::now();
                            let Some(thread) =
                                p.topic.strip_prefix("windows/probe-").and_then(|t| t.parse::<usize>().ok())
                            else {
                                continue;
                            };
                            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                            let last = v["last"]
                                .as_f64()
                                .or_else(|| v["last"].as_str().and_then(|s| s.parse::<f64>().ok()))
                                .map(|f| f as u64);
                            let Some(last) = last else { continue };
                            windows.fetch_add(1, Ordering::Relaxed);
                            let mut m = sent.lock().map_err(|e| e.to_string())?;
                            if let Some(at) = m.remove(&(thread, last + 1)) {
                                latencies.lock().map_err(|e| e.to_string())?.push(now - at);
                            }
                            m.retain(|(t, seq), _| *t != thread || *seq > last + 1);
                        }
                        Ok(Ok(_)) | Err(_) => {}
                        Ok(Err(e)) => return Err(format!("mqtt: {e}")),
                    }
                }
                Ok(())
            })
        })
    };
    subscribed_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the subscriber did not get its SUBACK".to_owned())?;

    // Each thread sends its share of requests at a fixed pace; each starts with its probe.
    let events = Arc::new(AtomicU64::new(0));
    let per_thread = rate / 1001.0 / threads as f64;
    let interval = Duration::from_secs_f64(1.0 / per_thread);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (load, events, sent, stop) = (load.clone(), events.clone(), sent.clone(), stop.clone());
            let url = format!("{base}/api/v1/streams/readings/events");
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder().http_status_as_error(true).build().new_agent();
                let mut due = Instant::now();
                let mut seq = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    let payload =
                        format!(r#"[{{"device_id":"probe-{thread}","probe":{seq},"ts":{}}},{load}]"#, now_ms());
                    if let Ok(mut m) = sent.lock() {
                        m.insert((thread, seq), Instant::now());
                    }
                    if let Err(e) = agent.post(&url).header("Content-Type", "application/json").send(payload.as_str()) {
                        eprintln!("request failed: {e}");
                        return;
                    }
                    seq += 1;
                    events.fetch_add(1001, Ordering::Relaxed);
                    due += interval;
                    let now = Instant::now();
                    if due > now {
                        // Pacing: this is the offered load, not a wait for the server.
                        std::thread::sleep(due - now);
                    } else {
                        due = now; // behind: do not burst to catch up
                    }
                }
            })
        })
        .collect();
    // The run lasts `seconds` of wall time by definition.
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    senders_done.store(true, Ordering::SeqCst);
    let _ = subscriber.join();
    let mut l = latencies.lock().map_err(|e| e.to_string())?.clone();
    l.sort();
    let q = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let base_ureq = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let emitted = base_ureq
        .post(&format!("{base}/api/v1/sql"))
        .send(r#"{"sql": "SELECT count(*) AS n FROM load_out"}"#)
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v[0]["n"].as_u64())
        .unwrap_or(0);
    println!(
        "rules_latency target_events_per_s={rate:.0} achieved_events_per_s={:.0} probe_windows={} measured={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} load_windows_emitted={}",
        events.load(Ordering::Relaxed) as f64 / elapsed,
        windows.load(Ordering::Relaxed),
        l.len(),
        ms(q(0.50)),
        ms(q(0.99)),
        ms(l.last().copied().unwrap_or_default()),
        emitted
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

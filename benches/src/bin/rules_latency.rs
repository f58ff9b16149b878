//! Latency from ingest to rule output under load: a release `ferrite serve` runs a
//! tumbling-window rule over all events and a probe rule that publishes an MQTT message for
//! each probe event; clients POST batches of 1,000 readings (one of them a probe) at a fixed
//! rate, and an MQTT subscriber measures the time from just before each POST to the probe's
//! message: HTTP, decode, WAL group commit with fsync, the rules, the broker. Reports p50,
//! p99 and max at the given rate (run it at about half the maximum ingest rate measured by
//! `ingest_http`).
//!
//! `cargo run --release -p ferrite-benches --bin rules_latency -- [events_per_s] [seconds] [threads]`

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrite_benches::server::Ferrite;
use ferrite_benches::{json_array, readings};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const RULES: &str = "
rule probe { from readings[probe is not null] select device_id, probe then publish 'probe/out' {\"probe\": \"{probe}\"} }
rule load { from readings window tumbling 1m by device_id select device_id, avg(velocity) as v, count(*) as n insert into load_out }
";

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let rate: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(400_000.0);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-latency-{}", std::process::id()));
    let server = Ferrite::start(&dir, &[])?;
    let base = format!("http://{}", server.http);
    let agent = ureq::Agent::config_builder().http_status_as_error(true).build().new_agent();
    // Create the stream and its columns, then deploy the rules.
    let body = json_array(&readings(1000, 100));
    let first = br#"[{"device_id":"probe-dev","probe":0}]"#;
    agent.post(&format!("{base}/api/v1/streams/readings/events")).send(&first[..]).map_err(|e| e.to_string())?;
    agent.post(&format!("{base}/api/v1/streams/readings/events")).send(body.as_slice()).map_err(|e| e.to_string())?;
    agent.post(&format!("{base}/api/v1/rules")).send(RULES).map_err(|e| format!("deploying the rules: {e}"))?;

    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Set once every sender has finished: the subscriber then drains what is in flight.
    let senders_done = Arc::new(AtomicBool::new(false));
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel::<()>();
    let subscriber = {
        let (sent, latencies, senders_done) = (sent.clone(), latencies.clone(), senders_done.clone());
        let mqtt = server.mqtt;
        std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let mut opts = MqttOptions::new("latency-probe", mqtt.ip().to_string(), mqtt.port());
                opts.set_keep_alive(Duration::from_secs(30));
                let (client, mut ev) = AsyncClient::new(opts, 100);
                client.subscribe("probe/out", QoS::AtMostOnce).await.map_err(|e| e.to_string())?;
                let mut drain_until: Option<Instant> = None;
                loop {
                    if senders_done.load(Ordering::SeqCst) {
                        // Every probe answered, or the ones left are lost.
                        let until = *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
                        if sent.lock().map_err(|e| e.to_string())?.is_empty() || Instant::now() > until {
                            break;
                        }
                    }
                    match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            let _ = subscribed_tx.send(());
                        }
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            let now = Instant::now();
                            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                            if let Some(id) = v["probe"].as_f64().map(|f| f as u64)
                                && let Some(at) = sent.lock().map_err(|e| e.to_string())?.remove(&id)
                            {
                                latencies.lock().map_err(|e| e.to_string())?.push(now - at);
                            }
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

    // Each thread sends its share of batches at a fixed pace; each batch starts with a probe.
    let rest = Arc::new(body[1..].to_vec());
    let next_id = Arc::new(AtomicU64::new(1));
    let events = Arc::new(AtomicU64::new(0));
    let per_thread = rate / 1000.0 / threads as f64;
    let interval = Duration::from_secs_f64(1.0 / per_thread);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (rest, next_id, events, sent, stop) =
                (rest.clone(), next_id.clone(), events.clone(), sent.clone(), stop.clone());
            let url = format!("{base}/api/v1/streams/readings/events");
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder().http_status_as_error(true).build().new_agent();
                let mut due = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let mut payload = format!(r#"[{{"device_id":"probe-dev","probe":{id}}},"#).into_bytes();
                    payload.extend_from_slice(&rest);
                    if let Ok(mut m) = sent.lock() {
                        m.insert(id, Instant::now());
                    }
                    if let Err(e) = agent.post(&url).header("Content-Type", "application/json").send(payload.as_slice())
                    {
                        eprintln!("request failed: {e}");
                        return;
                    }
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
    println!(
        "rules_latency target_events_per_s={rate:.0} achieved_events_per_s={:.0} probes={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} lost={}",
        events.load(Ordering::Relaxed) as f64 / elapsed,
        l.len(),
        ms(q(0.50)),
        ms(q(0.99)),
        ms(l.last().copied().unwrap_or_default()),
        sent.lock().map_err(|e| e.to_string())?.len()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

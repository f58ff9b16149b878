//! End-to-end MQTT ingest, Ferrite (release `ferrite serve`) against mosquitto, the same
//! load and the same end point on both sides: `publishers` concurrent rumqttc clients each
//! publish `messages` single-event JSON messages on `devices/{id}/telemetry`.
//!
//! - `qos1`: QoS 1, no subscriber; over at the last PUBACK. Ferrite sends a PUBACK after
//!   the events are decoded and in the fsynced WAL, mosquitto after routing the message
//!   (to nobody): the same end point, not the same work.
//! - `fanout`: QoS 0, one subscriber on `devices/+/telemetry` at QoS 0; over when the
//!   subscriber has received every message, or has received nothing more for 2 s (then
//!   the messages it never got are reported as dropped, and the rate counts what arrived,
//!   up to the last arrival). Ferrite also decodes and commits every message.
//!
//! `cargo run --release -p ferrite-benches --bin ingest_mqtt -- [publishers] [messages]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrite_benches::load::{mqtt_options, publish_all};
use ferrite_benches::server::{Ferrite, Mosquitto, free_port};
use rumqttc::{AsyncClient, Event, Packet, QoS};

/// What one run measured.
struct Outcome {
    msgs_per_s: f64,
    dropped: u64,
}

/// Starts a QoS 0 subscriber on `devices/+/telemetry` and returns once it is subscribed:
/// the number of messages it has received and when the last one came.
async fn subscriber(
    port: u16,
) -> Result<(Arc<AtomicU64>, Arc<parking_lot::Mutex<Option<Instant>>>, tokio::task::JoinHandle<()>), String> {
    let received = Arc::new(AtomicU64::new(0));
    let last = Arc::new(parking_lot::Mutex::new(None));
    let mut opts = mqtt_options("subscriber".into(), port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut ev) = AsyncClient::new(opts, 100);
    sub.subscribe("devices/+/telemetry", QoS::AtMostOnce).await.map_err(|e| e.to_string())?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (counter, at) = (received.clone(), last.clone());
    let task = tokio::spawn(async move {
        let _keep = sub;
        let mut ready = Some(ready_tx);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    *at.lock() = Some(Instant::now());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready_rx.await.map_err(|_| "the subscriber never got its SUBACK".to_owned())?;
    Ok((received, last, task))
}

/// Runs one scenario against the broker on `port`.
async fn run(port: u16, publishers: usize, messages: usize, fanout: bool) -> Result<Outcome, String> {
    let total = (publishers * messages) as u64;
    if !fanout {
        let started = Instant::now();
        publish_all(port, publishers, messages, QoS::AtLeastOnce, Arc::new(AtomicU64::new(0)), &[]).await?;
        return Ok(Outcome { msgs_per_s: total as f64 / started.elapsed().as_secs_f64(), dropped: 0 });
    }
    let (received, last, task) = subscriber(port).await?;
    let started = Instant::now();
    publish_all(port, publishers, messages, QoS::AtMostOnce, Arc::new(AtomicU64::new(0)), &[]).await?;
    // Wait for the subscriber: all of it, or until nothing more has come for 2 s.
    let mut seen = (received.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = received.load(Ordering::Relaxed);
        if now >= total {
            break;
        }
        if now != seen.0 {
            seen = (now, Instant::now());
        } else if seen.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    let got = received.load(Ordering::Relaxed);
    let end = last.lock().unwrap_or_else(Instant::now);
    let secs = end.duration_since(started).as_secs_f64().max(1e-9);
    Ok(Outcome { msgs_per_s: got as f64 / secs, dropped: total - got })
}

async fn run_ferrite(publishers: usize, messages: usize, fanout: bool) -> Result<Outcome, String> {
    let dir = std::env::temp_dir().join(format!("ferrite-bench-mqtt-{}-{fanout}", std::process::id()));
    let server = Ferrite::start(&dir, &[])?;
    let outcome = run(server.mqtt.port(), publishers, messages, fanout).await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

async fn run_mosquitto(publishers: usize, messages: usize, fanout: bool) -> Result<Outcome, String> {
    let port = free_port()?;
    // Queues large enough that mosquitto drops nothing for the one subscriber.
    let conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"
    );
    let broker = Mosquitto::start(&std::env::temp_dir(), &conf, &[port])?;
    let outcome = run(port, publishers, messages, fanout).await;
    drop(broker);
    outcome
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let publishers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        for (name, fanout) in [("qos1_to_last_puback", false), ("fanout_qos0_to_subscriber", true)] {
            let f = run_ferrite(publishers, messages, fanout).await?;
            let m = run_mosquitto(publishers, messages, fanout).await?;
            println!(
                "mqtt_ingest scenario={name} publishers={publishers} messages={} ferrite_msgs_per_s={:.0} ferrite_dropped={} mosquitto_msgs_per_s={:.0} mosquitto_dropped={} ratio={:.2}",
                publishers * messages,
                f.msgs_per_s,
                f.dropped,
                m.msgs_per_s,
                m.dropped,
                f.msgs_per_s / m.msgs_per_s
            );
        }
        Ok(())
    })
}

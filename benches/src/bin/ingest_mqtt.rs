//! End-to-end MQTT ingest: `publishers` concurrent rumqttc clients each publish `messages`
//! single-event JSON messages on `devices/{id}/telemetry`, at QoS 0 and at QoS 1, to a
//! release `ferrite serve`, and, as the peer, to `mosquitto` relaying the same load to one
//! subscriber. Ferrite's run is complete when every event is committed (QoS 1: every
//! PUBACK, which Ferrite sends after the WAL fsync; QoS 0: the ingest counter reaches the
//! total); mosquitto's when its subscriber has received every message.
//!
//! `cargo run --release -p ferrite-benches --bin ingest_mqtt -- [publishers] [messages]`

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrite_benches::server::Ferrite;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn options(id: String, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(100);
    o
}

fn payload(i: usize) -> Vec<u8> {
    format!(
        r#"{{"ts":{},"temperature":{}.5,"humidity":{},"door":"open"}}"#,
        1_764_000_000_000i64 + i as i64,
        i % 40,
        i % 100
    )
    .into_bytes()
}

/// Publishes `messages` per publisher; returns when every client's last publish was sent
/// and, for QoS 1, acknowledged.
async fn publish_all(
    port: u16,
    publishers: usize,
    messages: usize,
    qos: QoS,
    acks: Arc<AtomicU64>,
) -> Result<(), String> {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (client, mut ev) = AsyncClient::new(options(format!("pub-{p}"), port), 1000);
        let acks = acks.clone();
        let poller = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("publisher {p}: {e}");
                        return;
                    }
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/dev-{p}/telemetry");
            for i in 0..messages {
                if client.publish(topic.as_str(), qos, false, payload(i)).await.is_err() {
                    break;
                }
            }
            (client, poller)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.map_err(|e| e.to_string())?);
    }
    if qos == QoS::AtLeastOnce {
        let total = (publishers * messages) as u64;
        while acks.load(Ordering::Relaxed) < total {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for (c, poller) in clients {
        let _ = c.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
    }
    Ok(())
}

async fn run_ferrite(publishers: usize, messages: usize, qos: QoS) -> Result<f64, String> {
    let dir = std::env::temp_dir().join(format!("ferrite-bench-mqtt-{}-{:?}", std::process::id(), qos));
    let server = Ferrite::start(&dir, &[])?;
    let total = (publishers * messages) as u64;
    let started = Instant::now();
    publish_all(server.mqtt.port(), publishers, messages, qos, Arc::new(AtomicU64::new(0))).await?;
    let series = "ferrite_ingested_events_total{stream=\"telemetry\",transport=\"mqtt\"}";
    while server.metric(series) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!("ferrite ingested {} of {total}", server.metric(series)));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(total as f64 / secs)
}

async fn run_mosquitto(publishers: usize, messages: usize, qos: QoS) -> Result<f64, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| e.to_string())?
        .local_addr()
        .map_err(|e| e.to_string())?
        .port();
    // Queues large enough that mosquitto drops nothing for the one subscriber.
    let conf = std::env::temp_dir().join(format!("ferrite-bench-mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"),
    )
    .map_err(|e| e.to_string())?;
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start mosquitto (apt-get install mosquitto): {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("mosquitto did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = (publishers * messages) as u64;
    let received = Arc::new(AtomicU64::new(0));
    let mut sub_opts = options("subscriber".into(), port);
    sub_opts.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_ev) = AsyncClient::new(sub_opts, 100);
    // The subscriber takes QoS 0 (delivery at min(publish, subscribe) QoS): the publishers'
    // QoS decides the broker's acknowledgement work, as in Ferrite's run.
    sub.subscribe("devices/+/telemetry", QoS::AtMostOnce).await.map_err(|e| e.to_string())?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let counter = received.clone();
    let sub_task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match sub_ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let _ = ready_rx.await;
    let started = Instant::now();
    publish_all(port, publishers, messages, qos, Arc::new(AtomicU64::new(0))).await?;
    while received.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if started.elapsed() > Duration::from_secs(300) {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    sub_task.abort();
    let _ = broker.kill();
    let _ = broker.wait();
    if got < total {
        return Err(format!("mosquitto relayed {got} of {total}"));
    }
    Ok(total as f64 / secs)
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let publishers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let q = if qos == QoS::AtMostOnce { 0 } else { 1 };
            let f = run_ferrite(publishers, messages, qos).await?;
            let m = run_mosquitto(publishers, messages, qos).await?;
            println!(
                "mqtt_ingest qos={q} publishers={publishers} messages={} ferrite_msgs_per_s={f:.0} mosquitto_relay_msgs_per_s={m:.0} ratio={:.2}",
                publishers * messages,
                f / m
            );
        }
        Ok(())
    })
}

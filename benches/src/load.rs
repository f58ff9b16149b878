//! The load generators the end-to-end scenarios share: MQTT publishers and HTTP posters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The client options every benchmark publisher uses.
pub fn mqtt_options(id: String, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(100);
    o
}

/// The `i`-th single-event JSON message of a publisher.
pub fn mqtt_payload(i: usize) -> Vec<u8> {
    format!(
        r#"{{"ts":{},"temperature":{}.5,"humidity":{},"door":"open"}}"#,
        1_764_000_000_000i64 + i as i64,
        i % 40,
        i % 100
    )
    .into_bytes()
}

/// `publishers` clients each publish `messages` messages on `devices/dev-{p}/telemetry`;
/// returns when every client's last publish was sent and, for QoS 1, acknowledged.
/// `credentials[p]`, when given, is publisher `p`'s MQTT username and password.
pub async fn publish_all(
    port: u16,
    publishers: usize,
    messages: usize,
    qos: QoS,
    acks: Arc<AtomicU64>,
    credentials: &[(String, String)],
) -> Result<(), String> {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let mut options = mqtt_options(format!("pub-{p}"), port);
        if let Some((user, password)) = credentials.get(p) {
            options.set_credentials(user.clone(), password.clone());
        }
        let (client, mut ev) = AsyncClient::new(options, 1000);
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
                if client.publish(topic.as_str(), qos, false, mqtt_payload(i)).await.is_err() {
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
            if clients.iter().all(|(_, poller)| poller.is_finished()) {
                return Err(format!(
                    "every publisher stopped after {} of {total} PUBACKs",
                    acks.load(Ordering::Relaxed)
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for (c, poller) in clients {
        let _ = c.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
    }
    Ok(())
}

/// `threads` clients POST `body` (of `content_type`) to `url` for `seconds` (with
/// `Authorization: {auth}` when given); `accepted` turns each answer into the events the server says it took (`None`
/// stops that client). Returns the events and the seconds.
pub fn http_load(
    url: &str,
    content_type: &'static str,
    body: Arc<Vec<u8>>,
    threads: usize,
    seconds: u64,
    auth: Option<String>,
    accepted: fn(u16, &str) -> Option<u64>,
) -> (u64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (body, stop, done, url, auth) =
                (body.clone(), stop.clone(), done.clone(), url.to_owned(), auth.clone());
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
                while !stop.load(Ordering::Relaxed) {
                    let mut req = agent.post(&url).header("Content-Type", content_type);
                    if let Some(a) = &auth {
                        req = req.header("Authorization", a);
                    }
                    match req.send(body.as_slice()) {
                        Ok(mut r) => {
                            let status = r.status().as_u16();
                            let text = r.body_mut().read_to_string().unwrap_or_default();
                            match accepted(status, &text) {
                                Some(n) => {
                                    done.fetch_add(n, Ordering::Relaxed);
                                }
                                None => {
                                    eprintln!("request answered {status}: {text}");
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            eprintln!("request failed: {e}");
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    // The load runs for a fixed duration: this sleep is the measurement window.
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    (done.load(Ordering::Relaxed), started.elapsed().as_secs_f64())
}

/// Events an ingest answer says the server accepted (a request carries 1,000 events);
/// `None` for an answer that is not a (possibly partial) success.
pub fn accepted(status: u16, body: &str) -> Option<u64> {
    let lines_in_request = 1000;
    match status {
        204 => Some(lines_in_request),
        200 | 400 => {
            let v: serde_json::Value = serde_json::from_str(body).ok()?;
            v.get("accepted").or_else(|| v.pointer("/error/details/accepted")).and_then(serde_json::Value::as_u64)
        }
        _ => None,
    }
}

//! The load generators the end-to-end scenarios share: MQTT publishers and HTTP posters.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet as RawPacket, Publish};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;

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

/// One raw MQTT 3.1.1 client: CONNECT (keep-alive 600 s), SUBSCRIBE `filter` at `qos`,
/// wait for the SUBACK; the open stream (the caller keeps it idle or reads from it).
pub async fn subscribed_client(
    addr: SocketAddr,
    client_id: String,
    filter: String,
    qos: rumqttc::mqttbytes::QoS,
) -> Result<tokio::net::TcpStream, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut out = BytesMut::new();
    let mut c = Connect::new(client_id.clone());
    c.keep_alive = 600;
    RawPacket::Connect(c).write(&mut out, 1 << 16).map_err(|e| e.to_string())?;
    let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(filter, qos);
    sub.pkid = 1;
    RawPacket::Subscribe(sub).write(&mut out, 1 << 16).map_err(|e| e.to_string())?;
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(64);
    loop {
        // Every packet already buffered (CONNACK and SUBACK often come in one read).
        loop {
            match RawPacket::read(&mut buf, 1 << 16) {
                Ok(RawPacket::SubAck(_)) => return Ok(s),
                Ok(RawPacket::ConnAck(a)) if a.code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success => {
                    return Err(format!("refused: {:?}", a.code));
                }
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        if s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("client {client_id}: closed before SUBACK"));
        }
    }
}

/// Messages a publisher may have without a PUBACK.
const WINDOW: usize = 100;

/// One raw MQTT 3.1.1 publisher: CONNECT, then `messages` QoS 1 PUBLISHes with at most 100 unacknowledged,
/// written in batches of whatever the window allows; returns at the last PUBACK.
pub async fn publish_qos1<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    id: usize,
    messages: usize,
    v5: bool,
) -> Result<(), String> {
    let topic = format!("devices/tls-{id}/telemetry");
    publish_qos1_with(stream, id, messages, v5, |i| (topic.clone(), mqtt_payload(i))).await
}

/// [`publish_qos1`] of the messages `next` makes (topic and payload of the i-th).
pub async fn publish_qos1_with<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    id: usize,
    messages: usize,
    v5: bool,
    next: impl FnMut(usize) -> (String, Vec<u8>),
) -> Result<(), String> {
    publish_qos1_window(stream, (id, WINDOW), messages, v5, next).await
}

/// [`publish_qos1_with`] with at most `window` messages waiting for their PUBACK (1: each
/// message waits for the previous one's, as a CoAP client's confirmable requests do).
pub async fn publish_qos1_window<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    (id, window): (usize, usize),
    messages: usize,
    v5: bool,
    mut next: impl FnMut(usize) -> (String, Vec<u8>),
) -> Result<(), String> {
    use rumqttc::v5::mqttbytes::v5 as m5;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut out = BytesMut::with_capacity(64 * 1024);
    if v5 {
        let connect =
            m5::Connect { keep_alive: 60, client_id: format!("tls-bench-{id}"), clean_start: true, properties: None };
        m5::Packet::Connect(connect, None, None).write(&mut out, None).map_err(|e| e.to_string())?;
    } else {
        let mut connect = Connect::new(format!("tls-bench-{id}"));
        connect.keep_alive = 60;
        RawPacket::Connect(connect).write(&mut out, 1 << 20).map_err(|e| e.to_string())?;
    }
    wr.write_all(&out).await.map_err(|e| e.to_string())?;
    wr.flush().await.map_err(|e| e.to_string())?;
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    loop {
        if v5 {
            match m5::Packet::read(&mut inbuf, None) {
                Ok(m5::Packet::ConnAck(c)) if c.code == m5::ConnectReturnCode::Success => break,
                Ok(p) => return Err(format!("refused: {p:?}")),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        } else {
            match RawPacket::read(&mut inbuf, 1 << 20) {
                Ok(RawPacket::ConnAck(c)) if c.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success => break,
                Ok(p) => return Err(format!("refused: {p:?}")),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if rd.read_buf(&mut inbuf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before CONNACK".into());
        }
    }
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < messages {
        if sent < messages && sent - acked < window {
            out.clear();
            while sent < messages && sent - acked < window {
                let pkid = (sent % 65_000 + 1) as u16;
                let (topic, payload) = next(sent);
                if v5 {
                    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                    let mut p = m5::Publish::new(topic.as_str(), qos, payload, None);
                    p.pkid = pkid;
                    p.write(&mut out).map_err(|e| e.to_string())?;
                } else {
                    let mut p = Publish::new(&topic, rumqttc::mqttbytes::QoS::AtLeastOnce, payload);
                    p.pkid = pkid;
                    RawPacket::Publish(p).write(&mut out, 1 << 20).map_err(|e| e.to_string())?;
                }
                sent += 1;
            }
            wr.write_all(&out).await.map_err(|e| e.to_string())?;
            wr.flush().await.map_err(|e| e.to_string())?;
        }
        if rd.read_buf(&mut inbuf).await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("closed after {acked} PUBACKs"));
        }
        loop {
            if v5 {
                match m5::Packet::read(&mut inbuf, None) {
                    // mosquitto answers "no matching subscribers" (0x10), a success too.
                    Ok(m5::Packet::PubAck(a))
                        if matches!(a.reason, m5::PubAckReason::Success | m5::PubAckReason::NoMatchingSubscribers) =>
                    {
                        acked += 1
                    }
                    Ok(p) => return Err(format!("unexpected: {p:?}")),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => return Err(e.to_string()),
                }
            } else {
                match RawPacket::read(&mut inbuf, 1 << 20) {
                    Ok(RawPacket::PubAck(_)) => acked += 1,
                    Ok(_) => {}
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    }
    let _ = wr.shutdown().await;
    Ok(())
}

/// QoS 1 publishers (the raw client of `mqtt_tls`) against `addr`, over TLS when `tls` is
/// given, in MQTT 5 when `v5`; messages per second.
pub async fn run_qos1_publishers(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    publishers: usize,
    messages: usize,
    v5: bool,
) -> Result<f64, String> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..publishers {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            match tls {
                Some(config) => {
                    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
                    let s =
                        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
                    publish_qos1(s, id, messages, v5).await
                }
                None => publish_qos1(tcp, id, messages, v5).await,
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok((publishers * messages) as f64 / started.elapsed().as_secs_f64())
}

/// A TLS 1.3 client (ring) trusting the CA certificates in `ca` (PEM).
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

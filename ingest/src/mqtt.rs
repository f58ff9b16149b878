//! Ferrite's MQTT 3.1.1 listener, on rumqttc's `mqttbytes` codec (see
//! `docs/adr/0001-mqtt-front.md` for why not rumqttd).
//!
//! The point of owning the listener: a QoS 1 PUBLISH on a telemetry topic is acknowledged
//! (PUBACK) only after its events are committed to the write-ahead log, and a QoS 2
//! PUBLISH gets its PUBREC only then. QoS 0 is queued to the engine and never acknowledged.
//!
//! ```text
//! socket ─▶ read loop ─▶ PUBLISH devices/{id}/telemetry[/{stream}] ─▶ Ingestor (decode, WAL)
//!                │                                                         │ committed
//!                │ other PUBLISH / SUBSCRIBE ─▶ Broker (fan-out, QoS 0)      ▼
//! socket ◀─ writer task ◀──────────── PUBACK / PUBREC in arrival order ◀── pending acks
//! ```
//!
//! It also routes messages between clients (commands to devices, status, shadows): every
//! PUBLISH is delivered at QoS 0 to the sessions subscribed to a matching filter.
//! Not yet: persistent sessions, retained messages, QoS 1/2 delivery to subscribers,
//! MQTT 5 and authentication (the identity plugin adds it).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use ferrite_engine::{Metrics, StreamName};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use parking_lot::RwLock;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::pipeline::{Durability, Ingestor, Payload, Transport};

/// Largest MQTT packet accepted at all; bigger ones close the connection. Payloads over
/// the ingest limit but under this are rejected and counted, and the session lives on.
pub const MAX_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Acknowledgements a session may owe before the listener stops reading from it.
pub const MAX_PENDING_ACKS: usize = 1024;
/// Messages queued towards one subscriber; when full, further deliveries to it are dropped
/// and counted (QoS 0 semantics), so one slow subscriber never stalls the publishers.
pub const SUBSCRIBER_QUEUE: usize = 1024;

/// Subscriptions of all sessions, for routing messages between clients.
#[derive(Default)]
pub struct Broker {
    subs: RwLock<Vec<Subscription>>,
    dropped: AtomicU64,
}

struct Subscription {
    session: u64,
    filter: String,
    tx: mpsc::Sender<Packet>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("subscriptions", &self.subs.read().len()).finish()
    }
}

impl Broker {
    /// Delivers a message at QoS 0 to every matching subscription; returns how many got it.
    pub fn publish(&self, topic: &str, payload: bytes::Bytes) -> usize {
        let subs = self.subs.read();
        let mut delivered = 0;
        let mut seen: Vec<u64> = Vec::new();
        for s in subs.iter() {
            if seen.contains(&s.session) || !mqttbytes::matches(topic, &s.filter) {
                continue;
            }
            seen.push(s.session);
            let p = Publish::from_bytes(topic, QoS::AtMostOnce, payload.clone());
            if s.tx.try_send(Packet::Publish(p)).is_ok() {
                delivered += 1;
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        delivered
    }

    fn subscribe(&self, session: u64, filter: String, tx: mpsc::Sender<Packet>) {
        let mut subs = self.subs.write();
        if !subs.iter().any(|s| s.session == session && s.filter == filter) {
            subs.push(Subscription { session, filter, tx });
        }
    }

    fn unsubscribe(&self, session: u64, filter: &str) {
        self.subs.write().retain(|s| !(s.session == session && s.filter == filter));
    }

    fn remove_session(&self, session: u64) {
        self.subs.write().retain(|s| s.session != session);
    }
}

/// Where a telemetry topic's events go.
#[derive(Debug, PartialEq, Eq)]
pub struct TelemetryTopic<'a> {
    /// The device, from the topic's second level.
    pub device: &'a str,
    /// The stream: `telemetry`, or the level after it.
    pub stream: &'a str,
}

/// Parses `devices/{device_id}/telemetry[/{stream}]`; `None` for other topics.
pub fn parse_telemetry_topic(topic: &str) -> Option<TelemetryTopic<'_>> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("telemetry")?;
    let stream = match rest {
        "" => "telemetry",
        r => {
            let s = r.strip_prefix('/')?;
            if s.contains('/') {
                return None;
            }
            s
        }
    };
    Some(TelemetryTopic { device, stream })
}

/// Runs the listener until `shutdown` turns true; then stops accepting, lets every session
/// send the acknowledgements it already earned, and returns once they are closed.
pub async fn serve(
    listener: TcpListener,
    ingestor: Arc<Ingestor>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let next_session = AtomicU64::new(1);
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    metrics.inc("ferrite_mqtt_connections_total", &[], 1);
                    let session = Session {
                        id: next_session.fetch_add(1, Ordering::Relaxed),
                        ingestor: ingestor.clone(),
                        broker: broker.clone(),
                        metrics: metrics.clone(),
                    };
                    let shutdown = shutdown.clone();
                    sessions.spawn(async move {
                        if let Err(e) = session.run(stream, shutdown).await {
                            tracing::debug!(%peer, error = %e, "mqtt session ended");
                        }
                    });
                    // Reap finished sessions so the set does not grow with every connection.
                    while sessions.try_join_next().is_some() {}
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    // Sessions deliver the acknowledgements they already earned, then close.
    let drained =
        tokio::time::timeout(Duration::from_secs(10), async { while sessions.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::warn!(open = sessions.len(), "mqtt sessions still closing after 10s; dropping them");
        sessions.abort_all();
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Option<Packet>> + Send>>;

struct Session {
    id: u64,
    ingestor: Arc<Ingestor>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("keep-alive expired")]
    KeepAlive,
}

impl Session {
    async fn run(self, stream: TcpStream, mut shutdown: watch::Receiver<bool>) -> Result<(), SessionError> {
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(8 * 1024);

        // CONNECT must come first, within 10 seconds.
        let connect = loop {
            match Packet::read(&mut buf, MAX_PACKET_BYTES) {
                Ok(Packet::Connect(c)) => break c,
                Ok(other) => return Err(SessionError::Protocol(format!("expected CONNECT, got {other:?}"))),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(mqttbytes::Error::InvalidProtocolLevel(_) | mqttbytes::Error::InvalidProtocol) => {
                    write_packet(
                        &mut wr,
                        &Packet::ConnAck(ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false)),
                    )
                    .await?;
                    return Err(SessionError::Protocol("unsupported protocol version".into()));
                }
                Err(e) => return Err(SessionError::Protocol(e.to_string())),
            }
            let n = tokio::time::timeout(Duration::from_secs(10), rd.read_buf(&mut buf))
                .await
                .map_err(|_| SessionError::KeepAlive)??;
            if n == 0 {
                return Ok(());
            }
        };
        if connect.protocol != mqttbytes::Protocol::V4 {
            write_packet(&mut wr, &Packet::ConnAck(ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false)))
                .await?;
            return Err(SessionError::Protocol("MQTT 5 is not supported yet; connect with MQTT 3.1.1".into()));
        }
        write_packet(&mut wr, &Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?;
        tracing::debug!(session = self.id, client_id = %connect.client_id, "mqtt connected");

        // Writer task: acknowledgements and deliveries, in the order they are queued.
        let (out_tx, mut out_rx) = mpsc::channel::<Packet>(SUBSCRIBER_QUEUE);
        let writer = tokio::spawn(async move {
            let mut wbuf = BytesMut::with_capacity(4096);
            while let Some(p) = out_rx.recv().await {
                wbuf.clear();
                if p.write(&mut wbuf, MAX_PACKET_BYTES).is_err() {
                    continue;
                }
                // Batch whatever else is ready into the same write.
                while let Ok(more) = out_rx.try_recv() {
                    let _ = more.write(&mut wbuf, MAX_PACKET_BYTES);
                    if wbuf.len() > 64 * 1024 {
                        break;
                    }
                }
                if wr.write_all(&wbuf).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });

        let keep_alive = match connect.keep_alive {
            0 => Duration::from_secs(24 * 3600),
            k => Duration::from_millis(u64::from(k) * 1500),
        };
        let mut pending: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        let mut qos2_inflight: HashMap<u16, ()> = HashMap::new();
        let mut clean = false;
        let result: Result<(), SessionError> = async {
            loop {
                // Handle every complete packet already buffered; QoS 0 telemetry from this
                // read is gathered per device and stream and decoded as one batch each.
                let mut qos0: Vec<(String, StreamName, Vec<bytes::Bytes>)> = Vec::new();
                let mut disconnected = false;
                loop {
                    match Packet::read(&mut buf, MAX_PACKET_BYTES) {
                        Ok(p) => {
                            if self.handle(p, &out_tx, &mut pending, &mut qos2_inflight, &mut clean, &mut qos0).await? {
                                disconnected = true;
                                break;
                            }
                        }
                        Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => return Err(SessionError::Protocol(e.to_string())),
                    }
                }
                for (device, stream, payloads) in qos0.drain(..) {
                    let ingestor = self.ingestor.clone();
                    let payload = Payload::JsonMany { stream, device, payloads };
                    pending.push_back(Box::pin(async move {
                        match ingestor.ingest(Transport::Mqtt, payload, bytes::Bytes::new(), Durability::Queued).await {
                            Ok(report) => {
                                for r in &report.rejections {
                                    tracing::warn!(reason = r.reason, "mqtt event rejected: {}", r.message);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "mqtt QoS 0 messages rejected"),
                        }
                        None
                    }));
                }
                if disconnected {
                    return Ok(());
                }
                let reading = pending.len() < MAX_PENDING_ACKS;
                tokio::select! {
                    n = tokio::time::timeout(keep_alive, rd.read_buf(&mut buf)), if reading => {
                        match n {
                            Err(_) => return Err(SessionError::KeepAlive),
                            Ok(Ok(0)) => return Ok(()),
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return Err(e.into()),
                        }
                    }
                    Some(ack) = pending.next(), if !pending.is_empty() => {
                        if let Some(p) = ack
                            && out_tx.send(p).await.is_err()
                        {
                            return Ok(());
                        }
                    }
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
        .await;

        // Deliver the acknowledgements already earned before closing.
        while let Some(ack) = pending.next().await {
            if let Some(p) = ack {
                let _ = out_tx.send(p).await;
            }
        }
        self.broker.remove_session(self.id);
        if !clean && let Some(will) = &connect.last_will {
            self.broker.publish(&will.topic, will.message.clone());
        }
        drop(out_tx);
        let _ = writer.await;
        result
    }

    /// Handles one packet; returns `true` when the client disconnected cleanly.
    async fn handle(
        &self,
        packet: Packet,
        out: &mpsc::Sender<Packet>,
        pending: &mut FuturesOrdered<AckFuture>,
        qos2: &mut HashMap<u16, ()>,
        clean: &mut bool,
        qos0: &mut Vec<(String, StreamName, Vec<bytes::Bytes>)>,
    ) -> Result<bool, SessionError> {
        match packet {
            Packet::Publish(p) => {
                let qos_label = match p.qos {
                    QoS::AtMostOnce => "0",
                    QoS::AtLeastOnce => "1",
                    QoS::ExactlyOnce => "2",
                };
                self.metrics.inc("ferrite_mqtt_messages_total", &[("qos", qos_label)], 1);
                let ack: Option<Packet> = match p.qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(p.pkid))),
                    QoS::ExactlyOnce => Some(Packet::PubRec(PubRec::new(p.pkid))),
                };
                if p.qos == QoS::ExactlyOnce && qos2.contains_key(&p.pkid) {
                    // A retransmission of a message we already took: acknowledge, don't ingest twice.
                    pending.push_back(Box::pin(async move { ack }));
                    return Ok(false);
                }
                if p.qos == QoS::ExactlyOnce {
                    qos2.insert(p.pkid, ());
                }
                self.broker.publish(&p.topic, p.payload.clone());
                match parse_telemetry_topic(&p.topic) {
                    Some(t) => {
                        let stream = StreamName::new(t.stream);
                        let device_ok = ferrite_engine::ids::validate_device_id(t.device);
                        let (stream, device) = match (stream, device_ok) {
                            (Ok(s), Ok(())) => (s, t.device.to_owned()),
                            (Err(e), _) | (_, Err(e)) => {
                                self.reject(&p.topic, "invalid_topic", &e.to_string());
                                pending.push_back(Box::pin(async move { ack }));
                                return Ok(false);
                            }
                        };
                        if p.qos == QoS::AtMostOnce {
                            if p.payload.len() > self.ingestor.max_payload_bytes() {
                                let msg = format!("payload of {} bytes exceeds the limit", p.payload.len());
                                self.reject(&p.topic, "payload_too_large", &msg);
                                return Ok(false);
                            }
                            match qos0.iter_mut().find(|(d, s, _)| *d == device && *s == stream) {
                                Some((_, _, list)) => list.push(p.payload),
                                None => qos0.push((device, stream, vec![p.payload])),
                            }
                            return Ok(false);
                        }
                        let durability = Durability::Committed;
                        let ingestor = self.ingestor.clone();
                        let topic = p.topic.clone();
                        let payload = Payload::Json { stream, device: Some(device) };
                        pending.push_back(Box::pin(async move {
                            match ingestor.ingest(Transport::Mqtt, payload, p.payload, durability).await {
                                Ok(report) => {
                                    for r in &report.rejections {
                                        tracing::warn!(topic = %topic, reason = r.reason, "mqtt event rejected: {}", r.message);
                                    }
                                    ack
                                }
                                Err(crate::Error::Commit(e)) => {
                                    // Not durable: withhold the PUBACK so the client resends.
                                    tracing::error!(topic = %topic, error = %e, "mqtt commit failed; not acknowledging");
                                    None
                                }
                                Err(e) => {
                                    tracing::warn!(topic = %topic, error = %e, "mqtt payload rejected");
                                    ack
                                }
                            }
                        }));
                    }
                    None => {
                        if p.topic.starts_with("devices/") && p.topic.contains("/telemetry") {
                            self.reject(
                                &p.topic,
                                "invalid_topic",
                                "telemetry topics are devices/{id}/telemetry[/{stream}]",
                            );
                        }
                        pending.push_back(Box::pin(async move { ack }));
                    }
                }
            }
            Packet::PubRel(r) => {
                qos2.remove(&r.pkid);
                pending.push_back(Box::pin(async move { Some(Packet::PubComp(PubComp::new(r.pkid))) }));
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                for f in s.filters {
                    if mqttbytes::valid_filter(&f.path) {
                        self.broker.subscribe(self.id, f.path, out.clone());
                        codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                    } else {
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                let ack = Packet::SubAck(SubAck::new(s.pkid, codes));
                pending.push_back(Box::pin(async move { Some(ack) }));
            }
            Packet::Unsubscribe(u) => {
                for t in &u.topics {
                    self.broker.unsubscribe(self.id, t);
                }
                let ack = Packet::UnsubAck(UnsubAck::new(u.pkid));
                pending.push_back(Box::pin(async move { Some(ack) }));
            }
            Packet::PingReq => pending.push_back(Box::pin(async { Some(Packet::PingResp) })),
            Packet::Disconnect => {
                *clean = true;
                return Ok(true);
            }
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Connect(_) => return Err(SessionError::Protocol("second CONNECT".into())),
            other => return Err(SessionError::Protocol(format!("unexpected packet from client: {other:?}"))),
        }
        Ok(false)
    }

    fn reject(&self, topic: &str, reason: &'static str, message: &str) {
        self.metrics.inc("ferrite_rejected_events_total", &[("transport", "mqtt"), ("reason", reason)], 1);
        tracing::warn!(topic, reason, "mqtt message rejected: {message}");
    }
}

async fn write_packet(wr: &mut tokio::net::tcp::OwnedWriteHalf, p: &Packet) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    p.write(&mut b, MAX_PACKET_BYTES).map_err(std::io::Error::other)?;
    wr.write_all(&b).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_topics() {
        assert_eq!(
            parse_telemetry_topic("devices/d1/telemetry"),
            Some(TelemetryTopic { device: "d1", stream: "telemetry" })
        );
        assert_eq!(
            parse_telemetry_topic("devices/d1/telemetry/power"),
            Some(TelemetryTopic { device: "d1", stream: "power" })
        );
        assert_eq!(parse_telemetry_topic("devices/d1/commands"), None);
        assert_eq!(parse_telemetry_topic("devices/d1/telemetry/a/b"), None);
        assert_eq!(parse_telemetry_topic("other/d1/telemetry"), None);
    }
}

//! Ferrite's MQTT listener (3.1.1 and 5), on rumqttc's `mqttbytes` codecs (see
//! `docs/adr/0001-mqtt-front.md` for why not rumqttd).
//!
//! The point of owning the listener: a QoS 1 PUBLISH on a telemetry topic is acknowledged
//! (PUBACK) only after its events are committed to the write-ahead log, and a QoS 2
//! PUBLISH gets its PUBREC only then. QoS 0 is queued to the engine and never acknowledged.
//! The QoS 0 and QoS 1 telemetry of one socket read is decoded as one batch per device and
//! stream (one decode job, one commit wait for many messages); QoS 1 PUBACKs still go out
//! one per message, in the order the PUBLISHes came in.
//!
//! ```text
//! socket ─▶ read loop ─▶ PUBLISH devices/{id}/telemetry[/{stream}] ─▶ Ingestor (decode, WAL)
//!                │                                                         │ committed
//!                │ other PUBLISH / SUBSCRIBE ─▶ Broker (fan-out, QoS 0 and 1) ▼
//! socket ◀─ writer task ◀──────────── PUBACK / PUBREC in arrival order ◀── pending acks
//! ```
//!
//! It also routes messages between clients through the embedded [`Broker`] (commands to
//! devices, status, alerts to services): QoS 0 and 1 deliveries with a bounded window per
//! subscriber, retained messages and last wills (see the broker's module for the rules).
//! A client that connects with `clean_session = 0` keeps its session across connections:
//! the QoS 2 packet ids it sent that were taken but not yet released (so that a PUBLISH
//! retransmitted after a lost PUBREC is acknowledged, not ingested twice: exactly once
//! across a cut connection), its subscriptions, restored with `session present = 1`, and
//! the QoS 1 messages sent to it while it was away or not yet acknowledged.
//! Kept sessions live in memory (a restart of the server ends them) and are bounded.
//! A second connection of the same client (principal and client id) ends the first.
//! MQTT 5 clients are served by the same session, through [`crate::mqtt5`]'s translation.
//!
//! When a commit fails (or the node is overloaded) the acknowledgement is withheld and the
//! session is closed: an MQTT 3.1.1 client retransmits unacknowledged messages only when it
//! reconnects, so keeping the session open would leave the message waiting forever. A QoS 2
//! packet id is recorded as received only once its events are committed, so the
//! retransmission after a failure is ingested, and a duplicate of a committed one is not.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use ferrite_engine::auth::{
    AccessControl, Action, Credentials, DecisionCache, Principal, RequestContext, Transport as AuthTransport,
};
use ferrite_engine::limits::{Class, RateLimiter};
use ferrite_engine::plugin::Presence;
use ferrite_engine::usage::{UsageLog, UsageRecord};
use ferrite_engine::{Metrics, StreamName};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use crate::broker::{
    Broker, DeliveryError, InternalSubscriber, MAX_KEPT_SESSIONS, MAX_PACKET_BYTES, SUBSCRIBER_QUEUE,
};
use rumqttc::v5::mqttbytes::v5::{
    self as v5, ConnectReturnCode as V5Code, DisconnectReasonCode as V5Disconnect, Packet as V5Packet,
    PubAckReason as V5PubAck,
};

use crate::broker::{Grant, KeptSession, LiveSession, Out};
use crate::mqtt5::{self, Extra, MessageProps};
use crate::pipeline::{Durability, Ingestor, Payload, Transport};
use crate::topic;

/// Longest an ended session's writer may take to deliver what is queued before its
/// connection is closed anyway.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// What a busy session reads at once (its read buffer grows to this on demand).
const READ_CHUNK: usize = 8 * 1024;
/// Acknowledgements a session may owe before the listener stops reading from it.
pub const MAX_PENDING_ACKS: usize = 1024;
/// What any one client can grow on the listener (each refusal is counted in
/// `ferrite_mqtt_refused_total{reason}` and logged), and what it may carry into events.
#[derive(Debug, Clone)]
pub struct MqttLimits {
    /// Open connections in all (past it: CONNACK "server unavailable").
    pub max_connections: usize,
    /// Open connections from one IP address (past it: CONNACK "server unavailable").
    pub max_connections_per_ip: usize,
    /// Subscriptions one session may hold (past it: SUBACK failure for the extra filters).
    pub max_subscriptions_per_session: usize,
    /// Open connections of one tenant (0: no bound; past it: CONNACK "server unavailable").
    pub max_connections_per_tenant: usize,
    /// An MQTT 5 telemetry message's user properties become string fields of its events
    /// (a field the payload has keeps its value).
    pub user_properties_as_fields: bool,
}

impl Default for MqttLimits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            max_subscriptions_per_session: 1_000,
            max_connections_per_tenant: 0,
            user_properties_as_fields: false,
        }
    }
}

/// Counts open connections, in all and per IP; a [`ConnectionSlot`] gives its place back
/// when dropped.
#[derive(Default)]
struct ConnectionCounts {
    total: usize,
    per_ip: HashMap<std::net::IpAddr, usize>,
}

struct ConnectionSlot {
    counts: Arc<parking_lot::Mutex<ConnectionCounts>>,
    ip: std::net::IpAddr,
    /// Why this connection is over a limit, if it is.
    refused: Option<&'static str>,
}

impl ConnectionSlot {
    fn take(counts: &Arc<parking_lot::Mutex<ConnectionCounts>>, ip: std::net::IpAddr, limits: &MqttLimits) -> Self {
        let mut c = counts.lock();
        c.total += 1;
        let n = c.per_ip.entry(ip).or_default();
        *n += 1;
        let refused = if *n > limits.max_connections_per_ip {
            Some("connections_per_ip")
        } else if c.total > limits.max_connections {
            Some("connections")
        } else {
            None
        };
        Self { counts: counts.clone(), ip, refused }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Longest a CONNECT is held to keep to the server's CONNECT rate; a client that would
/// wait longer gets CONNACK "server unavailable" and retries later.
pub const MAX_CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Longest a session's reads are paused to keep to its publish rate; a client further
/// behind than this is disconnected (after the acknowledgements it earned).
pub const MAX_PUBLISH_DEBT: Duration = Duration::from_secs(30);

/// A tenant's place among its open connections, given back on drop.
struct TenantSlot {
    counts: Arc<parking_lot::Mutex<HashMap<Arc<str>, usize>>>,
    tenant: Arc<str>,
}

impl TenantSlot {
    /// Takes a place for `tenant`, or `None` when it holds `max` already (0: no bound).
    fn take(counts: &Arc<parking_lot::Mutex<HashMap<Arc<str>, usize>>>, tenant: &Arc<str>, max: usize) -> Option<Self> {
        let mut c = counts.lock();
        let n = c.entry(tenant.clone()).or_default();
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { counts: counts.clone(), tenant: tenant.clone() })
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        if let Some(n) = c.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.tenant);
            }
        }
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

impl TelemetryTopic<'_> {
    /// The stream of `tenant` and the device the events go to, or why the topic names none
    /// (a stream or device id that is not valid).
    pub fn target(&self, tenant: &str) -> ferrite_engine::Result<(StreamName, String)> {
        let stream = StreamName::in_tenant(tenant, self.stream)?;
        ferrite_engine::ids::validate_device_id(self.device)?;
        Ok((stream, self.device.to_owned()))
    }
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

/// The door a session came through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Door {
    /// MQTT on TCP.
    #[default]
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket on the HTTP port.
    Ws,
    /// MQTT over WebSocket on the HTTPS port.
    Wss,
}

impl Door {
    /// Its name in `api_usage`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::Mqtts => "mqtts",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }
}

/// What the transport proved about a client before its CONNECT: the door it came through,
/// and the device id of a client certificate the handshake verified against the
/// configured device CA (`certificate_subject`).
#[derive(Debug, Clone, Default)]
pub struct TransportIdentity {
    /// The door.
    pub door: Door,
    /// The device id a verified client certificate names (mutual TLS).
    pub certificate_subject: Option<String>,
}

impl TransportIdentity {
    /// Whether the connection is TLS (MQTT over TLS, or MQTT over WebSocket on HTTPS).
    pub fn tls(&self) -> bool {
        matches!(self.door, Door::Mqtts | Door::Wss)
    }
}

/// What the front charges sessions against and reports them to.
#[derive(Debug, Clone)]
pub struct Accounting {
    /// Rate limits: CONNECT pacing, publish rates.
    pub limiter: Arc<RateLimiter>,
    /// Each session's `api_usage` row.
    pub usage: UsageLog,
}

/// Everything a session needs, shared by the listeners that carry MQTT: plain TCP
/// ([`serve`]), TLS and WebSocket (which hand their connections to
/// [`MqttFront::spawn_session`]). It counts connections against [`MqttLimits`] across all of
/// them and keeps the sessions, so that a shutdown drains every one.
pub struct MqttFront {
    ingestor: Arc<Ingestor>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    access: Arc<dyn AccessControl>,
    limits: MqttLimits,
    counts: Arc<parking_lot::Mutex<ConnectionCounts>>,
    tenant_counts: Arc<parking_lot::Mutex<HashMap<Arc<str>, usize>>>,
    limiter: Arc<RateLimiter>,
    usage: UsageLog,
    next_session: AtomicU64,
    sessions: parking_lot::Mutex<tokio::task::JoinSet<()>>,
    shutdown: watch::Receiver<bool>,
}

impl MqttFront {
    /// The front of `broker` and `ingestor`; sessions end when `shutdown` turns true.
    pub fn new(
        ingestor: Arc<Ingestor>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        access: Arc<dyn AccessControl>,
        limits: MqttLimits,
        accounting: Accounting,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let Accounting { limiter, usage } = accounting;
        Arc::new(Self {
            ingestor,
            broker,
            metrics,
            access,
            limits,
            counts: Arc::default(),
            tenant_counts: Arc::default(),
            limiter,
            usage,
            next_session: AtomicU64::new(1),
            sessions: parking_lot::Mutex::new(tokio::task::JoinSet::new()),
            shutdown,
        })
    }

    /// Runs an MQTT session on a connection the caller accepted (and, for TLS, completed
    /// the handshake of): `rd` and `wr` are its two halves, `peer` where it comes from.
    pub fn spawn_session<R, W>(&self, rd: R, wr: W, peer: std::net::SocketAddr, transport: TransportIdentity)
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        self.metrics.inc("ferrite_mqtt_connections_total", &[], 1);
        let mut context = RequestContext::new(AuthTransport::Mqtt, Some(peer.ip()));
        context.tls = transport.tls();
        let session = Session {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            ingestor: self.ingestor.clone(),
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            slot: ConnectionSlot::take(&self.counts, peer.ip(), &self.limits),
            tenant_counts: self.tenant_counts.clone(),
            max_connections_per_tenant: self.limits.max_connections_per_tenant,
            user_properties_as_fields: self.limits.user_properties_as_fields,
            limiter: self.limiter.clone(),
            usage: self.usage.clone(),
            door: transport.door,
            max_subscriptions: self.limits.max_subscriptions_per_session,
            subscriptions: parking_lot::Mutex::new(HashSet::new()),
            access: self.access.clone(),
            context,
            certificate_subject: transport.certificate_subject,
            principal: std::sync::OnceLock::new(),
            decisions: parking_lot::Mutex::new(DecisionCache::default()),
            v5: std::sync::OnceLock::new(),
            will_props: parking_lot::Mutex::new(None),
            assigned_id: parking_lot::Mutex::new(None),
            aliases: parking_lot::Mutex::new(mqtt5::TopicAliases::default()),
            v5_disconnect: parking_lot::Mutex::new(None),
        };
        let shutdown = self.shutdown.clone();
        let mut sessions = self.sessions.lock();
        sessions.spawn(async move {
            if let Err(e) = session.run(rd, wr, shutdown).await {
                tracing::debug!(%peer, error = %e, "mqtt session ended");
            }
        });
        // Reap finished sessions so the set does not grow with every connection.
        while sessions.try_join_next().is_some() {}
    }

    /// Waits (up to 10 seconds) for every session to deliver the acknowledgements it
    /// already earned and close; called after `shutdown` turned true.
    pub async fn drain(&self) {
        let mut sessions = std::mem::take(&mut *self.sessions.lock());
        let drained =
            tokio::time::timeout(Duration::from_secs(10), async { while sessions.join_next().await.is_some() {} });
        if drained.await.is_err() {
            tracing::warn!(open = sessions.len(), "mqtt sessions still closing after 10s; dropping them");
            sessions.abort_all();
        }
    }
}

/// Accepts plain MQTT connections on `listener` until the front's shutdown turns true;
/// then stops accepting, lets every session send the acknowledgements it already earned,
/// and returns once they are closed.
pub async fn serve(listener: TcpListener, front: Arc<MqttFront>) {
    let mut shutdown = front.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (rd, wr) = stream.into_split();
                    front.spawn_session(rd, wr, peer, TransportIdentity::default());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    front.drain().await;
}

/// What a queued acknowledgement turned into, settled in arrival order.
enum AckOutcome {
    /// Nothing to send (QoS 0).
    Nothing,
    /// Send this packet.
    Send(Packet),
    /// Send these packets, in order (the PUBACKs of QoS 1 messages committed together).
    SendMany(Vec<Out>),
    /// Send this SUBACK, then the retained messages its subscriptions matched.
    SubAck(Out, Vec<(Arc<crate::broker::Message>, QoS)>),
    /// Send this packet as it is (an MQTT 5 refusal with its reason code, an UNSUBACK); the
    /// QoS 2 packet id it refuses, if any, is no longer in flight.
    Reply(Out, Option<u16>),
    /// A QoS 2 message was taken: record its packet id, then send PUBREC.
    Qos2Taken(u16),
    /// A retransmission of a QoS 2 message that was in flight: PUBREC if the first copy
    /// was taken, nothing otherwise (the session is closing then).
    Qos2Duplicate(u16),
    /// The events were not committed: withhold the acknowledgement and close the session.
    Withhold(String),
}

type AckFuture = Pin<Box<dyn Future<Output = AckOutcome> + Send>>;

/// Telemetry of one socket read, decoded as one batch per device and stream: QoS 0
/// messages, and QoS 1 messages not yet handed over with their packet ids in arrival order.
/// A QoS 1 group is handed over (one ingest, one commit wait, its PUBACKs in order) before
/// any other acknowledgement is queued, so PUBACKs keep the order of the PUBLISHes.
#[derive(Default)]
struct Gathered {
    qos0: Vec<Group>,
    qos1: Vec<Group>,
    qos1_ids: Vec<u16>,
    /// Rows of Sparkplug B messages at QoS 0 and at QoS 1, one builder per stream, and the
    /// bytes of those messages.
    sparkplug0: crate::sparkplug::Builders,
    sparkplug1: crate::sparkplug::Builders,
    sparkplug_bytes: [usize; 2],
}

/// The payloads of one device and stream from one read, with their QoS 1 packet ids.
struct Group {
    device: String,
    stream: StreamName,
    payloads: Vec<bytes::Bytes>,
    /// The packet id of each payload (QoS 1; empty for QoS 0).
    ids: Vec<u16>,
}

/// Adds a payload (and its QoS 1 packet id) to the group of its device and stream.
fn gather(groups: &mut Vec<Group>, device: String, stream: StreamName, payload: bytes::Bytes, id: Option<u16>) {
    let i = match groups.iter().position(|g| g.device == device && g.stream == stream) {
        Some(i) => i,
        None => {
            groups.push(Group { device, stream, payloads: Vec::new(), ids: Vec::new() });
            groups.len() - 1
        }
    };
    groups[i].payloads.push(payload);
    groups[i].ids.extend(id);
}

/// An MQTT 5 PUBACK refusing `pkid` with `reason`, `why` as its reason string.
fn v5_puback(pkid: u16, reason: V5PubAck, why: String) -> Out {
    let properties = Some(v5::PubAckProperties { reason_string: Some(why), user_properties: Vec::new() });
    Out::V5(Box::new(V5Packet::PubAck(v5::PubAck { pkid, reason, properties })))
}

/// QoS 2 packet ids: taken (committed, awaiting PUBREL; kept with a persistent session)
/// and in flight (commit pending).
#[derive(Default)]
struct Qos2State {
    taken: Arc<KeptSession>,
    in_flight: HashSet<u16>,
}

struct Session {
    id: u64,
    ingestor: Arc<Ingestor>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    slot: ConnectionSlot,
    tenant_counts: Arc<parking_lot::Mutex<HashMap<Arc<str>, usize>>>,
    max_connections_per_tenant: usize,
    /// MQTT 5 user properties become fields of telemetry events.
    user_properties_as_fields: bool,
    /// Rate limits: CONNECT pacing and the principal's and tenant's publish rates.
    limiter: Arc<RateLimiter>,
    /// Where the session's `api_usage` row goes when it ends.
    usage: UsageLog,
    /// The door it came through.
    door: Door,
    max_subscriptions: usize,
    /// This session's filters (for its subscription limit).
    subscriptions: parking_lot::Mutex<HashSet<String>>,
    /// The decision point.
    access: Arc<dyn AccessControl>,
    /// Where the session comes from.
    context: RequestContext,
    /// The device a verified client certificate names (mutual TLS).
    certificate_subject: Option<String>,
    /// Who the CONNECT authenticated.
    principal: std::sync::OnceLock<Principal>,
    /// Publish and subscribe decisions, once per topic until policies or tokens change.
    decisions: parking_lot::Mutex<DecisionCache>,
    /// Set when the client speaks MQTT 5: what its CONNECT asked for.
    v5: std::sync::OnceLock<mqtt5::ConnectOptions>,
    /// The MQTT 5 properties of its last will.
    will_props: parking_lot::Mutex<Option<Box<MessageProps>>>,
    /// The client id the server assigned (MQTT 5, an empty one in the CONNECT).
    assigned_id: parking_lot::Mutex<Option<String>>,
    /// The topic aliases an MQTT 5 client set.
    aliases: parking_lot::Mutex<mqtt5::TopicAliases>,
    /// An MQTT 5 DISCONNECT's asks: publish the will anyway, a new session expiry.
    v5_disconnect: parking_lot::Mutex<Option<(bool, Option<u32>)>>,
}

/// What the session may do with a topic.
enum Permission {
    Allowed,
    Denied,
    /// The principal no longer holds (token revoked, client removed): end the session.
    Revoked,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("disconnected by the server (the device was disabled)")]
    Kicked,
    #[error("acknowledgement withheld: {0}")]
    Withheld(String),
    #[error("too far over the publish rate")]
    PublishRate,
    #[error("MQTT 5 protocol violation: {}", .0.message)]
    Violation(mqtt5::Violation),
}

impl Session {
    async fn run<R, W>(self, mut rd: R, mut wr: W, mut shutdown: watch::Receiver<bool>) -> Result<(), SessionError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        // Small until the client sends more than a CONNECT and a few SUBSCRIBEs: an idle
        // device holds a few hundred bytes here, a busy publisher grows it to READ_CHUNK.
        let mut buf = BytesMut::with_capacity(256);

        // CONNECT must come first, within 10 seconds.
        let connect = loop {
            if mqtt5::protocol_level(&buf) == Some(5) {
                match V5Packet::read(&mut buf, Some(MAX_PACKET_BYTES as u32)) {
                    Ok(V5Packet::Connect(c, will, login)) => match mqtt5::connect_from_v5(c, will, login) {
                        Ok((connect, options, will_props)) => {
                            let _ = self.v5.set(options);
                            *self.will_props.lock() = will_props;
                            break connect;
                        }
                        Err(e) => {
                            self.connack(&mut wr, ConnectReturnCode::BadClientId, V5Code::MalformedPacket, false)
                                .await?;
                            return Err(SessionError::Protocol(e));
                        }
                    },
                    Ok(other) => return Err(SessionError::Protocol(format!("expected CONNECT, got {other:?}"))),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => {
                        // A malformed CONNECT (a bad property among them): say so, then close.
                        let _ = self.v5.set(mqtt5::ConnectOptions::default());
                        self.connack(&mut wr, ConnectReturnCode::BadClientId, V5Code::MalformedPacket, false).await?;
                        return Err(SessionError::Protocol(format!("malformed MQTT 5 CONNECT: {e}")));
                    }
                }
            } else {
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
            }
            if buf.capacity() - buf.len() < 64 {
                // A CONNECT with a token for a password is larger than the first buffer.
                buf.reserve(1024);
            }
            let n = tokio::time::timeout(Duration::from_secs(10), rd.read_buf(&mut buf))
                .await
                .map_err(|_| SessionError::KeepAlive)??;
            if n == 0 {
                return Ok(());
            }
        };
        if connect.protocol != mqttbytes::Protocol::V4 {
            self.connack(&mut wr, ConnectReturnCode::RefusedProtocolVersion, V5Code::UnsupportedProtocolVersion, false)
                .await?;
            return Err(SessionError::Protocol("unsupported protocol version: connect with MQTT 3.1.1 or 5".into()));
        }
        let mut connect = connect;
        if connect.client_id.is_empty() && self.v5.get().is_some() {
            // MQTT 5 §3.1.3-6: the server assigns one (and says so in the CONNACK).
            connect.client_id = format!("auto-{}", self.id);
            *self.assigned_id.lock() = Some(connect.client_id.clone());
        }
        if let Some(reason) = self.slot.refused {
            self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", reason)], 1);
            tracing::warn!(client_id = %connect.client_id, reason, "mqtt connection refused: over the connection limit");
            self.connack(&mut wr, ConnectReturnCode::ServiceUnavailable, V5Code::ServerBusy, false).await?;
            return Err(SessionError::Protocol(format!("over the limit of {reason}")));
        }
        // A reconnect storm is admitted at the server's CONNECT rate: each CONNECT waits its
        // turn (up to MAX_CONNECT_WAIT), the rest are told to come back later.
        let wait = self.limiter.debit(Class::MqttConnect, "", "", 1.0);
        if wait > MAX_CONNECT_WAIT {
            self.limiter.refund(Class::MqttConnect, "", "", 1.0);
            self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", "connect_rate")], 1);
            tracing::warn!(client_id = %connect.client_id, "mqtt connection refused: over the server's CONNECT rate");
            self.connack(&mut wr, ConnectReturnCode::ServiceUnavailable, V5Code::ConnectionRateExceeded, false).await?;
            return Err(SessionError::Protocol("over the CONNECT rate".into()));
        }
        if !wait.is_zero() {
            self.metrics.inc("ferrite_mqtt_connects_paced_total", &[], 1);
            tokio::time::sleep(wait).await;
        }
        // A verified client certificate is the identity; a username beside it must agree.
        let credentials = match &self.certificate_subject {
            Some(subject) => Credentials::Certificate {
                subject,
                client_id: &connect.client_id,
                username: connect.login.as_ref().map(|l| l.username.as_str()),
            },
            None => Credentials::Mqtt {
                client_id: &connect.client_id,
                username: connect.login.as_ref().map(|l| l.username.as_str()),
                password: connect.login.as_ref().map(|l| l.password.as_bytes()),
            },
        };
        match self.access.authenticate(&credentials, &self.context) {
            Ok(p) => {
                let _ = self.principal.set(p);
            }
            Err(e) => {
                self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", "not_authorized")], 1);
                tracing::warn!(client_id = %connect.client_id, error = %e, "mqtt connection refused: not authorized");
                let (code, v5code) = if connect.login.is_some() {
                    (ConnectReturnCode::BadUserNamePassword, V5Code::BadUserNamePassword)
                } else {
                    (ConnectReturnCode::NotAuthorized, V5Code::NotAuthorized)
                };
                self.connack(&mut wr, code, v5code, false).await?;
                return Err(SessionError::Protocol(format!("not authorized: {e}")));
            }
        }
        let tenant: Arc<str> =
            self.principal.get().map_or_else(|| Arc::from(ferrite_engine::ids::DEFAULT_TENANT), |p| p.tenant.clone());
        let Some(tenant_slot) = TenantSlot::take(&self.tenant_counts, &tenant, self.max_connections_per_tenant) else {
            self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", "tenant_connections")], 1);
            tracing::warn!(client_id = %connect.client_id, %tenant, limit = self.max_connections_per_tenant, "mqtt connection refused: the tenant is at its connection limit");
            self.connack(&mut wr, ConnectReturnCode::ServiceUnavailable, V5Code::QuotaExceeded, false).await?;
            return Err(SessionError::Protocol("over the tenant's connection limit".into()));
        };
        let principal_id: Arc<str> = self.principal.get().map_or_else(|| Arc::from(""), |p| p.id.clone());
        // A last will the principal may not publish is dropped now, not at the disconnect.
        let will_allowed = match &connect.last_will {
            Some(w) => match self.permission(Action::Publish, &w.topic) {
                Permission::Allowed => true,
                _ => {
                    tracing::warn!(client_id = %connect.client_id, topic = %w.topic, "mqtt last will refused by policy; it will not be delivered");
                    false
                }
            },
            None => false,
        };
        // An empty client id names no session to keep (MQTT 3.1.1 §3.1.3-8) nor to take over:
        // each such connection is a client of its own.
        if connect.client_id.is_empty() && !connect.clean_session {
            self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", "identifier_rejected")], 1);
            self.connack(&mut wr, ConnectReturnCode::BadClientId, V5Code::ClientIdentifierNotValid, false).await?;
            return Err(SessionError::Protocol("a persistent session needs a client id".into()));
        }
        let session_key = (
            self.principal.get().map(|p| format!("{}/{}", p.tenant, p.id)).unwrap_or_default(),
            connect.client_id.clone(),
        );
        let client_key = (!connect.client_id.is_empty()).then(|| session_key.clone());
        let will_key = client_key.clone();
        // MQTT 3.1.1 keeps a session unless it is clean; MQTT 5 when its expiry is not zero,
        // and starts afresh on clean start.
        let keep = match self.v5.get() {
            Some(o) => o.session_expiry > 0,
            None => !connect.clean_session,
        };
        let (kept, session_present) = self.broker.session_state(session_key, connect.clean_session, keep);
        if kept.is_none() && keep {
            self.metrics.inc("ferrite_mqtt_sessions_not_kept_total", &[], 1);
            tracing::warn!(client_id = %connect.client_id, limit = MAX_KEPT_SESSIONS, "mqtt session not kept: too many kept sessions");
        }
        self.connack(&mut wr, ConnectReturnCode::Success, V5Code::Success, session_present).await?;
        tracing::debug!(session = self.id, client_id = %connect.client_id, session_present, "mqtt connected");
        let presence = Presence {
            principal: self.principal.get().cloned().unwrap_or_else(Principal::anonymous),
            client_id: connect.client_id.clone(),
            source: self.context.source,
        };
        // Writer task: acknowledgements and deliveries, in the order they are queued.
        let (out_tx, mut out_rx) = mpsc::channel::<Out>(SUBSCRIBER_QUEUE);
        let (started_at, started) = (std::time::SystemTime::now(), std::time::Instant::now());
        let (mut bytes_in, mut messages) = (0u64, 0u64);
        let written = Arc::new(AtomicU64::new(0));
        let written_by_writer = written.clone();
        let v5 = self.v5.get().is_some();
        let mut writer = tokio::spawn(async move {
            // Grows to what the session sends at once, and keeps that.
            let mut wbuf = BytesMut::new();
            while let Some(p) = out_rx.recv().await {
                wbuf.clear();
                if p.write(&mut wbuf, v5).is_err() {
                    continue;
                }
                // Batch whatever else is ready into the same write.
                while let Ok(more) = out_rx.try_recv() {
                    let _ = more.write(&mut wbuf, v5);
                    if wbuf.len() > 64 * 1024 {
                        break;
                    }
                }
                if wr.write_all(&wbuf).await.is_err() {
                    break;
                }
                written_by_writer.fetch_add(wbuf.len() as u64, Ordering::Relaxed);
            }
            let _ = wr.shutdown().await;
        });

        let keep_alive = match connect.keep_alive {
            0 => Duration::from_secs(24 * 3600),
            k => Duration::from_millis(u64::from(k) * 1500),
        };
        let mut pending: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        let mut qos2 = Qos2State::default();
        // Its kept subscriptions back, the client's older connection ended, and what waited
        // for the client while it was away (or was not acknowledged) on its way.
        let live = self.broker.attach(
            self.id,
            client_key,
            &presence,
            out_tx.clone(),
            (kept.clone(), self.v5.get()),
            |filters| self.restore_subscriptions(filters),
        );
        if let Some(kept) = kept {
            qos2.taken = kept;
        }
        let mut clean = false;
        // One registration for the session's life, not one per loop turn.
        let kick = live.kick.clone();
        let kicked = kick.notified();
        tokio::pin!(kicked);
        // Set while reads pause to keep to the publish rate (MQTT 3.1.1 cannot refuse).
        let mut throttle: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut streaming = false;
        let result: Result<(), SessionError> = async {
            loop {
                // Handle every complete packet already buffered; QoS 0 telemetry from this
                // read is gathered per device and stream and decoded as one batch each.
                let mut gathered = Gathered::default();
                let mut disconnected = false;
                let mut publishes = 0usize;
                while let Some((p, extra)) = self.read_packet(&mut buf)? {
                    publishes += usize::from(matches!(p, Packet::Publish(_)));
                    if self.handle(p, extra, &mut pending, &mut qos2, &mut clean, &mut gathered).await? {
                        disconnected = true;
                        break;
                    }
                }
                self.hand_over_qos1(&mut gathered, &mut pending);
                let sparkplug = crate::sparkplug::finish(std::mem::take(&mut gathered.sparkplug0));
                if !sparkplug.is_empty() {
                    let ingestor = self.ingestor.clone();
                    let bytes = std::mem::take(&mut gathered.sparkplug_bytes[0]);
                    let payload = Payload::Batches { tenant: tenant.clone(), batches: sparkplug, bytes };
                    pending.push_back(Box::pin(async move {
                        if let Err(e) =
                            ingestor.ingest(Transport::Mqtt, payload, bytes::Bytes::new(), Durability::Queued).await
                        {
                            tracing::warn!(error = %e, "sparkplug QoS 0 rows rejected");
                        }
                        AckOutcome::Nothing
                    }));
                }
                for Group { device, stream, payloads, .. } in gathered.qos0.drain(..) {
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
                        AckOutcome::Nothing
                    }));
                }
                if disconnected {
                    return Ok(());
                }
                messages += publishes as u64;
                if publishes > 0 {
                    let wait = self.limiter.debit(Class::MqttPublish, &principal_id, &tenant, publishes as f64);
                    if wait > MAX_PUBLISH_DEBT {
                        self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", "publish_rate")], 1);
                        tracing::warn!(session = self.id, principal = %principal_id, "mqtt session closed: too far over its publish rate");
                        return Err(SessionError::PublishRate);
                    }
                    if !wait.is_zero() {
                        self.metrics.inc("ferrite_mqtt_throttled_reads_total", &[], 1);
                        throttle = Some(Box::pin(tokio::time::sleep(wait)));
                    }
                }
                let reading = pending.len() < MAX_PENDING_ACKS && throttle.is_none();
                // A client whose last read filled half the space offered is streaming: read
                // it in READ_CHUNKs; an idle one keeps a small buffer.
                let want = if streaming { READ_CHUNK } else { 256 };
                if buf.capacity() - buf.len() < want / 4 {
                    buf.reserve(want);
                }
                let space = buf.capacity() - buf.len();
                tokio::select! {
                    n = tokio::time::timeout(keep_alive, rd.read_buf(&mut buf)), if reading => {
                        match n {
                            Err(_) => return Err(SessionError::KeepAlive),
                            Ok(Ok(0)) => return Ok(()),
                            Ok(Ok(n)) => {
                                streaming = n * 2 >= space;
                                bytes_in += n as u64;
                            }
                            Ok(Err(e)) => return Err(e.into()),
                        }
                    }
                    Some(outcome) = pending.next(), if !pending.is_empty() => {
                        match settle(outcome, &mut qos2, &self.broker, &live) {
                            Ok(outs) => {
                                for o in outs {
                                    if out_tx.send(o).await.is_err() {
                                        return Ok(());
                                    }
                                }
                            }
                            Err(reason) => {
                                self.metrics.inc("ferrite_mqtt_withheld_acks_total", &[], 1);
                                return Err(SessionError::Withheld(reason));
                            }
                        }
                    }
                    () = async { if let Some(t) = throttle.as_mut() { t.await } }, if throttle.is_some() => throttle = None,
                    _ = shutdown.changed() => return Ok(()),
                    () = &mut kicked => return Err(SessionError::Kicked),
                }
            }
        }
        .await;

        // Deliver the acknowledgements already earned before closing.
        while let Some(outcome) = pending.next().await {
            for o in settle(outcome, &mut qos2, &self.broker, &live).unwrap_or_default() {
                let _ = out_tx.send(o).await;
            }
        }
        let reason = match &result {
            Ok(()) if clean => "disconnect",
            Ok(()) if *shutdown.borrow() => "shutdown",
            Err(SessionError::KeepAlive) => "keep_alive",
            Err(SessionError::Kicked) if live.slow.load(Ordering::Acquire) => "slow_subscriber",
            Err(SessionError::Kicked) if live.taken_over.load(Ordering::Acquire) => "taken_over",
            Err(SessionError::Kicked) => "kicked",
            Ok(()) => "lost",
            Err(_) => "error",
        };
        // MQTT 5: the client learns why the server ends its session.
        if v5 && let Some(code) = disconnect_reason(reason, &result) {
            let properties = result.as_ref().err().map(|e| v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(e.to_string()),
                user_properties: Vec::new(),
                server_reference: None,
            });
            let _ = out_tx
                .try_send(Out::V5(Box::new(V5Packet::Disconnect(v5::Disconnect { reason_code: code, properties }))));
        }
        let (with_will, new_expiry) = self.v5_disconnect.lock().take().unwrap_or((false, None));
        let expiry = self
            .v5
            .get()
            .map(|o| new_expiry.unwrap_or(o.session_expiry))
            .and_then(|s| (s != u32::MAX).then(|| Duration::from_secs(u64::from(s))));
        self.broker.session_ended(self.id, &presence, reason, expiry);
        // The tenant's place is free before the client sees its connection close.
        drop(tenant_slot);
        // The live entry holds a sender of the writer's queue: the writer ends (and closes
        // the socket) only once every sender is gone.
        drop(live);
        // No will when the client itself reconnected: its newer session speaks for it.
        let will_props = self.will_props.lock().take();
        // MQTT 5: a will delay (bounded by the session's expiry) that a reconnect cancels.
        let will_delay = self.v5.get().map_or(0, |o| o.will_delay.min(o.session_expiry));
        if (!clean || with_will)
            && reason != "taken_over"
            && will_allowed
            && let Some(will) = &connect.last_will
        {
            let published = match will_key {
                Some(key) if will_delay > 0 => {
                    let will = (will.topic.clone(), will.message.clone(), will.qos, will.retain);
                    self.broker.publish_will_later(key, Duration::from_secs(u64::from(will_delay)), will, will_props);
                    Ok(0)
                }
                _ => {
                    // A Sparkplug edge node's will is its NDEATH.
                    if let Some(Ok(t)) = crate::sparkplug::parse_topic(&will.topic) {
                        let tenant = presence.principal.tenant.clone();
                        let out = self.broker.sparkplug().handle(
                            self.ingestor.catalog(),
                            (&tenant, self.id),
                            &t,
                            &will.message,
                            &mut crate::sparkplug::Builders::new(),
                        );
                        for (device, online, reason) in out.availability {
                            self.broker.availability(&tenant, &device, online, reason);
                        }
                    }
                    self.broker.publish_from(
                        None,
                        &will.topic,
                        will.message.clone(),
                        (will.qos, will.retain),
                        will_props,
                    )
                }
            };
            if let Err(e) = published {
                tracing::warn!(client_id = %connect.client_id, error = %e, "mqtt last will not delivered");
            }
        }
        // The Sparkplug nodes this session gave birth to are gone with it.
        for (tenant, device, reason) in self.broker.sparkplug().session_ended(self.id) {
            self.broker.availability(&tenant, &device, false, reason);
        }
        drop(out_tx);
        // A client that stopped reading cannot hold the session's task: its writer gets
        // FLUSH_WAIT to deliver what is queued (none when it was disconnected as too slow).
        let flush = if reason == "slow_subscriber" { Duration::ZERO } else { FLUSH_WAIT };
        if tokio::time::timeout(flush, &mut writer).await.is_err() {
            writer.abort();
        }
        let bytes_out = written.load(Ordering::Relaxed);
        if self.usage.is_on() {
            let status = match reason {
                "disconnect" | "shutdown" => 200,
                "kicked" => 403,
                "slow_subscriber" => 429,
                "taken_over" => 409,
                "lost" | "keep_alive" => 499,
                _ => 500,
            };
            self.usage.record(UsageRecord {
                at: started_at,
                tenant: tenant.clone(),
                principal: principal_id.clone(),
                transport: self.door.as_str(),
                class: "session",
                route: connect.client_id.clone(),
                method: "CONNECT",
                status,
                reason,
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                bytes_in,
                bytes_out,
                messages,
            });
        }
        result
    }

    /// Handles one packet; returns `true` when the client disconnected cleanly.
    async fn handle(
        &self,
        packet: Packet,
        extra: Extra,
        pending: &mut FuturesOrdered<AckFuture>,
        qos2: &mut Qos2State,
        clean: &mut bool,
        gathered: &mut Gathered,
    ) -> Result<bool, SessionError> {
        // Anything that queues an acknowledgement of its own first hands over the QoS 1
        // messages before it, so that acknowledgements keep arrival order.
        let joins_a_group = matches!(&packet, Packet::Publish(p)
            if p.qos == QoS::AtMostOnce || (p.qos == QoS::AtLeastOnce
                && (parse_telemetry_topic(&p.topic).is_some() || p.topic.starts_with("spBv1.0/"))));
        if !joins_a_group {
            self.hand_over_qos1(gathered, pending);
        }
        match packet {
            Packet::Publish(mut p) => {
                let qos_label = match p.qos {
                    QoS::AtMostOnce => "0",
                    QoS::AtLeastOnce => "1",
                    QoS::ExactlyOnce => "2",
                };
                self.metrics.inc("ferrite_mqtt_messages_total", &[("qos", qos_label)], 1);
                let pkid = p.pkid;
                // The acknowledgement once the message is taken.
                let ack = move || match p.qos {
                    QoS::AtMostOnce => AckOutcome::Nothing,
                    QoS::AtLeastOnce => AckOutcome::Send(Packet::PubAck(PubAck::new(pkid))),
                    QoS::ExactlyOnce => AckOutcome::Qos2Taken(pkid),
                };
                if p.qos == QoS::ExactlyOnce {
                    if qos2.taken.taken.lock().contains(&pkid) {
                        // A retransmission of a message already taken: acknowledge, don't ingest twice.
                        pending.push_back(Box::pin(async move { AckOutcome::Send(Packet::PubRec(PubRec::new(pkid))) }));
                        return Ok(false);
                    }
                    if qos2.in_flight.contains(&pkid) {
                        pending.push_back(Box::pin(async move { AckOutcome::Qos2Duplicate(pkid) }));
                        return Ok(false);
                    }
                    qos2.in_flight.insert(pkid);
                }
                match self.permission(Action::Publish, &p.topic) {
                    Permission::Allowed => {}
                    Permission::Revoked => return Err(SessionError::Protocol("the credentials were revoked".into())),
                    Permission::Denied => {
                        // Dropped; acknowledged in order, MQTT 5 with "not authorized" (MQTT
                        // 3.1.1 has no negative PUBACK: the client would resend it forever).
                        self.hand_over_qos1(gathered, pending);
                        let why = format!("not authorized to publish on {}", p.topic);
                        tracing::debug!(session = self.id, topic = %p.topic, "mqtt publish refused by policy");
                        let refused = self.refusal(p.qos, pkid, V5PubAck::NotAuthorized, why);
                        pending.push_back(Box::pin(async move { refused }));
                        return Ok(false);
                    }
                }
                let props = match extra {
                    Extra::Publish(props) => props,
                    _ => None,
                };
                // MQTT 5 request/response: an answer to a command that carries its id as
                // correlation data gets it in the payload, as the command service reads it.
                if p.topic.ends_with("/commands/result")
                    && let Some(correlation) = props.as_ref().and_then(|pr| pr.correlation_data.as_ref())
                    && let Some(with_id) = mqtt5::with_command_id(&p.payload, correlation)
                {
                    p.payload = with_id;
                }
                // MQTT 5 user properties as fields of telemetry events, when configured (what
                // subscribers get is the message as published).
                let as_fields = (self.user_properties_as_fields && parse_telemetry_topic(&p.topic).is_some())
                    .then(|| props.as_ref().filter(|pr| !pr.user_properties.is_empty()))
                    .flatten()
                    .and_then(|pr| mqtt5::with_fields(&p.payload, &pr.user_properties));
                let routed =
                    self.broker.publish_from(Some(self.id), &p.topic, p.payload.clone(), (p.qos, p.retain), props);
                if let Some(with_fields) = as_fields {
                    p.payload = with_fields;
                }
                if let Err(e) = routed {
                    // A wildcard or NUL in a publish topic is a protocol violation: close.
                    self.reject(&p.topic, "invalid_topic", &e.to_string());
                    return Err(SessionError::Protocol(e.to_string()));
                }
                if let Some(parsed) = crate::sparkplug::parse_topic(&p.topic) {
                    self.sparkplug(parsed, &p, ack, pending, gathered);
                    return Ok(false);
                }
                match parse_telemetry_topic(&p.topic) {
                    Some(t) => {
                        // The stream of the session's tenant: a device's telemetry never
                        // lands in another tenant's stream of the same name.
                        let tenant = self.principal.get().map_or(ferrite_engine::ids::DEFAULT_TENANT, |p| &p.tenant);
                        let (stream, device) = match t.target(tenant) {
                            Ok(target) => target,
                            Err(e) => {
                                self.reject(&p.topic, "invalid_topic", &e.to_string());
                                self.hand_over_qos1(gathered, pending);
                                let refused = self.refusal(p.qos, pkid, V5PubAck::TopicNameInvalid, e.to_string());
                                pending.push_back(Box::pin(async move { refused }));
                                return Ok(false);
                            }
                        };
                        if p.qos == QoS::AtMostOnce {
                            if p.payload.len() > self.ingestor.max_payload_bytes() {
                                let msg = format!("payload of {} bytes exceeds the limit", p.payload.len());
                                self.reject(&p.topic, "payload_too_large", &msg);
                                return Ok(false);
                            }
                            gather(&mut gathered.qos0, device, stream, p.payload, None);
                            return Ok(false);
                        }
                        if p.qos == QoS::AtLeastOnce {
                            if p.payload.len() > self.ingestor.max_payload_bytes() {
                                let msg = format!("payload of {} bytes exceeds the limit", p.payload.len());
                                self.reject(&p.topic, "payload_too_large", &msg);
                                // Acknowledged anyway (or it would come back forever), in order.
                                self.hand_over_qos1(gathered, pending);
                                let refused = self.refusal(p.qos, pkid, V5PubAck::ImplementationSpecificError, msg);
                                pending.push_back(Box::pin(async move { refused }));
                                return Ok(false);
                            }
                            gather(&mut gathered.qos1, device, stream, p.payload, Some(pkid));
                            gathered.qos1_ids.push(pkid);
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
                                    ack()
                                }
                                Err(e) if e.is_not_durable() => {
                                    // Not durable: withhold the acknowledgement so the client resends.
                                    tracing::error!(topic = %topic, error = %e, "mqtt events not committed; withholding the acknowledgement and closing the session");
                                    AckOutcome::Withhold(e.to_string())
                                }
                                Err(e) => {
                                    // The payload itself is bad: acknowledge, or it comes back forever.
                                    tracing::warn!(topic = %topic, error = %e, "mqtt payload rejected");
                                    ack()
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
                        pending.push_back(Box::pin(async move { ack() }));
                    }
                }
            }
            Packet::PubRel(r) => {
                // Settled in order, after the message's own outcome.
                pending.push_back(Box::pin(async move { AckOutcome::Send(Packet::PubComp(PubComp::new(r.pkid))) }));
            }
            Packet::Subscribe(s) => {
                let options = match extra {
                    Extra::Subscribe(o) => o,
                    _ => Vec::new(),
                };
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut codes5 = Vec::with_capacity(s.filters.len());
                let mut retained = Vec::new();
                let mut mine = self.subscriptions.lock();
                for (i, f) in s.filters.into_iter().enumerate() {
                    let o = options.get(i).copied().unwrap_or_default();
                    // A shared subscription ($share/{group}/{filter}) is checked as its filter.
                    let share = crate::broker::shared(&f.path);
                    let inner = share.map_or(f.path.as_str(), |(_, inner)| inner);
                    let refused = if (f.path.starts_with("$share/") && share.is_none())
                        || topic::validate_filter(inner).is_err()
                    {
                        Some((v5::SubscribeReasonCode::TopicFilterInvalid, "invalid_filter"))
                    } else if !matches!(self.permission(Action::Subscribe, inner), Permission::Allowed) {
                        Some((v5::SubscribeReasonCode::NotAuthorized, ""))
                    } else if !mine.contains(&f.path) && mine.len() >= self.max_subscriptions {
                        Some((v5::SubscribeReasonCode::QuotaExceeded, "subscriptions"))
                    } else {
                        None
                    };
                    if let Some((code5, metric)) = refused {
                        if !metric.is_empty() {
                            self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", metric)], 1);
                        }
                        tracing::warn!(session = self.id, filter = %f.path, reason = ?code5, limit = self.max_subscriptions, "mqtt subscription refused");
                        codes.push(SubscribeReasonCode::Failure);
                        codes5.push(code5);
                        continue;
                    }
                    // QoS 1 at most: a QoS 2 request is granted QoS 1.
                    let granted = if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                    let grant =
                        Grant { qos: granted, no_local: o.no_local, retain_as_published: o.retain_as_published };
                    let new = !mine.contains(&f.path);
                    self.broker.subscribe(self.id, &f.path, grant);
                    // Retained messages: not to a shared subscription; MQTT 5 retain handling
                    // 1 only to a new subscription, 2 never.
                    if share.is_none() && (o.retain_handling == 0 || (o.retain_handling == 1 && new)) {
                        retained.extend(self.broker.retained_for(inner, granted));
                    }
                    mine.insert(f.path);
                    codes.push(SubscribeReasonCode::Success(granted));
                    codes5.push(v5::SubscribeReasonCode::Success(mqtt5::qos5(granted)));
                }
                drop(mine);
                let ack = if self.v5.get().is_some() {
                    Out::V5(Box::new(V5Packet::SubAck(v5::SubAck {
                        pkid: s.pkid,
                        return_codes: codes5,
                        properties: None,
                    })))
                } else {
                    Out::from(Packet::SubAck(SubAck::new(s.pkid, codes)))
                };
                // The retained messages the new subscriptions match follow the SUBACK.
                pending.push_back(Box::pin(async move { AckOutcome::SubAck(ack, retained) }));
            }
            Packet::Unsubscribe(u) => {
                let mut mine = self.subscriptions.lock();
                let mut reasons = Vec::with_capacity(u.topics.len());
                for t in &u.topics {
                    self.broker.unsubscribe(self.id, t);
                    reasons.push(if mine.remove(t) {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    });
                }
                drop(mine);
                let ack = if self.v5.get().is_some() {
                    Out::V5(Box::new(V5Packet::UnsubAck(v5::UnsubAck { pkid: u.pkid, reasons, properties: None })))
                } else {
                    Out::from(Packet::UnsubAck(UnsubAck::new(u.pkid)))
                };
                pending.push_back(Box::pin(async move { AckOutcome::Reply(ack, None) }));
            }
            Packet::PingReq => pending.push_back(Box::pin(async { AckOutcome::Send(Packet::PingResp) })),
            Packet::Disconnect => {
                if let Extra::Disconnect { with_will, session_expiry } = extra {
                    *self.v5_disconnect.lock() = Some((with_will, session_expiry));
                }
                *clean = true;
                return Ok(true);
            }
            Packet::PubAck(a) => self.broker.acked(self.id, a.pkid),
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Connect(_) => return Err(SessionError::Protocol("second CONNECT".into())),
            other => return Err(SessionError::Protocol(format!("unexpected packet from client: {other:?}"))),
        }
        Ok(false)
    }

    /// Subscribes a resumed session to its kept filters again, each checked as a new
    /// SUBSCRIBE would be (a policy changed meanwhile drops the filter).
    fn restore_subscriptions(&self, filters: Vec<(String, Grant)>) {
        let mut mine = self.subscriptions.lock();
        for (f, grant) in filters {
            let inner = crate::broker::shared(&f).map_or(f.as_str(), |(_, inner)| inner);
            if mine.len() < self.max_subscriptions
                && topic::validate_filter(inner).is_ok()
                && matches!(self.permission(Action::Subscribe, inner), Permission::Allowed)
            {
                self.broker.subscribe(self.id, &f, grant);
                mine.insert(f);
            } else {
                tracing::info!(session = self.id, filter = %f, "kept subscription not restored: refused now");
                self.broker.unsubscribe(self.id, &f);
            }
        }
    }

    /// Whether the session's principal may `action` on `topic`: asked once per topic, then
    /// from the session's cache until policies, tokens or devices change. A denial is
    /// counted every time and logged the first time (the decision point audits it).
    fn permission(&self, action: Action, topic: &str) -> Permission {
        if !self.access.enabled() {
            return Permission::Allowed;
        }
        let Some(principal) = self.principal.get() else { return Permission::Denied };
        let d = self.decisions.lock().decide(self.access.as_ref(), principal, action, topic, &self.context);
        if d.revoked {
            tracing::warn!(session = self.id, %principal, "mqtt session closed: its credentials no longer hold");
            return Permission::Revoked;
        }
        if d.allowed {
            return Permission::Allowed;
        }
        let reason = if action == Action::Publish { "publish_denied" } else { "subscribe_denied" };
        self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", reason)], 1);
        if d.fresh {
            tracing::warn!(session = self.id, %principal, topic, action = action.as_str(), "mqtt request denied by policy");
        }
        Permission::Denied
    }

    /// Queues the gathered QoS 1 messages as one ingest per device and stream; their
    /// PUBACKs go out together, in arrival order, once every group is committed, or are all
    /// withheld (and the session closed) if any is not.
    fn hand_over_qos1(&self, gathered: &mut Gathered, pending: &mut FuturesOrdered<AckFuture>) {
        if gathered.qos1_ids.is_empty() {
            return;
        }
        let groups = std::mem::take(&mut gathered.qos1);
        let ids = std::mem::take(&mut gathered.qos1_ids);
        let sparkplug = crate::sparkplug::finish(std::mem::take(&mut gathered.sparkplug1));
        let sparkplug_bytes = std::mem::take(&mut gathered.sparkplug_bytes[1]);
        let tenant: Arc<str> =
            self.principal.get().map_or_else(|| Arc::from(ferrite_engine::ids::DEFAULT_TENANT), |p| p.tenant.clone());
        let ingestor = self.ingestor.clone();
        let v5 = self.v5.get().is_some();
        pending.push_back(Box::pin(async move {
            let mut group_ids: Vec<Vec<u16>> = groups.iter().map(|g| g.ids.clone()).collect();
            let mut payloads: Vec<Payload> = groups
                .into_iter()
                .map(|Group { device, stream, payloads, .. }| Payload::JsonMany { stream, device, payloads })
                .collect();
            // The read's Sparkplug rows: one batch per stream, committed with the rest.
            if !sparkplug.is_empty() {
                payloads.push(Payload::Batches { tenant, batches: sparkplug, bytes: sparkplug_bytes });
                group_ids.push(Vec::new());
            }
            let ingests = payloads.into_iter().map(|payload| {
                let ingestor = ingestor.clone();
                async move { ingestor.ingest(Transport::Mqtt, payload, bytes::Bytes::new(), Durability::Committed).await }
            });
            // MQTT 5: a payload the decoder could not read at all gets "payload format invalid".
            let mut refused: HashMap<u16, String> = HashMap::new();
            for (outcome, ids_of_group) in futures_util::future::join_all(ingests).await.into_iter().zip(&group_ids) {
                match outcome {
                    Ok(report) => {
                        for r in &report.rejections {
                            tracing::warn!(reason = r.reason, "mqtt event rejected: {}", r.message);
                            if v5
                                && matches!(r.reason, "malformed_json" | "not_utf8")
                                && let Some(&pkid) = ids_of_group.get(r.index)
                            {
                                refused.insert(pkid, r.message.clone());
                            }
                        }
                    }
                    // MQTT 5 can say it: "quota exceeded" on each PUBACK, and the session lives on.
                    Err(crate::Error::QuotaExceeded(q)) if v5 => {
                        let why = q.to_string();
                        let refuse = |pkid| v5_puback(pkid, V5PubAck::QuotaExceeded, why.clone());
                        return AckOutcome::SendMany(ids.into_iter().map(refuse).collect());
                    }
                    Err(e) if e.is_not_durable() => {
                        tracing::error!(error = %e, "mqtt events not committed; withholding the acknowledgements and closing the session");
                        return AckOutcome::Withhold(e.to_string());
                    }
                    // The payloads themselves are bad: acknowledge, or they come back forever.
                    Err(e) => tracing::warn!(error = %e, "mqtt payloads rejected"),
                }
            }
            let ack = |pkid| match refused.remove(&pkid) {
                Some(why) => v5_puback(pkid, V5PubAck::PayloadFormatInvalid, why),
                None => Out::PubAck(pkid),
            };
            AckOutcome::SendMany(ids.into_iter().map(ack).collect())
        }));
    }

    /// A Sparkplug B message (routed to subscribers already): its rows join the read's
    /// builders (QoS 0 and 1; a QoS 1 one is acknowledged with its read's other messages,
    /// once they are committed; QoS 2 alone), a rebirth request is published, availability
    /// told; a malformed topic or payload is refused and counted, and acknowledged.
    fn sparkplug(
        &self,
        parsed: Result<crate::sparkplug::Topic<'_>, String>,
        p: &rumqttc::mqttbytes::v4::Publish,
        ack: impl FnOnce() -> AckOutcome + Send + 'static,
        pending: &mut FuturesOrdered<AckFuture>,
        gathered: &mut Gathered,
    ) {
        let tenant = self.principal.get().map_or(ferrite_engine::ids::DEFAULT_TENANT, |p| &p.tenant);
        let mut alone = crate::sparkplug::Builders::new();
        let builders = match p.qos {
            QoS::AtMostOnce => &mut gathered.sparkplug0,
            QoS::AtLeastOnce => &mut gathered.sparkplug1,
            QoS::ExactlyOnce => &mut alone,
        };
        let out = match parsed {
            Ok(t) => {
                self.broker.sparkplug().handle(self.ingestor.catalog(), (tenant, self.id), &t, &p.payload, builders)
            }
            Err(e) => {
                self.reject(&p.topic, "invalid_topic", &e);
                crate::sparkplug::Outcome::default()
            }
        };
        tracing::debug!(session = self.id, topic = %p.topic, rows = out.rows, refused = ?out.refused, "sparkplug message");
        if let Some((topic, payload)) = out.rebirth
            && let Err(e) = self.broker.publish(&topic, bytes::Bytes::from(payload), QoS::AtMostOnce, false)
        {
            tracing::warn!(topic, error = %e, "sparkplug rebirth request not sent");
        }
        for (device, online, reason) in out.availability {
            self.broker.availability(tenant, &device, online, reason);
        }
        for (reason, message) in &out.refused_metrics {
            tracing::warn!(topic = %p.topic, reason, "sparkplug metric refused: {message}");
        }
        match p.qos {
            QoS::AtMostOnce => gathered.sparkplug_bytes[0] += p.payload.len(),
            QoS::AtLeastOnce => {
                gathered.sparkplug_bytes[1] += p.payload.len();
                gathered.qos1_ids.push(p.pkid);
            }
            QoS::ExactlyOnce => {
                let batches = crate::sparkplug::finish(alone);
                let ingestor = self.ingestor.clone();
                let payload = Payload::Batches { tenant: tenant.into(), batches, bytes: p.payload.len() };
                pending.push_back(Box::pin(async move {
                    match ingestor.ingest(Transport::Mqtt, payload, bytes::Bytes::new(), Durability::Committed).await {
                        Err(e) if e.is_not_durable() => AckOutcome::Withhold(e.to_string()),
                        _ => ack(),
                    }
                }));
            }
        }
    }

    fn reject(&self, topic: &str, reason: &'static str, message: &str) {
        self.metrics.inc("ferrite_rejected_events_total", &[("transport", "mqtt"), ("reason", reason)], 1);
        tracing::warn!(topic, reason, "mqtt message rejected: {message}");
    }
}

/// Applies an acknowledgement's outcome to the QoS 2 state; the packet to send, if any, or
/// the reason the acknowledgement is withheld.
fn settle(outcome: AckOutcome, qos2: &mut Qos2State, broker: &Broker, live: &LiveSession) -> Result<Vec<Out>, String> {
    match outcome {
        AckOutcome::Nothing => Ok(Vec::new()),
        AckOutcome::Send(Packet::PubComp(c)) => {
            qos2.taken.taken.lock().remove(&c.pkid);
            Ok(vec![Packet::PubComp(c).into()])
        }
        AckOutcome::Send(p) => Ok(vec![p.into()]),
        AckOutcome::SendMany(outs) => Ok(outs),
        AckOutcome::Reply(out, qos2_pkid) => {
            if let Some(pkid) = qos2_pkid {
                qos2.in_flight.remove(&pkid);
            }
            Ok(vec![out])
        }
        AckOutcome::SubAck(ack, retained) => {
            let mut outs = vec![ack];
            outs.extend(broker.retained_outs(live, retained));
            Ok(outs)
        }
        AckOutcome::Qos2Taken(pkid) => {
            qos2.in_flight.remove(&pkid);
            qos2.taken.taken.lock().insert(pkid);
            Ok(vec![Packet::PubRec(PubRec::new(pkid)).into()])
        }
        AckOutcome::Qos2Duplicate(pkid) => Ok(qos2
            .taken
            .taken
            .lock()
            .contains(&pkid)
            .then(|| Out::from(Packet::PubRec(PubRec::new(pkid))))
            .into_iter()
            .collect()),
        AckOutcome::Withhold(reason) => Err(reason),
    }
}

impl Session {
    /// The next complete packet in `buf` in the client's version, as a 3.1.1 packet and
    /// what only MQTT 5 adds; `None` until one is complete.
    fn read_packet(&self, buf: &mut BytesMut) -> Result<Option<(Packet, Extra)>, SessionError> {
        if self.v5.get().is_some() {
            return mqtt5::read(buf, &mut self.aliases.lock()).map_err(SessionError::Violation);
        }
        match Packet::read(buf, MAX_PACKET_BYTES) {
            Ok(p) => Ok(Some((p, Extra::None))),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(SessionError::Protocol(e.to_string())),
        }
    }

    /// Writes the CONNACK in the client's version: `code` for MQTT 3.1.1, `v5code` (and, on
    /// success, what the server supports) for MQTT 5.
    async fn connack<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        code: ConnectReturnCode,
        v5code: V5Code,
        session_present: bool,
    ) -> std::io::Result<()> {
        let Some(options) = self.v5.get() else {
            return write_packet(wr, &Packet::ConnAck(ConnAck::new(code, session_present))).await;
        };
        let properties = (v5code == V5Code::Success).then(|| v5::ConnAckProperties {
            session_expiry_interval: Some(options.session_expiry),
            receive_max: Some(MAX_PENDING_ACKS as u16),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(MAX_PACKET_BYTES as u32),
            assigned_client_identifier: self.assigned_id.lock().clone(),
            topic_alias_max: Some(mqtt5::TOPIC_ALIAS_MAX),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(0),
            shared_subscription_available: Some(1),
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        });
        let ack = V5Packet::ConnAck(v5::ConnAck { session_present, code: v5code, properties });
        let mut b = BytesMut::new();
        ack.write(&mut b, None).map_err(|e| std::io::Error::other(e.to_string()))?;
        wr.write_all(&b).await
    }

    /// A refusal of a PUBLISH: MQTT 5 a PUBACK (QoS 1) or PUBREC (QoS 2) with `reason` and
    /// `why` as its reason string; MQTT 3.1.1 has none, so the usual acknowledgement (or the
    /// client would send it forever).
    fn refusal(&self, qos: QoS, pkid: u16, reason: V5PubAck, why: String) -> AckOutcome {
        match (self.v5.get().is_some(), qos) {
            (_, QoS::AtMostOnce) => AckOutcome::Nothing,
            (true, QoS::AtLeastOnce) => AckOutcome::Reply(v5_puback(pkid, reason, why), None),
            (true, QoS::ExactlyOnce) => {
                let reason = match reason {
                    V5PubAck::NotAuthorized => v5::PubRecReason::NotAuthorized,
                    V5PubAck::TopicNameInvalid => v5::PubRecReason::TopicNameInvalid,
                    V5PubAck::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
                    V5PubAck::PayloadFormatInvalid => v5::PubRecReason::PayloadFormatInvalid,
                    _ => v5::PubRecReason::ImplementationSpecificError,
                };
                let properties = Some(v5::PubRecProperties { reason_string: Some(why), user_properties: Vec::new() });
                let rec = V5Packet::PubRec(v5::PubRec { pkid, reason, properties });
                AckOutcome::Reply(Out::V5(Box::new(rec)), Some(pkid))
            }
            (false, QoS::AtLeastOnce) => AckOutcome::Send(Packet::PubAck(PubAck::new(pkid))),
            (false, QoS::ExactlyOnce) => AckOutcome::Qos2Taken(pkid),
        }
    }
}

/// The DISCONNECT reason an MQTT 5 client gets when the server ends its session.
fn disconnect_reason(reason: &str, result: &Result<(), SessionError>) -> Option<V5Disconnect> {
    Some(match (reason, result) {
        (_, Err(SessionError::Violation(v))) => v.reason,
        ("keep_alive", _) => V5Disconnect::KeepAliveTimeout,
        ("kicked", _) => V5Disconnect::AdministrativeAction,
        ("taken_over", _) => V5Disconnect::SessionTakenOver,
        ("slow_subscriber", _) => V5Disconnect::QuotaExceeded,
        ("shutdown", _) => V5Disconnect::ServerShuttingDown,
        (_, Err(SessionError::Withheld(_))) => V5Disconnect::ServerBusy,
        (_, Err(SessionError::PublishRate)) => V5Disconnect::MessageRateTooHigh,
        (_, Err(SessionError::Protocol(_))) => V5Disconnect::ProtocolError,
        _ => return None,
    })
}

async fn write_packet<W: AsyncWrite + Unpin>(wr: &mut W, p: &Packet) -> std::io::Result<()> {
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

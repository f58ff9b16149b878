//! The embedded broker: routes messages between MQTT sessions (commands to devices,
//! status, alerts to services) and to the server's own subscribers.
//!
//! - A subscription is granted at QoS 0 or 1 (a QoS 2 request gets 1). A message goes to
//!   each subscribed session once, at the lower of its publish QoS and the grant.
//! - QoS 1 deliveries wait for the subscriber's PUBACK in a bounded window per session
//!   ([`MAX_INFLIGHT`]); past it they wait in the session's backlog ([`MAX_QUEUED`]), sent
//!   as acknowledgements free the window. A subscriber whose backlog is full too is
//!   disconnected, and counted: QoS 1 is never dropped silently. QoS 0 deliveries to a
//!   full outgoing queue are dropped and counted.
//! - A persistent session (`clean_session = 0`) keeps its QoS 1 messages while its client
//!   is away, and those it had not acknowledged, up to [`MAX_QUEUED`]; they are sent
//!   again (marked duplicate where they had been sent) when the client resumes.
//! - Retained messages are kept per topic (bounded by [`MAX_RETAINED`] and
//!   [`MAX_RETAINED_BYTES`]) and sent to each new subscription that matches them; an
//!   empty retained payload clears the topic. They are saved in the data directory
//!   ([`Broker::save_retained`]) and loaded at start.
//!
//! A message is built once per publish and shared by every subscriber it reaches: fan-out
//! to a thousand sessions costs a thousand queue pushes, not a thousand copies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use ferrite_engine::Metrics;
use ferrite_engine::metrics::Counter;
use ferrite_engine::plugin::{Presence, PresenceObserver};
use parking_lot::{Mutex, RwLock};
use rumqttc::mqttbytes;
pub use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use tokio::sync::{mpsc, oneshot};

use crate::mqtt5::{self, MessageProps};
use crate::topic::{self, TopicError, TopicTrie};

/// Largest MQTT packet accepted or sent at all.
pub const MAX_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Packets queued towards one session (acknowledgements and deliveries).
pub const SUBSCRIBER_QUEUE: usize = 1024;
/// QoS 1 messages sent to one session and not yet acknowledged; further ones wait in its
/// backlog.
pub const MAX_INFLIGHT: usize = 1024;
/// QoS 1 messages waiting for a session's window, or kept for a persistent session while
/// its client is away; a live subscriber past it is disconnected, and for an absent one
/// further messages are dropped and counted.
pub const MAX_QUEUED: usize = 1024;
/// Most sessions kept between connections; past it, a new persistent session is treated
/// as a clean one (and counted), so that clients cannot grow the server's memory without
/// bound.
pub const MAX_KEPT_SESSIONS: usize = 200_000;
/// Most retained topics; a retained message for a new topic past it is delivered but not
/// retained (and counted).
pub const MAX_RETAINED: usize = 100_000;
/// Most bytes of retained topics and payloads, bounded the same way.
pub const MAX_RETAINED_BYTES: usize = 64 * 1024 * 1024;

/// One published message, shared by every session it is delivered to.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) topic: Box<str>,
    pub(crate) payload: Bytes,
    /// Its retain flag as published (for subscriptions that ask to see it).
    pub(crate) retain: bool,
    /// An MQTT 5 publisher's properties, carried to MQTT 5 subscribers.
    pub(crate) props: Option<Box<MessageProps>>,
}

impl Message {
    fn new(topic: &str, payload: Bytes) -> Self {
        Self { topic: topic.into(), payload, retain: false, props: None }
    }

    /// Whether its message expiry passed (it is then no longer delivered).
    fn expired(&self) -> bool {
        self.props.as_ref().is_some_and(|p| p.expired())
    }
}

/// What a session's writer sends. Acknowledgements and deliveries are inline (16 bytes a
/// slot: an idle connection's queue costs half a KiB), any other packet boxed.
pub(crate) enum Out {
    PubAck(u16),
    Deliver {
        msg: Arc<Message>,
        pkid: u16,
        qos: QoS,
        retain: bool,
        dup: bool,
    },
    Other(Box<Packet>),
    /// An MQTT 5 packet (a reason code, a DISCONNECT), for MQTT 5 sessions only.
    V5(Box<rumqttc::v5::mqttbytes::v5::Packet>),
}

const _: () = assert!(std::mem::size_of::<Out>() <= 16);

impl From<Packet> for Out {
    fn from(p: Packet) -> Self {
        match p {
            Packet::PubAck(a) => Self::PubAck(a.pkid),
            other => Self::Other(Box::new(other)),
        }
    }
}

impl Out {
    /// Encodes the packet for a session of MQTT 3.1.1, or of MQTT 5 (`v5`).
    pub(crate) fn write(&self, buf: &mut BytesMut, v5: bool) -> Result<usize, mqttbytes::Error> {
        match self {
            // A successful PUBACK is the same two bytes in both versions.
            Self::PubAck(pkid) => PubAck::new(*pkid).write(buf),
            Self::Deliver { msg, pkid, qos, retain, dup } if v5 => {
                mqtt5::write_publish(buf, &msg.topic, &msg.payload, (*pkid, *qos, *retain, *dup), msg.props.as_deref())
            }
            Self::Deliver { msg, pkid, qos, retain, dup } => write_publish(buf, msg, *pkid, *qos, *retain, *dup),
            // A v5 session is only sent packets that are the same bytes in both versions
            // here (PUBREC, PUBCOMP, PINGRESP); its SUBACKs and refusals are `V5`.
            Self::Other(p) => p.write(buf, MAX_PACKET_BYTES),
            Self::V5(p) => p.write(buf, None).map_err(|e| mqttbytes::Error::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Encodes a PUBLISH (MQTT 3.1.1 §3.3) straight from a shared message.
fn write_publish(
    buf: &mut BytesMut,
    msg: &Message,
    pkid: u16,
    qos: QoS,
    retain: bool,
    dup: bool,
) -> Result<usize, mqttbytes::Error> {
    let with_id = qos != QoS::AtMostOnce;
    let len = 2 + msg.topic.len() + if with_id { 2 } else { 0 } + msg.payload.len();
    if len > MAX_PACKET_BYTES || msg.topic.len() > usize::from(u16::MAX) {
        return Err(mqttbytes::Error::OutgoingPacketTooLarge { pkt_size: len, max: MAX_PACKET_BYTES });
    }
    let start = buf.len();
    buf.put_u8(0x30 | u8::from(dup) << 3 | (qos as u8) << 1 | u8::from(retain));
    mqtt5::put_varint(buf, len);
    buf.put_u16(msg.topic.len() as u16);
    buf.extend_from_slice(msg.topic.as_bytes());
    if with_id {
        buf.put_u16(pkid);
    }
    buf.extend_from_slice(&msg.payload);
    Ok(buf.len() - start)
}

/// What a subscription was granted: its QoS (0 or 1) and MQTT 5 options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) qos: QoS,
    /// Not to receive the session's own messages.
    pub(crate) no_local: bool,
    /// To see the retain flag as published.
    pub(crate) retain_as_published: bool,
}

/// The lower of two QoS levels (what a subscription granted, and what a message was sent at).
fn lower(a: QoS, b: QoS) -> QoS {
    if (a as u8) < (b as u8) { a } else { b }
}

/// A shared subscription's parts: `$share/{group}/{filter}` as (group, filter).
pub(crate) fn shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    (!group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty()).then_some((group, inner))
}

/// The filter a subscription key (a filter, or a shared subscription) routes by.
fn routing_filter(key: &str) -> &str {
    shared(key).map_or(key, |(_, f)| f)
}

/// A subscriber inside the server: called with each matching message's topic and payload
/// on the publishing session's task (it must not block).
pub type InternalSubscriber = ferrite_engine::plugin::MessageHandler;

/// Why a message could not be handed to a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    /// No session of the device is subscribed to the topic.
    #[error("device {0:?} is not connected and subscribed to {1:?}")]
    NotSubscribed(String, String),
    /// The session's outgoing queue is full, or every packet id is in use.
    #[error("the session of device {0:?} is busy; retry later")]
    Busy(String),
    /// The topic is not a valid publish topic.
    #[error("{0}")]
    Topic(String),
}

/// A QoS 1 message kept for a persistent session.
#[derive(Debug)]
struct Queued {
    msg: Arc<Message>,
    retain: bool,
    /// It was sent before (resent with the DUP flag).
    dup: bool,
}

/// What a persistent session keeps between connections, shared by its connections (a
/// client that reconnects before the server noticed its old connection drop sees the same
/// state).
#[derive(Debug, Default)]
pub(crate) struct KeptSession {
    /// QoS 2 packet ids taken and not yet released.
    pub(crate) taken: Mutex<HashSet<u16>>,
    /// Its subscriptions and their grants, written through on every SUBSCRIBE and
    /// UNSUBSCRIBE.
    pub(crate) filters: Mutex<HashMap<String, Grant>>,
    /// QoS 1 messages waiting for the client, oldest first.
    queue: Mutex<VecDeque<Queued>>,
    /// The live session it is attached to (0: none).
    owner: AtomicU64,
    /// A clean session of the same client replaced it: nothing is parked on it any more.
    discarded: AtomicBool,
    /// When it expires while no connection is attached (MQTT 5 session expiry; `None`:
    /// never).
    expires: Mutex<Option<Instant>>,
    /// Held while a connection attaches to it (registers, restores its subscriptions, takes
    /// over the older connection) and while a connection of it ends, so that the two never
    /// interleave and no message falls between them.
    attach: Mutex<()>,
}

impl KeptSession {
    /// Keeps `msg` for the client; `false` when the queue is full.
    fn enqueue(&self, msg: Arc<Message>, retain: bool, dup: bool) -> bool {
        let mut q = self.queue.lock();
        if q.len() >= MAX_QUEUED {
            return false;
        }
        q.push_back(Queued { msg, retain, dup });
        true
    }

    fn expired(&self) -> bool {
        self.owner.load(Ordering::Acquire) == 0 && self.expires.lock().is_some_and(|t| Instant::now() >= t)
    }
}

/// A QoS 1 message sent to a session and not yet acknowledged.
struct Inflight {
    msg: Arc<Message>,
    retain: bool,
    /// Order of sending (resent in this order).
    seq: u64,
    /// Told when the client acknowledges ([`Broker::deliver`]).
    done: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Unacked {
    /// How many may wait for their PUBACK: [`MAX_INFLIGHT`], or an MQTT 5 client's receive
    /// maximum when lower.
    window: usize,
    next: u16,
    seq: u64,
    waiting: HashMap<u16, Inflight>,
}

/// A live session as the broker knows it.
pub(crate) struct LiveSession {
    id: u64,
    /// Who it is.
    pub(crate) presence: Presence,
    /// Ends it ([`Broker::disconnect`], or a subscriber too slow).
    pub(crate) kick: Arc<tokio::sync::Notify>,
    /// It was kicked for falling behind on its deliveries.
    pub(crate) slow: AtomicBool,
    /// A newer connection of the same client took its place.
    pub(crate) taken_over: AtomicBool,
    /// Its principal and client id (none for an empty client id).
    key: Option<(String, String)>,
    /// Its writer.
    out: mpsc::Sender<Out>,
    /// Its subscriptions and their grants.
    filters: Mutex<HashMap<String, Grant>>,
    /// QoS 1 messages sent to it and not yet acknowledged, by packet id.
    unacked: Mutex<Unacked>,
    /// QoS 1 messages waiting for room in its window (at most [`MAX_QUEUED`]), oldest first.
    backlog: Mutex<VecDeque<Queued>>,
    /// Its state kept across connections, when it asked for a persistent session.
    kept: Option<Arc<KeptSession>>,
    /// It speaks MQTT 5 (commands to it carry a response topic and correlation data).
    v5: bool,
    /// The largest packet it accepts (an MQTT 5 client's maximum packet size).
    max_packet: usize,
}

/// Why a QoS 1 message could not be sent to a session now.
#[derive(Debug, PartialEq, Eq)]
enum SendError {
    /// Its window or its queue is full.
    Full,
    /// Its writer is gone.
    Closed,
}

impl Unacked {
    /// Takes a packet id for a QoS 1 message about to be sent; `None` when the window is full.
    fn reserve(&mut self, msg: Arc<Message>, retain: bool, done: Option<oneshot::Sender<()>>) -> Option<u16> {
        if self.waiting.len() >= self.window {
            return None;
        }
        let pkid = (0..u16::MAX)
            .map(|i| (self.next.wrapping_add(i) % u16::MAX) + 1)
            .find(|id| !self.waiting.contains_key(id))?;
        self.next = pkid;
        self.seq += 1;
        self.waiting.insert(pkid, Inflight { msg, retain, seq: self.seq, done });
        Some(pkid)
    }
}

impl LiveSession {
    /// Limits its QoS 1 messages in flight to `window` (a CoAP observer takes one
    /// confirmable notification at a time, RFC 7641 §4.5.1).
    pub(crate) fn set_window(&self, window: usize) {
        self.unacked.lock().window = window.max(1);
    }

    /// Sends `msg` at QoS 1 and records it until the client acknowledges it.
    fn send_qos1(
        &self,
        msg: Arc<Message>,
        retain: bool,
        dup: bool,
        done: Option<oneshot::Sender<()>>,
    ) -> Result<(), SendError> {
        let mut u = self.unacked.lock();
        let pkid = u.reserve(msg.clone(), retain, done).ok_or(SendError::Full)?;
        let result = match self.out.try_send(Out::Deliver { msg, pkid, qos: QoS::AtLeastOnce, retain, dup }) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        };
        u.waiting.remove(&pkid);
        result
    }

    /// Sends `msg` at QoS 1 behind what waits for the window; `Full` when its backlog is
    /// full too (the subscriber is too slow).
    fn offer_qos1(&self, msg: Arc<Message>, retain: bool) -> Result<(), SendError> {
        let mut backlog = self.backlog.lock();
        backlog.push_back(Queued { msg, retain, dup: false });
        self.drain(&mut backlog);
        if backlog.len() > MAX_QUEUED {
            backlog.pop_back();
            return Err(SendError::Full);
        }
        Ok(())
    }

    /// Sends what waits in its backlog, as far as its window and queue allow.
    fn pump(&self) {
        self.drain(&mut self.backlog.lock());
    }

    fn drain(&self, backlog: &mut VecDeque<Queued>) {
        while let Some(m) = backlog.pop_front() {
            // A message that expired while it waited is not delivered.
            if m.msg.expired() {
                continue;
            }
            if self.send_qos1(m.msg.clone(), m.retain, m.dup, None).is_err() {
                backlog.push_front(m);
                break;
            }
        }
    }
}

/// One session's subscription to one filter.
struct Subscriber {
    /// The live session it was made by (of a parked subscription: the last one).
    session: u64,
    grant: Grant,
    /// A shared subscription's key (`$share/{group}/{filter}`): one member of the group
    /// gets each message.
    share: Option<Arc<str>>,
    to: Target,
}

/// Where a subscription's messages go.
enum Target {
    /// A connected session.
    Live(Arc<LiveSession>),
    /// A persistent session whose client is away: QoS 1 messages wait in its queue.
    Parked(Arc<KeptSession>),
}

impl Subscriber {
    fn is_of(&self, session: u64, kept: Option<&Arc<KeptSession>>) -> bool {
        match &self.to {
            Target::Live(_) => self.session == session,
            Target::Parked(k) => kept.is_some_and(|mine| Arc::ptr_eq(k, mine)),
        }
    }
}

/// Retained messages by topic.
#[derive(Default)]
struct Retained {
    by_topic: HashMap<Box<str>, (Arc<Message>, QoS)>,
    bytes: usize,
    /// Where they are saved, and whether they changed since.
    path: Option<std::path::PathBuf>,
    dirty: bool,
}

/// The first bytes of a retained messages file.
const RETAINED_MAGIC: &[u8] = b"FERRITE-RETAINED-1\n";

/// Retained messages as saved: the magic, then per message its topic (u16 length), payload
/// (u32 length) and QoS (one byte), big-endian.
fn encode_retained<'a>(messages: impl Iterator<Item = &'a (Arc<Message>, QoS)>) -> Vec<u8> {
    let mut out = RETAINED_MAGIC.to_vec();
    for (m, qos) in messages {
        out.extend_from_slice(&(m.topic.len() as u16).to_be_bytes());
        out.extend_from_slice(m.topic.as_bytes());
        out.extend_from_slice(&(m.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&m.payload);
        out.push(*qos as u8);
    }
    out
}

/// The messages of a retained messages file; `None` when it is not one.
fn decode_retained(bytes: &[u8]) -> Option<Vec<(String, Bytes, QoS)>> {
    let mut rest = bytes.strip_prefix(RETAINED_MAGIC)?;
    let mut out = Vec::new();
    let take = |n: usize, rest: &mut &[u8]| -> Option<Vec<u8>> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        *rest = tail;
        Some(head.to_vec())
    };
    while !rest.is_empty() {
        let len = usize::from(u16::from_be_bytes(take(2, &mut rest)?.try_into().ok()?));
        let topic = String::from_utf8(take(len, &mut rest)?).ok()?;
        let len = u32::from_be_bytes(take(4, &mut rest)?.try_into().ok()?) as usize;
        let payload = Bytes::from(take(len, &mut rest)?);
        let qos = match take(1, &mut rest)?[0] {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            _ => return None,
        };
        topic::validate_topic(&topic).ok()?;
        out.push((topic, payload, qos));
    }
    Some(out)
}

/// `ferrite_mqtt_dropped_total`, by reason.
struct Drops {
    /// A live subscriber's queue or backlog was full.
    slow: Arc<Counter>,
    /// An absent client's kept queue was full.
    queue_full: Arc<Counter>,
    /// Past the message's expiry.
    expired: Arc<Counter>,
    /// Larger than an MQTT 5 client's maximum packet size.
    too_large: Arc<Counter>,
}

impl Drops {
    fn new(metrics: &Metrics) -> Self {
        let counter = |reason| metrics.counter("ferrite_mqtt_dropped_total", &[("reason", reason)]);
        Self {
            slow: counter("slow_subscriber"),
            queue_full: counter("session_queue_full"),
            expired: counter("expired"),
            too_large: counter("over_client_max_packet"),
        }
    }
}

/// Subscriptions of all sessions, for routing messages between clients.
pub struct Broker {
    metrics: Arc<Metrics>,
    /// Deliveries dropped, by reason (made once: drops come in floods, when a lookup
    /// per drop would cost most).
    dropped: Drops,
    subs: RwLock<TopicTrie<Subscriber>>,
    /// Live sessions, for [`Broker::disconnect`] and QoS 1 delivery to one device.
    sessions: Mutex<HashMap<u64, Arc<LiveSession>>>,
    /// The live session of each principal and client id (a newer one takes over).
    by_client: Mutex<HashMap<(String, String), u64>>,
    /// Told of every session's start and end.
    observers: RwLock<Vec<Arc<dyn PresenceObserver>>>,
    /// The server's own subscribers (command results, reported state), by filter.
    internal: RwLock<Vec<(String, InternalSubscriber)>>,
    /// Whether there is any (the publish path skips the lock otherwise).
    has_internal: AtomicBool,
    /// Sessions of clients that connected with `clean_session = 0`, between connections,
    /// by principal and client id.
    kept: Mutex<HashMap<(String, String), Arc<KeptSession>>>,
    retained: RwLock<Retained>,
    /// Whose turn it is in shared subscription groups.
    turn: AtomicU64,
    /// Last wills waiting for their delay (MQTT 5), by client: a reconnect cancels them.
    pending_wills: Mutex<HashMap<(String, String), (u64, tokio::task::AbortHandle)>>,
    /// The Sparkplug B state of the edge nodes that publish here.
    sparkplug: crate::sparkplug::Sparkplug,
}

impl Default for Broker {
    fn default() -> Self {
        Self::new(Arc::new(Metrics::new()))
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("subscriptions", &self.subs.read().len()).finish()
    }
}

impl Broker {
    /// The Sparkplug B state of the edge nodes that publish here.
    pub fn sparkplug(&self) -> &crate::sparkplug::Sparkplug {
        &self.sparkplug
    }

    /// Tells the presence observers that `device` of `tenant` (a Sparkplug B node or device,
    /// with no MQTT session of its own) came online or went offline.
    pub(crate) fn availability(&self, tenant: &str, device: &str, online: bool, reason: &'static str) {
        for o in self.observers.read().iter() {
            o.availability(tenant, device, online, reason);
        }
    }

    /// A command to a Sparkplug B device, sent as its DCMD (or its node's NCMD) at QoS 0 as
    /// Sparkplug sends commands: `None` when `device` is not a Sparkplug device that was born,
    /// or `payload` is not a command (`{"name", "params"}`).
    fn sparkplug_command(&self, device: &str, topic: &str, payload: &[u8]) -> Option<Result<(), String>> {
        let own_commands = topic.strip_prefix("devices/").and_then(|t| t.strip_prefix(device)) == Some("/commands");
        if !own_commands {
            return None;
        }
        let (cmd_topic, bytes) = match self.sparkplug.command(None, device, payload)? {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        self.metrics.inc("ferrite_sparkplug_commands_total", &[], 1);
        Some(
            self.publish(&cmd_topic, Bytes::from(bytes), QoS::AtMostOnce, false).map(|_| ()).map_err(|e| e.to_string()),
        )
    }
}

impl ferrite_engine::plugin::TopicPublisher for Broker {
    fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> Result<usize, String> {
        Broker::publish(self, topic, Bytes::copy_from_slice(payload), QoS::AtLeastOnce, retain)
            .map_err(|e| e.to_string())
    }

    fn disconnect(&self, id: &str) -> usize {
        let sessions = self.sessions.lock();
        let mut n = 0;
        for s in sessions.values() {
            if s.presence.device() == id {
                s.kick.notify_one();
                n += 1;
            }
        }
        n
    }

    fn observe_presence(&self, observer: Arc<dyn PresenceObserver>) {
        self.observers.write().push(observer);
    }

    fn deliver(&self, device: &str, topic: &str, payload: &[u8]) -> Result<ferrite_engine::plugin::Delivery, String> {
        if let Some(sent) = self.sparkplug_command(device, topic, payload) {
            sent?;
            return Ok(Box::pin(async { Ok(()) }));
        }
        let acked = Broker::deliver(self, device, topic, Bytes::copy_from_slice(payload)).map_err(|e| e.to_string())?;
        Ok(Box::pin(
            async move { acked.await.map_err(|_| "the session ended before the device acknowledged".to_owned()) },
        ))
    }

    fn subscribe_internal(&self, filter: &str, handler: InternalSubscriber) {
        self.internal.write().push((filter.to_owned(), handler));
        self.has_internal.store(true, Ordering::Relaxed);
    }
}

impl Broker {
    /// An empty broker counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            sparkplug: crate::sparkplug::Sparkplug::new(metrics.clone()),
            dropped: Drops::new(&metrics),
            metrics,
            subs: RwLock::default(),
            sessions: Mutex::default(),
            by_client: Mutex::default(),
            observers: RwLock::default(),
            internal: RwLock::default(),
            has_internal: AtomicBool::new(false),
            kept: Mutex::default(),
            retained: RwLock::default(),
            turn: AtomicU64::new(0),
            pending_wills: Mutex::default(),
        }
    }

    /// Delivers a message to every session with a matching subscription (once per session,
    /// however many of its filters match, at the lower of `qos` and the subscription's) and
    /// to the server's own subscribers; returns how many got it. With `retain`, the message
    /// is also kept for future subscribers (an empty payload clears the topic). A topic that
    /// is not a valid publish topic reaches nobody and is an error.
    pub fn publish(&self, topic: &str, payload: Bytes, qos: QoS, retain: bool) -> Result<usize, TopicError> {
        self.publish_from(None, topic, payload, (qos, retain), None)
    }

    /// [`Broker::publish`] of a message a session sent (`from`: not delivered back to it
    /// where its subscription says no local), with an MQTT 5 publisher's properties.
    pub(crate) fn publish_from(
        &self,
        from: Option<u64>,
        topic: &str,
        payload: Bytes,
        (qos, retain): (QoS, bool),
        props: Option<Box<MessageProps>>,
    ) -> Result<usize, TopicError> {
        topic::validate_topic(topic)?;
        let mut props = props;
        let mut msg: Option<Arc<Message>> = None;
        let mut message = || {
            msg.get_or_insert_with(|| {
                Arc::new(Message { topic: topic.into(), payload: payload.clone(), retain, props: props.take() })
            })
            .clone()
        };
        if retain {
            self.retain(message(), qos);
        }
        let mut delivered = 0;
        {
            let subs = self.subs.read();
            let mut targets: Vec<&Subscriber> = Vec::new();
            let mut shared: Vec<&Subscriber> = Vec::new();
            subs.for_each_match(topic, |s| {
                if s.share.is_some() {
                    shared.push(s);
                } else if !(s.grant.no_local && from == Some(s.session)) {
                    targets.push(s);
                }
            });
            if targets.len() > 1 {
                // Once per session, at the highest QoS among its matching filters.
                targets.sort_unstable_by(|a, b| {
                    a.session.cmp(&b.session).then((b.grant.qos as u8).cmp(&(a.grant.qos as u8)))
                });
                targets.dedup_by_key(|s| s.session);
            }
            for s in targets {
                if self.send_to(s, message(), qos) {
                    delivered += 1;
                }
            }
            if !shared.is_empty() {
                delivered += self.send_shared(shared, &mut message, qos);
            }
        }
        if self.has_internal.load(Ordering::Relaxed) {
            for (filter, handler) in self.internal.read().iter() {
                if topic::matches(topic, filter) {
                    handler(topic, &payload);
                    delivered += 1;
                }
            }
        }
        Ok(delivered)
    }

    /// Sends one message to one subscription, at the lower of `qos` and its grant.
    fn send_to(&self, s: &Subscriber, msg: Arc<Message>, qos: QoS) -> bool {
        let qos = lower(s.grant.qos, qos);
        let retain = s.grant.retain_as_published && msg.retain;
        self.send(&s.to, msg, qos, retain)
    }

    /// One member of each shared subscription group gets the message: the next one in turn
    /// that is connected (a parked member only when none is); how many groups got it.
    fn send_shared(
        &self,
        mut members: Vec<&Subscriber>,
        message: &mut impl FnMut() -> Arc<Message>,
        qos: QoS,
    ) -> usize {
        members.sort_unstable_by(|a, b| a.share.cmp(&b.share).then(a.session.cmp(&b.session)));
        let mut delivered = 0;
        for group in members.chunk_by(|a, b| a.share == b.share) {
            let start = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
            let live = (0..group.len()).map(|i| group[(start + i) % group.len()]);
            let mut order = live
                .clone()
                .filter(|s| matches!(s.to, Target::Live(_)))
                .chain(live.filter(|s| matches!(s.to, Target::Parked(_))));
            if order.any(|s| self.send_to(s, message(), qos)) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Sends one message to one subscription's target; whether it was sent or kept.
    fn send(&self, to: &Target, msg: Arc<Message>, qos: QoS, retain: bool) -> bool {
        if msg.expired() {
            self.dropped.expired.add(1);
            return false;
        }
        // Over an MQTT 5 client's maximum packet size (a bound on what it is sent): not sent.
        if let Target::Live(s) = to
            && msg.topic.len() + msg.payload.len() + 16 > s.max_packet
        {
            self.dropped.too_large.add(1);
            return false;
        }
        match (to, qos) {
            (Target::Live(s), QoS::AtMostOnce) => {
                let sent = s.out.try_send(Out::Deliver { msg, pkid: 0, qos, retain, dup: false }).is_ok();
                if !sent {
                    self.dropped.slow.add(1);
                }
                sent
            }
            (Target::Live(s), _) => match s.offer_qos1(msg.clone(), retain) {
                Ok(()) => true,
                Err(_) => {
                    self.too_slow(s);
                    // Kept for its next connection when it has a persistent session.
                    let kept = s.kept.as_ref().is_some_and(|k| k.enqueue(msg, retain, false));
                    if !kept {
                        self.dropped.slow.add(1);
                    }
                    kept
                }
            },
            (Target::Parked(_), QoS::AtMostOnce) => false,
            (Target::Parked(k), _) => {
                let kept = k.enqueue(msg, retain, false);
                if !kept {
                    self.dropped.queue_full.add(1);
                }
                kept
            }
        }
    }

    /// Disconnects a subscriber that fell behind its deliveries (once).
    fn too_slow(&self, s: &LiveSession) {
        if !s.slow.swap(true, Ordering::AcqRel) {
            self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", "slow_subscriber")], 1);
            tracing::warn!(
                session = s.id,
                client_id = %s.presence.client_id,
                window = MAX_INFLIGHT,
                "mqtt subscriber disconnected: it fell behind its QoS 1 deliveries"
            );
            s.kick.notify_one();
        }
    }

    /// Keeps `msg` as its topic's retained message, within the bounds.
    fn retain(&self, msg: Arc<Message>, qos: QoS) {
        let mut r = self.retained.write();
        let old = r.by_topic.get(&msg.topic).map_or(0, |(m, _)| m.topic.len() + m.payload.len());
        if msg.payload.is_empty() {
            if r.by_topic.remove(&msg.topic).is_some() {
                r.dirty = true;
            }
            r.bytes -= old;
            return;
        }
        let size = msg.topic.len() + msg.payload.len();
        if r.bytes - old + size > MAX_RETAINED_BYTES || (old == 0 && r.by_topic.len() >= MAX_RETAINED) {
            self.metrics.inc("ferrite_mqtt_refused_total", &[("reason", "retained_full")], 1);
            tracing::warn!(topic = %msg.topic, "mqtt retained message not kept: the retained store is full");
            return;
        }
        r.bytes = r.bytes - old + size;
        r.dirty = true;
        r.by_topic.insert(msg.topic.clone(), (msg, qos));
    }

    /// Loads the retained messages saved at `path` (none when it does not exist) and saves
    /// them there from now on ([`Broker::save_retained`]); how many. A file that is not
    /// valid is moved aside (`.corrupt`, never deleted) and logged.
    pub fn load_retained(&self, path: std::path::PathBuf) -> std::io::Result<usize> {
        let loaded = match std::fs::read(&path) {
            Ok(bytes) => match decode_retained(&bytes) {
                Some(messages) => messages,
                None => {
                    let aside = path.with_extension("corrupt");
                    tracing::error!(file = %path.display(), moved_to = %aside.display(), "retained messages file is not valid: moved aside, starting without retained messages");
                    std::fs::rename(&path, &aside)?;
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let n = loaded.len();
        for (topic, payload, qos) in loaded {
            let mut msg = Message::new(&topic, payload);
            msg.retain = true;
            self.retain(Arc::new(msg), qos);
        }
        let mut r = self.retained.write();
        r.dirty = false;
        r.path = Some(path);
        Ok(n)
    }

    /// Saves the retained messages when they changed since the last save (write, fsync,
    /// rename: a crash leaves the previous save or this one). Their MQTT 5 properties are not
    /// saved.
    pub fn save_retained(&self) -> std::io::Result<()> {
        let (path, bytes) = {
            let mut r = self.retained.write();
            let Some(path) = r.path.clone().filter(|_| r.dirty) else { return Ok(()) };
            r.dirty = false;
            (path, encode_retained(r.by_topic.values()))
        };
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    }

    /// The retained messages a new subscription to `filter` receives, with their QoS
    /// (the lower of the message's and the subscription's `granted`).
    pub(crate) fn retained_for(&self, filter: &str, granted: QoS) -> Vec<(Arc<Message>, QoS)> {
        let r = self.retained.read();
        if r.by_topic.is_empty() {
            return Vec::new();
        }
        let at = |(m, q): &(Arc<Message>, QoS)| (m.clone(), lower(*q, granted));
        // An expired retained message is no longer sent.
        let live = |(m, _): &&(Arc<Message>, QoS)| !m.expired();
        if !filter.contains(['+', '#']) {
            return r.by_topic.get(filter).filter(live).map(at).into_iter().collect();
        }
        r.by_topic.iter().filter(|(t, m)| topic::matches(t, filter) && live(m)).map(|(_, m)| at(m)).collect()
    }

    /// How many topics hold a retained message.
    pub fn retained_count(&self) -> usize {
        self.retained.read().by_topic.len()
    }

    /// Sends `payload` at QoS 1 on `topic` to one session of `device` subscribed to it (or,
    /// for a gateway's child, to a session of the gateway subscribed to it); the
    /// receiver resolves when the device acknowledges (PUBACK), and fails if the session
    /// ends first.
    pub fn deliver(&self, device: &str, topic: &str, payload: Bytes) -> Result<oneshot::Receiver<()>, DeliveryError> {
        topic::validate_topic(topic).map_err(|e| DeliveryError::Topic(e.to_string()))?;
        // The device's own session first; else a session of its gateway that subscribed for it.
        let session = {
            let sessions = self.sessions.lock();
            let subscribed =
                |s: &&Arc<LiveSession>| s.filters.lock().keys().any(|f| topic::matches(topic, routing_filter(f)));
            let own = sessions.values().filter(|s| s.presence.device() == device).find(subscribed);
            own.or_else(|| {
                sessions.values().filter(|s| s.presence.principal.children.iter().any(|c| c == device)).find(subscribed)
            })
            .cloned()
            .ok_or_else(|| DeliveryError::NotSubscribed(device.to_owned(), topic.to_owned()))?
        };
        let (tx, rx) = oneshot::channel();
        let mut msg = Message::new(topic, payload);
        // MQTT 5 request/response: the device answers on the response topic, with the
        // command's id as correlation data.
        if session.v5
            && let Ok(serde_json::Value::Object(command)) = serde_json::from_slice(&msg.payload)
            && let Some(serde_json::Value::String(id)) = command.get("id")
        {
            msg.props = Some(Box::new(MessageProps {
                response_topic: Some(format!("{topic}/result")),
                correlation_data: Some(Bytes::copy_from_slice(id.as_bytes())),
                ..MessageProps::default()
            }));
        }
        let msg = Arc::new(msg);
        session.send_qos1(msg, false, false, Some(tx)).map_err(|_| DeliveryError::Busy(device.to_owned()))?;
        Ok(rx)
    }

    /// A PUBACK from `session` for a message the server sent it.
    pub(crate) fn acked(&self, session: u64, pkid: u16) {
        let Some(live) = self.sessions.lock().get(&session).cloned() else { return };
        let done = live.unacked.lock().waiting.remove(&pkid).and_then(|i| i.done);
        if let Some(tx) = done {
            let _ = tx.send(());
        }
        live.pump();
    }

    /// Subscribes `session` to `filter` (a valid filter) at `qos` (0 or 1); a repeated
    /// filter replaces the earlier grant, and a parked subscription of the session's kept
    /// state is taken over. The observers learn of it (a device subscribing to its commands
    /// gets what waits).
    pub(crate) fn subscribe(&self, session: u64, filter: &str, grant: Grant) {
        let Some(live) = self.sessions.lock().get(&session).cloned() else { return };
        let share: Option<Arc<str>> = shared(filter).map(|_| Arc::from(filter));
        {
            let mut subs = self.subs.write();
            let route = routing_filter(filter);
            subs.remove(route, |s| s.is_of(session, live.kept.as_ref()) && s.share == share);
            subs.insert(route, Subscriber { session, grant, share, to: Target::Live(live.clone()) });
            live.filters.lock().insert(filter.to_owned(), grant);
        }
        if let Some(k) = &live.kept {
            k.filters.lock().insert(filter.to_owned(), grant);
        }
        for o in self.observers.read().iter() {
            o.subscribed(&live.presence, filter);
        }
    }

    /// Ends `session`'s subscription to `filter` (and its kept state's).
    pub(crate) fn unsubscribe(&self, session: u64, filter: &str) {
        let live = self.sessions.lock().get(&session).cloned();
        let kept = live.as_ref().and_then(|l| l.kept.clone());
        let share: Option<Arc<str>> = shared(filter).map(|_| Arc::from(filter));
        self.subs.write().remove(routing_filter(filter), |s| s.is_of(session, kept.as_ref()) && s.share == share);
        if let Some(live) = live {
            live.filters.lock().remove(filter);
        }
        if let Some(k) = kept {
            k.filters.lock().remove(filter);
        }
    }

    /// The session state of a connecting client and whether it existed before: a clean
    /// session drops what was kept and keeps nothing; a persistent one resumes or starts
    /// its kept state (`None` when the store is full).
    pub(crate) fn session_state(
        &self,
        key: (String, String),
        clean_start: bool,
        keep: bool,
    ) -> (Option<Arc<KeptSession>>, bool) {
        let mut kept = self.kept.lock();
        let expired = kept.get(&key).is_some_and(|k| k.expired());
        if (clean_start || expired)
            && let Some(old) = kept.remove(&key)
        {
            drop(kept);
            self.discard(&old);
            kept = self.kept.lock();
        }
        if let Some(k) = kept.get(&key) {
            // Resumed; with `keep` false (MQTT 5, expiry 0) it ends with this connection.
            return (Some(k.clone()), true);
        }
        if !keep {
            return (None, false);
        }
        if kept.len() >= MAX_KEPT_SESSIONS {
            // Expired sessions make room first.
            let gone: Vec<_> = kept.iter().filter(|(_, k)| k.expired()).map(|(key, _)| key.clone()).collect();
            let old: Vec<_> = gone.iter().filter_map(|key| kept.remove(key)).collect();
            drop(kept);
            old.iter().for_each(|k| self.discard(k));
            kept = self.kept.lock();
            if kept.len() >= MAX_KEPT_SESSIONS {
                return (None, false);
            }
        }
        let k = Arc::new(KeptSession::default());
        kept.insert(key, k.clone());
        (Some(k), false)
    }

    /// Removes the parked subscriptions of a kept state no client will resume.
    fn discard(&self, old: &Arc<KeptSession>) {
        old.discarded.store(true, Ordering::Release);
        let filters: Vec<String> = old.filters.lock().keys().cloned().collect();
        let mut subs = self.subs.write();
        for f in filters {
            subs.remove(routing_filter(&f), |s| matches!(&s.to, Target::Parked(k) if Arc::ptr_eq(k, old)));
        }
        old.queue.lock().clear();
    }

    /// Registers an accepted session of the client `key` (principal and client id; none for
    /// an empty client id) with its `kept` state: `restore` gets the kept subscriptions to
    /// subscribe again; then the client's older connection, if any, is ended (MQTT 3.1.1
    /// §3.1.4), and what waits for the client is sent. All of it under the kept state's
    /// attach lock.
    pub(crate) fn attach(
        &self,
        session: u64,
        key: Option<(String, String)>,
        presence: &Presence,
        out: mpsc::Sender<Out>,
        (kept, v5): (Option<Arc<KeptSession>>, Option<&mqtt5::ConnectOptions>),
        restore: impl FnOnce(Vec<(String, Grant)>),
    ) -> Arc<LiveSession> {
        let _attach = kept.as_ref().map(|k| k.attach.lock());
        if let Some(k) = &kept {
            k.owner.store(session, Ordering::Release);
        }
        // The client is back before its will's delay ran out: no will.
        if let Some((_, will)) = key.as_ref().and_then(|k| self.pending_wills.lock().remove(k)) {
            will.abort();
            self.metrics.inc("ferrite_mqtt_wills_cancelled_total", &[], 1);
        }
        let live = Arc::new(LiveSession {
            id: session,
            presence: presence.clone(),
            kick: Arc::new(tokio::sync::Notify::new()),
            slow: AtomicBool::new(false),
            taken_over: AtomicBool::new(false),
            key: key.clone(),
            out,
            filters: Mutex::default(),
            unacked: Mutex::new(Unacked {
                window: v5.and_then(|o| o.receive_max).map_or(MAX_INFLIGHT, |r| usize::from(r).min(MAX_INFLIGHT)),
                ..Unacked::default()
            }),
            backlog: Mutex::default(),
            kept: kept.clone(),
            v5: v5.is_some(),
            max_packet: v5.and_then(|o| o.max_packet).map_or(MAX_PACKET_BYTES, |m| m as usize),
        });
        let previous = {
            let mut sessions = self.sessions.lock();
            sessions.insert(session, live.clone());
            let previous = key.and_then(|k| self.by_client.lock().insert(k, session));
            previous.and_then(|p| sessions.get(&p).cloned())
        };
        for o in self.observers.read().iter() {
            o.connected(presence);
        }
        // The client's older connection ends once this one has its subscriptions (so that no
        // message falls between the two).
        if let Some(k) = &kept {
            let filters = k.filters.lock().iter().map(|(f, g)| (f.clone(), *g)).collect();
            restore(filters);
        }
        self.resume(&live, previous);
        live
    }

    /// Publishes a client's last will after `delay`, unless the client reconnects first.
    pub(crate) fn publish_will_later(
        self: &Arc<Self>,
        key: (String, String),
        delay: std::time::Duration,
        (topic, payload, qos, retain): (String, Bytes, QoS, bool),
        props: Option<Box<MessageProps>>,
    ) {
        self.metrics.inc("ferrite_mqtt_wills_delayed_total", &[], 1);
        let id = self.turn.fetch_add(1, Ordering::Relaxed);
        let broker = self.clone();
        let will_key = key.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mine = {
                let mut pending = broker.pending_wills.lock();
                let mine = pending.get(&will_key).is_some_and(|(w, _)| *w == id);
                if mine {
                    pending.remove(&will_key);
                }
                mine
            };
            if mine && let Err(e) = broker.publish_from(None, &topic, payload, (qos, retain), props) {
                tracing::warn!(error = %e, "mqtt last will not delivered");
            }
        });
        if let Some((_, older)) = self.pending_wills.lock().insert(key, (id, task.abort_handle())) {
            older.abort();
        }
    }

    /// Ends `previous` for a newer connection of its client: it gets no more messages, and
    /// what it had not acknowledged goes to its kept state (if it is still kept).
    fn take_over(&self, previous: &LiveSession) {
        previous.taken_over.store(true, Ordering::Release);
        tracing::info!(session = previous.id, client_id = %previous.presence.client_id, "mqtt session taken over by a newer connection of its client");
        {
            // Under the routing table's lock, as `subscribe` writes both.
            let mut subs = self.subs.write();
            let filters = std::mem::take(&mut *previous.filters.lock());
            for f in filters.keys() {
                subs.remove(routing_filter(f), |s| s.session == previous.id && matches!(s.to, Target::Live(_)));
            }
        }
        let unacked = previous.unacked.lock().waiting.drain().map(|(_, i)| i).collect();
        let backlog = std::mem::take(&mut *previous.backlog.lock());
        if let Some(k) = previous.kept.as_ref().filter(|k| !k.discarded.load(Ordering::Acquire)) {
            self.requeue(k, unacked, backlog);
        }
        previous.kick.notify_one();
    }

    /// Puts messages a session had not acknowledged, then its backlog, back at the front of
    /// its kept queue.
    fn requeue(&self, kept: &KeptSession, mut unacked: Vec<Inflight>, backlog: VecDeque<Queued>) {
        unacked.sort_unstable_by_key(|i| i.seq);
        let mut q = kept.queue.lock();
        for m in backlog.into_iter().rev() {
            q.push_front(m);
        }
        for i in unacked.into_iter().rev() {
            q.push_front(Queued { msg: i.msg, retain: i.retain, dup: true });
        }
        let over = q.len().saturating_sub(MAX_QUEUED);
        if over > 0 {
            q.truncate(MAX_QUEUED);
            self.dropped.queue_full.add(over as u64);
        }
    }

    /// Ends the connection `live` replaces (MQTT 3.1.1 §3.1.4: a newer connection of a
    /// client takes the place of the older; its unacknowledged messages move to the newer
    /// one with a persistent session); then sends what the kept state holds, as far as the
    /// window allows (the rest waits in the backlog). Called once `live` has its
    /// subscriptions back.
    fn resume(&self, live: &LiveSession, previous: Option<Arc<LiveSession>>) {
        if let Some(previous) = previous {
            self.take_over(&previous);
        }
        self.pump_kept(live);
    }

    /// Moves what the kept state holds to the front of `live`'s backlog and sends it.
    fn pump_kept(&self, live: &LiveSession) {
        let Some(kept) = &live.kept else { return };
        let mut waiting = std::mem::take(&mut *kept.queue.lock());
        let mut backlog = live.backlog.lock();
        waiting.append(&mut backlog);
        *backlog = waiting;
        live.drain(&mut backlog);
    }

    /// Forgets an ended session and tells the observers why it ended. A persistent
    /// session's subscriptions are parked (its QoS 1 messages wait for the client), with
    /// what it had not acknowledged first in its queue.
    /// `expiry`: how long the kept state outlives the connection (`None`: forever; zero: it
    /// ends now).
    pub(crate) fn session_ended(
        &self,
        session: u64,
        presence: &Presence,
        reason: &'static str,
        expiry: Option<std::time::Duration>,
    ) {
        let live = self.sessions.lock().remove(&session);
        if let Some(live) = live {
            let _attach = live.kept.as_ref().map(|k| k.attach.lock());
            if let Some(key) = &live.key {
                let mut by_client = self.by_client.lock();
                if by_client.get(key) == Some(&session) {
                    by_client.remove(key);
                }
            }
            let mut subs = self.subs.write();
            let filters = std::mem::take(&mut *live.filters.lock());
            // Parked only if no newer connection took the kept state over, nor a clean one dropped it.
            let park = live.kept.as_ref().filter(|k| {
                !k.discarded.load(Ordering::Acquire)
                    && k.owner.compare_exchange(session, 0, Ordering::AcqRel, Ordering::Acquire).is_ok()
            });
            for (f, grant) in filters {
                let route = routing_filter(&f);
                subs.remove(route, |s| s.session == session && matches!(s.to, Target::Live(_)));
                if let Some(k) = park {
                    let share = shared(&f).map(|_| Arc::from(f.as_str()));
                    subs.insert(route, Subscriber { session, grant, share, to: Target::Parked(k.clone()) });
                }
            }
            drop(subs);
            // Taken only now that no publish can reach it any more.
            let unacked: Vec<Inflight> = live.unacked.lock().waiting.drain().map(|(_, i)| i).collect();
            let backlog = std::mem::take(&mut *live.backlog.lock());
            // What it had not acknowledged stays the client's, whichever connection serves it:
            // kept for the next one, or handed to a newer one already resumed.
            if let Some(k) = live.kept.as_ref().filter(|k| !k.discarded.load(Ordering::Acquire)) {
                self.requeue(k, unacked, backlog);
                if park.is_some() {
                    *k.expires.lock() = expiry.map(|d| Instant::now() + d);
                    if expiry == Some(std::time::Duration::ZERO)
                        && let Some(key) = &live.key
                    {
                        let mut kept = self.kept.lock();
                        if kept.get(key).is_some_and(|mine| Arc::ptr_eq(mine, k)) {
                            kept.remove(key);
                        }
                        drop(kept);
                        drop(_attach);
                        self.discard(k);
                        for o in self.observers.read().iter() {
                            o.disconnected(presence, reason);
                        }
                        return;
                    }
                }
                if park.is_none() {
                    let owner = k.owner.load(Ordering::Acquire);
                    let newer = self.sessions.lock().get(&owner).cloned();
                    if let Some(newer) = newer {
                        self.pump_kept(&newer);
                    }
                }
            }
        }
        for o in self.observers.read().iter() {
            o.disconnected(presence, reason);
        }
    }

    /// Sends the retained messages a new subscription matched, after its SUBACK; those at
    /// QoS 1 count against the session's window (past it they are dropped and counted).
    pub(crate) fn retained_outs(&self, live: &LiveSession, retained: Vec<(Arc<Message>, QoS)>) -> Vec<Out> {
        let mut outs = Vec::with_capacity(retained.len());
        for (msg, qos) in retained {
            if qos == QoS::AtMostOnce {
                outs.push(Out::Deliver { msg, pkid: 0, qos, retain: true, dup: false });
                continue;
            }
            // Through the session's own window; the SUBACK went out first.
            let Some(pkid) = live.unacked.lock().reserve(msg.clone(), true, None) else {
                self.dropped.slow.add(1);
                continue;
            };
            outs.push(Out::Deliver { msg, pkid, qos: QoS::AtLeastOnce, retain: true, dup: false });
        }
        outs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(buf: &mut BytesMut) -> rumqttc::mqttbytes::v4::Publish {
        match Packet::read(buf, MAX_PACKET_BYTES) {
            Ok(Packet::Publish(p)) => p,
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[test]
    fn shared_messages_encode_as_the_codec_reads_them() -> Result<(), mqttbytes::Error> {
        for (qos, payload_len) in [(QoS::AtMostOnce, 0), (QoS::AtLeastOnce, 5), (QoS::AtLeastOnce, 200_000)] {
            let msg = Message::new("devices/d1/commands", Bytes::from(vec![7u8; payload_len]));
            let mut buf = BytesMut::new();
            let n = write_publish(&mut buf, &msg, 513, qos, true, qos != QoS::AtMostOnce)?;
            assert_eq!(n, buf.len());
            let p = decode(&mut buf);
            assert_eq!((p.topic.as_str(), p.qos, p.retain), ("devices/d1/commands", qos, true));
            assert_eq!(p.dup, qos != QoS::AtMostOnce);
            assert_eq!(p.payload.len(), payload_len);
            if qos != QoS::AtMostOnce {
                assert_eq!(p.pkid, 513);
            }
        }
        Ok(())
    }

    #[test]
    fn retained_messages_are_saved_loaded_and_a_damaged_file_is_moved_aside() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("retained.bin");
        let broker = Broker::default();
        assert_eq!(broker.load_retained(path.clone())?, 0);
        broker.publish("devices/d1/status", Bytes::from_static(b"online"), QoS::AtLeastOnce, true)?;
        broker.publish("devices/d2/status", Bytes::from_static(&[0, 255, 7]), QoS::AtMostOnce, true)?;
        broker.save_retained()?;
        let again = Broker::default();
        assert_eq!(again.load_retained(path.clone())?, 2);
        let got = again.retained_for("devices/+/status", QoS::AtLeastOnce);
        let mut got: Vec<_> = got.iter().map(|(m, q)| (m.topic.to_string(), m.payload.to_vec(), *q)).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("devices/d1/status".to_owned(), b"online".to_vec(), QoS::AtLeastOnce),
                ("devices/d2/status".to_owned(), vec![0, 255, 7], QoS::AtMostOnce)
            ]
        );
        std::fs::write(&path, b"FERRITE-RETAINED-1\n\x00\x09trunc")?;
        assert_eq!(Broker::default().load_retained(path.clone())?, 0);
        assert!(path.with_extension("corrupt").exists() && !path.exists(), "moved aside, not deleted");
        Ok(())
    }

    #[test]
    fn retained_messages_are_bounded_and_cleared_by_an_empty_payload() {
        let broker = Broker::default();
        let m = |t: &str, p: &'static [u8]| Arc::new(Message::new(t, Bytes::from_static(p)));
        broker.retain(m("a/1", b"on"), QoS::AtLeastOnce);
        broker.retain(m("a/2", b"off"), QoS::AtMostOnce);
        broker.retain(m("a/1", b"again"), QoS::AtLeastOnce);
        assert_eq!(broker.retained_count(), 2);
        assert_eq!(broker.retained.read().bytes, "a/1again".len() + "a/2off".len());
        assert_eq!(broker.retained_for("a/+", QoS::AtLeastOnce).len(), 2);
        assert_eq!(&broker.retained_for("a/1", QoS::AtLeastOnce)[0].0.payload[..], b"again");
        assert!(broker.retained_for("b/#", QoS::AtLeastOnce).is_empty());
        broker.retain(m("a/1", b""), QoS::AtMostOnce);
        assert_eq!(broker.retained_count(), 1);
        assert_eq!(broker.retained.read().bytes, "a/2off".len());
    }
}

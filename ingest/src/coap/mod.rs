//! CoAP (RFC 7252) over UDP for constrained devices: the device topics of MQTT, as
//! resources of the device that asks.
//!
//! | request | as MQTT |
//! |---|---|
//! | `POST /telemetry[/{stream}]`, JSON or CBOR | PUBLISH QoS 1 on `devices/{id}/telemetry[/{stream}]` |
//! | `POST /commands/result`, `POST /shadow/reported` | PUBLISH QoS 1 on `devices/{id}/...` |
//! | `GET /commands` with Observe 0 (RFC 7641) | SUBSCRIBE `devices/{id}/commands`: each command a notification |
//! | `GET /shadow/desired` with Observe 0 | SUBSCRIBE `devices/{id}/shadow/desired` |
//! | `GET /.well-known/core` | the resources (RFC 6690 link format) |
//!
//! A path may also name the whole topic (`/devices/{id}/telemetry`: a gateway for a child).
//! The device proves who it is in the request (no DTLS yet): `?u={device id}&p={client
//! secret or access token}` as Uri-Query options, checked once per address and cached.
//!
//! A confirmable POST is answered (2.04, piggybacked in its ACK) once its events are in the
//! WAL, as a QoS 1 PUBACK is; a retransmission of a request already taken is answered again
//! from the exchange cache, never ingested twice. An observation is a broker session of its
//! own: commands reach it as the actuation service sends them (one confirmable notification
//! at a time; its ACK is the delivery), and an observer that stops acknowledging (a device
//! asleep) loses the observation, its unacknowledged command going back to the queue
//! until it observes again.

mod cbor;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType};
use ferrite_engine::Metrics;
use ferrite_engine::auth::{
    AccessControl, Action, Credentials, DecisionCache, Principal, PrincipalKind, RequestContext,
    Transport as AuthTransport,
};
use ferrite_engine::metrics::{Counter, Gauge};
use ferrite_engine::plugin::Presence;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};

use crate::broker::{Broker, Grant, LiveSession, Out, QoS};
use crate::error::Error;
use crate::mqtt::parse_telemetry_topic;
use crate::pipeline::{Durability, Ingestor, Payload, Transport};

/// RFC 7252 §4.8: the first retransmission timeout of a confirmable message.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 7252 §4.8: retransmissions before a confirmable message is given up.
const MAX_RETRANSMIT: u32 = 4;
/// RFC 7252 §4.8.2: how long a message id stays taken (the exchange cache keeps answers
/// this long, within [`MAX_EXCHANGES`]).
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// Most answers kept for retransmitted requests (the oldest go first past it).
const MAX_EXCHANGES: usize = 200_000;
/// Authenticated endpoints forgotten after this long without a request.
const PEER_IDLE: Duration = Duration::from_secs(600);
/// Most authenticated endpoints remembered (the idle ones go first past it).
const MAX_PEERS: usize = 100_000;
/// Most IP addresses with a rate bucket at once.
const MAX_BUCKETS: usize = 100_000;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// Broker session ids of observations: apart from the MQTT listener's, which count from 1.
const FIRST_SESSION_ID: u64 = 1 << 62;
/// Options understood here; an unknown critical (odd) option is answered 4.02 Bad Option.
const UNDERSTOOD: [u16; 7] = [
    3,  // Uri-Host
    6,  // Observe
    7,  // Uri-Port
    11, // Uri-Path
    12, // Content-Format
    15, // Uri-Query
    17, // Accept
];
/// Content-Formats (RFC 7252 §12.3).
const JSON: u16 = 50;
const CBOR: u16 = 60;
const LINK_FORMAT: u16 = 40;

/// What `GET /.well-known/core` answers.
const LINKS: &str = "</telemetry>;rt=\"ferrite.telemetry\";ct=\"50 60\";if=\"core.s\",\
</commands>;rt=\"ferrite.commands\";obs;ct=50,\
</commands/result>;rt=\"ferrite.commands.result\";ct=\"50 60\",\
</shadow/desired>;rt=\"ferrite.shadow.desired\";obs;ct=50,\
</shadow/reported>;rt=\"ferrite.shadow.reported\";ct=\"50 60\"";

/// Settings of the CoAP listener.
#[derive(Debug, Clone)]
pub struct CoapConfig {
    /// Requests per second one IP address may send (bursts up to the same number); 0 for
    /// no limit. Past it, requests are dropped and counted (one 4.29 a second tells why).
    pub max_rate_per_ip: u32,
    /// Most observations at once (devices waiting for commands or desired state).
    pub max_observations: usize,
    /// Requests processed at once; past it a request is answered 5.03 with Max-Age.
    pub max_in_flight: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self { max_rate_per_ip: 1000, max_observations: 10_000, max_in_flight: 4096 }
    }
}

/// The CoAP listener: one UDP socket, its exchanges, endpoints and observations.
pub struct CoapServer {
    socket: UdpSocket,
    ingestor: Arc<Ingestor>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    access: Arc<dyn AccessControl>,
    config: CoapConfig,
    counters: Counters,
    exchanges: Mutex<Exchanges>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    /// By topic: one observer each (a newer registration takes over, as a device that
    /// rebooted or whose NAT binding moved registers from a new address).
    observations: Mutex<HashMap<Box<str>, Arc<Observation>>>,
    /// Confirmable notifications waiting for their ACK (`true`) or RST (`false`).
    awaiting: Mutex<HashMap<(SocketAddr, u16), oneshot::Sender<bool>>>,
    next_mid: AtomicU16,
    next_session: AtomicU64,
    in_flight: Arc<Semaphore>,
}

/// Counters of the hot path, made once.
struct Counters {
    requests: Arc<Counter>,
    duplicates: Arc<Counter>,
    throttled: Arc<Counter>,
    notifications: Arc<Counter>,
    retransmissions: Arc<Counter>,
    observations: Arc<Gauge>,
}

/// An answer kept for a retransmission of its request.
enum Exchange {
    /// Being processed: a retransmission is ignored (the answer is on its way).
    Pending,
    /// Answered with these bytes.
    Done(Bytes),
}

/// What an incoming request's message id says about it.
enum Seen {
    New,
    Pending,
    Answered(Bytes),
}

/// Recent exchanges by endpoint and message id (RFC 7252 §4.5 deduplication).
#[derive(Default)]
struct Exchanges {
    map: HashMap<(SocketAddr, u16), (Instant, Exchange)>,
    order: VecDeque<(Instant, (SocketAddr, u16))>,
}

impl Exchanges {
    fn begin(&mut self, key: (SocketAddr, u16), now: Instant) -> Seen {
        match self.map.get(&key) {
            Some((_, Exchange::Pending)) => Seen::Pending,
            Some((_, Exchange::Done(b))) => Seen::Answered(b.clone()),
            None => {
                self.map.insert(key, (now, Exchange::Pending));
                self.order.push_back((now, key));
                self.expire(now);
                Seen::New
            }
        }
    }

    fn finish(&mut self, key: (SocketAddr, u16), answer: Option<Bytes>) {
        match answer {
            Some(b) => {
                if let Some(e) = self.map.get_mut(&key) {
                    e.1 = Exchange::Done(b);
                }
            }
            // Not kept: a retransmission is processed again.
            None => {
                self.map.remove(&key);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < EXCHANGE_LIFETIME && self.order.len() <= MAX_EXCHANGES {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|(t, _)| *t == at) {
                self.map.remove(&key);
            }
        }
    }
}

/// A token bucket of one IP address.
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When it was last told 4.29.
    told: Option<Instant>,
}

/// What the rate limit says of a datagram.
enum Admit {
    Yes,
    /// Over the limit: dropped.
    Drop,
    /// Over the limit: dropped, with one 4.29 this second.
    Tell,
}

/// An endpoint that authenticated: its credentials (to know the next request's are the
/// same), principal and policy decisions.
struct Peer {
    user: Box<str>,
    password: Box<str>,
    principal: Principal,
    decisions: DecisionCache,
    seen: Instant,
}

/// A device observing a resource: a broker session subscribed to the resource's topic.
struct Observation {
    peer: SocketAddr,
    topic: Box<str>,
    token: Mutex<Vec<u8>>,
    session: u64,
    presence: Presence,
    live: Arc<LiveSession>,
    seq: AtomicU32,
    /// Ends it (deregistration, takeover, shutdown).
    cancel: Notify,
    /// Its broker session ended (once).
    ended: std::sync::atomic::AtomicBool,
}

impl Observation {
    /// The next Observe option value (24 bits, RFC 7641 §3.4).
    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & 0x00ff_ffff
    }
}

/// A request, as read from its message.
struct Request {
    peer: SocketAddr,
    method: RequestType,
    token: Vec<u8>,
    path: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    content_format: Option<u16>,
    accept: Option<u16>,
    observe: Option<u32>,
    payload: Vec<u8>,
}

/// An answer to a request.
struct Reply {
    code: ResponseType,
    content_format: Option<u16>,
    max_age: Option<u32>,
    size1: Option<u32>,
    observe: Option<u32>,
    payload: Vec<u8>,
    /// After it is sent: start this observation.
    then_observe: Option<Arc<Observation>>,
}

impl Reply {
    fn new(code: ResponseType) -> Self {
        Self {
            code,
            content_format: None,
            max_age: None,
            size1: None,
            observe: None,
            payload: Vec::new(),
            then_observe: None,
        }
    }

    /// An error with a diagnostic payload (RFC 7252 §5.5.2): what, and how to fix it.
    fn text(code: ResponseType, message: impl Into<String>) -> Self {
        Self { payload: message.into().into_bytes(), ..Self::new(code) }
    }

    fn json(code: ResponseType, value: &serde_json::Value) -> Self {
        Self { payload: value.to_string().into_bytes(), content_format: Some(JSON), ..Self::new(code) }
    }

    fn max_age(mut self, secs: u64) -> Self {
        self.max_age = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        self
    }

    /// Whether a retransmission of the request may get the same answer (an overload or a
    /// failed commit is not kept: the retransmission tries again).
    fn keep(&self) -> bool {
        !matches!(self.code, ResponseType::ServiceUnavailable | ResponseType::InternalServerError)
    }

    /// The message carrying it: piggybacked in the ACK of a confirmable request (same
    /// message id), or a non-confirmable response with a message id of its own.
    fn encode(&self, confirmable: bool, mid: u16, token: &[u8]) -> Option<Bytes> {
        let mut p = Packet::new();
        p.header.set_type(if confirmable { MessageType::Acknowledgement } else { MessageType::NonConfirmable });
        p.header.code = MessageClass::Response(self.code);
        p.header.message_id = mid;
        p.set_token(token.to_vec());
        if let Some(seq) = self.observe {
            p.add_option(CoapOption::Observe, uint(seq));
        }
        if let Some(cf) = self.content_format {
            p.add_option(CoapOption::ContentFormat, uint(u32::from(cf)));
        }
        if let Some(age) = self.max_age {
            p.add_option(CoapOption::MaxAge, uint(age));
        }
        if let Some(size) = self.size1 {
            p.add_option(CoapOption::Size1, uint(size));
        }
        p.payload.clone_from(&self.payload);
        match p.to_bytes_with_limit(MAX_DATAGRAM) {
            Ok(b) => Some(Bytes::from(b)),
            Err(e) => {
                tracing::warn!(error = ?e, "coap answer not encodable");
                None
            }
        }
    }
}

/// An option's unsigned integer value, in its shortest form (RFC 7252 §3.2).
fn uint(v: u32) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// An option's unsigned integer value; `None` when longer than 4 bytes.
fn read_uint(v: &[u8]) -> Option<u32> {
    (v.len() <= 4).then(|| v.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
}

/// An empty message (ACK or RST) of `mid`.
fn empty(kind: MessageType, mid: u16) -> Option<Bytes> {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
    p.to_bytes().ok().map(Bytes::from)
}

impl CoapServer {
    /// A listener on `addr` that ingests through `ingestor` and routes through `broker`.
    pub async fn bind(
        addr: SocketAddr,
        ingestor: Arc<Ingestor>,
        broker: Arc<Broker>,
        access: Arc<dyn AccessControl>,
        config: CoapConfig,
    ) -> std::io::Result<Arc<Self>> {
        let socket = UdpSocket::bind(addr).await?;
        let metrics = ingestor.metrics().clone();
        let counters = Counters {
            requests: metrics.counter("ferrite_coap_requests_total", &[]),
            duplicates: metrics.counter("ferrite_coap_duplicates_total", &[]),
            throttled: metrics.counter("ferrite_coap_refused_total", &[("reason", "throttled")]),
            notifications: metrics.counter("ferrite_coap_notifications_total", &[]),
            retransmissions: metrics.counter("ferrite_coap_retransmissions_total", &[]),
            observations: metrics.gauge("ferrite_coap_observations", &[]),
        };
        // Message ids start anywhere (RFC 7252 §4.4), so that a restart does not reuse them.
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        Ok(Arc::new(Self {
            socket,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            ingestor,
            broker,
            metrics,
            access,
            config,
            counters,
            exchanges: Mutex::default(),
            buckets: Mutex::default(),
            peers: Mutex::default(),
            observations: Mutex::default(),
            awaiting: Mutex::default(),
            next_mid: AtomicU16::new(seed as u16),
            next_session: AtomicU64::new(FIRST_SESSION_ID),
        }))
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves datagrams until `shutdown` turns true; then ends every observation.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut tidy = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, peer)) => self.datagram(&buf[..n], peer).await,
                    // ICMP errors of earlier sends surface here on some systems: not fatal.
                    Err(e) => tracing::debug!(error = %e, "coap receive error"),
                },
                _ = tidy.tick() => self.tidy(),
                _ = shutdown.changed() => break,
            }
        }
        let observations: Vec<Arc<Observation>> = self.observations.lock().values().cloned().collect();
        for o in observations {
            o.cancel.notify_one();
        }
    }

    /// Forgets expired exchanges, idle endpoints and old rate buckets.
    fn tidy(&self) {
        let now = Instant::now();
        self.exchanges.lock().expire(now);
        self.peers.lock().retain(|_, p| now.duration_since(p.seen) < PEER_IDLE);
        self.buckets.lock().retain(|_, b| now.duration_since(b.at) < Duration::from_secs(10));
    }

    fn refused(&self, reason: &'static str) {
        self.metrics.inc("ferrite_coap_refused_total", &[("reason", reason)], 1);
    }

    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        if let Err(e) = self.socket.send_to(bytes, peer).await {
            tracing::debug!(%peer, error = %e, "coap send failed");
        }
    }

    fn admit(&self, ip: IpAddr, now: Instant) -> Admit {
        let rate = f64::from(self.config.max_rate_per_ip);
        if rate == 0.0 {
            return Admit::Yes;
        }
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            // Many addresses at once (spoofed sources): keep the busiest second only, and
            // past that refuse newcomers rather than grow.
            buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(1));
            if buckets.len() >= MAX_BUCKETS {
                return Admit::Drop;
            }
        }
        let b = buckets.entry(ip).or_insert(Bucket { tokens: rate, at: now, told: None });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Admit::Yes;
        }
        if b.told.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return Admit::Drop;
        }
        b.told = Some(now);
        Admit::Tell
    }

    /// One datagram: a request, an ACK or RST of a notification, a ping, or noise.
    async fn datagram(self: &Arc<Self>, buf: &[u8], peer: SocketAddr) {
        // Too short, or not CoAP version 1: silently ignored (RFC 7252 §3, §4.2).
        if buf.len() < 4 || buf[0] >> 6 != 1 {
            self.refused("malformed");
            return;
        }
        let now = Instant::now();
        let mid = u16::from_be_bytes([buf[2], buf[3]]);
        let confirmable = (buf[0] >> 4) & 0x3 == 0;
        // The rate limit before the parse: a flood costs a lookup per datagram.
        match self.admit(peer.ip(), now) {
            Admit::Yes => {}
            Admit::Drop => {
                self.counters.throttled.add(1);
                return;
            }
            Admit::Tell => {
                self.counters.throttled.add(1);
                let token_len = usize::from(buf[0] & 0x0f);
                if confirmable && buf[1] != 0 && token_len <= 8 && buf.len() >= 4 + token_len {
                    let why = format!("more than {} requests a second from {}", self.config.max_rate_per_ip, peer.ip());
                    let reply = Reply::text(ResponseType::TooManyRequests, why).max_age(1);
                    if let Some(b) = reply.encode(true, mid, &buf[4..4 + token_len]) {
                        self.send(&b, peer).await;
                    }
                }
                return;
            }
        }
        let packet = match Packet::from_bytes(buf) {
            Ok(p) => p,
            Err(e) => {
                self.refused("malformed");
                tracing::debug!(%peer, error = ?e, "malformed coap message");
                // A confirmable message that cannot be read is rejected (RFC 7252 §4.2).
                if confirmable && let Some(rst) = empty(MessageType::Reset, mid) {
                    self.send(&rst, peer).await;
                }
                return;
            }
        };
        let kind = packet.header.get_type();
        let method = match (kind, packet.header.code) {
            (MessageType::Acknowledgement | MessageType::Reset, _) => {
                if let Some(tx) = self.awaiting.lock().remove(&(peer, mid)) {
                    let _ = tx.send(kind == MessageType::Acknowledgement);
                }
                return;
            }
            // A ping (RFC 7252 §4.3): answered with RST.
            (MessageType::Confirmable, MessageClass::Empty) => {
                if let Some(rst) = empty(MessageType::Reset, mid) {
                    self.send(&rst, peer).await;
                }
                return;
            }
            (_, MessageClass::Request(m)) => m,
            // A response or reserved code where a request belongs.
            (_, _) => {
                self.refused("malformed");
                if confirmable && let Some(rst) = empty(MessageType::Reset, mid) {
                    self.send(&rst, peer).await;
                }
                return;
            }
        };
        self.counters.requests.add(1);
        let key = (peer, mid);
        let seen = self.exchanges.lock().begin(key, now);
        match seen {
            Seen::New => {}
            Seen::Pending => {
                self.counters.duplicates.add(1);
                return;
            }
            Seen::Answered(b) => {
                self.counters.duplicates.add(1);
                self.send(&b, peer).await;
                return;
            }
        }
        let token = packet.get_token().to_vec();
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.refused("busy");
            self.exchanges.lock().finish(key, None);
            let reply =
                Reply::text(ResponseType::ServiceUnavailable, "too many requests in progress; retry").max_age(1);
            if let Some(b) = reply.encode(confirmable, self.mid_for(confirmable, mid), &token) {
                self.send(&b, peer).await;
            }
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let reply = match me.read(packet, peer, method) {
                Ok(req) => me.request(req).await,
                Err(reply) => reply,
            };
            let bytes = reply.encode(confirmable, me.mid_for(confirmable, mid), &token);
            // Kept before it is sent: a retransmission racing the answer gets it too.
            me.exchanges.lock().finish(key, bytes.clone().filter(|_| reply.keep()));
            if let Some(b) = &bytes {
                me.send(b, peer).await;
            }
            if let Some(o) = reply.then_observe {
                me.start_observing(o);
            }
            drop(permit);
        });
    }

    /// The message id of an answer: the request's for a piggybacked ACK, a new one otherwise.
    fn mid_for(&self, confirmable: bool, request_mid: u16) -> u16 {
        if confirmable { request_mid } else { self.next_mid.fetch_add(1, Ordering::Relaxed) }
    }

    /// Reads a request (see [`read_request`]), counting an unknown critical option.
    fn read(&self, packet: Packet, peer: SocketAddr, method: RequestType) -> Result<Request, Reply> {
        read_request(packet, peer, method).inspect_err(|reply| {
            if reply.code == ResponseType::BadOption {
                self.refused("bad_option");
            }
        })
    }

    /// Answers a request.
    async fn request(self: &Arc<Self>, req: Request) -> Reply {
        if req.path.iter().map(String::as_str).eq([".well-known", "core"]) {
            return match req.method {
                RequestType::Get => Reply {
                    payload: LINKS.as_bytes().to_vec(),
                    content_format: Some(LINK_FORMAT),
                    ..Reply::new(ResponseType::Content)
                },
                _ => Reply::text(ResponseType::MethodNotAllowed, "/.well-known/core is read with GET"),
            };
        }
        if req.path.is_empty() {
            self.refused("not_found");
            return Reply::text(ResponseType::NotFound, "no resource at /; GET /.well-known/core lists them");
        }
        let principal = match self.principal(&req).await {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        // The device the short paths are of: a device principal is its own; with identity
        // off (or for a user or service), `u` names it.
        let device = match (principal.kind, &req.user) {
            (PrincipalKind::Device, _) => Some(principal.id.to_string()),
            (_, Some(u)) if !u.is_empty() => Some(u.clone()),
            _ => None,
        };
        let topic = if req.path[0] == "devices" {
            req.path.join("/")
        } else {
            let Some(device) = &device else {
                self.refused("bad_request");
                return Reply::text(
                    ResponseType::BadRequest,
                    "name the device: ?u=DEVICE_ID (or use the whole topic, /devices/{id}/telemetry)",
                );
            };
            format!("devices/{device}/{}", req.path.join("/"))
        };
        if let Err(e) = crate::topic::validate_topic(&topic) {
            self.refused("bad_request");
            return Reply::text(ResponseType::BadRequest, format!("{topic}: {e}"));
        }
        match req.method {
            RequestType::Post | RequestType::Put => {
                if let Err(reply) = self.permitted(&req, &principal, Action::Publish, &topic) {
                    return reply;
                }
                self.publish(&principal, &topic, req.content_format, req.payload).await
            }
            RequestType::Get => match req.observe {
                Some(0) => {
                    if let Some(a) = req.accept.filter(|a| *a != JSON) {
                        return Reply::text(ResponseType::NotAcceptable, format!("{topic} is JSON (50), not {a}"));
                    }
                    if let Err(reply) = self.permitted(&req, &principal, Action::Subscribe, &topic) {
                        return reply;
                    }
                    // The session is of the topic's device (`devices/{id}/...`): commands to
                    // it find this session, whoever observes (a gateway for a child).
                    let name = topic.split('/').nth(1).unwrap_or_default().to_owned();
                    self.observe(&req, principal, name, topic)
                }
                Some(1) => {
                    let gone = {
                        let mut observations = self.observations.lock();
                        let mine = observations.get(topic.as_str()).is_some_and(|o| o.peer == req.peer);
                        if mine { observations.remove(topic.as_str()) } else { None }
                    };
                    if let Some(o) = gone {
                        self.end(&o, "disconnect");
                    }
                    Reply::new(ResponseType::Content)
                }
                _ => Reply::text(
                    ResponseType::BadRequest,
                    format!(
                        "{} is observed, not read: GET it with Observe 0 (RFC 7641), and what is sent to {topic} \
                         arrives as notifications",
                        req.path.join("/")
                    ),
                ),
            },
            _ => {
                Reply::text(ResponseType::MethodNotAllowed, "device resources take POST (or PUT) and GET with Observe")
            }
        }
    }

    /// Who sent the request: the anonymous admin with identity off; else the principal its
    /// `u` and `p` prove, cached per endpoint while they stay the same.
    async fn principal(&self, req: &Request) -> Result<Principal, Reply> {
        if !self.access.enabled() {
            return Ok(Principal::anonymous());
        }
        let (Some(user), Some(password)) = (&req.user, &req.password) else {
            self.refused("unauthorized");
            return Err(Reply::text(
                ResponseType::Unauthorized,
                "name the device and prove it: ?u=DEVICE_ID&p=CLIENT_SECRET (or an access token) as Uri-Query \
                 options (DTLS is not supported yet)",
            ));
        };
        if let Some(peer) = self.peers.lock().get_mut(&req.peer)
            && *peer.user == **user
            && *peer.password == **password
        {
            peer.seen = Instant::now();
            return Ok(peer.principal.clone());
        }
        let access = self.access.clone();
        let context = RequestContext::new(AuthTransport::Coap, Some(req.peer.ip()));
        let (user, password): (Box<str>, Box<str>) = (user.as_str().into(), password.as_str().into());
        let (u, p) = (user.clone(), password.clone());
        // Off the async workers: a user's password is an argon2id hash.
        let checked = tokio::task::spawn_blocking(move || {
            access.authenticate(
                &Credentials::Mqtt { client_id: &u, username: Some(&u), password: Some(p.as_bytes()) },
                &context,
            )
        })
        .await;
        match checked {
            Ok(Ok(principal)) => {
                let mut peers = self.peers.lock();
                if peers.len() >= MAX_PEERS {
                    let now = Instant::now();
                    peers.retain(|_, p| now.duration_since(p.seen) < Duration::from_secs(10));
                }
                peers.insert(
                    req.peer,
                    Peer {
                        user,
                        password,
                        principal: principal.clone(),
                        decisions: DecisionCache::default(),
                        seen: Instant::now(),
                    },
                );
                Ok(principal)
            }
            Ok(Err(e)) => {
                self.refused("unauthorized");
                tracing::warn!(peer = %req.peer, error = %e, "coap request refused: not authorized");
                Err(Reply::text(ResponseType::Unauthorized, e.to_string()))
            }
            Err(e) => Err(Reply::text(ResponseType::InternalServerError, e.to_string())),
        }
    }

    /// Whether the principal may `action` on `topic` (policy decisions cached per endpoint).
    fn permitted(&self, req: &Request, principal: &Principal, action: Action, topic: &str) -> Result<(), Reply> {
        if !self.access.enabled() {
            return Ok(());
        }
        let context = RequestContext::new(AuthTransport::Coap, Some(req.peer.ip()));
        let mut peers = self.peers.lock();
        let d = match peers.get_mut(&req.peer) {
            Some(p) => p.decisions.decide(self.access.as_ref(), principal, action, topic, &context),
            None => DecisionCache::default().decide(self.access.as_ref(), principal, action, topic, &context),
        };
        if d.revoked {
            peers.remove(&req.peer);
            self.refused("unauthorized");
            return Err(Reply::text(ResponseType::Unauthorized, "the credentials no longer hold"));
        }
        if !d.allowed {
            self.refused("forbidden");
            if d.fresh {
                tracing::warn!(peer = %req.peer, %principal, topic, action = action.as_str(), "coap request denied by policy");
            }
            return Err(Reply::text(
                ResponseType::Forbidden,
                format!("{principal} may not {} {topic}", action.as_str()),
            ));
        }
        Ok(())
    }

    /// A POST: routed to subscribers as an MQTT message of `topic`; telemetry is ingested
    /// and answered once committed.
    async fn publish(&self, principal: &Principal, topic: &str, format: Option<u16>, payload: Vec<u8>) -> Reply {
        let json = match format {
            None | Some(JSON) => Bytes::from(payload),
            Some(CBOR) => match cbor::to_json(&payload) {
                Ok(j) => Bytes::from(j),
                Err(e) => {
                    self.refused("bad_request");
                    return Reply::text(ResponseType::BadRequest, format!("CBOR payload: {e}"));
                }
            },
            Some(other) => {
                self.refused("unsupported_format");
                return Reply::text(
                    ResponseType::UnsupportedContentFormat,
                    format!("content format {other} is not taken: send application/json (50) or application/cbor (60)"),
                );
            }
        };
        let limit = self.ingestor.max_payload_bytes();
        if json.len() > limit {
            self.refused("too_large");
            return Reply {
                size1: Some(u32::try_from(limit).unwrap_or(u32::MAX)),
                ..Reply::text(ResponseType::RequestEntityTooLarge, format!("payload over the limit of {limit} bytes"))
            };
        }
        // Subscribers and the platform's own handlers (command results, reported state)
        // see it as the MQTT message of its topic.
        if let Err(e) = self.broker.publish(topic, json.clone(), QoS::AtLeastOnce, false) {
            return Reply::text(ResponseType::BadRequest, format!("{topic}: {e}"));
        }
        let Some(t) = parse_telemetry_topic(topic) else {
            return Reply::new(ResponseType::Changed);
        };
        let (stream, device) = match t.target(&principal.tenant) {
            Ok(target) => target,
            Err(e) => return Reply::text(ResponseType::BadRequest, e.to_string()),
        };
        let payload = Payload::Json { stream, device: Some(device) };
        // A datagram waits for room a bounded time: past it, 5.03 with Max-Age (its
        // retransmission tries again) instead of an exchange that outlives the client's.
        match self.ingestor.ingest(Transport::Coap, payload, json, Durability::Committed).await {
            Ok(r) if r.rejected > 0 && r.accepted == 0 => {
                let first = r.rejections.first().map(|x| format!("{}: {}", x.reason, x.message)).unwrap_or_default();
                Reply::text(ResponseType::BadRequest, format!("every event rejected; the first: {first}"))
            }
            Ok(r) if r.rejected > 0 => {
                let rejections: Vec<serde_json::Value> = r
                    .rejections
                    .iter()
                    .map(|x| serde_json::json!({"index": x.index, "reason": x.reason, "message": x.message}))
                    .collect();
                Reply::json(
                    ResponseType::Changed,
                    &serde_json::json!({"accepted": r.accepted, "rejected": r.rejected, "rejections": rejections}),
                )
            }
            Ok(_) => Reply::new(ResponseType::Changed),
            Err(e) => error_reply(&e),
        }
    }

    /// A registration (GET with Observe 0): a broker session subscribed to `topic` whose
    /// deliveries become notifications. A registration again (a new token, or the same
    /// one) keeps the session and sends what waits once more.
    fn observe(self: &Arc<Self>, req: &Request, principal: Principal, device: String, topic: String) -> Reply {
        let key = topic.into_boxed_str();
        let mut observations = self.observations.lock();
        let older = match observations.get(&key) {
            Some(o) if o.peer == req.peer => {
                *o.token.lock() = req.token.clone();
                let seq = o.next_seq();
                return Reply {
                    observe: Some(seq),
                    then_observe: Some(o.clone()),
                    ..Reply::new(ResponseType::Content)
                };
            }
            Some(_) => observations.remove(&key),
            None => None,
        };
        if let Some(o) = older {
            // Taken over: ended before the new one subscribes, so that what it had not
            // acknowledged goes back to the queue and on to the new one.
            self.end(&o, "taken_over");
        }
        if observations.len() >= self.config.max_observations {
            self.refused("busy");
            return Reply::text(ResponseType::ServiceUnavailable, "too many observations; retry later").max_age(30);
        }
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let presence = Presence { principal, client_id: device, source: Some(req.peer.ip()) };
        let (tx, rx) = mpsc::channel(64);
        let live = self.broker.attach(session, None, &presence, tx, (None, None), |_| {});
        live.set_window(1);
        let o = Arc::new(Observation {
            peer: req.peer,
            topic: key.clone(),
            token: Mutex::new(req.token.clone()),
            session,
            presence,
            live,
            seq: AtomicU32::new(1),
            cancel: Notify::new(),
            ended: std::sync::atomic::AtomicBool::new(false),
        });
        observations.insert(key, o.clone());
        self.counters.observations.set(observations.len() as i64);
        drop(observations);
        let me = self.clone();
        let notifier = o.clone();
        tokio::spawn(async move { me.notify(notifier, rx).await });
        Reply { observe: Some(1), then_observe: Some(o), ..Reply::new(ResponseType::Content) }
    }

    /// Subscribes an observation once its registration was answered, so that notifications
    /// follow the answer.
    fn start_observing(&self, o: Arc<Observation>) {
        let grant = Grant { qos: QoS::AtLeastOnce, no_local: false, retain_as_published: false };
        self.broker.subscribe(o.session, &o.topic, grant);
    }

    /// Sends an observation's deliveries as notifications, one confirmable at a time, until
    /// it ends: deregistered, reset, unacknowledged, its session kicked, or shutdown.
    async fn notify(self: Arc<Self>, o: Arc<Observation>, mut rx: mpsc::Receiver<Out>) {
        let reason = loop {
            let out = tokio::select! {
                out = rx.recv() => out,
                () = o.cancel.notified() => break "disconnect",
                () = o.live.kick.notified() => break "kicked",
            };
            let Some(out) = out else { break "error" };
            let Out::Deliver { msg, pkid, qos, .. } = out else { continue };
            let confirmable = qos != QoS::AtMostOnce;
            let mid = self.next_mid.fetch_add(1, Ordering::Relaxed);
            let token = o.token.lock().clone();
            let mut p = Packet::new();
            p.header.set_type(if confirmable { MessageType::Confirmable } else { MessageType::NonConfirmable });
            p.header.code = MessageClass::Response(ResponseType::Content);
            p.header.message_id = mid;
            p.set_token(token);
            p.add_option(CoapOption::Observe, uint(o.next_seq()));
            p.set_content_format(ContentFormat::ApplicationJSON);
            p.payload = msg.payload.to_vec();
            let bytes = match p.to_bytes_with_limit(MAX_DATAGRAM) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(topic = %msg.topic, error = ?e, "coap notification too large for a datagram");
                    break "error";
                }
            };
            self.counters.notifications.add(1);
            if !confirmable {
                self.send(&bytes, o.peer).await;
                continue;
            }
            let (tx, mut answered) = oneshot::channel();
            self.awaiting.lock().insert((o.peer, mid), tx);
            // RFC 7252 §4.2: retransmitted with a doubling timeout from a random start in
            // [ACK_TIMEOUT, 1.5 × ACK_TIMEOUT].
            let mut timeout = ACK_TIMEOUT.mul_f64(1.0 + f64::from(mid % 512) / 1024.0);
            let mut outcome = None;
            for attempt in 0..=MAX_RETRANSMIT {
                if attempt > 0 {
                    self.counters.retransmissions.add(1);
                }
                self.send(&bytes, o.peer).await;
                tokio::select! {
                    a = &mut answered => { outcome = Some(a.unwrap_or(false)); break }
                    () = tokio::time::sleep(timeout) => timeout *= 2,
                    () = o.cancel.notified() => { outcome = Some(false); break }
                }
            }
            self.awaiting.lock().remove(&(o.peer, mid));
            match outcome {
                Some(true) => self.broker.acked(o.session, pkid),
                // Reset by the device, or deregistered meanwhile.
                Some(false) => break "disconnect",
                // No ACK after every retransmission: the device sleeps or is gone.
                None => break "keep_alive",
            }
        };
        {
            let mut observations = self.observations.lock();
            if observations.get(&o.topic).is_some_and(|mine| Arc::ptr_eq(mine, &o)) {
                observations.remove(&o.topic);
            }
            self.counters.observations.set(observations.len() as i64);
        }
        self.end(&o, reason);
    }

    /// Ends an observation's broker session (once, whoever ends it first) and stops its
    /// notifications.
    fn end(&self, o: &Observation, reason: &'static str) {
        o.cancel.notify_one();
        if o.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(peer = %o.peer, topic = %o.topic, reason, "coap observation ended");
        self.broker.session_ended(o.session, &o.presence, reason, None);
    }
}

/// Reads a request's options: its path, credentials, formats and Observe; an unknown
/// critical option is answered 4.02 (RFC 7252 §5.4.1).
fn read_request(packet: Packet, peer: SocketAddr, method: RequestType) -> Result<Request, Reply> {
    let mut req = Request {
        peer,
        method,
        token: packet.get_token().to_vec(),
        path: Vec::new(),
        user: None,
        password: None,
        content_format: None,
        accept: None,
        observe: None,
        payload: Vec::new(),
    };
    let bad = |what: &str| Reply::text(ResponseType::BadRequest, what.to_owned());
    for (&number, values) in packet.options() {
        if !UNDERSTOOD.contains(&number) {
            if number & 1 == 1 {
                return Err(Reply::text(
                    ResponseType::BadOption,
                    format!(
                        "option {number} is critical and not understood here (understood: Uri-Path, Uri-Query, \
                         Content-Format, Accept, Observe; block-wise transfer is not supported: keep a payload \
                         within one datagram)"
                    ),
                ));
            }
            continue;
        }
        for v in values {
            match number {
                11 => {
                    let segment =
                        std::str::from_utf8(v).map_err(|_| bad("a Uri-Path segment is not UTF-8"))?.to_owned();
                    if segment.contains('/') {
                        return Err(bad("a Uri-Path segment contains `/`"));
                    }
                    req.path.push(segment);
                }
                15 => {
                    let q = std::str::from_utf8(v).map_err(|_| bad("a Uri-Query option is not UTF-8"))?;
                    match q.split_once('=') {
                        Some(("u", u)) => req.user = Some(u.to_owned()),
                        // A long token may come in several `p=` options, in order.
                        Some(("p", p)) => req.password.get_or_insert_with(String::new).push_str(p),
                        _ => {}
                    }
                }
                12 => req.content_format = Some(read_uint(v).ok_or_else(|| bad("Content-Format too long"))? as u16),
                17 => req.accept = Some(read_uint(v).ok_or_else(|| bad("Accept too long"))? as u16),
                6 => req.observe = Some(read_uint(v).ok_or_else(|| bad("Observe too long"))?),
                _ => {}
            }
        }
    }
    req.payload = packet.payload;
    Ok(req)
}

/// The answer to an ingest error: 4.13, 4.29 or 5.03 with Max-Age, or 4.00, each with its
/// reason.
fn error_reply(e: &Error) -> Reply {
    let message = format!("{}: {e}", e.code());
    match e {
        Error::PayloadTooLarge { limit, .. } => Reply {
            size1: Some(u32::try_from(*limit).unwrap_or(u32::MAX)),
            ..Reply::text(ResponseType::RequestEntityTooLarge, message)
        },
        Error::Overloaded { retry_after } | Error::Busy { retry_after, .. } | Error::Shed { retry_after, .. } => {
            Reply::text(ResponseType::ServiceUnavailable, message).max_age(*retry_after)
        }
        Error::QuotaExceeded(_) => Reply::text(ResponseType::TooManyRequests, message).max_age(3600),
        _ if e.is_not_durable() => {
            Reply::text(ResponseType::ServiceUnavailable, message).max_age(crate::pipeline::RETRY_AFTER_SECS)
        }
        _ => Reply::text(ResponseType::BadRequest, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_integers_are_shortest_and_read_back() {
        assert_eq!(uint(0), Vec::<u8>::new());
        assert_eq!(uint(50), vec![50]);
        assert_eq!(uint(0x0102), vec![1, 2]);
        for v in [0, 1, 255, 256, 65_535, 0x00ff_ffff, u32::MAX] {
            assert_eq!(read_uint(&uint(v)), Some(v));
        }
        assert_eq!(read_uint(&[1, 2, 3, 4, 5]), None);
    }

    #[test]
    fn a_retransmission_is_seen_and_answered_from_the_cache_until_its_lifetime_ends() {
        let mut x = Exchanges::default();
        let peer: SocketAddr = ([127, 0, 0, 1], 5000).into();
        let t0 = Instant::now();
        assert!(matches!(x.begin((peer, 7), t0), Seen::New));
        assert!(matches!(x.begin((peer, 7), t0), Seen::Pending));
        x.finish((peer, 7), Some(Bytes::from_static(b"answer")));
        assert!(matches!(x.begin((peer, 7), t0), Seen::Answered(b) if &b[..] == b"answer"));
        // Another endpoint's message id 7 is another exchange.
        assert!(matches!(x.begin(((peer.ip(), 5001).into(), 7), t0), Seen::New));
        // Past the lifetime the id is free again.
        x.expire(t0 + EXCHANGE_LIFETIME + Duration::from_secs(1));
        assert!(matches!(x.begin((peer, 7), t0 + EXCHANGE_LIFETIME + Duration::from_secs(1)), Seen::New));
        // An answer not kept lets a retransmission be processed again.
        x.finish((peer, 7), None);
        assert!(matches!(x.begin((peer, 7), t0), Seen::New));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("FERRITE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
        ))]

        /// Any datagram is read as a request, or refused with a code; a request's path
        /// segments never carry a `/` (they become topic levels).
        #[test]
        fn any_datagram_is_read_or_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let peer: SocketAddr = ([127, 0, 0, 1], 5683).into();
            if let Ok(packet) = Packet::from_bytes(&bytes)
                && let MessageClass::Request(method) = packet.header.code
            {
                match read_request(packet, peer, method) {
                    Ok(req) => proptest::prop_assert!(req.path.iter().all(|s| !s.contains('/'))),
                    Err(reply) => proptest::prop_assert!(!reply.payload.is_empty()),
                }
            }
        }
    }

    #[test]
    fn an_unknown_critical_option_is_refused_and_an_elective_one_ignored() {
        let peer: SocketAddr = ([127, 0, 0, 1], 5683).into();
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Post);
        p.add_option(CoapOption::UriPath, b"telemetry".to_vec());
        p.add_option(CoapOption::Unknown(65_002), vec![1]);
        let req = read_request(p.clone(), peer, RequestType::Post);
        assert!(req.is_ok_and(|r| r.path == ["telemetry"]), "an even (elective) option is ignored");
        p.add_option(CoapOption::Unknown(65_001), vec![1]);
        let refused = read_request(p.clone(), peer, RequestType::Post).err().map(|r| r.code);
        assert_eq!(refused, Some(ResponseType::BadOption));
        let mut block = Packet::new();
        block.add_option(CoapOption::Block1, vec![0x0e]);
        let refused = read_request(block, peer, RequestType::Post).err().map(|r| r.code);
        assert_eq!(refused, Some(ResponseType::BadOption), "block-wise transfer is refused, not misread");
    }

    #[test]
    fn ingest_errors_map_to_coap_codes_with_their_reason() {
        let r = error_reply(&Error::PayloadTooLarge { size: 10, limit: 5 });
        assert_eq!((r.code, r.size1), (ResponseType::RequestEntityTooLarge, Some(5)));
        let r = error_reply(&Error::Overloaded { retry_after: 5 });
        assert_eq!((r.code, r.max_age), (ResponseType::ServiceUnavailable, Some(5)));
        assert!(!r.keep());
        let r = error_reply(&Error::BadRequest("no device".into()));
        assert_eq!(r.code, ResponseType::BadRequest);
        assert!(String::from_utf8_lossy(&r.payload).contains("no device"));
        assert!(r.keep());
    }
}

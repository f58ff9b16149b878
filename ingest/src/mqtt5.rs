//! MQTT 5 on the same listener as 3.1.1: the protocol level of a CONNECT picks the codec,
//! and a v5 session's packets are read with rumqttc's v5 codec and handed to the session
//! as their 3.1.1 equivalents plus what only v5 has (properties, subscription options,
//! reason codes), so that one session loop serves both versions. Replies are written in
//! the session's version: the same bytes where v5 allows it (a successful PUBACK, PUBREC,
//! PUBCOMP, PINGRESP), v5 packets with reason codes where it does not.
//!
//! What v5 adds here: reason codes on every refusal (CONNACK, PUBACK, SUBACK, and a
//! DISCONNECT before the server closes a session), session expiry, message expiry,
//! topic aliases from the client, request/response properties and user properties carried
//! to subscribers, and subscription options (no local, retain as published, retain
//! handling).

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::{Error as V5Error, QoS as V5QoS};

use crate::broker::MAX_PACKET_BYTES;

/// Topic aliases a v5 client may set (announced in the CONNACK).
pub const TOPIC_ALIAS_MAX: u16 = 64;

/// The protocol level a CONNECT at the start of `buf` asks for; `None` while the bytes
/// that say it have not all arrived.
pub fn protocol_level(buf: &[u8]) -> Option<u8> {
    // Fixed header (1), remaining length (1-4), protocol name length (2), "MQTT" (4), level.
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 || i > 4 {
            break;
        }
    }
    let name_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    buf.get(i + 2 + name_len).copied()
}

/// What a v5 CONNECT asks for beyond a 3.1.1 one.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Seconds the session outlives the connection (0: it ends with it; `u32::MAX`: never).
    pub session_expiry: u32,
    /// QoS 1 and 2 messages the client accepts unacknowledged.
    pub receive_max: Option<u16>,
    /// The largest packet the client accepts.
    pub max_packet: Option<u32>,
    /// Topic aliases the client accepts from the server (the server sets none).
    pub topic_alias_max: u16,
    /// Seconds the server waits before publishing the will (a reconnect within them
    /// cancels it).
    pub will_delay: u32,
}

/// The [`MessageProps`] of a PUBLISH's or a will's properties (the same fields in both).
macro_rules! props_of {
    ($p:expr) => {{
        let p = $p;
        MessageProps::new(
            p.message_expiry_interval,
            p.payload_format_indicator,
            p.content_type,
            p.response_topic,
            p.correlation_data,
            p.user_properties,
        )
    }};
}

/// A v5 CONNECT as its 3.1.1 equivalent and the v5 options.
pub fn connect_from_v5(
    connect: v5::Connect,
    will: Option<v5::LastWill>,
    login: Option<v5::Login>,
) -> Result<(v4::Connect, ConnectOptions, Option<Box<MessageProps>>), String> {
    let options = match connect.properties {
        Some(p) => ConnectOptions {
            session_expiry: p.session_expiry_interval.unwrap_or(0),
            receive_max: p.receive_maximum,
            max_packet: p.max_packet_size,
            topic_alias_max: p.topic_alias_max.unwrap_or(0),
            will_delay: 0,
        },
        None => ConnectOptions::default(),
    };
    let mut options = options;
    let (last_will, will_props) = match will {
        Some(w) => {
            options.will_delay = w.properties.as_ref().and_then(|p| p.delay_interval).unwrap_or(0);
            let topic = String::from_utf8(w.topic.to_vec()).map_err(|_| "the will topic is not UTF-8".to_owned())?;
            let props = w.properties.map(|p| props_of!(p));
            (Some(v4::LastWill { topic, message: w.message, qos: qos4(w.qos), retain: w.retain }), props.map(Box::new))
        }
        None => (None, None),
    };
    let v4 = v4::Connect {
        protocol: mqttbytes::Protocol::V4,
        keep_alive: connect.keep_alive,
        client_id: connect.client_id,
        clean_session: connect.clean_start,
        last_will,
        login: login.map(|l| v4::Login { username: l.username, password: l.password }),
    };
    Ok((v4, options, will_props))
}

/// Properties of a v5 PUBLISH carried to subscribers (v5 ones; a 3.1.1 subscriber gets the
/// message without them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProps {
    /// When the message expires (from its message expiry interval).
    pub expires_at: Option<Instant>,
    /// 1: the payload is UTF-8.
    pub payload_format: Option<u8>,
    /// Its MIME type.
    pub content_type: Option<String>,
    /// Where the receiver should answer (request/response).
    pub response_topic: Option<String>,
    /// What the answer should carry to be matched with the request.
    pub correlation_data: Option<Bytes>,
    /// Name-value pairs, in order.
    pub user_properties: Vec<(String, String)>,
}

impl MessageProps {
    fn new(
        expiry: Option<u32>,
        payload_format: Option<u8>,
        content_type: Option<String>,
        response_topic: Option<String>,
        correlation_data: Option<Bytes>,
        user_properties: Vec<(String, String)>,
    ) -> Self {
        Self {
            expires_at: expiry.map(|s| Instant::now() + Duration::from_secs(u64::from(s))),
            payload_format,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
        }
    }

    /// Whether it expired (a message past its expiry is not delivered).
    pub fn expired(&self) -> bool {
        self.expires_at.is_some_and(|t| Instant::now() >= t)
    }
}

/// Why a v5 packet is refused; the DISCONNECT reason the server sends before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Violation {
    /// The v5 reason code.
    pub reason: v5::DisconnectReasonCode,
    /// What was wrong, for the log and the DISCONNECT's reason string.
    pub message: String,
}

impl Violation {
    fn new(reason: v5::DisconnectReasonCode, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// The topic aliases a v5 client set on this connection.
#[derive(Debug, Default)]
pub struct TopicAliases(Vec<Option<String>>);

/// What a v5 SUBSCRIBE asks of one filter beyond its QoS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Not to receive its own messages.
    pub no_local: bool,
    /// To receive the retain flag as published.
    pub retain_as_published: bool,
    /// 0: retained messages on every subscribe; 1: only on a new subscription; 2: never.
    pub retain_handling: u8,
}

/// What a v5 packet carries beyond its 3.1.1 equivalent.
#[derive(Debug, Default)]
pub enum Extra {
    /// Nothing.
    #[default]
    None,
    /// A PUBLISH's properties.
    Publish(Option<Box<MessageProps>>),
    /// A SUBSCRIBE's options, one per filter.
    Subscribe(Vec<SubscribeOptions>),
    /// A DISCONNECT's reason and its new session expiry.
    Disconnect {
        /// Reason 0x04: publish the will although the client disconnected.
        with_will: bool,
        /// A new session expiry interval.
        session_expiry: Option<u32>,
    },
}

/// Reads one v5 packet from `buf` as its 3.1.1 equivalent and what only v5 has; `Ok(None)`
/// while incomplete. A bare DISCONNECT (`E0 00`) is read here (the codec refuses it).
pub fn read(buf: &mut BytesMut, aliases: &mut TopicAliases) -> Result<Option<(v4::Packet, Extra)>, Violation> {
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
        let _ = buf.split_to(2);
        return Ok(Some((v4::Packet::Disconnect, Extra::Disconnect { with_will: false, session_expiry: None })));
    }
    let packet = match v5::Packet::read(buf, Some(MAX_PACKET_BYTES as u32)) {
        Ok(p) => p,
        Err(V5Error::InsufficientBytes(_)) => return Ok(None),
        Err(V5Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            return Err(Violation::new(
                v5::DisconnectReasonCode::PacketTooLarge,
                format!("a packet of {pkt_size} bytes"),
            ));
        }
        Err(e) => return Err(Violation::new(v5::DisconnectReasonCode::MalformedPacket, e.to_string())),
    };
    let converted = match packet {
        v5::Packet::Publish(p) => {
            let (publish, props) = publish_from_v5(p, aliases)?;
            (v4::Packet::Publish(publish), Extra::Publish(props))
        }
        v5::Packet::PubAck(a) => (v4::Packet::PubAck(v4::PubAck::new(a.pkid)), Extra::None),
        v5::Packet::PubRec(r) => (v4::Packet::PubRec(v4::PubRec::new(r.pkid)), Extra::None),
        v5::Packet::PubRel(r) => (v4::Packet::PubRel(v4::PubRel::new(r.pkid)), Extra::None),
        v5::Packet::PubComp(c) => (v4::Packet::PubComp(v4::PubComp::new(c.pkid)), Extra::None),
        v5::Packet::Subscribe(s) => {
            let options = s
                .filters
                .iter()
                .map(|f| SubscribeOptions {
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect();
            let filters = s.filters.into_iter().map(|f| v4::SubscribeFilter::new(f.path, qos4(f.qos))).collect();
            (v4::Packet::Subscribe(v4::Subscribe { pkid: s.pkid, filters }), Extra::Subscribe(options))
        }
        v5::Packet::Unsubscribe(u) => {
            (v4::Packet::Unsubscribe(v4::Unsubscribe { pkid: u.pkid, topics: u.filters }), Extra::None)
        }
        v5::Packet::PingReq(_) => (v4::Packet::PingReq, Extra::None),
        v5::Packet::Disconnect(d) => {
            let with_will = d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage;
            let session_expiry = d.properties.and_then(|p| p.session_expiry_interval);
            (v4::Packet::Disconnect, Extra::Disconnect { with_will, session_expiry })
        }
        v5::Packet::Connect(..) => {
            return Err(Violation::new(v5::DisconnectReasonCode::ProtocolError, "a second CONNECT"));
        }
        v5::Packet::Auth(_) => {
            return Err(Violation::new(
                v5::DisconnectReasonCode::ImplementationSpecificError,
                "enhanced authentication (AUTH) is not supported: authenticate with a username and token, or a client certificate",
            ));
        }
        other => {
            return Err(Violation::new(
                v5::DisconnectReasonCode::ProtocolError,
                format!("a {other:?} packet from a client"),
            ));
        }
    };
    Ok(Some(converted))
}

/// A v5 PUBLISH as its 3.1.1 equivalent and its properties, its topic alias resolved.
fn publish_from_v5(
    p: v5::Publish,
    aliases: &mut TopicAliases,
) -> Result<(v4::Publish, Option<Box<MessageProps>>), Violation> {
    let invalid_alias = |m: String| Violation::new(v5::DisconnectReasonCode::TopicAliasInvalid, m);
    let mut topic = String::from_utf8(p.topic.to_vec())
        .map_err(|_| Violation::new(v5::DisconnectReasonCode::TopicNameInvalid, "the topic is not UTF-8"))?;
    let props = p.properties;
    if let Some(alias) = props.as_ref().and_then(|p| p.topic_alias) {
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            return Err(invalid_alias(format!("topic alias {alias} is out of range (1 to {TOPIC_ALIAS_MAX})")));
        }
        let slot = usize::from(alias - 1);
        if aliases.0.len() <= slot {
            aliases.0.resize(slot + 1, None);
        }
        if topic.is_empty() {
            topic =
                aliases.0[slot].clone().ok_or_else(|| invalid_alias(format!("topic alias {alias} was never set")))?;
        } else {
            aliases.0[slot] = Some(topic.clone());
        }
    } else if topic.is_empty() {
        return Err(Violation::new(v5::DisconnectReasonCode::ProtocolError, "an empty topic without a topic alias"));
    }
    let props = props.map(|p| Box::new(props_of!(p)));
    let mut publish = v4::Publish::from_bytes(topic, qos4(p.qos), p.payload);
    publish.pkid = p.pkid;
    publish.dup = p.dup;
    publish.retain = p.retain;
    Ok((publish, props))
}

/// A command answer (a JSON object) with `"id"` set from its correlation data, when it has
/// none; `None` when it already has one or is not a JSON object.
pub fn with_command_id(payload: &[u8], correlation: &[u8]) -> Option<Bytes> {
    let serde_json::Value::Object(mut answer) = serde_json::from_slice(payload).ok()? else { return None };
    if answer.contains_key("id") {
        return None;
    }
    let id = std::str::from_utf8(correlation).ok()?;
    answer.insert("id".to_owned(), serde_json::Value::String(id.to_owned()));
    serde_json::to_vec(&answer).ok().map(Bytes::from)
}

/// A telemetry payload (a JSON object or array of objects) with `fields` added as string
/// fields to each event that does not have them; `None` when it is not such JSON (the
/// decoder then reports it as it is).
pub fn with_fields(payload: &[u8], fields: &[(String, String)]) -> Option<Bytes> {
    let add = |event: &mut serde_json::Map<String, serde_json::Value>| {
        for (k, v) in fields {
            event.entry(k.clone()).or_insert_with(|| serde_json::Value::String(v.clone()));
        }
    };
    let mut value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    match &mut value {
        serde_json::Value::Object(event) => add(event),
        serde_json::Value::Array(events) => {
            for e in events {
                if let serde_json::Value::Object(event) = e {
                    add(event);
                }
            }
        }
        _ => return None,
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Writes a v5 PUBLISH with `props` (its remaining expiry counted down).
pub fn write_publish(
    buf: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    (pkid, qos, retain, dup): (u16, QoS, bool, bool),
    props: Option<&MessageProps>,
) -> Result<usize, mqttbytes::Error> {
    let mut properties = BytesMut::new();
    if let Some(p) = props {
        if let Some(f) = p.payload_format {
            properties.put_u8(0x01);
            properties.put_u8(f);
        }
        if let Some(at) = p.expires_at {
            let left = at.saturating_duration_since(Instant::now()).as_secs().max(1);
            properties.put_u8(0x02);
            properties.put_u32(u32::try_from(left).unwrap_or(u32::MAX));
        }
        if let Some(t) = &p.content_type {
            properties.put_u8(0x03);
            put_string(&mut properties, t);
        }
        if let Some(t) = &p.response_topic {
            properties.put_u8(0x08);
            put_string(&mut properties, t);
        }
        if let Some(d) = &p.correlation_data {
            properties.put_u8(0x09);
            properties.put_u16(d.len() as u16);
            properties.extend_from_slice(d);
        }
        for (k, v) in &p.user_properties {
            properties.put_u8(0x26);
            put_string(&mut properties, k);
            put_string(&mut properties, v);
        }
    }
    let with_id = qos != QoS::AtMostOnce;
    let len =
        2 + topic.len() + if with_id { 2 } else { 0 } + varint_len(properties.len()) + properties.len() + payload.len();
    if len > MAX_PACKET_BYTES || topic.len() > usize::from(u16::MAX) {
        return Err(mqttbytes::Error::OutgoingPacketTooLarge { pkt_size: len, max: MAX_PACKET_BYTES });
    }
    let start = buf.len();
    buf.put_u8(0x30 | u8::from(dup) << 3 | (qos as u8) << 1 | u8::from(retain));
    put_varint(buf, len);
    buf.put_u16(topic.len() as u16);
    buf.extend_from_slice(topic.as_bytes());
    if with_id {
        buf.put_u16(pkid);
    }
    put_varint(buf, properties.len());
    buf.extend_from_slice(&properties);
    buf.extend_from_slice(payload);
    Ok(buf.len() - start)
}

fn put_string(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.extend_from_slice(s.as_bytes());
}

/// Writes MQTT's variable byte integer.
pub(crate) fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        buf.put_u8(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            break;
        }
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The 3.1.1 codec's QoS of a v5 one.
pub fn qos4(q: V5QoS) -> QoS {
    match q {
        V5QoS::AtMostOnce => QoS::AtMostOnce,
        V5QoS::AtLeastOnce => QoS::AtLeastOnce,
        V5QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The v5 codec's QoS of a 3.1.1 one.
pub fn qos5(q: QoS) -> V5QoS {
    match q {
        QoS::AtMostOnce => V5QoS::AtMostOnce,
        QoS::AtLeastOnce => V5QoS::AtLeastOnce,
        QoS::ExactlyOnce => V5QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_level_is_read_from_the_first_bytes() {
        let mut b = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("c")).write(&mut b, 1 << 16).ok();
        assert_eq!(protocol_level(&b), Some(4));
        assert_eq!(protocol_level(&b[..5]), None, "not all there yet");
        let mut b = BytesMut::new();
        let connect = v5::Connect { keep_alive: 30, client_id: "c".into(), clean_start: true, properties: None };
        v5::Packet::Connect(connect, None, None).write(&mut b, None).ok();
        assert_eq!(protocol_level(&b), Some(5));
    }

    #[test]
    fn a_publish_with_properties_reads_back_with_the_v5_codec() -> Result<(), Box<dyn std::error::Error>> {
        let props = MessageProps {
            expires_at: Some(Instant::now() + Duration::from_secs(30)),
            payload_format: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("svc/replies".into()),
            correlation_data: Some(Bytes::from_static(b"req-7")),
            user_properties: vec![("site".into(), "north".into())],
        };
        let mut buf = BytesMut::new();
        write_publish(&mut buf, "alerts/hot", b"{}", (9, QoS::AtLeastOnce, false, false), Some(&props))?;
        let v5::Packet::Publish(p) = v5::Packet::read(&mut buf, None)? else { return Err("not a publish".into()) };
        let got = p.properties.ok_or("no properties")?;
        assert_eq!((p.pkid, &p.topic[..], &p.payload[..]), (9, &b"alerts/hot"[..], &b"{}"[..]));
        assert!(got.message_expiry_interval.is_some_and(|s| (29..=30).contains(&s)));
        assert_eq!(got.response_topic.as_deref(), Some("svc/replies"));
        assert_eq!(got.correlation_data.as_deref(), Some(&b"req-7"[..]));
        assert_eq!(got.user_properties, vec![("site".to_owned(), "north".to_owned())]);
        assert_eq!((got.payload_format_indicator, got.content_type.as_deref()), (Some(1), Some("application/json")));
        Ok(())
    }

    #[test]
    fn topic_aliases_are_set_used_and_bounded() -> Result<(), Box<dyn std::error::Error>> {
        let mut aliases = TopicAliases::default();
        let aliased = |topic: &str, alias: u16| {
            let mut p = v5::Publish::new(topic, V5QoS::AtMostOnce, "{}", None);
            p.properties = Some(v5::PublishProperties { topic_alias: Some(alias), ..Default::default() });
            let mut b = BytesMut::new();
            p.write(&mut b).map(|_| b)
        };
        let mut b = aliased("devices/d1/telemetry", 3)?;
        let Some((v4::Packet::Publish(p), _)) = read(&mut b, &mut aliases)? else { return Err("no publish".into()) };
        assert_eq!(p.topic, "devices/d1/telemetry");
        let mut b = aliased("", 3)?;
        let Some((v4::Packet::Publish(p), _)) = read(&mut b, &mut aliases)? else { return Err("no publish".into()) };
        assert_eq!(p.topic, "devices/d1/telemetry", "the alias names the topic");
        let mut b = aliased("", 4)?;
        assert_eq!(
            read(&mut b, &mut aliases).err().map(|v| v.reason),
            Some(v5::DisconnectReasonCode::TopicAliasInvalid)
        );
        let mut b = aliased("x", TOPIC_ALIAS_MAX + 1)?;
        assert_eq!(
            read(&mut b, &mut aliases).err().map(|v| v.reason),
            Some(v5::DisconnectReasonCode::TopicAliasInvalid)
        );
        Ok(())
    }
}

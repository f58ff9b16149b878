//! Sparkplug B 3.0 over the MQTT listener: `spBv1.0/{group}/{NBIRTH|NDATA|NDEATH|DBIRTH|
//! DDATA|DDEATH|NCMD|DCMD}/{edge node}[/{device}]` and `spBv1.0/STATE/{host}`.
//!
//! - Births define each edge node's and device's metrics: names, aliases and types. They are
//!   kept across reconnects (in memory: a server restart forgets them, and the first DATA
//!   after it asks for a rebirth).
//! - BIRTH and DATA messages become rows of the stream named after the group (letters,
//!   digits and `_`; other characters become `_`): one row per device and timestamp, a
//!   column per metric (named as the metric, `Inputs/Temperature`), the device id
//!   `{edge node}` for node metrics and `{edge node}:{device}` for a device's.
//! - A DATA message before its BIRTH, or with an alias its BIRTH did not define, is refused
//!   (the unknown metric alone) and counted, and the edge node is asked for a rebirth
//!   (`NCMD` `Node Control/Rebirth`, at most once every [`REBIRTH_INTERVAL`]).
//! - `seq` (0 to 255 per edge node) is checked on every message after the NBIRTH and gaps
//!   are counted; `bdSeq` ties an NDEATH to its NBIRTH, and a death of an older birth is
//!   ignored and counted.
//! - Births and deaths say when nodes and devices come and go: [`Outcome::availability`].
//! - Commands from the platform to a Sparkplug device go out as `DCMD` (to a node, `NCMD`):
//!   [`Sparkplug::command`].
//!
//! Types: Int8 to Int64 and UInt8 to UInt32 are `Int64` columns, UInt64 `UInt64`, Float and
//! Double `Float64`, Boolean `Boolean`, String, Text and UUID strings, DateTime `Int64`
//! (milliseconds since the epoch). Bytes, File, DataSet, Template, PropertySet and array
//! metrics are not stored: each is counted (`unsupported_type`).

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_engine::{Metrics, StreamBatch, StreamCatalog, StreamName};
use parking_lot::Mutex;
use prost::Message as _;

use crate::builder::BatchBuilder;
use proto::payload::{Metric, metric::Value};

/// The topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

/// The shortest time between two rebirth requests to one edge node.
pub const REBIRTH_INTERVAL: Duration = Duration::from_secs(5);

/// The metric a rebirth request sets.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";

/// Sparkplug's data types (specification §6.4.16).
pub mod datatype {
    /// Int8.
    pub const INT8: u32 = 1;
    /// Int16.
    pub const INT16: u32 = 2;
    /// Int32.
    pub const INT32: u32 = 3;
    /// Int64.
    pub const INT64: u32 = 4;
    /// UInt8.
    pub const UINT8: u32 = 5;
    /// UInt16.
    pub const UINT16: u32 = 6;
    /// UInt32.
    pub const UINT32: u32 = 7;
    /// UInt64.
    pub const UINT64: u32 = 8;
    /// Float.
    pub const FLOAT: u32 = 9;
    /// Double.
    pub const DOUBLE: u32 = 10;
    /// Boolean.
    pub const BOOLEAN: u32 = 11;
    /// String.
    pub const STRING: u32 = 12;
    /// DateTime (milliseconds since the epoch).
    pub const DATETIME: u32 = 13;
    /// Text.
    pub const TEXT: u32 = 14;
    /// UUID.
    pub const UUID: u32 = 15;
}

/// The kind of a Sparkplug message, from its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An edge node's birth certificate.
    NBirth,
    /// An edge node's death certificate (its MQTT will).
    NDeath,
    /// A device's birth certificate.
    DBirth,
    /// A device's death certificate.
    DDeath,
    /// An edge node's data.
    NData,
    /// A device's data.
    DData,
    /// A command to an edge node.
    NCmd,
    /// A command to a device.
    DCmd,
    /// A host application's state (`spBv1.0/STATE/{host}`).
    State,
}

impl Kind {
    /// The kinds a topic's type level names, in declaration order (the first six are the
    /// ones an edge node sends).
    const TOPIC_KINDS: [Self; 8] =
        [Self::NBirth, Self::NDeath, Self::DBirth, Self::DDeath, Self::NData, Self::DData, Self::NCmd, Self::DCmd];

    fn parse(s: &str) -> Option<Self> {
        Self::TOPIC_KINDS.into_iter().find(|k| k.as_str() == s)
    }

    /// Its name in topics and in metrics' labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NBirth => "NBIRTH",
            Self::NDeath => "NDEATH",
            Self::DBirth => "DBIRTH",
            Self::DDeath => "DDEATH",
            Self::NData => "NDATA",
            Self::DData => "DDATA",
            Self::NCmd => "NCMD",
            Self::DCmd => "DCMD",
            Self::State => "STATE",
        }
    }

    fn is_device(self) -> bool {
        matches!(self, Self::DBirth | Self::DDeath | Self::DData | Self::DCmd)
    }
}

/// What a Sparkplug topic names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    /// The group (empty for STATE).
    pub group: &'a str,
    /// The message's kind.
    pub kind: Kind,
    /// The edge node (the host application for STATE).
    pub edge: &'a str,
    /// The device, for device messages.
    pub device: Option<&'a str>,
}

/// Parses a topic of the Sparkplug namespace: `None` for other topics, an error saying what
/// is wrong for a malformed one.
pub fn parse_topic(topic: &str) -> Option<Result<Topic<'_>, String>> {
    let rest = topic.strip_prefix(NAMESPACE)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    let bad = |why: &str| Some(Err(format!("{topic:?} is not a Sparkplug B topic: {why}")));
    if parts.iter().any(|p| p.is_empty()) {
        return bad("a level is empty");
    }
    if parts[0] == "STATE" {
        return match parts.as_slice() {
            [_, host] => Some(Ok(Topic { group: "", kind: Kind::State, edge: host, device: None })),
            _ => bad("expected spBv1.0/STATE/{host}"),
        };
    }
    let (group, kind, edge, device) = match parts.as_slice() {
        [g, k, e] => (*g, *k, *e, None),
        [g, k, e, d] => (*g, *k, *e, Some(*d)),
        _ => return bad("expected spBv1.0/{group}/{type}/{edge node}[/{device}]"),
    };
    let Some(kind) = Kind::parse(kind) else {
        return bad("the type is not NBIRTH, NDEATH, DBIRTH, DDEATH, NDATA, DDATA, NCMD or DCMD");
    };
    if kind.is_device() != device.is_some() {
        return bad(if kind.is_device() {
            "a device message names its device after the edge node"
        } else {
            "a node message has no device level"
        });
    }
    Some(Ok(Topic { group, kind, edge, device }))
}

/// The stream of a group: its name with characters other than letters, digits and `_` as
/// `_`, and a leading `_` before a digit.
pub fn stream_of(group: &str) -> String {
    let mut s: String = group.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s.truncate(64);
    s
}

/// The device id of an edge node, or of one of its devices.
pub fn device_id(edge: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{edge}:{d}"),
        None => edge.to_owned(),
    }
}

/// The metrics a birth defined: each name's type, and the aliases.
#[derive(Debug, Default)]
struct Birth {
    types: HashMap<Arc<str>, u32>,
    aliases: HashMap<u64, (Arc<str>, u32)>,
}

impl Birth {
    fn from_metrics(metrics: &[Metric]) -> Self {
        let mut b = Self::default();
        for m in metrics {
            let (Some(name), Some(dt)) = (m.name.as_deref(), m.datatype) else { continue };
            let name: Arc<str> = name.into();
            b.types.insert(name.clone(), dt);
            if let Some(alias) = m.alias {
                b.aliases.insert(alias, (name, dt));
            }
        }
        b
    }

    /// The name and type of `m`: by its name, or by its alias.
    fn resolve<'a>(&'a self, m: &'a Metric) -> Option<(&'a str, u32)> {
        match (m.name.as_deref(), m.alias) {
            (Some(n), _) => Some((n, m.datatype.or_else(|| self.types.get(n).copied())?)),
            (None, Some(a)) => self.aliases.get(&a).map(|(n, dt)| (&**n, m.datatype.unwrap_or(*dt))),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Default)]
struct Device {
    birth: Birth,
    online: bool,
    /// Its id in Ferrite, `{node}:{device}`.
    id: String,
}

#[derive(Debug, Default)]
struct Node {
    birth: Option<Birth>,
    bd_seq: Option<u64>,
    last_seq: Option<u64>,
    online: bool,
    devices: HashMap<String, Device>,
    last_rebirth: Option<Instant>,
    /// The MQTT session that sent the NBIRTH: when it ends, the node and its devices are
    /// offline, whatever its NDEATH said.
    session: Option<u64>,
    /// Its group's stream, once known valid.
    stream: Option<StreamName>,
}

/// The row builders of the messages of one socket read, one per stream: rows of many
/// messages become one batch per stream.
pub type Builders = Vec<(StreamName, BatchBuilder)>;

/// Finishes `builders` into batches.
pub fn finish(builders: Builders) -> Vec<StreamBatch> {
    builders.into_iter().filter_map(|(_, b)| b.finish()).collect()
}

/// What handling one message produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rows its metrics added to the builders.
    pub rows: usize,
    /// Metrics refused one by one (an unknown alias, an unsupported type, a type conflict):
    /// reason and message.
    pub refused_metrics: Vec<(&'static str, String)>,
    /// The whole message refused: reason and message.
    pub refused: Option<(&'static str, String)>,
    /// A rebirth request to publish: topic and payload.
    pub rebirth: Option<(String, Vec<u8>)>,
    /// Devices that came online (`true`) or went offline, with why.
    pub availability: Vec<(String, bool, &'static str)>,
}

/// The edge nodes of each tenant and group, by id (looked up by `&str`, level by level,
/// without allocating).
type Nodes = HashMap<Arc<str>, HashMap<String, HashMap<String, Node>>>;

/// The Sparkplug state of every edge node: births, sequence numbers, availability.
pub struct Sparkplug {
    nodes: Mutex<Nodes>,
    metrics: Arc<Metrics>,
    /// `ferrite_sparkplug_messages_total` by message type, made once.
    messages: [Arc<ferrite_engine::metrics::Counter>; 6],
}

impl std::fmt::Debug for Sparkplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sparkplug").field("tenants", &self.nodes.lock().len()).finish()
    }
}

/// A scalar of a metric.
enum Scalar<'a> {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(&'a str),
    Null,
}

/// The value of `m` as type `dt` says; an error naming why it is not stored.
fn scalar(m: &Metric, dt: u32) -> Result<Scalar<'_>, (&'static str, String)> {
    use datatype::*;
    if m.is_null == Some(true) {
        return Ok(Scalar::Null);
    }
    let v = match (&m.value, dt) {
        (None, _) => Scalar::Null,
        // Signed values travel as two's complement in the low bits.
        (Some(Value::IntValue(v)), INT8) => Scalar::Int(i64::from(*v as u8 as i8)),
        (Some(Value::IntValue(v)), INT16) => Scalar::Int(i64::from(*v as u16 as i16)),
        (Some(Value::IntValue(v)), INT32) => Scalar::Int(i64::from(*v as i32)),
        (Some(Value::IntValue(v)), UINT8 | UINT16 | UINT32) => Scalar::Int(i64::from(*v)),
        (Some(Value::LongValue(v)), INT64) => Scalar::Int(*v as i64),
        (Some(Value::LongValue(v)), UINT64) => Scalar::UInt(*v),
        (Some(Value::LongValue(v)), DATETIME) => Scalar::Int(*v as i64),
        (Some(Value::FloatValue(v)), FLOAT) => Scalar::Float(f64::from(*v)),
        (Some(Value::DoubleValue(v)), DOUBLE) => Scalar::Float(*v),
        (Some(Value::BooleanValue(v)), BOOLEAN) => Scalar::Bool(*v),
        (Some(Value::StringValue(v)), STRING | TEXT | UUID) => Scalar::Str(v),
        (_, 16..) | (Some(Value::BytesValue(_)), _) => {
            return Err((
                "unsupported_type",
                format!("datatype {dt} (bytes, files, data sets, templates, arrays) is not stored"),
            ));
        }
        (_, _) => {
            return Err(("value_mismatch", format!("the value does not match its datatype {dt}")));
        }
    };
    Ok(v)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A payload of one metric, with the next timestamp.
pub fn encode(metrics: Vec<Metric>) -> Vec<u8> {
    proto::Payload { timestamp: Some(now_ms()), metrics, seq: None, uuid: None, body: None }.encode_to_vec()
}

/// A boolean metric.
pub fn bool_metric(name: &str, value: bool) -> Metric {
    Metric {
        name: Some(name.to_owned()),
        datatype: Some(datatype::BOOLEAN),
        value: Some(Value::BooleanValue(value)),
        ..Metric::default()
    }
}

impl Sparkplug {
    /// No edge node known yet; counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let messages = [Kind::NBirth, Kind::NDeath, Kind::DBirth, Kind::DDeath, Kind::NData, Kind::DData]
            .map(|kind| metrics.counter("ferrite_sparkplug_messages_total", &[("type", kind.as_str())]));
        Self { nodes: Mutex::default(), metrics, messages }
    }

    fn count(&self, reason: &'static str) {
        self.metrics.inc("ferrite_sparkplug_refused_total", &[("reason", reason)], 1);
    }

    /// Handles one message of `tenant`'s edge node, sent on MQTT session `session`: its rows
    /// go into `builders` (the builder of their stream, made with `catalog`'s schemas when
    /// there is none yet); the outcome says what it refused, a rebirth request, availability
    /// changes. NCMD, DCMD and STATE (published by host applications) produce nothing here.
    pub fn handle(
        &self,
        catalog: &Arc<StreamCatalog>,
        (tenant, session): (&str, u64),
        t: &Topic<'_>,
        payload: &[u8],
        builders: &mut Builders,
    ) -> Outcome {
        let mut out = Outcome::default();
        if matches!(t.kind, Kind::NCmd | Kind::DCmd | Kind::State) {
            return out;
        }
        // The six kinds an edge node sends come first in `Kind`, as in `messages`.
        self.messages[t.kind as usize].add(1);
        let refuse = |out: &mut Outcome, reason: &'static str, message: String| {
            self.count(reason);
            tracing::warn!(
                group = t.group,
                edge = t.edge,
                device = t.device,
                reason,
                "sparkplug message refused: {message}"
            );
            out.refused = Some((reason, message));
        };
        let p = match proto::Payload::decode(payload) {
            Ok(p) => p,
            Err(e) => {
                refuse(&mut out, "invalid_payload", format!("the payload is not a Sparkplug B protobuf payload: {e}"));
                return out;
            }
        };
        let mut nodes = self.nodes.lock();
        if !nodes.contains_key(tenant) {
            nodes.insert(tenant.into(), HashMap::new());
        }
        let groups = nodes.get_mut(tenant).expect("inserted above");
        if !groups.contains_key(t.group) {
            groups.insert(t.group.to_owned(), HashMap::new());
        }
        let edges = groups.get_mut(t.group).expect("inserted above");
        if !edges.contains_key(t.edge) {
            if let Err(e) = ferrite_engine::ids::validate_device_id(t.edge) {
                refuse(&mut out, "invalid_device", format!("{e}"));
                return out;
            }
            edges.insert(t.edge.to_owned(), Node::default());
        }
        let node = edges.get_mut(t.edge).expect("inserted above");
        let stream = match &node.stream {
            Some(s) => s.clone(),
            None => match StreamName::in_tenant(tenant, &stream_of(t.group)) {
                Ok(s) => {
                    node.stream = Some(s.clone());
                    s
                }
                Err(e) => {
                    refuse(&mut out, "invalid_group", format!("group {:?} names no stream: {e}", t.group));
                    return out;
                }
            },
        };

        // Sequence numbers: every message of a born node after its NBIRTH.
        if t.kind != Kind::NDeath {
            match (t.kind, p.seq, node.last_seq) {
                (Kind::NBirth, seq, _) => node.last_seq = seq,
                (_, Some(seq), Some(last)) => {
                    if seq != (last + 1) % 256 {
                        self.metrics.inc("ferrite_sparkplug_seq_gaps_total", &[], 1);
                        tracing::warn!(
                            group = t.group,
                            edge = t.edge,
                            expected = (last + 1) % 256,
                            seq,
                            "sparkplug sequence gap"
                        );
                    }
                    node.last_seq = Some(seq);
                }
                (_, seq, None) => node.last_seq = seq,
                (_, None, Some(_)) => {}
            }
        }

        let born = match t.kind {
            Kind::NBirth => {
                node.bd_seq = bd_seq(&p);
                node.birth = Some(Birth::from_metrics(&p.metrics));
                node.online = true;
                node.session = Some(session);
                // A new birth of the node: its devices are born again after it.
                for d in node.devices.values_mut() {
                    d.online = false;
                }
                out.availability.push((t.edge.to_owned(), true, "birth"));
                node.birth.as_ref().map(|b| (b, t.edge))
            }
            Kind::NDeath => {
                let bd_seq = bd_seq(&p);
                if node.bd_seq.is_some() && bd_seq.is_some() && bd_seq != node.bd_seq {
                    refuse(
                        &mut out,
                        "stale_death",
                        format!("NDEATH bdSeq {bd_seq:?} is not that of the node's birth ({:?}): ignored", node.bd_seq),
                    );
                    return out;
                }
                if node.online {
                    out.availability.push((t.edge.to_owned(), false, "death"));
                }
                node.online = false;
                for d in node.devices.values_mut() {
                    if d.online {
                        out.availability.push((d.id.clone(), false, "node_death"));
                    }
                    d.online = false;
                }
                return out;
            }
            Kind::DBirth | Kind::DDeath | Kind::DData | Kind::NData if node.birth.is_none() => {
                refuse(
                    &mut out,
                    "no_birth",
                    format!(
                        "{} from edge node {:?} before its NBIRTH: a rebirth is requested",
                        t.kind.as_str(),
                        t.edge
                    ),
                );
                out.rebirth = rebirth(node, t);
                return out;
            }
            Kind::DBirth => {
                let name = t.device.unwrap_or_default();
                if !node.devices.contains_key(name) {
                    let id = device_id(t.edge, Some(name));
                    if let Err(e) = ferrite_engine::ids::validate_device_id(&id) {
                        refuse(&mut out, "invalid_device", format!("{e}"));
                        return out;
                    }
                    node.devices.insert(name.to_owned(), Device { id, ..Device::default() });
                }
                let d = node.devices.get_mut(name).expect("inserted above");
                d.birth = Birth::from_metrics(&p.metrics);
                d.online = true;
                out.availability.push((d.id.clone(), true, "birth"));
                Some((&d.birth, d.id.as_str()))
            }
            Kind::DDeath => {
                if let Some(d) = node.devices.get_mut(t.device.unwrap_or_default())
                    && d.online
                {
                    d.online = false;
                    out.availability.push((d.id.clone(), false, "death"));
                }
                return out;
            }
            Kind::DData => match node.devices.get(t.device.unwrap_or_default()) {
                Some(d) => Some((&d.birth, d.id.as_str())),
                None => {
                    let id = device_id(t.edge, t.device);
                    refuse(
                        &mut out,
                        "no_birth",
                        format!("DDATA from device {id:?} before its DBIRTH: a rebirth is requested"),
                    );
                    out.rebirth = rebirth(node, t);
                    return out;
                }
            },
            Kind::NData => node.birth.as_ref().map(|b| (b, t.edge)),
            Kind::NCmd | Kind::DCmd | Kind::State => None,
        };
        let Some((birth, device)) = born else { return out };
        let b = match builders.iter().position(|(s, _)| *s == stream) {
            Some(i) => &mut builders[i].1,
            None => match BatchBuilder::new(catalog.clone(), &stream) {
                Ok(b) => {
                    builders.push((stream, b));
                    let last = builders.len() - 1;
                    &mut builders[last].1
                }
                Err(e) => {
                    refuse(&mut out, "internal", e.to_string());
                    return out;
                }
            },
        };
        let (rows, refused, unknown_alias) = rows(b, device, &p, birth);
        for (reason, _) in &refused {
            self.count(reason);
        }
        out.rows = rows;
        out.refused_metrics = refused;
        if unknown_alias {
            out.rebirth = rebirth(node, t);
        }
        out
    }

    /// The nodes MQTT session `session` gave birth to go offline with their devices: each
    /// one's tenant, device id and the reason.
    pub fn session_ended(&self, session: u64) -> Vec<(Arc<str>, String, &'static str)> {
        let mut out = Vec::new();
        let mut nodes = self.nodes.lock();
        for (tenant, groups) in nodes.iter_mut() {
            for (edge, node) in groups.values_mut().flat_map(|edges| edges.iter_mut()) {
                if node.session != Some(session) {
                    continue;
                }
                node.session = None;
                if node.online {
                    out.push((tenant.clone(), edge.clone(), "session_ended"));
                }
                node.online = false;
                for d in node.devices.values_mut() {
                    if d.online {
                        out.push((tenant.clone(), d.id.clone(), "session_ended"));
                    }
                    d.online = false;
                }
            }
        }
        out
    }

    /// A command (`{"name", "params"}`, as the command service sends it) for `device` (the id
    /// Ferrite gives an edge node or a device; of `tenant`, or of any tenant, device ids being
    /// unique), when it is a Sparkplug one that was born: the NCMD or DCMD topic and payload.
    /// `params` become metrics (typed as the birth defined them, else from their JSON type);
    /// a command without parameters sets the metric named as the command to `true`.
    pub fn command(
        &self,
        tenant: Option<&str>,
        device: &str,
        command: &[u8],
    ) -> Option<Result<(String, Vec<u8>), String>> {
        let (edge, dev) = match device.split_once(':') {
            Some((e, d)) => (e, Some(d)),
            None => (device, None),
        };
        let nodes = self.nodes.lock();
        let (group, node) = nodes
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|x| x == &***t))
            .flat_map(|(_, groups)| groups.iter())
            .find_map(|(g, edges)| edges.get(edge).filter(|n| n.birth.is_some()).map(|n| (g, n)))?;
        let birth = match dev {
            Some(d) => &node.devices.get(d)?.birth,
            None => node.birth.as_ref()?,
        };
        // Read only for a device that is a Sparkplug one: every other command goes its way.
        #[derive(serde::Deserialize)]
        struct Command {
            name: String,
            #[serde(default)]
            params: serde_json::Map<String, serde_json::Value>,
        }
        let Command { name, params } = serde_json::from_slice(command).ok()?;
        let metrics: Result<Vec<Metric>, String> = if params.is_empty() {
            Ok(vec![bool_metric(&name, true)])
        } else {
            params.iter().map(|(k, v)| command_metric(k, v, birth.types.get(k.as_str()).copied())).collect()
        };
        let topic = match dev {
            Some(d) => format!("{NAMESPACE}/{group}/DCMD/{edge}/{d}"),
            None => format!("{NAMESPACE}/{group}/NCMD/{edge}"),
        };
        Some(metrics.map(|m| (topic, encode(m))))
    }
}

/// The `bdSeq` metric of a birth or a death, which ties a node's NDEATH to its NBIRTH.
fn bd_seq(p: &proto::Payload) -> Option<u64> {
    p.metrics.iter().find(|m| m.name.as_deref() == Some("bdSeq")).and_then(|m| match m.value {
        Some(Value::LongValue(v)) => Some(v),
        Some(Value::IntValue(v)) => Some(u64::from(v)),
        _ => None,
    })
}

/// A rebirth request to the topic's edge node, unless one went out less than
/// [`REBIRTH_INTERVAL`] ago.
fn rebirth(node: &mut Node, t: &Topic<'_>) -> Option<(String, Vec<u8>)> {
    if node.last_rebirth.is_some_and(|at| at.elapsed() < REBIRTH_INTERVAL) {
        return None;
    }
    node.last_rebirth = Some(Instant::now());
    let topic = format!("{NAMESPACE}/{}/NCMD/{}", t.group, t.edge);
    Some((topic, encode(vec![bool_metric(REBIRTH_METRIC, true)])))
}

/// A command parameter as a metric of type `dt` (or of its JSON type).
fn command_metric(name: &str, v: &serde_json::Value, dt: Option<u32>) -> Result<Metric, String> {
    use datatype::*;
    use serde_json::Value as J;
    let dt = dt.unwrap_or(match v {
        J::Bool(_) => BOOLEAN,
        J::Number(n) if n.is_i64() => INT64,
        J::Number(n) if n.is_u64() => UINT64,
        J::Number(_) => DOUBLE,
        J::String(_) => STRING,
        _ => 0,
    });
    let bad = || format!("parameter {name:?}: {v} does not fit the metric's datatype {dt}");
    let value = match (dt, v) {
        (BOOLEAN, J::Bool(b)) => Value::BooleanValue(*b),
        (INT8 | INT16 | INT32, J::Number(n)) => Value::IntValue(n.as_i64().ok_or_else(bad)? as i32 as u32),
        (UINT8 | UINT16 | UINT32, J::Number(n)) => {
            Value::IntValue(n.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad)?)
        }
        (INT64 | DATETIME, J::Number(n)) => Value::LongValue(n.as_i64().ok_or_else(bad)? as u64),
        (UINT64, J::Number(n)) => Value::LongValue(n.as_u64().ok_or_else(bad)?),
        (FLOAT, J::Number(n)) => Value::FloatValue(n.as_f64().ok_or_else(bad)? as f32),
        (DOUBLE, J::Number(n)) => Value::DoubleValue(n.as_f64().ok_or_else(bad)?),
        (STRING | TEXT | UUID, J::String(s)) => Value::StringValue(s.clone()),
        _ => return Err(bad()),
    };
    Ok(Metric { name: Some(name.to_owned()), datatype: Some(dt), value: Some(value), ..Metric::default() })
}

/// Writes the rows of a BIRTH or DATA payload of `device` into `b`: one per timestamp (a
/// metric's own, else the payload's, else now), a column per metric. Returns how many rows,
/// what was refused, and whether an alias was unknown.
fn rows(
    b: &mut BatchBuilder,
    device: &str,
    p: &proto::Payload,
    birth: &Birth,
) -> (usize, Vec<(&'static str, String)>, bool) {
    let mut refused = Vec::new();
    let mut unknown_alias = false;
    let mut rows = 0;
    let now = now_ms();
    let ms_to_ns = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX / 1_000_000).saturating_mul(1_000_000);
    let mut row_time: Option<u64> = None;
    let mut in_row: Vec<&str> = Vec::new();
    for m in &p.metrics {
        let Some((name, dt)) = birth.resolve(m) else {
            if m.name.is_none() && m.alias.is_some() {
                unknown_alias = true;
                refused.push(("unknown_alias", format!("alias {} was not defined by the birth", m.alias.unwrap_or(0))));
            }
            continue;
        };
        if name == "bdSeq" {
            continue;
        }
        let value = match scalar(m, dt) {
            Ok(v) => v,
            Err(r) => {
                refused.push((r.0, format!("metric {name:?}: {}", r.1)));
                continue;
            }
        };
        let ts = m.timestamp.or(p.timestamp).unwrap_or(now);
        if row_time != Some(ts) || in_row.contains(&name) {
            if row_time.is_some() {
                b.end_row(0);
                rows += 1;
            }
            b.begin_row();
            b.set_device(device);
            b.set_time(ms_to_ns(ts));
            row_time = Some(ts);
            in_row.clear();
        }
        in_row.push(name);
        let set = match value {
            Scalar::Int(v) => b.set_int(name, v),
            Scalar::UInt(v) => b.set_uint(name, v),
            Scalar::Float(v) => b.set_float(name, v),
            Scalar::Bool(v) => b.set_bool(name, v),
            Scalar::Str(v) => b.set_str(name, v),
            Scalar::Null => Ok(()),
        };
        if let Err(e) = set {
            refused.push((e.reason, format!("metric {name:?}: {}", e.message)));
        }
    }
    if row_time.is_some() {
        b.end_row(0);
        rows += 1;
    }
    (rows, refused, unknown_alias)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(name: Option<&str>, alias: Option<u64>, dt: Option<u32>, value: Option<Value>) -> Metric {
        Metric { name: name.map(str::to_owned), alias, datatype: dt, value, ..Metric::default() }
    }

    fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
        proto::Payload { timestamp: Some(1_700_000_000_000), metrics, seq: Some(seq), uuid: None, body: None }
            .encode_to_vec()
    }

    fn topic(s: &str) -> Topic<'_> {
        match parse_topic(s) {
            Some(Ok(t)) => t,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn ints(batch: &StreamBatch, column: &str) -> Vec<Option<i64>> {
        batch
            .batch
            .column_by_name(column)
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::Int64Array>().cloned())
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }

    #[test]
    fn topics_parse_and_malformed_ones_say_why() {
        assert_eq!(
            topic("spBv1.0/plant-1/DDATA/edge1/pump1"),
            Topic { group: "plant-1", kind: Kind::DData, edge: "edge1", device: Some("pump1") }
        );
        assert_eq!(topic("spBv1.0/STATE/scada").kind, Kind::State);
        assert!(parse_topic("devices/d1/telemetry").is_none());
        for bad in ["spBv1.0/g/NDATA/e/d", "spBv1.0/g/DDATA/e", "spBv1.0/g/XDATA/e", "spBv1.0/g//e", "spBv1.0/g"] {
            assert!(matches!(parse_topic(bad), Some(Err(_))), "{bad}");
        }
        assert_eq!(stream_of("plant-1"), "plant_1");
        assert_eq!(stream_of("1st floor"), "_1st_floor");
        assert_eq!(device_id("edge1", Some("pump1")), "edge1:pump1");
    }

    #[test]
    fn signed_values_travel_as_twos_complement_and_types_must_match() {
        let v = |dt, value| {
            scalar(&metric(Some("m"), None, Some(dt), Some(value)), dt).map(|s| match s {
                Scalar::Int(i) => i,
                _ => i64::MIN,
            })
        };
        assert_eq!(v(datatype::INT8, Value::IntValue(0xFF)).ok(), Some(-1));
        assert_eq!(v(datatype::INT8, Value::IntValue(u32::MAX)).ok(), Some(-1));
        assert_eq!(v(datatype::INT16, Value::IntValue(0xFFFE)).ok(), Some(-2));
        assert_eq!(v(datatype::INT32, Value::IntValue(u32::MAX - 4)).ok(), Some(-5));
        assert_eq!(v(datatype::INT64, Value::LongValue(u64::MAX)).ok(), Some(-1));
        assert_eq!(v(datatype::UINT32, Value::IntValue(u32::MAX)).ok(), Some(i64::from(u32::MAX)));
        assert!(matches!(v(datatype::INT32, Value::DoubleValue(1.0)), Err(("value_mismatch", _))));
        assert!(matches!(v(17, Value::BytesValue(vec![1])), Err(("unsupported_type", _))));
    }

    #[test]
    fn births_define_aliases_data_makes_rows_and_the_unknown_is_refused() {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let sp = Sparkplug::new(Arc::new(Metrics::new()));
        let birth = payload(
            0,
            vec![
                metric(Some("bdSeq"), None, Some(datatype::INT64), Some(Value::LongValue(3))),
                metric(Some("Inputs/A"), Some(1), Some(datatype::INT32), Some(Value::IntValue(7))),
                metric(Some("Mode"), Some(2), Some(datatype::STRING), Some(Value::StringValue("auto".into()))),
            ],
        );
        let t = topic("spBv1.0/g1/NBIRTH/e1");
        let mut b = Builders::new();
        let out = sp.handle(&catalog, ("default", 1), &t, &birth, &mut b);
        assert_eq!(out.availability, vec![("e1".to_owned(), true, "birth")]);
        let batch = finish(b).pop().expect("the birth's row");
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(ints(&batch, "Inputs/A"), vec![Some(7)]);
        assert!(batch.batch.column_by_name("bdSeq").is_none(), "bdSeq is not data");

        // DATA by alias; two timestamps make two rows; an unknown alias alone is refused.
        let mut late = metric(None, Some(1), None, Some(Value::IntValue(9)));
        late.timestamp = Some(1_700_000_001_000);
        let data = payload(
            1,
            vec![metric(None, Some(1), None, Some(Value::IntValue(8))), late, metric(None, Some(99), None, None)],
        );
        let mut b = Builders::new();
        let out = sp.handle(&catalog, ("default", 1), &topic("spBv1.0/g1/NDATA/e1"), &data, &mut b);
        assert_eq!(out.rows, 2);
        let batch = finish(b).pop().expect("rows");
        assert_eq!(ints(&batch, "Inputs/A"), vec![Some(8), Some(9)]);
        assert_eq!(out.refused_metrics.len(), 1);
        assert_eq!(out.refused_metrics[0].0, "unknown_alias");
        let (rebirth_topic, _) = out.rebirth.expect("a rebirth request");
        assert_eq!(rebirth_topic, "spBv1.0/g1/NCMD/e1");
        // ...at most once per interval.
        let out = sp.handle(
            &catalog,
            ("default", 1),
            &topic("spBv1.0/g1/NDATA/e1"),
            &payload(2, vec![metric(None, Some(99), None, None)]),
            &mut Builders::new(),
        );
        assert!(out.rebirth.is_none());

        // A gap in seq is counted, the data kept.
        let out = sp.handle(
            &catalog,
            ("default", 1),
            &topic("spBv1.0/g1/NDATA/e1"),
            &payload(9, vec![metric(None, Some(1), None, Some(Value::IntValue(1)))]),
            &mut Builders::new(),
        );
        assert_eq!(out.rows, 1);
        assert_eq!(sp.metrics.counter_value("ferrite_sparkplug_seq_gaps_total", &[]), 1);

        // A device's data before its birth, and garbage: refused whole.
        let out = sp.handle(
            &catalog,
            ("default", 1),
            &topic("spBv1.0/g1/DDATA/e1/d1"),
            &payload(10, vec![]),
            &mut Builders::new(),
        );
        assert_eq!(out.refused.map(|r| r.0), Some("no_birth"));
        let out = sp.handle(
            &catalog,
            ("default", 1),
            &topic("spBv1.0/g1/NDATA/e1"),
            &[0x12, 0xff, 0x01],
            &mut Builders::new(),
        );
        assert_eq!(out.refused.map(|r| r.0), Some("invalid_payload"));

        // A death of an older birth is ignored; the birth's own takes the node offline.
        let death =
            |bd: u64| payload(0, vec![metric(Some("bdSeq"), None, Some(datatype::INT64), Some(Value::LongValue(bd)))]);
        let out = sp.handle(&catalog, ("default", 1), &topic("spBv1.0/g1/NDEATH/e1"), &death(2), &mut Builders::new());
        assert_eq!(out.refused.map(|r| r.0), Some("stale_death"));
        assert!(out.availability.is_empty());
        let out = sp.handle(&catalog, ("default", 1), &topic("spBv1.0/g1/NDEATH/e1"), &death(3), &mut Builders::new());
        assert_eq!(out.availability, vec![("e1".to_owned(), false, "death")]);
    }

    #[test]
    fn commands_become_metrics_typed_by_the_birth_and_a_session_end_takes_nodes_offline() {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let sp = Sparkplug::new(Arc::new(Metrics::new()));
        let born = payload(0, vec![metric(Some("Speed"), None, Some(datatype::INT16), Some(Value::IntValue(1)))]);
        sp.handle(&catalog, ("default", 7), &topic("spBv1.0/g1/NBIRTH/e1"), &born, &mut Builders::new());
        sp.handle(
            &catalog,
            ("default", 7),
            &topic("spBv1.0/g1/DBIRTH/e1/d1"),
            &payload(1, vec![metric(Some("Running"), None, Some(datatype::BOOLEAN), Some(Value::BooleanValue(true)))]),
            &mut Builders::new(),
        );
        let (topic, bytes) = match sp.command(None, "e1", br#"{"name": "set", "params": {"Speed": -3}}"#) {
            Some(Ok(x)) => x,
            other => panic!("{other:?}"),
        };
        assert_eq!(topic, "spBv1.0/g1/NCMD/e1");
        let p = proto::Payload::decode(bytes.as_slice()).unwrap_or_default();
        assert_eq!(p.metrics[0].datatype, Some(datatype::INT16));
        assert_eq!(p.metrics[0].value, Some(Value::IntValue((-3i32) as u32)));
        let wrong = br#"{"name": "set", "params": {"Speed": "fast"}}"#;
        assert!(matches!(sp.command(Some("default"), "e1", wrong), Some(Err(_))));
        let (topic, _) =
            sp.command(Some("default"), "e1:d1", br#"{"name": "Running"}"#).and_then(Result::ok).unwrap_or_default();
        assert_eq!(topic, "spBv1.0/g1/DCMD/e1/d1");
        let x = br#"{"name": "x"}"#;
        assert!(sp.command(Some("default"), "e9", x).is_none(), "not a Sparkplug device");
        assert!(sp.command(Some("other"), "e1", x).is_none(), "another tenant's");

        let gone = sp.session_ended(7);
        assert_eq!(gone.len(), 2);
        assert!(sp.session_ended(7).is_empty());
    }
}

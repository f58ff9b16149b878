//! InfluxDB line protocol decoder (what Telegraf and the Influx client libraries send):
//!
//! ```text
//! measurement[,tag=value...] field=value[,field=value...] [timestamp]
//! ```
//!
//! The measurement is the stream; a tag names the device (see [`DeviceNaming`]: the request's
//! `device_tag`, else the stream's declared one, else `device_id`, then `host`, then the
//! configured `device_tags` in their order, e.g. `name` for TSBS data); a line without it
//! goes to the default device when one is set, and is rejected otherwise. Other tags become
//! string columns; fields are floats, integers (`1i`, `1u`),
//! booleans (`t`, `true`, `F`...) or double-quoted strings. The timestamp is in the
//! request's precision (ns by default); missing, the receive time is used. An invalid line
//! is rejected alone with its line number; the other lines are kept.

use std::sync::Arc;

use ahash::AHashMap;
use ferrite_engine::{StreamBatch, StreamCatalog, StreamName};

use crate::builder::{BatchBuilder, Rejection, ValueError};

/// Unit of line-protocol timestamps (`precision=` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Nanoseconds (the default).
    #[default]
    Nanoseconds,
    /// Microseconds.
    Microseconds,
    /// Milliseconds.
    Milliseconds,
    /// Seconds.
    Seconds,
    /// Minutes (InfluxDB 1.x's `m`).
    Minutes,
    /// Hours (InfluxDB 1.x's `h`).
    Hours,
    /// Each timestamp's unit guessed from its magnitude (InfluxDB 3's `auto`): under 5e9
    /// seconds, under 5e12 milliseconds, under 5e15 microseconds, nanoseconds above (the
    /// guesses meet around the year 2128 in each unit).
    Auto,
}

impl Precision {
    /// Parses the `precision` parameter: `ns`, `us`, `ms`, `s`; InfluxDB 1.x's `n`, `u`, `m`,
    /// `h`; InfluxDB 3's `nanosecond`, `microsecond`, `millisecond`, `second`, `auto`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ns" | "n" | "nanosecond" => Self::Nanoseconds,
            "us" | "u" | "µs" | "microsecond" => Self::Microseconds,
            "ms" | "millisecond" => Self::Milliseconds,
            "s" | "second" => Self::Seconds,
            "m" | "minute" => Self::Minutes,
            "h" | "hour" => Self::Hours,
            "auto" => Self::Auto,
            _ => return None,
        })
    }

    fn to_nanos(self, v: i64) -> Option<i64> {
        match self {
            Self::Nanoseconds => Some(v),
            Self::Microseconds => v.checked_mul(1_000),
            Self::Milliseconds => v.checked_mul(1_000_000),
            Self::Seconds => v.checked_mul(1_000_000_000),
            Self::Minutes => v.checked_mul(60_000_000_000),
            Self::Hours => v.checked_mul(3_600_000_000_000),
            Self::Auto => match v.unsigned_abs() {
                a if a < 5_000_000_000 => Self::Seconds.to_nanos(v),
                a if a < 5_000_000_000_000 => Self::Milliseconds.to_nanos(v),
                a if a < 5_000_000_000_000_000 => Self::Microseconds.to_nanos(v),
                _ => Some(v),
            },
        }
    }
}

/// How lines name their devices. In order: the request's `tag` (only that tag), else the
/// stream's declared `device_tag` (only that tag), else `device_id`, then `host`, then
/// `tags` in order. A line without the tag goes to `fallback` (the request's), else the
/// stream's declared `default_device`, else `default_device`; with none, it is rejected.
#[derive(Debug, Clone, Default)]
pub struct DeviceNaming {
    /// The request's device tag (`device_tag=` on the write endpoints).
    pub tag: Option<Arc<str>>,
    /// The request's device for lines without the tag (`default_device=`).
    pub fallback: Option<Arc<str>>,
    /// Tags tried after `device_id` and `host` (the `device_tags` setting).
    pub tags: Arc<[String]>,
    /// The device of lines without a device tag (the `default_device` setting).
    pub default_device: Option<Arc<str>>,
}

impl DeviceNaming {
    /// The configured defaults, with nothing from a request.
    pub fn configured(tags: &[String], default_device: Option<&str>) -> Self {
        Self { tag: None, fallback: None, tags: tags.into(), default_device: default_device.map(Arc::from) }
    }

    /// This naming with a request's tag and fallback device.
    pub fn with_request(&self, tag: Option<&str>, fallback: Option<&str>) -> Self {
        Self { tag: tag.map(Arc::from), fallback: fallback.map(Arc::from), ..self.clone() }
    }
}

/// How one stream's lines name their devices: [`DeviceNaming`] with the stream's
/// declaration applied.
struct StreamNaming {
    /// The one tag that names the device, and who chose it (for messages).
    tag: Option<(Arc<str>, &'static str)>,
    /// The device of a line without it.
    fallback: Option<Arc<str>>,
}

impl StreamNaming {
    fn new(naming: &DeviceNaming, catalog: &StreamCatalog, stream: &StreamName) -> Self {
        let (declared_tag, declared_device) = catalog.device_naming(stream);
        let tag = match (&naming.tag, declared_tag) {
            (Some(t), _) => Some((t.clone(), "the request's `device_tag`")),
            (None, Some(t)) => Some((t, "the stream's declared `device_tag`")),
            (None, None) => None,
        };
        let fallback = naming.fallback.clone().or(declared_device).or_else(|| naming.default_device.clone());
        Self { tag, fallback }
    }
}

/// The result of decoding a line-protocol payload.
pub struct LineProtocolOutput {
    /// One batch per measurement.
    pub batches: Vec<StreamBatch>,
    /// Rows kept.
    pub accepted: usize,
    /// Lines rejected.
    pub rejections: Vec<Rejection>,
}

/// Decodes a whole line-protocol payload; measurements name streams of `tenant`.
pub fn decode(
    catalog: &Arc<StreamCatalog>,
    tenant: &str,
    payload: &str,
    precision: Precision,
    naming: &DeviceNaming,
    now: i64,
) -> LineProtocolOutput {
    let mut builders: AHashMap<String, (BatchBuilder, StreamNaming)> = AHashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut rejections = Vec::new();
    for (i, raw) in payload.split('\n').enumerate() {
        let line = raw.trim_end_matches('\r').trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let reject = |reason: &'static str, msg: String| Rejection {
            index: i,
            reason,
            message: format!("line {}: {msg}", i + 1),
        };
        let parsed = match parse_line(line) {
            Ok(p) => p,
            Err(msg) => {
                rejections.push(reject("invalid_line_protocol", msg));
                continue;
            }
        };
        let (builder, stream_naming) = match builders.get_mut(parsed.measurement.as_ref()) {
            Some((b, n)) => (b, &*n),
            None => {
                let stream = match StreamName::in_tenant(tenant, &parsed.measurement) {
                    Ok(s) => s,
                    Err(e) => {
                        rejections.push(reject("invalid_stream_name", e.to_string()));
                        continue;
                    }
                };
                let b = match BatchBuilder::new(catalog.clone(), &stream) {
                    Ok(b) => b,
                    Err(e) => {
                        rejections.push(reject("internal", e.to_string()));
                        continue;
                    }
                };
                let n = StreamNaming::new(naming, catalog, &stream);
                order.push(parsed.measurement.to_string());
                let (b, n) = builders.entry(parsed.measurement.to_string()).or_insert((b, n));
                (b, &*n)
            }
        };
        match write_row(builder, &parsed, precision, stream_naming, &naming.tags) {
            Ok(()) => builder.end_row(now),
            Err(e) => {
                builder.abort_row();
                rejections.push(reject(e.reason, e.message));
            }
        }
    }
    let mut batches = Vec::with_capacity(order.len());
    let mut accepted = 0;
    for name in order {
        if let Some(b) = builders.remove(&name).and_then(|(b, _)| b.finish()) {
            accepted += b.num_rows();
            batches.push(b);
        }
    }
    LineProtocolOutput { batches, accepted, rejections }
}

/// The value of the tag that names the device: the stream's one tag when chosen, else
/// `device_id`, then `host`, then `device_tags`; else the fallback device.
fn device_of<'a>(p: &'a Line<'_>, naming: &'a StreamNaming, device_tags: &[String]) -> Option<&'a str> {
    let tag = |name: &str| p.tags.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_ref());
    let found = match &naming.tag {
        Some((t, _)) => tag(t),
        None => tag("device_id").or_else(|| tag("host")).or_else(|| device_tags.iter().find_map(|t| tag(t))),
    };
    found.or(naming.fallback.as_deref())
}

fn write_row(
    b: &mut BatchBuilder,
    p: &Line<'_>,
    precision: Precision,
    naming: &StreamNaming,
    device_tags: &[String],
) -> Result<(), ValueError> {
    b.begin_row();
    let Some(device) = device_of(p, naming, device_tags) else {
        let message = match &naming.tag {
            Some((t, chosen_by)) => format!(
                "no `{t}` tag (the device tag, chosen by {chosen_by}) to name the device: add it, or give lines \
                 without it a device with `default_device`"
            ),
            None => {
                let mut names = String::from("`device_id` tag (nor `host`");
                for t in device_tags {
                    names.push_str(&format!(", `{t}`"));
                }
                format!(
                    "no {names}) to name the device: add one, name the tag that identifies devices (`device_tag` \
                     on the request or in the stream's declaration, or the `device_tags` setting), or give lines \
                     without one a device with `default_device`"
                )
            }
        };
        return Err(ValueError { reason: "missing_device_id", message });
    };
    ferrite_engine::ids::validate_device_id(device)?;
    b.set_device(device);
    for (k, v) in &p.tags {
        if k != "device_id" {
            b.set_str(k, v)?;
        }
    }
    for (k, v) in &p.fields {
        match v {
            FieldValue::Float(f) => b.set_float(k, *f)?,
            FieldValue::Int(i) => b.set_int(k, *i)?,
            FieldValue::UInt(u) => b.set_uint(k, *u)?,
            FieldValue::Bool(x) => b.set_bool(k, *x)?,
            FieldValue::Str(s) => b.set_str(k, s)?,
        }
    }
    if let Some(ts) = p.timestamp {
        match precision.to_nanos(ts) {
            Some(ns) => b.set_time(ns),
            None => {
                return Err(ValueError {
                    reason: "bad_timestamp",
                    message: format!("timestamp {ts} overflows at precision {precision:?}"),
                });
            }
        }
    }
    Ok(())
}

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    /// `1.5`, `1`, `-3e2`
    Float(f64),
    /// `1i`
    Int(i64),
    /// `1u`
    UInt(u64),
    /// `t`, `true`, `F`, `false`...
    Bool(bool),
    /// `"text"`
    Str(std::borrow::Cow<'a, str>),
}

/// One parsed line.
#[derive(Debug)]
pub struct Line<'a> {
    /// Measurement (stream).
    pub measurement: std::borrow::Cow<'a, str>,
    /// Tags in order.
    pub tags: Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
    /// Fields in order.
    pub fields: Vec<(std::borrow::Cow<'a, str>, FieldValue<'a>)>,
    /// Raw timestamp.
    pub timestamp: Option<i64>,
}

/// Splits at the first unescaped byte in `stops`, honouring backslash escapes.
fn take_until<'a>(s: &'a str, stops: &[u8]) -> (&'a str, &'a str) {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if stops.contains(&bytes[i]) {
            return (&s[..i], &s[i..]);
        }
        i += 1;
    }
    (s, "")
}

fn unescape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('\\') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ (',' | '=' | ' ' | '"' | '\\')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Parses one non-empty, non-comment line.
pub fn parse_line(line: &str) -> Result<Line<'_>, String> {
    let (measurement, mut rest) = take_until(line, b", ");
    if measurement.is_empty() {
        return Err("missing measurement".to_owned());
    }
    let mut tags = Vec::new();
    while let Some(r) = rest.strip_prefix(',') {
        let (kv, r2) = take_until(r, b", ");
        let (k, v) = take_until(kv, b"=");
        let v = v.strip_prefix('=').ok_or_else(|| format!("tag `{k}` has no `=value`"))?;
        if k.is_empty() || v.is_empty() {
            return Err(format!("empty tag key or value in `{kv}`"));
        }
        tags.push((unescape(k), unescape(v)));
        rest = r2;
    }
    let rest = rest.strip_prefix(' ').ok_or("missing fields after the measurement and tags")?;
    let rest = rest.trim_start_matches(' ');
    let mut fields = Vec::new();
    let mut cur = rest;
    loop {
        let (k, r) = take_until(cur, b"=");
        let r = r.strip_prefix('=').ok_or_else(|| format!("field `{k}` has no `=value`"))?;
        if k.is_empty() {
            return Err("empty field key".to_owned());
        }
        let (value, r) = if let Some(q) = r.strip_prefix('"') {
            // Quoted string: up to the next unescaped quote.
            let bytes = q.as_bytes();
            let mut i = 0;
            let mut end = None;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'"' => {
                        end = Some(i);
                        break;
                    }
                    _ => i += 1,
                }
            }
            let end = end.ok_or_else(|| format!("field `{k}`: unterminated string"))?;
            (FieldValue::Str(unescape(&q[..end])), &q[end + 1..])
        } else {
            let (raw, r) = take_until(r, b", ");
            (parse_value(k, raw)?, r)
        };
        fields.push((unescape(k), value));
        if let Some(r2) = r.strip_prefix(',') {
            cur = r2;
            continue;
        }
        cur = r;
        break;
    }
    let ts = cur.trim();
    let timestamp = if ts.is_empty() {
        None
    } else {
        Some(ts.parse::<i64>().map_err(|_| format!("invalid timestamp `{ts}` (an integer is expected)"))?)
    };
    Ok(Line { measurement: unescape(measurement), tags, fields, timestamp })
}

fn parse_value<'a>(key: &str, raw: &str) -> Result<FieldValue<'a>, String> {
    if raw.is_empty() {
        return Err(format!("field `{key}` has an empty value"));
    }
    if let Some(i) = raw.strip_suffix('i') {
        return i.parse::<i64>().map(FieldValue::Int).map_err(|_| format!("field `{key}`: invalid integer `{raw}`"));
    }
    if let Some(u) = raw.strip_suffix('u') {
        return u
            .parse::<u64>()
            .map(FieldValue::UInt)
            .map_err(|_| format!("field `{key}`: invalid unsigned integer `{raw}`"));
    }
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(FieldValue::Bool(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(FieldValue::Bool(false)),
        _ => {}
    }
    match raw.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(FieldValue::Float(f)),
        _ => Err(format!("field `{key}`: invalid value `{raw}` (float, 1i, 1u, true/false or \"string\")")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_line() -> Result<(), String> {
        let l = parse_line(
            r#"weather,device_id=s1,loc=us\ west temp=82.5,n=3i,ok=t,msg="a \"b\", c" 1465839830100400200"#,
        )?;
        assert_eq!(l.measurement, "weather");
        assert_eq!(l.tags.len(), 2);
        assert_eq!(l.tags[1].1, "us west");
        assert_eq!(l.fields[0].1, FieldValue::Float(82.5));
        assert_eq!(l.fields[1].1, FieldValue::Int(3));
        assert_eq!(l.fields[2].1, FieldValue::Bool(true));
        assert_eq!(l.fields[3].1, FieldValue::Str("a \"b\", c".into()));
        assert_eq!(l.timestamp, Some(1465839830100400200));
        Ok(())
    }

    #[test]
    fn rejects_bad_lines_alone() -> anyhow::Result<()> {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let payload = "cpu,host=a usage=1.5 1000\ncpu,host=b usage=\ncpu usage=2\n# comment\ncpu,host=c usage=3 1000\nbad-name,host=d x=1\n";
        let out = decode(&catalog, "default", payload, Precision::Seconds, &DeviceNaming::default(), 0);
        assert_eq!(out.accepted, 2);
        let lines: Vec<_> = out.rejections.iter().map(|r| (r.index + 1, r.reason)).collect();
        assert_eq!(lines, vec![(2, "invalid_line_protocol"), (3, "missing_device_id"), (6, "invalid_stream_name")]);
        let b = &out.batches[0];
        let t = b.batch.column(0).as_any().downcast_ref::<arrow::array::TimestampNanosecondArray>();
        assert_eq!(t.map(|t| t.value(0)), Some(1_000_000_000_000));
        Ok(())
    }

    #[test]
    fn unsigned_values_make_unsigned_columns_and_fit_others_only_when_they_can() -> anyhow::Result<()> {
        assert_eq!(parse_value("x", "18446744073709551615u"), Ok(FieldValue::UInt(u64::MAX)));
        assert!(parse_value("x", "-1u").is_err());
        let catalog = Arc::new(StreamCatalog::in_memory());
        let payload = "m,host=a u=18446744073709551615u,i=-3i,f=1.5
                       m,host=b u=7u,i=8u,f=9u
                       m,host=c u=-1i
                       m,host=d i=18446744073709551615u
";
        let out = decode(&catalog, "default", payload, Precision::Seconds, &DeviceNaming::default(), 0);
        assert_eq!(out.accepted, 2);
        let lines: Vec<_> = out.rejections.iter().map(|r| (r.index + 1, r.reason)).collect();
        assert_eq!(lines, vec![(3, "type_conflict"), (4, "type_conflict")]);
        assert!(out.rejections[1].message.contains("past its range"), "{}", out.rejections[1].message);
        let b = &out.batches[0].batch;
        let u = b.column_by_name("u").and_then(|c| c.as_any().downcast_ref::<arrow::array::UInt64Array>().cloned());
        assert_eq!(u.map(|u| (u.value(0), u.value(1))), Some((u64::MAX, 7)));
        let i = b.column_by_name("i").and_then(|c| c.as_any().downcast_ref::<arrow::array::Int64Array>().cloned());
        assert_eq!(i.map(|i| (i.value(0), i.value(1))), Some((-3, 8)), "a `u` value into an `i` field that fits");
        let f = b.column_by_name("f").and_then(|c| c.as_any().downcast_ref::<arrow::array::Float64Array>().cloned());
        assert_eq!(f.map(|f| f.value(1)), Some(9.0));
        let schema = catalog.get(&StreamName::new("m")?).map(|s| s.field_type("u"));
        assert_eq!(schema, Some(Some(ferrite_engine::FieldType::UInt)));
        Ok(())
    }

    #[test]
    fn the_device_is_named_by_device_id_then_host_then_the_configured_tags_in_order() -> anyhow::Result<()> {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let tags = ["name".to_owned(), "truck".to_owned()];
        let payload = "readings,name=truck_1,fleet=South velocity=3 1
readings,truck=t2,name=truck_2 velocity=4 2
readings,host=h3,name=truck_3 velocity=5 3
readings,device_id=d4,host=h4 velocity=6 4
readings,fleet=North velocity=7 5
";
        let out = decode(&catalog, "default", payload, Precision::Seconds, &DeviceNaming::configured(&tags, None), 0);
        assert_eq!(out.accepted, 4);
        let devices = out.batches[0].batch.column_by_name("device_id").and_then(|c| {
            c.as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .map(|a| a.iter().flatten().map(str::to_owned).collect::<Vec<_>>())
        });
        assert_eq!(devices, Some(vec!["truck_1".into(), "truck_2".into(), "h3".into(), "d4".into()]));
        let name = out.batches[0].batch.column_by_name("name").map(|c| c.null_count());
        assert_eq!(name, Some(1), "the naming tag stays a column of its own (null on the device_id line)");
        assert_eq!(out.rejections.len(), 1);
        assert_eq!((out.rejections[0].index, out.rejections[0].reason), (4, "missing_device_id"));
        let msg = &out.rejections[0].message;
        assert!(msg.contains("`name`, `truck`") && msg.contains("device_tags"), "{msg}");
        // Without the setting, TSBS's `name` names nothing.
        let out = decode(
            &catalog,
            "default",
            "readings,name=truck_1 velocity=3 1",
            Precision::Seconds,
            &DeviceNaming::default(),
            0,
        );
        assert_eq!(out.accepted, 0);
        Ok(())
    }

    fn devices(out: &LineProtocolOutput) -> Vec<String> {
        out.batches
            .iter()
            .flat_map(|b| {
                b.batch
                    .column_by_name("device_id")
                    .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>().cloned())
                    .map(|a| a.iter().flatten().map(str::to_owned).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn a_chosen_device_tag_is_the_only_one_and_a_default_device_takes_lines_without_it() -> anyhow::Result<()> {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let payload = "readings,name=truck_1,host=h1 velocity=3 1
readings,host=h2 velocity=4 2
";
        let defaults = DeviceNaming::configured(&[], None);
        // The defaults: `host` names both.
        let out = decode(&catalog, "default", payload, Precision::Seconds, &defaults, 0);
        assert_eq!(devices(&out), vec!["h1".to_owned(), "h2".to_owned()]);
        // The request's tag: only `name`; the second line has none, and says who chose the tag.
        let out =
            decode(&catalog, "default", payload, Precision::Seconds, &defaults.with_request(Some("name"), None), 0);
        assert_eq!(devices(&out), vec!["truck_1".to_owned()]);
        assert_eq!(out.rejections.len(), 1);
        let msg = &out.rejections[0].message;
        assert!(msg.contains("no `name` tag") && msg.contains("request") && msg.contains("default_device"), "{msg}");
        // ...unless a default device takes it.
        let naming = defaults.with_request(Some("name"), Some("unnamed"));
        let out = decode(&catalog, "default", payload, Precision::Seconds, &naming, 0);
        assert_eq!(devices(&out), vec!["truck_1".to_owned(), "unnamed".to_owned()]);
        assert!(out.rejections.is_empty());

        // The stream's declaration chooses a tag and a default device; the request's tag
        // still wins over it, and the configured default device comes last.
        let stream = StreamName::in_tenant("default", "readings")?;
        catalog.set_device_naming(&stream, Some("name"), Some("lost"))?;
        let out = decode(&catalog, "default", payload, Precision::Seconds, &defaults, 0);
        assert_eq!(devices(&out), vec!["truck_1".to_owned(), "lost".to_owned()]);
        let out =
            decode(&catalog, "default", payload, Precision::Seconds, &defaults.with_request(Some("host"), None), 0);
        assert_eq!(devices(&out), vec!["h1".to_owned(), "h2".to_owned()]);
        catalog.set_device_naming(&stream, Some("name"), None)?;
        let configured = DeviceNaming::configured(&[], Some("fallback"));
        let out = decode(&catalog, "default", payload, Precision::Seconds, &configured, 0);
        assert_eq!(devices(&out), vec!["truck_1".to_owned(), "fallback".to_owned()]);
        let out = decode(&catalog, "default", payload, Precision::Seconds, &defaults, 0);
        assert!(out.rejections[0].message.contains("stream's declared `device_tag`"), "{}", out.rejections[0].message);
        // A default device must be a device id.
        assert!(catalog.set_device_naming(&stream, None, Some("a/b")).is_err());
        Ok(())
    }

    #[test]
    fn influx_precisions_and_the_auto_guess() {
        let ns = 1_465_839_830_100_400_200_i64;
        assert_eq!(Precision::parse("n"), Some(Precision::Nanoseconds));
        assert_eq!(Precision::parse("millisecond"), Some(Precision::Milliseconds));
        assert_eq!(Precision::parse("m").and_then(|p| p.to_nanos(2)), Some(120_000_000_000));
        assert_eq!(Precision::parse("h").and_then(|p| p.to_nanos(1)), Some(3_600_000_000_000));
        assert_eq!(Precision::parse("fortnight"), None);
        // The same instant in each unit, guessed.
        for v in [ns / 1_000_000_000, ns / 1_000_000, ns / 1_000, ns] {
            let guessed = Precision::Auto.to_nanos(v).unwrap_or(0);
            assert_eq!(guessed / 1_000_000_000, ns / 1_000_000_000, "{v}");
        }
    }
}

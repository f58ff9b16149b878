//! JSON decoder: a JSON object, an array of objects, or NDJSON, straight into a
//! [`BatchBuilder`] through serde visitors (no intermediate `serde_json::Value` tree).
//!
//! Keys: `ts` is the event time (RFC 3339 string, or epoch milliseconds as a number);
//! `device_id` names the device (required unless the transport supplies it, as the MQTT
//! topic does); every other key is a field. Values: numbers, booleans, strings; `null` is a
//! missing value. Nested objects and arrays are rejected (flatten them before sending).
//!
//! A syntax error fails the whole payload (or, for NDJSON, the line); an invalid event
//! (type conflict, bad time, missing device) is rejected alone and the rest is kept.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::builder::{BatchBuilder, Rejection, ValueError};
use crate::error::{Error, Result};

/// How the device of each event is known.
#[derive(Debug, Clone, Copy)]
pub enum DeviceSource<'a> {
    /// From the transport (MQTT topic); a `device_id` key in the event must match it.
    Fixed(&'a str),
    /// From each event's `device_id` key (HTTP).
    PerEvent,
}

/// Per-payload decoding context.
pub struct JsonDecoder<'b, 'd> {
    builder: &'b mut BatchBuilder,
    device: DeviceSource<'d>,
    now: i64,
    rejections: Vec<Rejection>,
    index: usize,
}

impl<'b, 'd> JsonDecoder<'b, 'd> {
    /// Decodes into `builder`; `now` (ns) is the time of events without `ts`.
    pub fn new(builder: &'b mut BatchBuilder, device: DeviceSource<'d>, now: i64) -> Self {
        Self { builder, device, now, rejections: Vec::new(), index: 0 }
    }

    /// Decodes a JSON object or array of objects. On a syntax error the payload is refused
    /// whole: the caller must discard the builder, which may hold part of it.
    pub fn decode(mut self, payload: &[u8]) -> Result<Vec<Rejection>> {
        // The whole payload is checked for UTF-8 once, which is several times cheaper than
        // serde_json checking every string and key on its own; a payload that is not UTF-8
        // goes the checking way, for its error's position.
        let res = match std::str::from_utf8(payload) {
            Ok(text) => self.top(serde_json::Deserializer::from_str(text)),
            Err(_) => self.top(serde_json::Deserializer::from_slice(payload)),
        };
        match res {
            Ok(()) => Ok(self.rejections),
            Err(e) => Err(Error::MalformedJson { line: e.line(), column: e.column(), message: strip_position(&e) }),
        }
    }

    fn top<'de, R: serde_json::de::Read<'de>>(
        &mut self,
        mut de: serde_json::Deserializer<R>,
    ) -> serde_json::Result<()> {
        (&mut de).deserialize_any(TopVisitor { d: self })?;
        de.end()
    }

    fn event<'de, R: serde_json::de::Read<'de>>(
        &mut self,
        mut de: serde_json::Deserializer<R>,
    ) -> serde_json::Result<()> {
        EventSeed { d: self }.deserialize(&mut de)?;
        de.end()
    }

    /// Decodes newline-delimited JSON: one event (object) per line; a malformed line is
    /// rejected alone. Blank lines are skipped.
    pub fn decode_ndjson(mut self, payload: &[u8]) -> Vec<Rejection> {
        // As in `decode`: one UTF-8 check for the whole payload; when it fails, each line is
        // decoded the checking way (and only the lines that are not UTF-8 are rejected).
        match std::str::from_utf8(payload) {
            Ok(text) => {
                for (line_no, line) in text.split('\n').enumerate() {
                    let line = line.strip_suffix('\r').unwrap_or(line);
                    self.ndjson_line(line_no, line.as_bytes(), |d| d.event(serde_json::Deserializer::from_str(line)));
                }
            }
            Err(_) => {
                for (line_no, line) in payload.split(|b| *b == b'\n').enumerate() {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    self.ndjson_line(line_no, line, |d| d.event(serde_json::Deserializer::from_slice(line)));
                }
            }
        }
        self.rejections
    }

    /// One NDJSON line: skipped when blank, rejected alone when `decode` fails.
    fn ndjson_line(&mut self, line_no: usize, line: &[u8], decode: impl FnOnce(&mut Self) -> serde_json::Result<()>) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.index = line_no;
        if let Err(e) = decode(self) {
            self.builder.abort_row();
            self.rejections.push(Rejection {
                index: line_no,
                reason: "malformed_json",
                message: format!(
                    "line {}: malformed JSON at column {}: {}",
                    line_no + 1,
                    e.column(),
                    strip_position(&e)
                ),
            });
        }
    }

    fn reject(&mut self, reason: &'static str, message: String) {
        self.rejections.push(Rejection { index: self.index, reason, message });
    }
}

fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

struct TopVisitor<'a, 'b, 'd> {
    d: &'a mut JsonDecoder<'b, 'd>,
}

impl<'de> Visitor<'de> for TopVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.d.index = 0;
        EventVisitor { d: self.d }.visit_map(map)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        EventVisitor { d: self.d }.visit_bool(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        EventVisitor { d: self.d }.visit_i64(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        EventVisitor { d: self.d }.visit_u64(v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        EventVisitor { d: self.d }.visit_f64(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        EventVisitor { d: self.d }.visit_str(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        EventVisitor { d: self.d }.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            self.d.index = i;
            if seq.next_element_seed(EventSeed { d: &mut *self.d })?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

struct EventSeed<'a, 'b, 'd> {
    d: &'a mut JsonDecoder<'b, 'd>,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(EventVisitor { d: self.d })
    }
}

struct EventVisitor<'a, 'b, 'd> {
    d: &'a mut JsonDecoder<'b, 'd>,
}

impl EventVisitor<'_, '_, '_> {
    fn not_an_object(self, what: &str) {
        self.d.reject("not_an_object", format!("event {}: expected a JSON object, got {what}", self.d.index));
    }
}

macro_rules! reject_scalar {
    ($name:ident, $t:ty, $what:expr) => {
        fn $name<E: de::Error>(self, _v: $t) -> Result<(), E> {
            self.not_an_object($what);
            Ok(())
        }
    };
}

impl<'de> Visitor<'de> for EventVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    reject_scalar!(visit_bool, bool, "a boolean");
    reject_scalar!(visit_i64, i64, "a number");
    reject_scalar!(visit_u64, u64, "a number");
    reject_scalar!(visit_f64, f64, "a number");
    reject_scalar!(visit_str, &str, "a string");

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_object("null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.not_an_object("an array");
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let d = self.d;
        d.builder.begin_row();
        let mut error: Option<ValueError> = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if error.is_some() {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let r = map.next_value_seed(ValueSeed { key: &key, d: &mut *d })?;
            if let Err(e) = r {
                error = Some(e);
            }
        }
        if error.is_none() {
            if let DeviceSource::Fixed(id) = d.device {
                if !d.builder.has_device() {
                    d.builder.set_device(id);
                }
            } else if !d.builder.has_device() {
                error = Some(ValueError {
                    reason: "missing_device_id",
                    message: format!("event {}: missing `device_id` (a string naming the device)", d.index),
                });
            }
        }
        match error {
            None => d.builder.end_row(d.now),
            Some(e) => {
                d.builder.abort_row();
                let message = format!("event {}: {}", d.index, e.message);
                d.reject(e.reason, message);
            }
        }
        Ok(())
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Writes one value; the outer `Result` is a syntax error, the inner one an invalid event.
struct ValueSeed<'k, 'a, 'b, 'd> {
    key: &'k str,
    d: &'a mut JsonDecoder<'b, 'd>,
}

type Outcome = Result<(), ValueError>;

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_, '_, '_> {
    type Value = Outcome;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Outcome, D::Error> {
        de.deserialize_any(self)
    }
}

const NS_PER_MS: i64 = 1_000_000;

impl ValueSeed<'_, '_, '_, '_> {
    fn number(self, v: f64, integral: Option<i64>) -> Outcome {
        match self.key {
            "ts" => {
                let ns = match integral {
                    Some(ms) => ms.checked_mul(NS_PER_MS),
                    None if v.is_finite() && v.abs() < 9.2e12 => Some((v * NS_PER_MS as f64) as i64),
                    None => None,
                };
                match ns {
                    Some(ns) => {
                        self.d.builder.set_time(ns);
                        Ok(())
                    }
                    None => Err(ValueError {
                        reason: "bad_timestamp",
                        message: format!("`ts` {v} is out of range for epoch milliseconds"),
                    }),
                }
            }
            "device_id" => Err(ValueError {
                reason: "invalid_device_id",
                message: "`device_id` must be a string, got a number".to_owned(),
            }),
            key => self.d.builder.set_number(key, v, integral),
        }
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_, '_, '_> {
    type Value = Outcome;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, boolean, string or null")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Outcome, E> {
        Ok(self.number(v as f64, Some(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Outcome, E> {
        Ok(self.number(v as f64, i64::try_from(v).ok()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Outcome, E> {
        Ok(self.number(v, None))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Outcome, E> {
        Ok(match self.key {
            "ts" | "device_id" => Err(ValueError {
                reason: if self.key == "ts" { "bad_timestamp" } else { "invalid_device_id" },
                message: format!("`{}` must not be a boolean", self.key),
            }),
            key => self.d.builder.set_bool(key, v),
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Outcome, E> {
        Ok(match self.key {
            "ts" => match parse_rfc3339(v) {
                Some(ns) => {
                    self.d.builder.set_time(ns);
                    Ok(())
                }
                None => Err(ValueError {
                    reason: "bad_timestamp",
                    message: format!(
                        "`ts` \"{v}\" is not an RFC 3339 time (like 2026-01-02T03:04:05.678Z) or epoch milliseconds"
                    ),
                }),
            },
            "device_id" => {
                if let Err(e) = ferrite_engine::ids::validate_device_id(v) {
                    return Ok(Err(e.into()));
                }
                match self.d.device {
                    DeviceSource::Fixed(id) if id != v => Err(ValueError {
                        reason: "device_mismatch",
                        message: format!("`device_id` \"{v}\" does not match the topic's device \"{id}\""),
                    }),
                    _ => {
                        self.d.builder.set_device(v);
                        Ok(())
                    }
                }
            }
            key => self.d.builder.set_str(key, v),
        })
    }

    fn visit_unit<E: de::Error>(self) -> Result<Outcome, E> {
        Ok(match self.key {
            "ts" | "device_id" => Err(ValueError {
                reason: if self.key == "ts" { "bad_timestamp" } else { "missing_device_id" },
                message: format!("`{}` must not be null", self.key),
            }),
            _ => Ok(()),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Outcome, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Err(ValueError {
            reason: "nested_value",
            message: format!("field `{}` is an object; nested values are not supported, flatten them", self.key),
        }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Outcome, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(ValueError {
            reason: "nested_value",
            message: format!("field `{}` is an array; arrays are not supported, send one field per value", self.key),
        }))
    }
}

/// Parses an RFC 3339 time into nanoseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_nanos_opt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Float64Array, StringArray, TimestampNanosecondArray};
    use ferrite_engine::{FieldType, StreamCatalog, StreamName};
    use std::sync::Arc;

    fn builder() -> anyhow::Result<BatchBuilder> {
        builder_on(Arc::new(StreamCatalog::in_memory()))
    }

    fn builder_on(catalog: Arc<StreamCatalog>) -> anyhow::Result<BatchBuilder> {
        Ok(BatchBuilder::new(catalog, &StreamName::new("telemetry")?)?)
    }

    #[test]
    fn object_and_array() -> anyhow::Result<()> {
        let mut b = builder()?;
        let rej = JsonDecoder::new(&mut b, DeviceSource::Fixed("d1"), 7)
            .decode(br#"{"ts": 1700000000000, "temperature": 21.5, "door": "open"}"#)?;
        assert!(rej.is_empty());
        let rej = JsonDecoder::new(&mut b, DeviceSource::Fixed("d1"), 7)
            .decode(br#"[{"temperature": 22}, {"ts": "2023-11-14T22:13:20Z", "door": null, "ok": true}]"#)?;
        assert!(rej.is_empty(), "{rej:?}");
        let out = b.finish().ok_or_else(|| anyhow::anyhow!("empty"))?;
        assert_eq!(out.batch.num_rows(), 3);
        let time = out
            .batch
            .column(0)
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .ok_or_else(|| anyhow::anyhow!("time"))?;
        assert_eq!(time.value(0), 1_700_000_000_000_000_000);
        assert_eq!(time.value(1), 7, "missing ts takes the receive time");
        assert_eq!(time.value(2), 1_700_000_000_000_000_000);
        let t = out.batch.column(2).as_any().downcast_ref::<Float64Array>().ok_or_else(|| anyhow::anyhow!("t"))?;
        assert_eq!(t.value(1), 22.0);
        assert!(t.is_null(2));
        Ok(())
    }

    #[test]
    fn bad_events_are_rejected_alone() -> anyhow::Result<()> {
        let mut b = builder()?;
        let payload = br#"[{"device_id":"a","t":1},{"device_id":"b","t":"hot"},3,{"t":2},{"device_id":"c","ts":"yesterday"},{"device_id":"d","n":{"x":1}},{"device_id":"e","t":3}]"#;
        let rej = JsonDecoder::new(&mut b, DeviceSource::PerEvent, 0).decode(payload)?;
        let reasons: Vec<_> = rej.iter().map(|r| (r.index, r.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                (1, "type_conflict"),
                (2, "not_an_object"),
                (3, "missing_device_id"),
                (4, "bad_timestamp"),
                (5, "nested_value")
            ]
        );
        assert!(rej[0].message.contains("stream `telemetry`: field `t` is integer, got string"), "{}", rej[0].message);
        let out = b.finish().ok_or_else(|| anyhow::anyhow!("empty"))?;
        let d = out.batch.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("d"))?;
        assert_eq!(d.iter().flatten().collect::<Vec<_>>(), vec!["a", "e"]);
        Ok(())
    }

    #[test]
    fn integers_stay_integers_until_a_fraction_widens_the_field() -> anyhow::Result<()> {
        let mut b = builder()?;
        let rej = JsonDecoder::new(&mut b, DeviceSource::PerEvent, 0)
            .decode(br#"[{"device_id":"a","n":1,"f":1.0},{"device_id":"b","n":2,"big":18446744073709551615}]"#)?;
        assert!(rej.is_empty(), "{rej:?}");
        let out = b.finish().ok_or_else(|| anyhow::anyhow!("empty"))?;
        let types: Vec<String> =
            out.batch.schema().fields().iter().skip(2).map(|f| format!("{}:{}", f.name(), f.data_type())).collect();
        assert_eq!(types, vec!["n:Int64", "f:Float64", "big:Float64"], "1.0 is written as a float, so it is one");
        // A fraction widens `n` for good, in the same batch as its integers.
        let catalog = Arc::new(StreamCatalog::in_memory());
        let mut b = builder_on(catalog.clone())?;
        let rej = JsonDecoder::new(&mut b, DeviceSource::PerEvent, 0)
            .decode(br#"[{"device_id":"a","n":3},{"device_id":"b","n":3.5},{"device_id":"c","n":4}]"#)?;
        assert!(rej.is_empty(), "{rej:?}");
        let out = b.finish().ok_or_else(|| anyhow::anyhow!("empty"))?;
        let n = out
            .batch
            .column(2)
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .ok_or_else(|| anyhow::anyhow!("n"))?;
        assert_eq!(n.values().to_vec(), vec![3.0, 3.5, 4.0]);
        let stream = StreamName::new("telemetry")?;
        assert_eq!(catalog.get(&stream).and_then(|s| s.field_type("n")), Some(FieldType::Float));
        assert!(catalog.widenings() >= 1);
        // A string into it is still a type conflict, now against float.
        let mut b = builder_on(catalog)?;
        let rej = JsonDecoder::new(&mut b, DeviceSource::PerEvent, 0).decode(br#"{"device_id":"a","n":"x"}"#)?;
        assert!(rej[0].message.contains("field `n` is float, got string"), "{}", rej[0].message);
        Ok(())
    }

    #[test]
    fn syntax_error_has_position() -> anyhow::Result<()> {
        let mut b = builder()?;
        let err = JsonDecoder::new(&mut b, DeviceSource::Fixed("d"), 0).decode(b"{\"t\": 1,\n \"x\": }");
        match err {
            Err(Error::MalformedJson { line, column, .. }) => assert_eq!((line, column), (2, 7)),
            other => anyhow::bail!("unexpected {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn ndjson_rejects_lines() -> anyhow::Result<()> {
        let mut b = builder()?;
        let rej = JsonDecoder::new(&mut b, DeviceSource::PerEvent, 0)
            .decode_ndjson(b"{\"device_id\":\"a\",\"t\":1}\n{oops\n\n{\"device_id\":\"b\",\"t\":2}\r\n");
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].index, 1);
        assert_eq!(b.finish().map(|b| b.num_rows()), Some(2));
        Ok(())
    }

    /// A payload that is not UTF-8 takes the checking path: the error names where the bad
    /// string is, and in NDJSON only the line holding it is rejected.
    #[test]
    fn bytes_that_are_not_utf8_are_found_where_they_are() -> anyhow::Result<()> {
        let mut b = builder()?;
        let err = JsonDecoder::new(&mut b, DeviceSource::Fixed("d"), 0)
            .decode(b"{\"t\": 1,\n \"door\": \"op\xffen\"}")
            .err()
            .ok_or_else(|| anyhow::anyhow!("accepted bytes that are not UTF-8"))?;
        match err {
            Error::MalformedJson { line, message, .. } => {
                assert_eq!(line, 2, "{message}");
                assert!(message.contains("unicode"), "{message}");
            }
            other => anyhow::bail!("expected MalformedJson, got {other:?}"),
        }

        let mut b = builder()?;
        let rej = JsonDecoder::new(&mut b, DeviceSource::PerEvent, 0).decode_ndjson(
            b"{\"device_id\":\"a\",\"t\":1}\n{\"device_id\":\"b\",\"s\":\"\xc3\x28\"}\n{\"device_id\":\"\xc3\xa9\",\"t\":2}\n",
        );
        assert_eq!(rej.iter().map(|r| (r.index, r.reason)).collect::<Vec<_>>(), vec![(1, "malformed_json")]);
        assert_eq!(b.finish().map(|b| b.num_rows()), Some(2), "the lines around it are kept");
        Ok(())
    }

    /// Regression: serde_json's default float parser can be one ULP off; Ferrite enables
    /// `float_roundtrip` so a value read back equals the value the device sent.
    #[test]
    fn floats_round_trip_exactly() -> anyhow::Result<()> {
        let v = -411921.92312450235f64;
        let mut b = builder()?;
        JsonDecoder::new(&mut b, DeviceSource::Fixed("d"), 0).decode(format!("{{\"x\": {v:?}}}").as_bytes())?;
        let out = b.finish().ok_or_else(|| anyhow::anyhow!("empty"))?;
        let x = out.batch.column(2).as_any().downcast_ref::<Float64Array>().ok_or_else(|| anyhow::anyhow!("x"))?;
        assert_eq!(x.value(0).to_bits(), v.to_bits());
        Ok(())
    }

    #[test]
    fn mqtt_device_must_match_topic() -> anyhow::Result<()> {
        let mut b = builder()?;
        let rej = JsonDecoder::new(&mut b, DeviceSource::Fixed("a"), 0)
            .decode(br#"[{"device_id":"b","t":1},{"device_id":"a","t":2}]"#)?;
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].reason, "device_mismatch");
        Ok(())
    }
}

//! Payloads of the platform's topics, as JSON.
//!
//! Telemetry is a JSON array of objects: `ts` (epoch milliseconds, the event time, kept
//! through buffering and back-fill), `seq` (the device's own reading counter, so that a
//! reading delivered twice after a lost acknowledgement can be told apart), and the fields.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A field value of a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// A number with a fraction.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

impl FieldValue {
    fn to_json(&self) -> Value {
        match self {
            FieldValue::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            FieldValue::Int(i) => Value::from(*i),
            FieldValue::Bool(b) => Value::Bool(*b),
            FieldValue::Str(s) => Value::String(s.clone()),
        }
    }
}

/// One reading of a sensor (or several), at one event time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Event time, epoch milliseconds.
    pub ts_ms: i64,
    /// The device's reading counter.
    pub seq: u64,
    /// Field names and values (not `ts`, `seq` nor `device_id`).
    pub fields: Vec<(String, FieldValue)>,
}

impl Reading {
    /// The reading as a JSON object.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("ts".into(), Value::from(self.ts_ms));
        o.insert("seq".into(), Value::from(self.seq));
        for (k, v) in &self.fields {
            // A non-finite float has no JSON form: the field is left out.
            let v = v.to_json();
            if !v.is_null() {
                o.insert(k.clone(), v);
            }
        }
        Value::Object(o)
    }

    /// Reads back an object written by [`Reading::to_json`] (the offline buffer stores them).
    pub fn from_json(v: &Value) -> Option<Self> {
        let o = v.as_object()?;
        let ts_ms = o.get("ts")?.as_i64()?;
        let seq = o.get("seq")?.as_u64()?;
        let mut fields = Vec::with_capacity(o.len().saturating_sub(2));
        for (k, v) in o {
            let value = match v {
                _ if k == "ts" || k == "seq" => continue,
                Value::Bool(b) => FieldValue::Bool(*b),
                Value::String(s) => FieldValue::Str(s.clone()),
                Value::Number(n) => match n.as_i64() {
                    Some(i) if !n.is_f64() => FieldValue::Int(i),
                    _ => FieldValue::Float(n.as_f64()?),
                },
                _ => continue,
            };
            fields.push((k.clone(), value));
        }
        Some(Self { ts_ms, seq, fields })
    }
}

/// A batch of readings as the telemetry payload (a JSON array).
pub fn encode_batch<'a>(readings: impl IntoIterator<Item = &'a Reading>) -> Vec<u8> {
    let array: Vec<Value> = readings.into_iter().map(Reading::to_json).collect();
    serde_json::to_vec(&array).unwrap_or_default()
}

/// JSON objects already encoded, joined into one array (a telemetry batch of stored
/// readings, without decoding them again).
pub fn join_objects<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'[');
    for (i, b) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b);
    }
    out.push(b']');
    out
}

/// Why a payload from the platform cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError(pub String);

impl core::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A command, as the platform sends it on `devices/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Its id: a redelivery carries the same one.
    pub id: String,
    /// What to do (`lock`, `set_config`, `rotate_credentials`, or a type's own command).
    pub name: String,
    /// Its parameters (an object; absent means none).
    #[serde(default)]
    pub params: Value,
}

/// Parses a command.
pub fn decode_command(bytes: &[u8]) -> Result<Command, PayloadError> {
    serde_json::from_slice(bytes)
        .map_err(|e| PayloadError(alloc::format!("a command is {{\"id\", \"name\", \"params\"}}: {e}")))
}

/// How a command ended, on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    /// Done.
    Succeeded,
    /// Refused or failed; the result says why.
    Failed,
}

/// The answer on `devices/{id}/commands/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command's id.
    pub id: String,
    /// How it ended.
    pub status: CommandStatus,
    /// What it produced, or `{"error": "..."}`.
    pub result: Value,
}

impl CommandResult {
    /// The answer as JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Desired state on `devices/{id}/shadow/desired`, and reported state the device sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinDocument {
    /// The version of the side it belongs to.
    pub version: u64,
    /// The state (an object).
    pub state: Map<String, Value>,
}

/// Parses a desired-state document.
pub fn decode_desired(bytes: &[u8]) -> Result<TwinDocument, PayloadError> {
    serde_json::from_slice(bytes)
        .map_err(|e| PayloadError(alloc::format!("desired state is {{\"version\", \"state\": {{...}}}}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn readings_round_trip_and_keep_integers_integers() {
        let r = Reading {
            ts_ms: 1_764_000_000_123,
            seq: 7,
            fields: vec![
                ("temperature".into(), FieldValue::Float(21.5)),
                ("count".into(), FieldValue::Int(3)),
                ("door".into(), FieldValue::Str("open".into())),
                ("on".into(), FieldValue::Bool(true)),
                ("broken".into(), FieldValue::Float(f64::NAN)),
            ],
        };
        let bytes = encode_batch([&r]);
        let text = core::str::from_utf8(&bytes).unwrap_or_default();
        assert!(
            text.starts_with("[{") && text.contains("\"ts\":1764000000123") && text.contains("\"count\":3"),
            "{text}"
        );
        assert!(!text.contains("broken"), "NaN has no JSON form");
        let v: Vec<Value> = serde_json::from_slice(&bytes).unwrap_or_default();
        let back = Reading::from_json(&v[0]);
        let mut want = r.clone();
        want.fields.retain(|(k, _)| k != "broken");
        want.fields.sort_by(|a, b| a.0.cmp(&b.0));
        let mut got = back.unwrap_or(Reading { ts_ms: 0, seq: 0, fields: vec![] });
        got.fields.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
    }

    #[test]
    fn commands_and_twins_parse_or_say_why() {
        let c = decode_command(br#"{"id": "c1", "name": "lock", "params": {"message": "x"}}"#);
        assert_eq!(c.as_ref().map(|c| c.name.as_str()), Ok("lock"));
        let c = decode_command(br#"{"id": "c2", "name": "unlock"}"#);
        assert_eq!(c.map(|c| c.params), Ok(Value::Null));
        let bad = decode_command(b"{\"name\": 3}");
        assert!(bad.is_err_and(|e| e.0.contains("a command is")));
        let r = CommandResult {
            id: "c1".into(),
            status: CommandStatus::Failed,
            result: serde_json::json!({"error": "locked"}),
        };
        assert_eq!(r.encode(), br#"{"id":"c1","status":"failed","result":{"error":"locked"}}"#.to_vec());
        let d = decode_desired(br#"{"version": 4, "state": {"interval": 30}}"#);
        assert_eq!(d.map(|d| d.version), Ok(4));
        assert!(decode_desired(b"[]").is_err());
    }
}

//! Gateway mode: child devices that cannot reach the platform themselves (a serial bus, a
//! BLE bridge, a PLC) connect to the agent over a local TCP socket and speak NDJSON, one
//! object per line:
//!
//! - child → gateway: `{"hello": "CHILD_ID"}` first; then readings (`{"ts"?: ms, "field":
//!   value, ...}`), and command answers (`{"result": {"id", "status", "result"}}`);
//! - gateway → child: `{"command": {"id", "name", "params"}}` and `{"desired": {"version",
//!   "state"}}`.
//!
//! The gateway publishes each child's readings under the child's own id (through its spool,
//! so they survive being offline as its own readings do) and subscribes to the child's
//! commands and desired state while the child is connected. The platform must know the
//! child as the gateway's (`"parent"` in the registry), or it refuses both.

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use ferrite_agent_core::payload::FieldValue;

/// What a child connection tells the agent.
#[derive(Debug)]
pub enum ChildEvent {
    /// A child said hello: lines for it go to this sender.
    Hello(String, mpsc::Sender<String>),
    /// A reading of a child.
    Reading(String, Option<i64>, Vec<(String, FieldValue)>),
    /// A child answered a command (the answer's JSON).
    Result(String, Vec<u8>),
    /// A child went away.
    Gone(String),
}

/// A reading's fields from a child's JSON object (`ts` taken apart; nested values skipped).
pub fn fields(v: &serde_json::Map<String, Value>) -> (Option<i64>, Vec<(String, FieldValue)>) {
    let mut ts = None;
    let mut out = Vec::with_capacity(v.len());
    for (k, val) in v {
        match (k.as_str(), val) {
            ("ts", Value::Number(n)) => ts = n.as_i64(),
            ("ts" | "seq" | "device_id", _) => {}
            (_, Value::Bool(b)) => out.push((k.clone(), FieldValue::Bool(*b))),
            (_, Value::String(s)) => out.push((k.clone(), FieldValue::Str(s.clone()))),
            (_, Value::Number(n)) => match n.as_i64() {
                Some(i) if !n.is_f64() => out.push((k.clone(), FieldValue::Int(i))),
                _ => {
                    if let Some(f) = n.as_f64() {
                        out.push((k.clone(), FieldValue::Float(f)))
                    }
                }
            },
            _ => {}
        }
    }
    (ts, out)
}

/// Accepts child connections on `listener` until the agent stops.
pub async fn serve(listener: TcpListener, events: mpsc::Sender<ChildEvent>) {
    loop {
        let Ok((socket, peer)) = listener.accept().await else { continue };
        let events = events.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = socket.into_split();
            let mut lines = BufReader::new(rd).lines();
            let mut child: Option<String> = None;
            let (tx, mut rx) = mpsc::channel::<String>(64);
            loop {
                tokio::select! {
                    line = lines.next_line() => {
                        let Ok(Some(line)) = line else { break };
                        let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&line) else {
                            let _ = wr.write_all(b"{\"error\": \"not a JSON object\"}\n").await;
                            continue;
                        };
                        match (&child, o.get("hello"), o.get("result")) {
                            (None, Some(Value::String(id)), _) => {
                                if ferrite_agent_core::topics::validate_id(id).is_err() {
                                    let _ = wr.write_all(b"{\"error\": \"not a valid device id\"}\n").await;
                                    break;
                                }
                                child = Some(id.clone());
                                if events.send(ChildEvent::Hello(id.clone(), tx.clone())).await.is_err() {
                                    return;
                                }
                            }
                            (None, _, _) => {
                                let _ = wr.write_all(b"{\"error\": \"say {\\\"hello\\\": \\\"ID\\\"} first\"}\n").await;
                            }
                            (Some(id), _, Some(r)) => {
                                let _ = events.send(ChildEvent::Result(id.clone(), r.to_string().into_bytes())).await;
                            }
                            (Some(id), _, None) => {
                                let (ts, f) = fields(&o);
                                if !f.is_empty() {
                                    let _ = events.send(ChildEvent::Reading(id.clone(), ts, f)).await;
                                }
                            }
                        }
                    }
                    Some(out) = rx.recv() => {
                        if wr.write_all(out.as_bytes()).await.is_err() || wr.write_all(b"\n").await.is_err() {
                            break;
                        }
                    }
                }
            }
            if let Some(id) = child {
                eprintln!("ferrite-agent: gateway: child {id} ({peer}) went away");
                let _ = events.send(ChildEvent::Gone(id)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_readings_keep_their_types_and_time() {
        let v: Value = serde_json::json!({"ts": 1_764_000_000_000i64, "t": 21.5, "n": 3, "on": true, "s": "x", "nested": {"a": 1}});
        let (ts, f) = fields(v.as_object().unwrap_or(&serde_json::Map::new()));
        assert_eq!(ts, Some(1_764_000_000_000));
        assert_eq!(f.len(), 4);
        assert!(f.contains(&("n".into(), FieldValue::Int(3))));
        assert!(f.contains(&("t".into(), FieldValue::Float(21.5))));
    }
}

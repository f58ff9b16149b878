//! The streaming JSON decoder against a naive one built on `serde_json::Value`: same rows
//! kept, same events rejected, same column types and values, for random payloads.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Float64Array, Int64Array, StringArray, TimestampNanosecondArray};
use ferrite_engine::{FieldType, StreamCatalog, StreamName};
use ferrite_ingest::builder::BatchBuilder;
use ferrite_ingest::json::{DeviceSource, JsonDecoder};
use proptest::prelude::*;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    F(f64),
    I(i64),
    B(bool),
    S(String),
}

/// What the naive decoder expects: kept rows (time, device, fields) and rejected indices.
struct Expected {
    rows: Vec<(i64, String, BTreeMap<String, Cell>)>,
    rejected: Vec<usize>,
    types: BTreeMap<String, FieldType>,
}

fn reference(events: &[Value], now: i64) -> Expected {
    let mut types: BTreeMap<String, FieldType> = BTreeMap::new();
    let mut rows: Vec<(i64, String, BTreeMap<String, Cell>)> = Vec::new();
    let mut rejected = Vec::new();
    for (i, ev) in events.iter().enumerate() {
        let Some(obj) = ev.as_object() else {
            rejected.push(i);
            continue;
        };
        let mut time = None;
        let mut device = None;
        let mut fields = BTreeMap::new();
        let mut ok = true;
        for (k, v) in obj {
            match (k.as_str(), v) {
                ("ts", Value::Number(n)) => match n.as_i64() {
                    Some(ms) => time = Some(ms * 1_000_000),
                    None => time = n.as_f64().map(|f| (f * 1e6) as i64),
                },
                ("ts", Value::String(s)) => match chrono::DateTime::parse_from_rfc3339(s) {
                    Ok(t) => time = t.timestamp_nanos_opt(),
                    Err(_) => ok = false,
                },
                ("ts", _) => ok = false,
                ("device_id", Value::String(s)) if !s.is_empty() && !s.contains(['/', '+', '#', ' ']) => {
                    device = Some(s.clone())
                }
                ("device_id", _) => ok = false,
                (_, Value::Null) => {}
                (k, v) => {
                    let (ty, cell) = match v {
                        Value::Bool(b) => (FieldType::Bool, Cell::B(*b)),
                        Value::String(s) => (FieldType::String, Cell::S(s.clone())),
                        // An integer makes a new field an integer one; a fraction widens an
                        // integer field to float for good, earlier rows included.
                        Value::Number(n) => match (types.get(k), n.as_i64()) {
                            (None | Some(FieldType::Int), Some(i)) => (FieldType::Int, Cell::I(i)),
                            (Some(FieldType::Int), None) => {
                                types.insert(k.to_owned(), FieldType::Float);
                                for (_, _, row) in rows.iter_mut() {
                                    if let Some(Cell::I(i)) = row.get(k) {
                                        let f = *i as f64;
                                        row.insert(k.to_owned(), Cell::F(f));
                                    }
                                }
                                (FieldType::Float, Cell::F(n.as_f64().unwrap_or(0.0)))
                            }
                            _ => (FieldType::Float, Cell::F(n.as_f64().unwrap_or(0.0))),
                        },
                        _ => {
                            ok = false;
                            break;
                        }
                    };
                    match types.get(k) {
                        Some(t) if *t != ty => ok = false,
                        Some(_) => {}
                        None => {
                            types.insert(k.to_owned(), ty);
                        }
                    }
                    fields.insert(k.to_owned(), cell);
                }
            }
            if !ok {
                break;
            }
        }
        match (ok, device) {
            (true, Some(d)) => rows.push((time.unwrap_or(now), d, fields)),
            _ => rejected.push(i),
        }
    }
    Expected { rows, rejected, types }
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-1000i64..1000).prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z]{0,6}".prop_map(Value::String),
        Just(serde_json::json!({"nested": 1})),
    ]
}

fn event() -> impl Strategy<Value = Value> {
    let key = prop_oneof![Just("a"), Just("b"), Just("c"), Just("ts"), Just("device_id")];
    let device = prop_oneof![
        Just(Value::from("d1")),
        Just(Value::from("d2")),
        Just(Value::from("bad/id")),
        Just(Value::from(7))
    ];
    let ts = prop_oneof![
        (0i64..2_000_000_000_000).prop_map(Value::from),
        Just(Value::from("2026-11-25T10:00:00Z")),
        Just(Value::from("not a time")),
    ];
    prop_oneof![
        8 => (proptest::collection::vec((key, value()), 0..5), device, ts, any::<bool>(), any::<bool>()).prop_map(|(kvs, d, t, with_d, with_t)| {
            let mut m = serde_json::Map::new();
            for (k, v) in kvs {
                let v = match k {
                    "device_id" => d.clone(),
                    "ts" => t.clone(),
                    _ => v,
                };
                m.insert(k.to_owned(), v);
            }
            if with_d && !m.contains_key("device_id") {
                m.insert("device_id".into(), Value::from("d0"));
            }
            if with_t && !m.contains_key("ts") {
                m.insert("ts".into(), t);
            }
            Value::Object(m)
        }),
        1 => value(),
    ]
}

fn cell(col: &dyn Array, ty: FieldType, row: usize) -> Cell {
    if col.is_null(row) {
        return Cell::Null;
    }
    let any = col.as_any();
    match ty {
        FieldType::Float => any.downcast_ref::<Float64Array>().map(|a| Cell::F(a.value(row))),
        FieldType::Int => any.downcast_ref::<Int64Array>().map(|a| Cell::I(a.value(row))),
        FieldType::Bool => any.downcast_ref::<BooleanArray>().map(|a| Cell::B(a.value(row))),
        FieldType::String => any.downcast_ref::<StringArray>().map(|a| Cell::S(a.value(row).to_owned())),
        // JSON never makes unsigned or timestamp fields (line protocol's `u` and rules'
        // derived streams do).
        FieldType::UInt | FieldType::Timestamp => None,
    }
    .unwrap_or(Cell::Null)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn json_decoder_matches_the_reference(events in proptest::collection::vec(event(), 0..20)) {
        let now = 42;
        let expected = reference(&events, now);
        let payload = serde_json::to_vec(&Value::Array(events.clone())).unwrap_or_default();
        let catalog = Arc::new(StreamCatalog::in_memory());
        let stream = StreamName::new("s").unwrap_or_else(|e| panic!("{e}"));
        let mut b = BatchBuilder::new(catalog.clone(), &stream).unwrap_or_else(|e| panic!("{e}"));
        let rejections = JsonDecoder::new(&mut b, DeviceSource::PerEvent, now).decode(&payload).unwrap_or_else(|e| panic!("{e}"));
        let got_rejected: Vec<usize> = rejections.iter().map(|r| r.index).collect();
        prop_assert_eq!(&got_rejected, &expected.rejected);
        let schema = catalog.get(&stream).unwrap_or_else(|| panic!("no schema"));
        let got_types: BTreeMap<String, FieldType> = schema.fields.iter().map(|(n, t)| (n.to_string(), *t)).collect();
        prop_assert_eq!(&got_types, &expected.types);
        match b.finish() {
            None => prop_assert!(expected.rows.is_empty()),
            Some(out) => {
                let batch = &out.batch;
                prop_assert_eq!(batch.num_rows(), expected.rows.len());
                let time = batch.column(0).as_any().downcast_ref::<TimestampNanosecondArray>().unwrap_or_else(|| panic!("time"));
                let dev = batch.column(1).as_any().downcast_ref::<StringArray>().unwrap_or_else(|| panic!("device"));
                for (r, (t, d, fields)) in expected.rows.iter().enumerate() {
                    prop_assert_eq!(time.value(r), *t);
                    prop_assert_eq!(dev.value(r), d.as_str());
                    for (i, (name, ty)) in schema.fields.iter().enumerate() {
                        let want = fields.get(name.as_ref()).cloned().unwrap_or(Cell::Null);
                        prop_assert_eq!(cell(batch.column(i + 2).as_ref(), *ty, r), want, "row {} column {}", r, name);
                    }
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let stream = StreamName::new("s").unwrap_or_else(|e| panic!("{e}"));
        let mut b = BatchBuilder::new(catalog.clone(), &stream).unwrap_or_else(|e| panic!("{e}"));
        let _ = JsonDecoder::new(&mut b, DeviceSource::Fixed("d"), 0).decode(&bytes);
        let mut b = BatchBuilder::new(catalog, &stream).unwrap_or_else(|e| panic!("{e}"));
        let _ = JsonDecoder::new(&mut b, DeviceSource::PerEvent, 0).decode_ndjson(&bytes);
        let _ = b.finish();
    }
}

//! Builds stream batches from JSON rows and runs rules over them.

use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use ferrite_engine::{FieldType, ManualClock, Metrics, StreamBatch, StreamCatalog, StreamName};
use ferrite_rules::{NoActions, RuleEngine};
use serde_json::{Value, json};

/// One second in nanoseconds.
pub const S: i64 = 1_000_000_000;

/// A catalog where `telemetry` has `temperature` (float) and `door` (string).
pub fn telemetry_catalog() -> Result<Arc<StreamCatalog>> {
    let c = Arc::new(StreamCatalog::in_memory());
    let s = StreamName::new("telemetry")?;
    c.resolve_field(&s, "temperature", FieldType::Float)?;
    c.resolve_field(&s, "door", FieldType::String)?;
    Ok(c)
}

/// A rule engine over `catalog` with `shards` shards and a manual clock at zero.
pub fn engine(catalog: &Arc<StreamCatalog>, shards: usize, rules: &str) -> Result<(RuleEngine, Arc<ManualClock>)> {
    let clock = Arc::new(ManualClock::new(0));
    let e = RuleEngine::new(shards, catalog.clone(), Arc::new(Metrics::new()), Arc::new(NoActions), clock.clone());
    e.deploy(rules, Some("test.rules")).map_err(|e| anyhow::anyhow!(e.render("test.rules", rules)))?;
    Ok((e, clock))
}

/// A batch of `stream` from rows `{"t": seconds, "d": device, ...fields}`.
pub fn batch(catalog: &StreamCatalog, stream: &str, rows: &[Value]) -> Result<StreamBatch> {
    let name = StreamName::new(stream)?;
    let schema = catalog.get(&name).context("unknown stream")?.arrow.clone();
    let mut decoder = arrow::json::ReaderBuilder::new(schema).build_decoder()?;
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut o = r.as_object().cloned().unwrap_or_default();
            let t = o.remove("t").and_then(|v| v.as_f64()).unwrap_or(0.0);
            o.insert("time".into(), json!((t * S as f64) as i64));
            let d = o.remove("d").unwrap_or(json!("d1"));
            o.insert("device_id".into(), d);
            Value::Object(o)
        })
        .collect();
    decoder.serialize(&rows)?;
    let b = decoder.flush()?.context("no rows")?;
    Ok(StreamBatch::new(name, b))
}

/// Rows of `batches` that belong to `stream`, as JSON objects (time in seconds).
pub fn rows_of(batches: &[StreamBatch], stream: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for b in batches.iter().filter(|b| b.stream.as_str() == stream) {
        out.extend(to_json(&b.batch)?);
    }
    Ok(out)
}

/// A batch as JSON objects, with timestamps as seconds since the epoch.
pub fn to_json(b: &RecordBatch) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for i in 0..b.num_rows() {
        let mut o = serde_json::Map::new();
        for (f, c) in b.schema().fields().iter().zip(b.columns()) {
            let v = if c.is_null(i) {
                Value::Null
            } else if let arrow::datatypes::DataType::Timestamp(..) = f.data_type() {
                let ns = arrow::compute::cast(&c.slice(i, 1), &arrow::datatypes::DataType::Int64)?;
                let ns = ns.as_any().downcast_ref::<arrow::array::Int64Array>().context("ts")?.value(0);
                json!(ns as f64 / S as f64)
            } else {
                let view = ferrite_rules::output::RowView::new(b, i, &[]);
                view.json(f.name()).unwrap_or(Value::Null)
            };
            o.insert(f.name().clone(), v);
        }
        rows.push(Value::Object(o));
    }
    Ok(rows)
}

/// Runs `batches` through shard 0 one by one, then ends the input; returns every output.
pub fn run_all(e: &RuleEngine, batches: &[StreamBatch]) -> Vec<StreamBatch> {
    let mut out = Vec::new();
    for b in batches {
        out.extend(e.process(0, std::slice::from_ref(b)));
    }
    out.extend(e.finish(0));
    out
}

use arrow::array::Array;

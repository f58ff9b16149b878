//! Running rules over recorded events, as the engine would run them live: the events are
//! cut into batches, routed to shards by device, processed in arrival order, derived rows
//! fed back to the rules that read them, and at the end of the input every window closes
//! and every absence completes. `ferrite rules test` and the golden suite use it, running
//! the same case with different batch sizes and shard counts: all runs must agree.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use ferrite_engine::shard::split_by_device;
use ferrite_engine::{DEVICE_COLUMN, ManualClock, Metrics, StreamBatch, StreamCatalog, TIME_COLUMN};

use crate::error::{Error, Result};
use crate::output::{ActionSink, RowView};
use crate::runtime::RuleEngine;

/// How to cut and route the recorded events.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// Shards (rows routed by device hash, as the engine does).
    pub shards: usize,
    /// Most events per batch (consecutive events of one stream are batched together).
    pub batch_rows: usize,
    /// Every this many batches (0: never), the rules' state goes through a checkpoint: it is
    /// encoded, and a new engine with the same rules restores it and goes on, as a server
    /// restarting from its last checkpoint would.
    pub restart_every: usize,
}

/// Runs `rules` over `events` (in arrival order) with `shape`; returns every derived row.
pub fn run(
    rules: &str,
    catalog: &Arc<StreamCatalog>,
    events: &[StreamBatch],
    shape: RunShape,
    actions: Arc<dyn ActionSink>,
    base: Option<&std::path::Path>,
) -> Result<Vec<StreamBatch>> {
    run_with_progress(rules, catalog, events, shape, actions, base, &|_| {})
}

/// Like [`run`], calling `progress` with the number of events processed after each batch.
pub fn run_with_progress(
    rules: &str,
    catalog: &Arc<StreamCatalog>,
    events: &[StreamBatch],
    shape: RunShape,
    actions: Arc<dyn ActionSink>,
    base: Option<&std::path::Path>,
    progress: &dyn Fn(usize),
) -> Result<Vec<StreamBatch>> {
    let compiled =
        crate::runtime::compile_text_in(rules, &|s: &str| catalog.get_by_name(s).map(|x| x.arrow.clone()), base)?;
    run_compiled(compiled, catalog, events, shape, actions, progress)
}

/// Like [`run_with_progress`], for rules already compiled (variants built from a syntax tree).
pub fn run_compiled(
    compiled: Vec<crate::plan::CompiledRule>,
    catalog: &Arc<StreamCatalog>,
    events: &[StreamBatch],
    shape: RunShape,
    actions: Arc<dyn ActionSink>,
    progress: &dyn Fn(usize),
) -> Result<Vec<StreamBatch>> {
    let shards = shape.shards.max(1);
    let clock = Arc::new(ManualClock::new(0));
    let start = |actions: Arc<dyn ActionSink>| -> Result<RuleEngine> {
        let engine = RuleEngine::new(shards, catalog.clone(), Arc::new(Metrics::new()), actions, clock.clone());
        engine.install(compiled.clone(), None)?;
        Ok(engine)
    };
    let mut engine = start(actions.clone())?;
    let mut out = Vec::new();
    let mut done = 0;
    for (n, batch) in rebatch(events, shape.batch_rows.max(1))?.into_iter().enumerate() {
        if shape.restart_every > 0 && n > 0 && n % shape.restart_every == 0 {
            engine = restarted(&engine, shards, start(actions.clone())?)?;
        }
        if let Some(t) = max_time(&batch.batch) {
            clock.set(t);
        }
        done += batch.num_rows();
        for (shard, part) in split_by_device(batch, shards)? {
            feed(&engine, shard, vec![part], &mut out);
        }
        progress(done);
    }
    for shard in 0..shards {
        let derived = engine.finish(shard);
        feed_derived(&engine, shard, derived, &mut out);
    }
    // A rule that failed on a batch fails the run (the server would log and count it).
    if let Some(info) = engine.list().into_iter().find(|r| r.last_error.is_some()) {
        return Err(Error::Input(format!("rule `{}` failed: {}", info.name, info.last_error.unwrap_or_default())));
    }
    Ok(out)
}

/// `fresh` with the state of `engine`, through the checkpoint encoding.
fn restarted(engine: &RuleEngine, shards: usize, fresh: RuleEngine) -> Result<RuleEngine> {
    fresh.restore(None, &engine.snapshot(None)?)?;
    for shard in 0..shards {
        fresh.restore(Some(shard), &engine.snapshot(Some(shard))?)?;
    }
    Ok(fresh)
}

fn feed(engine: &RuleEngine, shard: usize, batches: Vec<StreamBatch>, out: &mut Vec<StreamBatch>) {
    let derived = engine.process(shard, &batches);
    feed_derived(engine, shard, derived, out);
}

fn feed_derived(engine: &RuleEngine, shard: usize, mut derived: Vec<StreamBatch>, out: &mut Vec<StreamBatch>) {
    // As the shard does: derived rows are committed, then shown to the rules (8 levels).
    for _ in 0..8 {
        derived.retain(|b| b.num_rows() > 0);
        if derived.is_empty() {
            return;
        }
        out.extend(derived.iter().cloned());
        derived = engine.process(shard, &derived);
    }
}

fn max_time(b: &RecordBatch) -> Option<i64> {
    let t = b.column_by_name(TIME_COLUMN)?;
    let t = t.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>()?;
    arrow::compute::max(t)
}

/// Merges consecutive batches of one stream up to `rows` rows, and cuts larger ones.
fn rebatch(events: &[StreamBatch], rows: usize) -> Result<Vec<StreamBatch>> {
    let mut out: Vec<StreamBatch> = Vec::new();
    let mut pending: Vec<StreamBatch> = Vec::new();
    let flush = |pending: &mut Vec<StreamBatch>, out: &mut Vec<StreamBatch>| -> Result<()> {
        let Some(first) = pending.first() else { return Ok(()) };
        let schema =
            pending.iter().map(|b| b.batch.schema()).max_by_key(|s| s.fields().len()).unwrap_or(first.batch.schema());
        let aligned = pending
            .iter()
            .map(|b| ferrite_engine::align_to_schema(&b.batch, &schema))
            .collect::<ferrite_engine::Result<Vec<_>>>()?;
        let merged = concat_batches(&schema, &aligned)?;
        let mut offset = 0;
        while offset < merged.num_rows() {
            let len = rows.min(merged.num_rows() - offset);
            out.push(StreamBatch::new(first.stream.clone(), merged.slice(offset, len)));
            offset += len;
        }
        pending.clear();
        Ok(())
    };
    for e in events {
        if pending.first().is_some_and(|p| p.stream != e.stream) {
            flush(&mut pending, &mut out)?;
        }
        pending.push(e.clone());
    }
    flush(&mut pending, &mut out)?;
    Ok(out)
}

/// Derived rows as JSON objects `{"stream", "time" (RFC 3339), "device_id", ...}`, in a
/// canonical order (by stream, time, device, then the whole row), so that runs with
/// different shapes compare equal.
pub fn to_rows(batches: &[StreamBatch]) -> Vec<serde_json::Value> {
    let mut rows: Vec<(String, String, String, String, serde_json::Value)> = Vec::new();
    for sb in batches {
        let b = &sb.batch;
        for i in 0..b.num_rows() {
            let view = RowView::new(b, i, &[]);
            let mut o = serde_json::Map::new();
            o.insert("stream".into(), serde_json::Value::String(sb.stream.to_string()));
            for f in b.schema().fields() {
                let v = match f.data_type() {
                    arrow::datatypes::DataType::Timestamp(..) => match view.text(f.name()) {
                        Some(t) if !t.is_empty() => serde_json::Value::String(t),
                        _ => serde_json::Value::Null,
                    },
                    _ => view.json(f.name()).unwrap_or(serde_json::Value::Null),
                };
                // Columns a stream gained from other rules or events are null here: omit them.
                if !v.is_null() {
                    o.insert(f.name().clone(), v);
                }
            }
            let v = serde_json::Value::Object(o);
            let time = view.text(TIME_COLUMN).unwrap_or_default();
            let device = view.text(DEVICE_COLUMN).unwrap_or_default();
            rows.push((sb.stream.to_string(), time, device, v.to_string(), v));
        }
    }
    rows.sort_by(|a, b| (&a.0, &a.1, &a.2, &a.3).cmp(&(&b.0, &b.1, &b.2, &b.3)));
    rows.into_iter().map(|r| r.4).collect()
}

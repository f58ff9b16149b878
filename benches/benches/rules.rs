//! Rule operators' throughput on one core: the rule engine's `process` on one shard over
//! batches of 10,000 events (one per device, 10,000 devices, one batch per second of event
//! time), for a filter, a tumbling 1-minute average by device, a sliding 5-minute window by
//! device, a 3-step pattern with `within`, and an absence rule. The peer is the same
//! computation as a DataFusion batch query over the same events in memory (the batch lower
//! bound: it sees all events at once and keeps no state between batches).
//!
//! `checkpoint_10k_devices` measures what a checkpoint costs the shards (they pause while
//! their rules' state is encoded) and what a restart's restore costs, for the same rules
//! after 60 seconds of events (10,000 open tumbling windows; 600,000 rows inside the
//! sliding windows; the patterns' partial matches). No peer: the figure to compare with is
//! the processing of one batch above.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use ferrite_engine::{FieldType, ManualClock, Metrics, StreamBatch, StreamCatalog, StreamName};
use ferrite_rules::{NoActions, RuleEngine};

const DEVICES: usize = 10_000;
const S: i64 = 1_000_000_000;

fn catalog() -> Arc<StreamCatalog> {
    let c = Arc::new(StreamCatalog::in_memory());
    let s = StreamName::new("telemetry").unwrap_or_else(|e| panic!("{e}"));
    c.resolve_field(&s, "temperature", FieldType::Float).unwrap_or_else(|e| panic!("{e}"));
    c.resolve_field(&s, "door", FieldType::String).unwrap_or_else(|e| panic!("{e}"));
    c
}

/// Second `sec` of event time: one event per device; temperatures cycle through 0..100 and
/// one event in 20 opens or closes a door, so filters and steps have realistic selectivity.
fn batch(catalog: &StreamCatalog, sec: i64) -> RecordBatch {
    let schema = catalog.get_by_name("telemetry").map(|s| s.arrow.clone()).unwrap_or_else(|| panic!("no stream"));
    let times = TimestampNanosecondArray::from_iter_values((0..DEVICES).map(|_| sec * S)).with_timezone("UTC");
    let devices = StringArray::from_iter_values((0..DEVICES).map(|d| format!("dev-{d}")));
    let temps = Float64Array::from_iter_values((0..DEVICES).map(|d| ((d as i64 * 7 + sec * 13) % 100) as f64));
    let doors = StringArray::from_iter((0..DEVICES).map(|d| match (d as i64 + sec) % 20 {
        0 => Some("open"),
        10 => Some("closed"),
        _ => None,
    }));
    RecordBatch::try_new(schema, vec![Arc::new(times), Arc::new(devices), Arc::new(temps), Arc::new(doors)])
        .unwrap_or_else(|e| panic!("{e}"))
}

const RULES: &[(&str, &str)] = &[
    ("filter", "rule r { from telemetry[temperature > 90] select device_id, temperature insert into out }"),
    (
        "tumbling_1m_avg_by_device",
        "rule r { from telemetry window tumbling 1m by device_id select device_id, avg(temperature) as t insert into out }",
    ),
    (
        "sliding_5m_by_device",
        "rule r { from telemetry window sliding 5m by device_id select device_id, avg(temperature) as t, count(*) as n insert into out }",
    ),
    (
        "pattern_3_steps_within",
        "rule r { from every a = telemetry[door = 'open'] -> b = telemetry[temperature > a.temperature + 5] -> c = telemetry[door = 'closed'] within 10m select a.device_id, b.temperature insert into out }",
    ),
    (
        "absence_2m",
        "rule r { from every a = telemetry[door = 'open'] -> not telemetry[door = 'closed'] for 2m select a.device_id then alert }",
    ),
];

fn operators(c: &mut Criterion) {
    let catalog = catalog();
    let mut g = c.benchmark_group("rules_10k_devices");
    g.throughput(Throughput::Elements(DEVICES as u64));
    g.sample_size(20);
    for (name, rule) in RULES {
        let engine = RuleEngine::new(
            1,
            catalog.clone(),
            Arc::new(Metrics::new()),
            Arc::new(NoActions),
            Arc::new(ManualClock::new(0)),
        );
        engine.deploy(rule, None).unwrap_or_else(|e| panic!("{name}: {}", e.render("bench", rule)));
        let stream = StreamName::new("telemetry").unwrap_or_else(|e| panic!("{e}"));
        let sec = Cell::new(0i64);
        g.bench_function(*name, |b| {
            b.iter_batched(
                || {
                    sec.set(sec.get() + 1);
                    StreamBatch::new(stream.clone(), batch(&catalog, sec.get()))
                },
                |sb| black_box(engine.process(0, std::slice::from_ref(&sb))),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    // The batch lower bound: DataFusion over 60 seconds of the same events at once.
    let batches: Vec<RecordBatch> = (1..=60).map(|s| batch(&catalog, s)).collect();
    let rows = (batches.len() * DEVICES) as u64;
    let schema = batches[0].schema();
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let table = MemTable::try_new(schema, vec![batches]).unwrap_or_else(|e| panic!("{e}"));
    ctx.register_table("telemetry", Arc::new(table)).unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("peer_datafusion_batch_10k_devices");
    g.throughput(Throughput::Elements(rows));
    g.sample_size(10);
    for (name, sql) in [
        ("filter", "SELECT device_id, temperature FROM telemetry WHERE temperature > 90"),
        (
            "tumbling_1m_avg_by_device",
            "SELECT device_id, date_bin(INTERVAL '1 minute', time) AS w, avg(temperature) FROM telemetry GROUP BY 1, 2",
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let df = ctx.sql(sql).await.unwrap_or_else(|e| panic!("{e}"));
                    black_box(df.collect().await.unwrap_or_else(|e| panic!("{e}")))
                })
            })
        });
    }
    g.finish();
}

fn checkpoints(c: &mut Criterion) {
    let catalog = catalog();
    let mut g = c.benchmark_group("checkpoint_10k_devices");
    g.sample_size(10);
    for (name, rule) in RULES.iter().filter(|(n, _)| *n != "filter") {
        let engine = || {
            let e = RuleEngine::new(
                1,
                catalog.clone(),
                Arc::new(Metrics::new()),
                Arc::new(NoActions),
                Arc::new(ManualClock::new(0)),
            );
            e.deploy(rule, None).unwrap_or_else(|e| panic!("{name}: {}", e.render("bench", rule)));
            e
        };
        let live = engine();
        let stream = StreamName::new("telemetry").unwrap_or_else(|e| panic!("{e}"));
        for sec in 1..=60 {
            black_box(live.process(0, &[StreamBatch::new(stream.clone(), batch(&catalog, sec))]));
        }
        let state = live.snapshot(Some(0)).unwrap_or_else(|e| panic!("{e}"));
        println!("checkpoint {name}: {} bytes of state for 10,000 devices", state.len());
        g.bench_function(format!("{name}/snapshot"), |b| {
            b.iter(|| black_box(live.snapshot(Some(0)).unwrap_or_else(|e| panic!("{e}"))))
        });
        g.bench_function(format!("{name}/restore"), |b| {
            b.iter_batched(
                engine,
                |fresh| black_box(fresh.restore(Some(0), &state).unwrap_or_else(|e| panic!("{e}"))),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, operators, checkpoints);
criterion_main!(benches);

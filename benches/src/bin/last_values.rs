//! "The latest reading of every device": `last_values('telemetry')` (the last-value cache)
//! against the same answer computed by a scan, `SELECT DISTINCT ON (device_id) ... ORDER BY
//! device_id, time DESC`, on Ferrite and on DuckDB over the very same Parquet files.
//!
//! `devices` devices with `per_device` readings each (4 float fields and a string), all
//! persisted to the archive, then a few more readings in the hot buffer; each query runs
//! `runs` times in process, the median is reported (results collected, not printed).
//!
//! `cargo run --release -p ferrite-benches --bin last_values -- [devices] [per_device] [runs]`

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use ferrite_engine::{FieldType, Metrics, ShardStore, StreamBatch, StreamCatalog, StreamName};
use ferrite_query::{QueryConfig, QueryService};
use ferrite_storage::{Storage, StorageConfig};

/// 2025-11-24T16:00:00Z.
const T0: i64 = 1_764_000_000_000_000_000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let devices: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let per_device: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-last-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let catalog = Arc::new(StreamCatalog::in_memory());
    let stream = StreamName::new("telemetry")?;
    for f in ["temperature", "humidity", "pressure", "battery"] {
        catalog.resolve_field(&stream, f, FieldType::Float)?;
    }
    catalog.resolve_field(&stream, "status", FieldType::String)?;
    let schema = catalog.get(&stream).ok_or("no schema")?.arrow.clone();
    let config =
        StorageConfig { data_dir: dir.clone(), shards: 1, hot_max_bytes: usize::MAX, ..StorageConfig::default() };
    let storage = Storage::open(config, catalog.clone(), Arc::new(Metrics::new()), rt.handle().clone())?;

    // Reading r of device d at T0 + r seconds + d microseconds, in batches of 100,000 rows.
    let rows = devices * per_device;
    let batch_of = |range: std::ops::Range<usize>| -> Result<RecordBatch, arrow::error::ArrowError> {
        let t: Vec<i64> =
            range.clone().map(|i| T0 + (i / devices) as i64 * 1_000_000_000 + (i % devices) as i64 * 1000).collect();
        let d: Vec<String> = range.clone().map(|i| format!("dev-{:06}", i % devices)).collect();
        let v = |k: f64| -> Float64Array { range.clone().map(|i| (i % 1000) as f64 * k).collect() };
        let s: Vec<&str> = range.clone().map(|i| if i % 7 == 0 { "warn" } else { "ok" }).collect();
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(t).with_timezone("UTC")),
                Arc::new(StringArray::from(d)),
                Arc::new(v(0.1)),
                Arc::new(v(0.05)),
                Arc::new(v(1.3)),
                Arc::new(v(0.001)),
                Arc::new(StringArray::from(s)),
            ],
        )
    };
    let started = Instant::now();
    for start in (0..rows).step_by(100_000) {
        let b = batch_of(start..(start + 100_000).min(rows))?;
        storage.commit(0, &[StreamBatch::new(stream.clone(), b)]).map_err(|e| e.to_string())?;
    }
    storage.persist()?;
    // A newer reading for a tenth of the devices, still in memory.
    let b = batch_of(rows..rows + devices / 10)?;
    storage.commit(0, &[StreamBatch::new(stream.clone(), b)]).map_err(|e| e.to_string())?;
    let load_s = started.elapsed().as_secs_f64();
    // Results are collected whole: no cap on their size (the server's default is 64 MiB).
    let limits = QueryConfig { max_result_bytes: usize::MAX, ..QueryConfig::default() };
    let service = QueryService::with_config(catalog.clone(), storage.clone(), Arc::new(Metrics::new()), limits)?;

    let time = |sql: &str| -> Result<(Duration, usize), Box<dyn std::error::Error>> {
        let mut ts = Vec::new();
        let mut n = 0;
        for _ in 0..runs {
            let s = Instant::now();
            let r = rt.block_on(service.sql(sql))?;
            ts.push(s.elapsed());
            n = r.batches.iter().map(RecordBatch::num_rows).sum();
        }
        Ok((median(ts), n))
    };
    let (cache, n_cache) = time("SELECT * FROM last_values('telemetry')")?;
    let (scan, n_scan) = time("SELECT DISTINCT ON (device_id) * FROM telemetry ORDER BY device_id, time DESC")?;
    if n_cache != devices || n_scan != devices {
        return Err(format!("expected {devices} rows, got {n_cache} (cache) and {n_scan} (scan)").into());
    }
    // DuckDB over the archive (the hot rows are not in files: its answer is the persisted state).
    let archive = dir.join("archive").join("default").join("telemetry");
    let script = r#"
import sys, time, statistics, duckdb
root, runs = sys.argv[1], int(sys.argv[2])
con = duckdb.connect()
con.execute(f"CREATE VIEW telemetry AS SELECT * FROM read_parquet('{root}/**/*.parquet')")
q = "SELECT DISTINCT ON (device_id) * FROM telemetry ORDER BY device_id, time DESC"
ts = []
for _ in range(runs):
    s = time.perf_counter(); n = len(con.execute(q).fetchall()); ts.append(time.perf_counter() - s)
print(statistics.median(ts) * 1000, n)
"#;
    let duck = Command::new("python3").arg("-c").arg(script).arg(&archive).arg(runs.to_string()).output();
    let duck_ms: Option<f64> = match duck {
        Ok(o) if o.status.success() => {
            String::from_utf8_lossy(&o.stdout).split_whitespace().next().and_then(|v| v.parse().ok())
        }
        Ok(o) => {
            eprintln!("duckdb peer failed: {}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("duckdb peer unavailable: {e}");
            None
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let fmt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
    println!(
        "last_values devices={devices} rows={} load_s={load_s:.1} cache_ms={:.2} ferrite_distinct_on_ms={:.1} \
         duckdb_distinct_on_ms={} cache/duckdb={} cache/ferrite_scan={:.3}",
        rows + devices / 10,
        ms(cache),
        ms(scan),
        fmt(duck_ms),
        duck_ms.map_or("n/a".to_owned(), |d| format!("{:.4}", ms(cache) / d)),
        ms(cache) / ms(scan)
    );
    drop(service);
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

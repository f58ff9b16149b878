//! Query over 10 million archived events, Ferrite (DataFusion over its archive) against
//! DuckDB (the Python package) and, with `--features polars`, polars (the Rust crate) on the
//! very same Parquet files. Also measures the persist (Arrow → sorted, zstd Parquet).
//!
//! `cargo run --release -p ferrite-benches --bin query [--features polars] -- [rows] [runs]`
//!
//! Each query runs `runs` times per engine; the median is reported.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use ferrite_engine::{FieldType, Metrics, ShardStore, StreamBatch, StreamCatalog, StreamName};
use ferrite_query::QueryService;
use ferrite_storage::{Storage, StorageConfig};

/// Start of the generated data: 2025-11-24T16:00:00Z.
const T0: i64 = 1_764_000_000_000_000_000;
const STEP_NS: i64 = 10_000_000;

/// The queries, in Ferrite/DuckDB SQL; `{T1}`/`{T2}` bound one hour.
const QUERIES: [(&str, &str); 5] = [
    ("count", "SELECT count(*) FROM telemetry"),
    ("group_by_device", "SELECT device_id, avg(temperature), max(humidity) FROM telemetry GROUP BY device_id"),
    ("one_hour_avg", "SELECT avg(temperature) FROM telemetry WHERE time >= {T1} AND time < {T2}"),
    ("one_device", "SELECT count(*), avg(temperature) FROM telemetry WHERE device_id = 'dev-42'"),
    ("hourly", "SELECT date_trunc('hour', time) AS h, avg(temperature) FROM telemetry GROUP BY 1 ORDER BY 1"),
];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000_000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-query-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let catalog = Arc::new(StreamCatalog::in_memory());
    let stream = StreamName::new("telemetry")?;
    for f in ["temperature", "humidity", "pressure"] {
        catalog.resolve_field(&stream, f, FieldType::Float)?;
    }
    catalog.resolve_field(&stream, "status", FieldType::String)?;
    let schema = catalog.get(&stream).ok_or("no schema")?.arrow.clone();
    let metrics = Arc::new(Metrics::new());
    let config =
        StorageConfig { data_dir: dir.clone(), shards: 1, hot_max_bytes: usize::MAX, ..StorageConfig::default() };
    let storage = Storage::open(config, catalog.clone(), metrics.clone(), rt.handle().clone())?;

    // 10M events: 1,000 devices, one event every 10 ms, about 28 event-time hours.
    let chunk = 100_000;
    let mut arrow_bytes = 0usize;
    for start in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - start);
        let idx = start..start + n;
        let t: Vec<i64> = idx.clone().map(|i| T0 + i as i64 * STEP_NS).collect();
        let d: Vec<String> = idx.clone().map(|i| format!("dev-{}", i % 1000)).collect();
        let temp: Vec<f64> = idx.clone().map(|i| 15.0 + (i % 200) as f64 * 0.1).collect();
        let hum: Vec<f64> = idx.clone().map(|i| 30.0 + (i % 70) as f64).collect();
        let pres: Vec<f64> = idx.clone().map(|i| 1000.0 + (i % 50) as f64 * 0.5).collect();
        let status: Vec<&str> = idx.map(|i| ["ok", "warn", "ok", "ok", "error"][i % 5]).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(t).with_timezone("UTC")),
                Arc::new(StringArray::from(d)),
                Arc::new(Float64Array::from(temp)),
                Arc::new(Float64Array::from(hum)),
                Arc::new(Float64Array::from(pres)),
                Arc::new(StringArray::from(status)),
            ],
        )?;
        arrow_bytes += batch.get_array_memory_size();
        storage.commit(0, &[StreamBatch::new(stream.clone(), batch)])?;
    }
    let started = Instant::now();
    let persisted = storage.persist()?;
    let persist = started.elapsed().as_secs_f64();
    let parquet_bytes = metrics.counter_value("ferrite_persisted_bytes_total", &[("stream", "telemetry")]);
    println!(
        "persist rows={persisted} seconds={persist:.2} rows_per_s={:.0} arrow_MB_per_s={:.1} parquet_MB={:.1} files={}",
        persisted as f64 / persist,
        arrow_bytes as f64 / persist / 1e6,
        parquet_bytes as f64 / 1e6,
        storage.snapshot(&stream).files.len()
    );

    let service = QueryService::new(catalog, storage.clone(), metrics)?;
    let t1 = T0 + 5 * 3_600_000_000_000;
    let t2 = t1 + 3_600_000_000_000;
    let archive = dir.join("archive").join("default").join("telemetry");
    let duck = duckdb_timings(&archive, runs, t1, t2);
    #[cfg(feature = "polars")]
    let pol = polars_peer::timings(&archive, runs, t1, t2)?;
    for (name, sql) in QUERIES {
        let sql = sql
            .replace("{T1}", &format!("to_timestamp_nanos({t1})"))
            .replace("{T2}", &format!("to_timestamp_nanos({t2})"));
        let mut times = Vec::new();
        let mut out_rows = 0;
        for _ in 0..runs {
            let s = Instant::now();
            let r = rt.block_on(service.sql(&sql))?;
            times.push(s.elapsed());
            out_rows = r.batches.iter().map(|b| b.num_rows()).sum::<usize>();
        }
        let f = median(times).as_secs_f64() * 1e3;
        // QUERY_EXPLAIN=name prints that query's EXPLAIN ANALYZE (where its time goes).
        if std::env::var("QUERY_EXPLAIN").is_ok_and(|q| q == name) {
            let r = rt.block_on(service.sql(&format!("EXPLAIN ANALYZE {sql}")))?;
            println!("{}", arrow::util::pretty::pretty_format_batches(&r.batches)?);
        }
        let d = duck.as_ref().ok().and_then(|m| m.get(&format!("duckdb:{name}")).copied());
        let py = duck.as_ref().ok().and_then(|m| m.get(&format!("polars_py:{name}")).copied());
        #[cfg(feature = "polars")]
        let p = pol.get(name).copied();
        #[cfg(not(feature = "polars"))]
        let p: Option<f64> = None;
        let fmt = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
        println!(
            "query {name} rows_out={out_rows} ferrite_ms={f:.1} duckdb_ms={} polars_rust_ms={} polars_py_ms={} ferrite/duckdb={} ferrite/polars_rust={} ferrite/polars_py={}",
            fmt(d),
            fmt(p),
            fmt(py),
            fmt(d.map(|d| f / d)),
            fmt(p.map(|p| f / p)),
            fmt(py.map(|p| f / p))
        );
    }
    if let Err(e) = duck {
        println!("duckdb peer unavailable: {e}");
    }
    drop(service);
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Median milliseconds per query (`engine:query` keys), from DuckDB and, when installed,
/// polars' Python package, over the same files.
fn duckdb_timings(
    archive: &Path,
    runs: usize,
    t1: i64,
    t2: i64,
) -> Result<std::collections::HashMap<String, f64>, String> {
    let script = r#"
import sys, time, statistics, duckdb
root, runs, t1, t2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
con = duckdb.connect()
con.execute(f"CREATE VIEW telemetry AS SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true)")
T1 = f"make_timestamp_ns({t1})::TIMESTAMPTZ"
T2 = f"make_timestamp_ns({t2})::TIMESTAMPTZ"
queries = {
  "count": "SELECT count(*) FROM telemetry",
  "group_by_device": "SELECT device_id, avg(temperature), max(humidity) FROM telemetry GROUP BY device_id",
  "one_hour_avg": f"SELECT avg(temperature) FROM telemetry WHERE time >= {T1} AND time < {T2}",
  "one_device": "SELECT count(*), avg(temperature) FROM telemetry WHERE device_id = 'dev-42'",
  "hourly": "SELECT date_trunc('hour', time) AS h, avg(temperature) FROM telemetry GROUP BY 1 ORDER BY 1",
}
for name, q in queries.items():
    ts = []
    for _ in range(runs):
        s = time.perf_counter(); con.execute(q).fetchall(); ts.append(time.perf_counter() - s)
    print("duckdb", name, statistics.median(ts) * 1000)
try:
    import polars as pl
except ImportError:
    sys.exit(0)
scan = lambda: pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True)
t = pl.col("time").cast(pl.Int64)
plans = {
  "count": lambda: scan().select(pl.len()),
  "group_by_device": lambda: scan().group_by("device_id").agg(pl.col("temperature").mean(), pl.col("humidity").max()),
  "one_hour_avg": lambda: scan().filter((t >= t1) & (t < t2)).select(pl.col("temperature").mean()),
  "one_device": lambda: scan().filter(pl.col("device_id") == "dev-42").select(pl.len(), pl.col("temperature").mean()),
  "hourly": lambda: scan().group_by(pl.col("time").dt.truncate("1h").alias("h")).agg(pl.col("temperature").mean()).sort("h"),
}
for name, q in plans.items():
    ts = []
    for _ in range(runs):
        s = time.perf_counter(); q().collect(); ts.append(time.perf_counter() - s)
    print("polars_py", name, statistics.median(ts) * 1000)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(archive)
        .args([runs.to_string(), t1.to_string(), t2.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (engine, name, v) = (it.next()?, it.next()?, it.next()?.parse().ok()?);
            Some((format!("{engine}:{name}"), v))
        })
        .collect())
}

#[cfg(feature = "polars")]
mod polars_peer {
    use std::collections::HashMap;
    use std::path::Path;
    use std::time::Instant;

    use polars::prelude::*;

    /// Median milliseconds per query, from polars' lazy engine over the same files.
    pub fn timings(
        archive: &Path,
        runs: usize,
        t1: i64,
        t2: i64,
    ) -> Result<HashMap<String, f64>, Box<dyn std::error::Error>> {
        let glob = format!("{}/**/*.parquet", archive.display());
        let scan = || -> PolarsResult<LazyFrame> {
            let args = ScanArgsParquet { hive_options: HiveOptions::new_enabled(), ..Default::default() };
            LazyFrame::scan_parquet(PlRefPath::new(glob.as_str()), args)
        };
        let time_t = || col("time").cast(DataType::Int64);
        let queries: Vec<(&str, Box<dyn Fn() -> PolarsResult<LazyFrame>>)> = vec![
            ("count", Box::new(move || Ok(scan()?.select([len()])))),
            (
                "group_by_device",
                Box::new(move || {
                    Ok(scan()?.group_by([col("device_id")]).agg([col("temperature").mean(), col("humidity").max()]))
                }),
            ),
            (
                "one_hour_avg",
                Box::new(move || {
                    Ok(scan()?
                        .filter(time_t().gt_eq(lit(t1)).and(time_t().lt(lit(t2))))
                        .select([col("temperature").mean()]))
                }),
            ),
            (
                "one_device",
                Box::new(move || {
                    Ok(scan()?.filter(col("device_id").eq(lit("dev-42"))).select([len(), col("temperature").mean()]))
                }),
            ),
            (
                "hourly",
                Box::new(move || {
                    Ok(scan()?
                        .group_by([col("time").dt().truncate(lit("1h")).alias("h")])
                        .agg([col("temperature").mean()])
                        .sort(["h"], Default::default()))
                }),
            ),
        ];
        let mut out = HashMap::new();
        for (name, q) in queries {
            let mut ts = Vec::new();
            for _ in 0..runs {
                let s = Instant::now();
                let df = q()?.collect()?;
                std::hint::black_box(df.height());
                ts.push(s.elapsed());
            }
            out.insert(name.to_owned(), super::median(ts).as_secs_f64() * 1e3);
        }
        Ok(out)
    }
}

//! The TSBS "iot" use case on Ferrite, DuckDB and polars over the same Parquet files.
//!
//! 1. Generates what TSBS's IoT generator writes (`tsbs_generate_data --use-case=iot`):
//!    trucks tagged `name, fleet, driver, model, device_version, load_capacity,
//!    fuel_capacity, nominal_fuel_consumption`, a `readings` line (7 float fields from
//!    clamped random walks) and a `diagnostics` line (`fuel_state`, `current_load`, integer
//!    `status`) per truck every 10 s, with TSBS's damage: missing batches and entries,
//!    out-of-order entries and batches, a zeroed field in 10% of entries and a zeroed tag in
//!    1% (a line whose `name` was zeroed names no truck, and is refused and counted).
//! 2. Loads it through the line-protocol decoder (`device_tags = ["name"]`) into storage,
//!    persisting `files` times per event-time hour (a server's small files), then compacts:
//!    files and bytes per numeric value before and after.
//! 3. Runs TSBS's twelve IoT queries, in SQL on Ferrite and DuckDB and as lazy frames on
//!    polars (Python), `runs` times each, median; checks that the engines return as many
//!    rows. The three latest-row queries also run on Ferrite's last-value cache.
//!
//! `cargo run --release -p ferrite-benches --bin tsbs_iot -- [trucks] [hours] [runs] [files]`
//!
//! `TSBS_ONLY=avg-load,last-loc` runs only those queries (for a profile); `TSBS_KEEP=1`
//! keeps the archive.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_benches::tsbs::{DIAGNOSTICS_FIELDS, Generator, HOUR_NS, INTERVAL_NS, READINGS_FIELDS, T0};
use ferrite_engine::{Metrics, ShardStore, StreamCatalog, StreamName};
use ferrite_ingest::line_protocol::{self, Precision};
use ferrite_query::QueryService;
use ferrite_storage::{Storage, StorageConfig};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// The queries: name, and SQL with `{b10}`/`{bday}` (bucket functions, per engine), `{fleet}`,
/// and the windows `{stat_from}`, `{session_from}`, `{daily_from}`, `{end}`.
const QUERIES: [(&str, &str); 12] = [
    (
        "last-loc",
        "SELECT DISTINCT ON (name) name, driver, longitude, latitude FROM readings \
         WHERE fleet = '{fleet}' AND name IS NOT NULL ORDER BY name, time DESC",
    ),
    (
        "low-fuel",
        "SELECT name, driver, fuel_state FROM (SELECT DISTINCT ON (name) name, driver, fuel_state FROM diagnostics \
         WHERE fleet = '{fleet}' AND name IS NOT NULL ORDER BY name, time DESC) d WHERE fuel_state < 0.1",
    ),
    (
        "high-load",
        "SELECT name, driver, current_load FROM (SELECT DISTINCT ON (name) name, driver, current_load, load_capacity \
         FROM diagnostics WHERE fleet = '{fleet}' AND name IS NOT NULL ORDER BY name, time DESC) d \
         WHERE current_load / CAST(load_capacity AS DOUBLE) > 0.9",
    ),
    (
        "stationary-trucks",
        "SELECT name, driver FROM readings WHERE time >= '{stat_from}' AND time < '{end}' \
         AND name IS NOT NULL AND fleet = '{fleet}' GROUP BY 1, 2 HAVING avg(velocity) < 1",
    ),
    (
        "long-driving-sessions",
        "SELECT name, driver FROM (SELECT {b10} AS ten_minutes, name, driver FROM readings \
         WHERE time >= '{session_from}' AND time < '{end}' AND name IS NOT NULL AND fleet = '{fleet}' \
         GROUP BY ten_minutes, name, driver HAVING avg(velocity) > 1) r \
         GROUP BY name, driver HAVING count(ten_minutes) > 22",
    ),
    (
        "long-daily-sessions",
        "SELECT name, driver FROM (SELECT {b10} AS ten_minutes, name, driver FROM readings \
         WHERE time >= '{daily_from}' AND time < '{end}' AND name IS NOT NULL AND fleet = '{fleet}' \
         GROUP BY ten_minutes, name, driver HAVING avg(velocity) > 1) r \
         GROUP BY name, driver HAVING count(ten_minutes) > 60",
    ),
    (
        "avg-vs-projected-fuel-consumption",
        "SELECT fleet, avg(fuel_consumption) AS avg_fuel_consumption, \
         avg(CAST(nominal_fuel_consumption AS DOUBLE)) AS projected_fuel_consumption FROM readings \
         WHERE velocity > 1 AND fleet IS NOT NULL AND nominal_fuel_consumption IS NOT NULL AND name IS NOT NULL \
         GROUP BY fleet",
    ),
    (
        "avg-daily-driving-duration",
        "WITH ten AS (SELECT {b10} AS ten_minutes, name, fleet, driver FROM readings WHERE name IS NOT NULL \
         GROUP BY ten_minutes, name, fleet, driver HAVING avg(velocity) > 1), \
         daily AS (SELECT {bday_ten} AS day, name, fleet, driver, count(*) / 6.0 AS hours FROM ten \
         GROUP BY day, name, fleet, driver) \
         SELECT fleet, name, driver, avg(hours) AS avg_daily_hours FROM daily GROUP BY fleet, name, driver",
    ),
    (
        "avg-daily-driving-session",
        "WITH status AS (SELECT name, {b10} AS ten_minutes, avg(velocity) > 5 AS driving FROM readings \
         WHERE name IS NOT NULL GROUP BY name, ten_minutes), \
         changes AS (SELECT name, ten_minutes AS start, \
         lead(ten_minutes) OVER (PARTITION BY name ORDER BY ten_minutes) AS stop, driving \
         FROM (SELECT name, ten_minutes, driving, lag(driving) OVER (PARTITION BY name ORDER BY ten_minutes) AS prev \
         FROM status) x WHERE x.driving <> x.prev) \
         SELECT name, {bday_start} AS day, avg(date_part('epoch', stop) - date_part('epoch', start)) AS duration_s \
         FROM changes WHERE driving = true GROUP BY name, day ORDER BY name, day",
    ),
    (
        "avg-load",
        "SELECT fleet, model, load_capacity, avg(avg_load / CAST(load_capacity AS DOUBLE)) AS avg_load_percentage \
         FROM (SELECT name, fleet, model, load_capacity, avg(current_load) AS avg_load FROM diagnostics \
         WHERE name IS NOT NULL GROUP BY name, fleet, model, load_capacity) d GROUP BY fleet, model, load_capacity",
    ),
    (
        "daily-activity",
        "SELECT fleet, model, day, sum(ten_mins_per_day) / 144.0 AS daily_activity FROM \
         (SELECT {bday} AS day, {b10} AS ten_minutes, name, fleet, model, count(*) AS ten_mins_per_day \
         FROM diagnostics WHERE name IS NOT NULL GROUP BY day, ten_minutes, name, fleet, model \
         HAVING avg(status) < 1) y GROUP BY fleet, model, day ORDER BY day",
    ),
    (
        "breakdown-frequency",
        "WITH b AS (SELECT {b10} AS ten_minutes, name, model, \
         avg(CASE WHEN status > 0 THEN 1.0 ELSE 0.0 END) >= 0.5 AS broken_down FROM diagnostics \
         WHERE name IS NOT NULL GROUP BY ten_minutes, name, model), \
         bb AS (SELECT name, model, broken_down, \
         lead(broken_down) OVER (PARTITION BY name ORDER BY ten_minutes) AS next_broken_down FROM b) \
         SELECT model, count(*) AS breakdowns FROM bb WHERE broken_down = false AND next_broken_down = true \
         GROUP BY model",
    ),
];

/// The three latest-row queries on Ferrite's last-value cache (the same question).
const CACHED: [(&str, &str); 3] = [
    (
        "last-loc",
        "SELECT name, driver, longitude, latitude FROM last_values('readings') WHERE fleet = '{fleet}' AND name IS NOT NULL",
    ),
    (
        "low-fuel",
        "SELECT name, driver, fuel_state FROM last_values('diagnostics') \
         WHERE fleet = '{fleet}' AND name IS NOT NULL AND fuel_state < 0.1",
    ),
    (
        "high-load",
        "SELECT name, driver, current_load FROM last_values('diagnostics') WHERE fleet = '{fleet}' \
         AND name IS NOT NULL AND current_load / CAST(load_capacity AS DOUBLE) > 0.9",
    ),
];

fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

/// The SQL of `template` for one engine.
fn sql_for(template: &str, duckdb: bool, end: i64) -> String {
    let (b10, bday, bday_ten, bday_start) = if duckdb {
        (
            "time_bucket(INTERVAL '10 minutes', time)",
            "time_bucket(INTERVAL '1 day', time)",
            "time_bucket(INTERVAL '1 day', ten_minutes)",
            "time_bucket(INTERVAL '1 day', start)",
        )
    } else {
        (
            "date_bin(INTERVAL '10 minutes', time)",
            "date_bin(INTERVAL '1 day', time)",
            "date_bin(INTERVAL '1 day', ten_minutes)",
            "date_bin(INTERVAL '1 day', start)",
        )
    };
    template
        .replace("{b10}", b10)
        .replace("{bday_ten}", bday_ten)
        .replace("{bday_start}", bday_start)
        .replace("{bday}", bday)
        .replace("{fleet}", "South")
        .replace("{stat_from}", &rfc3339(end - 600_000_000_000))
        .replace("{session_from}", &rfc3339(end - 4 * HOUR_NS))
        .replace("{daily_from}", &rfc3339(end - 24 * HOUR_NS))
        .replace("{end}", &rfc3339(end))
}

/// Archive files and bytes of a stream.
fn archive(storage: &Storage, stream: &StreamName) -> (usize, u64, u64) {
    let files = storage.snapshot(stream).files;
    (files.len(), files.iter().map(|f| f.size).sum(), files.iter().map(|f| f.rows).sum())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let trucks: usize = arg(&args, 0, 200);
    let hours: i64 = arg(&args, 1, 72);
    let runs: usize = arg(&args, 2, 5);
    let files_per_hour: i64 = arg(&args, 3, 30);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-tsbs-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let catalog = Arc::new(StreamCatalog::in_memory());
    let metrics = Arc::new(Metrics::new());
    let config =
        StorageConfig { data_dir: dir.clone(), shards: 1, hot_max_bytes: usize::MAX, ..StorageConfig::default() };
    let storage = Storage::open(config, catalog.clone(), metrics.clone(), rt.handle().clone())?;
    let readings = StreamName::new("readings")?;
    let diagnostics = StreamName::new("diagnostics")?;

    // 1 and 2: generate, decode, commit; persist `files_per_hour` times an event-time hour.
    let mut generator = Generator::new(trucks);
    let naming = line_protocol::DeviceNaming::configured(&["name".to_owned()], None);
    let ticks = hours * HOUR_NS / INTERVAL_NS;
    let ticks_per_persist = (HOUR_NS / INTERVAL_NS / files_per_hour).max(1);
    let (mut lines, mut accepted, mut refused, mut text_bytes) = (0usize, 0usize, 0usize, 0usize);
    let mut decode_time = Duration::ZERO;
    let mut text = String::new();
    let load_started = Instant::now();
    for tick in 0..ticks {
        lines += generator.next_tick(&mut text);
        let last = tick + 1 == ticks;
        if text.len() > (4 << 20) || (tick + 1) % ticks_per_persist == 0 || last {
            text_bytes += text.len();
            let s = Instant::now();
            let out = line_protocol::decode(&catalog, "default", &text, Precision::Nanoseconds, &naming, 0);
            accepted += out.accepted;
            refused += out.rejections.len();
            if let Some(r) = out.rejections.iter().find(|r| r.reason != "missing_device_id") {
                return Err(format!("a TSBS line was refused for another reason: {}", r.message).into());
            }
            storage.commit(0, &out.batches)?;
            decode_time += s.elapsed();
            text.clear();
        }
        if (tick + 1) % ticks_per_persist == 0 || last {
            storage.persist()?;
        }
    }
    let load = load_started.elapsed();
    println!(
        "tsbs_load trucks={trucks} hours={hours} lines={lines} accepted={accepted} refused_no_name={refused} \
         text_MB={:.0} decode_commit_lines_per_s={:.0} total_s={:.1}",
        text_bytes as f64 / 1e6,
        lines as f64 / decode_time.as_secs_f64(),
        load.as_secs_f64()
    );
    let before = [archive(&storage, &readings), archive(&storage, &diagnostics)];
    let s = Instant::now();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64;
    let report = storage.compact(now, false)?;
    let compact_s = s.elapsed().as_secs_f64();
    let after = [archive(&storage, &readings), archive(&storage, &diagnostics)];
    for (i, (name, fields)) in [("readings", READINGS_FIELDS), ("diagnostics", DIAGNOSTICS_FIELDS)].iter().enumerate() {
        let (fb, bb, rows) = before[i];
        let (fa, ba, _) = after[i];
        let values = (rows * fields) as f64;
        println!(
            "tsbs_archive stream={name} rows={rows} files_before={fb} files_after={fa} \
             bytes_per_value_before={:.2} bytes_per_value_after={:.2} MB_after={:.1}",
            bb as f64 / values,
            ba as f64 / values,
            ba as f64 / 1e6
        );
    }
    let (_, ra, rrows) = after[0];
    let (_, da, drows) = after[1];
    println!(
        "tsbs_archive stream=all rows={} bytes_per_value_after={:.2} compaction_s={compact_s:.1} files_merged={}",
        rrows + drows,
        (ra + da) as f64 / (rrows * READINGS_FIELDS + drows * DIAGNOSTICS_FIELDS) as f64,
        report.files_in
    );

    // 3: the queries.
    let end = T0 + ticks * INTERVAL_NS;
    let service = QueryService::new(catalog, storage.clone(), metrics)?;
    let root = dir.join("archive").join("default");
    let peers =
        if std::env::var_os("TSBS_ONLY").is_some() { Ok(HashMap::new()) } else { peer_timings(&root, runs, end) };
    let peers = match peers {
        Ok(p) => p,
        Err(e) => {
            println!("peers unavailable: {e}");
            HashMap::new()
        }
    };
    let run_ferrite = |sql: &str| -> Result<(f64, usize), Box<dyn std::error::Error>> {
        let mut times = Vec::new();
        let mut out_rows = 0;
        for _ in 0..runs {
            let s = Instant::now();
            let r = rt.block_on(service.sql(sql))?;
            times.push(s.elapsed());
            out_rows = r.batches.iter().map(|b| b.num_rows()).sum::<usize>();
        }
        Ok((median(times).as_secs_f64() * 1e3, out_rows))
    };
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
    let ratio = |a: f64, b: Option<f64>| b.map(|b| format!("{:.2}", a / b)).unwrap_or_else(|| "n/a".into());
    let only: Option<Vec<String>> =
        std::env::var("TSBS_ONLY").ok().map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let mut mismatches = Vec::new();
    for (name, template) in QUERIES.into_iter().filter(|(n, _)| wanted(n)) {
        let (f, rows) = run_ferrite(&sql_for(template, false, end))?;
        let d = peers.get(&format!("duckdb:{name}")).copied();
        let p = peers.get(&format!("polars:{name}")).copied();
        let peer_rows = ["duckdb", "polars"].map(|e| peers.get(&format!("{e}_rows:{name}")).map(|r| *r as usize));
        for r in peer_rows.into_iter().flatten() {
            if r != rows {
                mismatches.push(format!("{name}: ferrite {rows} rows, a peer {r}"));
            }
        }
        println!(
            "tsbs_query query={name} rows={rows} ferrite_ms={f:.1} duckdb_ms={} polars_ms={} ferrite/duckdb={} ferrite/polars={}",
            fmt(d),
            fmt(p),
            ratio(f, d),
            ratio(f, p)
        );
    }
    for (name, template) in CACHED.into_iter().filter(|(n, _)| wanted(n)) {
        let (f, rows) = run_ferrite(&sql_for(template, false, end))?;
        let d = peers.get(&format!("duckdb:{name}")).copied();
        let p = peers.get(&format!("polars:{name}")).copied();
        println!(
            "tsbs_query query={name}(last_values) rows={rows} ferrite_ms={f:.2} duckdb_ms={} polars_ms={} ferrite/duckdb={} ferrite/polars={}",
            fmt(d),
            fmt(p),
            ratio(f, d),
            ratio(f, p)
        );
    }
    for m in &mismatches {
        println!("MISMATCH {m}");
    }
    drop(service);
    drop(storage);
    // TSBS_KEEP=1 keeps the archive for a look at its files.
    if std::env::var_os("TSBS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("archive kept in {}", dir.display());
    }
    if mismatches.is_empty() { Ok(()) } else { Err("the engines disagree".into()) }
}

/// Median milliseconds and result rows per query (`duckdb:q`, `polars:q`, `duckdb_rows:q`...),
/// from `benches/tsbs_iot_peers.py` over the same files.
fn peer_timings(root: &Path, runs: usize, end: i64) -> Result<HashMap<String, f64>, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tsbs_iot_peers.py");
    let queries: serde_json::Map<String, serde_json::Value> =
        QUERIES.iter().map(|(n, t)| (n.to_string(), sql_for(t, true, end).into())).collect();
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(root)
        .args([runs.to_string(), end.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(serde_json::Value::Object(queries).to_string().as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (engine, name, ms, rows) = (it.next()?, it.next()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?);
            Some([(format!("{engine}:{name}"), ms), (format!("{engine}_rows:{name}"), rows)])
        })
        .flatten()
        .collect())
}

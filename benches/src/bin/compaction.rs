//! Compaction: what it does to the archive, and what it costs ingest.
//!
//! 1. A backlog: `hours` past event-time hours of TSBS-like readings (7 numeric fields, a
//!    fleet tag, a boolean, 100 trucks), each hour written by `files` persists of `rows`
//!    rows, the shape a server leaves behind at `persist_interval = 60s / (60 / files)`.
//! 2. Compaction alone over that backlog: files and bytes per numeric value before and after,
//!    and how long it took at the default CPU share (0.5 of a core).
//! 3. HTTP line-protocol ingest of live readings (4 clients, batches of 1,000) for `seconds`,
//!    on a fresh copy of the backlog, with compaction off and then on (merging the backlog
//!    while the load runs), alternated `runs` times; events/s and the ratio of medians.
//!
//! `cargo run --release -p ferrite-benches --bin compaction -- [hours] [files] [rows] [seconds] [runs]`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_benches::load::{accepted, http_load};
use ferrite_benches::server::{Ferrite, poll_until};
use ferrite_benches::{line_protocol, readings};

const NUMERIC_FIELDS: u64 = 7;
const HOUR_MS: i64 = 3_600_000;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// `(files, bytes, archived rows)` of stream `readings`.
fn archive(server: &Ferrite) -> Result<(u64, u64, u64), String> {
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let text = agent
        .get(&format!("http://{}/api/v1/streams", server.http))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let s = v["streams"].as_array().into_iter().flatten().find(|s| s["name"] == "readings");
    Ok(s.map_or((0, 0, 0), |s| {
        (
            s["archive"]["files"].as_u64().unwrap_or(0),
            s["archive"]["bytes"].as_u64().unwrap_or(0),
            s["rows"]["archived"].as_u64().unwrap_or(0),
        )
    }))
}

/// Waits until `cond` holds on the archive, or fails after `limit`.
fn wait(server: &Ferrite, what: &str, limit: Duration, cond: impl Fn((u64, u64, u64)) -> bool) -> Result<(), String> {
    poll_until(what, limit, || Ok(cond(archive(server)?)))
}

/// Line protocol of `rows` readings spread over part `k` of `files` of the hour starting at `start_ms`.
fn hour_part(start_ms: i64, k: usize, files: usize, rows: usize) -> String {
    let mut rs = readings(rows, 100);
    let step = HOUR_MS / (files * rows) as i64;
    for (i, r) in rs.iter_mut().enumerate() {
        r.ts = start_ms + ((k * rows + i) as i64) * step.max(1);
    }
    line_protocol(&rs)
}

fn build_backlog(dir: &Path, hours: usize, files: usize, rows: usize) -> Result<u64, String> {
    let server =
        Ferrite::start(dir, &["--persist-interval", "50ms", "--compaction", "false", "--max-payload", "64MiB"])?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?;
    let first_hour = (now_ms.as_millis() as i64 / HOUR_MS - 2 - hours as i64) * HOUR_MS;
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let url = format!("http://{}/api/v2/write?precision=ns", server.http);
    let mut total = 0u64;
    for h in 0..hours {
        for k in 0..files {
            let body = hour_part(first_hour + h as i64 * HOUR_MS, k, files, rows);
            let status = agent.post(&url).send(body.as_bytes()).map_err(|e| e.to_string())?.status().as_u16();
            if status != 204 {
                return Err(format!("backlog write answered {status}"));
            }
            total += rows as u64;
            wait(&server, "a persist", Duration::from_secs(60), |(_, _, archived)| archived == total)?;
        }
    }
    Ok(total)
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().map_err(|e| e.to_string())?;
    if status.success() { Ok(()) } else { Err(format!("cp -a {} {} failed", from.display(), to.display())) }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hours: usize = arg(&args, 0, 4);
    let files: usize = arg(&args, 1, 30);
    let rows: usize = arg(&args, 2, 20_000);
    let seconds: u64 = arg(&args, 3, 15);
    let runs: usize = arg(&args, 4, 2);
    let root: PathBuf = std::env::temp_dir().join(format!("ferrite-bench-compaction-{}", std::process::id()));
    let backlog = root.join("backlog");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let total = build_backlog(&backlog, hours, files, rows)?;
    let values = total * NUMERIC_FIELDS;

    // Compaction alone.
    let alone = root.join("alone");
    copy_dir(&backlog, &alone)?;
    let fast = ["--compact-after", "0s", "--compaction-interval", "1s", "--max-payload", "64MiB"];
    let server = Ferrite::start(&alone, &fast)?;
    let (files_before, bytes_before, _) = archive(&server)?;
    let started = Instant::now();
    wait(&server, "compaction of the backlog", Duration::from_secs(1800), |(f, _, _)| f == hours as u64)?;
    let took = started.elapsed().as_secs_f64();
    let (files_after, bytes_after, rows_after) = archive(&server)?;
    if rows_after != total {
        return Err(format!("compaction changed the row count: {total} before, {rows_after} after"));
    }
    println!(
        "compaction_files hours={hours} files_before={files_before} files_after={files_after} rows={total} \
         bytes_per_value_before={:.2} bytes_per_value_after={:.2} seconds={took:.1} rows_per_s={:.0}",
        bytes_before as f64 / values as f64,
        bytes_after as f64 / values as f64,
        total as f64 / took
    );
    drop(server);

    // Ingest with compaction off, then on, on fresh copies of the backlog.
    let mut live = readings(1000, 100);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?;
    for (i, r) in live.iter_mut().enumerate() {
        r.ts = now_ms.as_millis() as i64 + i as i64;
    }
    let body = Arc::new(line_protocol(&live).into_bytes());
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        for compaction in ["false", "true"] {
            let dir = root.join(format!("run-{run}-{compaction}"));
            copy_dir(&backlog, &dir)?;
            let mut flags = vec!["--persist-interval", "1s", "--compaction", compaction];
            flags.extend(fast);
            let server = Ferrite::start(&dir, &flags)?;
            let url = format!("http://{}/api/v2/write?precision=ns", server.http);
            let (events, elapsed) = http_load(&url, "text/plain", body.clone(), 4, seconds, None, accepted);
            let merged = server.metric("ferrite_compacted_files_total");
            let rate = events as f64 / elapsed;
            println!(
                "compaction_ingest run={run} compaction={} events_per_s={rate:.0} files_merged_during_load={merged}",
                if compaction == "true" { "on" } else { "off" }
            );
            if compaction == "true" {
                on.push(rate)
            } else {
                off.push(rate)
            };
            drop(server);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let (off_m, on_m) = (median(&mut off), median(&mut on));
    println!(
        "compaction_summary scenario=http_ingest_line_protocol off_median={off_m:.0} on_median={on_m:.0} on/off={:.3}",
        on_m / off_m
    );
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

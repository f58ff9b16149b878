//! A soak: one release `ferrite serve` (identity off) under a steady HTTP load with a
//! windowed rule, persists and compactions running, sampled every few seconds for memory,
//! archive files and request latency. What it shows: resident memory flat after warm-up,
//! the file count bounded by compaction, p99 latency stable.
//!
//! Event time runs 60 times faster than the clock (a minute of the run is an hour of
//! data), so that hours complete and compaction merges them during the run, as it would
//! over days of real time. Events of 10,000 devices, posted as NDJSON in requests of 1,000
//! by `clients` threads, each paced to its share of `rate` (the pacing sleeps are the load's
//! schedule, not a synchronisation).
//!
//! `cargo run --release -p ferrite-benches --bin soak -- [minutes] [rate] [sample_secs] [csv]`
//! prints a `soak_sample` line per sample and a `soak` summary; `benches/soak.sh` runs it
//! and plots the CSV (`benches/soak_plot.py`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrite_benches::percentile;
use ferrite_benches::server::{Ferrite, memory_kib};
use parking_lot::Mutex;

const RULES: &str = "rule device_minutes {
    from telemetry[temperature is not null]
    window tumbling 1m by device_id
    select device_id, avg(temperature) as avg_temp, max(humidity) as max_hum, count(*) as n
    insert into device_minutes
}
";

/// Resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    memory_kib(pid, "VmRSS").map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// Parquet files under `dir`.
fn parquet_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if !path.ends_with("_retired") {
                n += parquet_files(&path);
            }
        } else if path.extension().is_some_and(|e| e == "parquet") {
            n += 1;
        }
    }
    n
}

/// The slope of `ys` over `xs` (least squares).
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (minutes, rate, sample_secs) = (num(0, 30.0), num(1, 100_000.0), num(2, 10.0));
    let csv_path = args.get(3).cloned().unwrap_or_else(|| "/tmp/ferrite-soak.csv".to_owned());
    let clients = 4usize;
    let dir = std::env::temp_dir().join(format!("ferrite-bench-soak-{}", std::process::id()));
    let rules_dir = dir.join("rules");
    std::fs::create_dir_all(&rules_dir).map_err(|e| e.to_string())?;
    std::fs::write(rules_dir.join("soak.rules"), RULES).map_err(|e| e.to_string())?;
    let rules_arg = rules_dir.display().to_string();
    let data = dir.join("data");
    let server = Ferrite::start(
        &data,
        &[
            "--rules-dir",
            &rules_arg,
            "--persist-interval",
            "5s",
            "--compact-after",
            "30s",
            "--compaction-interval",
            "10s",
        ],
    )?;
    let url = format!("http://{}/api/v1/streams/telemetry/events", server.http);
    let started = Instant::now();
    let t0_ms: i64 = 1_780_000_000_000;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let per_client = rate / clients as f64 / 1000.0; // requests a second per client
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, acked, latencies, url) = (stop.clone(), acked.clone(), latencies.clone(), url.clone());
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
                let mut body = String::with_capacity(100_000);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = started + Duration::from_secs_f64(sent as f64 / per_client);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // Event time: 60× the clock.
                    let ts = t0_ms + (started.elapsed().as_secs_f64() * 60_000.0) as i64;
                    body.clear();
                    for i in 0..1000u64 {
                        let n = sent * 1000 + i;
                        let device = (n * clients as u64 + c as u64) % 10_000;
                        let _ = writeln!(
                            body,
                            "{{\"device_id\":\"d{device}\",\"ts\":{},\"temperature\":{}.5,\"humidity\":{}}}",
                            ts + (i % 1000) as i64,
                            n % 40,
                            n % 100
                        );
                    }
                    let t = Instant::now();
                    let answer = agent.post(&url).header("Content-Type", "application/x-ndjson").send(body.as_bytes());
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    match answer {
                        Ok(r) if r.status() == 200 => {
                            acked.fetch_add(1000, Ordering::Relaxed);
                            latencies.lock().push(ms);
                        }
                        Ok(r) => eprintln!("soak: answered {}", r.status()),
                        Err(e) => eprintln!("soak: {e}"),
                    }
                    sent += 1;
                }
            })
        })
        .collect();

    let mut csv = std::fs::File::create(&csv_path).map_err(|e| e.to_string())?;
    writeln!(csv, "t_s,rss_mib,files,p50_ms,p99_ms,events_per_s").map_err(|e| e.to_string())?;
    let archive = data.join("archive");
    let (mut ts, mut rss, mut files, mut p99s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last_acked = 0u64;
    let end = started + Duration::from_secs_f64(minutes * 60.0);
    let mut next = started;
    while Instant::now() < end {
        next += Duration::from_secs_f64(sample_secs);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut lat = std::mem::take(&mut *latencies.lock());
        lat.sort_by(f64::total_cmp);
        let now_acked = acked.load(Ordering::Relaxed);
        let t = started.elapsed().as_secs_f64();
        let sample = (rss_mib(server.pid()), parquet_files(&archive), percentile(&lat, 0.5), percentile(&lat, 0.99));
        let eps = (now_acked - last_acked) as f64 / sample_secs;
        last_acked = now_acked;
        println!(
            "soak_sample t_s={t:.0} rss_mib={:.1} files={} p50_ms={:.1} p99_ms={:.1} events_per_s={eps:.0}",
            sample.0, sample.1, sample.2, sample.3
        );
        writeln!(csv, "{t:.0},{:.1},{},{:.2},{:.2},{eps:.0}", sample.0, sample.1, sample.2, sample.3)
            .map_err(|e| e.to_string())?;
        ts.push(t / 60.0);
        rss.push(sample.0);
        files.push(sample.1 as f64);
        p99s.push(sample.3);
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    // Warm-up: the first third. The trend of what follows is what a leak would show.
    let from = ts.len() / 3;
    let rss_slope = slope(&ts[from..], &rss[from..]);
    let mut p99_sorted = p99s[from..].to_vec();
    p99_sorted.sort_by(f64::total_cmp);
    println!(
        "soak minutes={minutes} rate={rate:.0} events={} rss_after_warmup_mib={:.0} rss_last_mib={:.0} \
         rss_max_mib={:.0} rss_slope_mib_per_min={rss_slope:.2} files_max={:.0} files_last={:.0} \
         p99_median_ms={:.1} p99_max_ms={:.1} derived_rows={}",
        acked.load(Ordering::Relaxed),
        rss.get(from).copied().unwrap_or(0.0),
        rss.last().copied().unwrap_or(0.0),
        rss.iter().copied().fold(0.0, f64::max),
        files.iter().copied().fold(0.0, f64::max),
        files.last().copied().unwrap_or(0.0),
        percentile(&p99_sorted, 0.5),
        p99_sorted.last().copied().unwrap_or(0.0),
        server.metric("ferrite_rule_events_out_total{rule=\"device_minutes\"}"),
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! TSBS IoT data loaded through InfluxDB 1.x's `POST /write`, into Ferrite and into
//! InfluxDB 1.x itself (Debian's `influxdb` package) in the same run: the same generated
//! lines, cut into the same batches, posted by the same loader (`workers` threads, as
//! `tsbs_load_influx --batch-size --workers`) to the same endpoint, each server alone on the
//! machine with the loader.
//!
//! Reported per server: rows/s (lines acknowledged by a 204, over the wall time of the whole
//! load), the server's CPU seconds per million rows (user + system from /proc), and a check
//! that every line was accepted (every answer 204; for Ferrite, also the rows SQL counts).
//!
//! Both acknowledge a write once it is durable: Ferrite after its write-ahead log's commit,
//! InfluxDB 1.x after its WAL's fsync (`wal-fsync-delay = "0s"`, the default). Ferrite runs
//! with identity off (InfluxDB's default has no authentication) and
//! `--device-tags name --default-device unnamed`, so that TSBS's lines, whose `name` tag TSBS
//! zeroes in some entries, are all accepted unchanged.
//!
//! `cargo run --release -p ferrite-benches --bin tsbs_write -- [trucks] [hours] [batch] [workers]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ferrite_benches::server::{Ferrite, cpu_us, free_port, poll_until};
use ferrite_benches::tsbs::{Generator, HOUR_NS, INTERVAL_NS};

/// A running `influxd`, killed on drop.
struct Influxd {
    child: std::process::Child,
    http: u16,
}

impl Drop for Influxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Influxd {
    fn start(dir: &std::path::Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let (http, rpc) = (free_port()?, free_port()?);
        let d = dir.display();
        let conf = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n\
             [meta]\n  dir = \"{d}/meta\"\n\
             [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  wal-fsync-delay = \"0s\"\n  query-log-enabled = false\n\
             [http]\n  enabled = true\n  bind-address = \"127.0.0.1:{http}\"\n  auth-enabled = false\n  log-enabled = false\n  max-body-size = 0\n\
             [monitor]\n  store-enabled = false\n\
             [continuous_queries]\n  enabled = false\n\
             [subscriber]\n  enabled = false\n"
        );
        let path = dir.join("influxdb.conf");
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let child = std::process::Command::new("influxd")
            .args(["run", "-config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start influxd (apt-get install influxdb): {e}"))?;
        let server = Self { child, http };
        let agent = agent();
        poll_until("influxd to answer /ping", std::time::Duration::from_secs(30), || {
            Ok(agent.get(&format!("http://127.0.0.1:{http}/ping")).call().is_ok_and(|r| r.status() == 204))
        })?;
        let resp = agent
            .post(&format!("http://127.0.0.1:{http}/query?q=CREATE%20DATABASE%20benchmark"))
            .send("")
            .map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("CREATE DATABASE: {}", resp.status()));
        }
        Ok(server)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().new_agent()
}

/// Posts every batch to `url` with `workers` threads; (rows acknowledged, seconds, refusals).
fn load(url: &str, batches: &Arc<Vec<(String, usize)>>, workers: usize) -> (usize, f64, Vec<String>) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let results: Vec<(usize, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (next, batches) = (next.clone(), batches.clone());
                s.spawn(move || {
                    let agent = agent();
                    let (mut rows, mut refused) = (0, Vec::new());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((body, lines)) = batches.get(i) else { break };
                        match agent.post(url).header("Content-Type", "text/plain").send(body.as_str()) {
                            Ok(r) if r.status() == 204 => rows += lines,
                            Ok(mut r) => refused.push(format!(
                                "{}: {}",
                                r.status(),
                                r.body_mut().read_to_string().unwrap_or_default().chars().take(300).collect::<String>()
                            )),
                            Err(e) => refused.push(e.to_string()),
                        }
                    }
                    (rows, refused)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let rows = results.iter().map(|(r, _)| r).sum();
    (rows, elapsed, results.into_iter().flat_map(|(_, e)| e).collect())
}

fn report(name: &str, lines: usize, rows: usize, secs: f64, cpu_us: u64, refused: &[String]) {
    println!(
        "tsbs_write server={name} lines={lines} rows_acked={rows} refused_batches={} seconds={secs:.2} \
         rows_per_s={:.0} server_cpu_s_per_million_rows={:.2}",
        refused.len(),
        rows as f64 / secs,
        cpu_us as f64 / 1e6 / (rows.max(1) as f64 / 1e6),
    );
    if let Some(first) = refused.first() {
        println!("tsbs_write server={name} first_refusal={first:?}");
    }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (trucks, hours, batch, workers) = (arg(0, 1000), arg(1, 3), arg(2, 10_000), arg(3, 2));

    // Generated before either load, as `tsbs_generate_data` writes a file first.
    let mut generator = Generator::new(trucks);
    let ticks = hours as i64 * HOUR_NS / INTERVAL_NS;
    let (mut batches, mut text, mut in_text, mut lines) = (Vec::new(), String::new(), 0, 0);
    for _ in 0..ticks {
        let n = generator.next_tick(&mut text);
        in_text += n;
        lines += n;
        if in_text >= batch {
            batches.push((std::mem::take(&mut text), in_text));
            in_text = 0;
        }
    }
    if in_text > 0 {
        batches.push((text, in_text));
    }
    let bytes: usize = batches.iter().map(|(b, _)| b.len()).sum();
    println!(
        "tsbs_write trucks={trucks} hours={hours} lines={lines} batches={} batch_lines={batch} workers={workers} MB={:.0}",
        batches.len(),
        bytes as f64 / 1e6
    );
    let batches = Arc::new(batches);
    let base = std::env::temp_dir().join(format!("ferrite-bench-tsbs-write-{}", std::process::id()));

    {
        let dir = base.join("ferrite");
        let max_payload = (batches.iter().map(|(b, _)| b.len()).max().unwrap_or(0) * 2).max(1 << 20).to_string();
        let server = Ferrite::start(
            &dir,
            &["--device-tags", "name", "--default-device", "unnamed", "--max-payload", &max_payload],
        )?;
        let before = cpu_us(server.pid())?;
        let url = format!("http://{}/write?db=benchmark", server.http);
        let (rows, secs, refused) = load(&url, &batches, workers);
        let cpu = cpu_us(server.pid())? - before;
        report("ferrite", lines, rows, secs, cpu, &refused);
        let sql = |q: &str| -> Result<i64, String> {
            let mut r = agent()
                .post(&format!("http://{}/api/v1/sql", server.http))
                .send(serde_json::json!({ "sql": q }).to_string())
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            v[0]["n"].as_i64().ok_or_else(|| format!("{q}: {v}"))
        };
        let stored = sql("SELECT count(*) AS n FROM readings")? + sql("SELECT count(*) AS n FROM diagnostics")?;
        println!("tsbs_write server=ferrite rows_in_sql={stored} every_line_accepted={}", stored as usize == lines);
    }
    let _ = std::fs::remove_dir_all(base.join("ferrite"));

    match Influxd::start(&base.join("influxdb")) {
        Ok(influxd) => {
            let pid = influxd.child.id();
            let before = cpu_us(pid)?;
            let url = format!("http://127.0.0.1:{}/write?db=benchmark", influxd.http);
            let (rows, secs, refused) = load(&url, &batches, workers);
            let cpu = cpu_us(pid)? - before;
            report("influxdb-1.6", lines, rows, secs, cpu, &refused);
        }
        Err(e) => println!("tsbs_write server=influxdb-1.6 skipped: {e}"),
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

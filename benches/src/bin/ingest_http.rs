//! End-to-end HTTP ingest: `threads` clients POST JSON arrays of 1,000 TSBS-like readings
//! (100 devices) to a release `ferrite serve` with the WAL on, for `seconds`; reports
//! events/s acknowledged, counting what the server says it accepted: `accepted` of each
//! JSON answer; for line protocol, all lines of a `204` (the server answers 204 only when
//! every line was written) and `accepted` of a partial answer.
//!
//! `cargo run --release -p ferrite-benches --bin ingest_http -- [threads] [seconds]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrite_benches::server::Ferrite;
use ferrite_benches::{json_array, line_protocol, readings};

/// Events the server says it accepted, from its answer; `None` for an answer that is not a
/// (possibly partial) success.
fn accepted(status: u16, body: &str) -> Option<u64> {
    let lines_in_request = 1000;
    match status {
        204 => Some(lines_in_request),
        200 | 400 => {
            let v: serde_json::Value = serde_json::from_str(body).ok()?;
            v.get("accepted").or_else(|| v.pointer("/error/details/accepted")).and_then(serde_json::Value::as_u64)
        }
        _ => None,
    }
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-http-{}", std::process::id()));
    let server = Ferrite::start(&dir, &[])?;
    let rs = readings(1000, 100);
    for (name, path, body) in [
        ("json", "/api/v1/streams/readings/events", json_array(&rs)),
        ("line_protocol", "/api/v2/write?precision=ns", line_protocol(&rs).into_bytes()),
    ] {
        let body = Arc::new(body);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let url = format!("http://{}{path}", server.http);
        let started = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (body, stop, done, url) = (body.clone(), stop.clone(), done.clone(), url.clone());
                std::thread::spawn(move || {
                    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
                    while !stop.load(Ordering::Relaxed) {
                        match agent.post(&url).header("Content-Type", "application/json").send(body.as_slice()) {
                            Ok(mut r) => {
                                let status = r.status().as_u16();
                                let text = r.body_mut().read_to_string().unwrap_or_default();
                                match accepted(status, &text) {
                                    Some(n) => {
                                        done.fetch_add(n, Ordering::Relaxed);
                                    }
                                    None => {
                                        eprintln!("request answered {status}: {text}");
                                        return;
                                    }
                                }
                            }
                            Err(e) => {
                                eprintln!("request failed: {e}");
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            let _ = h.join();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let events = done.load(Ordering::Relaxed);
        println!(
            "http_ingest format={name} threads={threads} batch=1000 events={events} seconds={elapsed:.2} events_per_s={:.0} MB_per_s={:.1}",
            events as f64 / elapsed,
            (events / 1000) as f64 * body.len() as f64 / elapsed / 1e6
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! What recording API usage costs small HTTP requests: `threads` clients POST one event per
//! request to two release `ferrite serve`, one with `api_usage` on (every request a row of
//! the `api_usage` stream) and one with it off, alternating `rounds` times for `seconds`
//! each; requests per second acknowledged, medians compared. One-event requests are the
//! worst case: the usage row doubles the rows written.
//!
//! `cargo run --release -p ferrite-benches --bin http_usage -- [threads] [seconds] [rounds]`

use std::sync::Arc;

use ferrite_benches::load::{accepted, http_load};
use ferrite_benches::median;
use ferrite_benches::server::Ferrite;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3).max(1);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-usage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let on = Ferrite::start(&dir.join("on"), &["--api-usage", "true"])?;
    let off = Ferrite::start(&dir.join("off"), &["--api-usage", "false"])?;
    let body = Arc::new(br#"{"device_id": "d-1", "temperature": 21.5, "humidity": 40}"#.to_vec());
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (server, out) in [(&off, &mut without), (&on, &mut with)] {
            let url = format!("http://{}/api/v1/streams/telemetry/events", server.http);
            let (events, elapsed) = http_load(&url, "application/json", body.clone(), threads, seconds, None, accepted);
            out.push(events as f64 / elapsed);
        }
    }
    drop((on, off));
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b) = (median(without.clone()), median(with.clone()));
    println!(
        "http_usage threads={threads} seconds={seconds} rounds={rounds} off_median={a:.0} on_median={b:.0} \
         cost_percent={:.1} off={without:.0?} on={with:.0?}",
        (1.0 - b / a) * 100.0
    );
    Ok(())
}

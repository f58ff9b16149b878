//! End-to-end HTTP ingest: `threads` clients POST JSON arrays of 1,000 TSBS-like readings
//! (100 devices) to a release `ferrite serve` with the WAL on, for `seconds`; reports
//! events/s acknowledged, counting what the server says it accepted: `accepted` of each
//! JSON answer; for line protocol, all lines of a `204` (the server answers 204 only when
//! every line was written) and `accepted` of a partial answer.
//!
//! `cargo run --release -p ferrite-benches --bin ingest_http -- [threads] [seconds] [formats]`
//! (`formats`: `json,line_protocol` by default, in that order on one server; name one to
//! measure it on a fresh server).

use std::sync::Arc;

use ferrite_benches::load::{accepted, http_load};
use ferrite_benches::server::Ferrite;
use ferrite_benches::{json_array, line_protocol, readings};

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let formats = args.next().unwrap_or_else(|| "json,line_protocol".to_owned());
    let dir = std::env::temp_dir().join(format!("ferrite-bench-http-{}", std::process::id()));
    let server = Ferrite::start(&dir, &[])?;
    let rs = readings(1000, 100);
    for (name, path, body) in [
        ("json", "/api/v1/streams/readings/events", json_array(&rs)),
        ("line_protocol", "/api/v2/write?precision=ns", line_protocol(&rs).into_bytes()),
    ] {
        if !formats.split(',').any(|f| f == name) {
            continue;
        }
        let body = Arc::new(body);
        let url = format!("http://{}{path}", server.http);
        let (events, elapsed) = http_load(&url, "application/json", body.clone(), threads, seconds, None, accepted);
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

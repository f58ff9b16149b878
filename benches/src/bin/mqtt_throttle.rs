//! What the rate limiter costs MQTT QoS 1 ingest when it is on but never reached: the same
//! raw publishers as `mqtt_tls` against two release `ferrite serve`, one without limits and
//! one with a per-principal and a per-tenant publish limit far above the load (so every
//! socket read takes from two buckets and nothing waits). Runs alternate between the two
//! servers, `rounds` times; the medians are compared.
//!
//! `cargo run --release -p ferrite-benches --bin mqtt_throttle -- [publishers] [messages] [rounds]`

use ferrite_benches::load::run_qos1_publishers;
use ferrite_benches::median;
use ferrite_benches::server::Ferrite;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let publishers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let messages: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5).max(1);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-throttle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let open = Ferrite::start(&dir.join("open"), &[])?;
    let limited = Ferrite::start(
        &dir.join("limited"),
        &["--limit-mqtt-publish", "100000000/s", "--tenant-limit-mqtt-publish", "100000000/s"],
    )?;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        without.push(runtime.block_on(run_qos1_publishers(open.mqtt, None, publishers, messages, false))?);
        with.push(runtime.block_on(run_qos1_publishers(limited.mqtt, None, publishers, messages, false))?);
    }
    if limited.metric("ferrite_mqtt_throttled_reads_total") != 0 {
        return Err("the limited server paused reads: the limit was reached, not only checked".into());
    }
    drop((open, limited));
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b) = (median(without.clone()), median(with.clone()));
    println!(
        "mqtt_throttle publishers={publishers} messages={messages} rounds={rounds} no_limits_median={a:.0} \
         limits_on_median={b:.0} cost_percent={:.1} no_limits={without:.0?} limits_on={with:.0?}",
        (1.0 - b / a) * 100.0
    );
    Ok(())
}

//! The benchmarks' MQTT load generator on its own, against any broker: `publishers` rumqttc
//! clients each publish `messages` single-event JSON messages as fast as their inflight
//! window allows (anonymous), and the run is over at the last PUBACK (QoS 1). It is the
//! peer `benches/sim_capacity.sh` measures `ferrite-sim` against.
//!
//! `mqtt_load PORT PUBLISHERS MESSAGES` prints `{"publishers", "messages", "elapsed_s",
//! "msgs_per_s"}`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use ferrite_benches::load::publish_all;
use rumqttc::QoS;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (port, publishers, messages) = (num(0, 1883) as u16, num(1, 1000), num(2, 100));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let started = Instant::now();
    runtime.block_on(publish_all(port, publishers, messages, QoS::AtLeastOnce, Arc::new(AtomicU64::new(0)), &[]))?;
    let elapsed = started.elapsed().as_secs_f64();
    let total = (publishers * messages) as f64;
    println!(
        "{}",
        serde_json::json!({"publishers": publishers, "messages": total, "elapsed_s": elapsed, "msgs_per_s": (total / elapsed).round()})
    );
    Ok(())
}

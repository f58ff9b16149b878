//! MQTT 5 against MQTT 3.1.1: the same QoS 1 load in both versions, on Ferrite and on
//! mosquitto. `publishers` connections each publish `messages` single-event JSON messages
//! on `devices/{id}/telemetry` at QoS 1, at most 100 unacknowledged, timed to the last
//! PUBACK, with the raw client of `mqtt_tls` (rumqttc's v4 or v5 codec; the v5 PUBLISH
//! carries no properties). Rounds alternate 3.1.1 and 5; medians of `rounds`. As in
//! `mqtt_tls`, Ferrite's PUBACK means decoded and fsynced, mosquitto's routed to nobody:
//! compare each server's v5/v3.1.1 ratio, not the two servers' rates.
//!
//! `cargo run --release -p ferrite-benches --bin mqtt5 -- [publishers] [messages] [rounds]`

use std::net::SocketAddr;

use ferrite_benches::load::run_qos1_publishers as run;
use ferrite_benches::median;
use ferrite_benches::server::{Ferrite, Mosquitto, free_port};

/// Medians of (3.1.1, 5) messages per second over `rounds` alternating rounds.
fn compare(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    (publishers, messages, rounds): (usize, usize, usize),
) -> Result<(f64, f64), String> {
    let (mut v4, mut v5) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        v4.push(runtime.block_on(run(addr, None, publishers, messages, false))?);
        v5.push(runtime.block_on(run(addr, None, publishers, messages, true))?);
    }
    Ok((median(v4), median(v5)))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let publishers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let messages: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("ferrite-bench-mqtt5-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = Ferrite::start(&dir, &[])?;
    let ferrite = compare(&runtime, server.mqtt, (publishers, messages, rounds));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let (f4, f5) = ferrite?;

    let port = free_port()?;
    let conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n");
    let broker = Mosquitto::start(&std::env::temp_dir(), &conf, &[port])?;
    let mosquitto = compare(&runtime, SocketAddr::from(([127, 0, 0, 1], port)), (publishers, messages, rounds));
    drop(broker);
    let (m4, m5) = mosquitto?;
    println!(
        "mqtt5 rounds={rounds} ferrite_v311={f4:.0} ferrite_v5={f5:.0} ferrite_v5_ratio={:.2} mosquitto_v311={m4:.0} \
         mosquitto_v5={m5:.0} mosquitto_v5_ratio={:.2}",
        f5 / f4,
        m5 / m4
    );
    Ok(())
}

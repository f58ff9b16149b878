//! Memory per idle MQTT connection: `connections` clients CONNECT (MQTT 3.1.1, keep-alive
//! 600 s), subscribe to their own commands topic, and stay idle; the server's resident
//! memory (VmRSS from /proc) is read before the first connection and once every client has
//! its SUBACK. Ferrite (release `ferrite serve`, identity off) and mosquitto, the same
//! clients for both.
//!
//! `cargo run --release -p ferrite-benches --bin mqtt_idle -- [connections]` (the shell
//! needs `ulimit -n` above the count: each side holds one descriptor per connection).

use std::net::SocketAddr;
use std::time::Duration;

use ferrite_benches::load::subscribed_client;
use ferrite_benches::server::{Ferrite, Mosquitto, free_port, memory_kib};
use rumqttc::mqttbytes::QoS;

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    memory_kib(pid, "VmRSS")
}

/// Opens `n` idle clients against `addr` (100 handshakes at a time) and returns the server's
/// RSS growth per connection, in bytes, with the clients still open.
async fn measure(addr: SocketAddr, pid: u32, n: usize) -> Result<(u64, u64, f64), String> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let mut open = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let handshakes: Vec<_> = chunk
            .iter()
            .map(|&id| {
                tokio::spawn(subscribed_client(
                    addr,
                    format!("idle-{id}"),
                    format!("devices/idle-{id}/commands"),
                    QoS::AtLeastOnce,
                ))
            })
            .collect();
        for h in handshakes {
            open.push(h.await.map_err(|e| e.to_string())??);
        }
    }
    // Let the allocator settle, then read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    drop(open);
    Ok((before, after, per))
}

fn main() -> Result<(), String> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("ferrite-bench-idle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let limit = (n * 2).to_string();
    let server = Ferrite::start(&dir, &["--mqtt-max-connections-per-ip", &limit, "--mqtt-max-connections", &limit])?;
    let (f_before, f_after, f_per) = runtime.block_on(measure(server.mqtt, server.pid(), n))?;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    let port = free_port()?;
    let conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
    let broker = Mosquitto::start(&std::env::temp_dir(), &conf, &[port])?;
    let m = runtime.block_on(measure(SocketAddr::from(([127, 0, 0, 1], port)), broker.pid(), n));
    drop(broker);
    let (m_before, m_after, m_per) = m?;
    println!(
        "mqtt_idle connections={n} ferrite_rss_before_kib={f_before} ferrite_rss_after_kib={f_after} \
         ferrite_bytes_per_connection={f_per:.0} mosquitto_rss_before_kib={m_before} mosquitto_rss_after_kib={m_after} \
         mosquitto_bytes_per_connection={m_per:.0}"
    );
    Ok(())
}

//! MQTT QoS 1 ingest over TLS against plaintext, on Ferrite and on mosquitto, with the same
//! client code on all four: `publishers` concurrent connections each publish `messages`
//! single-event JSON messages on `devices/{id}/telemetry` at QoS 1, at most 100 in flight
//! per connection, and the run is over at the last PUBACK.
//!
//! The client is a small MQTT 3.1.1 publisher on rumqttc's codec over tokio (and
//! tokio-rustls with ring for TLS 1.3, the server's certificate from `ferrite certs dev`),
//! so that both servers see exactly the same bytes. Ferrite's PUBACK means decoded and in
//! the fsynced WAL; mosquitto's means routed (to nobody): compare each server's TLS/plain
//! ratio, not Ferrite's rate with mosquitto's.
//!
//! `cargo run --release -p ferrite-benches --bin mqtt_tls -- [publishers] [messages]`

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use ferrite_benches::load::{client_config, run_qos1_publishers as run};
use ferrite_benches::server::{Ferrite, Mosquitto, ferrite_binary, free_port};

/// mosquitto with a plain and a TLS listener on the same certificate.
fn mosquitto(pki: &Path, plain: u16, tls: u16) -> Result<Mosquitto, String> {
    // mosquitto started as root drops to its own user: give it a readable copy of the
    // throwaway key.
    let key = pki.join("mosquitto-server.key");
    std::fs::copy(pki.join("server.key"), &key).map_err(|e| e.to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())?;
        std::fs::set_permissions(pki, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    }
    let conf = format!(
        "per_listener_settings false\nallow_anonymous true\nmax_inflight_messages 0\n\
         listener {plain} 127.0.0.1\n\
         listener {tls} 127.0.0.1\ncertfile {d}/server.pem\nkeyfile {d}/mosquitto-server.key\n",
        d = pki.display()
    );
    Mosquitto::start(pki, &conf, &[plain, tls])
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let publishers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let messages: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("ferrite-bench-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = dir.join("pki");
    let out = Command::new(ferrite_binary())
        .args(["certs", "dev", "--out"])
        .arg(&pki)
        .output()
        .map_err(|e| format!("ferrite certs dev: {e}"))?;
    if !out.status.success() {
        return Err(format!("ferrite certs dev: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let tls = client_config(&pki.join("ca.pem"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;

    let (cert, key) = (pki.join("server.pem").display().to_string(), pki.join("server.key").display().to_string());
    let server = Ferrite::start(&dir.join("data"), &["--tls-cert", &cert, "--tls-key", &key])?;
    let mqtts = server.mqtts.ok_or("ferrite printed no mqtts address")?;
    // Plain first, then TLS, then plain again: the two plain runs bound the drift of the machine.
    let f_plain = runtime.block_on(run(server.mqtt, None, publishers, messages, false))?;
    let f_tls = runtime.block_on(run(mqtts, Some(tls.clone()), publishers, messages, false))?;
    let f_plain2 = runtime.block_on(run(server.mqtt, None, publishers, messages, false))?;
    drop(server);

    let (plain, tls_port) = (free_port()?, free_port()?);
    let broker = mosquitto(&pki, plain, tls_port)?;
    let m_plain =
        runtime.block_on(run(SocketAddr::from(([127, 0, 0, 1], plain)), None, publishers, messages, false))?;
    let m_tls =
        runtime.block_on(run(SocketAddr::from(([127, 0, 0, 1], tls_port)), Some(tls), publishers, messages, false))?;
    let m_plain2 =
        runtime.block_on(run(SocketAddr::from(([127, 0, 0, 1], plain)), None, publishers, messages, false))?;
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);

    let f_ratio = f_tls / ((f_plain + f_plain2) / 2.0);
    let m_ratio = m_tls / ((m_plain + m_plain2) / 2.0);
    println!(
        "mqtt_tls publishers={publishers} messages={messages} ferrite_plain={f_plain:.0} ferrite_tls={f_tls:.0} \
         ferrite_plain_again={f_plain2:.0} ferrite_tls_ratio={f_ratio:.2} mosquitto_plain={m_plain:.0} \
         mosquitto_tls={m_tls:.0} mosquitto_plain_again={m_plain2:.0} mosquitto_tls_ratio={m_ratio:.2}"
    );
    Ok(())
}

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
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferrite_benches::load::mqtt_payload;
use ferrite_benches::server::{Ferrite, ferrite_binary};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;

/// Messages a publisher may have without a PUBACK.
const WINDOW: usize = 100;

/// One publisher: CONNECT, then `messages` QoS 1 PUBLISHes with at most [`WINDOW`] unacknowledged,
/// written in batches of whatever the window allows; returns at the last PUBACK.
async fn publish<S: AsyncRead + AsyncWrite + Unpin>(stream: S, id: usize, messages: usize) -> Result<(), String> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut connect = Connect::new(format!("tls-bench-{id}"));
    connect.keep_alive = 60;
    Packet::Connect(connect).write(&mut out, 1 << 20).map_err(|e| e.to_string())?;
    wr.write_all(&out).await.map_err(|e| e.to_string())?;
    wr.flush().await.map_err(|e| e.to_string())?;
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let connack = loop {
        match Packet::read(&mut inbuf, 1 << 20) {
            Ok(p) => break p,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        if rd.read_buf(&mut inbuf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before CONNACK".into());
        }
    };
    if !matches!(connack, Packet::ConnAck(ref c) if c.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success) {
        return Err(format!("refused: {connack:?}"));
    }
    let topic = format!("devices/tls-{id}/telemetry");
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < messages {
        if sent < messages && sent - acked < WINDOW {
            out.clear();
            while sent < messages && sent - acked < WINDOW {
                let mut p = Publish::new(&topic, QoS::AtLeastOnce, mqtt_payload(sent));
                p.pkid = (sent % 65_000 + 1) as u16;
                Packet::Publish(p).write(&mut out, 1 << 20).map_err(|e| e.to_string())?;
                sent += 1;
            }
            wr.write_all(&out).await.map_err(|e| e.to_string())?;
            wr.flush().await.map_err(|e| e.to_string())?;
        }
        if rd.read_buf(&mut inbuf).await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("closed after {acked} PUBACKs"));
        }
        loop {
            match Packet::read(&mut inbuf, 1 << 20) {
                Ok(Packet::PubAck(_)) => acked += 1,
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    let _ = wr.shutdown().await;
    Ok(())
}

/// Runs the load against `addr`, over TLS when `tls` is given; messages per second.
async fn run(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    publishers: usize,
    messages: usize,
) -> Result<f64, String> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..publishers {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            match tls {
                Some(config) => {
                    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
                    let s =
                        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
                    publish(s, id, messages).await
                }
                None => publish(tcp, id, messages).await,
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok((publishers * messages) as f64 / started.elapsed().as_secs_f64())
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn free_port() -> Result<u16, String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| e.to_string())?
        .local_addr()
        .map_err(|e| e.to_string())?
        .port())
}

/// mosquitto with a plain and a TLS listener on the same certificate; killed on drop.
struct Mosquitto(std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(pki: &Path, plain: u16, tls: u16) -> Result<Mosquitto, String> {
    let conf = pki.join("mosquitto.conf");
    let text = format!(
        "per_listener_settings false\nallow_anonymous true\nmax_inflight_messages 0\n\
         listener {plain} 127.0.0.1\n\
         listener {tls} 127.0.0.1\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
        d = pki.display()
    );
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start mosquitto (apt-get install mosquitto): {e}"))?;
    let broker = Mosquitto(child);
    for port in [plain, tls] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("mosquitto did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(broker)
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
    let f_plain = runtime.block_on(run(server.mqtt, None, publishers, messages))?;
    let f_tls = runtime.block_on(run(mqtts, Some(tls.clone()), publishers, messages))?;
    let f_plain2 = runtime.block_on(run(server.mqtt, None, publishers, messages))?;
    drop(server);

    let (plain, tls_port) = (free_port()?, free_port()?);
    let broker = mosquitto(&pki, plain, tls_port)?;
    let m_plain = runtime.block_on(run(SocketAddr::from(([127, 0, 0, 1], plain)), None, publishers, messages))?;
    let m_tls = runtime.block_on(run(SocketAddr::from(([127, 0, 0, 1], tls_port)), Some(tls), publishers, messages))?;
    let m_plain2 = runtime.block_on(run(SocketAddr::from(([127, 0, 0, 1], plain)), None, publishers, messages))?;
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

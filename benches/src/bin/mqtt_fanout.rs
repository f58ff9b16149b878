//! Fan-out: one publisher's messages to `subscribers` clients subscribed to the same topic,
//! on Ferrite and on mosquitto, with the same clients for both. The publisher sends
//! `messages` PUBLISHes of 64 bytes on `fanout/alerts` (QoS 0 or QoS 1, the subscriptions
//! at the same QoS), either back to back (`burst`: one read holds many messages, so a
//! server that writes each subscriber's queued messages together gains most) or one every
//! 2 ms (`paced`: one message per write for both). The run is over when every subscriber
//! has read every message (and, at QoS 1, acknowledged each). Figures: deliveries per
//! second (subscribers × messages / elapsed, median of three runs) and the server's CPU
//! time per 1,000 deliveries (user + system from /proc, over the three runs): the paced
//! rate is set by the pace, its CPU figure is the comparison.
//!
//! Subscribers are raw MQTT 3.1.1 clients that scan frames without decoding payloads, all
//! on this process's tokio runtime, on the same two cores as the server: the client side's
//! cost is in both figures alike. Ferrite runs with identity off (the broker's routing
//! alone, as mosquitto's `allow_anonymous`); mosquitto with `max_queued_messages` and
//! `max_inflight_messages` raised so that neither server drops a QoS 1 message.
//!
//! `cargo run --release -p ferrite-benches --bin mqtt_fanout -- [subscribers] [messages]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use ferrite_benches::load::subscribed_client;
use ferrite_benches::median;
use ferrite_benches::server::{Ferrite, Mosquitto, cpu_us, free_port};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOPIC: &str = "fanout/alerts";

/// Reads until `expect` PUBLISHes have arrived, acknowledging QoS 1 ones; when it got the last.
async fn receive(mut s: TcpStream, expect: usize) -> Result<Instant, String> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut acks = Vec::with_capacity(1024);
    let mut got = 0;
    while got < expect {
        if s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("closed after {got} of {expect} messages"));
        }
        // Complete frames: the fixed header's type and QoS, the remaining length, and for a
        // QoS 1 PUBLISH the packet id after the topic.
        loop {
            let mut len = 0usize;
            let mut header = 0;
            for (i, b) in buf.iter().skip(1).take(4).enumerate() {
                len |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    header = i + 2;
                    break;
                }
            }
            if header == 0 || buf.len() < header + len {
                break;
            }
            let first = buf[0];
            if first >> 4 == 3 {
                got += 1;
                if (first >> 1) & 3 > 0 {
                    let topic_len = usize::from(u16::from_be_bytes([buf[header], buf[header + 1]]));
                    let at = header + 2 + topic_len;
                    acks.extend_from_slice(&[0x40, 2, buf[at], buf[at + 1]]);
                }
            }
            buf.advance(header + len);
        }
        if !acks.is_empty() {
            s.write_all(&acks).await.map_err(|e| e.to_string())?;
            acks.clear();
        }
    }
    Ok(Instant::now())
}

/// Reads packets until `done` says the count of PUBACKs (or the CONNACK) is reached.
async fn read_until(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    mut done: impl FnMut(&Packet) -> bool,
) -> Result<(), String> {
    loop {
        loop {
            match Packet::read(buf, 1 << 20) {
                Ok(p) if done(&p) => return Ok(()),
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the publisher's connection closed".into());
        }
    }
}

/// The publisher: CONNECT, then `messages` PUBLISHes written back to back or one per `pace`;
/// at QoS 1, waits for every PUBACK; then DISCONNECT (so the broker handles every message
/// before the close).
async fn publish(addr: SocketAddr, messages: usize, qos: QoS, pace: Option<Duration>) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let (mut out, mut buf) = (BytesMut::new(), BytesMut::new());
    Packet::Connect(Connect::new("fanout-publisher")).write(&mut out, 1 << 20).map_err(|e| e.to_string())?;
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    read_until(&mut s, &mut buf, |p| matches!(p, Packet::ConnAck(_))).await?;
    out.clear();
    for i in 0..messages {
        let mut p = Publish::new(TOPIC, qos, format!("{{\"alert\":\"hot\",\"n\":{i:>10},\"pad\":\"0123456789abc\"}}"));
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { (i % 65_000 + 1) as u16 };
        Packet::Publish(p).write(&mut out, 1 << 20).map_err(|e| e.to_string())?;
        if let Some(pace) = pace {
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
            tokio::time::sleep(pace).await;
        }
    }
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    if qos != QoS::AtMostOnce {
        let mut acked = 0;
        read_until(&mut s, &mut buf, |p| {
            acked += usize::from(matches!(p, Packet::PubAck(_)));
            acked == messages
        })
        .await?;
    }
    out.clear();
    Packet::Disconnect.write(&mut out, 1 << 20).map_err(|e| e.to_string())?;
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Three runs of one scenario: the median deliveries per second, and the server's CPU
/// microseconds per 1,000 deliveries over the three.
async fn scenario(
    addr: SocketAddr,
    pid: u32,
    (subscribers, messages): (usize, usize),
    qos: QoS,
    pace: Option<Duration>,
) -> Result<(f64, f64), String> {
    let mut rates = Vec::new();
    let before = cpu_us(pid)?;
    for _ in 0..3 {
        rates.push(run(addr, subscribers, messages, qos, pace).await?);
    }
    let cpu = (cpu_us(pid)? - before) as f64;
    Ok((median(rates), cpu * 1000.0 / (3 * subscribers * messages) as f64))
}

/// One run: deliveries per second.
async fn run(
    addr: SocketAddr,
    subscribers: usize,
    messages: usize,
    qos: QoS,
    pace: Option<Duration>,
) -> Result<f64, String> {
    let mut streams = Vec::with_capacity(subscribers);
    for chunk in (0..subscribers).collect::<Vec<_>>().chunks(100) {
        let handshakes: Vec<_> = chunk
            .iter()
            .map(|&i| tokio::spawn(subscribed_client(addr, format!("fanout-{i}"), TOPIC.to_owned(), qos)))
            .collect();
        for h in handshakes {
            streams.push(h.await.map_err(|e| e.to_string())??);
        }
    }
    let readers: Vec<_> = streams.into_iter().map(|s| tokio::spawn(receive(s, messages))).collect();
    let started = Instant::now();
    let publisher = tokio::spawn(publish(addr, messages, qos, pace));
    let mut last = started;
    for r in readers {
        let done = tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .map_err(|_| "a subscriber did not get every message within 120 s".to_owned())?
            .map_err(|e| e.to_string())??;
        last = last.max(done);
    }
    publisher.await.map_err(|e| e.to_string())??;
    Ok((subscribers * messages) as f64 / last.duration_since(started).as_secs_f64())
}

/// The scenarios: (name, QoS, pace).
const SCENARIOS: [(&str, QoS, Option<Duration>); 4] = [
    ("burst", QoS::AtMostOnce, None),
    ("burst", QoS::AtLeastOnce, None),
    ("paced", QoS::AtMostOnce, Some(Duration::from_millis(2))),
    ("paced", QoS::AtLeastOnce, Some(Duration::from_millis(2))),
];

/// Every scenario against one server.
fn all(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    pid: u32,
    load: (usize, usize),
) -> Result<Vec<(f64, f64)>, String> {
    SCENARIOS.iter().map(|&(_, qos, pace)| runtime.block_on(scenario(addr, pid, load, qos, pace))).collect()
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let subscribers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let messages: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("ferrite-bench-fanout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let limit = (subscribers * 2).to_string();
    let server = Ferrite::start(&dir, &["--mqtt-max-connections-per-ip", &limit, "--mqtt-max-connections", &limit])?;
    let ferrite = all(&runtime, server.mqtt, server.pid(), (subscribers, messages));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let ferrite = ferrite?;

    let port = free_port()?;
    let conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages {q}\nmax_inflight_messages 0\n",
        q = messages * 2
    );
    let broker = Mosquitto::start(&std::env::temp_dir(), &conf, &[port])?;
    let mosquitto = all(&runtime, SocketAddr::from(([127, 0, 0, 1], port)), broker.pid(), (subscribers, messages));
    drop(broker);
    let mosquitto = mosquitto?;
    for (i, (mode, qos, _)) in SCENARIOS.iter().enumerate() {
        let ((f_rate, f_cpu), (m_rate, m_cpu)) = (ferrite[i], mosquitto[i]);
        println!(
            "mqtt_fanout mode={mode} qos={} subscribers={subscribers} messages={messages} \
             ferrite_deliveries_per_s={f_rate:.0} mosquitto_deliveries_per_s={m_rate:.0} rate_ratio={:.2} \
             ferrite_cpu_us_per_1k={f_cpu:.0} mosquitto_cpu_us_per_1k={m_cpu:.0} cpu_ratio={:.2}",
            *qos as u8,
            f_rate / m_rate,
            m_cpu / f_cpu
        );
    }
    Ok(())
}

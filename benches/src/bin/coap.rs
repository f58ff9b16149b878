//! CoAP confirmable posts against MQTT QoS 1 publishes of the same events, on one release
//! `ferrite serve` (identity off, no CoAP rate limit: every client is on 127.0.0.1), in
//! alternating rounds.
//!
//! `clients` CoAP endpoints each send `messages` confirmable `POST /telemetry` requests of
//! one JSON event, one at a time (a CoAP client waits for a request's ACK before the next,
//! RFC 7252 §4.7 NSTART = 1), retransmitting after 2 s as RFC 7252 says. The MQTT peer:
//! `clients` connections each publish the same events at QoS 1 on
//! `devices/{id}/telemetry`, also one at a time (a window of 1). Both are answered once
//! the event is in the write-ahead log, so posts/s is end to end; the server's CPU time
//! per million events is reported beside.
//!
//! `cargo run --release -p ferrite-benches --bin coap -- [clients] [messages] [rounds]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferrite_benches::load::{mqtt_payload, publish_qos1_window};
use ferrite_benches::median;
use ferrite_benches::server::{Ferrite, cpu_us};

/// A confirmable `POST /telemetry?u={device}` of `body`, written from RFC 7252 §3.
fn post(mid: u16, device: &str, body: &[u8]) -> Vec<u8> {
    let query = format!("u={device}");
    let mut m = vec![0x42, 0x02];
    m.extend_from_slice(&mid.to_be_bytes());
    m.extend_from_slice(&mid.to_be_bytes());
    // Uri-Path (11) "telemetry", then Uri-Query (15, delta 4).
    m.push(0xb0 | 9);
    m.extend_from_slice(b"telemetry");
    m.push(0x40 | query.len() as u8);
    m.extend_from_slice(query.as_bytes());
    m.push(0xff);
    m.extend_from_slice(body);
    m
}

async fn coap_client(server: SocketAddr, id: usize, messages: usize) -> Result<(), String> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    let device = format!("coap-{id}");
    let mut buf = [0u8; 1500];
    for i in 0..messages {
        let mid = i as u16;
        let request = post(mid, &device, &mqtt_payload(i));
        let mut timeout = Duration::from_secs(2);
        loop {
            socket.send(&request).await.map_err(|e| e.to_string())?;
            match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
                Ok(Ok(n)) if n >= 4 && buf[2..4] == mid.to_be_bytes() => {
                    if buf[1] != 0x44 {
                        return Err(format!("answered {}.{:02}", buf[1] >> 5, buf[1] & 0x1f));
                    }
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) if timeout < Duration::from_secs(32) => timeout *= 2,
                Err(_) => return Err(format!("no answer to message {mid}")),
            }
        }
    }
    Ok(())
}

/// One round: events per second, and the server's CPU seconds per million events.
async fn round(server: &Ferrite, clients: usize, messages: usize, coap: bool) -> Result<(f64, f64), String> {
    let cpu = cpu_us(server.pid())?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..clients {
        if coap {
            let addr = server.coap.ok_or("no coap listener")?;
            tasks.push(tokio::spawn(coap_client(addr, id, messages)));
        } else {
            let addr = server.mqtt;
            tasks.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                let topic = format!("devices/mqtt-{id}/telemetry");
                publish_qos1_window(tcp, (id, 1), messages, false, |i| (topic.clone(), mqtt_payload(i))).await
            }));
        }
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let events = (clients * messages) as f64;
    let cpu_s = (cpu_us(server.pid())? - cpu) as f64 / 1e6;
    Ok((events / started.elapsed().as_secs_f64(), cpu_s / events * 1e6))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (clients, messages, rounds) = (arg(0, 64), arg(1, 2000), arg(2, 3));
    let dir = std::env::temp_dir().join(format!("ferrite-bench-coap-{}", std::process::id()));
    let server = Ferrite::start(&dir, &["--coap-max-rate-per-ip", "0"])?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (mut coap, mut mqtt, mut coap_cpu, mut mqtt_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let (a, a_cpu) = rt.block_on(round(&server, clients, messages, true))?;
        let (b, b_cpu) = rt.block_on(round(&server, clients, messages, false))?;
        println!("coap_round round={r} coap_posts_per_s={a:.0} mqtt_qos1_per_s={b:.0}");
        coap.push(a);
        mqtt.push(b);
        coap_cpu.push(a_cpu);
        mqtt_cpu.push(b_cpu);
    }
    let (a, b) = (median(coap), median(mqtt));
    println!(
        "coap clients={clients} messages={messages} rounds={rounds} coap_posts_per_s={a:.0} mqtt_qos1_per_s={b:.0} \
         coap/mqtt={:.2} coap_cpu_s_per_m={:.1} mqtt_cpu_s_per_m={:.1} duplicates={}",
        a / b,
        median(coap_cpu),
        median(mqtt_cpu),
        server.metric("ferrite_coap_duplicates_total"),
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

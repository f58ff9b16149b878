//! Sparkplug B DATA messages into Arrow against JSON over MQTT, at the same number of
//! metrics, on one release `ferrite serve` (identity off), in alternating rounds.
//!
//! `publishers` edge nodes each publish `messages` QoS 1 messages of `metrics` float metrics
//! and a timestamp: Sparkplug NDATA by alias alone (after an NBIRTH that defines the
//! aliases, the first message of each), or JSON objects of the same fields on
//! `devices/{id}/telemetry`. A PUBACK comes once the rows are committed to the write-ahead
//! log, so messages/s is end to end. Payload bytes per message are reported beside.
//!
//! `cargo run --release -p ferrite-benches --bin sparkplug -- [publishers] [messages] [metrics] [rounds]`

use std::time::Instant;

use ferrite_benches::load::publish_qos1_with;
use ferrite_benches::median;
use ferrite_benches::server::Ferrite;
use ferrite_ingest::sparkplug::datatype;
use ferrite_ingest::sparkplug::proto::{Payload, payload::Metric, payload::metric::Value};
use prost::Message as _;

const T0: u64 = 1_764_000_000_000;

/// The NBIRTH of node `id`: `metrics` doubles named `m{k}` with alias `k`.
fn birth(metrics: usize) -> Vec<u8> {
    let mut ms: Vec<Metric> = (0..metrics)
        .map(|k| Metric {
            name: Some(format!("m{k}")),
            alias: Some(k as u64),
            datatype: Some(datatype::DOUBLE),
            value: Some(Value::DoubleValue(0.0)),
            ..Metric::default()
        })
        .collect();
    ms.push(Metric {
        name: Some("bdSeq".into()),
        datatype: Some(datatype::INT64),
        value: Some(Value::LongValue(0)),
        ..Metric::default()
    });
    Payload { timestamp: Some(T0), metrics: ms, seq: Some(0), uuid: None, body: None }.encode_to_vec()
}

/// The i-th NDATA: every metric by alias, values varying.
fn data(i: usize, metrics: usize) -> Vec<u8> {
    let ms = (0..metrics)
        .map(|k| Metric {
            alias: Some(k as u64),
            value: Some(Value::DoubleValue((i * 7 + k) as f64 * 0.5)),
            ..Metric::default()
        })
        .collect();
    Payload { timestamp: Some(T0 + i as u64), metrics: ms, seq: Some((i % 256) as u64), uuid: None, body: None }
        .encode_to_vec()
}

/// The i-th JSON message: the same values and timestamp.
fn json(i: usize, metrics: usize) -> Vec<u8> {
    let mut s = format!("{{\"ts\":{}", T0 + i as u64);
    for k in 0..metrics {
        s.push_str(&format!(",\"m{k}\":{}", (i * 7 + k) as f64 * 0.5));
    }
    s.push('}');
    s.into_bytes()
}

async fn round(
    addr: std::net::SocketAddr,
    publishers: usize,
    messages: usize,
    metrics: usize,
    sparkplug: bool,
) -> Result<f64, String> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..publishers {
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            if sparkplug {
                let (b, d) = (format!("spBv1.0/bench/NBIRTH/edge{id}"), format!("spBv1.0/bench/NDATA/edge{id}"));
                publish_qos1_with(tcp, id, messages, false, |i| {
                    if i == 0 { (b.clone(), birth(metrics)) } else { (d.clone(), data(i, metrics)) }
                })
                .await
            } else {
                let t = format!("devices/edge{id}/telemetry");
                publish_qos1_with(tcp, id, messages, false, |i| (t.clone(), json(i, metrics))).await
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok((publishers * messages) as f64 / started.elapsed().as_secs_f64())
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (publishers, messages, metrics, rounds) = (arg(0, 50), arg(1, 2000), arg(2, 10), arg(3, 3));
    let dir = std::env::temp_dir().join(format!("ferrite-bench-sparkplug-{}", std::process::id()));
    let server = Ferrite::start(&dir, &[])?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (mut sp, mut js) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let a = rt.block_on(round(server.mqtt, publishers, messages, metrics, true))?;
        let b = rt.block_on(round(server.mqtt, publishers, messages, metrics, false))?;
        println!("sparkplug_round round={r} sparkplug_msgs_per_s={a:.0} json_msgs_per_s={b:.0}");
        sp.push(a);
        js.push(b);
    }
    let (a, b) = (median(sp), median(js));
    println!(
        "sparkplug publishers={publishers} messages={messages} metrics={metrics} rounds={rounds} \
         sparkplug_msgs_per_s={a:.0} json_msgs_per_s={b:.0} sparkplug/json={:.2} \
         sparkplug_metrics_per_s={:.0} sparkplug_bytes={} json_bytes={}",
        a / b,
        a * metrics as f64,
        data(1000, metrics).len(),
        json(1000, metrics).len()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

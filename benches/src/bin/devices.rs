//! The device registry's figures, against a release `ferrite serve` with identity on:
//!
//! - `provision`: `devices` devices registered through `POST /api/v1/devices/import` in
//!   requests of 10,000 (each gets a client id and secret from the identity store, in one
//!   transaction per request, and a registry row): devices per second.
//! - `disable_to_disconnect`: `sessions` devices connect over MQTT, then each is disabled
//!   through the API; the time from sending the request to the device's client seeing its
//!   connection end (median and maximum).
//! - `commands`: `connected` registered devices connect over MQTT and subscribe to their
//!   commands; each answers every command it receives (`succeeded`) on its result topic.
//!   `threads` clients send one command to every device through `POST
//!   /api/v1/devices/{id}/commands`; the figure is commands per second from the first POST
//!   to the last answer recorded (every command checked against its type, stored, sent at
//!   QoS 1, acknowledged by the device, answered, each step written to the `commands`
//!   stream).
//! - `lookup` (in process): `Registry::lookup` (what the publish path asks) and
//!   `Registry::touch` (last seen, once per device run of a committed batch) over a registry
//!   of `devices` devices: operations per second on one core.
//!
//! No peer registry runs on this machine (ThingsBoard needs a JVM and a database server);
//! the figures stand alone.
//!
//! `cargo run --release -p ferrite-benches --bin devices -- [devices] [sessions] [runs] [connected] [threads]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_benches::load::mqtt_options;
use ferrite_benches::median;
use ferrite_benches::server::{Ferrite, poll_until};
use ferrite_device::model::DeviceInput;
use ferrite_device::registry::Registry;
use ferrite_engine::Metrics;
use ferrite_engine::plugin::{EventWriter, NoCredentials, PresenceObserver, TopicPublisher, WriteFuture};
use rumqttc::{AsyncClient, Event, Packet};

/// Registers `n` devices in requests of 10,000; seconds taken.
fn provision(server: &Ferrite, prefix: &str, n: usize) -> Result<f64, String> {
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let rows: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| serde_json::json!({"id": format!("{prefix}-{i:06}"), "type": "sensor", "groups": ["fleet"]}))
            .collect();
        let report = server.admin_post(
            "/api/v1/devices/import",
            "application/json",
            serde_json::Value::Array(rows).to_string().as_bytes(),
        )?;
        if report["created"].as_u64() != Some(chunk.len() as u64) {
            return Err(format!("import refused rows: {}", report["failed"]));
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Connects `n` registered devices, disables each, and times its disconnect (ms).
fn disable_to_disconnect(server: &Ferrite, n: usize) -> Result<Vec<f64>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("kick-{i}");
        let added = server.admin_post(
            "/api/v1/devices",
            "application/json",
            serde_json::json!({"id": id}).to_string().as_bytes(),
        )?;
        let secret = added["credentials"]["client_secret"].as_str().ok_or("no secret")?.to_owned();
        let elapsed = rt.block_on(async {
            let mut o = mqtt_options(id.clone(), server.mqtt.port());
            o.set_credentials(&id, &secret);
            let (_client, mut ev): (AsyncClient, _) = AsyncClient::new(o, 10);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                    Ok(_) => {}
                    Err(e) => return Err(format!("connect {id}: {e}")),
                }
            }
            let path = format!("/api/v1/devices/{id}/disable");
            let started = Instant::now();
            let admin = server.admin();
            let disable = tokio::task::spawn_blocking(move || admin.post(&path, "application/json", b"{}"));
            let ended = tokio::time::timeout(Duration::from_secs(5), async { while ev.poll().await.is_ok() {} }).await;
            let took = started.elapsed().as_secs_f64() * 1000.0;
            disable.await.map_err(|e| e.to_string())??;
            ended.map_err(|_| format!("{id} still connected 5 s after the disable"))?;
            Ok(took)
        })?;
        out.push(elapsed);
    }
    Ok(out)
}

/// Connects `n` devices (registered now), has each answer its commands, sends one command
/// to every device from `threads` clients; commands per second, first POST to last answer.
fn commands(server: &Ferrite, n: usize, threads: usize) -> Result<f64, String> {
    let rows: Vec<serde_json::Value> = (0..n).map(|i| serde_json::json!({"id": format!("act-{i:05}")})).collect();
    let mut secrets = Vec::with_capacity(n);
    for chunk in rows.chunks(10_000) {
        let report = server.admin_post(
            "/api/v1/devices/import",
            "application/json",
            serde_json::Value::Array(chunk.to_vec()).to_string().as_bytes(),
        )?;
        for c in report["credentials"].as_array().ok_or("no credentials")? {
            secrets.push((
                c["client_id"].as_str().unwrap_or("").to_owned(),
                c["client_secret"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let port = server.mqtt.port();
    // Every device: connect, subscribe, answer each command; ready once subscribed.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let mut tasks = Vec::with_capacity(n);
    for (id, secret) in secrets {
        let ready = ready_tx.clone();
        tasks.push(rt.spawn(async move {
            let mut o = mqtt_options(id.clone(), port);
            o.set_credentials(&id, &secret);
            let (client, mut ev) = AsyncClient::new(o, 100);
            let topic = format!("devices/{id}/commands/result");
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(format!("devices/{id}/commands"), rumqttc::QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready.send(()).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let cmd: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        let answer = serde_json::json!({"id": cmd["id"], "status": "succeeded", "result": {}});
                        let _ = client.publish(&topic, rumqttc::QoS::AtMostOnce, false, answer.to_string()).await;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    drop(ready_tx);
    rt.block_on(async {
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(120), ready_rx.recv())
                .await
                .map_err(|_| "devices did not all subscribe")?;
        }
        Ok::<_, String>(())
    })?;
    let before = server.metric("ferrite_commands_total{status=\"succeeded\"}");
    let started = Instant::now();
    let admin = server.admin();
    std::thread::scope(|s| {
        for t in 0..threads {
            let admin = admin.clone();
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let body = br#"{"name": "locate"}"#;
                    if let Err(e) =
                        admin.post(&format!("/api/v1/devices/act-{i:05}/commands"), "application/json", body)
                    {
                        eprintln!("command to act-{i:05}: {e}");
                    }
                }
            });
        }
    });
    poll_until("every command to be answered", Duration::from_secs(300), || {
        Ok(server.metric("ferrite_commands_total{status=\"succeeded\"}") >= before + n as u64)
    })?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(rate)
}

struct Nowhere;

impl TopicPublisher for Nowhere {
    fn publish(&self, _: &str, _: &[u8], _: bool) -> Result<usize, String> {
        Ok(0)
    }
    fn disconnect(&self, _: &str) -> usize {
        0
    }
    fn observe_presence(&self, _: Arc<dyn PresenceObserver>) {}
    fn deliver(&self, device: &str, _: &str, _: &[u8]) -> Result<ferrite_engine::plugin::Delivery, String> {
        Err(format!("{device} is not connected"))
    }
    fn subscribe_internal(&self, _: &str, _: ferrite_engine::plugin::MessageHandler) {}
}

impl EventWriter for Nowhere {
    fn write(&self, _: &str, _: &str, _: Vec<u8>) -> WriteFuture {
        Box::pin(async { Ok(()) })
    }
}

/// Lookups and touches per second over a registry of `n` devices.
fn lookups(n: usize) -> Result<(f64, f64), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("ferrite-devices-bench-{}", std::process::id()));
    let registry = rt.block_on(async {
        let store = ferrite_device::store::Store::open("", &dir).await.map_err(|e| e.to_string())?;
        let r = Registry::open(
            store,
            Arc::new(NoCredentials),
            Arc::new(Nowhere),
            Arc::new(Nowhere),
            Arc::new(ferrite_engine::plugin::NoDeviceData),
            Arc::new(Metrics::new()),
        )
        .await
        .map_err(|e| e.to_string())?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(ferrite_device::registry::MAX_IMPORT_ROWS) {
            let rows = chunk
                .iter()
                .map(|i| (i + 1, Ok(DeviceInput { id: Some(format!("d-{i:06}")), ..DeviceInput::default() })))
                .collect();
            r.import("default", rows).await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(r)
    })?;
    let ids: Vec<String> = (0..n).map(|i| format!("d-{:06}", (i * 7919) % n)).collect();
    let ops = 5_000_000usize;
    let started = Instant::now();
    let mut found = 0usize;
    for k in 0..ops {
        found += usize::from(registry.lookup(&ids[k % n]).is_some());
    }
    let lookup_rate = ops as f64 / started.elapsed().as_secs_f64();
    assert_eq!(found, ops);
    let started = Instant::now();
    for k in 0..ops {
        registry.touch("default", &ids[k % n], k as i64);
    }
    let touch_rate = ops as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    Ok((lookup_rate, touch_rate))
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut next = |d: usize| args.next().and_then(|a| a.parse().ok()).unwrap_or(d);
    let (devices, sessions, runs, connected, threads) = (next(100_000), next(20), next(3), next(10_000), next(4));
    let (mut rates, mut kicks, mut lookup, mut touch, mut cmds) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let dir = std::env::temp_dir().join(format!("ferrite-devices-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let server = Ferrite::start(&dir, &["--auth", "on", "--mqtt-max-connections-per-ip", "100000"])?;
        let secs = provision(&server, &format!("r{run}"), devices)?;
        rates.push(devices as f64 / secs);
        println!(
            "devices run={run} scenario=provision devices={devices} seconds={secs:.2} per_s={:.0}",
            devices as f64 / secs
        );
        let k = disable_to_disconnect(&server, sessions)?;
        println!(
            "devices run={run} scenario=disable_to_disconnect sessions={sessions} median_ms={:.1} max_ms={:.1}",
            median(k.clone()),
            k.iter().copied().fold(0.0, f64::max)
        );
        kicks.extend(k);
        let c = commands(&server, connected, threads)?;
        println!("devices run={run} scenario=commands connected={connected} threads={threads} per_s={c:.0}");
        cmds.push(c);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        let (l, t) = lookups(devices)?;
        println!("devices run={run} scenario=lookup devices={devices} lookups_per_s={l:.0} touches_per_s={t:.0}");
        lookup.push(l);
        touch.push(t);
    }
    println!(
        "devices_summary provision_per_s_median={:.0} disable_to_disconnect_median_ms={:.1} disable_to_disconnect_max_ms={:.1} commands_per_s_median={:.0} lookups_per_s_median={:.0} touches_per_s_median={:.0}",
        median(rates),
        median(kicks.clone()),
        kicks.iter().copied().fold(0.0, f64::max),
        median(cmds),
        median(lookup),
        median(touch)
    );
    Ok(())
}

//! The fleet: provisioning through the API, then one task per device with its own MQTT
//! connection (device id and client secret), its own offline buffer, its own schedule and
//! faults; shared counters for the live view and the summary.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrite_agent_core::payload::{FieldValue, Reading};
use ferrite_agent_core::topics;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::args::Args;
use crate::profile::Signals;

/// Counters of the whole fleet.
#[derive(Debug, Default)]
pub struct Counters {
    /// Readings published (back-fill included; malformed messages not).
    pub sent: AtomicU64,
    /// Readings whose message the server acknowledged.
    pub acknowledged: AtomicU64,
    /// Readings held in offline buffers now.
    pub buffered: AtomicU64,
    /// Readings dropped from full offline buffers.
    pub dropped: AtomicU64,
    /// Devices connected now.
    pub connected: AtomicU64,
    /// Most devices connected at once.
    pub connected_peak: AtomicU64,
    /// Connections made (reconnects included).
    pub connects: AtomicU64,
    /// Connections lost or cut.
    pub disconnects: AtomicU64,
    /// Malformed messages sent on purpose.
    pub malformed: AtomicU64,
    /// Readings taken.
    pub readings: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }

    /// A snapshot as JSON.
    pub fn json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "readings": g(&self.readings),
            "sent": g(&self.sent),
            "acknowledged": g(&self.acknowledged),
            "buffered": g(&self.buffered),
            "dropped": g(&self.dropped),
            "connected": g(&self.connected),
            "connected_peak": g(&self.connected_peak),
            "connects": g(&self.connects),
            "disconnects": g(&self.disconnects),
            "malformed": g(&self.malformed),
        })
    }
}

/// One device's identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its number (0-based).
    pub n: u64,
    /// Its id.
    pub id: String,
    /// Its MQTT password (the client secret; empty with identity off).
    pub secret: String,
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

/// Registers the fleet's devices (or takes new secrets for those that exist already).
pub fn provision(args: &Args) -> Result<Vec<Identity>, String> {
    if args.no_provision {
        let prefix = args.prefix();
        return Ok((1..=args.devices)
            .map(|n| Identity { n: n as u64 - 1, id: format!("{prefix}-{n:05}"), secret: String::new() })
            .collect());
    }
    let token = match std::fs::read_to_string(&args.token_file) {
        Ok(t) => t.trim().to_owned(),
        Err(e) => {
            return Err(format!(
                "--token-file {}: {e} (the server writes its admin token there when identity is on)",
                args.token_file
            ));
        }
    };
    let prefix = args.prefix();
    let ids: Vec<String> = (1..=args.devices).map(|n| format!("{prefix}-{n:05}")).collect();
    let agent = http_agent();
    let base = args.http.trim_end_matches('/');
    let auth = format!("Bearer {token}");
    let mut secrets: HashMap<String, String> = HashMap::new();
    let mut existing = Vec::new();
    for chunk in ids.chunks(5_000) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"id": id, "type": args.profile.as_str(), "groups": ["ferrite-sim"]}))
            .collect();
        let mut resp = agent
            .post(&format!("{base}/api/v1/devices/import"))
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(Value::Array(body).to_string())
            .map_err(|e| format!("{base}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().with_config().limit(64 << 20).read_to_string().map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("registering devices: HTTP {status}: {text}"));
        }
        let report: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        for c in report["credentials"].as_array().into_iter().flatten() {
            if let (Some(id), Some(s)) = (c["client_id"].as_str(), c["client_secret"].as_str()) {
                secrets.insert(id.to_owned(), s.to_owned());
            }
        }
        for f in report["failed"].as_array().into_iter().flatten() {
            let id = f["id"].as_str().unwrap_or_default().to_owned();
            if f["error"].as_str().is_some_and(|e| e.contains("exists")) {
                existing.push(id);
            } else {
                return Err(format!("registering {id}: {}", f["error"]));
            }
        }
    }
    // Devices of an earlier run: new secrets, in parallel.
    if !existing.is_empty() {
        let queue = Arc::new(std::sync::Mutex::new(existing));
        let found = Arc::new(std::sync::Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (queue, found, agent, auth, base) =
                    (queue.clone(), found.clone(), agent.clone(), auth.clone(), base.to_owned());
                std::thread::spawn(move || -> Result<(), String> {
                    loop {
                        let Some(id) = queue.lock().map_err(|e| e.to_string())?.pop() else { return Ok(()) };
                        let mut resp = agent
                            .post(&format!("{base}/api/v1/devices/{id}/rotate"))
                            .header("Authorization", &auth)
                            .send("")
                            .map_err(|e| e.to_string())?;
                        let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
                        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{id}: {e}: {text}"))?;
                        let secret = v["credentials"]["client_secret"].as_str().unwrap_or_default().to_owned();
                        found.lock().map_err(|e| e.to_string())?.push((id, secret));
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a provisioning thread panicked".to_owned())??;
        }
        secrets.extend(found.lock().map_err(|e| e.to_string())?.drain(..));
    }
    Ok(ids
        .into_iter()
        .enumerate()
        .map(|(n, id)| Identity { n: n as u64, secret: secrets.get(&id).cloned().unwrap_or_default(), id })
        .collect())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// What a device's connection task reports.
enum Net {
    Event(Event),
    Lost,
}

/// A message in flight: readings it carries (0 for a malformed one) and its payload, resent
/// after a lost connection.
struct InFlight {
    readings: u64,
    payload: Vec<u8>,
}

struct Device {
    ident: Identity,
    args: Arc<Args>,
    counters: Arc<Counters>,
    signals: Signals,
    skew_ms: i64,
    partitioned: bool,
    host: String,
    port: u16,
    topic: String,
    buffer: VecDeque<(u64, Vec<u8>)>,
    unassigned: VecDeque<InFlight>,
    in_flight: HashMap<u16, InFlight>,
    client: Option<AsyncClient>,
    poller: Option<tokio::task::JoinHandle<()>>,
    net_rx: mpsc::Receiver<(u64, Net)>,
    net_tx: mpsc::Sender<(u64, Net)>,
    generation: u64,
    connected: bool,
    seq: u64,
}

impl Device {
    fn connect(&mut self) {
        self.disconnect(false);
        let mut opts = MqttOptions::new(self.ident.id.clone(), self.host.clone(), self.port);
        opts.set_keep_alive(Duration::from_secs(60));
        if !self.ident.secret.is_empty() {
            opts.set_credentials(self.ident.id.clone(), self.ident.secret.clone());
        }
        opts.set_inflight(64);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        self.generation += 1;
        let (tx, generation) = (self.net_tx.clone(), self.generation);
        self.poller = Some(tokio::spawn(async move {
            let mut backoff = ferrite_agent_core::backoff::Backoff::new(500, 20_000);
            loop {
                match eventloop.poll().await {
                    Ok(e) => {
                        if matches!(e, Event::Incoming(Packet::ConnAck(_))) {
                            backoff.reset();
                        }
                        // Our DISCONNECT is written: the connection is over.
                        let closing = matches!(e, Event::Outgoing(Outgoing::Disconnect));
                        if tx.send((generation, Net::Event(e))).await.is_err() || closing {
                            return;
                        }
                    }
                    Err(_) => {
                        if tx.send((generation, Net::Lost)).await.is_err() {
                            return;
                        }
                        let d = backoff.next_delay(fastrand::u32(..));
                        tokio::time::sleep(Duration::from_millis(u64::from(d))).await;
                    }
                }
            }
        }));
        self.client = Some(client);
    }

    /// Drops the connection (abruptly: the server sees it lost); what was in flight goes
    /// back to the buffer.
    fn disconnect(&mut self, graceful: bool) {
        if let Some(p) = self.poller.take() {
            if graceful && let Some(c) = &self.client {
                let c = c.clone();
                // The poller ends once it has written the DISCONNECT; aborted if it has not
                // within 2 s.
                tokio::spawn(async move {
                    let mut p = p;
                    let _ = tokio::time::timeout(Duration::from_secs(2), c.disconnect()).await;
                    if tokio::time::timeout(Duration::from_secs(2), &mut p).await.is_err() {
                        p.abort();
                    }
                });
            } else {
                p.abort();
            }
        }
        self.client = None;
        self.lost();
    }

    fn lost(&mut self) {
        if self.connected {
            self.connected = false;
            Counters::sub(&self.counters.connected, 1);
            Counters::add(&self.counters.disconnects, 1);
        }
        let mut back: Vec<InFlight> = self.unassigned.drain(..).collect();
        let mut by_id: Vec<(u16, InFlight)> = self.in_flight.drain().collect();
        by_id.sort_by_key(|(k, _)| *k);
        back.extend(by_id.into_iter().map(|(_, f)| f));
        for f in back.into_iter().rev() {
            if f.readings > 0 {
                Counters::sub(&self.counters.sent, f.readings);
                Counters::add(&self.counters.buffered, f.readings);
                self.buffer.push_front((f.readings, f.payload));
            }
        }
    }

    fn on_net(&mut self, n: Net) {
        match n {
            Net::Event(Event::Incoming(Packet::ConnAck(a))) if a.code == rumqttc::ConnectReturnCode::Success => {
                if !self.connected {
                    self.connected = true;
                    Counters::add(&self.counters.connects, 1);
                    let now = self.counters.connected.fetch_add(1, Ordering::Relaxed) + 1;
                    self.counters.connected_peak.fetch_max(now, Ordering::Relaxed);
                }
                if let Some(c) = &self.client {
                    let _ = c.try_subscribe(topics::commands(&self.ident.id), QoS::AtLeastOnce);
                }
            }
            Net::Event(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                if let Some(f) = self.unassigned.pop_front() {
                    self.in_flight.insert(pkid, f);
                }
            }
            Net::Event(Event::Incoming(Packet::PubAck(a))) => {
                if let Some(f) = self.in_flight.remove(&a.pkid) {
                    Counters::add(&self.counters.acknowledged, f.readings);
                }
            }
            Net::Event(Event::Incoming(Packet::Publish(p))) => {
                // A command: answered at once, so that actuation tests see a device.
                if let Ok(cmd) = ferrite_agent_core::payload::decode_command(&p.payload)
                    && let Some(c) = &self.client
                {
                    let r = ferrite_agent_core::payload::CommandResult {
                        id: cmd.id,
                        status: ferrite_agent_core::payload::CommandStatus::Succeeded,
                        result: json!({"simulated": true}),
                    };
                    // At QoS 0: only telemetry takes packet ids, so they map to messages in order.
                    let _ = c.try_publish(topics::command_result(&self.ident.id), QoS::AtMostOnce, false, r.encode());
                }
            }
            Net::Event(_) => {}
            Net::Lost => self.lost(),
        }
    }

    fn reading(&mut self) -> Vec<u8> {
        self.seq += 1;
        Counters::add(&self.counters.readings, 1);
        let fields: Vec<(String, FieldValue)> = self.signals.sample();
        let r = Reading { ts_ms: now_ms() + self.skew_ms, seq: self.seq, fields };
        serde_json::to_vec(&r.to_json()).unwrap_or_default()
    }

    fn push(&mut self, readings: u64, payload: Vec<u8>) {
        Counters::add(&self.counters.buffered, readings);
        self.buffer.push_back((readings, payload));
        let mut held: u64 = self.buffer.iter().map(|(n, _)| *n).sum();
        while held > self.args.buffer as u64 {
            let Some((n, _)) = self.buffer.pop_front() else { break };
            held -= n;
            Counters::sub(&self.counters.buffered, n);
            Counters::add(&self.counters.dropped, n);
        }
    }

    /// Sends what the buffer holds, a few messages per turn.
    fn flush(&mut self, most: usize) {
        if !self.connected {
            return;
        }
        let Some(c) = self.client.clone() else { return };
        for _ in 0..most {
            if self.unassigned.len() + self.in_flight.len() >= 60 {
                return;
            }
            let Some((n, payload)) = self.buffer.pop_front() else { return };
            if c.try_publish(self.topic.clone(), QoS::AtLeastOnce, false, payload.clone()).is_err() {
                self.buffer.push_front((n, payload));
                return;
            }
            Counters::sub(&self.counters.buffered, n);
            if n == 0 {
                // A malformed message on purpose: the server rejects it and counts it.
                Counters::add(&self.counters.malformed, 1);
                self.unassigned.push_back(InFlight { readings: 0, payload: Vec::new() });
            } else {
                Counters::add(&self.counters.sent, n);
                self.unassigned.push_back(InFlight { readings: n, payload });
            }
        }
    }

    fn idle(&self) -> bool {
        self.buffer.is_empty() && self.unassigned.is_empty() && self.in_flight.is_empty()
    }
}

/// Runs one device until the run ends and its buffer drained (or the drain time is up).
async fn run_device(mut d: Device, start: Instant, end: Instant) {
    let a = d.args.clone();
    let period = Duration::from_secs_f64(1.0 / a.rate);
    let first = tokio::time::Instant::from_std(start) + period.mul_f64(fastrand::f64());
    let mut tick = tokio::time::interval_at(first, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut burst = a.burst.map(|b| tokio::time::interval_at(tokio::time::Instant::from_std(start) + b.every, b.every));
    let next_disconnect = |now: Instant| {
        a.disconnect_every.map(|m| now + Duration::from_secs_f64(-m.as_secs_f64() * (1.0 - fastrand::f64()).ln()))
    };
    let mut disconnect_at = next_disconnect(Instant::now());
    let partition = a.partition.filter(|_| d.partitioned).map(|p| (start + p.start, start + p.start + p.length));
    let deadline = end + a.drain;
    d.connect();
    loop {
        let now = Instant::now();
        let producing = now < end;
        if !producing && (d.idle() || now > deadline) {
            break;
        }
        if let Some((from, to)) = partition {
            let inside = now >= from && now < to;
            if inside && d.client.is_some() {
                d.disconnect(false);
            } else if !inside && d.client.is_none() && now >= to {
                d.connect();
            }
        }
        if let Some(at) = disconnect_at
            && now >= at
            && producing
        {
            if d.client.is_some() {
                d.disconnect(false);
                d.connect();
            }
            disconnect_at = next_disconnect(now);
        }
        // The next moment something is due without a message: a partition's edge, a random
        // disconnect, the end of the run or of the drain.
        let mut due = if producing { end } else { deadline };
        if let Some((from, to)) = partition {
            for t in [from, to] {
                if t > now {
                    due = due.min(t);
                }
            }
        }
        if let Some(at) = disconnect_at {
            due = due.min(at.max(now));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => {}
            _ = tick.tick(), if producing => {
                if a.malformed > 0.0 && fastrand::f64() < a.malformed {
                    d.push(0, b"{\"temperature\": ".to_vec());
                } else {
                    let r = d.reading();
                    d.push(1, ferrite_agent_core::payload::join_objects([r.as_slice()]));
                }
                d.flush(4);
            }
            _ = async { if let Some(b) = burst.as_mut() { b.tick().await; } }, if producing && burst.is_some() => {
                let n = a.burst.map_or(0, |b| b.readings);
                let items: Vec<Vec<u8>> = (0..n).map(|_| d.reading()).collect();
                d.push(u64::from(n), ferrite_agent_core::payload::join_objects(items.iter().map(Vec::as_slice)));
                d.flush(8);
            }
            Some((g, n)) = d.net_rx.recv() => {
                if g == d.generation {
                    d.on_net(n);
                    // A connection or a freed slot of the window: send what waits (no timer
                    // per device: ten thousand of them would cost more than the sending).
                    if !d.buffer.is_empty() {
                        d.flush(8);
                    }
                }
            }
        }
    }
    // Readings never delivered stay counted as buffered in the summary.
    d.disconnect(true);
}

/// Runs the fleet; the summary.
pub async fn run(args: Args, identities: Vec<Identity>, counters: Arc<Counters>) -> Value {
    let args = Arc::new(args);
    let (host, port) = match args.mqtt.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().unwrap_or(1883)),
        None => (args.mqtt.clone(), 1883),
    };
    let stream = args.stream();
    // Devices connect at `--connect-rate` first; every device sends from `start` to `end`.
    let began = Instant::now();
    let ramp = Duration::from_secs_f64(identities.len() as f64 / f64::from(args.connect_rate));
    let start = began + ramp;
    let end = start + args.duration;
    let partitioned = args.partition.map_or(0, |p| (p.share * identities.len() as f64).round() as u64);
    let progress = {
        let (counters, every) = (counters.clone(), args.progress);
        tokio::spawn(async move {
            if every.is_zero() {
                return;
            }
            let mut t = tokio::time::interval(every);
            t.tick().await;
            loop {
                t.tick().await;
                let c = counters.json();
                eprintln!(
                    "ferrite-sim: t={:>4.0}s connected={} sent={} acknowledged={} buffered={} dropped={}",
                    began.elapsed().as_secs_f64(),
                    c["connected"],
                    c["sent"],
                    c["acknowledged"],
                    c["buffered"],
                    c["dropped"]
                );
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    // Spawned in slices every 10 ms (a timer per device would be coarser than the rate).
    let per_slice = (args.connect_rate as usize / 100).max(1);
    for (i, ident) in identities.into_iter().enumerate() {
        if i > 0 && i % per_slice == 0 {
            tokio::time::sleep_until(tokio::time::Instant::from_std(
                began + Duration::from_millis(10 * (i / per_slice) as u64),
            ))
            .await;
        }
        let (net_tx, net_rx) = mpsc::channel(256);
        let skew_ms = args.clock_skew.map_or(0, |s| {
            let ms = s.as_millis() as i64;
            fastrand::i64(-ms..=ms)
        });
        let d = Device {
            signals: Signals::new(args.profile, ident.n),
            partitioned: ident.n < partitioned,
            skew_ms,
            host: host.clone(),
            port,
            topic: topics::telemetry(&ident.id, Some(&stream)),
            ident,
            args: args.clone(),
            counters: counters.clone(),
            buffer: VecDeque::new(),
            unassigned: VecDeque::new(),
            in_flight: HashMap::new(),
            client: None,
            poller: None,
            net_rx,
            net_tx,
            generation: 0,
            connected: false,
            seq: 0,
        };
        tasks.spawn(run_device(d, start, end));
    }
    while tasks.join_next().await.is_some() {}
    progress.abort();
    let sending = args.duration.as_secs_f64().max(0.001);
    let mut summary = counters.json();
    let acked = summary["acknowledged"].as_u64().unwrap_or(0);
    summary["devices"] = json!(args.devices);
    summary["profile"] = json!(args.profile.as_str());
    summary["stream"] = json!(stream);
    summary["prefix"] = json!(args.prefix());
    summary["duration_secs"] = json!(args.duration.as_secs_f64());
    summary["elapsed_secs"] = json!((began.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    summary["connect_secs"] = json!((ramp.as_secs_f64() * 10.0).round() / 10.0);
    summary["acknowledged_per_sec"] = json!((acked as f64 / sending).round());
    summary
}

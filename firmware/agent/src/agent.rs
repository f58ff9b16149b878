//! The agent's main loop: readings into the spool, the spool to the platform over MQTT
//! (HTTP when MQTT has been down a while), commands and desired state from the platform,
//! tokens kept fresh.
//!
//! **Delivery.** Every reading is appended to the spool on disk first. While connected, new
//! readings also go out at once ("live"); everything the spool held when the connection
//! came up is the back-fill, sent from the oldest on, one message in flight, at most
//! `--backfill-rate` messages a second, beside the live ones. A record leaves the spool
//! once the platform acknowledged it (PUBACK at QoS 1, PUBREC at QoS 2, both sent by the
//! server after its write-ahead-log commit) and every record before it has left. With QoS
//! 2 the agent keeps a persistent session (`clean_session = 0`), so a message whose PUBREC
//! a cut connection lost is retransmitted with its packet id and the server takes it once.
//!
//! **Tokens.** The agent connects with its device id as user name and an access token as
//! password. At 80% of the token's life it fetches a new one, lets the messages in flight
//! be acknowledged, and reconnects with it; nothing is lost, since the spool holds every
//! reading until it is acknowledged.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use ferrite_agent_core::backoff::Backoff;
use ferrite_agent_core::command::{Commands, Decision};
use ferrite_agent_core::payload::{self, CommandResult, CommandStatus, FieldValue, Reading};
use ferrite_agent_core::token::TokenTimes;
use ferrite_agent_core::topics;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::http::Http;
use crate::ota::{Install, Installer, Slots};
use crate::sensor::Sensor;
use crate::spool::FileSpool;
use crate::state::{Credentials, Settings, StateDir};

/// Why the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A signal or `--readings` reached.
    Done,
    /// `wipe`: credentials, buffer and configuration erased.
    Wiped,
    /// `reboot`: the caller re-executes the program.
    Reboot,
}

/// The agent's failures at start.
pub type StartError = String;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Sequence numbers are reserved in blocks in `seq`, so a restart never reuses one.
const SEQ_BLOCK: u64 = 10_000;

/// Most telemetry messages in flight at once.
const MAX_IN_FLIGHT: usize = 16;

/// A telemetry message in flight and the spool records it carries.
#[derive(Debug, Clone)]
struct Batch {
    seqs: Vec<u64>,
    backfill: bool,
}

/// What a connection task reports, tagged with the connection's generation (a replaced
/// connection's last events must not touch the new one's state).
enum Net {
    Event(u64, Event),
    Error(u64, String),
}

/// What background work reports.
enum Work {
    Token(Result<crate::http::TokenAnswer, String>, bool),
    Answer(CommandResult, Option<After>),
    Publish(String, Vec<u8>),
    HttpSent(Result<Vec<u64>, String>),
    /// A rotated secret that works: kept from now on.
    Secret(String),
}

/// What to do once a command's answer is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Wipe,
    Reboot(u64),
    Reconnect,
    Installed,
}

struct Connection {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Sends DISCONNECT after whatever is queued and waits until the connection task has
    /// written it (the task ends then); a task that does not within 2 s is aborted.
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

/// The running agent.
pub struct Agent {
    cfg: Config,
    state: StateDir,
    creds: Credentials,
    settings: Settings,
    spool: FileSpool,
    next_seq: u64,
    seq_reserved: u64,
    commands: Commands,
    sensors: Vec<Box<dyn Sensor>>,
    http: Http,
    installer: Installer,
    token: Option<TokenTimes>,
    conn: Option<Connection>,
    generation: u64,
    net_rx: mpsc::Receiver<Net>,
    net_tx: mpsc::Sender<Net>,
    work_rx: mpsc::Receiver<Work>,
    work_tx: mpsc::Sender<Work>,
    connected: bool,
    down_since: Instant,
    live: VecDeque<(u64, Vec<u8>)>,
    unassigned: VecDeque<Batch>,
    in_flight: HashMap<u16, Batch>,
    sending: HashSet<u64>,
    acked: BTreeSet<u64>,
    split: u64,
    backfill_busy: bool,
    /// A fallback request is out (one at a time; its records are not sent again meanwhile,
    /// whatever the MQTT side does).
    http_busy: bool,
    /// The records of that request (MQTT's back-fill leaves them alone meanwhile).
    http_sending: HashSet<u64>,
    last_backfill: Instant,
    refreshing: bool,
    reconnect_when_drained: bool,
    readings: u64,
    counters: Counters,
    installing: bool,
    status_dirty: bool,
    /// Back-off of token requests the platform refuses.
    refused: Backoff,
    /// Gateway mode: where children connect.
    gateway_addr: Option<String>,
    /// Gateway mode: connected children and where their lines go.
    children: HashMap<String, mpsc::Sender<String>>,
    child_rx: mpsc::Receiver<crate::gateway::ChildEvent>,
    child_tx: mpsc::Sender<crate::gateway::ChildEvent>,
}

/// What the agent did, in `status.json` for operators and tests.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Counters {
    readings: u64,
    sent: u64,
    acknowledged: u64,
    connects: u64,
    token_refreshes: u64,
    dropped_reported: u64,
    backfilled: u64,
    http_sent: u64,
}

fn qos(n: u8) -> QoS {
    if n == 2 { QoS::ExactlyOnce } else { QoS::AtLeastOnce }
}

impl Agent {
    /// Opens the state directory and everything in it.
    pub fn open(cfg: Config) -> Result<Self, StartError> {
        let state = StateDir::open(&cfg.state_dir).map_err(|e| format!("{}: {e}", cfg.state_dir.display()))?;
        let mut creds = state.credentials().map_err(|e| format!("credentials.json: {e}"))?.unwrap_or_default();
        if let Some(id) = &cfg.device_id
            && *id != creds.device_id
        {
            creds = Credentials { device_id: id.clone(), ..Default::default() };
        }
        if creds.device_id.is_empty() {
            creds.device_id = uuid::Uuid::new_v4().to_string();
        }
        topics::validate_id(&creds.device_id).map_err(|e| format!("device id {:?}: {e:?}", creds.device_id))?;
        // The command line's secret is for the first start: afterwards the stored one wins
        // (a rotation replaces it there; a `reboot` re-executes with the first arguments).
        if let Some(s) = &cfg.client_secret
            && creds.client_secret.is_empty()
        {
            creds.client_secret = s.clone();
            creds.access_token.clear();
        }
        if creds.client_secret.is_empty()
            && let Some(p) = &cfg.provisioning_secret
        {
            creds.client_secret = self_register(&cfg, p, &creds.device_id)?;
            eprintln!("ferrite-agent: registered itself as {}; waiting for approval", creds.device_id);
        }
        if creds.client_secret.is_empty() {
            return Err(format!(
                "device {} has no client secret: register it (POST /api/v1/devices) and pass --client-secret once, \
                 or give a --provisioning-secret",
                creds.device_id
            ));
        }
        state.save_credentials(&creds).map_err(|e| format!("credentials.json: {e}"))?;
        let settings = state.settings();
        let spool = FileSpool::open(
            &state.path("spool"),
            cfg.spool_bytes,
            (cfg.spool_bytes / 16).clamp(4096, 1 << 20),
            cfg.sync,
        )
        .map_err(|e| format!("spool: {e}"))?;
        if spool.torn_on_open > 0 || spool.damaged_on_open > 0 {
            eprintln!(
                "ferrite-agent: spool: cut {} torn bytes and skipped {} damaged bytes; the other readings are kept",
                spool.torn_on_open, spool.damaged_on_open
            );
        }
        let next_seq = std::fs::read_to_string(state.path("seq")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1);
        let sensors = cfg.sensors.iter().map(|s| crate::sensor::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let http = Http::new(&cfg.http);
        let slots = Slots::open(&state.path("slots"), &cfg.version).map_err(|e| format!("slots: {e}"))?;
        let installer = Installer {
            http: http.clone(),
            key: cfg.ota_key,
            slots,
            downloads: state.path("downloads"),
            health_check: cfg.health_check.clone(),
        };
        let mut commands = Commands::new(cfg.level);
        commands.set_locked(settings.locked);
        let token = (!creds.access_token.is_empty() && creds.token_expires_ms > now_ms())
            .then_some(TokenTimes { issued_ms: creds.token_issued_ms, expires_ms: creds.token_expires_ms });
        let (net_tx, net_rx) = mpsc::channel(1024);
        let (work_tx, work_rx) = mpsc::channel(256);
        let (child_tx, child_rx) = mpsc::channel(1024);
        let mut agent = Self {
            state,
            creds,
            settings,
            spool,
            next_seq,
            seq_reserved: next_seq,
            commands,
            sensors,
            http,
            installer,
            token,
            conn: None,
            generation: 0,
            net_rx,
            net_tx,
            work_rx,
            work_tx,
            connected: false,
            down_since: Instant::now(),
            live: VecDeque::new(),
            unassigned: VecDeque::new(),
            in_flight: HashMap::new(),
            sending: HashSet::new(),
            acked: BTreeSet::new(),
            split: 0,
            backfill_busy: false,
            http_busy: false,
            http_sending: HashSet::new(),
            last_backfill: Instant::now(),
            refreshing: false,
            reconnect_when_drained: false,
            readings: 0,
            counters: Counters::default(),
            installing: false,
            status_dirty: true,
            refused: Backoff::new(1_000, 30_000),
            gateway_addr: None,
            children: HashMap::new(),
            child_rx,
            child_tx,
            cfg,
        };
        agent.apply_config();
        agent.reserve_seq().map_err(|e| format!("seq: {e}"))?;
        Ok(agent)
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.creds.device_id
    }

    fn reserve_seq(&mut self) -> std::io::Result<()> {
        if self.next_seq >= self.seq_reserved {
            self.seq_reserved = self.next_seq + SEQ_BLOCK;
            let tmp = self.state.path("seq.tmp");
            std::fs::write(&tmp, self.seq_reserved.to_string())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, self.state.path("seq"))?;
        }
        Ok(())
    }

    /// `set_config` and desired-state keys the agent understands, applied.
    fn apply_config(&mut self) {
        let c = &self.settings.config;
        if let Some(ms) = c.get("interval_ms").and_then(Value::as_u64).filter(|v| *v > 0) {
            self.cfg.interval = Duration::from_millis(ms);
        }
        if let Some(n) = c.get("batch").and_then(Value::as_u64).filter(|v| (1..=10_000).contains(v)) {
            self.cfg.batch = n as usize;
        }
        if let Some(n) = c.get("backfill_rate").and_then(Value::as_u64).filter(|v| *v > 0) {
            self.cfg.backfill_rate = n as u32;
        }
    }

    /// Runs until a signal, `wipe`, `reboot`, or `--readings`.
    pub async fn run(mut self) -> Exit {
        eprintln!("ferrite-agent: device {} (state in {})", self.creds.device_id, self.cfg.state_dir.display());
        let mut gateway = None;
        if let Some(addr) = self.cfg.gateway_listen.clone() {
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => {
                    let bound = l.local_addr().map_or(addr, |a| a.to_string());
                    eprintln!("ferrite-agent: gateway: children connect to {bound}");
                    self.gateway_addr = Some(bound);
                    gateway = Some(tokio::spawn(crate::gateway::serve(l, self.child_tx.clone())));
                }
                Err(e) => {
                    eprintln!("ferrite-agent: gateway: cannot listen on {addr}: {e}");
                    return Exit::Done;
                }
            }
        }
        self.request_token(false);
        let mut sample = tokio::time::interval(self.cfg.interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut interval = self.cfg.interval;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick = tokio::time::interval(Duration::from_millis(200));
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ferrite-agent: cannot watch SIGTERM: {e}");
                return Exit::Done;
            }
        };
        let exit = loop {
            if interval != self.cfg.interval {
                interval = self.cfg.interval;
                sample = tokio::time::interval(interval);
            }
            tokio::select! {
                _ = sample.tick() => {
                    if let Err(e) = self.sample() {
                        eprintln!("ferrite-agent: spool: {e}");
                    }
                    if self.cfg.readings.is_some_and(|n| self.readings >= n) && self.spool.pending() == 0 {
                        break Exit::Done;
                    }
                }
                Some(n) = self.net_rx.recv() => self.on_net(n),
                Some(c) = self.child_rx.recv() => self.on_child(c),
                Some(w) = self.work_rx.recv() => {
                    if let Some(exit) = self.on_work(w).await {
                        break exit;
                    }
                }
                _ = tick.tick() => self.maintain(),
                _ = status_tick.tick() => self.checkpoint(),
                _ = tokio::signal::ctrl_c() => break Exit::Done,
                _ = term.recv() => break Exit::Done,
            }
            self.pump();
        };
        if let Err(e) = self.spool.flush() {
            eprintln!("ferrite-agent: spool cursor: {e}");
        }
        self.write_status_now();
        if let Some(g) = gateway {
            g.abort();
        }
        if let Some(c) = self.conn.take() {
            c.close().await;
        }
        exit
    }

    /// Takes one reading of every sensor into the spool (and the live queue).
    fn sample(&mut self) -> std::io::Result<()> {
        if self.settings.locked {
            return Ok(());
        }
        if self.cfg.readings.is_some_and(|n| self.readings >= n) {
            return Ok(());
        }
        let now = now_ms();
        let mut fields = Vec::with_capacity(self.sensors.len());
        for s in &mut self.sensors {
            match s.read(now) {
                Ok(v) => fields.push((s.field().to_owned(), v)),
                Err(e) => eprintln!("ferrite-agent: sensor {}: {e}", s.field()),
            }
        }
        if fields.is_empty() {
            return Ok(());
        }
        self.readings += 1;
        self.counters.readings += 1;
        self.record(now, fields)
    }

    /// Appends a reading of the device to the spool, and to the live queue when connected.
    fn record(&mut self, ts_ms: i64, fields: Vec<(String, FieldValue)>) -> std::io::Result<()> {
        self.record_for(None, ts_ms, fields)
    }

    /// Appends a reading of the device or of a gateway's child.
    fn record_for(
        &mut self,
        child: Option<&str>,
        ts_ms: i64,
        fields: Vec<(String, FieldValue)>,
    ) -> std::io::Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.reserve_seq()?;
        let reading = Reading { ts_ms, seq, fields };
        let bytes = tag(child, serde_json::to_vec(&reading.to_json()).map_err(std::io::Error::other)?);
        let before = self.spool.dropped();
        self.spool.push(seq, &bytes)?;
        if self.spool.dropped() > before {
            // The oldest records went: what was in flight of them is no longer there.
            self.backfill_busy = false;
        }
        if self.connected && !self.reconnect_when_drained {
            self.live.push_back((seq, bytes));
        }
        self.status_dirty = true;
        Ok(())
    }

    fn connect(&mut self) {
        if let Some(c) = self.conn.take() {
            c.task.abort();
        }
        let Some((host, port)) = self.cfg.mqtt.rsplit_once(':') else {
            eprintln!("ferrite-agent: --mqtt {:?} is not HOST:PORT", self.cfg.mqtt);
            return;
        };
        let port: u16 = port.parse().unwrap_or(1883);
        let id = self.creds.device_id.clone();
        let mut opts = MqttOptions::new(id.clone(), host, port);
        opts.set_keep_alive(self.cfg.keep_alive);
        opts.set_credentials(id.clone(), self.creds.access_token.clone());
        opts.set_clean_session(self.cfg.qos != 2);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_inflight(MAX_IN_FLIGHT as u16 + 4);
        opts.set_last_will(LastWill::new(topics::status(&id), "offline", QoS::AtLeastOnce, false));
        let (client, eventloop) = AsyncClient::new(opts, 128);
        let tx = self.net_tx.clone();
        self.generation += 1;
        let task = tokio::spawn(poll(eventloop, tx, self.generation));
        self.conn = Some(Connection { client, task });
        // A new event loop starts with nothing in flight.
        self.lost_in_flight();
    }

    /// Forgets what was in flight: it is all still in the spool, and goes out as back-fill.
    fn lost_in_flight(&mut self) {
        self.unassigned.clear();
        self.in_flight.clear();
        self.sending.clear();
        self.live.clear();
        self.backfill_busy = false;
    }

    fn on_net(&mut self, n: Net) {
        let (Net::Event(g, _) | Net::Error(g, _)) = &n;
        if *g != self.generation {
            return;
        }
        match n {
            Net::Event(_, Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    eprintln!("ferrite-agent: connection refused: {:?}", ack.code);
                    return;
                }
                self.connected = true;
                self.counters.connects += 1;
                if !ack.session_present {
                    self.lost_in_flight();
                }
                self.live.clear();
                self.split = self.next_seq;
                self.on_connected(ack.session_present);
            }
            Net::Event(_, Event::Incoming(Packet::Publish(p))) => self.on_message(&p.topic, &p.payload),
            Net::Event(_, Event::Outgoing(Outgoing::Publish(pkid))) => {
                // Only telemetry goes at QoS 1 or 2 (answers, reports and progress go at QoS
                // 0: the platform asks again for what it misses), so packet ids map to
                // batches in the order they were queued. A retransmission keeps its id.
                if pkid != 0
                    && !self.in_flight.contains_key(&pkid)
                    && let Some(b) = self.unassigned.pop_front()
                {
                    self.in_flight.insert(pkid, b);
                }
            }
            Net::Event(_, Event::Incoming(Packet::PubAck(a))) => self.acknowledged(a.pkid),
            Net::Event(_, Event::Incoming(Packet::PubRec(a))) => self.acknowledged(a.pkid),
            Net::Event(..) => {}
            Net::Error(_, e) => {
                if self.connected {
                    eprintln!("ferrite-agent: connection lost: {e}");
                    self.down_since = Instant::now();
                }
                self.connected = false;
                if self.cfg.qos != 2 {
                    self.lost_in_flight();
                } else {
                    self.live.clear();
                }
                if e.contains("BadUserNamePassword") || e.contains("NotAuthorized") {
                    self.request_token(true);
                }
            }
        }
        self.status_dirty = true;
    }

    fn acknowledged(&mut self, pkid: u16) {
        let Some(b) = self.in_flight.remove(&pkid) else { return };
        self.counters.acknowledged += b.seqs.len() as u64;
        if b.backfill {
            self.backfill_busy = false;
            self.counters.backfilled += b.seqs.len() as u64;
        }
        for s in &b.seqs {
            self.sending.remove(s);
        }
        self.acked.extend(b.seqs);
        if let Err(e) = self.settle() {
            eprintln!("ferrite-agent: spool: {e}");
        }
    }

    /// Moves the spool's cursor past every acknowledged record at its head.
    fn settle(&mut self) -> std::io::Result<()> {
        loop {
            let head = self.spool.peek(256)?;
            if head.is_empty() {
                self.acked.clear();
                return Ok(());
            }
            // Acknowledgements of records the spool already dropped are forgotten.
            let first = head[0].seq;
            self.acked = self.acked.split_off(&first);
            let n = head.iter().take_while(|p| self.acked.contains(&p.seq)).count();
            if n == 0 {
                return Ok(());
            }
            self.spool.ack(&head[..n])?;
            for p in &head[..n] {
                self.acked.remove(&p.seq);
            }
            self.status_dirty = true;
            if n < head.len() {
                return Ok(());
            }
        }
    }

    fn on_connected(&mut self, session_present: bool) {
        eprintln!("ferrite-agent: connected (session present: {session_present})");
        let Some(c) = &self.conn else { return };
        let id = self.creds.device_id.clone();
        for t in [topics::commands(&id), topics::shadow_desired(&id)] {
            let _ = c.client.try_subscribe(t, QoS::AtLeastOnce);
        }
        let _ = c.client.try_publish(topics::status(&id), QoS::AtMostOnce, false, "online");
        for child in self.children.keys() {
            self.subscribe_child(child);
        }
        self.report_twin(None);
        // Readings dropped while offline are reported as a reading of their own.
        let dropped = self.spool.dropped();
        if dropped > 0 {
            let fields = vec![("buffer_dropped".to_owned(), FieldValue::Int(dropped as i64))];
            if self.record(now_ms(), fields).is_ok() && self.spool.take_dropped().is_ok() {
                self.counters.dropped_reported += dropped;
                eprintln!("ferrite-agent: {dropped} readings were dropped while offline (the buffer was full)");
            }
        }
        if let Some((lat, lon)) = self.location() {
            let _ = self
                .record(now_ms(), vec![("lat".into(), FieldValue::Float(lat)), ("lon".into(), FieldValue::Float(lon))]);
        }
    }

    fn location(&self) -> Option<(f64, f64)> {
        let from_config =
            self.settings.config.get("location").and_then(|l| Some((l.get("lat")?.as_f64()?, l.get("lon")?.as_f64()?)));
        from_config.or(self.cfg.location)
    }

    /// Sends what can go: live readings, then one back-fill message when its rate allows.
    fn pump(&mut self) {
        if self.refreshing && self.token.is_none() {
            return;
        }
        if !self.connected || self.reconnect_when_drained {
            self.http_fallback();
            return;
        }
        let Some(c) = &self.conn else { return };
        let client = c.client.clone();
        while !self.live.is_empty() && self.in_flight.len() + self.unassigned.len() < MAX_IN_FLIGHT {
            // One message carries readings of one device (the gateway's own, or a child's).
            let device = self.live.front().map(|(_, b)| untag(b).0.map(str::to_owned)).unwrap_or_default();
            let n = self.live.iter().take(self.cfg.batch).take_while(|(_, b)| untag(b).0 == device.as_deref()).count();
            let items: Vec<(u64, Vec<u8>)> = self.live.drain(..n).collect();
            let payload = ferrite_agent_core::payload::join_objects(items.iter().map(|(_, b)| untag(b).1));
            let topic = self.topic_for(device.as_deref());
            if client.try_publish(topic, qos(self.cfg.qos), false, payload).is_err() {
                // The client's queue is full: try again on the next turn.
                for item in items.into_iter().rev() {
                    self.live.push_front(item);
                }
                return;
            }
            let seqs: Vec<u64> = items.iter().map(|(s, _)| *s).collect();
            self.sending.extend(seqs.iter().copied());
            self.counters.sent += seqs.len() as u64;
            self.unassigned.push_back(Batch { seqs, backfill: false });
        }
        let gap = Duration::from_secs(1) / self.cfg.backfill_rate.max(1);
        if self.backfill_busy || self.last_backfill.elapsed() < gap {
            return;
        }
        let Ok(batch) = self.backfill_batch() else { return };
        let Some((_, first)) = batch.first() else { return };
        let topic = self.topic_for(untag(first).0);
        let payload = ferrite_agent_core::payload::join_objects(batch.iter().map(|(_, b)| untag(b).1));
        if client.try_publish(topic, qos(self.cfg.qos), false, payload).is_ok() {
            let seqs: Vec<u64> = batch.iter().map(|(s, _)| *s).collect();
            self.sending.extend(seqs.iter().copied());
            self.counters.sent += seqs.len() as u64;
            self.unassigned.push_back(Batch { seqs, backfill: true });
            self.backfill_busy = true;
            self.last_backfill = Instant::now();
        }
    }

    /// The next back-fill records: the oldest in the spool that came before this connection,
    /// not acknowledged and not in flight.
    fn backfill_batch(&self) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let want = self.cfg.batch + self.sending.len() + self.acked.len() + self.http_sending.len();
        let ready: Vec<(u64, Vec<u8>)> = self
            .spool
            .peek(want)?
            .into_iter()
            .filter(|p| {
                p.seq < self.split
                    && !self.sending.contains(&p.seq)
                    && !self.acked.contains(&p.seq)
                    && !self.http_sending.contains(&p.seq)
            })
            .take(self.cfg.batch)
            .map(|p| (p.seq, p.payload))
            .collect();
        let device = ready.first().map(|(_, b)| untag(b).0.map(str::to_owned)).unwrap_or_default();
        Ok(ready.into_iter().take_while(|(_, b)| untag(b).0 == device.as_deref()).collect())
    }

    /// The telemetry topic of the device or of a child.
    fn topic_for(&self, child: Option<&str>) -> String {
        topics::telemetry(child.unwrap_or(&self.creds.device_id), Some(&self.cfg.stream))
    }

    /// MQTT has been down a while: the oldest records go over HTTP, one request at a time.
    fn http_fallback(&mut self) {
        let Some(after) = self.cfg.http_fallback_after else { return };
        if self.http_busy || self.down_since.elapsed() < after || self.spool.pending() == 0 {
            return;
        }
        let Some(t) = self.token else { return };
        if t.expired(now_ms()) {
            return;
        }
        let Ok(head) = self.spool.peek(self.cfg.batch) else { return };
        // Over HTTP a device posts its own readings only: a child's wait for MQTT.
        let records: Vec<(u64, Vec<u8>)> = head
            .into_iter()
            .filter(|p| !self.acked.contains(&p.seq))
            .take_while(|p| untag(&p.payload).0.is_none())
            .map(|p| (p.seq, p.payload))
            .collect();
        if records.is_empty() {
            return;
        }
        // The server binds a device's posted events to it: the readings go as they are.
        let body = ferrite_agent_core::payload::join_objects(records.iter().map(|(_, b)| b.as_slice()));
        let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
        self.http_busy = true;
        self.http_sending = seqs.iter().copied().collect();
        let (http, token, stream, tx) =
            (self.http.clone(), self.creds.access_token.clone(), self.cfg.stream.clone(), self.work_tx.clone());
        tokio::task::spawn_blocking(move || {
            let r = http.events(&token, &stream, body).map(|()| seqs).map_err(|e| e.to_string());
            let _ = tx.blocking_send(Work::HttpSent(r));
        });
    }

    /// Token refresh, reconnects, the drain before a reconnect.
    fn maintain(&mut self) {
        let now = now_ms();
        match self.token {
            None => {}
            Some(t) if t.due(now) && !self.refreshing => self.request_token(false),
            Some(_) => {}
        }
        if self.conn.is_none() && self.token.is_some() {
            self.connect();
        }
        if self.reconnect_when_drained && (self.in_flight.is_empty() && self.unassigned.is_empty() || !self.connected) {
            self.reconnect_when_drained = false;
            if let Some(c) = self.conn.take() {
                tokio::spawn(c.close());
            }
            self.connected = false;
            self.connect();
        }
        if self.status_dirty {
            self.write_status();
        }
    }

    /// Writes what is due every few hundred milliseconds: the spool's cursor, the status.
    fn checkpoint(&mut self) {
        if let Err(e) = self.spool.flush() {
            eprintln!("ferrite-agent: spool cursor: {e}");
        }
        self.write_status();
    }

    fn request_token(&mut self, force: bool) {
        if self.refreshing {
            return;
        }
        if !force && self.token.is_some_and(|t| !t.due(now_ms())) {
            return;
        }
        self.refreshing = true;
        let (http, id, secret, tx) =
            (self.http.clone(), self.creds.device_id.clone(), self.creds.client_secret.clone(), self.work_tx.clone());
        let first = self.token.is_none();
        tokio::task::spawn_blocking(move || {
            let mut backoff = Backoff::new(500, 30_000);
            loop {
                match http.token(&id, &secret) {
                    Ok(t) => {
                        let _ = tx.blocking_send(Work::Token(Ok(t), first));
                        return;
                    }
                    Err(crate::http::HttpError::Status(s, body)) if s == 400 || s == 401 => {
                        let _ = tx.blocking_send(Work::Token(Err(format!("HTTP {s}: {body}")), first));
                        return;
                    }
                    Err(e) => {
                        eprintln!("ferrite-agent: token: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(u64::from(backoff.next_delay(fastrand::u32(..)))));
                    }
                }
            }
        });
    }

    async fn on_work(&mut self, w: Work) -> Option<Exit> {
        match w {
            Work::Token(Ok(t), first) => {
                self.refreshing = false;
                self.refused.reset();
                let times = TokenTimes::new(now_ms(), t.expires_in);
                self.creds.access_token = t.access_token;
                self.creds.token_issued_ms = times.issued_ms;
                self.creds.token_expires_ms = times.expires_ms;
                self.token = Some(times);
                if let Err(e) = self.state.save_credentials(&self.creds) {
                    eprintln!("ferrite-agent: credentials.json: {e}");
                }
                if !first || self.conn.is_some() {
                    self.counters.token_refreshes += 1;
                    // Reconnect with the new token once what is in flight is acknowledged.
                    self.reconnect_when_drained = true;
                } else {
                    self.connect();
                }
            }
            Work::Token(Err(e), _) => {
                self.refreshing = false;
                // Refused (not approved yet, disabled, a wrong secret): ask again, less and
                // less often, up to every 30 s.
                let delay = self.refused.next_delay(fastrand::u32(..)).max(500);
                eprintln!("ferrite-agent: the platform refused the device's credentials: {e}; retrying in {delay} ms");
                let tx = self.work_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
                    let _ = tx.send(Work::Publish(String::new(), Vec::new())).await;
                });
                self.token = None;
            }
            Work::Publish(topic, payload) => {
                if topic.is_empty() {
                    self.request_token(true);
                } else if let Some(c) = &self.conn {
                    let _ = c.client.publish(topic, QoS::AtMostOnce, false, payload).await;
                }
            }
            Work::Answer(result, after) => {
                let result = self.commands.finish(result);
                if let Some(c) = &self.conn {
                    let _ = c
                        .client
                        .publish(topics::command_result(&self.creds.device_id), QoS::AtMostOnce, false, result.encode())
                        .await;
                }
                match after {
                    Some(After::Wipe) => {
                        // The answer is queued before the DISCONNECT: once that is written,
                        // so is the answer. Then everything is erased.
                        if let Some(c) = self.conn.take() {
                            c.close().await;
                        }
                        if let Err(e) = self.state.wipe() {
                            eprintln!("ferrite-agent: wipe: {e}");
                        }
                        eprintln!("ferrite-agent: wiped: credentials, buffer and configuration erased; stopping");
                        return Some(Exit::Wiped);
                    }
                    Some(After::Reboot(delay)) => {
                        // The command's own delay, then a clean DISCONNECT (after the answer).
                        tokio::time::sleep(Duration::from_secs(delay)).await;
                        if let Some(c) = self.conn.take() {
                            c.close().await;
                        }
                        return Some(Exit::Reboot);
                    }
                    Some(After::Reconnect) => self.request_token(true),
                    Some(After::Installed) => {
                        self.installing = false;
                        self.status_dirty = true;
                        self.report_twin(None);
                    }
                    None => {}
                }
            }
            Work::Secret(secret) => {
                self.creds.client_secret = secret;
                if let Err(e) = self.state.save_credentials(&self.creds) {
                    eprintln!("ferrite-agent: credentials.json: {e}");
                }
            }
            Work::HttpSent(r) => {
                self.http_busy = false;
                self.http_sending.clear();
                match r {
                    Ok(seqs) => {
                        self.counters.http_sent += seqs.len() as u64;
                        self.counters.acknowledged += seqs.len() as u64;
                        self.acked.extend(seqs);
                        if let Err(e) = self.settle() {
                            eprintln!("ferrite-agent: spool: {e}");
                        }
                    }
                    Err(e) => {
                        eprintln!("ferrite-agent: HTTP fallback: {e}");
                        // Wait a full fallback delay before the next try.
                        self.down_since = Instant::now();
                    }
                }
            }
        }
        None
    }

    fn on_child(&mut self, e: crate::gateway::ChildEvent) {
        use crate::gateway::ChildEvent;
        match e {
            ChildEvent::Hello(id, tx) => {
                eprintln!("ferrite-agent: gateway: child {id} connected");
                self.children.insert(id.clone(), tx);
                self.status_dirty = true;
                self.subscribe_child(&id);
            }
            ChildEvent::Reading(id, ts, fields) => {
                if let Err(e) = self.record_for(Some(&id), ts.unwrap_or_else(now_ms), fields) {
                    eprintln!("ferrite-agent: spool: {e}");
                }
            }
            ChildEvent::Result(id, bytes) => {
                if let Some(c) = &self.conn {
                    let _ = c.client.try_publish(topics::command_result(&id), QoS::AtMostOnce, false, bytes);
                }
            }
            ChildEvent::Gone(id) => {
                self.children.remove(&id);
                if let Some(c) = &self.conn {
                    // Commands wait at the platform until the child is back.
                    let _ = c.client.try_unsubscribe(topics::commands(&id));
                    let _ = c.client.try_unsubscribe(topics::shadow_desired(&id));
                }
            }
        }
    }

    fn subscribe_child(&self, id: &str) {
        if let Some(c) = &self.conn {
            let _ = c.client.try_subscribe(topics::commands(id), QoS::AtLeastOnce);
            let _ = c.client.try_subscribe(topics::shadow_desired(id), QoS::AtLeastOnce);
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let child = match topics::parse_inbound(topic) {
            Some(topics::Inbound::Command(d) | topics::Inbound::Desired(d)) if d != self.creds.device_id => {
                self.children.get(d).cloned()
            }
            _ => None,
        };
        if let Some(tx) = child {
            let key = if topic.ends_with("/commands") { "command" } else { "desired" };
            let body: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
            let _ = tx.try_send(json!({ key: body }).to_string());
            return;
        }
        match topics::parse_inbound(topic) {
            Some(topics::Inbound::Command(d)) if d == self.creds.device_id => self.on_command(payload),
            Some(topics::Inbound::Desired(d)) if d == self.creds.device_id => self.on_desired(payload),
            _ => {}
        }
    }

    fn answer(&self, id: &str, ok: bool, result: Value, after: Option<After>) {
        let status = if ok { CommandStatus::Succeeded } else { CommandStatus::Failed };
        let r = CommandResult { id: id.to_owned(), status, result };
        let _ = self.work_tx.try_send(Work::Answer(r, after));
    }

    fn on_command(&mut self, payload: &[u8]) {
        let cmd = match payload::decode_command(payload) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ferrite-agent: a command that does not parse: {e}");
                return;
            }
        };
        match self.commands.decide(&cmd) {
            Decision::Running => return,
            Decision::Answer(r) => {
                if let Some(c) = &self.conn {
                    let _ = c.client.try_publish(
                        topics::command_result(&self.creds.device_id),
                        QoS::AtMostOnce,
                        false,
                        r.encode(),
                    );
                }
                return;
            }
            Decision::Run => {}
        }
        let p = &cmd.params;
        let text = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        match cmd.name.as_str() {
            "lock" => {
                self.settings.locked = true;
                self.settings.lock_message = text("message");
                self.commands.set_locked(true);
                self.live.clear();
                let saved = self.state.save_settings(&self.settings);
                self.answer(&cmd.id, saved.is_ok(), json!({"locked": true}), None);
                self.report_twin(None);
            }
            "unlock" => {
                self.settings.locked = false;
                self.settings.lock_message.clear();
                self.commands.set_locked(false);
                let saved = self.state.save_settings(&self.settings);
                self.answer(&cmd.id, saved.is_ok(), json!({"locked": false}), None);
                self.report_twin(None);
            }
            "reboot" => {
                let delay = p.get("delay_secs").and_then(Value::as_u64).unwrap_or(0);
                self.answer(&cmd.id, true, json!({"rebooting_in_secs": delay}), Some(After::Reboot(delay)));
            }
            "set_config" => {
                let Some(config) = p.get("config").and_then(Value::as_object) else {
                    return self.answer(&cmd.id, false, json!({"error": "`config` must be an object"}), None);
                };
                let (applied, kept) = self.merge_config(config);
                match self.state.save_settings(&self.settings) {
                    Ok(()) => self.answer(&cmd.id, true, json!({"applied": applied, "stored": kept}), None),
                    Err(e) => self.answer(&cmd.id, false, json!({"error": format!("cannot store: {e}")}), None),
                }
                self.report_twin(None);
            }
            "enable_feature" | "disable_feature" => {
                let f = text("feature");
                if cmd.name == "enable_feature" {
                    self.settings.features.insert(f.clone());
                } else {
                    self.settings.features.remove(&f);
                }
                let saved = self.state.save_settings(&self.settings);
                self.answer(&cmd.id, saved.is_ok(), json!({"features": self.settings.features}), None);
                self.report_twin(None);
            }
            "locate" => match self.location() {
                Some((lat, lon)) => {
                    let _ = self.record(
                        now_ms(),
                        vec![("lat".into(), FieldValue::Float(lat)), ("lon".into(), FieldValue::Float(lon))],
                    );
                    self.answer(&cmd.id, true, json!({"lat": lat, "lon": lon}), None);
                }
                None => {
                    self.answer(&cmd.id, false, json!({"error": "this device knows no location (--location)"}), None)
                }
            },
            "rotate_credentials" => {
                let secret = text("client_secret");
                if secret.is_empty() {
                    return self.answer(&cmd.id, false, json!({"error": "no `client_secret` in the command"}), None);
                }
                // The new secret must work before the old one is given up.
                let (http, id, tx, state, mut creds) = (
                    self.http.clone(),
                    self.creds.device_id.clone(),
                    self.work_tx.clone(),
                    self.state.clone(),
                    self.creds.clone(),
                );
                let cmd_id = cmd.id.clone();
                tokio::task::spawn_blocking(move || {
                    let outcome = http.token(&id, &secret).map_err(|e| e.to_string()).and_then(|_| {
                        creds.client_secret = secret.clone();
                        state.save_credentials(&creds).map_err(|e| e.to_string())
                    });
                    if outcome.is_ok() {
                        let _ = tx.blocking_send(Work::Secret(secret));
                    }
                    let (status, result, after) = match outcome {
                        Ok(()) => (CommandStatus::Succeeded, json!({"rotated": true}), Some(After::Reconnect)),
                        Err(e) => (
                            CommandStatus::Failed,
                            json!({"error": format!("the new secret does not work: {e}")}),
                            None,
                        ),
                    };
                    let _ = tx.blocking_send(Work::Answer(CommandResult { id: cmd_id, status, result }, after));
                });
            }
            "wipe" => self.answer(&cmd.id, true, json!({"wiped": true}), Some(After::Wipe)),
            "install" => self.on_install(&cmd.id, p),
            name => match self.cfg.actuators.iter().find(|(n, _)| n == name).map(|(_, c)| c.clone()) {
                Some(command) => {
                    let (tx, id, params) = (self.work_tx.clone(), cmd.id.clone(), p.to_string());
                    tokio::task::spawn_blocking(move || {
                        let out = std::process::Command::new("sh")
                            .arg("-c")
                            .arg(&command)
                            .env("FERRITE_PARAMS", params)
                            .output();
                        let (status, result) = match out {
                            Ok(o) if o.status.success() => {
                                (CommandStatus::Succeeded, json!({"output": String::from_utf8_lossy(&o.stdout).trim()}))
                            }
                            Ok(o) => (
                                CommandStatus::Failed,
                                json!({"error": format!("exited with {}", o.status), "output": String::from_utf8_lossy(&o.stderr).trim()}),
                            ),
                            Err(e) => (CommandStatus::Failed, json!({"error": e.to_string()})),
                        };
                        let _ = tx.blocking_send(Work::Answer(CommandResult { id, status, result }, None));
                    });
                }
                None => {
                    self.answer(&cmd.id, false, json!({"error": format!("this device has no actuator `{name}`")}), None)
                }
            },
        }
    }

    fn on_install(&mut self, id: &str, params: &Value) {
        if self.installing {
            return self.answer(id, false, json!({"state": "failed", "error": "another install is running"}), None);
        }
        let install = match Install::parse(params) {
            Ok(i) => i,
            Err(e) => return self.answer(id, false, json!({"state": "failed", "error": e}), None),
        };
        self.installing = true;
        let (installer, token, tx, device) = (
            self.installer.clone(),
            self.creds.access_token.clone(),
            self.work_tx.clone(),
            self.creds.device_id.clone(),
        );
        let cmd_id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let report_tx = tx.clone();
            let campaign = install.campaign.clone();
            let report = move |state: &str, detail: Option<&str>| {
                let mut body = json!({"campaign": campaign, "state": state});
                if let Some(d) = detail {
                    body["detail"] = json!(d);
                }
                let _ =
                    report_tx.blocking_send(Work::Publish(topics::ota_status(&device), body.to_string().into_bytes()));
            };
            let (ok, result) = installer.run(&install, &token, &report);
            let status = if ok { CommandStatus::Succeeded } else { CommandStatus::Failed };
            let _ =
                tx.blocking_send(Work::Answer(CommandResult { id: cmd_id, status, result }, Some(After::Installed)));
        });
    }

    /// Merges configuration; which keys the agent applies, and which it only stores.
    fn merge_config(&mut self, config: &Map<String, Value>) -> (Vec<String>, Vec<String>) {
        const KNOWN: [&str; 4] = ["interval_ms", "batch", "backfill_rate", "location"];
        let (mut applied, mut kept) = (Vec::new(), Vec::new());
        for (k, v) in config {
            self.settings.config.insert(k.clone(), v.clone());
            if KNOWN.contains(&k.as_str()) { applied.push(k.clone()) } else { kept.push(k.clone()) }
        }
        self.apply_config();
        (applied, kept)
    }

    fn on_desired(&mut self, payload: &[u8]) {
        let doc = match payload::decode_desired(payload) {
            Ok(d) => d,
            Err(e) => return eprintln!("ferrite-agent: desired state: {e}"),
        };
        let mut rejected = Map::new();
        let mut accepted = Map::new();
        for (k, v) in &doc.state {
            let ok = match k.as_str() {
                "interval_ms" | "backfill_rate" => v.as_u64().is_some_and(|n| n > 0),
                "batch" => v.as_u64().is_some_and(|n| (1..=10_000).contains(&n)),
                "features" => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
                _ => {
                    rejected.insert(k.clone(), json!("this device does not know this setting"));
                    continue;
                }
            };
            if ok {
                accepted.insert(k.clone(), v.clone());
            } else {
                rejected.insert(k.clone(), json!(format!("{v} is not a valid value")));
            }
        }
        if let Some(f) = accepted.remove("features").and_then(|v| v.as_array().cloned()) {
            self.settings.features = f.iter().filter_map(Value::as_str).map(str::to_owned).collect();
        }
        self.merge_config(&accepted);
        if let Err(e) = self.state.save_settings(&self.settings) {
            eprintln!("ferrite-agent: settings.json: {e}");
        }
        self.report_twin(Some((doc.version, rejected)));
    }

    fn report_twin(&self, desired: Option<(u64, Map<String, Value>)>) {
        let Some(c) = &self.conn else { return };
        let mut state = json!({
            "firmware": self.installer.slots.version(),
            "slot": self.installer.slots.active(),
            "features": self.settings.features,
            "config": self.settings.config,
            "locked": self.settings.locked,
            "agent": env!("CARGO_PKG_VERSION"),
        });
        if let Some((version, rejected)) = desired {
            state["desired_version"] = json!(version);
            state["rejected"] = Value::Object(rejected);
        }
        let body = json!({"state": state});
        let _ = c.client.try_publish(
            topics::shadow_reported(&self.creds.device_id),
            QoS::AtMostOnce,
            false,
            body.to_string(),
        );
    }

    fn write_status(&mut self) {
        if self.status_dirty {
            self.write_status_now();
        }
    }

    fn write_status_now(&mut self) {
        self.status_dirty = false;
        let status = json!({
            "device_id": self.creds.device_id,
            "connected": self.connected,
            "buffered": self.spool.pending(),
            "dropped_pending_report": self.spool.dropped(),
            "counters": self.counters,
            "firmware": self.installer.slots.version(),
            "locked": self.settings.locked,
            "gateway": self.gateway_addr,
            "children": self.children.keys().collect::<Vec<_>>(),
        });
        let tmp = self.state.path("status.json.tmp");
        if std::fs::write(&tmp, status.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, self.state.path("status.json"));
        }
    }
}

/// A spool record of a child carries its id before the reading: `0x01 id 0x00 json`.
fn tag(child: Option<&str>, json: Vec<u8>) -> Vec<u8> {
    match child {
        None => json,
        Some(id) => {
            let mut out = Vec::with_capacity(json.len() + id.len() + 2);
            out.push(1);
            out.extend_from_slice(id.as_bytes());
            out.push(0);
            out.extend_from_slice(&json);
            out
        }
    }
}

/// The child a record belongs to (none: the device itself) and its reading's JSON.
fn untag(record: &[u8]) -> (Option<&str>, &[u8]) {
    if record.first() == Some(&1)
        && let Some(end) = record.iter().position(|b| *b == 0)
        && let Ok(id) = std::str::from_utf8(&record[1..end])
    {
        return (Some(id), &record[end + 1..]);
    }
    (None, record)
}

/// Registers the device with a provisioning secret, retrying while the server is
/// unreachable (a device may boot before its network is up); its client secret.
fn self_register(cfg: &Config, provisioning_secret: &str, id: &str) -> Result<String, StartError> {
    let http = Http::new(&cfg.http);
    let mut backoff = Backoff::new(1_000, 30_000);
    loop {
        match http.register(provisioning_secret, id, cfg.device_type.as_deref()) {
            Ok(secret) => return Ok(secret),
            Err(crate::http::HttpError::Status(s, body)) => {
                return Err(format!("self-registration refused (HTTP {s}): {body}"));
            }
            Err(e) => {
                let delay = backoff.next_delay(fastrand::u32(..)).max(200);
                eprintln!("ferrite-agent: self-registration: {e}; retrying in {delay} ms");
                std::thread::sleep(Duration::from_millis(u64::from(delay)));
            }
        }
    }
}

/// Polls the MQTT event loop, reconnecting with back-off and jitter after a failure.
async fn poll(mut eventloop: EventLoop, tx: mpsc::Sender<Net>, generation: u64) {
    let mut backoff = Backoff::new(200, 15_000);
    loop {
        match eventloop.poll().await {
            Ok(e) => {
                if matches!(e, Event::Incoming(Packet::ConnAck(_))) {
                    backoff.reset();
                }
                // Our DISCONNECT is written: the connection is over (no reconnect).
                let closing = matches!(e, Event::Outgoing(Outgoing::Disconnect));
                if tx.send(Net::Event(generation, e)).await.is_err() || closing {
                    return;
                }
            }
            Err(e) => {
                if tx.send(Net::Error(generation, format!("{e:?}"))).await.is_err() {
                    return;
                }
                let delay = backoff.next_delay(fastrand::u32(..));
                tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
            }
        }
    }
}

/// Runs the agent until it stops; re-executes the program on `reboot`.
pub fn main_with(cfg: Config) -> Result<Exit, StartError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let exit = runtime.block_on(async move {
        let agent = Agent::open(cfg)?;
        Ok::<_, StartError>(agent.run().await)
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(exit)
}

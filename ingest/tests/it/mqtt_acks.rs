//! MQTT acknowledgements against a store whose commits can be made to fail: a withheld
//! acknowledgement closes the session, the retransmission after reconnecting is taken, and
//! QoS 2 takes every message exactly once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use ferrite_engine::{Engine, EngineConfig, Health, Metrics, ShardStore, StreamBatch, StreamCatalog, SystemClock};
use ferrite_ingest::mqtt::{self, Broker};
use ferrite_ingest::{IngestConfig, Ingestor};
use parking_lot::Mutex;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubRel, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A store that fails every commit while `fail` is set, and records what it committed.
#[derive(Default)]
struct FlakyStore {
    fail: AtomicBool,
    rows: Mutex<usize>,
}

impl ShardStore for FlakyStore {
    fn commit(&self, _shard: usize, group: &[StreamBatch]) -> Result<(), String> {
        if self.fail.load(Ordering::SeqCst) {
            return Err("injected: no space left on device".to_owned());
        }
        *self.rows.lock() += group.iter().map(|b| b.batch.num_rows()).sum::<usize>();
        Ok(())
    }
}

struct Server {
    addr: SocketAddr,
    store: Arc<FlakyStore>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    catalog: Arc<StreamCatalog>,
    _stop: watch::Sender<bool>,
}

async fn server() -> anyhow::Result<Server> {
    let store = Arc::new(FlakyStore::default());
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let catalog = Arc::new(StreamCatalog::in_memory());
    let engine = Engine::start(EngineConfig { shards: 1, ..EngineConfig::default() }, store.clone(), metrics.clone())?;
    let config = IngestConfig {
        decoder_threads: 1,
        health: health.clone(),
        overload_wait: Duration::from_millis(50),
        ..IngestConfig::default()
    };
    let ingestor = Ingestor::start(config, catalog.clone(), engine, metrics.clone(), Arc::new(SystemClock))?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, rx) = watch::channel(false);
    let limits = mqtt::MqttLimits::default();
    // Identity is not what these tests are about: every decision allows.
    let access = Arc::new(ferrite_engine::auth::AllowAll);
    let limiter = Arc::new(ferrite_engine::limits::RateLimiter::default());
    let usage = ferrite_engine::usage::UsageLog::off(metrics.clone());
    let front = mqtt::MqttFront::new(
        ingestor,
        Arc::new(Broker::default()),
        metrics.clone(),
        access,
        limits,
        mqtt::Accounting { limiter, usage },
        rx,
    );
    tokio::spawn(mqtt::serve(listener, front));
    Ok(Server { addr, store, health, metrics, catalog, _stop: stop })
}

/// A bare MQTT 3.1.1 client that sends exactly what a test says, retransmissions included.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut c = Client { stream: TcpStream::connect(addr).await?, buf: BytesMut::new() };
        c.send(Packet::Connect(Connect::new("raw-client"))).await?;
        match c.recv().await? {
            Some(Packet::ConnAck(_)) => Ok(c),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 20)?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn publish(&mut self, qos: QoS, pkid: u16, dup: bool) -> anyhow::Result<()> {
        let mut p = Publish::new("devices/d1/telemetry", qos, br#"{"v": 1}"#.to_vec());
        p.pkid = pkid;
        p.dup = dup;
        self.send(Packet::Publish(p)).await
    }

    /// The next packet, or `None` when the server closed the connection.
    async fn recv(&mut self) -> anyhow::Result<Option<Packet>> {
        let deadline = Duration::from_secs(10);
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Ok(Some(p)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => bail!("bad packet from the server: {e}"),
            }
            let n = tokio::time::timeout(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .context("the server neither answered nor closed the session within 10 s")??;
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_qos1_commit_closes_the_session_and_the_resend_is_taken() -> anyhow::Result<()> {
    let s = server().await?;
    s.store.fail.store(true, Ordering::SeqCst);
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::AtLeastOnce, 1, false).await?;
    let got = c.recv().await?;
    assert!(got.is_none(), "no PUBACK for an uncommitted message, and the session is closed: got {got:?}");

    s.store.fail.store(false, Ordering::SeqCst);
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::AtLeastOnce, 1, true).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubAck(a)) if a.pkid == 1));
    assert_eq!(*s.store.rows.lock(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_qos2_commit_does_not_mark_the_packet_id_received() -> anyhow::Result<()> {
    let s = server().await?;
    s.store.fail.store(true, Ordering::SeqCst);
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::ExactlyOnce, 7, false).await?;
    let got = c.recv().await?;
    assert!(got.is_none(), "no PUBREC for an uncommitted message, and the session is closed: got {got:?}");

    s.store.fail.store(false, Ordering::SeqCst);
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::ExactlyOnce, 7, true).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubRec(r)) if r.pkid == 7));
    c.send(Packet::PubRel(PubRel::new(7))).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubComp(r)) if r.pkid == 7));
    assert_eq!(*s.store.rows.lock(), 1, "the retransmission was ingested");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_takes_each_message_exactly_once() -> anyhow::Result<()> {
    let s = server().await?;
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::ExactlyOnce, 9, false).await?;
    // A retransmission before PUBREL (a lost PUBREC): acknowledged, not ingested again.
    c.publish(QoS::ExactlyOnce, 9, true).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubRec(r)) if r.pkid == 9));
    assert!(matches!(c.recv().await?, Some(Packet::PubRec(r)) if r.pkid == 9));
    c.send(Packet::PubRel(PubRel::new(9))).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubComp(r)) if r.pkid == 9));
    assert_eq!(*s.store.rows.lock(), 1);
    // After PUBCOMP the packet id is free again: a new message with it is a new message.
    c.publish(QoS::ExactlyOnce, 9, false).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubRec(r)) if r.pkid == 9));
    c.send(Packet::PubRel(PubRel::new(9))).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubComp(r)) if r.pkid == 9));
    assert_eq!(*s.store.rows.lock(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_node_withholds_the_puback() -> anyhow::Result<()> {
    let s = server().await?;
    s.health.set_overloaded(true);
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::AtLeastOnce, 3, false).await?;
    let got = c.recv().await?;
    assert!(got.is_none(), "refused while overloaded: got {got:?}");
    assert_eq!(
        s.metrics.counter_value("ferrite_rejected_events_total", &[("transport", "mqtt"), ("reason", "overloaded")]),
        1
    );
    assert_eq!(*s.store.rows.lock(), 0);
    s.health.set_overloaded(false);
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::AtLeastOnce, 3, true).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubAck(a)) if a.pkid == 3));
    assert_eq!(*s.store.rows.lock(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_acks_keep_arrival_order_when_gathered_into_one_commit() -> anyhow::Result<()> {
    let s = server().await?;
    let mut c = Client::connect(s.addr).await?;
    // One write: 20 telemetry messages, a ping, a message on another topic, 20 more.
    let mut out = BytesMut::new();
    let publish = |pkid: u16, topic: &str| {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, br#"{"v": 1}"#.to_vec());
        p.pkid = pkid;
        Packet::Publish(p)
    };
    for pkid in 1..=20 {
        publish(pkid, "devices/d1/telemetry").write(&mut out, 1 << 20)?;
    }
    Packet::PingReq.write(&mut out, 1 << 20)?;
    publish(21, "devices/d1/status").write(&mut out, 1 << 20)?;
    for pkid in 22..=41 {
        publish(pkid, if pkid % 2 == 0 { "devices/d1/telemetry" } else { "devices/d2/telemetry/power" })
            .write(&mut out, 1 << 20)?;
    }
    c.stream.write_all(&out).await?;
    let mut seen = Vec::new();
    while seen.len() < 42 {
        match c.recv().await? {
            Some(Packet::PubAck(a)) => seen.push(i32::from(a.pkid)),
            Some(Packet::PingResp) => seen.push(0),
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let want: Vec<i32> = (1..=20).chain([0]).chain(21..=41).collect();
    assert_eq!(seen, want, "PUBACKs (and the PINGRESP, as 0) in the order of the packets");
    assert_eq!(*s.store.rows.lock(), 40, "every telemetry message committed once");
    Ok(())
}

/// Regression: a payload refused for the client's own fault (here: a stream past the
/// server's limit) had its PUBACK withheld, so the client would resend it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_refused_for_its_own_fault_is_acknowledged() -> anyhow::Result<()> {
    let s = server().await?;
    s.catalog.set_limits(ferrite_engine::CatalogLimits { max_streams: 0, max_fields_per_stream: 10 });
    let mut c = Client::connect(s.addr).await?;
    c.publish(QoS::AtLeastOnce, 5, false).await?;
    assert!(matches!(c.recv().await?, Some(Packet::PubAck(a)) if a.pkid == 5), "acknowledged, not withheld");
    assert_eq!(*s.store.rows.lock(), 0);
    assert_eq!(
        s.metrics
            .counter_value("ferrite_rejected_events_total", &[("transport", "mqtt"), ("reason", "too_many_streams")]),
        1
    );
    Ok(())
}

/// Room among the payloads in flight: an HTTP or CoAP request waits a bounded time for it and
/// is then refused `busy` (counted); an MQTT session waits as long as it takes (its socket is
/// not read meanwhile) and goes on once room frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_bounded_for_requests_and_waits_for_sessions() -> anyhow::Result<()> {
    use ferrite_ingest::{Error, Transport};
    let store = Arc::new(FlakyStore::default());
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::start(EngineConfig { shards: 1, ..EngineConfig::default() }, store, metrics.clone())?;
    let config = IngestConfig {
        decoder_threads: 1,
        max_in_flight: 1,
        overload_wait: Duration::from_millis(20),
        ..IngestConfig::default()
    };
    let ingestor =
        Ingestor::start(config, Arc::new(StreamCatalog::in_memory()), engine, metrics.clone(), Arc::new(SystemClock))?;

    let held = ingestor.admit(Transport::Http).await?;
    match ingestor.admit(Transport::Http).await {
        Err(Error::Busy { retry_after, waited_ms }) => {
            assert_eq!((retry_after, waited_ms), (ferrite_ingest::pipeline::BUSY_RETRY_AFTER_SECS, 20));
        }
        other => bail!("a second request while the only room is taken: {other:?}"),
    }
    assert_eq!(metrics.counter_value("ferrite_rejected_events_total", &[("transport", "http"), ("reason", "busy")]), 1);

    let mut session = {
        let ingestor = ingestor.clone();
        tokio::spawn(async move { ingestor.admit(Transport::Mqtt).await.map(|_| ()) })
    };
    // Five times the requests' wait: still waiting, not refused.
    let early = tokio::time::timeout(Duration::from_millis(100), &mut session).await;
    assert!(early.is_err(), "an MQTT session waits for room instead of being refused: {early:?}");
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), session).await.context("the session never got room")???;
    Ok(())
}

/// Past the hot buffer's soft bound (a pressure set by storage), HTTP and CoAP requests are
/// turned away in proportion to the pressure (503 `busy`, counted as `shed`), while MQTT
/// sessions are never shed (they wait, and the hard bound holds them back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_shed_in_proportion_to_the_pressure_and_sessions_are_not() -> anyhow::Result<()> {
    use ferrite_ingest::{Error, Transport};
    let store = Arc::new(FlakyStore::default());
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::start(EngineConfig { shards: 1, ..EngineConfig::default() }, store, metrics.clone())?;
    let health = Arc::new(Health::new());
    let config = IngestConfig { health: health.clone(), ..IngestConfig::default() };
    let ingestor =
        Ingestor::start(config, Arc::new(StreamCatalog::in_memory()), engine, metrics.clone(), Arc::new(SystemClock))?;

    let outcomes = |transport: Transport| {
        let ingestor = ingestor.clone();
        async move {
            let (mut admitted, mut shed) = (0, 0);
            for _ in 0..200 {
                match ingestor.admit(transport).await {
                    Ok(_) => admitted += 1,
                    Err(Error::Shed { percent, retry_after }) => {
                        assert_eq!((percent, retry_after), (30, ferrite_ingest::pipeline::BUSY_RETRY_AFTER_SECS));
                        shed += 1;
                    }
                    Err(e) => bail!("{transport:?}: {e}"),
                }
            }
            Ok::<_, anyhow::Error>((admitted, shed))
        }
    };
    assert_eq!(outcomes(Transport::Http).await?, (200, 0), "below the soft bound");
    health.set_pressure(300);
    let (admitted, shed) = outcomes(Transport::Http).await?;
    assert!((50..=70).contains(&shed) && admitted + shed == 200, "30% of 200 HTTP requests shed, not {shed}");
    let (_, coap_shed) = outcomes(Transport::Coap).await?;
    assert!(coap_shed > 0, "CoAP is shed too");
    assert_eq!(outcomes(Transport::Mqtt).await?, (200, 0), "MQTT sessions are not shed");
    assert_eq!(
        metrics.counter_value("ferrite_rejected_events_total", &[("transport", "http"), ("reason", "shed")]),
        shed as u64
    );
    Ok(())
}

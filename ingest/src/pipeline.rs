//! The ingest pipeline: payloads from any transport are decoded on dedicated decoder
//! threads (never on the async runtime) and submitted to the engine's [`BatchSink`].
//!
//! ```text
//! transport task ──(semaphore permit)──▶ bounded channel ──▶ decoder thread
//!      ▲                                                        │ decode into Arrow
//!      └──────── report + durability waiter ◀────── BatchSink::submit (blocks when full)
//! ```
//!
//! The semaphore bounds payloads in flight: when decoders or shards fall behind,
//! `ingest` awaits a permit, so MQTT connections stop reading; HTTP and CoAP requests take
//! their permit ([`Ingestor::admit`]) before their body is read, wait at most
//! `overload_wait` for it, and are then refused ([`Error::Busy`], 503 with `Retry-After`).
//! Request bodies held in memory are so bounded by `max_in_flight × max_payload_bytes`
//! however many clients send at once.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded};
use ferrite_engine::ack::AckWaiter;
use ferrite_engine::quota::Quotas;
use ferrite_engine::{Ack, BatchSink, Clock, Health, Metrics, StreamBatch, StreamCatalog, StreamName};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::builder::{BatchBuilder, Rejection};
use crate::error::{Error, Result};
use crate::json::{DeviceSource, JsonDecoder};
use crate::line_protocol::{self, Precision};

/// What an overloaded node tells clients to wait before retrying (HTTP `Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 5;

/// What a node at capacity (no room for another payload) tells clients to wait: the
/// decoders free up within milliseconds, so a second is enough to spread the retries.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// Most rejections reported back to a client per payload (all are counted).
pub const MAX_REPORTED_REJECTIONS: usize = 100;

/// Settings of the ingest pipeline.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Largest accepted payload, in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Decoder threads (default: one per core).
    pub decoder_threads: usize,
    /// Payloads in flight (read, queued for a decoder or being decoded) before transports
    /// wait.
    pub max_in_flight: usize,
    /// The node's health: while it is overloaded, payloads wait up to `overload_wait` and
    /// are then refused with [`Error::Overloaded`].
    pub health: Arc<Health>,
    /// How long a payload waits for an overload to end, and an HTTP or CoAP request for
    /// room among the payloads in flight, before it is refused.
    pub overload_wait: std::time::Duration,
    /// Most distinct event-time hours one payload may span.
    pub max_hours_per_request: usize,
    /// Line-protocol tags that name the device when neither `device_id` nor `host` is there,
    /// tried in order (e.g. `name` for TSBS data).
    pub device_tags: Vec<String>,
    /// The device of a line-protocol line that has no device tag (rejected when `None`).
    pub default_device: Option<String>,
    /// Tenants' daily quotas of events and bytes (checked before a payload, counted after).
    pub quotas: Arc<Quotas>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            decoder_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            max_in_flight: 256,
            health: Arc::new(Health::new()),
            overload_wait: std::time::Duration::from_secs(2),
            max_hours_per_request: 168,
            device_tags: Vec::new(),
            default_device: None,
            quotas: Arc::new(Quotas::off(Arc::new(ferrite_engine::SystemClock))),
        }
    }
}

/// The transport a payload came in by (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `POST /api/v1/streams/{stream}/events`.
    Http,
    /// `POST /api/v2/write`.
    LineProtocol,
    /// MQTT PUBLISH.
    Mqtt,
    /// CoAP `POST /telemetry`.
    Coap,
    /// The platform's own streams (`audit`, `api_usage`, plugins' events).
    Internal,
}

impl Transport {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::LineProtocol => "influx",
            Transport::Mqtt => "mqtt",
            Transport::Coap => "coap",
            Transport::Internal => "internal",
        }
    }
}

/// How to decode a payload.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A JSON object or array of objects for `stream`; device from `device` or per event.
    Json {
        /// Target stream.
        stream: StreamName,
        /// The device, when the transport names it (MQTT topic).
        device: Option<String>,
    },
    /// Several JSON payloads (each an object or an array of objects) of one device and
    /// stream, decoded as one batch: an MQTT session's QoS 0 messages from one socket read.
    /// A malformed payload is rejected whole; the others are kept. `Job::bytes` is unused.
    JsonMany {
        /// Target stream.
        stream: StreamName,
        /// The device (from the topic).
        device: String,
        /// The payloads, in arrival order.
        payloads: Vec<Bytes>,
    },
    /// Newline-delimited JSON objects for `stream`, each with `device_id`.
    Ndjson {
        /// Target stream.
        stream: StreamName,
    },
    /// InfluxDB line protocol.
    LineProtocol {
        /// Timestamp unit.
        precision: Precision,
        /// The tenant whose streams the measurements name.
        tenant: Arc<str>,
        /// The request's choices: device tag, fallback device, all or nothing.
        options: LineOptions,
    },
    /// Rows already built (Sparkplug B metrics, decoded with their edge node's birth).
    Batches {
        /// The tenant whose streams they are.
        tenant: Arc<str>,
        /// The rows.
        batches: Vec<StreamBatch>,
        /// The bytes of the messages they came from (ingested bytes, daily quotas).
        bytes: usize,
    },
}

/// A line-protocol request's own settings.
#[derive(Debug, Clone, Default)]
pub struct LineOptions {
    /// The tag that names the device (`device_tag=`), over the stream's and the defaults.
    pub device_tag: Option<String>,
    /// The device of lines without the tag (`default_device=`).
    pub default_device: Option<String>,
    /// Keep nothing when any line is rejected (InfluxDB 3's `accept_partial=false`).
    pub all_or_nothing: bool,
}

impl Payload {
    /// The tenant whose streams the payload writes to.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Self::Json { stream, .. } | Self::JsonMany { stream, .. } | Self::Ndjson { stream } => {
                Some(stream.tenant())
            }
            Self::LineProtocol { tenant, .. } | Self::Batches { tenant, .. } => Some(tenant),
        }
    }

    /// The bytes the payload came in: `bytes`, or what its parts say.
    fn size(&self, bytes: &[u8]) -> usize {
        match self {
            Self::JsonMany { payloads, .. } => payloads.iter().map(Bytes::len).sum(),
            Self::Batches { bytes, .. } => *bytes,
            _ => bytes.len(),
        }
    }
}

/// What happened to a payload.
#[derive(Debug, Default)]
pub struct IngestReport {
    /// Events kept.
    pub accepted: usize,
    /// Events rejected (all of them, even past the reported ones).
    pub rejected: usize,
    /// The first [`MAX_REPORTED_REJECTIONS`] rejections.
    pub rejections: Vec<Rejection>,
}

struct Job {
    transport: Transport,
    payload: Payload,
    bytes: Bytes,
    received_at: i64,
    reply: oneshot::Sender<Result<(IngestReport, Option<AckWaiter>)>>,
    detached: bool,
    _permit: OwnedSemaphorePermit,
}

/// Front door of the engine for every transport.
pub struct Ingestor {
    config: IngestConfig,
    catalog: Arc<StreamCatalog>,
    tx: Sender<Job>,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Ingestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingestor").field("config", &self.config).finish()
    }
}

/// Room for one payload among those in flight, taken before its body is read
/// ([`Ingestor::admit`]) and handed to [`Ingestor::ingest_admitted`].
#[derive(Debug)]
pub struct Admission {
    permit: OwnedSemaphorePermit,
}

/// How long to wait for durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Return once the events are in the WAL (fsynced).
    Committed,
    /// Return once the events are queued to the engine (MQTT QoS 0).
    Queued,
}

impl Ingestor {
    /// Starts the decoder threads.
    pub fn start(
        config: IngestConfig,
        catalog: Arc<StreamCatalog>,
        sink: Arc<dyn BatchSink>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>> {
        let in_flight = config.max_in_flight.max(1);
        // Sized to the number of permits, so a send never blocks the async caller.
        let (tx, rx) = bounded::<Job>(in_flight);
        let naming = line_protocol::DeviceNaming::configured(&config.device_tags, config.default_device.as_deref());
        for i in 0..config.decoder_threads.max(1) {
            let worker = Decoder {
                rx: rx.clone(),
                catalog: catalog.clone(),
                sink: sink.clone(),
                metrics: metrics.clone(),
                max_hours: config.max_hours_per_request.max(1),
                naming: naming.clone(),
            };
            std::thread::Builder::new()
                .name(format!("ferrite-decode-{i}"))
                .spawn(move || worker.run())
                .map_err(|e| Error::BadRequest(format!("cannot start decoder thread: {e}")))?;
        }
        Ok(Arc::new(Self { config, catalog, tx, permits: Arc::new(Semaphore::new(in_flight)), metrics, clock }))
    }

    /// The stream catalog the payloads are decoded against.
    pub fn catalog(&self) -> &Arc<StreamCatalog> {
        &self.catalog
    }

    /// The configured payload limit.
    pub fn max_payload_bytes(&self) -> usize {
        self.config.max_payload_bytes
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Decodes `bytes` and hands the rows to the engine; returns after `durability`.
    /// Takes its room first ([`Ingestor::admit`]).
    pub async fn ingest(
        &self,
        transport: Transport,
        payload: Payload,
        bytes: Bytes,
        durability: Durability,
    ) -> Result<IngestReport> {
        let admission = self.admit(transport).await?;
        self.ingest_admitted(admission, transport, payload, bytes, durability).await
    }

    /// Takes room for one payload: waits up to `overload_wait` for an overload to end,
    /// then for a payload in flight to finish: an MQTT session (and the platform's own
    /// writes) as long as it takes, its socket unread meanwhile; an HTTP or CoAP request up
    /// to `overload_wait`. While the hot buffer is past its soft bound, HTTP and CoAP requests
    /// are turned away in proportion to how far ([`Error::Shed`]). Refused with
    /// [`Error::Overloaded`], [`Error::Shed`] or [`Error::Busy`] (all counted as rejected).
    pub async fn admit(&self, transport: Transport) -> Result<Admission> {
        if !self.config.health.wait_admitted(self.config.overload_wait).await {
            self.metrics.inc(
                "ferrite_rejected_events_total",
                &[("transport", transport.as_str()), ("reason", "overloaded")],
                1,
            );
            return Err(Error::Overloaded { retry_after: RETRY_AFTER_SECS });
        }
        let health = &self.config.health;
        if matches!(transport, Transport::Http | Transport::LineProtocol | Transport::Coap) && health.shed() {
            self.metrics.inc(
                "ferrite_rejected_events_total",
                &[("transport", transport.as_str()), ("reason", "shed")],
                1,
            );
            return Err(Error::Shed { percent: health.pressure() / 10, retry_after: BUSY_RETRY_AFTER_SECS });
        }
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Error::ShuttingDown),
            Err(tokio::sync::TryAcquireError::NoPermits) => self.wait_for_room(transport).await?,
        };
        Ok(Admission { permit })
    }

    /// The slow path of [`Ingestor::admit`]: every payload in flight is taken.
    async fn wait_for_room(&self, transport: Transport) -> Result<OwnedSemaphorePermit> {
        let started = Instant::now();
        let acquire = self.permits.clone().acquire_owned();
        let acquired = match transport {
            Transport::Mqtt | Transport::Internal => acquire.await,
            Transport::Http | Transport::LineProtocol | Transport::Coap => {
                let wait = self.config.overload_wait;
                let Ok(acquired) = tokio::time::timeout(wait, acquire).await else {
                    self.metrics.inc(
                        "ferrite_rejected_events_total",
                        &[("transport", transport.as_str()), ("reason", "busy")],
                        1,
                    );
                    return Err(Error::Busy { waited_ms: wait.as_millis() as u64, retry_after: BUSY_RETRY_AFTER_SECS });
                };
                acquired
            }
        };
        self.metrics
            .histogram("ferrite_ingest_admission_wait_seconds", &[("transport", transport.as_str())])
            .observe(started.elapsed());
        acquired.map_err(|_| Error::ShuttingDown)
    }

    /// [`Ingestor::ingest`] with room already taken by [`Ingestor::admit`].
    pub async fn ingest_admitted(
        &self,
        admission: Admission,
        transport: Transport,
        payload: Payload,
        bytes: Bytes,
        durability: Durability,
    ) -> Result<IngestReport> {
        if bytes.len() > self.config.max_payload_bytes {
            self.metrics.inc(
                "ferrite_rejected_events_total",
                &[("transport", transport.as_str()), ("reason", "payload_too_large")],
                1,
            );
            return Err(Error::PayloadTooLarge { size: bytes.len(), limit: self.config.max_payload_bytes });
        }
        // The platform's own streams (usage, audit) are not charged to a tenant's quota.
        let charged = match transport {
            Transport::Internal => None,
            _ => payload.tenant().filter(|_| self.config.quotas.is_active()).map(str::to_owned),
        };
        if let Some(tenant) = &charged
            && let Err(e) = self.config.quotas.check_ingest(tenant)
        {
            self.metrics.inc("ferrite_quota_refused_total", &[("quota", e.quota.as_str())], 1);
            self.metrics.inc(
                "ferrite_rejected_events_total",
                &[("transport", transport.as_str()), ("reason", "quota_exceeded")],
                1,
            );
            return Err(Error::QuotaExceeded(e));
        }
        let size = payload.size(&bytes);
        let permit = admission.permit;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            transport,
            payload,
            bytes,
            received_at: self.clock.now_nanos(),
            reply,
            detached: durability == Durability::Queued,
            _permit: permit,
        };
        self.tx.try_send(job).map_err(|_| Error::ShuttingDown)?;
        let (report, waiter) = rx.await.map_err(|_| Error::ShuttingDown)??;
        if let Some(w) = waiter {
            match w.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Error::Commit(e)),
                Err(_) => return Err(Error::Commit("the engine stopped before committing".to_owned())),
            }
        }
        if let Some(tenant) = &charged {
            self.config.quotas.add_ingest(tenant, report.accepted as u64, size as u64);
        }
        Ok(report)
    }
}

struct Decoder {
    rx: Receiver<Job>,
    catalog: Arc<StreamCatalog>,
    sink: Arc<dyn BatchSink>,
    metrics: Arc<Metrics>,
    max_hours: usize,
    naming: line_protocol::DeviceNaming,
}

/// Distinct event-time hours of `batches` when they are more than `limit` (counting no
/// further than `limit + 1`); `None` when within it. The usual payload spans an hour or two,
/// which the min and max kernels settle without looking at rows one by one.
fn hours_over_limit(batches: &[StreamBatch], limit: usize) -> Option<usize> {
    const NS_PER_HOUR: i64 = 3_600_000_000_000;
    let times = || {
        batches
            .iter()
            .filter_map(|b| b.batch.column(0).as_any().downcast_ref::<arrow::array::TimestampNanosecondArray>())
    };
    let lo = times().filter_map(arrow::compute::min).min()?;
    let hi = times().filter_map(arrow::compute::max).max()?;
    let span = hi.div_euclid(NS_PER_HOUR) - lo.div_euclid(NS_PER_HOUR) + 1;
    if span <= limit as i64 {
        return None;
    }
    let mut hours = ahash::AHashSet::new();
    for t in times() {
        let mut last = None;
        for v in t.values().iter() {
            let h = v.div_euclid(NS_PER_HOUR);
            if last != Some(h) {
                last = Some(h);
                hours.insert(h);
                if hours.len() > limit {
                    return Some(hours.len());
                }
            }
        }
    }
    None
}

impl Decoder {
    fn run(self) {
        while let Ok(job) = self.rx.recv() {
            let Job { transport, payload, bytes, received_at, reply, detached, _permit } = job;
            let started = Instant::now();
            let result = self.decode_and_submit(transport, payload, &bytes, received_at, detached);
            tracing::trace!(elapsed = ?started.elapsed(), "payload decoded");
            // The transport may have given up (client gone); the rows are in the engine anyway.
            let _ = reply.send(result);
        }
    }

    fn decode(&self, payload: Payload, bytes: &[u8], now: i64) -> Result<(Vec<StreamBatch>, Vec<Rejection>)> {
        match payload {
            Payload::Json { stream, device } => {
                let mut b = BatchBuilder::new(self.catalog.clone(), &stream)?;
                let source = match &device {
                    Some(d) => DeviceSource::Fixed(d),
                    None => DeviceSource::PerEvent,
                };
                let rejections = JsonDecoder::new(&mut b, source, now).decode(bytes)?;
                Ok((b.finish().into_iter().collect(), rejections))
            }
            Payload::JsonMany { stream, device, payloads } => {
                let mut b = BatchBuilder::new(self.catalog.clone(), &stream)?;
                let mut rejections = Vec::new();
                for (i, p) in payloads.iter().enumerate() {
                    let before = b.rows();
                    match JsonDecoder::new(&mut b, DeviceSource::Fixed(&device), now).decode(p) {
                        Ok(r) => rejections.extend(r.into_iter().map(|r| Rejection { index: i, ..r })),
                        Err(e) => {
                            b.rollback_to(before);
                            rejections.push(Rejection { index: i, reason: e.code(), message: e.to_string() });
                        }
                    }
                }
                Ok((b.finish().into_iter().collect(), rejections))
            }
            Payload::Ndjson { stream } => {
                let mut b = BatchBuilder::new(self.catalog.clone(), &stream)?;
                let rejections = JsonDecoder::new(&mut b, DeviceSource::PerEvent, now).decode_ndjson(bytes);
                Ok((b.finish().into_iter().collect(), rejections))
            }
            Payload::Batches { batches, .. } => Ok((batches, Vec::new())),
            Payload::LineProtocol { precision, tenant, options } => {
                let text = std::str::from_utf8(bytes).map_err(|e| Error::NotUtf8(e.valid_up_to()))?;
                let with_request;
                let naming = if options.device_tag.is_some() || options.default_device.is_some() {
                    with_request =
                        self.naming.with_request(options.device_tag.as_deref(), options.default_device.as_deref());
                    &with_request
                } else {
                    &self.naming
                };
                let out = line_protocol::decode(&self.catalog, &tenant, text, precision, naming, now);
                if options.all_or_nothing && !out.rejections.is_empty() {
                    return Ok((Vec::new(), out.rejections));
                }
                Ok((out.batches, out.rejections))
            }
        }
    }

    fn decode_and_submit(
        &self,
        transport: Transport,
        payload: Payload,
        bytes: &[u8],
        now: i64,
        detached: bool,
    ) -> Result<(IngestReport, Option<AckWaiter>)> {
        let t = transport.as_str();
        let payload_bytes = payload.size(bytes);
        let (batches, mut rejections) = match self.decode(payload, bytes, now) {
            Ok(x) => x,
            Err(e) => {
                self.metrics.inc("ferrite_rejected_events_total", &[("transport", t), ("reason", e.code())], 1);
                return Err(e);
            }
        };
        if let Some(hours) = hours_over_limit(&batches, self.max_hours) {
            let rows: usize = batches.iter().map(StreamBatch::num_rows).sum();
            self.metrics.inc(
                "ferrite_rejected_events_total",
                &[("transport", t), ("reason", "too_many_hours")],
                rows as u64,
            );
            return Err(Error::TooManyHours { hours, limit: self.max_hours });
        }
        for r in &rejections {
            self.metrics.inc("ferrite_rejected_events_total", &[("transport", t), ("reason", r.reason)], 1);
            tracing::debug!(transport = t, reason = r.reason, message = %r.message, "event rejected");
        }
        let accepted: usize = batches.iter().map(StreamBatch::num_rows).sum();
        for b in &batches {
            let s = b.stream.as_str();
            self.metrics.inc("ferrite_ingested_events_total", &[("stream", s), ("transport", t)], b.num_rows() as u64);
            let share = (payload_bytes as u64 * b.num_rows() as u64) / accepted.max(1) as u64;
            self.metrics.inc("ferrite_ingested_bytes_total", &[("stream", s), ("transport", t)], share);
        }
        let rejected = rejections.len();
        rejections.truncate(MAX_REPORTED_REJECTIONS);
        let report = IngestReport { accepted, rejected, rejections };
        if batches.is_empty() {
            return Ok((report, None));
        }
        if detached {
            self.sink.submit(batches, Ack::detached())?;
            Ok((report, None))
        } else {
            let (ack, waiter) = Ack::new();
            self.sink.submit(batches, ack)?;
            Ok((report, Some(waiter)))
        }
    }
}

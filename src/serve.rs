//! `ferrite serve`: builds the engine, storage, ingest and query services and runs them
//! until SIGTERM or Ctrl-C, then shuts down in order: ingest stops, the engine drains, the
//! hot buffer is persisted to Parquet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferrite_engine::{Engine, EngineConfig, Health, Metrics, StreamCatalog, SystemClock};
use ferrite_ingest::mqtt::{self, Broker};
use ferrite_ingest::{IngestConfig, Ingestor};
use ferrite_query::QueryService;
use ferrite_rules::{RuleEngine, RuleFiles};
use ferrite_storage::{Storage, StorageConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::identity;

pub fn run(config: Config) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.log)).context("invalid log filter")?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("ferrite-io").build()?;
    runtime.block_on(serve(config))
}

/// Saves `what` every `period` until aborted; a failed save is logged and tried again.
fn every<E: std::fmt::Display>(
    period: Duration,
    what: &'static str,
    save: impl Fn() -> Result<(), E> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = save() {
                tracing::warn!(error = %e, "cannot save {what}; retrying");
            }
        }
    })
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shards = match config.shards {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    // Rate limits first: a malformed one stops the start before anything opens.
    let limiter = Arc::new(ferrite_engine::limits::RateLimiter::new(config.limits()?));
    let quota_config = config.quotas()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
    // Today's counts survive a restart (saved every few seconds and at shutdown).
    let quotas = Arc::new(ferrite_engine::quota::Quotas::new(
        quota_config,
        Some(config.data_dir.join("quota-usage.json")),
        Arc::new(SystemClock),
    )?);
    let quota_saver = quotas.is_active().then(|| {
        let quotas = quotas.clone();
        every(Duration::from_secs(5), "the day's quota counts", move || quotas.save())
    });
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    let catalog = Arc::new(StreamCatalog::open(&config.data_dir.join("catalog").join("streams.json"))?);
    catalog.set_limits(ferrite_engine::CatalogLimits {
        max_streams: config.max_streams,
        max_fields_per_stream: config.max_fields_per_stream,
    });
    anyhow::ensure!(
        (0.05..=1.0).contains(&config.compaction_cpu),
        "compaction_cpu = {} is out of range: use a share of one core from 0.05 to 1.0",
        config.compaction_cpu
    );
    let storage_config = StorageConfig {
        data_dir: config.data_dir.clone(),
        persist_interval: config.persist_interval,
        hot_max_bytes: config.hot_buffer_max,
        shards,
        archive_url: Some(config.archive_url.clone()).filter(|u| !u.is_empty()),
        archive_retry_timeout: config.archive_retry_timeout,
        health: health.clone(),
        maintenance: ferrite_storage::MaintenanceConfig {
            compaction: config.compaction,
            interval: config.compaction_interval,
            compact_after: config.compact_after,
            target_file_bytes: config.compaction_target_size as u64,
            max_merge_bytes: config.compaction_max_merge as u64,
            duty: config.compaction_cpu,
            retired_grace: config.retired_grace,
        },
    };
    let handle = tokio::runtime::Handle::current();
    let storage = {
        let (catalog, metrics) = (catalog.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || Storage::open(storage_config, catalog, metrics, handle)).await??
    };
    let storage_location = storage.archive_location().to_owned();
    let engine_config = EngineConfig {
        shards,
        max_group_rows: config.commit_max_rows,
        group_linger: config.commit_linger,
        ..EngineConfig::default()
    };
    let engine = Engine::start(engine_config, storage.clone(), metrics.clone())?;
    // Rules run on the shard threads, after each commit; their actions go through the
    // embedded broker and the webhook client.
    let broker = Arc::new(Broker::new(metrics.clone()));
    // Retained messages survive a restart (saved every 10 seconds when they changed, and at
    // shutdown).
    let retained = broker.load_retained(config.data_dir.join("mqtt-retained.bin"))?;
    if retained > 0 {
        tracing::info!(retained, "mqtt retained messages loaded");
    }
    let retained_saver = {
        let broker = broker.clone();
        every(Duration::from_secs(10), "the mqtt retained messages", move || broker.save_retained())
    };
    let actions = Arc::new(crate::actions::ServerActions::start(broker.clone(), metrics.clone())?);
    let rules =
        Arc::new(RuleEngine::new(shards, catalog.clone(), metrics.clone(), actions.clone(), Arc::new(SystemClock)));
    engine.add_observer(rules.clone());
    let table_dir = if config.rules_table_dir.as_os_str().is_empty() {
        config.rules_dir.clone()
    } else {
        config.rules_table_dir.clone()
    };
    rules.set_sandbox(ferrite_rules::sandbox::Sandbox { table_dir, webhook_hosts: config.webhook_allow_hosts.clone() });

    let default_device = (!config.default_device.is_empty()).then(|| config.default_device.clone());
    if let Some(d) = &default_device {
        ferrite_engine::ids::validate_device_id(d)
            .map_err(|e| anyhow::anyhow!("default_device {d:?} is not a device id: {e}"))?;
    }
    let ingest_config = IngestConfig {
        max_payload_bytes: config.max_payload,
        max_in_flight: config.ingest_max_in_flight.max(1),
        overload_wait: config.ingest_max_wait,
        health: health.clone(),
        max_hours_per_request: config.max_hours_per_request,
        device_tags: config.device_tags.clone(),
        default_device,
        quotas: quotas.clone(),
        ..IngestConfig::default()
    };
    let ingestor =
        Ingestor::start(ingest_config, catalog.clone(), engine.clone(), metrics.clone(), Arc::new(SystemClock))?;
    let query_limits = ferrite_query::QueryConfig {
        timeout: config.sql_timeout,
        memory_limit: config.sql_memory_limit,
        max_result_bytes: config.sql_max_result,
    };
    let query = Arc::new(QueryService::with_config(catalog.clone(), storage.clone(), metrics.clone(), query_limits)?);
    if quotas.is_active() {
        query.set_quotas(quotas.clone());
    }
    query.add_system_table(Arc::new(ferrite_rules::inspect::RuleStateTable(rules.clone())));
    query.add_system_table(Arc::new(ferrite_rules::inspect::WatermarksTable(rules.clone())));
    // Streams joined as tables (`join rule_params on ...`) start from their rows so far.
    rules.set_table_loader(Arc::new(SqlTables { query: query.clone(), handle: tokio::runtime::Handle::current() }));
    let rule_files = Arc::new(RuleFiles::new(&config.rules_dir, rules.clone()));
    rule_files.scan();
    // The rules continue from their last checkpoint: its state, then the inputs the WAL
    // holds after it (outputs a crash lost are committed now), before any client connects.
    // From here on each persist takes its cut through the engine and writes a checkpoint.
    if let Some(recovery) = storage.take_recovery() {
        let engine = engine.clone();
        match tokio::task::spawn_blocking(move || engine.recover(recovery)).await? {
            Ok(report) => tracing::info!(
                input_rows = report.input_rows,
                outputs_found = report.found_rows,
                outputs_restored = report.committed_rows,
                "rules recovered from their last checkpoint"
            ),
            // A checkpoint that cannot be used costs the rules their state, never the start.
            Err(e) => {
                metrics.inc("ferrite_checkpoint_failures_total", &[("step", "restore")], 1);
                tracing::error!(error = %e, "cannot recover the rules from their last checkpoint; they go on from here");
            }
        }
    }
    storage.set_cutter(Arc::downgrade(&engine) as std::sync::Weak<dyn ferrite_engine::Cutter>);
    // A checkpoint now: what the rules hold after recovery (or nothing, on a first start) at
    // the WAL's current end, so that a crash before the first persist does not replay more.
    {
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || storage.checkpoint()).await??;
    }
    let watch_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = rule_files.clone().spawn(Duration::from_millis(500), watch_stop.clone())?;

    let persister = {
        let storage = storage.clone();
        std::thread::Builder::new().name("ferrite-persist".into()).spawn(move || storage.run_persister())?
    };
    let maintenance = {
        let storage = storage.clone();
        std::thread::Builder::new().name("ferrite-compact".into()).spawn(move || storage.run_maintenance())?
    };

    let mqtt_listener = TcpListener::bind(config.mqtt_listen)
        .await
        .with_context(|| format!("cannot listen for MQTT on {} (set --mqtt-listen)", config.mqtt_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {} (set --http-listen)", config.http_listen))?;
    let mqtt_addr = mqtt_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let client_ca = Some(config.tls_client_ca.as_path()).filter(|p| !p.as_os_str().is_empty());
    let tls = match (config.tls_cert.as_os_str().is_empty(), config.tls_key.as_os_str().is_empty()) {
        (true, true) if client_ca.is_some() => {
            anyhow::bail!("tls_client_ca needs the server's own certificate: set tls_cert and tls_key too")
        }
        (true, true) => None,
        (false, false) => Some(crate::tls::TlsFiles::load(&config.tls_cert, &config.tls_key, client_ca)?),
        _ => anyhow::bail!("set both tls_cert and tls_key (PEM files), or neither"),
    };
    // MQTT over TLS and HTTPS listen once there is a certificate.
    let (mqtts_listener, https_listener) = match &tls {
        Some(_) => (
            optional_listener(&config.mqtts_listen, "mqtts_listen", "MQTT over TLS").await?,
            optional_listener(&config.https_listen, "https_listen", "HTTPS").await?,
        ),
        None => (None, None),
    };
    let mqtts_addr = mqtts_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let https_addr = https_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let pg_listener = optional_listener(&config.pg_listen, "pg_listen", "the PostgreSQL wire protocol").await?;
    let pg_addr = pg_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let flight_listener = optional_listener(&config.flight_listen, "flight_listen", "Arrow Flight SQL").await?;
    let flight_addr = flight_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let coap_addr: Option<std::net::SocketAddr> = match config.coap_listen.trim() {
        "off" | "" => None,
        a => Some(a.parse().with_context(|| format!("coap_listen {a:?} is not an address (or `off`)"))?),
    };

    // Identity: the decision point every door asks, and the plugins' context.
    let mut actuation = None;
    let core = identity::Core {
        catalog: &catalog,
        engine: &engine,
        ingestor: &ingestor,
        broker: &broker,
        tables: query.tenant_tables(),
        query: &query,
        metrics: &metrics,
        actuation: &mut actuation,
    };
    let (access, plugins) = identity::start(&config, http_addr, core).await?;
    if let Some(a) = actuation {
        actions.set_actuation(a);
    }
    actions.set_access(access.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    // API usage as data: every call and session a row of its tenant's `api_usage` stream.
    let (usage, usage_writer) = if config.api_usage {
        let writer = Arc::new(crate::identity::IngestWriter(ingestor.clone()));
        let (log, w) = ferrite_engine::usage::UsageLog::start(writer, metrics.clone());
        (log, Some(w))
    } else {
        (ferrite_engine::usage::UsageLog::off(metrics.clone()), None)
    };
    // One front for MQTT on TCP, TLS and WebSocket: the same limits, sessions and drain.
    let front = mqtt::MqttFront::new(
        ingestor.clone(),
        broker.clone(),
        metrics.clone(),
        access.clone(),
        mqtt::MqttLimits {
            max_connections: config.mqtt_max_connections,
            max_connections_per_ip: config.mqtt_max_connections_per_ip,
            max_subscriptions_per_session: config.mqtt_max_subscriptions,
            max_connections_per_tenant: config.mqtt_max_connections_per_tenant,
            user_properties_as_fields: config.mqtt_user_properties_as_fields,
        },
        mqtt::Accounting { limiter: limiter.clone(), usage: usage.clone() },
        stop_rx.clone(),
    );
    let mqtt_task = tokio::spawn(mqtt::serve(mqtt_listener, front.clone()));
    let coap = match coap_addr {
        Some(addr) => {
            let config = ferrite_ingest::coap::CoapConfig {
                max_rate_per_ip: config.coap_max_rate_per_ip,
                max_observations: config.coap_max_observations,
                ..Default::default()
            };
            match ferrite_ingest::coap::CoapServer::bind(addr, ingestor.clone(), broker.clone(), access.clone(), config)
                .await
            {
                Ok(server) => Some(server),
                // CoAP listens by default since it was added: a machine that already runs
                // several servers side by side (or another CoAP server) keeps working, with a
                // warning, unless CoAP was asked for on another address.
                Err(e) if addr == default_coap_addr() => {
                    tracing::warn!(
                        %addr, error = %e,
                        "CoAP is off: its default port is taken (set --coap-listen to another address, or `off`)"
                    );
                    None
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot listen for CoAP on {addr} (set --coap-listen, or `off`)"));
                }
            }
        }
        None => None,
    };
    let coap_addr = coap.as_ref().map(|c| c.local_addr()).transpose()?;
    let coap_task = coap.map(|c| tokio::spawn(c.run(stop_rx.clone())));
    let mqtts_task = match (mqtts_listener, &tls) {
        (Some(l), Some(files)) => Some(tokio::spawn(crate::tls::serve_mqtts(
            l,
            files.clone(),
            front.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ))),
        _ => None,
    };
    if let Some(files) = &tls {
        spawn_reload_on_hangup(files.clone());
    }

    let mut protected = utoipa_axum::router::OpenApiRouter::new()
        .merge(ferrite_ingest::http::router(ingestor.clone()))
        .merge(ferrite_query::http::router(query.clone()))
        .merge(ferrite_rules::http::router(ferrite_rules::http::RulesApi { engine: rules, files: Some(rule_files) }))
        .merge(operations_routes(metrics.clone()));
    let document = crate::openapi::Document::default();
    let mut public = utoipa_axum::router::OpenApiRouter::new()
        .merge(health_routes(health.clone()))
        .merge(crate::openapi::routes(document.clone()));
    for plugin in &plugins {
        let routes = plugin.routes();
        protected = protected.merge(routes.protected);
        public = public.merge(routes.public);
    }
    let (protected, protected_doc) = protected.split_for_parts();
    let (public, mut doc) = public.split_for_parts();
    doc.merge(protected_doc);
    // `/mqtt` authenticates in its CONNECT, and each port serves its own door (ws or wss).
    let (mqtt_ws, mqtt_doc) = ferrite_ingest::mqtt_ws::router(front.clone(), false).split_for_parts();
    let (mqtt_wss, _) = ferrite_ingest::mqtt_ws::router(front.clone(), true).split_for_parts();
    doc.merge(mqtt_doc);
    let doc = crate::openapi::finish(doc);
    // Limits run after authentication (they are per principal and tenant).
    let protected = ferrite_plugin::throttle::throttle(protected, limiter.clone(), metrics.clone());
    // Outside the throttle, so that 429s are recorded too.
    let protected = ferrite_plugin::usage::record_usage(protected, usage.clone());
    let app = ferrite_plugin::protect(protected, access.clone())
        .merge(public)
        .fallback(no_route)
        .layer(axum::middleware::from_fn(ferrite_plugin::close_after_error));
    match crate::openapi::coverage(&app.clone().merge(mqtt_ws.clone()), &doc) {
        Some(c) if c.complete() => {}
        Some(c) => {
            let message = format!(
                "the HTTP router and its OpenAPI document disagree: served but undocumented {:?}, documented but \
                 not served {:?}; register each route with utoipa_axum::routes! and a #[utoipa::path] on its handler",
                c.undocumented, c.unserved
            );
            if cfg!(debug_assertions) {
                anyhow::bail!(message);
            }
            tracing::error!("{message}");
        }
        None => tracing::warn!("cannot list the router's routes to check the OpenAPI document against them"),
    }
    document.set(&doc)?;
    let https_task = match (https_listener, &tls) {
        (Some(l), Some(files)) => {
            let listener = crate::tls::HttpsListener::start(l, files.clone(), metrics.clone())?;
            let app = app
                .clone()
                .merge(mqtt_wss)
                .layer(axum::Extension(ferrite_plugin::usage::OverTls))
                .layer(axum::middleware::from_fn(crate::tls::https_peer));
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, app.into_make_service_with_connect_info::<crate::tls::HttpsPeer>())
                    .with_graceful_shutdown(async move {
                        let _ = stop.changed().await;
                    })
                    .await
            }))
        }
        _ => None,
    };
    let app = app.merge(mqtt_ws);
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = http_stop.changed().await;
            })
            .await
    });

    tracing::info!(
        mqtt = %mqtt_addr,
        http = %http_addr,
        data_dir = %config.data_dir.display(),
        rules_dir = %config.rules_dir.display(),
        archive = storage_location,
        shards,
        tls = tls.is_some(),
        mutual_tls = tls.as_ref().is_some_and(|t| t.mutual()),
        "ferrite is running"
    );
    let pg_task = pg_listener.map(|l| tokio::spawn(crate::pg::serve(l, query.clone(), access.clone(), tls.clone())));
    // A stable line on stdout for scripts and tests that start the server on port 0.
    let flight_task = flight_listener.map(|l| tokio::spawn(crate::flight::serve(l, query.clone(), access.clone())));
    let mut listening = format!("ferrite listening: mqtt={mqtt_addr} http={http_addr}");
    if let Some(a) = mqtts_addr {
        listening.push_str(&format!(" mqtts={a}"));
    }
    if let Some(a) = https_addr {
        listening.push_str(&format!(" https={a}"));
    }
    if let Some(pg) = pg_addr {
        listening.push_str(&format!(" pg={pg}"));
    }
    if let Some(flight) = flight_addr {
        listening.push_str(&format!(" flight={flight}"));
    }
    if let Some(coap) = coap_addr {
        listening.push_str(&format!(" coap={coap}"));
    }
    println!("{listening}");

    wait_for_signal().await;
    tracing::info!("shutting down: stopping ingest");
    let _ = stop_tx.send(true);
    for t in [pg_task, flight_task].into_iter().flatten() {
        t.abort();
    }
    if let Some(t) = mqtts_task {
        let _ = t.await;
    }
    // Drains every MQTT session, the TLS and WebSocket ones too.
    let _ = mqtt_task.await;
    if let Some(t) = coap_task {
        let _ = t.await;
    }
    for (t, name) in [(Some(http_task), "http"), (https_task, "https")] {
        let Some(t) = t else { continue };
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, listener = name, "server error during shutdown"),
            Err(_) => tracing::warn!(listener = name, "requests still running after 30s; closing anyway"),
            _ => {}
        }
    }
    drop((usage, front));
    retained_saver.abort();
    if let Err(e) = broker.save_retained() {
        tracing::warn!(error = %e, "cannot save the mqtt retained messages");
    }
    if let Some(saver) = quota_saver {
        saver.abort();
        if let Err(e) = quotas.save() {
            tracing::warn!(error = %e, "cannot save the day's quota counts");
        }
    }
    if let Some(w) = usage_writer {
        w.finish().await;
    }
    for plugin in plugins.iter().rev() {
        plugin.stop().await;
    }
    watch_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.thread().unpark();
    let _ = watcher.join();
    tracing::info!("draining the engine and persisting the hot buffer");
    let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        engine.flush()?;
        storage.stop_persister();
        storage.stop_maintenance();
        if persister.join().is_err() {
            tracing::error!("the persister thread panicked");
        }
        if maintenance.join().is_err() {
            tracing::error!("the compaction thread panicked");
        }
        // The last persist's checkpoint is the state the next start continues from: taken
        // with the clock-driven rule work stopped, so nothing follows it.
        engine.stop_ticks();
        let rows = storage.persist()?;
        engine.shutdown();
        Ok(rows)
    })
    .await??;
    tracing::info!(rows, "shutdown complete");
    Ok(())
}

/// The server's health.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct HealthAnswer {
    /// `ok` or `degraded`.
    status: &'static str,
    /// What is wrong, when degraded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasons: Vec<HealthReason>,
}

/// One thing that is wrong.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct HealthReason {
    /// `storage`, `wal`, `ingest`, ...
    component: String,
    message: String,
}

fn health_routes(health: Arc<Health>) -> utoipa_axum::router::OpenApiRouter {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(healthz)).with_state(health)
}

/// `GET /healthz`: 200 `{"status": "ok"}`, or 503 `{"status": "degraded", "reasons": [...]}`
/// while persists or WAL commits fail or ingest is held back, so that orchestrators and load
/// balancers can act.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Healthy", body = HealthAnswer),
        (status = 503, description = "Degraded: persists or WAL commits fail, or ingest is held back", body = HealthAnswer),
    ))]
async fn healthz(axum::extract::State(health): axum::extract::State<Arc<Health>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut reasons: Vec<HealthReason> =
        health.conditions().into_iter().map(|(component, message)| HealthReason { component, message }).collect();
    if health.overloaded() {
        reasons.push(HealthReason {
            component: "ingest".into(),
            message: "the hot buffer is past its hard bound: new data is refused until a persist succeeds".into(),
        });
    }
    if reasons.is_empty() {
        return axum::Json(HealthAnswer { status: "ok", reasons }).into_response();
    }
    (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(HealthAnswer { status: "degraded", reasons }))
        .into_response()
}

fn operations_routes(metrics: Arc<Metrics>) -> utoipa_axum::router::OpenApiRouter {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(get_metrics)).with_state(metrics)
}

/// Prometheus metrics (needs `read_metrics`).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "The metrics in Prometheus' text format", content_type = "text/plain", body = String),
        (status = 403, description = "The caller may not read metrics", body = ferrite_engine::api_doc::ErrorBody),
    ))]
async fn get_metrics(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
    axum::Extension(caller): axum::Extension<ferrite_engine::Caller>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let tenant = ferrite_engine::Resource::tenant(ferrite_engine::ids::DEFAULT_TENANT);
    match caller.check(ferrite_engine::Action::ReadMetrics, &tenant) {
        Ok(()) => ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render()).into_response(),
        Err(e) => ferrite_plugin::forbidden(&e),
    }
}

/// The answer to a path no route serves: 404 with the error body, pointing at the document.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> axum::response::Response {
    ferrite_plugin::error_response(
        axum::http::StatusCode::NOT_FOUND,
        "no_route",
        &format!("no endpoint {method} {}; the API is described at {}", uri.path(), crate::openapi::DOCUMENT_PATH),
    )
}

/// Reads a stream for a rule that joins it as a table, through SQL.
struct SqlTables {
    query: Arc<QueryService>,
    handle: tokio::runtime::Handle,
}

impl ferrite_rules::runtime::TableLoader for SqlTables {
    fn load(&self, stream: &str) -> Result<Vec<arrow::array::RecordBatch>, String> {
        // `stream` is a key: the stream of a tenant, read in that tenant's scope.
        let name = ferrite_engine::StreamName::from_key(stream).map_err(|e| e.to_string())?;
        let sql = format!("SELECT * FROM \"{}\" ORDER BY time", name.local());
        let scope = ferrite_query::Scope::tenant(name.tenant());
        let (query, handle) = (self.query.clone(), self.handle.clone());
        // Deploys may come from async handlers: run the query to completion on a thread of
        // its own rather than blocking a runtime worker inside the runtime.
        std::thread::scope(|s| s.spawn(move || handle.block_on(query.sql_in(&scope, &sql))).join())
            .map_err(|_| "the table loader panicked".to_owned())?
            .map(|r| r.batches)
            .map_err(|e| format!("cannot read stream `{stream}`: {e}"))
    }
}

/// Reads the TLS files again on every SIGHUP (they are also read when they change).
fn spawn_reload_on_hangup(files: std::sync::Arc<crate::tls::TlsFiles>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reading the TLS files again");
                        files.reload();
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP; TLS files are still read again when they change")
            }
        }
    }
    #[cfg(not(unix))]
    let _ = files;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The listener a setting names (`off` or empty: none).
/// The CoAP listener's default address (`coap_listen`'s default).
fn default_coap_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 5683))
}

async fn optional_listener(setting: &str, key: &str, what: &str) -> anyhow::Result<Option<TcpListener>> {
    let addr = match setting.trim() {
        "off" | "" => return Ok(None),
        a => a,
    };
    let addr: std::net::SocketAddr =
        addr.parse().with_context(|| format!("{key} {addr:?} is not an address (or `off`)"))?;
    let flag = key.replace('_', "-");
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr} (set --{flag}, or `off`)"))?;
    Ok(Some(listener))
}

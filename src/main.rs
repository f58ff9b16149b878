//! The `ferrite` binary: command-line parsing and the wiring of the crates. No logic of its
//! own lives here; see the crates' docs for what each part does.

mod actions;
mod certs_cmd;
mod client;
mod config;
mod device_cmd;
mod flight;
mod identity;
mod identity_cmd;
mod openapi;
mod ota_cmd;
mod pg;
mod rules_cmd;
mod serve;
mod sql;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ferrite: an IoT platform with a columnar stream-processing engine at its core.
#[derive(Debug, Parser)]
#[command(name = "ferrite", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the platform: MQTT and HTTP ingest, storage, SQL.
    Serve(Box<ServeArgs>),
    /// Run a SQL query against a running server and print the result.
    Sql(sql::SqlArgs),
    /// Check and test rule files.
    Rules(rules_cmd::RulesArgs),
    /// Create, list and revoke API tokens; rotate the signing key.
    Token(identity_cmd::TokenArgs),
    /// Manage users of the embedded directory.
    User(identity_cmd::UserArgs),
    /// Manage clients of the token endpoint (services and devices).
    Client(identity_cmd::ClientArgs),
    /// Check what the policies decide.
    Policy(identity_cmd::PolicyArgs),
    /// Manage the device registry of a running server.
    Device(device_cmd::DeviceArgs),
    /// Sign software updates: make a key pair, sign an artifact.
    Ota(ota_cmd::OtaArgs),
    /// Make certificates: `certs dev` writes a local CA, a server and device certificates.
    Certs(certs_cmd::CertsArgs),
}

/// Flags of `ferrite serve`; each overrides `ferrite.toml` and has a `FERRITE_*` variable.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (default: ./ferrite.toml if it exists).
    #[arg(long, env = "FERRITE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (WAL, catalog, archive).
    #[arg(long, env = "FERRITE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Rules directory.
    #[arg(long, env = "FERRITE_RULES_DIR")]
    rules_dir: Option<PathBuf>,
    /// Archive location: a directory, file:///dir or s3://bucket/prefix (default: DATA_DIR/archive).
    #[arg(long, env = "FERRITE_ARCHIVE_URL")]
    archive_url: Option<String>,
    /// How long one S3 request is retried before its persist fails and is tried again (e.g. 30s).
    #[arg(long, env = "FERRITE_ARCHIVE_RETRY_TIMEOUT")]
    archive_retry_timeout: Option<String>,
    /// MQTT listen address (port 0: any free port).
    #[arg(long, env = "FERRITE_MQTT_LISTEN")]
    mqtt_listen: Option<SocketAddr>,
    /// HTTP listen address (port 0: any free port).
    #[arg(long, env = "FERRITE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// PostgreSQL wire protocol listen address (port 0: any free port), or `off`.
    #[arg(long, env = "FERRITE_PG_LISTEN")]
    pg_listen: Option<String>,
    /// Arrow Flight SQL listen address (port 0: any free port), or `off`.
    #[arg(long, env = "FERRITE_FLIGHT_LISTEN")]
    flight_listen: Option<String>,
    /// CoAP (UDP) listen address (port 0: any free port), or `off`.
    #[arg(long, env = "FERRITE_COAP_LISTEN")]
    coap_listen: Option<String>,
    /// CoAP requests per second from one IP address (0: no limit).
    #[arg(long, env = "FERRITE_COAP_MAX_RATE_PER_IP")]
    coap_max_rate_per_ip: Option<u32>,
    /// Most CoAP observations (devices waiting for commands) at once.
    #[arg(long, env = "FERRITE_COAP_MAX_OBSERVATIONS")]
    coap_max_observations: Option<usize>,
    /// PEM certificate chain for TLS (MQTT over TLS, HTTPS, the PostgreSQL wire); needs --tls-key.
    #[arg(long, env = "FERRITE_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FERRITE_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates whose client certificates authenticate devices (mutual TLS).
    #[arg(long, env = "FERRITE_TLS_CLIENT_CA")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// MQTT over TLS listen address, used once --tls-cert is set (port 0: any free port), or `off`.
    #[arg(long, env = "FERRITE_MQTTS_LISTEN")]
    mqtts_listen: Option<String>,
    /// HTTPS listen address, used once --tls-cert is set (port 0: any free port), or `off`.
    #[arg(long, env = "FERRITE_HTTPS_LISTEN")]
    https_listen: Option<String>,
    /// Hot buffer to Parquet interval (e.g. 60s, 5m).
    #[arg(long, env = "FERRITE_PERSIST_INTERVAL")]
    persist_interval: Option<String>,
    /// Hot-buffer size that triggers an early persist (e.g. 512MiB).
    #[arg(long, env = "FERRITE_HOT_BUFFER_MAX")]
    hot_buffer_max: Option<String>,
    /// Merge each hour's small archive files (true or false).
    #[arg(long, env = "FERRITE_COMPACTION")]
    compaction: Option<bool>,
    /// How often compaction, retention and the removal of replaced files run (e.g. 60s).
    #[arg(long, env = "FERRITE_COMPACTION_INTERVAL")]
    compaction_interval: Option<String>,
    /// How long after an hour ends before its files are merged (e.g. 10m; 0s at once).
    #[arg(long, env = "FERRITE_COMPACT_AFTER")]
    compact_after: Option<String>,
    /// Files at least this large are not merged (e.g. 128MiB).
    #[arg(long, env = "FERRITE_COMPACTION_TARGET_SIZE")]
    compaction_target_size: Option<String>,
    /// Most Parquet bytes one merge reads (e.g. 256MiB).
    #[arg(long, env = "FERRITE_COMPACTION_MAX_MERGE")]
    compaction_max_merge: Option<String>,
    /// Share of one core compaction may use (0.05 to 1.0).
    #[arg(long, env = "FERRITE_COMPACTION_CPU")]
    compaction_cpu: Option<f64>,
    /// How long replaced archive files stay readable for running queries (e.g. 10m; 0s).
    #[arg(long, env = "FERRITE_RETIRED_GRACE")]
    retired_grace: Option<String>,
    /// Largest accepted payload (e.g. 1MiB).
    #[arg(long, env = "FERRITE_MAX_PAYLOAD")]
    max_payload: Option<String>,
    /// Payloads read and not yet decoded, at most (HTTP and CoAP requests past it wait).
    #[arg(long, env = "FERRITE_INGEST_MAX_IN_FLIGHT")]
    ingest_max_in_flight: Option<usize>,
    /// How long an HTTP or CoAP request waits for room before 503 (e.g. 2s, 500ms).
    #[arg(long, env = "FERRITE_INGEST_MAX_WAIT")]
    ingest_max_wait: Option<String>,
    /// Engine shards (0: one per core).
    #[arg(long, env = "FERRITE_SHARDS")]
    shards: Option<usize>,
    /// Most rows in one WAL group commit.
    #[arg(long, env = "FERRITE_COMMIT_MAX_ROWS")]
    commit_max_rows: Option<usize>,
    /// How long a shard waits for more rows before a group commit (e.g. 0s, 2ms).
    #[arg(long, env = "FERRITE_COMMIT_LINGER")]
    commit_linger: Option<String>,
    /// Log filter (e.g. info, debug).
    #[arg(long, env = "FERRITE_LOG")]
    log: Option<String>,
    /// Most streams the server holds.
    #[arg(long, env = "FERRITE_MAX_STREAMS")]
    max_streams: Option<usize>,
    /// Most field columns per stream.
    #[arg(long, env = "FERRITE_MAX_FIELDS_PER_STREAM")]
    max_fields_per_stream: Option<usize>,
    /// Most distinct event-time hours one ingest request may span.
    #[arg(long, env = "FERRITE_MAX_HOURS_PER_REQUEST")]
    max_hours_per_request: Option<usize>,
    /// Line-protocol tags that name the device after `device_id` and `host`, in order
    /// (comma-separated; `name` for TSBS data).
    #[arg(long, env = "FERRITE_DEVICE_TAGS", value_delimiter = ',')]
    device_tags: Option<Vec<String>>,
    /// The device of a line-protocol line that has no device tag (rejected when unset).
    #[arg(long, env = "FERRITE_DEFAULT_DEVICE")]
    default_device: Option<String>,
    /// Most open MQTT connections in all.
    #[arg(long, env = "FERRITE_MQTT_MAX_CONNECTIONS")]
    mqtt_max_connections: Option<usize>,
    /// Most open MQTT connections from one IP address.
    #[arg(long, env = "FERRITE_MQTT_MAX_CONNECTIONS_PER_IP")]
    mqtt_max_connections_per_ip: Option<usize>,
    /// Most subscriptions one MQTT session may hold.
    #[arg(long, env = "FERRITE_MQTT_MAX_SUBSCRIPTIONS")]
    mqtt_max_subscriptions: Option<usize>,
    /// A SQL query running longer is cancelled (e.g. 30s).
    #[arg(long, env = "FERRITE_SQL_TIMEOUT")]
    sql_timeout: Option<String>,
    /// Memory all running SQL queries may hold (e.g. 1GiB).
    #[arg(long, env = "FERRITE_SQL_MEMORY_LIMIT")]
    sql_memory_limit: Option<String>,
    /// Largest SQL result returned (e.g. 64MiB).
    #[arg(long, env = "FERRITE_SQL_MAX_RESULT")]
    sql_max_result: Option<String>,
    /// The only directory rules may read table files from (default: the rules directory).
    #[arg(long, env = "FERRITE_RULES_TABLE_DIR")]
    rules_table_dir: Option<PathBuf>,
    /// Hosts rule webhooks may call, comma-separated (`host` or `host:port`).
    #[arg(long, env = "FERRITE_WEBHOOK_ALLOW_HOSTS", value_delimiter = ',')]
    webhook_allow_hosts: Option<Vec<String>>,
    /// `on` (default) or `off`: with `off` every request is allowed (tests and demos only).
    #[arg(long, env = "FERRITE_AUTH")]
    auth: Option<String>,
    /// Policy directory (`*.cedar`, hot-reloaded).
    #[arg(long, env = "FERRITE_POLICIES_DIR")]
    policies_dir: Option<PathBuf>,
    /// PostgreSQL URL for the identity store (default: embedded SQLite).
    #[arg(long, env = "FERRITE_IDENTITY_STORE_URL")]
    identity_store_url: Option<String>,
    /// PostgreSQL URL for the device registry (default: embedded SQLite).
    #[arg(long, env = "FERRITE_REGISTRY_STORE_URL")]
    registry_store_url: Option<String>,
    /// Issuer (`iss`) of Ferrite's tokens.
    #[arg(long, env = "FERRITE_ISSUER")]
    issuer: Option<String>,
    /// Lifetime of access tokens (e.g. 15m).
    #[arg(long, env = "FERRITE_ACCESS_TOKEN_TTL")]
    access_token_ttl: Option<String>,
    /// Issuer of an external OpenID Connect provider whose tokens are accepted too.
    #[arg(long, env = "FERRITE_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// The external provider's JWKS URL (default: from its discovery document).
    #[arg(long, env = "FERRITE_OIDC_JWKS_URL")]
    oidc_jwks_url: Option<String>,
    /// The audience the external provider's tokens must name (default `ferrite`).
    #[arg(long, env = "FERRITE_OIDC_AUDIENCE")]
    oidc_audience: Option<String>,
    /// The external token claim holding the tenant (dotted path; default `tenant`).
    #[arg(long, env = "FERRITE_OIDC_TENANT_CLAIM")]
    oidc_tenant_claim: Option<String>,
    /// The external token claim holding the roles (dotted path; default `roles`).
    #[arg(long, env = "FERRITE_OIDC_ROLES_CLAIM")]
    oidc_roles_claim: Option<String>,
    /// The tenant of external tokens without the tenant claim (default `default`).
    #[arg(long, env = "FERRITE_OIDC_DEFAULT_TENANT")]
    oidc_default_tenant: Option<String>,
    /// Per principal: HTTP ingest requests (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_LIMIT_INGEST")]
    limit_ingest: Option<String>,
    /// Per tenant: HTTP ingest requests (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_TENANT_LIMIT_INGEST")]
    tenant_limit_ingest: Option<String>,
    /// Per principal: SQL requests over HTTP (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_LIMIT_QUERY")]
    limit_query: Option<String>,
    /// Per tenant: SQL requests over HTTP (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_TENANT_LIMIT_QUERY")]
    tenant_limit_query: Option<String>,
    /// Per principal: other API requests (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_LIMIT_MANAGEMENT")]
    limit_management: Option<String>,
    /// Per tenant: other API requests (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_TENANT_LIMIT_MANAGEMENT")]
    tenant_limit_management: Option<String>,
    /// Per principal: MQTT PUBLISH packets (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_LIMIT_MQTT_PUBLISH")]
    limit_mqtt_publish: Option<String>,
    /// Per tenant: MQTT PUBLISH packets (N/s, N/min, N/h, or off).
    #[arg(long, env = "FERRITE_TENANT_LIMIT_MQTT_PUBLISH")]
    tenant_limit_mqtt_publish: Option<String>,
    /// Server-wide MQTT CONNECTs (N/s...), or off: a reconnect storm is admitted at this pace.
    #[arg(long, env = "FERRITE_LIMIT_MQTT_CONNECT")]
    limit_mqtt_connect: Option<String>,
    /// Open MQTT connections of one tenant (0: no bound).
    #[arg(long, env = "FERRITE_MQTT_MAX_CONNECTIONS_PER_TENANT")]
    mqtt_max_connections_per_tenant: Option<usize>,
    /// Each tenant's events a UTC day (a count, or off).
    #[arg(long, env = "FERRITE_TENANT_DAILY_EVENTS")]
    tenant_daily_events: Option<String>,
    /// Each tenant's ingested payload bytes a UTC day (a size such as 10GiB, or off).
    #[arg(long, env = "FERRITE_TENANT_DAILY_BYTES")]
    tenant_daily_bytes: Option<String>,
    /// Each tenant's SQL statements a UTC day (a count, or off).
    #[arg(long, env = "FERRITE_TENANT_DAILY_QUERIES")]
    tenant_daily_queries: Option<String>,
    /// An MQTT 5 telemetry message's user properties as fields of its events (true or false).
    #[arg(long, env = "FERRITE_MQTT_USER_PROPERTIES_AS_FIELDS")]
    mqtt_user_properties_as_fields: Option<bool>,
    /// Every API call and MQTT session as a row of the `api_usage` stream (true or false).
    #[arg(long, env = "FERRITE_API_USAGE")]
    api_usage: Option<bool>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<config::Config> {
        let mut c = config::Config::load(self.config.as_deref())?;
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = self.rules_dir {
            c.rules_dir = v;
        }
        if let Some(v) = self.archive_url {
            c.archive_url = v;
        }
        if let Some(v) = self.archive_retry_timeout {
            c.archive_retry_timeout = config::parse_duration_or_zero(&v)?;
        }
        if let Some(v) = self.mqtt_listen {
            c.mqtt_listen = v;
        }
        if let Some(v) = self.pg_listen {
            c.pg_listen = v;
        }
        if let Some(v) = self.flight_listen {
            c.flight_listen = v;
        }
        if let Some(v) = self.coap_listen {
            c.coap_listen = v;
        }
        if let Some(v) = self.coap_max_rate_per_ip {
            c.coap_max_rate_per_ip = v;
        }
        if let Some(v) = self.coap_max_observations {
            c.coap_max_observations = v;
        }
        if let Some(v) = self.tls_cert {
            c.tls_cert = v;
        }
        if let Some(v) = self.tls_key {
            c.tls_key = v;
        }
        if let Some(v) = self.tls_client_ca {
            c.tls_client_ca = v;
        }
        if let Some(v) = self.mqtts_listen {
            c.mqtts_listen = v;
        }
        if let Some(v) = self.https_listen {
            c.https_listen = v;
        }
        if let Some(v) = self.http_listen {
            c.http_listen = v;
        }
        if let Some(v) = self.persist_interval {
            c.persist_interval = config::parse_duration(&v)?;
        }
        if let Some(v) = self.hot_buffer_max {
            c.hot_buffer_max = config::parse_size(&v)?;
        }
        if let Some(v) = self.compaction {
            c.compaction = v;
        }
        if let Some(v) = self.compaction_interval {
            c.compaction_interval = config::parse_duration(&v)?;
        }
        if let Some(v) = self.compact_after {
            c.compact_after = config::parse_duration_or_zero(&v)?;
        }
        if let Some(v) = self.compaction_target_size {
            c.compaction_target_size = config::parse_size(&v)?;
        }
        if let Some(v) = self.compaction_max_merge {
            c.compaction_max_merge = config::parse_size(&v)?;
        }
        if let Some(v) = self.compaction_cpu {
            c.compaction_cpu = v;
        }
        if let Some(v) = self.retired_grace {
            c.retired_grace = config::parse_duration_or_zero(&v)?;
        }
        if let Some(v) = self.max_payload {
            c.max_payload = config::parse_size(&v)?;
        }
        if let Some(v) = self.ingest_max_in_flight {
            anyhow::ensure!(v >= 1, "--ingest-max-in-flight must be at least 1");
            c.ingest_max_in_flight = v;
        }
        if let Some(v) = self.ingest_max_wait {
            c.ingest_max_wait = config::parse_duration_or_zero(&v)?;
        }
        if let Some(v) = self.shards {
            c.shards = v;
        }
        if let Some(v) = self.commit_max_rows {
            c.commit_max_rows = v;
        }
        if let Some(v) = self.commit_linger {
            c.commit_linger = config::parse_duration_or_zero(&v)?;
        }
        if let Some(v) = self.log {
            c.log = v;
        }
        if let Some(v) = self.max_streams {
            c.max_streams = v;
        }
        if let Some(v) = self.max_fields_per_stream {
            c.max_fields_per_stream = v;
        }
        if let Some(v) = self.max_hours_per_request {
            c.max_hours_per_request = v;
        }
        if let Some(v) = self.device_tags {
            c.device_tags = v;
        }
        if let Some(v) = self.default_device {
            c.default_device = v;
        }
        if let Some(v) = self.mqtt_max_connections {
            c.mqtt_max_connections = v;
        }
        if let Some(v) = self.mqtt_max_connections_per_ip {
            c.mqtt_max_connections_per_ip = v;
        }
        if let Some(v) = self.mqtt_max_subscriptions {
            c.mqtt_max_subscriptions = v;
        }
        if let Some(v) = self.sql_timeout {
            c.sql_timeout = config::parse_duration(&v)?;
        }
        if let Some(v) = self.sql_memory_limit {
            c.sql_memory_limit = config::parse_size(&v)?;
        }
        if let Some(v) = self.sql_max_result {
            c.sql_max_result = config::parse_size(&v)?;
        }
        if let Some(v) = self.rules_table_dir {
            c.rules_table_dir = v;
        }
        if let Some(v) = self.auth {
            c.auth = v;
        }
        if let Some(v) = self.policies_dir {
            c.policies_dir = v;
        }
        if let Some(v) = self.identity_store_url {
            c.identity_store_url = v;
        }
        if let Some(v) = self.registry_store_url {
            c.registry_store_url = v;
        }
        if let Some(v) = self.issuer {
            c.issuer = v;
        }
        if let Some(v) = self.access_token_ttl {
            c.access_token_ttl = config::parse_duration(&v)?;
        }
        let oidc = [
            (self.oidc_issuer, &mut c.oidc_issuer),
            (self.oidc_jwks_url, &mut c.oidc_jwks_url),
            (self.oidc_audience, &mut c.oidc_audience),
            (self.oidc_tenant_claim, &mut c.oidc_tenant_claim),
            (self.oidc_roles_claim, &mut c.oidc_roles_claim),
            (self.oidc_default_tenant, &mut c.oidc_default_tenant),
        ];
        for (flag, setting) in oidc {
            if let Some(v) = flag {
                *setting = v;
            }
        }
        let limits = [
            (self.limit_ingest, &mut c.limit_ingest),
            (self.tenant_limit_ingest, &mut c.tenant_limit_ingest),
            (self.limit_query, &mut c.limit_query),
            (self.tenant_limit_query, &mut c.tenant_limit_query),
            (self.limit_management, &mut c.limit_management),
            (self.tenant_limit_management, &mut c.tenant_limit_management),
            (self.limit_mqtt_publish, &mut c.limit_mqtt_publish),
            (self.tenant_limit_mqtt_publish, &mut c.tenant_limit_mqtt_publish),
            (self.limit_mqtt_connect, &mut c.limit_mqtt_connect),
            (self.tenant_daily_events, &mut c.tenant_daily_events),
            (self.tenant_daily_bytes, &mut c.tenant_daily_bytes),
            (self.tenant_daily_queries, &mut c.tenant_daily_queries),
        ];
        for (flag, setting) in limits {
            if let Some(v) = flag {
                *setting = v;
            }
        }
        if let Some(v) = self.mqtt_max_connections_per_tenant {
            c.mqtt_max_connections_per_tenant = v;
        }
        if let Some(v) = self.mqtt_user_properties_as_fields {
            c.mqtt_user_properties_as_fields = v;
        }
        if let Some(v) = self.api_usage {
            c.api_usage = v;
        }
        if let Some(v) = self.webhook_allow_hosts {
            c.webhook_allow_hosts = v.into_iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
        }
        Ok(c)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => args.into_config().and_then(serve::run),
        Command::Sql(args) => sql::run(args),
        Command::Rules(args) => rules_cmd::run(args),
        Command::Token(args) => identity_cmd::token(args),
        Command::User(args) => identity_cmd::user(args),
        Command::Client(args) => identity_cmd::client(args),
        Command::Device(args) => device_cmd::device(args),
        Command::Ota(args) => ota_cmd::ota(args),
        Command::Certs(args) => certs_cmd::certs(args),
        Command::Policy(args) => match identity_cmd::policy(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(2),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

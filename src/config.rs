//! Configuration: defaults in code < `ferrite.toml` < `FERRITE_*` environment < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Settings of `ferrite serve`. Every key is documented in `ferrite.example.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of everything Ferrite stores.
    pub data_dir: PathBuf,
    /// Directory of `*.rules` files.
    pub rules_dir: PathBuf,
    /// Archive location: empty for `{data_dir}/archive`, a directory, `file:///dir` or
    /// `s3://bucket/prefix`.
    pub archive_url: String,
    /// How long one request to an S3 archive is retried (exponential back-off) before the
    /// persist or rewrite it belongs to fails and is tried again whole.
    #[serde(with = "humantime_serde_compat_zero")]
    pub archive_retry_timeout: Duration,
    /// MQTT listener address.
    pub mqtt_listen: SocketAddr,
    /// HTTP listener address.
    pub http_listen: SocketAddr,
    /// PostgreSQL wire listener address, or `off`.
    pub pg_listen: String,
    /// Arrow Flight SQL listener address, or `off`.
    pub flight_listen: String,
    /// CoAP (UDP) listener address, or `off`.
    pub coap_listen: String,
    /// CoAP requests per second from one IP address (0: no limit).
    pub coap_max_rate_per_ip: u32,
    /// Most CoAP observations (devices waiting for commands) at once.
    pub coap_max_observations: usize,
    /// PEM certificate chain of the server's TLS listeners (with `tls_key`); empty: no TLS.
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM CA certificates whose client certificates authenticate devices (mutual TLS).
    pub tls_client_ca: PathBuf,
    /// MQTT over TLS listener address (used once a certificate is set), or `off`.
    pub mqtts_listen: String,
    /// HTTPS listener address (used once a certificate is set), or `off`.
    pub https_listen: String,
    /// How often the hot buffer is written to Parquet.
    #[serde(with = "humantime_serde_compat")]
    pub persist_interval: Duration,
    /// Hot-buffer size that triggers an early persist.
    #[serde(deserialize_with = "size")]
    pub hot_buffer_max: usize,
    /// Whether each hour's small archive files are merged.
    pub compaction: bool,
    /// How often compaction, retention and the removal of replaced files run.
    #[serde(with = "humantime_serde_compat")]
    pub compaction_interval: Duration,
    /// How long after an hour ends before its files are merged.
    #[serde(with = "humantime_serde_compat_zero")]
    pub compact_after: Duration,
    /// Files at least this large are not merged.
    #[serde(deserialize_with = "size")]
    pub compaction_target_size: usize,
    /// Most Parquet bytes one merge reads.
    #[serde(deserialize_with = "size")]
    pub compaction_max_merge: usize,
    /// Share of one core compaction may use.
    pub compaction_cpu: f64,
    /// How long replaced archive files stay readable for running queries.
    #[serde(with = "humantime_serde_compat_zero")]
    pub retired_grace: Duration,
    /// Largest accepted payload (HTTP body or MQTT message).
    #[serde(deserialize_with = "size")]
    pub max_payload: usize,
    /// Payloads read and not yet decoded, at most; past it HTTP and CoAP requests wait.
    pub ingest_max_in_flight: usize,
    /// How long an HTTP or CoAP request waits for room (or for an overload to end) before
    /// it is refused with 503 and `Retry-After`.
    #[serde(with = "humantime_serde_compat_zero")]
    pub ingest_max_wait: Duration,
    /// Engine shards; 0 means one per core.
    pub shards: usize,
    /// Most rows in one WAL group commit.
    pub commit_max_rows: usize,
    /// How long a shard waits for more rows before committing a group (0s: no wait).
    #[serde(with = "humantime_serde_compat_zero")]
    pub commit_linger: Duration,
    /// Log filter (`info`, `debug`, `ferrite_ingest=debug,info`...); `RUST_LOG` wins.
    pub log: String,
    /// Most streams the server holds (derived streams included).
    pub max_streams: usize,
    /// Most field columns per stream.
    pub max_fields_per_stream: usize,
    /// Most distinct event-time hours one ingest request may span.
    pub max_hours_per_request: usize,
    /// Line-protocol tags that name the device after `device_id` and `host`, in order.
    pub device_tags: Vec<String>,
    /// The device of a line-protocol line that has no device tag (such lines are rejected
    /// when empty).
    pub default_device: String,
    /// Most open MQTT connections in all.
    pub mqtt_max_connections: usize,
    /// Most open MQTT connections from one IP address.
    pub mqtt_max_connections_per_ip: usize,
    /// Most subscriptions one MQTT session may hold.
    pub mqtt_max_subscriptions: usize,
    /// A SQL query running longer is cancelled.
    #[serde(with = "humantime_serde_compat")]
    pub sql_timeout: Duration,
    /// Memory all running SQL queries may hold.
    #[serde(deserialize_with = "size")]
    pub sql_memory_limit: usize,
    /// Largest SQL result returned.
    #[serde(deserialize_with = "size")]
    pub sql_max_result: usize,
    /// The only directory rules may read `table` files from; empty: `rules_dir`.
    pub rules_table_dir: PathBuf,
    /// Hosts (`host` or `host:port`) rule webhooks may call; empty: none.
    pub webhook_allow_hosts: Vec<String>,
    /// `on` (tokens and policies at every door) or `off` (tests and demos only: every
    /// request is allowed).
    pub auth: String,
    /// Where `*.cedar` policy files are read from (watched; a broken edit is refused).
    pub policies_dir: PathBuf,
    /// A `postgres://` URL for the identity store; empty: embedded SQLite in the data directory.
    pub identity_store_url: String,
    /// A `postgres://` URL for the device registry; empty: embedded SQLite in the data directory.
    pub registry_store_url: String,
    /// The `iss` of Ferrite's tokens; empty: `http://localhost:{http port}`, fixed at first start.
    pub issuer: String,
    /// Lifetime of access tokens from the token endpoint.
    #[serde(with = "humantime_serde_compat")]
    pub access_token_ttl: Duration,
    /// The issuer of an external OpenID Connect provider whose tokens are accepted too;
    /// empty: none.
    pub oidc_issuer: String,
    /// Its key set's URL; empty: discovered from the issuer's openid-configuration.
    pub oidc_jwks_url: String,
    /// The audience its tokens must name.
    pub oidc_audience: String,
    /// The claim (a dotted path) holding the tenant.
    pub oidc_tenant_claim: String,
    /// The claim (a dotted path) holding the roles.
    pub oidc_roles_claim: String,
    /// The tenant of its tokens without a tenant claim.
    pub oidc_default_tenant: String,
    /// Per principal: HTTP ingest requests (`N/s`, `N/min`, `N/h`, or `off`).
    pub limit_ingest: String,
    /// Per principal: SQL requests over HTTP (`N/s`, `N/min`, `N/h`, or `off`).
    pub limit_query: String,
    /// Per principal: other API requests (`N/s`, `N/min`, `N/h`, or `off`).
    pub limit_management: String,
    /// Per principal: MQTT PUBLISH packets (`N/s`, `N/min`, `N/h`, or `off`).
    pub limit_mqtt_publish: String,
    /// Per tenant, all its principals together: HTTP ingest requests (or `off`).
    pub tenant_limit_ingest: String,
    /// Per tenant, all its principals together: SQL requests over HTTP (or `off`).
    pub tenant_limit_query: String,
    /// Per tenant, all its principals together: other API requests (or `off`).
    pub tenant_limit_management: String,
    /// Per tenant, all its principals together: MQTT PUBLISH packets (or `off`).
    pub tenant_limit_mqtt_publish: String,
    /// Server-wide MQTT CONNECTs (a reconnect storm is admitted at this pace), or `off`.
    pub limit_mqtt_connect: String,
    /// Open MQTT connections of one tenant (0: no bound).
    pub mqtt_max_connections_per_tenant: usize,
    /// Each tenant's events a UTC day (a count, or `off`).
    pub tenant_daily_events: String,
    /// Each tenant's ingested payload bytes a UTC day (a size such as `10GiB`, or `off`).
    pub tenant_daily_bytes: String,
    /// Each tenant's SQL statements a UTC day (a count, or `off`).
    pub tenant_daily_queries: String,
    /// Whether every API call and MQTT session becomes a row of the `api_usage` stream.
    pub api_usage: bool,
    /// Whether an MQTT 5 telemetry message's user properties become fields of its events.
    pub mqtt_user_properties_as_fields: bool,
    /// Tenants' own limits, replacing the ones above for them (`[tenant_limits.NAME]`).
    pub tenant_limits: std::collections::BTreeMap<String, TenantLimits>,
}

impl Default for Config {
    fn default() -> Self {
        // Compaction's defaults are storage's own.
        let m = ferrite_storage::MaintenanceConfig::default();
        Self {
            data_dir: PathBuf::from("./ferrite-data"),
            rules_dir: PathBuf::from("./rules"),
            archive_url: String::new(),
            archive_retry_timeout: Duration::from_secs(30),
            mqtt_listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            pg_listen: "0.0.0.0:5433".to_owned(),
            flight_listen: "0.0.0.0:8815".to_owned(),
            coap_listen: "0.0.0.0:5683".to_owned(),
            coap_max_rate_per_ip: 1000,
            coap_max_observations: 10_000,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
            mqtts_listen: "0.0.0.0:8883".to_owned(),
            https_listen: "0.0.0.0:8443".to_owned(),
            persist_interval: Duration::from_secs(60),
            hot_buffer_max: 512 * 1024 * 1024,
            compaction: m.compaction,
            compaction_interval: m.interval,
            compact_after: m.compact_after,
            compaction_target_size: m.target_file_bytes as usize,
            compaction_max_merge: m.max_merge_bytes as usize,
            compaction_cpu: m.duty,
            retired_grace: m.retired_grace,
            max_payload: 1024 * 1024,
            ingest_max_in_flight: 256,
            ingest_max_wait: Duration::from_secs(2),
            shards: 0,
            commit_max_rows: 262_144,
            commit_linger: Duration::ZERO,
            log: "info".to_owned(),
            max_streams: 1000,
            max_fields_per_stream: 1024,
            max_hours_per_request: 168,
            device_tags: Vec::new(),
            default_device: String::new(),
            mqtt_max_connections: 100_000,
            mqtt_max_connections_per_ip: 10_000,
            mqtt_max_subscriptions: 1000,
            sql_timeout: Duration::from_secs(30),
            sql_memory_limit: 1024 * 1024 * 1024,
            sql_max_result: 64 * 1024 * 1024,
            rules_table_dir: PathBuf::new(),
            webhook_allow_hosts: Vec::new(),
            auth: "on".to_owned(),
            policies_dir: PathBuf::from("./policies"),
            identity_store_url: String::new(),
            registry_store_url: String::new(),
            issuer: String::new(),
            access_token_ttl: Duration::from_secs(15 * 60),
            oidc_issuer: String::new(),
            oidc_jwks_url: String::new(),
            oidc_audience: "ferrite".to_owned(),
            oidc_tenant_claim: "tenant".to_owned(),
            oidc_roles_claim: "roles".to_owned(),
            oidc_default_tenant: "default".to_owned(),
            limit_ingest: "off".to_owned(),
            limit_query: "off".to_owned(),
            limit_management: "off".to_owned(),
            limit_mqtt_publish: "off".to_owned(),
            tenant_limit_ingest: "off".to_owned(),
            tenant_limit_query: "off".to_owned(),
            tenant_limit_management: "off".to_owned(),
            tenant_limit_mqtt_publish: "off".to_owned(),
            limit_mqtt_connect: "off".to_owned(),
            mqtt_max_connections_per_tenant: 0,
            tenant_daily_events: "off".to_owned(),
            tenant_daily_bytes: "off".to_owned(),
            tenant_daily_queries: "off".to_owned(),
            api_usage: true,
            mqtt_user_properties_as_fields: false,
            tenant_limits: std::collections::BTreeMap::new(),
        }
    }
}

/// A tenant's own limits: each key, when set, replaces the server's for that tenant.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Per principal of the tenant: HTTP ingest requests.
    pub limit_ingest: Option<String>,
    /// The tenant's principals together: HTTP ingest requests.
    pub tenant_limit_ingest: Option<String>,
    /// Per principal of the tenant: SQL requests over HTTP.
    pub limit_query: Option<String>,
    /// The tenant's principals together: SQL requests over HTTP.
    pub tenant_limit_query: Option<String>,
    /// Per principal of the tenant: other API requests.
    pub limit_management: Option<String>,
    /// The tenant's principals together: other API requests.
    pub tenant_limit_management: Option<String>,
    /// Per principal of the tenant: MQTT PUBLISH packets.
    pub limit_mqtt_publish: Option<String>,
    /// The tenant's principals together: MQTT PUBLISH packets.
    pub tenant_limit_mqtt_publish: Option<String>,
    /// The tenant's events a UTC day.
    pub tenant_daily_events: Option<String>,
    /// The tenant's ingested payload bytes a UTC day.
    pub tenant_daily_bytes: Option<String>,
    /// The tenant's SQL statements a UTC day.
    pub tenant_daily_queries: Option<String>,
}

impl TenantLimits {
    /// Each class's settings: (class, per principal, per tenant).
    fn by_class(&self) -> [(ferrite_engine::limits::Class, Option<&str>, Option<&str>); 4] {
        use ferrite_engine::limits::Class;
        [
            (Class::Ingest, self.limit_ingest.as_deref(), self.tenant_limit_ingest.as_deref()),
            (Class::Query, self.limit_query.as_deref(), self.tenant_limit_query.as_deref()),
            (Class::Management, self.limit_management.as_deref(), self.tenant_limit_management.as_deref()),
            (Class::MqttPublish, self.limit_mqtt_publish.as_deref(), self.tenant_limit_mqtt_publish.as_deref()),
        ]
    }
}

impl Config {
    /// The daily quotas these settings describe; an invalid amount names its key.
    pub fn quotas(&self) -> anyhow::Result<ferrite_engine::quota::QuotaConfig> {
        use ferrite_engine::quota::{DailyQuotas, QuotaConfig};
        /// `off` (or 0): none; a count, or for bytes a size.
        fn amount(key: &str, text: &str, size: bool) -> anyhow::Result<Option<u64>> {
            let t = text.trim();
            if t.is_empty() || t.eq_ignore_ascii_case("off") || t == "0" {
                return Ok(None);
            }
            let n = if size {
                parse_size(t).map(|n| n as u64)
            } else {
                t.replace('_', "")
                    .parse::<u64>()
                    .map_err(|_| anyhow::anyhow!("expected a count, such as 1000000, or off"))
            };
            n.map(Some).map_err(|e| anyhow::anyhow!("{key}: {e:#}"))
        }
        /// Applies the keys `settings` set over `q`.
        fn apply(q: &mut DailyQuotas, prefix: &str, settings: [Option<&str>; 3]) -> anyhow::Result<()> {
            let [events, bytes, queries] = settings;
            for (text, into, key, size) in [
                (events, &mut q.events, "tenant_daily_events", false),
                (bytes, &mut q.bytes, "tenant_daily_bytes", true),
                (queries, &mut q.queries, "tenant_daily_queries", false),
            ] {
                if let Some(t) = text {
                    *into = amount(&format!("{prefix}{key}"), t, size)?;
                }
            }
            Ok(())
        }
        let mut defaults = DailyQuotas::default();
        let own =
            [Some(&*self.tenant_daily_events), Some(&*self.tenant_daily_bytes), Some(&*self.tenant_daily_queries)];
        apply(&mut defaults, "", own)?;
        let mut config = QuotaConfig { defaults, ..QuotaConfig::default() };
        for (name, own) in &self.tenant_limits {
            let mut q = defaults;
            let settings = [
                own.tenant_daily_events.as_deref(),
                own.tenant_daily_bytes.as_deref(),
                own.tenant_daily_queries.as_deref(),
            ];
            apply(&mut q, &format!("tenant_limits.{name}."), settings)?;
            config.tenants.insert(name.clone(), q);
        }
        Ok(config)
    }

    /// The rate limits these settings describe; an invalid rate names its key.
    pub fn limits(&self) -> anyhow::Result<ferrite_engine::limits::LimitsConfig> {
        use ferrite_engine::limits::{Class, Limits, LimitsConfig, Rate};
        /// Sets (or, for `off`, lifts) each class's limits that `settings` name; the keys
        /// are `{prefix}limit_{class}` and `{prefix}tenant_limit_{class}`.
        fn apply(
            limits: &mut Limits,
            prefix: &str,
            settings: [(Class, Option<&str>, Option<&str>); 4],
        ) -> anyhow::Result<()> {
            for (class, principal, tenant) in settings {
                for (text, into, key) in [
                    (principal, &mut limits.per_principal, "limit_"),
                    (tenant, &mut limits.per_tenant, "tenant_limit_"),
                ] {
                    let Some(text) = text else { continue };
                    match Rate::parse(text) {
                        Ok(Some(r)) => {
                            into.insert(class, r);
                        }
                        // `off` in a tenant's own table is an explicit "no limit" for it.
                        Ok(None) => {
                            into.remove(&class);
                        }
                        Err(e) => anyhow::bail!("{prefix}{key}{}: {e}", class.as_str()),
                    }
                }
            }
            Ok(())
        }
        let mut limits = Limits::default();
        let defaults = [
            (Class::Ingest, Some(&*self.limit_ingest), Some(&*self.tenant_limit_ingest)),
            (Class::Query, Some(&*self.limit_query), Some(&*self.tenant_limit_query)),
            (Class::Management, Some(&*self.limit_management), Some(&*self.tenant_limit_management)),
            (Class::MqttPublish, Some(&*self.limit_mqtt_publish), Some(&*self.tenant_limit_mqtt_publish)),
        ];
        apply(&mut limits, "", defaults)?;
        let mut config = LimitsConfig { defaults: limits.clone(), ..LimitsConfig::default() };
        config.mqtt_connect =
            Rate::parse(&self.limit_mqtt_connect).map_err(|e| anyhow::anyhow!("limit_mqtt_connect: {e}"))?;
        for (name, own) in &self.tenant_limits {
            ferrite_engine::validate_tenant(name).map_err(|e| anyhow::anyhow!("tenant_limits.{name}: {e}"))?;
            let mut l = limits.clone();
            apply(&mut l, &format!("tenant_limits.{name}."), own.by_class())?;
            config.tenants.insert(name.clone(), l);
        }
        Ok(config)
    }
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod humantime_serde_compat_zero {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration_or_zero(&s).map_err(serde::de::Error::custom)
    }
}

/// Parses a duration that may be zero (`0s`).
pub fn parse_duration_or_zero(s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s.trim()).with_context(|| format!("invalid duration `{s}` (examples: 0s, 2ms, 1s)"))
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let s = String::deserialize(d)?;
    parse_size(&s).map_err(serde::de::Error::custom)
}

/// Parses a duration such as `60s`, `500ms`, `2m`, `1h 30m`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s.trim())
        .with_context(|| format!("invalid duration `{s}` (examples: 60s, 500ms, 2m)"))?;
    if d.is_zero() {
        bail!("duration `{s}` must be greater than zero");
    }
    Ok(d)
}

/// Parses a size such as `1MiB`, `512KiB`, `2GB`, `1000`.
pub fn parse_size(s: &str) -> anyhow::Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("invalid size `{s}` (examples: 1MiB, 512KiB, 2GB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("invalid size unit `{other}` in `{s}` (use B, KiB, MiB, GiB, KB, MB, GB)"),
    };
    let v = num * mult;
    if !(1.0..1e15).contains(&v) {
        bail!("size `{s}` is out of range");
    }
    Ok(v as usize)
}

impl Config {
    /// Loads `path` if given (it must exist) or `./ferrite.toml` if present; else defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let (path, required) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from("ferrite.toml"), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("invalid configuration file {}", path.display())),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read configuration file {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_matches_the_code() -> anyhow::Result<()> {
        let text = include_str!("../ferrite.example.toml");
        let parsed: Config = toml::from_str(text)?;
        assert_eq!(parsed, Config::default(), "ferrite.example.toml must list the defaults");
        // Every key of the struct is documented in the example.
        for key in [
            "data_dir",
            "rules_dir",
            "archive_url",
            "archive_retry_timeout",
            "mqtt_listen",
            "http_listen",
            "pg_listen",
            "flight_listen",
            "coap_listen",
            "coap_max_rate_per_ip",
            "coap_max_observations",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "mqtts_listen",
            "https_listen",
            "persist_interval",
            "hot_buffer_max",
            "compaction",
            "compaction_interval",
            "compact_after",
            "compaction_target_size",
            "compaction_max_merge",
            "compaction_cpu",
            "retired_grace",
            "max_payload",
            "ingest_max_in_flight",
            "ingest_max_wait",
            "shards",
            "commit_max_rows",
            "commit_linger",
            "log",
            "max_streams",
            "max_fields_per_stream",
            "max_hours_per_request",
            "device_tags",
            "default_device",
            "mqtt_max_connections",
            "mqtt_max_connections_per_ip",
            "mqtt_max_subscriptions",
            "sql_timeout",
            "sql_memory_limit",
            "sql_max_result",
            "rules_table_dir",
            "webhook_allow_hosts",
            "limit_ingest",
            "tenant_limit_ingest",
            "limit_query",
            "tenant_limit_query",
            "limit_management",
            "tenant_limit_management",
            "limit_mqtt_publish",
            "tenant_limit_mqtt_publish",
            "limit_mqtt_connect",
            "mqtt_max_connections_per_tenant",
            "tenant_daily_events",
            "tenant_daily_bytes",
            "tenant_daily_queries",
            "api_usage",
            "mqtt_user_properties_as_fields",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{key} ="))),
                "{key} missing from ferrite.example.toml"
            );
        }
        Ok(())
    }

    #[test]
    fn sizes_and_durations() -> anyhow::Result<()> {
        assert_eq!(parse_size("1MiB")?, 1 << 20);
        assert_eq!(parse_size("512 KiB")?, 512 << 10);
        assert_eq!(parse_size("2GB")?, 2_000_000_000);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("60s")?, Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        Ok(())
    }

    #[test]
    fn limits_are_read_with_tenants_of_their_own_and_errors_name_the_key() -> anyhow::Result<()> {
        use ferrite_engine::limits::Class;
        let c: Config = toml::from_str(
            "limit_ingest = \"100/s\"\ntenant_limit_query = \"10/min\"\nlimit_mqtt_connect = \"500/s\"\n\
             [tenant_limits.acme]\nlimit_ingest = \"off\"\nlimit_mqtt_publish = \"5/s\"\n",
        )?;
        let l = c.limits()?;
        assert_eq!(l.defaults.per_principal.get(&Class::Ingest).map(|r| r.amount), Some(100.0));
        assert_eq!(l.defaults.per_tenant.get(&Class::Query).map(|r| r.period.as_secs()), Some(60));
        assert_eq!(l.mqtt_connect.map(|r| r.amount), Some(500.0));
        let acme = l.tenants.get("acme").context("acme")?;
        assert_eq!(acme.per_principal.get(&Class::Ingest), None, "`off` lifts the default for acme");
        assert_eq!(acme.per_principal.get(&Class::MqttPublish).map(|r| r.amount), Some(5.0));
        assert_eq!(acme.per_tenant.get(&Class::Query).map(|r| r.amount), Some(10.0), "the rest stays the server's");

        let bad: Config = toml::from_str("[tenant_limits.acme]\nlimit_query = \"lots\"\n")?;
        let e = format!("{:#}", bad.limits().err().context("accepted")?);
        assert!(e.contains("tenant_limits.acme.limit_query") && e.contains("N/s"), "{e}");
        let unknown: Result<Config, _> = toml::from_str("[tenant_limits.acme]\nlimit_everything = \"1/s\"\n");
        assert!(unknown.is_err());
        Ok(())
    }

    #[test]
    fn daily_quotas_are_read_with_tenants_of_their_own() -> anyhow::Result<()> {
        let c: Config = toml::from_str(
            "tenant_daily_events = \"1_000_000\"\ntenant_daily_bytes = \"1GiB\"\n\
             [tenant_limits.acme]\ntenant_daily_events = \"off\"\ntenant_daily_queries = \"500\"\n",
        )?;
        let q = c.quotas()?;
        assert_eq!((q.defaults.events, q.defaults.bytes, q.defaults.queries), (Some(1_000_000), Some(1 << 30), None));
        let acme = q.tenants.get("acme").context("acme")?;
        assert_eq!((acme.events, acme.bytes, acme.queries), (None, Some(1 << 30), Some(500)));
        let bad: Config = toml::from_str("[tenant_limits.acme]\ntenant_daily_queries = \"many\"\n")?;
        let e = format!("{:#}", bad.quotas().err().context("accepted")?);
        assert!(e.contains("tenant_limits.acme.tenant_daily_queries") && e.contains("a count"), "{e}");
        Ok(())
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let r: Result<Config, _> = toml::from_str("data_dri = \"x\"");
        assert!(r.is_err());
    }
}

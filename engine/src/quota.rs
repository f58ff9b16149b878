//! Daily quotas per tenant: events and bytes ingested, SQL queries run, per UTC day.
//!
//! A tenant past one of its quotas is refused until the next 00:00 UTC: ingest over HTTP
//! with 429 `quota_exceeded` and `Retry-After` (the seconds until then), MQTT telemetry by
//! withholding the acknowledgement and closing the session (the client keeps its messages
//! and sends them again later), SQL with 429 over HTTP and an error naming the quota over
//! the PostgreSQL wire and Flight SQL. A quota is checked before a request and counted
//! after it, so one request may take a tenant past its quota by its own size.
//!
//! The day's counts are saved in the data directory ([`Quotas::save`], every few seconds
//! and at shutdown): a restart does not reset them; a crash forgets at most the counts
//! since the last save.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::Clock;

const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// Events accepted by ingest, on every door.
    Events,
    /// Payload bytes accepted by ingest.
    Bytes,
    /// SQL statements run (HTTP, PostgreSQL wire, Flight SQL).
    Queries,
}

impl Quota {
    /// The name in messages, metrics and settings (`daily_{name}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Bytes => "bytes",
            Self::Queries => "queries",
        }
    }
}

/// A tenant's daily quotas; `None`: no quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DailyQuotas {
    /// Events a day.
    pub events: Option<u64>,
    /// Payload bytes a day.
    pub bytes: Option<u64>,
    /// SQL statements a day.
    pub queries: Option<u64>,
}

impl DailyQuotas {
    fn is_empty(&self) -> bool {
        self.events.is_none() && self.bytes.is_none() && self.queries.is_none()
    }
}

/// The server's quotas: defaults, and tenants' own (which replace the defaults for them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaConfig {
    /// For every tenant without quotas of its own.
    pub defaults: DailyQuotas,
    /// Tenants' own quotas.
    pub tenants: HashMap<String, DailyQuotas>,
}

/// What a tenant used today.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Used {
    /// Events accepted.
    pub events: u64,
    /// Payload bytes accepted.
    pub bytes: u64,
    /// SQL statements run.
    pub queries: u64,
}

/// A refusal: which quota, and when it resets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tenant {tenant:?} used its daily quota of {limit} {}; it resets at 00:00 UTC, in {} s",
    quota.as_str(),
    retry_after.as_secs()
)]
pub struct QuotaExceeded {
    /// The tenant.
    pub tenant: String,
    /// The quota.
    pub quota: Quota,
    /// Its daily amount.
    pub limit: u64,
    /// Until the next 00:00 UTC.
    pub retry_after: Duration,
}

/// The counts of one UTC day, as saved.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Day {
    /// Days since 1970-01-01.
    day: i64,
    tenants: HashMap<String, Used>,
    #[serde(skip)]
    dirty: bool,
}

/// The quotas, and what each tenant used today.
pub struct Quotas {
    config: QuotaConfig,
    active: bool,
    clock: Arc<dyn Clock>,
    today: Mutex<Day>,
    /// Where the day's counts are saved.
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").field("config", &self.config).field("path", &self.path).finish()
    }
}

/// Errors of loading or saving the day's counts.
#[derive(Debug, thiserror::Error)]
pub enum QuotaStoreError {
    /// The file could not be read or written.
    #[error("quota usage file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The counts could not be encoded.
    #[error("quota usage file {path}: {source}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

impl Quotas {
    /// No quotas: every check passes and nothing is counted.
    pub fn off(clock: Arc<dyn Clock>) -> Self {
        Self { config: QuotaConfig::default(), active: false, clock, today: Mutex::default(), path: None }
    }

    /// Quotas of `config`, today's counts loaded from `path` when it holds today's. A file
    /// that is not valid is moved aside (to `.corrupt`, never deleted), logged, and the day
    /// starts afresh.
    pub fn new(config: QuotaConfig, path: Option<PathBuf>, clock: Arc<dyn Clock>) -> Result<Self, QuotaStoreError> {
        let active = !config.defaults.is_empty() || config.tenants.values().any(|q| !q.is_empty());
        let today = clock.now_nanos().div_euclid(NANOS_PER_DAY);
        let mut day = Day { day: today, ..Day::default() };
        if let Some(p) = &path {
            match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<Day>(&bytes) {
                    Ok(saved) if saved.day == today => day = saved,
                    Ok(_) => {}
                    Err(e) => {
                        let aside = p.with_extension("json.corrupt");
                        tracing::error!(file = %p.display(), moved_to = %aside.display(), error = %e, "quota usage file is not valid: moved aside, today's counts start afresh");
                        std::fs::rename(p, &aside).map_err(|source| QuotaStoreError::Io { path: p.clone(), source })?;
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(QuotaStoreError::Io { path: p.clone(), source }),
            }
        }
        Ok(Self { config, active, clock, today: Mutex::new(day), path })
    }

    /// Whether any quota is set (otherwise the checks cost nothing).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The quotas of `tenant`.
    pub fn of(&self, tenant: &str) -> DailyQuotas {
        self.config.tenants.get(tenant).copied().unwrap_or(self.config.defaults)
    }

    /// What `tenant` used today.
    pub fn used(&self, tenant: &str) -> Used {
        let mut today = self.today.lock();
        self.roll(&mut today);
        today.tenants.get(tenant).copied().unwrap_or_default()
    }

    /// Starts a new day's counts when the UTC day changed; the time until the next one.
    fn roll(&self, today: &mut Day) -> Duration {
        let now = self.clock.now_nanos();
        let day = now.div_euclid(NANOS_PER_DAY);
        if today.day != day {
            today.day = day;
            today.tenants.clear();
            today.dirty = true;
        }
        Duration::from_nanos(u64::try_from((day + 1) * NANOS_PER_DAY - now).unwrap_or(0))
    }

    /// Refuses ingest for `tenant` when it used its events or bytes quota today.
    pub fn check_ingest(&self, tenant: &str) -> Result<(), QuotaExceeded> {
        if !self.active {
            return Ok(());
        }
        let q = self.of(tenant);
        if q.events.is_none() && q.bytes.is_none() {
            return Ok(());
        }
        let mut today = self.today.lock();
        let retry_after = self.roll(&mut today);
        let used = today.tenants.get(tenant).copied().unwrap_or_default();
        for (quota, limit, used) in [(Quota::Events, q.events, used.events), (Quota::Bytes, q.bytes, used.bytes)] {
            if let Some(limit) = limit
                && used >= limit
            {
                return Err(QuotaExceeded { tenant: tenant.to_owned(), quota, limit, retry_after });
            }
        }
        Ok(())
    }

    /// Counts accepted ingest against `tenant`'s day.
    pub fn add_ingest(&self, tenant: &str, events: u64, bytes: u64) {
        if !self.active || (events == 0 && bytes == 0) {
            return;
        }
        let mut today = self.today.lock();
        self.roll(&mut today);
        let used = today.tenants.entry(tenant.to_owned()).or_default();
        used.events += events;
        used.bytes += bytes;
        today.dirty = true;
    }

    /// Counts one SQL statement of `tenant`, or refuses it past the tenant's query quota.
    pub fn take_query(&self, tenant: &str) -> Result<(), QuotaExceeded> {
        if !self.active {
            return Ok(());
        }
        let limit = self.of(tenant).queries;
        let mut today = self.today.lock();
        let retry_after = self.roll(&mut today);
        let used = today.tenants.entry(tenant.to_owned()).or_default();
        if let Some(limit) = limit
            && used.queries >= limit
        {
            return Err(QuotaExceeded { tenant: tenant.to_owned(), quota: Quota::Queries, limit, retry_after });
        }
        used.queries += 1;
        today.dirty = true;
        Ok(())
    }

    /// Saves the day's counts when they changed (write, fsync, rename: a crash leaves the
    /// previous save or this one).
    pub fn save(&self) -> Result<(), QuotaStoreError> {
        let Some(path) = &self.path else { return Ok(()) };
        let bytes = {
            let mut today = self.today.lock();
            if !today.dirty {
                return Ok(());
            }
            today.dirty = false;
            serde_json::to_vec(&*today).map_err(|source| QuotaStoreError::Encode { path: path.clone(), source })?
        };
        let io = |source| QuotaStoreError::Io { path: path.clone(), source };
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    const DAY: i64 = NANOS_PER_DAY;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn quotas(clock: Arc<ManualClock>, path: Option<PathBuf>) -> Result<Quotas, QuotaStoreError> {
        let mut config = QuotaConfig {
            defaults: DailyQuotas { events: Some(100), bytes: None, queries: Some(2) },
            ..QuotaConfig::default()
        };
        config.tenants.insert("big".into(), DailyQuotas { events: Some(1_000), ..DailyQuotas::default() });
        Quotas::new(config, path, clock)
    }

    #[test]
    fn a_tenant_is_refused_past_its_quota_until_midnight_utc() -> TestResult {
        let clock = Arc::new(ManualClock::new(20_000 * DAY + DAY / 2));
        let q = quotas(clock.clone(), None)?;
        assert!(q.check_ingest("acme").is_ok());
        q.add_ingest("acme", 99, 10);
        assert!(q.check_ingest("acme").is_ok(), "99 of 100");
        q.add_ingest("acme", 5, 10);
        let Err(e) = q.check_ingest("acme") else { return Err("104 of 100 events passed".into()) };
        assert_eq!((e.quota, e.limit, e.retry_after), (Quota::Events, 100, Duration::from_secs(43_200)));
        assert!(e.to_string().contains("daily quota of 100 events"), "{e}");
        // Another tenant, and a tenant's own quota, are not affected.
        assert!(q.check_ingest("other").is_ok());
        q.add_ingest("big", 500, 0);
        assert!(q.check_ingest("big").is_ok());
        // Queries: counted as taken; the third is refused; `big` has no query quota.
        assert!(q.take_query("acme").is_ok() && q.take_query("acme").is_ok());
        assert_eq!(q.take_query("acme").err().map(|e| e.quota), Some(Quota::Queries));
        assert!((0..10).all(|_| q.take_query("big").is_ok()));
        // A new UTC day starts afresh.
        clock.set(20_001 * DAY);
        assert!(q.check_ingest("acme").is_ok() && q.take_query("acme").is_ok());
        assert_eq!(q.used("acme"), Used { events: 0, bytes: 0, queries: 1 });
        Ok(())
    }

    #[test]
    fn the_days_counts_survive_a_restart_but_not_the_day() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("quota-usage.json");
        let clock = Arc::new(ManualClock::new(20_000 * DAY + 10));
        let q = quotas(clock.clone(), Some(path.clone()))?;
        q.add_ingest("acme", 100, 1);
        q.save()?;
        let again = quotas(clock.clone(), Some(path.clone()))?;
        assert_eq!(again.used("acme").events, 100);
        assert!(again.check_ingest("acme").is_err());
        clock.set(20_001 * DAY);
        let tomorrow = quotas(clock, Some(path.clone()))?;
        assert_eq!(tomorrow.used("acme"), Used::default());
        // A damaged file is moved aside, not deleted, and the day starts afresh.
        std::fs::write(&path, b"not json")?;
        let fresh = quotas(Arc::new(ManualClock::new(20_001 * DAY)), Some(path.clone()))?;
        assert_eq!(fresh.used("acme"), Used::default());
        assert!(!path.exists());
        assert_eq!(std::fs::read(path.with_extension("json.corrupt"))?, b"not json");
        Ok(())
    }
}

//! Rate limits: token buckets per principal and per tenant, for each class of request
//! (HTTP ingest, query, management; MQTT publishes and connects).
//!
//! A limit is `N/period` (`100/s`, `6000/min`, `1000000/h`): up to `N` at once, refilled at
//! `N` per period. A request takes from its principal's bucket and from its tenant's; when
//! either is short it is refused (HTTP 429 with `Retry-After`) or, where the protocol has
//! no refusal (MQTT 3.1.1 publishes, CONNECTs), its sender is made to wait
//! ([`RateLimiter::debit`] returns how long). A tenant's own limits, where configured,
//! replace the server's defaults for that tenant.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A rate: `amount` per `period`; also the bucket's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// How many per period (and at most at once).
    pub amount: f64,
    /// The period.
    pub period: Duration,
}

impl Rate {
    /// Parses `off` (no limit) or `N/s`, `N/min`, `N/h` (also `N/m`, `N/second`, ...).
    pub fn parse(text: &str) -> Result<Option<Rate>, String> {
        let t = text.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let bad = || format!("invalid rate {text:?}: write N/s, N/min or N/h (e.g. 100/s, 6000/min), or off");
        let (n, unit) = t.split_once('/').ok_or_else(bad)?;
        let amount: f64 = n.trim().replace('_', "").parse().map_err(|_| bad())?;
        if !(amount.is_finite() && amount >= 1.0) {
            return Err(format!("invalid rate {text:?}: the count must be at least 1"));
        }
        let period = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        Ok(Some(Rate { amount, period }))
    }

    fn per_second(&self) -> f64 {
        self.amount / self.period.as_secs_f64()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            _ => "day",
        };
        write!(f, "{}/{unit}", self.amount)
    }
}

/// What a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// HTTP ingest (events, line protocol).
    Ingest,
    /// SQL over HTTP.
    Query,
    /// Every other HTTP route (registry, rules, identity administration).
    Management,
    /// MQTT PUBLISH packets.
    MqttPublish,
    /// MQTT CONNECTs (server-wide: a reconnect storm is admitted at this pace).
    MqttConnect,
}

impl Class {
    /// The name in metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Query => "query",
            Self::Management => "management",
            Self::MqttPublish => "mqtt_publish",
            Self::MqttConnect => "mqtt_connect",
        }
    }
}

/// The limits of one scope: per principal and per tenant, by class.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Each principal's buckets.
    pub per_principal: HashMap<Class, Rate>,
    /// Each tenant's buckets (all its principals together).
    pub per_tenant: HashMap<Class, Rate>,
}

/// The server's limits: defaults, and tenants' own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitsConfig {
    /// For every tenant without limits of its own.
    pub defaults: Limits,
    /// Tenants' own limits, replacing the defaults class by class.
    pub tenants: HashMap<String, Limits>,
    /// Server-wide CONNECTs.
    pub mqtt_connect: Option<Rate>,
}

/// A refusal: which limit, and when to try again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("over the {} limit of {limit} per {scope} {who}; retry after {} s", class.as_str(), retry_after_secs(*retry_after))]
pub struct Throttled {
    /// The class of the request.
    pub class: Class,
    /// `principal`, `tenant` or `server`.
    pub scope: &'static str,
    /// Whose bucket was empty.
    pub who: String,
    /// The limit.
    pub limit: Rate,
    /// When the bucket holds enough again.
    pub retry_after: Duration,
}

/// Whole seconds to wait, at least 1 (the `Retry-After` header's unit).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Refills to `now`; the tokens there are.
    fn refill(&mut self, rate: Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second()).min(rate.amount);
        self.at = now;
        self.tokens
    }
}

/// A bucket's owner: a principal within its tenant, or a whole tenant.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Key {
    class: Class,
    whole_tenant: bool,
    tenant: Box<str>,
    principal: Box<str>,
}

/// A [`Key`] to look up without allocating: hashes and compares as the `Key` it names.
#[derive(Hash)]
struct KeyRef<'a> {
    class: Class,
    whole_tenant: bool,
    tenant: &'a str,
    principal: &'a str,
}

impl hashbrown::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, k: &Key) -> bool {
        self.class == k.class
            && self.whole_tenant == k.whole_tenant
            && self.tenant == &*k.tenant
            && self.principal == &*k.principal
    }
}

impl From<&KeyRef<'_>> for Key {
    fn from(k: &KeyRef<'_>) -> Self {
        Self { class: k.class, whole_tenant: k.whole_tenant, tenant: k.tenant.into(), principal: k.principal.into() }
    }
}

/// Most buckets kept; past it, full ones (idle principals) are forgotten.
const MAX_BUCKETS: usize = 200_000;

/// The buckets, and the limits they follow.
#[derive(Debug, Default)]
pub struct RateLimiter {
    config: LimitsConfig,
    buckets: Mutex<hashbrown::HashMap<Key, Bucket>>,
}

/// Where the server-wide CONNECT bucket lives among the tenants' (no tenant is named `*`).
const SERVER: &str = "*";

impl RateLimiter {
    /// A limiter of `config`.
    pub fn new(config: LimitsConfig) -> Self {
        Self { config, buckets: Mutex::default() }
    }

    /// Whether any limit is set at all (no: every check is free).
    pub fn is_active(&self) -> bool {
        self.config.mqtt_connect.is_some()
            || !self.config.defaults.per_principal.is_empty()
            || !self.config.defaults.per_tenant.is_empty()
            || !self.config.tenants.is_empty()
    }

    /// The buckets a request of `class` takes from: (rate, key, scope) for its principal
    /// and for its tenant, where a limit is set.
    fn scopes<'a>(
        &self,
        class: Class,
        principal: &'a str,
        tenant: &'a str,
    ) -> [Option<(Rate, KeyRef<'a>, &'static str)>; 2] {
        if class == Class::MqttConnect {
            let server = KeyRef { class, whole_tenant: true, tenant: SERVER, principal: "" };
            return [None, self.config.mqtt_connect.map(|r| (r, server, "server"))];
        }
        let own = self.config.tenants.get(tenant);
        let pick = |f: fn(&Limits) -> &HashMap<Class, Rate>| {
            own.and_then(|l| f(l).get(&class)).or_else(|| f(&self.config.defaults).get(&class)).copied()
        };
        [
            pick(|l| &l.per_principal)
                .map(|r| (r, KeyRef { class, whole_tenant: false, tenant, principal }, "principal")),
            pick(|l| &l.per_tenant).map(|r| (r, KeyRef { class, whole_tenant: true, tenant, principal: "" }, "tenant")),
        ]
    }

    /// Takes `cost` from the principal's and the tenant's buckets, or neither: refused
    /// with the limit that was short and when to retry.
    pub fn check(&self, class: Class, principal: &str, tenant: &str, cost: f64) -> Result<(), Throttled> {
        let scopes = self.scopes(class, principal, tenant);
        if scopes.iter().all(Option::is_none) {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        let mut short: Option<Throttled> = None;
        for (rate, key, scope) in scopes.iter().flatten() {
            let have = with_bucket(&mut buckets, key, *rate, now, |b| b.refill(*rate, now));
            let need = cost.min(rate.amount);
            if have < need {
                let wait = Duration::from_secs_f64((need - have) / rate.per_second());
                if short.as_ref().is_none_or(|s| s.retry_after < wait) {
                    let who = if *scope == "principal" { principal } else { tenant };
                    short = Some(Throttled { class, scope, who: who.to_owned(), limit: *rate, retry_after: wait });
                }
            }
        }
        if let Some(s) = short {
            return Err(s);
        }
        for (rate, key, _) in scopes.iter().flatten() {
            with_bucket(&mut buckets, key, *rate, now, |b| b.tokens -= cost);
        }
        Ok(())
    }

    /// Takes `cost` whatever the buckets hold (they may go below zero): how long the sender
    /// should wait before sending more so that it keeps to its limits (zero when within).
    /// For protocols that cannot refuse: the wait becomes back-pressure.
    pub fn debit(&self, class: Class, principal: &str, tenant: &str, cost: f64) -> Duration {
        let scopes = self.scopes(class, principal, tenant);
        if scopes.iter().all(Option::is_none) {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        let mut wait = Duration::ZERO;
        for (rate, key, _) in scopes.iter().flatten() {
            let left = with_bucket(&mut buckets, key, *rate, now, |b| {
                b.tokens = b.refill(*rate, now) - cost;
                b.tokens
            });
            if left < 0.0 {
                wait = wait.max(Duration::from_secs_f64(-left / rate.per_second()));
            }
        }
        wait
    }

    /// Gives back what [`RateLimiter::debit`] took for a request that was then refused.
    pub fn refund(&self, class: Class, principal: &str, tenant: &str, cost: f64) {
        let scopes = self.scopes(class, principal, tenant);
        let mut buckets = self.buckets.lock();
        for (_, key, _) in scopes.iter().flatten() {
            if let Some(b) = buckets.get_mut(key) {
                b.tokens += cost;
            }
        }
    }
}

/// Runs `f` on the bucket of `key`, made full on first use (only then is anything
/// allocated: a lookup borrows the names); idle full buckets are dropped past
/// [`MAX_BUCKETS`].
fn with_bucket<R>(
    buckets: &mut hashbrown::HashMap<Key, Bucket>,
    key: &KeyRef<'_>,
    rate: Rate,
    now: Instant,
    f: impl FnOnce(&mut Bucket) -> R,
) -> R {
    if let Some(b) = buckets.get_mut(key) {
        return f(b);
    }
    if buckets.len() >= MAX_BUCKETS {
        buckets.retain(|_, b| b.tokens < 0.0 || now.saturating_duration_since(b.at) < Duration::from_secs(3600));
    }
    let mut b = Bucket { tokens: rate.amount, at: now };
    let out = f(&mut b);
    buckets.insert(Key::from(key), b);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        Rate::parse(s).ok().flatten().unwrap_or(Rate { amount: 0.0, period: Duration::from_secs(1) })
    }

    #[test]
    fn rates_parse_with_clear_errors() {
        assert_eq!(Rate::parse("off"), Ok(None));
        assert_eq!(Rate::parse("100/s"), Ok(Some(Rate { amount: 100.0, period: Duration::from_secs(1) })));
        assert_eq!(rate("6_000/min").period, Duration::from_secs(60));
        assert_eq!(rate("5/h").to_string(), "5/h");
        let e = Rate::parse("fast").err().unwrap_or_default();
        assert!(e.contains("N/s"), "{e}");
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("10/fortnight").is_err());
    }

    #[test]
    fn a_principal_over_its_limit_is_refused_and_others_are_not() {
        let mut config = LimitsConfig::default();
        config.defaults.per_principal.insert(Class::Ingest, rate("3/min"));
        config.defaults.per_tenant.insert(Class::Ingest, rate("5/min"));
        let l = RateLimiter::new(config);
        for _ in 0..3 {
            assert!(l.check(Class::Ingest, "a", "t1", 1.0).is_ok());
        }
        let refused = l.check(Class::Ingest, "a", "t1", 1.0).err();
        let refused = refused.as_ref().map(|t| (t.scope, t.retry_after > Duration::from_secs(15)));
        assert_eq!(refused, Some(("principal", true)), "one token comes back every 20 s");
        // Another principal of the same tenant has its own bucket, until the tenant's is empty.
        assert!(l.check(Class::Ingest, "b", "t1", 1.0).is_ok());
        assert!(l.check(Class::Ingest, "b", "t1", 1.0).is_ok());
        assert_eq!(l.check(Class::Ingest, "b", "t1", 1.0).err().map(|t| t.scope), Some("tenant"));
        // Other classes and other tenants are untouched.
        assert!(l.check(Class::Query, "a", "t1", 1.0).is_ok());
        assert!(l.check(Class::Ingest, "a", "t2", 1.0).is_ok());
    }

    #[test]
    fn a_tenant_of_its_own_replaces_the_defaults() {
        let mut config = LimitsConfig::default();
        config.defaults.per_principal.insert(Class::Query, rate("1/h"));
        let mut big = Limits::default();
        big.per_principal.insert(Class::Query, rate("100/s"));
        config.tenants.insert("big".into(), big);
        let l = RateLimiter::new(config);
        assert!(l.check(Class::Query, "a", "small", 1.0).is_ok());
        assert!(l.check(Class::Query, "a", "small", 1.0).is_err());
        for _ in 0..50 {
            assert!(l.check(Class::Query, "a", "big", 1.0).is_ok());
        }
    }

    #[test]
    fn a_debit_turns_into_a_wait_at_the_limits_pace() {
        let config = LimitsConfig { mqtt_connect: Some(rate("10/s")), ..LimitsConfig::default() };
        let l = RateLimiter::new(config);
        let waits: Vec<Duration> = (0..30).map(|_| l.debit(Class::MqttConnect, "", "", 1.0)).collect();
        assert!(waits[..10].iter().all(Duration::is_zero), "the first ten at once: {waits:?}");
        // The 30th waits about two seconds: admitted at ten a second, not all at once.
        assert!(waits[29] > Duration::from_millis(1800) && waits[29] <= Duration::from_secs(2), "{:?}", waits[29]);
        l.refund(Class::MqttConnect, "", "", 20.0);
        assert!(l.debit(Class::MqttConnect, "", "", 1.0) < Duration::from_millis(200));
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2500)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}

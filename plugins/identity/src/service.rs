//! The identity service: the in-memory view of the store that every decision reads, token
//! issue and checks, the OAuth2 grants, the failure throttle and the audit trail.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrite_engine::Metrics;
use ferrite_engine::auth::{
    AccessControl, Action, AuthError, Credentials, Decision, Principal, PrincipalKind, RequestContext, Resource,
};
use ferrite_engine::ids::DEFAULT_TENANT;
use ferrite_engine::plugin::EventWriter;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::policy::{Pdp, Policies};
use crate::secret;
use crate::store::{ClientRecord, DeviceCodeRecord, RefreshRecord, Store, TokenRecord, UserRecord};
use crate::tokens::{AUDIENCE, Claims, KeyRing, generate_key};

/// The name of the built-in platform administrator.
pub const ADMIN: &str = "admin";

pub use ferrite_engine::auth::AUDIT_STREAM;

/// How the identity service is set up.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The data directory (`admin.token` goes there; the SQLite store under `identity/`).
    pub data_dir: PathBuf,
    /// A `postgres://` URL for the store; empty for the embedded SQLite store.
    pub store_url: String,
    /// Where `*.cedar` policy files are read from (and watched).
    pub policies_dir: PathBuf,
    /// The issuer (`iss`) of tokens; empty: fixed at first start from `default_issuer`.
    pub issuer: String,
    /// The issuer used at first start when none is configured.
    pub default_issuer: String,
    /// Access-token lifetime (15 minutes by default).
    pub access_ttl: Duration,
    /// Refresh-token lifetime.
    pub refresh_ttl: Duration,
    /// The admin token's lifetime.
    pub admin_token_ttl: Duration,
    /// An external OpenID Connect provider whose tokens are accepted too.
    pub external: Option<crate::external::ExternalConfig>,
}

impl IdentityConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            store_url: String::new(),
            policies_dir: PathBuf::from("policies"),
            issuer: String::new(),
            default_issuer: "http://localhost:8080".into(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            admin_token_ttl: Duration::from_secs(365 * 24 * 3600),
            external: None,
        }
    }
}

/// One audit record.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// What happened: `denied`, `token_issued`, `login_failed`, `policy_changed`, ...
    pub event: &'static str,
    /// `ok`, `refused` or `failed`.
    pub outcome: &'static str,
    /// Who (or which claimed identity).
    pub principal: String,
    /// Their kind.
    pub kind: String,
    /// Their tenant.
    pub tenant: String,
    /// The action asked for, if any.
    pub action: String,
    /// The resource, if any.
    pub resource: String,
    /// The peer's address, if known.
    pub source: String,
    /// Free text: why, what changed.
    pub detail: String,
    /// When it happened, milliseconds since the epoch.
    pub ts_ms: i64,
}

impl AuditEvent {
    /// An event with only its name, outcome and detail.
    pub fn new(event: &'static str, outcome: &'static str, detail: impl Into<String>) -> Self {
        Self {
            event,
            outcome,
            principal: String::new(),
            kind: String::new(),
            tenant: DEFAULT_TENANT.into(),
            action: String::new(),
            resource: String::new(),
            source: String::new(),
            detail: detail.into(),
            ts_ms: now_ms(),
        }
    }

    /// The same event about `p`.
    pub fn by(mut self, p: &Principal) -> Self {
        self.principal = p.id.to_string();
        self.kind = p.kind.as_str().into();
        self.tenant = p.tenant.to_string();
        self
    }

    /// The same event about a claimed identity.
    pub fn claimed(mut self, who: &str) -> Self {
        self.principal = who.into();
        self
    }

    /// The same event, kept in `tenant`'s audit stream.
    pub fn in_tenant(mut self, tenant: &str) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// The same event from `source`.
    pub fn from_source(mut self, source: Option<std::net::IpAddr>) -> Self {
        if let Some(s) = source {
            self.source = s.to_string();
        }
        self
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "device_id": if self.principal.is_empty() { "-" } else { &self.principal },
            "ts": self.ts_ms,
            "event": self.event,
            "outcome": self.outcome,
            "kind": self.kind,
            "tenant": self.tenant,
            "action": self.action,
            "resource": self.resource,
            "source": self.source,
            "detail": self.detail,
        })
    }
}

/// What a grant gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The access token.
    pub access_token: String,
    /// Its lifetime in seconds.
    pub expires_in: i64,
    /// The granted scope.
    pub scope: String,
    /// A refresh token, when the grant gives one.
    pub refresh_token: Option<String>,
}

/// Why a grant was refused, as RFC 6749 §5.2 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantError {
    /// `invalid_client`, `invalid_grant`, `authorization_pending`, `slow_down`, ...
    pub error: &'static str,
    /// A human-readable description.
    pub description: String,
    /// For a locked client or user (`slow_down`): when to try again.
    pub retry_after: Option<Duration>,
    /// For a failed credential check: how long to hold the answer back, so that guessing
    /// gets slower with each failure.
    pub hold_back: Duration,
}

impl GrantError {
    /// An error with nothing to wait for.
    pub fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self { error, description: description.into(), retry_after: None, hold_back: Duration::ZERO }
    }
}

impl From<Error> for GrantError {
    fn from(e: Error) -> Self {
        Self::new("server_error", e.to_string())
    }
}

#[derive(Debug, Default)]
struct Failures {
    count: u32,
    first: Option<Instant>,
    locked_until: Option<Instant>,
}

/// Failures on one key (client id and address) before the key is locked.
const MAX_FAILURES: u32 = 5;
/// The window failures are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(300);
/// The first lock; each further failure while counted doubles it, up to 15 minutes.
const FIRST_LOCK: Duration = Duration::from_secs(30);

/// The device authorization grant's polling interval and lifetime.
pub const DEVICE_CODE_INTERVAL: i64 = 5;
/// How long a device code may wait for approval.
pub const DEVICE_CODE_TTL: i64 = 600;

struct State {
    users: HashMap<String, UserRecord>,
    clients: HashMap<String, ClientRecord>,
    tenants: HashSet<String>,
    revoked: HashSet<String>,
    keys: Arc<KeyRing>,
    policies: Arc<Policies>,
    /// Policy documents from files (name, text), as last loaded successfully.
    file_policies: Vec<(String, String)>,
    /// Policy documents stored through the API.
    api_policies: Vec<(String, String)>,
    /// The policy directory as last looked at (names, sizes, times), whether or not its
    /// documents were accepted: a broken edit is reported once, not at every poll.
    policy_files_seen: Vec<(String, u64, Option<SystemTime>)>,
}

/// The identity service.
pub struct Identity {
    config: IdentityConfig,
    issuer: String,
    store: Store,
    pdp: Pdp,
    state: RwLock<State>,
    generation: AtomicU64,
    failures: Mutex<HashMap<String, Failures>>,
    /// Serialises policy updates (files, API).
    policy_update: Mutex<()>,
    audit_tx: mpsc::Sender<AuditEvent>,
    audit_rx: Mutex<Option<mpsc::Receiver<AuditEvent>>>,
    metrics: Arc<Metrics>,
    /// The external OpenID provider whose tokens are accepted, if one is configured.
    external: Option<Arc<crate::external::ExternalIssuer>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Whether `id` is a usable name for a tenant, user or client.
pub fn valid_name(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
}

impl Identity {
    /// Opens the store, makes the first signing key, the `default` tenant and the `admin`
    /// user on first start, writes `{data}/admin.token` if it is missing or no longer
    /// valid, and loads the policies (a broken policy file fails the start).
    pub async fn open(config: IdentityConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>> {
        let store = Store::open(&config.store_url, &config.data_dir.join("identity")).await?;
        let now = now();
        let issuer = match (config.issuer.as_str(), store.setting("issuer").await?) {
            ("", Some(stored)) => stored,
            ("", None) => {
                store.set_setting("issuer", &config.default_issuer).await?;
                config.default_issuer.clone()
            }
            (configured, _) => configured.to_owned(),
        };
        store.add_tenant(DEFAULT_TENANT, now).await?;
        let mut keys = store.keys().await?;
        if !keys.iter().any(|k| k.retired_at.is_none()) {
            let key = generate_key(now)?;
            store.add_key(&key).await?;
            keys = store.keys().await?;
            tracing::info!(kid = key.kid, "made a new token signing key");
        }
        let created_admin = store
            .add_user(
                &UserRecord {
                    name: ADMIN.into(),
                    tenant: DEFAULT_TENANT.into(),
                    password_hash: None,
                    roles: vec!["platform-admin".into(), "admin".into()],
                    disabled: false,
                },
                now,
            )
            .await?;
        let pdp = Pdp::new()?;
        let file_policies = read_policy_dir(&config.policies_dir)?;
        let api_policies: Vec<(String, String)> =
            store.policies().await?.into_iter().map(|(id, text)| (format!("api:{id}"), text)).collect();
        let policies = pdp.compile(&[file_policies.clone(), api_policies.clone()].concat())?;
        let state = State {
            users: store.users().await?.into_iter().map(|u| (u.name.clone(), u)).collect(),
            clients: store.clients().await?.into_iter().map(|c| (c.id.clone(), c)).collect(),
            tenants: store.tenants().await?.into_iter().collect(),
            revoked: store.revocations(now).await?.into_iter().collect(),
            keys: Arc::new(KeyRing::new(&keys)?),
            policies: Arc::new(policies),
            policy_files_seen: policy_dir_signature(&config.policies_dir)?,
            file_policies,
            api_policies,
        };
        let (audit_tx, audit_rx) = mpsc::channel(10_000);
        let external = config.external.clone().map(|c| Arc::new(crate::external::ExternalIssuer::new(c)));
        let identity = Arc::new(Self {
            external,
            config,
            issuer,
            store,
            pdp,
            state: RwLock::new(state),
            generation: AtomicU64::new(1),
            failures: Mutex::new(HashMap::new()),
            policy_update: Mutex::new(()),
            audit_tx,
            audit_rx: Mutex::new(Some(audit_rx)),
            metrics,
        });
        identity.ensure_admin_token(created_admin).await?;
        Ok(identity)
    }

    /// The issuer of Ferrite's tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The external OpenID provider whose tokens are accepted, if any.
    pub fn external(&self) -> Option<&Arc<crate::external::ExternalIssuer>> {
        self.external.as_ref()
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where the admin token is written.
    pub fn admin_token_path(&self) -> PathBuf {
        self.config.data_dir.join("admin.token")
    }

    async fn ensure_admin_token(&self, created: bool) -> Result<()> {
        let path = self.admin_token_path();
        if !created
            && let Ok(existing) = std::fs::read_to_string(&path)
            && self.verify_token(existing.trim()).is_ok()
        {
            return Ok(());
        }
        let (token, _) =
            self.create_api_token(ADMIN, "admin token written at start", self.config.admin_token_ttl).await?;
        write_private(&path, token.as_bytes())?;
        tracing::info!(path = %path.display(), "wrote the admin bearer token (also the MQTT password of user `admin`)");
        Ok(())
    }

    /// Bumps the generation: decision caches drop themselves.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues an audit record; counted and dropped when the queue is full.
    pub fn audit(&self, event: AuditEvent) {
        self.metrics.inc("ferrite_audit_events_total", &[("event", event.event)], 1);
        if self.audit_tx.try_send(event).is_err() {
            self.metrics.inc("ferrite_audit_dropped_total", &[], 1);
        }
    }

    /// Runs the audit writer: queued records go to the `audit` stream through `writer`, in
    /// batches, until `stop` is notified; then what is still queued is written and it returns.
    pub async fn run_audit(self: &Arc<Self>, writer: Arc<dyn EventWriter>, stop: Arc<tokio::sync::Notify>) {
        const BATCH: usize = 1000;
        let Some(mut rx) = self.audit_rx.lock().take() else { return };
        loop {
            let first = tokio::select! {
                e = rx.recv() => e,
                () = stop.notified() => None,
            };
            let stopping = first.is_none();
            let mut batch: Vec<AuditEvent> = first.into_iter().collect();
            loop {
                while batch.len() < BATCH
                    && let Ok(e) = rx.try_recv()
                {
                    batch.push(e);
                }
                if batch.is_empty() {
                    break;
                }
                // Each record goes to its tenant's `audit` stream, where that tenant's
                // auditors read it; records of unknown parties to the default tenant's.
                let mut by_tenant: std::collections::BTreeMap<String, Vec<u8>> = std::collections::BTreeMap::new();
                for e in batch.drain(..) {
                    let tenant =
                        if ferrite_engine::validate_tenant(&e.tenant).is_ok() { &e.tenant } else { DEFAULT_TENANT };
                    let ndjson = by_tenant.entry(tenant.to_owned()).or_default();
                    let _ = serde_json::to_writer(&mut *ndjson, &e.to_json());
                    ndjson.push(b'\n');
                }
                for (tenant, ndjson) in by_tenant {
                    if let Err(e) = writer.write(&tenant, AUDIT_STREAM, ndjson).await {
                        self.metrics.inc("ferrite_audit_dropped_total", &[], 1);
                        tracing::error!(error = %e, tenant, "cannot write audit records");
                    }
                }
                if !stopping {
                    break;
                }
            }
            if stopping {
                return;
            }
        }
    }

    // ---- tokens ----

    fn keys(&self) -> Arc<KeyRing> {
        self.state.read().keys.clone()
    }

    /// The JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        self.keys().jwks()
    }

    /// Checks a token's signature and claims, and that it is not revoked.
    pub fn verify_token(&self, token: &str) -> std::result::Result<Claims, String> {
        let claims = self.keys().verify(token, &self.issuer)?;
        if self.state.read().revoked.contains(&claims.jti) {
            return Err("the token has been revoked".into());
        }
        Ok(claims)
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        sub: &str,
        kind: &str,
        tenant: &str,
        roles: &[String],
        client_id: &str,
        scope: &str,
        ttl: i64,
    ) -> Result<(String, Claims)> {
        let now = now();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.into(),
            aud: AUDIENCE.into(),
            exp: now + ttl,
            iat: now,
            nbf: now,
            jti: secret::new_id()?,
            client_id: client_id.into(),
            scope: scope.into(),
            tenant: tenant.into(),
            roles: roles.to_vec(),
            kind: kind.into(),
        };
        let token = self.keys().sign(&claims)?;
        self.metrics.inc("ferrite_tokens_issued_total", &[("kind", if kind == "user" { "user" } else { "client" })], 1);
        Ok((token, claims))
    }

    /// The stored user or client named `id`, and whether it is disabled.
    fn stored(&self, id: &str) -> Option<(Principal, bool)> {
        let state = self.state.read();
        if let Some(u) = state.users.get(id) {
            let p = Principal::new(PrincipalKind::User, &u.name, &u.tenant).with_roles(u.roles.iter().cloned());
            return Some((p, u.disabled));
        }
        let c = state.clients.get(id)?;
        let mut p = Principal::new(Self::kind_of(c), &c.id, &c.tenant).with_roles(c.roles.iter().cloned());
        p.device_type = c.device_type.as_deref().map(Into::into);
        p.children = c.children.clone().into();
        Some((p, c.disabled))
    }

    /// The stored user or client named `id`, with its tenant, roles and children (disabled
    /// or not): what a policy would see.
    pub fn known_principal(&self, id: &str) -> Option<Principal> {
        self.stored(id).map(|(p, _)| p)
    }

    /// The principal a subject of kind `kind` names now (its roles, tenant and children as
    /// stored), or why it cannot act.
    fn principal_of(&self, sub: &str, kind: &str) -> std::result::Result<Principal, String> {
        let (p, disabled) = self.stored(sub).ok_or_else(|| format!("{kind} {sub:?} does not exist"))?;
        if PrincipalKind::parse(kind) != Some(p.kind) {
            return Err(format!("{sub:?} is a {}, not a {kind}", p.kind.as_str()));
        }
        if disabled {
            return Err(format!("{sub:?} is disabled"));
        }
        Ok(p)
    }

    /// Creates a long-lived API token for the user or client `subject` (`ferrite token
    /// create`, the admin token); recorded so that it can be listed and revoked.
    pub async fn create_api_token(
        &self,
        subject: &str,
        description: &str,
        ttl: Duration,
    ) -> Result<(String, TokenRecord)> {
        let (p, disabled) =
            self.stored(subject).ok_or_else(|| Error::NotFound(format!("no user or client named {subject:?}")))?;
        if disabled {
            return Err(Error::Invalid(format!("{subject:?} is disabled")));
        }
        let kind = p.kind.as_str();
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let (token, claims) = self.issue(subject, kind, &p.tenant, &p.roles, subject, "api", ttl)?;
        let record = TokenRecord {
            jti: claims.jti,
            subject: subject.into(),
            kind: kind.into(),
            tenant: p.tenant.to_string(),
            description: description.into(),
            expires_at: claims.exp,
            created_at: claims.iat,
        };
        self.store.add_token(&record).await?;
        self.audit(AuditEvent::new("token_issued", "ok", format!("API token {}: {description}", record.jti)).by(&p));
        Ok((token, record))
    }

    /// The API tokens not yet expired or revoked.
    pub async fn api_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.store.tokens(now()).await
    }

    /// Revokes an access token by its id; the change reaches every cache at once.
    pub async fn revoke_jti(&self, jti: &str, expires_at: i64, by: Option<&Principal>) -> Result<()> {
        self.store.revoke(jti, expires_at).await?;
        self.state.write().revoked.insert(jti.to_owned());
        self.changed();
        let mut e = AuditEvent::new("token_revoked", "ok", format!("token {jti}"));
        if let Some(p) = by {
            e = e.by(p);
        }
        self.audit(e);
        Ok(())
    }

    /// Revokes a token given whole: an access token (by its `jti`) or a refresh token (its
    /// family). Unknown tokens are ignored, as RFC 7009 asks.
    pub async fn revoke_token(&self, token: &str, by: Option<&Principal>) -> Result<()> {
        if let Ok(claims) = self.keys().verify(token, &self.issuer) {
            return self.revoke_jti(&claims.jti, claims.exp, by).await;
        }
        if let Some(r) = self.store.refresh(&secret::hash_secret(token)).await? {
            let n = self.store.revoke_family(&r.family).await?;
            self.audit(
                AuditEvent::new("refresh_revoked", "ok", format!("{n} refresh tokens of a family of {}", r.subject))
                    .claimed(&r.subject),
            );
        }
        Ok(())
    }

    /// Rotates the signing key: a new key signs from now on; the old ones stay in the JWKS
    /// until the last token they signed has expired.
    pub async fn rotate_key(&self, by: Option<&Principal>) -> Result<String> {
        let now = now();
        let key = generate_key(now)?;
        self.store.add_key(&key).await?;
        let longest = self.config.admin_token_ttl.max(self.config.access_ttl);
        self.store.retire_keys_except(&key.kid, now, now + longest.as_secs() as i64).await?;
        let ring = KeyRing::new(&self.store.keys().await?)?;
        self.state.write().keys = Arc::new(ring);
        let mut e = AuditEvent::new("key_rotated", "ok", format!("new signing key {}", key.kid));
        if let Some(p) = by {
            e = e.by(p);
        }
        self.audit(e);
        Ok(key.kid)
    }

    // ---- failure throttle ----

    /// When `key` is locked after repeated failures: how long it still is.
    pub fn locked(&self, key: &str) -> Option<Duration> {
        let failures = self.failures.lock();
        let until = failures.get(key)?.locked_until?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a failure on `key`; returns how long to hold the answer back (slowing down
    /// guessing) and locks the key after five in the window.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock();
        if failures.len() > 100_000 {
            failures.retain(|_, f| f.first.is_some_and(|t| t.elapsed() < FAILURE_WINDOW));
        }
        let f = failures.entry(key.to_owned()).or_default();
        if f.first.is_none_or(|t| t.elapsed() > FAILURE_WINDOW) {
            *f = Failures { count: 0, first: Some(Instant::now()), locked_until: None };
        }
        f.count += 1;
        if f.count >= MAX_FAILURES {
            let doublings = (f.count - MAX_FAILURES).min(5);
            let lock = (FIRST_LOCK * 2u32.pow(doublings)).min(Duration::from_secs(900));
            f.locked_until = Some(Instant::now() + lock);
        }
        self.metrics.inc("ferrite_auth_failures_total", &[], 1);
        Duration::from_millis(100 * u64::from(f.count.min(10)))
    }

    /// `slow_down` (audited) while `key` is locked after repeated failures.
    fn unless_locked(
        &self,
        key: &str,
        who: &str,
        source: Option<std::net::IpAddr>,
    ) -> std::result::Result<(), GrantError> {
        let Some(wait) = self.locked(key) else { return Ok(()) };
        self.audit(
            AuditEvent::new("login_throttled", "refused", "too many failed attempts").claimed(who).from_source(source),
        );
        Err(GrantError {
            retry_after: Some(wait),
            ..GrantError::new(
                "slow_down",
                format!("too many failed attempts for {who:?}; retry in {} s", wait.as_secs() + 1),
            )
        })
    }

    /// Records a failed credential check on `key` (audited, counted, throttled) and the
    /// error to answer with, held back longer after each failure.
    fn refuse(
        &self,
        key: &str,
        error: &'static str,
        why: &str,
        who: &str,
        source: Option<std::net::IpAddr>,
    ) -> GrantError {
        let hold_back = self.failed(key);
        self.audit(AuditEvent::new("login_failed", "refused", why.to_owned()).claimed(who).from_source(source));
        GrantError { hold_back, ..GrantError::new(error, why.to_owned()) }
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().remove(key);
    }

    // ---- grants ----

    /// Checks a client's secret (throttled per client and address); the client record.
    pub fn authenticate_client(
        &self,
        client_id: &str,
        client_secret: &str,
        source: Option<std::net::IpAddr>,
    ) -> std::result::Result<ClientRecord, GrantError> {
        let key = format!("client:{client_id}@{}", source.map(|s| s.to_string()).unwrap_or_default());
        self.unless_locked(&key, client_id, source)?;
        let record = self.state.read().clients.get(client_id).cloned();
        match record {
            Some(c)
                if !c.disabled
                    && (secret::check_secret(client_secret, &c.secret_hash)
                        || c.next_secret_hash.as_deref().is_some_and(|h| secret::check_secret(client_secret, h))) =>
            {
                self.succeeded(&key);
                Ok(c)
            }
            other => {
                let why = match other {
                    Some(c) if c.disabled => "the client is disabled",
                    Some(_) => "wrong client secret",
                    None => "unknown client",
                };
                Err(self.refuse(
                    &key,
                    "invalid_client",
                    &format!("client authentication failed ({why})"),
                    client_id,
                    source,
                ))
            }
        }
    }

    fn kind_of(c: &ClientRecord) -> PrincipalKind {
        if c.kind == "device" { PrincipalKind::Device } else { PrincipalKind::Service }
    }

    /// The client credentials grant; a refresh token too when `offline_access` is asked.
    pub async fn client_credentials(
        &self,
        client: &ClientRecord,
        scope: &str,
    ) -> std::result::Result<Grant, GrantError> {
        let kind = Self::kind_of(client).as_str();
        let ttl = self.config.access_ttl.as_secs() as i64;
        let (access_token, claims) =
            self.issue(&client.id, kind, &client.tenant, &client.roles, &client.id, scope, ttl)?;
        let refresh_token = if scope.split(' ').any(|s| s == "offline_access") {
            Some(self.new_refresh(&secret::new_id()?, &client.id, &client.id, kind, &client.tenant, scope).await?)
        } else {
            None
        };
        self.audit(
            AuditEvent::new("token_issued", "ok", format!("client_credentials, jti {}", claims.jti))
                .claimed(&client.id)
                .in_tenant(&client.tenant),
        );
        Ok(Grant { access_token, expires_in: ttl, scope: scope.into(), refresh_token })
    }

    async fn new_refresh(
        &self,
        family: &str,
        client_id: &str,
        subject: &str,
        kind: &str,
        tenant: &str,
        scope: &str,
    ) -> Result<String> {
        let token = secret::new_secret()?;
        let record = RefreshRecord {
            hash: secret::hash_secret(&token),
            family: family.into(),
            client_id: client_id.into(),
            subject: subject.into(),
            kind: kind.into(),
            tenant: tenant.into(),
            scope: scope.into(),
            expires_at: now() + self.config.refresh_ttl.as_secs() as i64,
            used: false,
            revoked: false,
        };
        self.store.add_refresh(&record, now()).await?;
        Ok(token)
    }

    /// The refresh-token grant with rotation: the token is used up and a new one of the same
    /// family given back; presenting a used token again revokes the whole family.
    pub async fn refresh(&self, token: &str, client_id: Option<&str>) -> std::result::Result<Grant, GrantError> {
        let hash = secret::hash_secret(token);
        let Some(r) = self.store.refresh(&hash).await? else {
            return Err(GrantError::new("invalid_grant", "unknown refresh token"));
        };
        if let Some(c) = client_id
            && c != r.client_id
        {
            return Err(GrantError::new("invalid_grant", "the refresh token was issued to another client"));
        }
        if r.revoked {
            return Err(GrantError::new("invalid_grant", "the refresh token has been revoked"));
        }
        if r.expires_at < now() {
            return Err(GrantError::new("invalid_grant", "the refresh token has expired"));
        }
        if r.used || !self.store.use_refresh(&hash).await? {
            let n = self.store.revoke_family(&r.family).await?;
            self.changed();
            self.audit(
                AuditEvent::new(
                    "refresh_reuse",
                    "refused",
                    format!("a used refresh token was presented again: {n} tokens of its family revoked"),
                )
                .claimed(&r.subject),
            );
            return Err(GrantError::new(
                "invalid_grant",
                "the refresh token was already used: its whole family is now revoked; authenticate again",
            ));
        }
        let p = self.principal_of(&r.subject, &r.kind).map_err(|e| GrantError::new("invalid_grant", e))?;
        let ttl = self.config.access_ttl.as_secs() as i64;
        let (access_token, claims) =
            self.issue(&r.subject, &r.kind, &p.tenant, &p.roles, &r.client_id, &r.scope, ttl)?;
        let next = self.new_refresh(&r.family, &r.client_id, &r.subject, &r.kind, &p.tenant, &r.scope).await?;
        self.audit(AuditEvent::new("token_refreshed", "ok", format!("jti {}", claims.jti)).by(&p));
        Ok(Grant { access_token, expires_in: ttl, scope: r.scope, refresh_token: Some(next) })
    }

    /// Starts a device authorization (RFC 8628): the device code and the user code.
    pub async fn device_authorization(
        &self,
        client_id: &str,
        scope: &str,
    ) -> std::result::Result<(String, String), GrantError> {
        if self.state.read().clients.get(client_id).is_none_or(|c| c.disabled) {
            return Err(GrantError::new("invalid_client", format!("unknown or disabled client {client_id:?}")));
        }
        let device_code = secret::new_secret()?;
        let user_code = secret::new_user_code()?;
        self.store
            .add_device_code(&DeviceCodeRecord {
                device_code_hash: secret::hash_secret(&device_code),
                user_code: user_code.clone(),
                client_id: client_id.into(),
                scope: scope.into(),
                expires_at: now() + DEVICE_CODE_TTL,
                status: "pending".into(),
                approved_by: None,
                last_poll: 0,
            })
            .await?;
        Ok((device_code, user_code))
    }

    /// A user approves (or denies) a device's user code.
    pub async fn decide_device_code(&self, user_code: &str, approver: &Principal, approve: bool) -> Result<String> {
        let code = user_code.trim().to_ascii_uppercase();
        let Some(d) = self.store.device_code(None, Some(&code)).await? else {
            return Err(Error::NotFound(format!("no pending device authorization with user code {code:?}")));
        };
        if d.expires_at < now() || d.status != "pending" {
            return Err(Error::Invalid(format!("the user code {code:?} has expired or was already used")));
        }
        let client_tenant = self.state.read().clients.get(&d.client_id).map(|c| c.tenant.clone()).unwrap_or_default();
        if client_tenant != *approver.tenant && !approver.has_role("platform-admin") {
            return Err(Error::Invalid(format!("the device {:?} is not of your tenant", d.client_id)));
        }
        let to = if approve { "approved" } else { "denied" };
        self.store.set_device_code_status(&d.device_code_hash, "pending", to, Some(&approver.id)).await?;
        self.audit(
            AuditEvent::new("device_code_decided", "ok", format!("{to} the device {}", d.client_id)).by(approver),
        );
        Ok(d.client_id)
    }

    /// The device code grant: the device polls until a user approved its code.
    pub async fn device_code_grant(
        &self,
        device_code: &str,
        client_id: &str,
    ) -> std::result::Result<Grant, GrantError> {
        let hash = secret::hash_secret(device_code);
        let Some(d) = self.store.device_code(Some(&hash), None).await? else {
            return Err(GrantError::new("invalid_grant", "unknown device code"));
        };
        if d.client_id != client_id {
            return Err(GrantError::new("invalid_grant", "the device code was issued to another client"));
        }
        let now = now();
        if d.expires_at < now {
            return Err(GrantError::new("expired_token", "the device code has expired; start again"));
        }
        match d.status.as_str() {
            "pending" => {
                self.store.touch_device_code(&hash, now).await?;
                if now - d.last_poll < DEVICE_CODE_INTERVAL {
                    return Err(GrantError::new("slow_down", format!("poll at most every {DEVICE_CODE_INTERVAL} s")));
                }
                Err(GrantError::new("authorization_pending", "the user has not approved the code yet"))
            }
            "denied" => Err(GrantError::new("access_denied", "the user denied the request")),
            "approved" => {
                if !self.store.set_device_code_status(&hash, "approved", "used", None).await? {
                    return Err(GrantError::new("invalid_grant", "the device code was already used"));
                }
                let client = self.state.read().clients.get(client_id).cloned();
                let client = client.ok_or_else(|| GrantError::new("invalid_client", "the client no longer exists"))?;
                let mut grant = self.client_credentials(&client, &d.scope).await?;
                if grant.refresh_token.is_none() {
                    let kind = Self::kind_of(&client).as_str();
                    grant.refresh_token = Some(
                        self.new_refresh(&secret::new_id()?, client_id, client_id, kind, &client.tenant, &d.scope)
                            .await?,
                    );
                }
                Ok(grant)
            }
            _ => Err(GrantError::new("invalid_grant", "the device code was already used")),
        }
    }

    /// Signs a user in with name and password (throttled, audited); an access and a refresh token.
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        source: Option<std::net::IpAddr>,
    ) -> std::result::Result<Grant, GrantError> {
        let key = format!("user:{name}@{}", source.map(|s| s.to_string()).unwrap_or_default());
        self.unless_locked(&key, name, source)?;
        let user = self.state.read().users.get(name).cloned();
        let hash = user.as_ref().and_then(|u| u.password_hash.clone());
        // Checks a hash even for unknown users, so that timing does not tell who exists;
        // off the async workers (argon2id takes tens of milliseconds by design).
        let ok = {
            let (password, hash) = (password.to_owned(), hash.clone());
            tokio::task::spawn_blocking(move || {
                let matched = secret::check_password(&password, hash.as_deref().unwrap_or(DUMMY_HASH));
                matched && hash.is_some()
            })
            .await
            .map_err(|e| GrantError::new("server_error", format!("password check: {e}")))?
        };
        match user {
            Some(u) if ok && !u.disabled => {
                self.succeeded(&key);
                let ttl = self.config.access_ttl.as_secs() as i64;
                let (access_token, claims) =
                    self.issue(&u.name, "user", &u.tenant, &u.roles, "ferrite-cli", "", ttl)?;
                let refresh =
                    self.new_refresh(&secret::new_id()?, "ferrite-cli", &u.name, "user", &u.tenant, "").await?;
                self.audit(
                    AuditEvent::new("token_issued", "ok", format!("login, jti {}", claims.jti))
                        .claimed(name)
                        .in_tenant(&u.tenant)
                        .from_source(source),
                );
                Ok(Grant { access_token, expires_in: ttl, scope: String::new(), refresh_token: Some(refresh) })
            }
            _ => Err(self.refuse(&key, "invalid_grant", "wrong user name or password", name, source)),
        }
    }

    // ---- the directory ----

    /// Adds a tenant.
    pub async fn add_tenant(&self, id: &str, by: &Principal) -> Result<bool> {
        if let Err(e) = ferrite_engine::validate_tenant(id) {
            return Err(Error::Invalid(format!("{e}: a tenant id names a directory of the archive")));
        }
        let added = self.store.add_tenant(id, now()).await?;
        self.state.write().tenants.insert(id.to_owned());
        self.audit(AuditEvent::new("tenant_added", "ok", id.to_owned()).by(by));
        Ok(added)
    }

    /// Every tenant.
    pub fn tenants(&self) -> Vec<String> {
        let mut t: Vec<_> = self.state.read().tenants.iter().cloned().collect();
        t.sort();
        t
    }

    fn require_tenant(&self, tenant: &str) -> Result<()> {
        if self.state.read().tenants.contains(tenant) {
            Ok(())
        } else {
            Err(Error::NotFound(format!("no tenant {tenant:?}: create it first (POST /api/v1/tenants)")))
        }
    }

    /// Adds a client (a device or a service); returns its secret, shown once.
    pub async fn add_client(&self, record: ClientRecord, by: Option<&Principal>) -> Result<(String, String)> {
        self.add_clients(vec![record], by).await?.pop().unwrap_or_else(|| Err(Error::Invalid("no client".into())))
    }

    /// Checks a new client and gives it a secret; the secret.
    fn prepare_client(&self, record: &mut ClientRecord) -> Result<String> {
        if record.id.is_empty() {
            record.id = secret::new_id()?;
        }
        if !valid_name(&record.id) {
            return Err(Error::Invalid(format!(
                "{:?} is not a valid client id (letters, digits, - _ . : @)",
                record.id
            )));
        }
        if record.kind != "device" && record.kind != "service" {
            return Err(Error::Invalid(format!("client kind {:?}: use device or service", record.kind)));
        }
        self.require_tenant(&record.tenant)?;
        if self.state.read().users.contains_key(&record.id) {
            return Err(Error::Invalid(format!("{:?} is already a user's name", record.id)));
        }
        let secret = secret::new_secret()?;
        record.secret_hash = secret::hash_secret(&secret);
        Ok(secret)
    }

    /// Adds clients in one store transaction (a bulk device import); per client, its id
    /// and secret (shown once) or why it was refused.
    pub async fn add_clients(
        &self,
        mut records: Vec<ClientRecord>,
        by: Option<&Principal>,
    ) -> Result<Vec<Result<(String, String)>>> {
        let prepared: Vec<Result<String>> = records.iter_mut().map(|r| self.prepare_client(r)).collect();
        let valid: Vec<ClientRecord> =
            records.iter().zip(&prepared).filter(|(_, p)| p.is_ok()).map(|(r, _)| r.clone()).collect();
        let mut added = self.store.add_clients(&valid, now()).await?.into_iter();
        let mut out = Vec::with_capacity(records.len());
        // A bulk import is one audit record per tenant, not thousands.
        let bulk = records.len() > 1;
        let mut bulk_added: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
        for (record, secret) in records.into_iter().zip(prepared) {
            let secret = match secret {
                Ok(s) => s,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            if !added.next().unwrap_or(false) {
                out.push(Err(Error::Invalid(format!("a client {:?} already exists", record.id))));
                continue;
            }
            if bulk {
                bulk_added.entry(record.tenant.clone()).or_default().push(record.id.clone());
            } else {
                let mut e = AuditEvent::new(
                    "client_added",
                    "ok",
                    format!("{} {} roles {:?}", record.kind, record.id, record.roles),
                )
                .in_tenant(&record.tenant);
                if let Some(p) = by {
                    e = e.by(p);
                }
                self.audit(e);
            }
            let id = record.id.clone();
            self.state.write().clients.insert(id.clone(), record);
            out.push(Ok((id, secret)));
        }
        for (tenant, ids) in bulk_added {
            let detail = format!(
                "{} clients added in bulk: {} .. {}",
                ids.len(),
                ids.first().map_or("", String::as_str),
                ids.last().map_or("", String::as_str)
            );
            let mut e = AuditEvent::new("clients_added", "ok", detail).in_tenant(&tenant);
            if let Some(p) = by {
                e = e.by(p);
            }
            self.audit(e);
        }
        self.changed();
        Ok(out)
    }

    /// Removes a client: its tokens stop working at once.
    pub async fn remove_client(&self, id: &str, by: &Principal) -> Result<bool> {
        self.remove_client_as(id, Some(by)).await
    }

    async fn remove_client_as(&self, id: &str, by: Option<&Principal>) -> Result<bool> {
        let removed = self.store.remove_client(id).await?;
        let record = self.state.write().clients.remove(id);
        self.changed();
        let mut e = AuditEvent::new("client_removed", "ok", id.to_owned());
        match (by, record) {
            (Some(p), _) => e = e.by(p),
            (None, Some(r)) => e = e.in_tenant(&r.tenant),
            (None, None) => {}
        }
        self.audit(e);
        Ok(removed)
    }

    /// Changes stored client `id` with `change` (in memory and in the store), audited as
    /// `event`; the decision caches drop their answers.
    async fn change_client(
        &self,
        id: &str,
        event: &'static str,
        change: impl FnOnce(&mut ClientRecord),
    ) -> Result<ClientRecord> {
        let mut record =
            self.state.read().clients.get(id).cloned().ok_or_else(|| Error::NotFound(format!("no client {id:?}")))?;
        change(&mut record);
        self.store.update_client(&record).await?;
        self.state.write().clients.insert(id.to_owned(), record.clone());
        self.changed();
        self.audit(AuditEvent::new(event, "ok", id.to_owned()).in_tenant(&record.tenant));
        Ok(record)
    }

    /// Gives client `id` a new secret (the old one stops working at once); the secret.
    pub async fn rotate_client_secret(&self, id: &str) -> Result<String> {
        let secret = secret::new_secret()?;
        let hash = secret::hash_secret(&secret);
        self.change_client(id, "client_secret_rotated", |c| c.secret_hash = hash).await?;
        Ok(secret)
    }

    /// Stages a new secret for client `id`, valid beside the current one until
    /// [`Identity::commit_client_secret`]; the new secret.
    pub async fn stage_client_secret(&self, id: &str) -> Result<String> {
        let secret = secret::new_secret()?;
        let hash = secret::hash_secret(&secret);
        self.change_client(id, "client_secret_staged", |c| c.next_secret_hash = Some(hash)).await?;
        Ok(secret)
    }

    /// Makes client `id`'s staged secret its only one: the old secret stops working. Nothing
    /// happens when none is staged.
    pub async fn commit_client_secret(&self, id: &str) -> Result<()> {
        let staged = self.state.read().clients.get(id).and_then(|c| c.next_secret_hash.clone());
        if let Some(hash) = staged {
            self.change_client(id, "client_secret_rotated", |c| {
                c.secret_hash = hash;
                c.next_secret_hash = None;
            })
            .await?;
        }
        Ok(())
    }

    /// Disables client `id` (it is refused at once, its tokens with it) or enables it.
    pub async fn set_client_disabled(&self, id: &str, disabled: bool) -> Result<()> {
        let event = if disabled { "client_disabled" } else { "client_enabled" };
        self.change_client(id, event, |c| c.disabled = disabled).await.map(|_| ())
    }

    /// Every client.
    pub fn clients(&self) -> Vec<ClientRecord> {
        let mut c: Vec<_> = self.state.read().clients.values().cloned().collect();
        c.sort_by(|a, b| a.id.cmp(&b.id));
        c
    }

    /// Adds a user with a password (hashed with argon2id).
    pub async fn add_user(
        &self,
        name: &str,
        tenant: &str,
        roles: Vec<String>,
        password: Option<&str>,
        by: &Principal,
    ) -> Result<()> {
        if !valid_name(name) {
            return Err(Error::Invalid(format!("{name:?} is not a valid user name")));
        }
        self.require_tenant(tenant)?;
        if self.state.read().clients.contains_key(name) {
            return Err(Error::Invalid(format!("{name:?} is already a client's id")));
        }
        let password_hash = match password {
            Some(p) if p.len() < 8 => return Err(Error::Invalid("a password needs at least 8 characters".into())),
            Some(p) => Some(hash_blocking(p).await?),
            None => None,
        };
        let record = UserRecord { name: name.into(), tenant: tenant.into(), password_hash, roles, disabled: false };
        if !self.store.add_user(&record, now()).await? {
            return Err(Error::Invalid(format!("a user {name:?} already exists")));
        }
        self.audit(AuditEvent::new("user_added", "ok", format!("{name} in {tenant} roles {:?}", record.roles)).by(by));
        self.state.write().users.insert(name.to_owned(), record);
        self.changed();
        Ok(())
    }

    /// Sets a user's password.
    pub async fn set_password(&self, name: &str, password: &str, by: &Principal) -> Result<()> {
        if password.len() < 8 {
            return Err(Error::Invalid("a password needs at least 8 characters".into()));
        }
        let hash = hash_blocking(password).await?;
        if !self.store.set_password(name, &hash).await? {
            return Err(Error::NotFound(format!("no user {name:?}")));
        }
        if let Some(u) = self.state.write().users.get_mut(name) {
            u.password_hash = Some(hash);
        }
        self.audit(AuditEvent::new("password_changed", "ok", name.to_owned()).by(by));
        Ok(())
    }

    /// Every user (without password hashes).
    pub fn users(&self) -> Vec<UserRecord> {
        let mut u: Vec<_> =
            self.state.read().users.values().map(|u| UserRecord { password_hash: None, ..u.clone() }).collect();
        u.sort_by(|a, b| a.name.cmp(&b.name));
        u
    }

    /// The tenant of a user or client, if it exists.
    pub fn tenant_of(&self, id: &str) -> Option<String> {
        let state = self.state.read();
        state.clients.get(id).map(|c| c.tenant.clone()).or_else(|| state.users.get(id).map(|u| u.tenant.clone()))
    }

    // ---- policies ----

    /// Puts a new policy set in force: the file documents replaced by `files` (if given),
    /// the API documents changed by `change`, the whole set compiled and validated. One
    /// update at a time; an invalid set is refused whole and the old one stays.
    fn install(
        &self,
        files: Option<Vec<(String, String)>>,
        change: impl FnOnce(&mut Vec<(String, String)>),
    ) -> Result<()> {
        let _one_at_a_time = self.policy_update.lock();
        let (mut file_docs, mut api_docs) = {
            let s = self.state.read();
            (s.file_policies.clone(), s.api_policies.clone())
        };
        if let Some(f) = files {
            file_docs = f;
        }
        change(&mut api_docs);
        let compiled = self.pdp.compile(&[file_docs.clone(), api_docs.clone()].concat())?;
        let mut state = self.state.write();
        state.policies = Arc::new(compiled);
        state.file_policies = file_docs;
        state.api_policies = api_docs;
        drop(state);
        self.changed();
        Ok(())
    }

    /// Re-reads the policy directory when a file in it changed (name, size or modification
    /// time); a broken set is refused, counted and audited once, and the old one kept.
    pub fn reload_policy_files(&self) -> Result<bool> {
        let signature = policy_dir_signature(&self.config.policies_dir)?;
        {
            let mut state = self.state.write();
            if state.policy_files_seen == signature {
                return Ok(false);
            }
            state.policy_files_seen = signature;
        }
        let files = read_policy_dir(&self.config.policies_dir)?;
        match self.install(Some(files), |_| {}) {
            Ok(()) => {
                self.audit(AuditEvent::new("policy_changed", "ok", "policy files reloaded"));
                tracing::info!("policy files reloaded");
                Ok(true)
            }
            Err(e) => {
                self.metrics.inc("ferrite_policy_reload_errors_total", &[], 1);
                self.audit(AuditEvent::new("policy_changed", "refused", e.to_string()));
                Err(e)
            }
        }
    }

    /// Stores (or replaces) a policy document through the API, once it validates with the rest.
    pub async fn put_policy(&self, id: &str, text: &str, by: &Principal) -> Result<()> {
        if !valid_name(id) {
            return Err(Error::Invalid(format!("{id:?} is not a valid policy id")));
        }
        let source = format!("api:{id}");
        let previous = self.state.read().api_policies.iter().find(|(s, _)| *s == source).cloned();
        let replace = |api: &mut Vec<(String, String)>, doc: Option<(String, String)>| {
            api.retain(|(s, _)| *s != source);
            api.extend(doc);
        };
        self.install(None, |api| replace(api, Some((source.clone(), text.to_owned())))).inspect_err(|e| {
            self.audit(AuditEvent::new("policy_changed", "refused", e.to_string()).by(by));
        })?;
        if let Err(e) = self.store.put_policy(id, text, now()).await {
            // Not durable: take it back out of force.
            self.install(None, |api| replace(api, previous))?;
            return Err(e);
        }
        self.audit(AuditEvent::new("policy_changed", "ok", format!("policy {id} stored")).by(by));
        Ok(())
    }

    /// Deletes a policy document stored through the API.
    pub async fn delete_policy(&self, id: &str, by: &Principal) -> Result<bool> {
        let removed = self.store.delete_policy(id).await?;
        let source = format!("api:{id}");
        self.install(None, |api| api.retain(|(s, _)| *s != source))?;
        self.audit(AuditEvent::new("policy_changed", "ok", format!("policy {id} deleted")).by(by));
        Ok(removed)
    }

    /// The policy documents in force: the built-in set, files, API documents.
    pub fn policy_documents(&self) -> Vec<(String, String)> {
        let state = self.state.read();
        let mut docs = vec![("default".to_owned(), crate::policy::DEFAULT_POLICIES.to_owned())];
        docs.extend(state.file_policies.iter().cloned());
        docs.extend(state.api_policies.iter().cloned());
        docs
    }

    /// Decides without auditing (for `policy check`).
    pub fn explain(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        context: &RequestContext,
    ) -> Result<Decision> {
        let policies = self.state.read().policies.clone();
        self.pdp.decide(&policies, principal, action, resource, context, &|d| self.topic_tenant(d), now())
    }

    fn topic_tenant(&self, device: &str) -> String {
        self.state.read().clients.get(device).map(|c| c.tenant.clone()).unwrap_or_else(|| DEFAULT_TENANT.to_owned())
    }

    /// The policy directory this service watches.
    pub fn policies_dir(&self) -> &Path {
        &self.config.policies_dir
    }
}

/// An argon2id hash checked for unknown users, so that a failed login takes as long either way.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Wg9mH0eyf8IyJ3yBSdDLuxWvrlgJKb4c7eGv+DCFLrA";

async fn hash_blocking(password: &str) -> Result<String> {
    let p = password.to_owned();
    tokio::task::spawn_blocking(move || secret::hash_password(&p))
        .await
        .map_err(|e| Error::Key(format!("hashing task: {e}")))?
}

/// The name, size and modification time of every `*.cedar` file of `dir`, by name: what
/// the watcher compares before it reads anything.
fn policy_dir_signature(dir: &Path) -> Result<Vec<(String, u64, Option<SystemTime>)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Policy(format!("cannot read the policy directory {}: {e}", dir.display()))),
    };
    let mut seen: Vec<_> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cedar"))
        .map(|e| {
            let meta = e.metadata().ok();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, meta.as_ref().map_or(0, |m| m.len()), meta.and_then(|m| m.modified().ok()))
        })
        .collect();
    seen.sort();
    Ok(seen)
}

/// Every `*.cedar` file of `dir` (none when it does not exist), by file name.
pub fn read_policy_dir(dir: &Path) -> Result<Vec<(String, String)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Policy(format!("cannot read the policy directory {}: {e}", dir.display()))),
    };
    let mut docs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "cedar") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::Policy(format!("cannot read {}: {e}", path.display())))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            docs.push((name, text));
        }
    }
    docs.sort();
    Ok(docs)
}

/// Writes `bytes` to `path` with mode 0600 (replacing what was there).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Io(format!("cannot write {}: {e}", path.display())))?;
    Ok(())
}

impl AccessControl for Identity {
    fn enabled(&self) -> bool {
        true
    }

    fn authenticate(
        &self,
        credentials: &Credentials<'_>,
        context: &RequestContext,
    ) -> std::result::Result<Principal, AuthError> {
        let (result, recorded) = match credentials {
            Credentials::Bearer(token) => (self.principal_from_token(token, None), false),
            Credentials::Mqtt { username, password, .. } => self.authenticate_mqtt(*username, *password, context),
            Credentials::Certificate { subject, username, .. } => {
                (self.authenticate_certificate(subject, *username), false)
            }
        };
        if let Err(e) = &result
            && !recorded
        {
            let who = match credentials {
                Credentials::Mqtt { username, .. } => username.unwrap_or(""),
                Credentials::Certificate { subject, .. } => subject,
                Credentials::Bearer(_) => "",
            };
            self.metrics.inc("ferrite_auth_failures_total", &[], 1);
            self.audit(
                AuditEvent::new("authentication_failed", "refused", e.to_string())
                    .claimed(who)
                    .from_source(context.source),
            );
        }
        result
    }

    fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        context: &RequestContext,
    ) -> Decision {
        if let Some(jti) = &principal.token_id
            && self.state.read().revoked.contains(jti.as_ref())
        {
            return Decision::deny();
        }
        let decision = self.explain(principal, action, resource, context).unwrap_or_else(|e| {
            tracing::error!(error = %e, "policy evaluation failed; denying");
            Decision::deny()
        });
        if !decision.allowed {
            self.metrics.inc("ferrite_access_denied_total", &[("action", action.as_str())], 1);
            let mut e =
                AuditEvent::new("denied", "refused", format!("{principal} may not {} {resource}", action.as_str()))
                    .by(principal)
                    .from_source(context.source);
            e.action = action.as_str().into();
            e.resource = resource.to_string();
            self.audit(e);
        }
        decision
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn record(&self, principal: &Principal, event: &'static str, detail: &str) {
        self.audit(AuditEvent::new(event, "ok", detail.to_owned()).by(principal));
    }

    fn tenant_exists(&self, tenant: &str) -> bool {
        self.state.read().tenants.contains(tenant)
    }

    fn still_valid(&self, principal: &Principal) -> bool {
        if let Some(jti) = &principal.token_id
            && self.state.read().revoked.contains(jti.as_ref())
        {
            return false;
        }
        // An external provider's principal holds as long as its token (no directory entry).
        if principal.issuer.is_some() {
            return true;
        }
        self.principal_of(&principal.id, principal.kind.as_str()).is_ok()
    }
}

impl Identity {
    /// An MQTT CONNECT's username and password (a token, or the client secret); `true` with
    /// an error already audited and counted where the secret was checked.
    fn authenticate_mqtt(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        context: &RequestContext,
    ) -> (std::result::Result<Principal, AuthError>, bool) {
        let refused = |why: &str| (Err(AuthError::InvalidCredentials(why.to_owned())), false);
        let (Some(user), Some(pass)) = (username, password) else {
            return refused(
                "MQTT CONNECT needs a username (the device or client id) and a password (an access token or the \
                 client secret)",
            );
        };
        let Ok(pass) = std::str::from_utf8(pass) else { return refused("the password is not UTF-8") };
        if pass.len() > crate::tokens::MAX_TOKEN_BYTES {
            return refused("the password is too long");
        }
        if pass.split('.').count() == 3 {
            return (self.principal_from_token(pass, Some(user)), false);
        }
        match self.authenticate_client(user, pass, context.source) {
            Ok(c) => {
                (self.principal_of(&c.id, Self::kind_of(&c).as_str()).map_err(AuthError::InvalidCredentials), false)
            }
            Err(e) => (Err(AuthError::InvalidCredentials(e.description)), true),
        }
    }

    /// The device a verified client certificate names: it must exist, be a device and be
    /// enabled; an MQTT username beside the certificate must name the same device.
    fn authenticate_certificate(
        &self,
        subject: &str,
        username: Option<&str>,
    ) -> std::result::Result<Principal, AuthError> {
        if let Some(user) = username
            && !user.is_empty()
            && user != subject
        {
            return Err(AuthError::InvalidCredentials(format!(
                "the MQTT username {user:?} is not the device {subject:?} that the client certificate names"
            )));
        }
        self.principal_of(subject, PrincipalKind::Device.as_str()).map_err(|e| {
            AuthError::InvalidCredentials(format!(
                "client certificate for {subject:?}: {e} (register the device, or enable it)"
            ))
        })
    }

    fn principal_from_token(&self, token: &str, mqtt_user: Option<&str>) -> std::result::Result<Principal, AuthError> {
        if let Some(external) = &self.external
            && crate::external::unverified_issuer(token).as_deref() == Some(external.issuer())
        {
            return self.external_principal(external, token, mqtt_user);
        }
        let claims = self.verify_token(token).map_err(AuthError::InvalidToken)?;
        if let Some(user) = mqtt_user
            && user != claims.sub
        {
            return Err(AuthError::InvalidCredentials(format!(
                "the MQTT username {user:?} is not the token's subject {:?}",
                claims.sub
            )));
        }
        let mut p = self.principal_of(&claims.sub, &claims.kind).map_err(AuthError::InvalidToken)?;
        p.token_id = Some(claims.jti.into());
        Ok(p)
    }

    /// The principal of a token of the external provider: a user of the tenant its claims
    /// name (which must exist), with the roles they list.
    fn external_principal(
        &self,
        external: &crate::external::ExternalIssuer,
        token: &str,
        mqtt_user: Option<&str>,
    ) -> std::result::Result<Principal, AuthError> {
        let claims = external.verify(token).map_err(AuthError::InvalidToken)?;
        if let Some(user) = mqtt_user
            && user != claims.subject
        {
            return Err(AuthError::InvalidCredentials(format!(
                "the MQTT username {user:?} is not the token's subject {:?}",
                claims.subject
            )));
        }
        if !self.state.read().tenants.contains(&claims.tenant) {
            return Err(AuthError::InvalidToken(format!(
                "the token's tenant {:?} does not exist in Ferrite (create it, or map the provider's claim with \
                 oidc_tenant_claim / oidc_default_tenant)",
                claims.tenant
            )));
        }
        if let Some(jti) = &claims.token_id
            && self.state.read().revoked.contains(jti)
        {
            return Err(AuthError::InvalidToken("the token has been revoked".into()));
        }
        let mut p = Principal::new(PrincipalKind::User, &claims.subject, &claims.tenant).with_roles(claims.roles);
        p.token_id = claims.token_id.map(Into::into);
        p.issuer = Some(external.issuer().into());
        Ok(p)
    }
}

/// The device plugin registers, rotates, disables and removes devices' credentials here:
/// a device is a client of kind `device`.
impl ferrite_engine::plugin::DeviceCredentials for Identity {
    fn register<'a>(
        &'a self,
        device: &'a ferrite_engine::plugin::DeviceIdentity,
    ) -> ferrite_engine::plugin::PluginFuture<'a, std::result::Result<Option<String>, String>> {
        Box::pin(async move {
            let mut results =
                ferrite_engine::plugin::DeviceCredentials::register_many(self, std::slice::from_ref(device)).await;
            results.pop().unwrap_or_else(|| Err("nothing registered".into()))
        })
    }

    fn register_many<'a>(
        &'a self,
        devices: &'a [ferrite_engine::plugin::DeviceIdentity],
    ) -> ferrite_engine::plugin::PluginFuture<'a, Vec<std::result::Result<Option<String>, String>>> {
        Box::pin(async move {
            // A device is a client of kind `device`, without roles: the device policies apply.
            let records = devices
                .iter()
                .map(|d| ClientRecord {
                    id: d.id.clone(),
                    tenant: d.tenant.clone(),
                    kind: "device".into(),
                    secret_hash: String::new(),
                    roles: Vec::new(),
                    device_type: d.device_type.clone(),
                    children: d.children.clone(),
                    disabled: false,
                    next_secret_hash: None,
                })
                .collect();
            match self.add_clients(records, None).await {
                Ok(results) => {
                    results.into_iter().map(|r| r.map(|(_, s)| Some(s)).map_err(|e| e.to_string())).collect()
                }
                Err(e) => devices.iter().map(|_| Err(e.to_string())).collect(),
            }
        })
    }

    fn rotate<'a>(
        &'a self,
        id: &'a str,
    ) -> ferrite_engine::plugin::PluginFuture<'a, std::result::Result<Option<String>, String>> {
        Box::pin(async move { self.rotate_client_secret(id).await.map(Some).map_err(|e| e.to_string()) })
    }

    fn stage<'a>(
        &'a self,
        id: &'a str,
    ) -> ferrite_engine::plugin::PluginFuture<'a, std::result::Result<Option<String>, String>> {
        Box::pin(async move { self.stage_client_secret(id).await.map(Some).map_err(|e| e.to_string()) })
    }

    fn commit<'a>(&'a self, id: &'a str) -> ferrite_engine::plugin::PluginFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move { self.commit_client_secret(id).await.map_err(|e| e.to_string()) })
    }

    fn set_disabled<'a>(
        &'a self,
        id: &'a str,
        disabled: bool,
    ) -> ferrite_engine::plugin::PluginFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move { self.set_client_disabled(id, disabled).await.map_err(|e| e.to_string()) })
    }

    fn remove<'a>(&'a self, id: &'a str) -> ferrite_engine::plugin::PluginFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move { self.remove_client_as(id, None).await.map(|_| ()).map_err(|e| e.to_string()) })
    }

    fn set_children<'a>(
        &'a self,
        gateway: &'a str,
        mut children: Vec<String>,
    ) -> ferrite_engine::plugin::PluginFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move {
            children.sort();
            if self.state.read().clients.get(gateway).is_some_and(|c| c.children == children) {
                return Ok(());
            }
            self.change_client(gateway, "gateway_children_changed", |c| c.children = children)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

//! The policy enforcement points (PEP): what ingest, query, rules and every plugin call
//! before they act, and what the identity plugin implements.
//!
//! A request is first *authenticated* ([`AccessControl::authenticate`]: a bearer token, an
//! MQTT CONNECT's username and password) into a [`Principal`], then every action it asks for
//! is *authorized* ([`AccessControl::authorize`]: principal, [`Action`], [`Resource`],
//! [`RequestContext`]). Server crates see only these traits; with no identity plugin
//! ([`AllowAll`], `--auth off`) every decision allows.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// The stream the audit trail goes to; only holders of `read_audit` see it.
pub const AUDIT_STREAM: &str = "audit";

/// What kind of party a principal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// A person (or the built-in `admin`), from the user directory.
    User,
    /// A device, authenticated with its own client id and secret or token.
    Device,
    /// A service client (client credentials grant).
    Service,
}

impl PrincipalKind {
    /// The name used in policies and tokens: `user`, `device`, `service`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Device => "device",
            Self::Service => "service",
        }
    }

    /// Parses [`PrincipalKind::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            "device" => Some(Self::Device),
            "service" | "client" => Some(Self::Service),
            _ => None,
        }
    }
}

/// An authenticated party: who it is, its tenant and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User, device or service.
    pub kind: PrincipalKind,
    /// The user name, device id or client id.
    pub id: Arc<str>,
    /// The tenant everything it does belongs to.
    pub tenant: Arc<str>,
    /// Roles (`admin`, `operator`, `viewer`, `ingest`, ...), matched by policies.
    pub roles: Arc<[String]>,
    /// A device's type, when known.
    pub device_type: Option<Arc<str>>,
    /// A gateway's registered children: it may act for them.
    pub children: Arc<[String]>,
    /// The token's id (`jti`) when the principal came from a token: revoking it ends the
    /// principal's rights at once.
    pub token_id: Option<Arc<str>>,
    /// The external OpenID provider that vouched for it (`None`: Ferrite's own directory).
    pub issuer: Option<Arc<str>>,
}

impl Principal {
    /// A principal with no roles, children or token.
    pub fn new(kind: PrincipalKind, id: &str, tenant: &str) -> Self {
        Self {
            kind,
            id: id.into(),
            tenant: tenant.into(),
            roles: Arc::new([]),
            device_type: None,
            children: Arc::new([]),
            token_id: None,
            issuer: None,
        }
    }

    /// The same principal with these roles.
    pub fn with_roles<I: IntoIterator<Item = S>, S: Into<String>>(mut self, roles: I) -> Self {
        self.roles = roles.into_iter().map(Into::into).collect::<Vec<_>>().into();
        self
    }

    /// Whether it holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// The principal every request gets when identity is off (`--auth off`).
    pub fn anonymous() -> Self {
        Self::new(PrincipalKind::User, "anonymous", crate::ids::DEFAULT_TENANT).with_roles(["admin"])
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}::{:?} (tenant {})", self.kind.as_str(), self.id, self.tenant)
    }
}

/// What a principal asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Publish an MQTT message.
    Publish,
    /// Subscribe to an MQTT topic filter.
    Subscribe,
    /// Write events to a stream over HTTP.
    Ingest,
    /// Run SQL, list streams and rules.
    Query,
    /// Deploy, replace or delete rules.
    ManageRules,
    /// Register, change or remove devices.
    ManageDevices,
    /// Send a command to a device.
    Actuate,
    /// Manage tenants, users, clients, tokens and policies.
    ManageIdentity,
    /// Read the audit stream.
    ReadAudit,
    /// Read `/metrics`.
    ReadMetrics,
}

impl Action {
    /// Every action, in a fixed order.
    pub const ALL: [Action; 10] = [
        Self::Publish,
        Self::Subscribe,
        Self::Ingest,
        Self::Query,
        Self::ManageRules,
        Self::ManageDevices,
        Self::Actuate,
        Self::ManageIdentity,
        Self::ReadAudit,
        Self::ReadMetrics,
    ];

    /// The action's name in policies (`Ferrite::Action::"publish"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
            Self::Ingest => "ingest",
            Self::Query => "query",
            Self::ManageRules => "manage_rules",
            Self::ManageDevices => "manage_devices",
            Self::Actuate => "actuate",
            Self::ManageIdentity => "manage_identity",
            Self::ReadAudit => "read_audit",
            Self::ReadMetrics => "read_metrics",
        }
    }

    /// Parses [`Action::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// What an action is done to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A stream of a tenant.
    Stream {
        /// Its tenant.
        tenant: Arc<str>,
        /// Its name.
        name: Arc<str>,
    },
    /// An MQTT topic or topic filter.
    Topic(Arc<str>),
    /// A device of a tenant.
    Device {
        /// Its tenant.
        tenant: Arc<str>,
        /// Its id.
        id: Arc<str>,
    },
    /// A rule of a tenant.
    Rule {
        /// Its tenant.
        tenant: Arc<str>,
        /// Its name.
        name: Arc<str>,
    },
    /// A tenant as a whole (its catalog, its identity objects).
    Tenant(Arc<str>),
}

impl Resource {
    /// A stream resource.
    pub fn stream(tenant: &str, name: &str) -> Self {
        Self::Stream { tenant: tenant.into(), name: name.into() }
    }

    /// A rule resource.
    pub fn rule(tenant: &str, name: &str) -> Self {
        Self::Rule { tenant: tenant.into(), name: name.into() }
    }

    /// A tenant resource.
    pub fn tenant(tenant: &str) -> Self {
        Self::Tenant(tenant.into())
    }

    /// A topic resource.
    pub fn topic(topic: &str) -> Self {
        Self::Topic(topic.into())
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stream { tenant, name } => write!(f, "stream {tenant}/{name}"),
            Self::Topic(t) => write!(f, "topic {t:?}"),
            Self::Device { tenant, id } => write!(f, "device {tenant}/{id}"),
            Self::Rule { tenant, name } => write!(f, "rule {tenant}/{name}"),
            Self::Tenant(t) => write!(f, "tenant {t}"),
        }
    }
}

/// The door a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// The HTTP API.
    Http,
    /// The MQTT listener.
    Mqtt,
    /// The command line, on the server's own machine.
    Local,
    /// The server's own services acting for a tenant (a rule's actions).
    Internal,
    /// The PostgreSQL wire protocol listener.
    Postgres,
    /// The Arrow Flight SQL listener.
    Flight,
    /// The CoAP listener (UDP).
    Coap,
}

impl Transport {
    /// The name used in policies' context (`context.transport`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Mqtt => "mqtt",
            Self::Local => "local",
            Self::Internal => "internal",
            Self::Postgres => "pgwire",
            Self::Flight => "flight",
            Self::Coap => "coap",
        }
    }
}

/// Where and how a request arrived: the context of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// HTTP, MQTT or local.
    pub transport: Transport,
    /// The peer's address, when known.
    pub source: Option<IpAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

impl RequestContext {
    /// A context for `transport` from `source`, without TLS.
    pub fn new(transport: Transport, source: Option<IpAddr>) -> Self {
        Self { transport, source, tls: false }
    }
}

/// The device a verified TLS client certificate names, as an HTTPS request's extension
/// (set by the HTTPS listener when the handshake verified one against the device CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate(pub std::sync::Arc<str>);

/// What a request presents to prove who it is.
#[derive(Debug, Clone, Copy)]
pub enum Credentials<'a> {
    /// `Authorization: Bearer <token>`.
    Bearer(&'a str),
    /// An MQTT CONNECT: the username is the principal's id, the password an access token
    /// issued to it or its client secret.
    Mqtt {
        /// The CONNECT's client identifier.
        client_id: &'a str,
        /// The CONNECT's username.
        username: Option<&'a str>,
        /// The CONNECT's password.
        password: Option<&'a [u8]>,
    },
    /// A client certificate the TLS handshake verified against the configured device CA
    /// (mutual TLS): it names the device (`subject`); an MQTT username beside it must be
    /// the same id, and a password is not needed.
    Certificate {
        /// The device id the certificate names (subject CN, or a `urn:ferrite:device:` URI).
        subject: &'a str,
        /// The CONNECT's client identifier.
        client_id: &'a str,
        /// The CONNECT's username, if any.
        username: Option<&'a str>,
    },
}

/// Why authentication failed: always answered as HTTP 401 or CONNACK "not authorized".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all.
    #[error(
        "no credentials: send `Authorization: Bearer <access token>` (get one from POST /oauth2/token, or use \
         {{data}}/admin.token)"
    )]
    Missing,
    /// A token that is malformed, forged, expired, revoked or not meant for Ferrite.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// A wrong client secret or password, or an unknown or disabled principal.
    #[error("invalid credentials: {0}")]
    InvalidCredentials(String),
}

impl AuthError {
    /// The machine-readable code of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "unauthenticated",
            Self::InvalidToken(_) => "invalid_token",
            Self::InvalidCredentials(_) => "invalid_credentials",
        }
    }
}

/// The answer to an authorization request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the action may go ahead.
    pub allowed: bool,
    /// The ids of the policies that decided it (empty for a default deny).
    pub policies: Vec<String>,
}

impl Decision {
    /// An allow that names no policy (identity off).
    pub fn allow() -> Self {
        Self { allowed: true, policies: Vec::new() }
    }

    /// A deny that names no policy.
    pub fn deny() -> Self {
        Self { allowed: false, policies: Vec::new() }
    }
}

/// The enforcement points' view of the identity service: authenticate, then authorize.
pub trait AccessControl: Send + Sync {
    /// Whether identity is on; `false` only for [`AllowAll`].
    fn enabled(&self) -> bool;

    /// Turns credentials into a principal, or says why not.
    fn authenticate(&self, credentials: &Credentials<'_>, context: &RequestContext) -> Result<Principal, AuthError>;

    /// Decides whether `principal` may do `action` to `resource`. Denials are audited by
    /// the implementation.
    fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        context: &RequestContext,
    ) -> Decision;

    /// A number that changes whenever policies, tokens or devices change: caches of
    /// decisions compare it and drop themselves when it moved.
    fn generation(&self) -> u64;

    /// Whether a principal authenticated earlier (a long-lived MQTT session) still holds:
    /// its token not revoked, the device not disabled.
    fn still_valid(&self, principal: &Principal) -> bool;

    /// Records a change a principal made (a rule deployed, a device removed) in the audit
    /// trail. Without identity there is no trail.
    fn record(&self, _principal: &Principal, _event: &'static str, _detail: &str) {}

    /// Whether `tenant` exists (a request naming an unknown tenant is refused).
    fn tenant_exists(&self, tenant: &str) -> bool {
        tenant == crate::ids::DEFAULT_TENANT
    }
}

/// No identity (`--auth off`): every request is the anonymous admin, every decision allows.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl AccessControl for AllowAll {
    fn enabled(&self) -> bool {
        false
    }

    fn authenticate(&self, _: &Credentials<'_>, _: &RequestContext) -> Result<Principal, AuthError> {
        Ok(Principal::anonymous())
    }

    fn authorize(&self, _: &Principal, _: Action, _: &Resource, _: &RequestContext) -> Decision {
        Decision::allow()
    }

    fn generation(&self) -> u64 {
        0
    }

    fn still_valid(&self, _: &Principal) -> bool {
        true
    }

    fn tenant_exists(&self, _: &str) -> bool {
        true
    }
}

/// A refusal by policy: answered as HTTP 403, SUBACK failure or a dropped PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{principal} may not {action} {resource}: denied by policy")]
pub struct Denied {
    /// Who asked.
    pub principal: String,
    /// What for.
    pub action: &'static str,
    /// On what.
    pub resource: String,
}

/// An authenticated request: its principal, where it came from, and the decision point.
/// HTTP handlers find it in the request's extensions (the authentication middleware puts
/// it there) and call [`Caller::check`] before they act.
#[derive(Clone)]
pub struct Caller {
    /// Who is asking.
    pub principal: Principal,
    /// How the request arrived.
    pub context: RequestContext,
    /// The decision point.
    pub access: Arc<dyn AccessControl>,
    /// The tenant the request acts in: the principal's own, or the one it named with the
    /// `Ferrite-Tenant` header (policies then decide whether it may act there).
    tenant: Arc<str>,
}

/// The HTTP header with which a caller acts in a tenant other than its own (a platform
/// operator working in a customer's tenant); policies decide whether it may.
pub const TENANT_HEADER: &str = "ferrite-tenant";

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("principal", &self.principal)
            .field("tenant", &self.tenant)
            .field("context", &self.context)
            .finish()
    }
}

impl Caller {
    /// A request of `principal`, acting in its own tenant.
    pub fn new(principal: Principal, context: RequestContext, access: Arc<dyn AccessControl>) -> Self {
        let tenant = principal.tenant.clone();
        Self { principal, context, access, tenant }
    }

    /// The same caller acting in `tenant`.
    pub fn in_tenant(mut self, tenant: &str) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// The tenant the request acts in: every stream, rule and table it names is this
    /// tenant's.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Records a change the caller made in the audit trail.
    pub fn record(&self, event: &'static str, detail: &str) {
        self.access.record(&self.principal, event, detail);
    }

    /// Whether the caller may do `action` to `resource`.
    pub fn allowed(&self, action: Action, resource: &Resource) -> bool {
        self.access.authorize(&self.principal, action, resource, &self.context).allowed
    }

    /// `Ok` when the caller may do `action` to `resource`, the refusal otherwise.
    pub fn check(&self, action: Action, resource: &Resource) -> Result<(), Denied> {
        if self.allowed(action, resource) {
            Ok(())
        } else {
            Err(Denied {
                principal: self.principal.to_string(),
                action: action.as_str(),
                resource: resource.to_string(),
            })
        }
    }
}

/// The decisions of one long-lived session (an MQTT connection), per action and topic, so
/// that the publish hot path asks the policy engine once per topic, not per message. It
/// drops itself when [`AccessControl::generation`] moves, and stays bounded.
#[derive(Debug, Default)]
pub struct DecisionCache {
    generation: u64,
    /// Per action, per topic: a lookup by `&str` allocates nothing.
    decisions: HashMap<Action, HashMap<Box<str>, bool>>,
}

/// How many decisions one session keeps before it starts over.
const DECISION_CACHE_MAX: usize = 4096;

/// One cached or fresh decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedDecision {
    /// Whether the action may go ahead.
    pub allowed: bool,
    /// Whether the policy engine was asked this time (the first decision for the topic
    /// since the last change): the moment to log and audit a denial.
    pub fresh: bool,
    /// Whether the principal no longer holds (revoked token, disabled device): the session
    /// should end.
    pub revoked: bool,
}

impl DecisionCache {
    /// Decides `action` on `topic`, from the cache when nothing changed since.
    pub fn decide(
        &mut self,
        access: &dyn AccessControl,
        principal: &Principal,
        action: Action,
        topic: &str,
        context: &RequestContext,
    ) -> CachedDecision {
        let generation = access.generation();
        if generation != self.generation {
            self.decisions.clear();
            self.generation = generation;
            if !access.still_valid(principal) {
                return CachedDecision { allowed: false, fresh: true, revoked: true };
            }
        }
        if let Some(&allowed) = self.decisions.get(&action).and_then(|m| m.get(topic)) {
            return CachedDecision { allowed, fresh: false, revoked: false };
        }
        let allowed = access.authorize(principal, action, &Resource::topic(topic), context).allowed;
        if self.decisions.values().map(HashMap::len).sum::<usize>() >= DECISION_CACHE_MAX {
            self.decisions.clear();
        }
        self.decisions.entry(action).or_default().insert(topic.into(), allowed);
        CachedDecision { allowed, fresh: true, revoked: false }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use super::*;

    /// Allows topics under `devices/{id}/`, counts its decisions, and can be told that
    /// something changed.
    #[derive(Default)]
    struct Counting {
        asked: AtomicUsize,
        generation: AtomicU64,
    }

    impl AccessControl for Counting {
        fn enabled(&self) -> bool {
            true
        }
        fn authenticate(&self, _: &Credentials<'_>, _: &RequestContext) -> Result<Principal, AuthError> {
            Err(AuthError::Missing)
        }
        fn authorize(&self, p: &Principal, _: Action, r: &Resource, _: &RequestContext) -> Decision {
            self.asked.fetch_add(1, Ordering::Relaxed);
            let Resource::Topic(t) = r else { return Decision::deny() };
            if t.starts_with(&format!("devices/{}/", p.id)) { Decision::allow() } else { Decision::deny() }
        }
        fn generation(&self) -> u64 {
            self.generation.load(Ordering::Relaxed)
        }
        fn still_valid(&self, _: &Principal) -> bool {
            true
        }
    }

    #[test]
    fn a_session_asks_once_per_topic_until_something_changes() {
        let access = Counting::default();
        let p = Principal::new(PrincipalKind::Device, "d1", "default");
        let ctx = RequestContext::new(Transport::Mqtt, None);
        let mut cache = DecisionCache::default();
        for _ in 0..100 {
            assert!(cache.decide(&access, &p, Action::Publish, "devices/d1/telemetry", &ctx).allowed);
            assert!(!cache.decide(&access, &p, Action::Publish, "devices/d2/telemetry", &ctx).allowed);
        }
        assert_eq!(access.asked.load(Ordering::Relaxed), 2);
        // A policy change drops the cache: the next publish asks again.
        access.generation.fetch_add(1, Ordering::Relaxed);
        let d = cache.decide(&access, &p, Action::Publish, "devices/d1/telemetry", &ctx);
        assert!(d.allowed && d.fresh);
        assert_eq!(access.asked.load(Ordering::Relaxed), 3);
        // Subscribe and publish are separate decisions.
        assert!(cache.decide(&access, &p, Action::Subscribe, "devices/d1/telemetry", &ctx).fresh);
    }

    #[test]
    fn allow_all_allows_and_names_the_anonymous_admin() {
        let ctx = RequestContext::new(Transport::Http, None);
        let p = AllowAll.authenticate(&Credentials::Bearer("anything"), &ctx).expect("allowed");
        assert!(p.has_role("admin"));
        assert!(AllowAll.authorize(&p, Action::ManageIdentity, &Resource::tenant("x"), &ctx).allowed);
    }
}

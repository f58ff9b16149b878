//! Tokens of an external OpenID Connect provider (Keycloak, Auth0, Entra ID): verified
//! against the provider's published key set (JWKS), their claims mapped to a Ferrite
//! principal (subject, tenant, roles), then decided by the same policies as Ferrite's own.
//!
//! The key set is fetched in the background (at start, every `refresh`, and soon after a
//! token names a key the set does not hold, e.g. after the provider rotated its keys), so a
//! request never waits on the provider. Only asymmetric keys are used: an `HS256` token
//! "signed" with a published key, `alg: none`, or an algorithm the key was not made for is
//! refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use parking_lot::{Mutex, RwLock};
use serde_json::Value;

/// Clock skew tolerated on `exp` and `nbf`, seconds.
const LEEWAY_SECS: u64 = 30;
/// Largest key set or discovery document read from the provider.
const MAX_DOCUMENT_BYTES: u64 = 1024 * 1024;
/// Soonest a token naming an unknown key triggers another fetch.
const MIN_REFETCH: Duration = Duration::from_secs(5);

/// Where an external provider's tokens come from and how their claims map to principals.
#[derive(Debug, Clone)]
pub struct ExternalConfig {
    /// The provider's issuer (`iss` of its tokens), e.g. `https://sso.example.com/realms/iot`.
    pub issuer: String,
    /// Its key set's URL; empty: discovered from `{issuer}/.well-known/openid-configuration`.
    pub jwks_url: String,
    /// The audience (`aud`) its tokens must name for Ferrite.
    pub audience: String,
    /// The claim holding the principal's tenant (a dotted path into nested objects).
    pub tenant_claim: String,
    /// The claim holding its roles: an array of strings, or one space-separated string
    /// (a dotted path: `realm_access.roles` for Keycloak).
    pub roles_claim: String,
    /// The tenant of tokens without the tenant claim.
    pub default_tenant: String,
    /// How often the key set is fetched again.
    pub refresh: Duration,
}

impl ExternalConfig {
    /// A provider with the default claim mapping (`tenant`, `roles`) and audience `ferrite`.
    pub fn new(issuer: &str) -> Self {
        Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            jwks_url: String::new(),
            audience: crate::tokens::AUDIENCE.to_owned(),
            tenant_claim: "tenant".to_owned(),
            roles_claim: "roles".to_owned(),
            default_tenant: ferrite_engine::ids::DEFAULT_TENANT.to_owned(),
            refresh: Duration::from_secs(600),
        }
    }
}

/// What an external token says about its bearer, once verified and mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalClaims {
    /// `sub`.
    pub subject: String,
    /// From the tenant claim, or the configured default.
    pub tenant: String,
    /// From the roles claim.
    pub roles: Vec<String>,
    /// `jti`, when the token has one.
    pub token_id: Option<String>,
}

struct Key {
    key: DecodingKey,
    /// The algorithms this key may verify (its `alg`, or its family's).
    algorithms: Vec<Algorithm>,
}

/// An external provider: its configuration and its current key set.
pub struct ExternalIssuer {
    config: ExternalConfig,
    keys: RwLock<HashMap<String, Arc<Key>>>,
    wanted: tokio::sync::Notify,
    last_fetch: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for ExternalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalIssuer").field("issuer", &self.config.issuer).finish()
    }
}

/// The `iss` claim of a token, read without checking anything (to pick the verifier).
pub fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// The value at a dotted `path` of `claims`.
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

/// Which algorithms a key may verify; `None` for keys Ferrite never uses (symmetric ones,
/// curves it does not support).
fn algorithms_of(jwk: &Jwk) -> Option<Vec<Algorithm>> {
    let declared = jwk.common.key_algorithm.and_then(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::PS384 => Some(Algorithm::PS384),
        KeyAlgorithm::PS512 => Some(Algorithm::PS512),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
        _ => return None,
    };
    match declared {
        Some(a) if family.contains(&a) => Some(vec![a]),
        Some(_) => None,
        None if jwk.common.key_algorithm.is_some() => None,
        None => Some(family),
    }
}

impl ExternalIssuer {
    /// A provider with no keys yet (see [`ExternalIssuer::run`] and [`ExternalIssuer::set_keys`]).
    pub fn new(config: ExternalConfig) -> Self {
        Self {
            config,
            keys: RwLock::new(HashMap::new()),
            wanted: tokio::sync::Notify::new(),
            last_fetch: Mutex::new(None),
        }
    }

    /// The provider's issuer.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// The tenant tokens without a tenant claim belong to.
    pub fn default_tenant(&self) -> &str {
        &self.config.default_tenant
    }

    /// Replaces the key set with the usable keys of a JWKS document; how many there are.
    /// Symmetric keys and unsupported curves are skipped (and logged).
    pub fn set_keys(&self, jwks: &Value) -> Result<usize, String> {
        let list = jwks.get("keys").and_then(Value::as_array).ok_or("the key set has no `keys` array")?;
        let mut keys = HashMap::new();
        for (i, raw) in list.iter().enumerate() {
            let parsed = serde_json::from_value::<Jwk>(raw.clone()).map_err(|e| e.to_string());
            let usable = parsed.and_then(|jwk| {
                let algorithms = algorithms_of(&jwk).ok_or("not an RSA, P-256, P-384 or Ed25519 signing key")?;
                let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
                Ok((jwk.common.key_id.clone().unwrap_or_default(), Key { key, algorithms }))
            });
            match usable {
                Ok((kid, key)) => {
                    keys.insert(kid, Arc::new(key));
                }
                Err(why) => {
                    tracing::warn!(issuer = %self.config.issuer, key = i, why, "skipping a key of the provider's key set")
                }
            }
        }
        if keys.is_empty() {
            return Err("the key set holds no usable signing key".into());
        }
        let n = keys.len();
        *self.keys.write() = keys;
        Ok(n)
    }

    /// Fetches the key set (discovering its URL first when not configured). Blocking.
    pub fn fetch(&self) -> Result<usize, String> {
        *self.last_fetch.lock() = Some(Instant::now());
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let get = |url: &str| -> Result<Value, String> {
            let mut resp = agent.get(url).call().map_err(|e| format!("cannot fetch {url}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{url} answered {}", resp.status()));
            }
            let text = resp
                .body_mut()
                .with_config()
                .limit(MAX_DOCUMENT_BYTES)
                .read_to_string()
                .map_err(|e| format!("cannot read {url}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("{url} is not JSON: {e}"))
        };
        let jwks_url = if self.config.jwks_url.is_empty() {
            let discovery = format!("{}/.well-known/openid-configuration", self.config.issuer);
            let doc = get(&discovery)?;
            doc.get("jwks_uri")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or(format!("{discovery} has no jwks_uri"))?
        } else {
            self.config.jwks_url.clone()
        };
        self.set_keys(&get(&jwks_url)?)
    }

    /// Keeps the key set fresh (until the task is aborted): fetches now, every `refresh`,
    /// and soon after a token named an unknown key.
    pub async fn run(self: Arc<Self>) {
        loop {
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.fetch()).await {
                Ok(Ok(n)) => {
                    tracing::info!(issuer = %self.config.issuer, keys = n, "external token issuer's keys loaded")
                }
                Ok(Err(e)) => tracing::error!(
                    issuer = %self.config.issuer,
                    error = %e,
                    "cannot load the external token issuer's keys; its tokens are refused until they load \
                     (check oidc_issuer / oidc_jwks_url)"
                ),
                Err(e) => tracing::error!(error = %e, "the key set fetch failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.refresh) => {}
                () = self.wanted.notified() => {
                    let since = self.last_fetch.lock().map_or(MIN_REFETCH, |t| t.elapsed());
                    if since < MIN_REFETCH {
                        tokio::time::sleep(MIN_REFETCH - since).await;
                    }
                }
            }
        }
    }

    /// Verifies a token of this provider and maps its claims.
    pub fn verify(&self, token: &str) -> Result<ExternalClaims, String> {
        let issuer = &self.config.issuer;
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) => "the header's algorithm is not accepted".to_owned(),
            _ => format!("the header does not decode: {e}"),
        })?;
        let kid = header.kid.clone().unwrap_or_default();
        let Some(key) = self.keys.read().get(&kid).cloned() else {
            self.wanted.notify_one();
            return Err(format!(
                "signed by key {kid:?}, which {issuer}'s key set does not hold (it is fetched again; retry shortly)"
            ));
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not accepted for key {kid:?} of {issuer}", header.alg));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let claims =
            jsonwebtoken::decode::<Value>(token, &key.key, &validation).map(|d| d.claims).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf is in the future)".to_owned(),
                    ErrorKind::InvalidIssuer => format!("the token was not issued by {issuer}"),
                    ErrorKind::InvalidAudience => {
                        format!("the token is not meant for Ferrite (audience must include {:?})", self.config.audience)
                    }
                    ErrorKind::InvalidSignature => "the signature does not verify".to_owned(),
                    ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c:?} claim"),
                    _ => format!("the token does not decode: {e}"),
                }
            })?;
        self.map(&claims)
    }

    /// A verified token's claims as a principal's subject, tenant and roles.
    fn map(&self, claims: &Value) -> Result<ExternalClaims, String> {
        let subject = claims.get("sub").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or("empty `sub` claim")?;
        let tenant = match claim(claims, &self.config.tenant_claim) {
            None | Some(Value::Null) => self.config.default_tenant.clone(),
            Some(Value::String(t)) => t.clone(),
            Some(other) => return Err(format!("the `{}` claim is not a string: {other}", self.config.tenant_claim)),
        };
        let roles = match claim(claims, &self.config.roles_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            Some(other) => {
                return Err(format!("the `{}` claim is not a list of roles: {other}", self.config.roles_claim));
            }
        };
        let token_id = claims.get("jti").and_then(Value::as_str).map(str::to_owned);
        Ok(ExternalClaims { subject: subject.to_owned(), tenant, roles, token_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::KeyPair;

    /// A provider key pair: the JWKS entry and a signing key.
    fn ed25519(kid: &str) -> (Value, EncodingKey) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap_or_else(|e| panic!("{e}"));
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap_or_else(|e| panic!("{e}"));
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"});
        (jwk, EncodingKey::from_ed_der(pkcs8.as_ref()))
    }

    fn sign(key: &EncodingKey, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, key).unwrap_or_else(|e| panic!("{e}"))
    }

    fn now() -> i64 {
        crate::service::now()
    }

    #[test]
    fn claims_map_to_tenant_and_roles_and_bad_tokens_are_refused() -> Result<(), String> {
        let mut config = ExternalConfig::new("https://sso.example.com/realms/iot/");
        config.roles_claim = "realm_access.roles".into();
        let issuer = ExternalIssuer::new(config);
        assert_eq!(issuer.issuer(), "https://sso.example.com/realms/iot");
        let (jwk, key) = ed25519("k1");
        let published = jwk["x"].as_str().unwrap_or_default().to_owned();
        // A symmetric key in the set is never used.
        let n = issuer.set_keys(&serde_json::json!({"keys": [jwk, {"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}]}))?;
        assert_eq!(n, 1);
        let iss = "https://sso.example.com/realms/iot";
        let good = serde_json::json!({"iss": iss, "sub": "alice", "aud": ["account", "ferrite"], "exp": now() + 300,
            "tenant": "acme", "realm_access": {"roles": ["operator", "viewer"]}, "jti": "j1"});
        let c = issuer.verify(&sign(&key, "k1", &good))?;
        assert_eq!(
            c,
            ExternalClaims {
                subject: "alice".into(),
                tenant: "acme".into(),
                roles: vec!["operator".into(), "viewer".into()],
                token_id: Some("j1".into()),
            }
        );
        assert_eq!(unverified_issuer(&sign(&key, "k1", &good)).as_deref(), Some(iss));
        // No tenant claim: the default tenant.
        let mut no_tenant = good.clone();
        no_tenant.as_object_mut().map(|o| o.remove("tenant"));
        assert_eq!(issuer.verify(&sign(&key, "k1", &no_tenant))?.tenant, "default");

        let refused = |claims: &Value, kid: &str, want: &str| {
            let e = issuer.verify(&sign(&key, kid, claims)).err().unwrap_or_default();
            assert!(e.contains(want), "expected {want:?}, got {e:?}");
        };
        let with = |k: &str, v: Value| {
            let mut c = good.clone();
            c[k] = v;
            c
        };
        refused(&with("exp", (now() - 3600).into()), "k1", "expired");
        refused(&with("nbf", (now() + 3600).into()), "k1", "not valid yet");
        refused(&with("iss", "https://evil.example.com".into()), "k1", "not issued by");
        refused(&with("aud", "account".into()), "k1", "not meant for Ferrite");
        refused(&with("roles", 5.into()), "k1", "");
        refused(&good, "k2", "does not hold");
        // Another key pair under the same kid: the signature fails.
        let (_, other) = ed25519("k1");
        let e = issuer.verify(&sign(&other, "k1", &good)).err().unwrap_or_default();
        assert!(e.contains("signature"), "{e}");
        // HS256 "signed" with the published key, and alg none, are refused.
        let hs = jsonwebtoken::encode(
            &Header { kid: Some("k1".into()), ..Header::new(Algorithm::HS256) },
            &good,
            &EncodingKey::from_secret(published.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(issuer.verify(&hs).is_err_and(|e| e.contains("not accepted")));
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(good.to_string())
        );
        assert!(issuer.verify(&none).is_err());
        Ok(())
    }

    #[test]
    fn dotted_claims_and_algorithms_of_keys() {
        let v = serde_json::json!({"a": {"b": {"c": 1}}});
        assert_eq!(claim(&v, "a.b.c"), Some(&serde_json::json!(1)));
        assert_eq!(claim(&v, "a.x"), None);
        let rsa: Jwk =
            serde_json::from_value(serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "alg": "RS256"}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(algorithms_of(&rsa), Some(vec![Algorithm::RS256]));
        let mismatched: Jwk =
            serde_json::from_value(serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "alg": "ES256"}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(algorithms_of(&mismatched), None, "a key declared for another family is not used");
    }
}

//! Access tokens: JWTs in the RFC 9068 profile, signed with Ed25519 keys that Ferrite makes
//! itself and rotates, checked strictly (one algorithm, known key ids, issuer, audience,
//! expiry and not-before).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::KeyPair;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::KeyRecord;

/// The audience of every token Ferrite issues.
pub const AUDIENCE: &str = "ferrite";

/// The longest token accepted; longer ones are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How far clocks may disagree when checking `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// An access token's claims (RFC 9068, plus Ferrite's `tenant`, `roles` and `kind`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Subject: the user name, device id or client id.
    pub sub: String,
    /// Audience: `ferrite`.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issue time.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Token id: what revocation names.
    pub jti: String,
    /// The OAuth2 client it was issued to.
    pub client_id: String,
    /// Space-separated scopes.
    pub scope: String,
    /// The subject's tenant.
    pub tenant: String,
    /// The subject's roles when issued.
    #[serde(default)]
    pub roles: Vec<String>,
    /// `user`, `device` or `service`.
    pub kind: String,
}

/// Ferrite's signing keys: the newest signs, every one not yet removed verifies.
pub struct KeyRing {
    signing_kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, (DecodingKey, Vec<u8>)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("signing_kid", &self.signing_kid).finish_non_exhaustive()
    }
}

/// A new Ed25519 key pair.
pub fn generate_key(now: i64) -> Result<KeyRecord> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| Error::Key("cannot generate an Ed25519 key".into()))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| Error::Key(format!("the generated key does not load: {e}")))?;
    let public_key = pair.public_key().as_ref().to_vec();
    let kid = URL_SAFE_NO_PAD.encode(&ring::digest::digest(&ring::digest::SHA256, &public_key).as_ref()[..12]);
    Ok(KeyRecord {
        kid,
        algorithm: "EdDSA".into(),
        private_pkcs8: pkcs8.as_ref().to_vec(),
        public_key,
        created_at: now,
        retired_at: None,
        remove_after: None,
    })
}

impl KeyRing {
    /// The ring of `keys` (newest first): the first unretired one signs.
    pub fn new(keys: &[KeyRecord]) -> Result<Self> {
        let signer =
            keys.iter().find(|k| k.retired_at.is_none()).ok_or_else(|| Error::Key("no active signing key".into()))?;
        let mut verifying = HashMap::new();
        for k in keys {
            if k.algorithm != "EdDSA" || k.public_key.len() != 32 {
                return Err(Error::Key(format!("key {} is not an Ed25519 key", k.kid)));
            }
            verifying.insert(k.kid.clone(), (DecodingKey::from_ed_der(&k.public_key), k.public_key.clone()));
        }
        Ok(Self {
            signing_kid: signer.kid.clone(),
            signing: EncodingKey::from_ed_der(&signer.private_pkcs8),
            verifying,
        })
    }

    /// The id of the key that signs.
    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.signing_kid.clone());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, claims, &self.signing).map_err(|e| Error::Key(format!("signing a token: {e}")))
    }

    /// Checks a token's form, algorithm, key, signature, issuer, audience and times, and
    /// returns its claims; the error says which check failed.
    pub fn verify(&self, token: &str, issuer: &str) -> std::result::Result<Claims, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("the token is {} bytes, more than the {MAX_TOKEN_BYTES} accepted", token.len()));
        }
        if token.split('.').count() != 3 {
            return Err("not a JWT (expected three dot-separated parts)".into());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) => "the header's algorithm is not accepted (only EdDSA is)".to_owned(),
            _ => format!("the header does not decode: {e}"),
        })?;
        if header.alg != Algorithm::EdDSA {
            return Err(format!("algorithm {:?} is not accepted (only EdDSA is)", header.alg));
        }
        let kid = header.kid.ok_or("the header names no key (kid)")?;
        let (key, _) = self.verifying.get(&kid).ok_or_else(|| format!("signed by an unknown key {kid:?}"))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "nbf", "sub", "iss", "aud"]);
        jsonwebtoken::decode::<Claims>(token, key, &validation).map(|d| d.claims).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
            ErrorKind::ImmatureSignature => "the token is not valid yet (nbf is in the future)".to_owned(),
            ErrorKind::InvalidIssuer => format!("the token was not issued by this server ({issuer})"),
            ErrorKind::InvalidAudience => format!("the token is not meant for Ferrite (audience must be {AUDIENCE:?})"),
            ErrorKind::InvalidSignature => "the signature does not verify".to_owned(),
            ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c:?} claim"),
            _ => format!("the token does not decode: {e}"),
        })
    }

    /// The JWKS document: every verifying key.
    pub fn jwks(&self) -> serde_json::Value {
        let mut keys: Vec<_> = self
            .verifying
            .iter()
            .map(|(kid, (_, public))| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                    "kid": kid, "x": URL_SAFE_NO_PAD.encode(public),
                })
            })
            .collect();
        keys.sort_by(|a, b| a["kid"].as_str().cmp(&b["kid"].as_str()));
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: "http://ferrite.test".into(),
            sub: "d1".into(),
            aud: AUDIENCE.into(),
            exp: now + 900,
            iat: now,
            nbf: now,
            jti: "j1".into(),
            client_id: "d1".into(),
            scope: String::new(),
            tenant: "default".into(),
            roles: vec![],
            kind: "device".into(),
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn attacks_on_the_token_are_refused_with_the_reason() {
        let now = now();
        let key = generate_key(now).expect("key");
        let ring = KeyRing::new(std::slice::from_ref(&key)).expect("ring");
        let iss = "http://ferrite.test";
        let good = ring.sign(&claims(now)).expect("sign");
        assert_eq!(ring.verify(&good, iss).expect("valid").sub, "d1");

        let err = |t: &str| ring.verify(t, iss).expect_err("refused");
        // One character changed in the middle of the signature (always valid base64).
        let mut forged = good.clone();
        let at = forged.rfind('.').unwrap_or(0) + 10;
        let swap = if &forged[at..at + 1] == "A" { "B" } else { "A" };
        forged.replace_range(at..at + 1, swap);
        assert!(err(&forged).contains("signature"), "{}", err(&forged));
        assert!(err("garbage").contains("not a JWT"));
        assert!(ring.verify(&good, "http://other").expect_err("refused").contains("not issued by this server"));
        let mut c = claims(now);
        c.exp = now - 3600;
        assert!(err(&ring.sign(&c).expect("sign")).contains("expired"));
        let mut c = claims(now);
        c.nbf = now + 3600;
        assert!(err(&ring.sign(&c).expect("sign")).contains("not valid yet"));
        let mut c = claims(now);
        c.aud = "someone-else".into();
        assert!(err(&ring.sign(&c).expect("sign")).contains("not meant for Ferrite"));

        // `alg: none`, with and without a signature.
        let payload = b64(&serde_json::to_value(claims(now)).expect("json"));
        let none = format!("{}.{payload}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT"})));
        assert!(err(&none).contains("not accepted"), "{}", err(&none));
        // HS256 signed with the public key as the HMAC secret (the key-confusion attack).
        let hs = jsonwebtoken::encode(
            &Header { kid: Some(ring.signing_kid().to_owned()), ..Header::new(Algorithm::HS256) },
            &claims(now),
            &EncodingKey::from_secret(&key.public_key).expect("hmac key"),
        )
        .expect("hs256");
        assert!(err(&hs).contains("HS256"), "{}", err(&hs));
        // A token signed by another Ed25519 key under our kid.
        let other =
            KeyRing::new(&[KeyRecord { kid: key.kid.clone(), ..generate_key(now).expect("key") }]).expect("ring");
        assert!(err(&other.sign(&claims(now)).expect("sign")).contains("signature"));
        // Oversized.
        assert!(err(&"a.b.".repeat(MAX_TOKEN_BYTES)).contains("more than"));
    }

    #[test]
    fn a_rotated_key_still_verifies_and_is_in_the_jwks() {
        let now = now();
        let old = generate_key(now - 10).expect("key");
        let old_ring = KeyRing::new(std::slice::from_ref(&old)).expect("ring");
        let token = old_ring.sign(&claims(now)).expect("sign");
        let new = generate_key(now).expect("key");
        let retired = KeyRecord { retired_at: Some(now), remove_after: Some(now + 900), ..old };
        let ring = KeyRing::new(&[new.clone(), retired]).expect("ring");
        assert_eq!(ring.signing_kid(), new.kid);
        assert!(ring.verify(&token, "http://ferrite.test").is_ok());
        assert_eq!(ring.jwks()["keys"].as_array().map(Vec::len), Some(2));
    }
}

//! Tokens of an external OpenID Connect provider against the real server: a second key
//! set, generated here and served by a small HTTP server of the test (discovery document
//! and JWKS), its claims mapped to tenant and roles, the same policies deciding.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair;
use rumqttc::ConnectReturnCode;
use serde_json::{Value, json};

use crate::harness::Server;
use crate::identity::{call, connect};

/// A provider signing key: its JWK and the key that signs.
fn provider_key(kid: &str) -> anyhow::Result<(Value, EncodingKey)> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    Ok((
        json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}),
        EncodingKey::from_ed_der(pkcs8.as_ref()),
    ))
}

/// Serves `/.well-known/openid-configuration` and `/jwks` (the current `keys`) until the
/// process ends; returns the issuer URL.
fn serve_provider(keys: Arc<Mutex<Vec<Value>>>) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let issuer = format!("http://{}", listener.local_addr()?);
    let iss = issuer.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // The rest of the head.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = if request_line.contains("/.well-known/openid-configuration") {
                json!({"issuer": iss, "jwks_uri": format!("{iss}/jwks")}).to_string()
            } else {
                let keys = keys.lock().map(|k| k.clone()).unwrap_or_default();
                json!({ "keys": keys }).to_string()
            };
            let mut out = &stream;
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(issuer)
}

fn token(key: &EncodingKey, kid: &str, claims: &Value) -> anyhow::Result<String> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    Ok(jsonwebtoken::encode(&header, claims, key)?)
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[test]
fn an_external_providers_tokens_map_to_tenant_and_roles() -> anyhow::Result<()> {
    let (jwk1, key1) = provider_key("k1")?;
    let keys = Arc::new(Mutex::new(vec![jwk1]));
    let issuer = serve_provider(keys.clone())?;
    let dir = tempfile::tempdir()?;
    let s = Server::start(
        dir.path(),
        &["--oidc-issuer", &issuer, "--oidc-roles-claim", "realm_access.roles", "--oidc-audience", "iot-platform"],
    )?;
    let (st, body) = s.post_json("/api/v1/tenants", &json!({"id": "acme"}))?;
    assert_eq!(st, 201, "{body}");
    let claims = |sub: &str, tenant: &str, roles: &[&str]| {
        json!({"iss": issuer, "sub": sub, "aud": ["account", "iot-platform"], "exp": now() + 300, "iat": now(),
               "tenant": tenant, "realm_access": {"roles": roles}})
    };
    let sql = |auth: &str, q: &str| call(&s, "POST", "/api/v1/sql", Some(auth), Some(&json!({ "sql": q })));

    // A viewer of acme: may query acme (once the key set has loaded), may not write.
    let eve = format!("Bearer {}", token(&key1, "k1", &claims("eve", "acme", &["viewer"]))?);
    s.wait_for("the provider's keys", |_| Ok(sql(&eve, "SELECT 1")?.0 == 200))?;
    let (st, body) =
        call(&s, "POST", "/api/v1/streams/telemetry/events", Some(&eve), Some(&json!({"device_id": "x"})))?;
    assert_eq!(st, 403, "{body}");
    // An operator of acme writes acme's stream; acme's viewer reads it, the admin's
    // default tenant does not have it.
    let op = format!("Bearer {}", token(&key1, "k1", &claims("olga", "acme", &["operator"]))?);
    let (st, body) = call(&s, "POST", "/api/v1/streams/telemetry/events", Some(&op), Some(&json!({"device_id": "x"})))?;
    assert_eq!(st, 200, "{body}");
    let (st, rows) = sql(&eve, "SELECT count(*) AS n FROM telemetry")?;
    assert_eq!((st, rows[0]["n"].as_i64()), (200, Some(1)), "{rows}");
    assert_eq!(sql(&s.bearer(), "SELECT count(*) FROM telemetry")?.0, 400);

    // Refused, each with its reason: a tenant Ferrite does not have, another audience,
    // another issuer's claim, expired, HS256 "signed" with the published key, alg none.
    let refused = |auth: String, want: &str| -> anyhow::Result<()> {
        let (st, body) = sql(&auth, "SELECT 1")?;
        let msg = body["error"]["message"].as_str().unwrap_or("");
        assert!(st == 401 && msg.contains(want), "expected 401 {want:?}: {st} {body}");
        Ok(())
    };
    refused(format!("Bearer {}", token(&key1, "k1", &claims("eve", "initech", &["viewer"]))?), "does not exist")?;
    let mut other_aud = claims("eve", "acme", &["viewer"]);
    other_aud["aud"] = json!("account");
    refused(format!("Bearer {}", token(&key1, "k1", &other_aud)?), "not meant for Ferrite")?;
    let mut expired = claims("eve", "acme", &["viewer"]);
    expired["exp"] = json!(now() - 3600);
    refused(format!("Bearer {}", token(&key1, "k1", &expired)?), "expired")?;
    let published = keys.lock().map(|k| k[0]["x"].as_str().unwrap_or("").to_owned()).unwrap_or_default();
    let hs = jsonwebtoken::encode(
        &Header { kid: Some("k1".into()), ..Header::new(Algorithm::HS256) },
        &claims("eve", "acme", &["platform-admin"]),
        &EncodingKey::from_secret(published.as_bytes())?,
    )?;
    refused(format!("Bearer {hs}"), "not accepted")?;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let none =
        format!("{}.{}.", b64(r#"{"alg":"none","kid":"k1"}"#), b64(&claims("eve", "acme", &["admin"]).to_string()));
    refused(format!("Bearer {none}"), "")?;

    // The provider rotates to a new key: tokens it signs are refused until the key set is
    // fetched again, which the first such token triggers.
    let (jwk2, key2) = provider_key("k2")?;
    let rotated = format!("Bearer {}", token(&key2, "k2", &claims("eve", "acme", &["viewer"]))?);
    refused(rotated.clone(), "does not hold")?;
    if let Ok(mut k) = keys.lock() {
        k.push(jwk2);
    }
    s.wait_for("the rotated key", |_| Ok(sql(&rotated, "SELECT 1")?.0 == 200))?;

    // The same token opens the MQTT door as its subject.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let raw = token(&key2, "k2", &claims("eve", "acme", &["viewer"]))?;
    rt.block_on(async {
        assert_eq!(connect(&s, "eve-1", "eve", &raw).await?.2, ConnectReturnCode::Success);
        assert_eq!(connect(&s, "eve-2", "mallory", &raw).await?.2, ConnectReturnCode::BadUserNamePassword);
        anyhow::Ok(())
    })?;
    Ok(())
}

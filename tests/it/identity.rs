//! Identity against the real server: tokens, grants, policies at the HTTP and MQTT doors,
//! and the attacks of the identity issue, each refused with a clear error, audited, while
//! everything else carries on.

use std::time::{Duration, Instant};

use base64::Engine;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};

/// A form POST (OAuth2 endpoints), optionally with HTTP Basic client authentication.
pub(crate) fn form(
    s: &Server,
    path: &str,
    basic: Option<(&str, &str)>,
    fields: &[(&str, &str)],
) -> anyhow::Result<(u16, Value, Option<String>)> {
    let body: String = fields
        .iter()
        .map(|(k, v)| {
            format!("{k}={}", v.replace('%', "%25").replace('&', "%26").replace('+', "%2B").replace('=', "%3D"))
        })
        .collect::<Vec<_>>()
        .join("&");
    let mut req = s.agent().post(&s.url(path)).header("Content-Type", "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        req = req.header("Authorization", &format!("Basic {cred}"));
    }
    let mut resp = req.send(body)?;
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = resp.body_mut().read_to_string()?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null), retry))
}

/// A request with an arbitrary `Authorization` header.
pub(crate) fn call(
    s: &Server,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = s.url(path);
    let mut resp = match (method, body) {
        ("GET", _) => {
            let mut r = s.agent().get(&url);
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.call()?
        }
        (_, b) => {
            let mut r = s.agent().post(&url).header("Content-Type", "application/json");
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send(b.map(Value::to_string).unwrap_or_default())?
        }
    };
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// A request acting in `tenant` (the `Ferrite-Tenant` header).
pub(crate) fn call_in(
    s: &Server,
    method: &str,
    path: &str,
    auth: &str,
    tenant: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = s.url(path);
    let mut resp = match method {
        "GET" => s.agent().get(&url).header("Authorization", auth).header("Ferrite-Tenant", tenant).call()?,
        "DELETE" => s.agent().delete(&url).header("Authorization", auth).header("Ferrite-Tenant", tenant).call()?,
        _ => s
            .agent()
            .post(&url)
            .header("Authorization", auth)
            .header("Ferrite-Tenant", tenant)
            .header("Content-Type", "application/json")
            .send(body.map(Value::to_string).unwrap_or_default())?,
    };
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

pub(crate) fn client_token(s: &Server, id: &str, secret: &str, scope: &str) -> anyhow::Result<Value> {
    let (st, body, _) =
        form(s, "/oauth2/token", Some((id, secret)), &[("grant_type", "client_credentials"), ("scope", scope)])?;
    anyhow::ensure!(st == 200, "token for {id}: {st} {body}");
    Ok(body)
}

pub(crate) fn add_client(s: &Server, body: Value) -> anyhow::Result<(String, String)> {
    let (st, b) = s.post_json("/api/v1/clients", &body)?;
    anyhow::ensure!(st == 201, "add client: {st} {b}");
    Ok((b["client_id"].as_str().unwrap_or("").to_owned(), b["client_secret"].as_str().unwrap_or("").to_owned()))
}

pub(crate) async fn connect(
    s: &Server,
    id: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<(AsyncClient, EventLoop, ConnectReturnCode)> {
    let mut opts = MqttOptions::new(id, s.mqtt.ip().to_string(), s.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_credentials(user, password);
    let (client, mut ev) = AsyncClient::new(opts, 100);
    let code = tokio::time::timeout(TIMEOUT, async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) => return c.code,
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return code,
                Err(e) => panic!("mqtt: {e}"),
            }
        }
    })
    .await?;
    Ok((client, ev, code))
}

/// Polls until a SUBACK arrives; its return codes.
pub(crate) async fn suback(ev: &mut EventLoop) -> anyhow::Result<Vec<SubscribeReasonCode>> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(a)) = ev.poll().await? {
                return Ok(a.return_codes);
            }
        }
    })
    .await?
}

/// Polls until `n` PUBACKs arrived.
async fn pubacks(ev: &mut EventLoop, n: usize) -> anyhow::Result<()> {
    let mut seen = 0;
    tokio::time::timeout(TIMEOUT, async {
        while seen < n {
            if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await? {
                seen += 1;
            }
        }
        anyhow::Ok(())
    })
    .await?
}

#[test]
fn http_doors_refuse_bad_tokens_with_clear_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let sql = json!({"sql": "SELECT 1"});
    // The admin token was written 0600 and works.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("admin.token"))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(call(&s, "POST", "/api/v1/sql", Some(&s.bearer()), Some(&sql))?.0, 200);

    let (st, body) = call(&s, "POST", "/api/v1/sql", None, Some(&sql))?;
    assert_eq!(st, 401);
    assert_eq!(body["error"]["code"], "unauthenticated", "{body}");
    let reject = |auth: &str, want: &str| -> anyhow::Result<()> {
        let (st, body) = call(&s, "POST", "/api/v1/sql", Some(auth), Some(&sql))?;
        assert_eq!(st, 401, "{auth:.40}: {body}");
        let msg = body["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(want), "{auth:.40}: expected {want:?} in {msg:?}");
        Ok(())
    };
    reject("Bearer not-a-jwt", "not a JWT")?;
    reject("Basic YWRtaW46eA==", "Bearer")?;
    // A forged signature: one character in the middle of the admin token's signature changed.
    let mut forged = s.token.clone();
    let at = forged.rfind('.').unwrap_or(0) + 10;
    let swap = if &forged[at..at + 1] == "A" { "B" } else { "A" };
    forged.replace_range(at..at + 1, swap);
    reject(&format!("Bearer {forged}"), "signature")?;
    // `alg: none` with the admin's own claims.
    let claims = s.token.split('.').nth(1).unwrap_or("").to_owned();
    let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    reject(&format!("Bearer {none_header}.{claims}."), "not accepted")?;
    // An oversized token is refused before it is parsed.
    reject(&format!("Bearer {}", "a".repeat(9000)), "more than")?;
    // /healthz, discovery and JWKS need no token.
    assert_eq!(call(&s, "GET", "/healthz", None, None)?.0, 200);
    let (st, disc) = call(&s, "GET", "/.well-known/openid-configuration", None, None)?;
    assert_eq!(st, 200);
    assert!(disc["token_endpoint"].as_str().unwrap_or("").ends_with("/oauth2/token"), "{disc}");
    let (_, jwks) = call(&s, "GET", "/oauth2/jwks", None, None)?;
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    // The server lived through all of it.
    assert_eq!(call(&s, "POST", "/api/v1/sql", Some(&s.bearer()), Some(&sql))?.0, 200);
    Ok(())
}

#[test]
fn tokens_rotate_revoke_and_throttle() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (id, secret) = add_client(&s, json!({"id": "svc1", "roles": ["viewer"]}))?;
    assert_eq!(id, "svc1");

    // Client credentials; the access token works at the SQL door (viewer may query).
    let t = client_token(&s, &id, &secret, "offline_access")?;
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 900);
    let access = t["access_token"].as_str().unwrap_or("").to_owned();
    let bearer = format!("Bearer {access}");
    assert_eq!(call(&s, "POST", "/api/v1/sql", Some(&bearer), Some(&json!({"sql": "SELECT 1"})))?.0, 200);
    // A viewer may not deploy rules.
    let (st, body) = call(&s, "POST", "/api/v1/rules", Some(&bearer), Some(&json!("x")))?;
    assert_eq!(st, 403, "{body}");

    // Refresh rotation: each refresh token works once; a reused one revokes its family.
    let r1 = t["refresh_token"].as_str().unwrap_or("").to_owned();
    let (st, t2, _) =
        form(&s, "/oauth2/token", Some((&id, &secret)), &[("grant_type", "refresh_token"), ("refresh_token", &r1)])?;
    assert_eq!(st, 200, "{t2}");
    let r2 = t2["refresh_token"].as_str().unwrap_or("").to_owned();
    assert_ne!(r1, r2);
    let (st, e, _) =
        form(&s, "/oauth2/token", Some((&id, &secret)), &[("grant_type", "refresh_token"), ("refresh_token", &r1)])?;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")), "{e}");
    let (st, e, _) =
        form(&s, "/oauth2/token", Some((&id, &secret)), &[("grant_type", "refresh_token"), ("refresh_token", &r2)])?;
    assert_eq!(st, 400, "the family of a reused token is revoked: {e}");

    // Introspection, then revocation (RFC 7009): the token stops working at once.
    let (st, info, _) = form(&s, "/oauth2/introspect", Some((&id, &secret)), &[("token", &access)])?;
    assert_eq!((st, info["active"].as_bool(), info["sub"].as_str()), (200, Some(true), Some("svc1")), "{info}");
    let (st, _, _) = form(&s, "/oauth2/revoke", Some((&id, &secret)), &[("token", &access)])?;
    assert_eq!(st, 200);
    let (st, body) = call(&s, "POST", "/api/v1/sql", Some(&bearer), Some(&json!({"sql": "SELECT 1"})))?;
    assert_eq!(st, 401);
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("revoked"), "{body}");
    let (_, info, _) = form(&s, "/oauth2/introspect", Some((&id, &secret)), &[("token", &access)])?;
    assert_eq!(info["active"], false);

    // Unknown grant types and missing client authentication are RFC 6749 errors.
    let (st, e, _) = form(&s, "/oauth2/token", None, &[("grant_type", "password")])?;
    assert_eq!((st, e["error"].as_str()), (400, Some("unsupported_grant_type")));
    let (st, e, _) = form(&s, "/oauth2/token", None, &[("grant_type", "client_credentials")])?;
    assert_eq!((st, e["error"].as_str()), (401, Some("invalid_client")));

    // Repeated wrong secrets: slowed down, then locked (429 with Retry-After), audited; the
    // right secret from the same address waits too, another client does not.
    let started = Instant::now();
    for _ in 0..5 {
        let (st, e, _) = form(&s, "/oauth2/token", Some((&id, "wrong")), &[("grant_type", "client_credentials")])?;
        assert_eq!((st, e["error"].as_str()), (401, Some("invalid_client")), "{e}");
    }
    assert!(started.elapsed() >= Duration::from_millis(1000), "failures are answered slowly: {:?}", started.elapsed());
    let (st, e, retry) = form(&s, "/oauth2/token", Some((&id, &secret)), &[("grant_type", "client_credentials")])?;
    assert_eq!((st, e["error"].as_str()), (429, Some("slow_down")), "{e}");
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|n| n > 0)));
    let (other, other_secret) = add_client(&s, json!({"roles": ["viewer"]}))?;
    client_token(&s, &other, &other_secret, "")?;

    // Key rotation: the old key stays in the JWKS; tokens it signed still work.
    let old = client_token(&s, &other, &other_secret, "")?["access_token"].as_str().unwrap_or("").to_owned();
    let (st, _) = s.post_json("/api/v1/keys/rotate", &json!({}))?;
    assert_eq!(st, 200);
    let (_, jwks) = call(&s, "GET", "/oauth2/jwks", None, None)?;
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(2), "{jwks}");
    assert_eq!(
        call(&s, "POST", "/api/v1/sql", Some(&format!("Bearer {old}")), Some(&json!({"sql": "SELECT 1"})))?.0,
        200
    );

    // Every one of these is in the audit stream, for holders of read_audit only.
    s.wait_for("audit records", |s| {
        let rows = s.sql("SELECT event FROM audit")?;
        let has = |e: &str| rows.iter().any(|r| r["event"] == e);
        Ok(has("refresh_reuse")
            && has("login_failed")
            && has("login_throttled")
            && has("token_revoked")
            && has("key_rotated")
            && has("denied"))
    })?;
    let viewer = client_token(&s, &other, &other_secret, "")?["access_token"].as_str().unwrap_or("").to_owned();
    let (st, body) = call(
        &s,
        "POST",
        "/api/v1/sql",
        Some(&format!("Bearer {viewer}")),
        Some(&json!({"sql": "SELECT * FROM audit"})),
    )?;
    assert_eq!(st, 400, "a viewer does not see the audit table: {body}");
    Ok(())
}

#[test]
fn mqtt_devices_act_only_as_themselves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (d1, d1_secret) = add_client(&s, json!({"id": "d1", "kind": "device"}))?;
    let token = client_token(&s, &d1, &d1_secret, "")?["access_token"].as_str().unwrap_or("").to_owned();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // Wrong secret, no credentials, someone else's token: CONNACK refused.
        assert_eq!(connect(&s, "d1", "d1", "wrong").await?.2, ConnectReturnCode::BadUserNamePassword);
        assert_eq!(connect(&s, "d1", "d2", &token).await?.2, ConnectReturnCode::BadUserNamePassword);
        let mut opts = MqttOptions::new("anon", s.mqtt.ip().to_string(), s.mqtt.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (_c, mut ev) = AsyncClient::new(opts, 10);
        let refused = tokio::time::timeout(TIMEOUT, async {
            loop {
                match ev.poll().await {
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Some(code),
                    Ok(Event::Incoming(Packet::ConnAck(c))) => return Some(c.code),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await?;
        assert_eq!(refused, Some(ConnectReturnCode::NotAuthorized));

        // With its token: its own telemetry lands; another device's topic is dropped; the
        // same connection's valid traffic carries on.
        let (c, mut ev, code) = connect(&s, "d1", "d1", &token).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.subscribe("#", QoS::AtMostOnce).await?;
        assert_eq!(suback(&mut ev).await?, vec![SubscribeReasonCode::Failure]);
        c.subscribe("devices/+/commands", QoS::AtMostOnce).await?;
        assert_eq!(suback(&mut ev).await?, vec![SubscribeReasonCode::Failure]);
        c.subscribe("devices/d1/commands", QoS::AtLeastOnce).await?;
        assert!(matches!(suback(&mut ev).await?[..], [SubscribeReasonCode::Success(_)]));
        for i in 0..3 {
            c.publish("devices/d2/telemetry", QoS::AtLeastOnce, false, format!(r#"{{"seq": {i}}}"#)).await?;
            c.publish("devices/d1/telemetry", QoS::AtLeastOnce, false, format!(r#"{{"seq": {i}}}"#)).await?;
        }
        pubacks(&mut ev, 6).await?;
        // With the client secret as password too.
        let (c2, mut ev2, code) = connect(&s, "d1-b", "d1", &d1_secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c2.publish("devices/d1/telemetry", QoS::AtLeastOnce, false, r#"{"seq": 9}"#).await?;
        pubacks(&mut ev2, 1).await?;
        anyhow::Ok(())
    })?;
    s.wait_for("d1's four events", |s| Ok(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'd1'")? == 4))?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'd2'")?, 0);
    assert!(s.metric("ferrite_mqtt_refused_total{reason=\"publish_denied\"}")? >= 3);
    // A device token opens no HTTP door it has no policy for.
    let (st, _) = call(&s, "POST", "/api/v1/sql", Some(&format!("Bearer {token}")), Some(&json!({"sql": "SELECT 1"})))?;
    assert_eq!(st, 403);
    s.wait_for("the denials audited", |s| {
        Ok(s.sql_count("SELECT count(*) FROM audit WHERE event = 'denied' AND device_id = 'd1'")? >= 3)
    })?;
    Ok(())
}

#[test]
fn tenants_users_and_the_device_code_grant() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/telemetry/events", &json!({"device_id": "x", "v": 1}))?;
    // A service of tenant b does not see tenant default's streams (the name resolves in its
    // own tenant, which has none), may not act there, nor manage identity there.
    let (st, _) = s.post_json("/api/v1/tenants", &json!({"id": "b"}))?;
    assert_eq!(st, 201);
    let (b, b_secret) = add_client(&s, json!({"tenant": "b", "roles": ["admin"]}))?;
    let tb = format!("Bearer {}", client_token(&s, &b, &b_secret, "")?["access_token"].as_str().unwrap_or(""));
    let (st, body) = call(&s, "POST", "/api/v1/sql", Some(&tb), Some(&json!({"sql": "SELECT * FROM telemetry"})))?;
    assert_eq!(st, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("telemetry"), "{body}");
    let (st, body) = call_in(&s, "POST", "/api/v1/sql", &tb, "default", Some(&json!({"sql": "SELECT 1"})))?;
    assert_eq!(st, 403, "{body}");
    let (st, _) =
        call(&s, "POST", "/api/v1/clients", Some(&tb), Some(&json!({"tenant": "default", "roles": ["admin"]})))?;
    assert_eq!(st, 403);
    // ...but may inside its own tenant.
    let (st, body) =
        call(&s, "POST", "/api/v1/clients", Some(&tb), Some(&json!({"tenant": "b", "roles": ["viewer"]})))?;
    assert_eq!(st, 201, "{body}");

    // A user with a password signs in, and approves a device's code (RFC 8628).
    let (st, body) =
        s.post_json("/api/v1/users", &json!({"name": "alice", "roles": ["operator"], "password": "correct horse"}))?;
    assert_eq!(st, 201, "{body}");
    let (st, _) =
        call(&s, "POST", "/api/v1/login", None, Some(&json!({"username": "alice", "password": "wrong horse!"})))?;
    assert_eq!(st, 401);
    let (st, login) =
        call(&s, "POST", "/api/v1/login", None, Some(&json!({"username": "alice", "password": "correct horse"})))?;
    assert_eq!(st, 200, "{login}");
    let alice = format!("Bearer {}", login["access_token"].as_str().unwrap_or(""));
    let (dev, _) = add_client(&s, json!({"id": "kiosk-1", "kind": "device"}))?;
    let (st, auth, _) = form(&s, "/oauth2/device_authorization", None, &[("client_id", &dev)])?;
    assert_eq!(st, 200, "{auth}");
    let device_code = auth["device_code"].as_str().unwrap_or("").to_owned();
    let user_code = auth["user_code"].as_str().unwrap_or("").to_owned();
    let poll = || {
        form(
            &s,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", &device_code),
                ("client_id", &dev),
            ],
        )
    };
    let (st, e, _) = poll()?;
    assert_eq!((st, e["error"].as_str()), (400, Some("authorization_pending")), "{e}");
    let (st, body) = call(&s, "POST", &format!("/api/v1/device-codes/{user_code}/approve"), Some(&alice), None)?;
    assert_eq!(st, 200, "{body}");
    let (st, t, _) = poll()?;
    assert_eq!(st, 200, "{t}");
    assert!(t["refresh_token"].is_string());
    let (st, e, _) = poll()?;
    assert_eq!(st, 400, "a device code is used once: {e}");
    Ok(())
}

#[test]
fn policies_hot_reload_and_a_broken_edit_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    let p = policies.to_string_lossy().into_owned();
    let s = Server::start(&dir.path().join("data"), &["--policies-dir", &p])?;
    let (id, secret) = add_client(&s, json!({"roles": ["viewer"]}))?;
    let bearer = format!("Bearer {}", client_token(&s, &id, &secret, "")?["access_token"].as_str().unwrap_or(""));
    let query =
        |s: &Server| call(s, "POST", "/api/v1/sql", Some(&bearer), Some(&json!({"sql": "SELECT 1"}))).map(|r| r.0);
    assert_eq!(query(&s)?, 200);
    std::fs::write(
        policies.join("lock.cedar"),
        format!("@id(\"lock\") forbid (principal == Ferrite::Client::\"{id}\", action, resource);"),
    )?;
    s.wait_for("the forbid to take effect", |s| Ok(query(s)? == 403))?;
    // A broken edit is refused: the previous set (with the forbid) stays in force.
    std::fs::write(policies.join("lock.cedar"), "forbid (principal, action, resource")?;
    s.wait_for("the refusal to be counted", |s| Ok(s.metric("ferrite_policy_reload_errors_total")? >= 1))?;
    assert_eq!(query(&s)?, 403);
    std::fs::remove_file(policies.join("lock.cedar"))?;
    s.wait_for("the forbid to go", |s| Ok(query(s)? == 200))?;
    // Through the API, validated against the schema.
    let (st, body) = s.post(
        "/api/v1/policies/check",
        "application/json",
        br#"{"principal": "device::\"d1\"", "action": "publish", "resource": "topic::\"devices/d2/telemetry\""}"#,
    )?;
    assert_eq!((st, body["decision"].as_str()), (200, Some("deny")), "{body}");
    let put = s
        .agent()
        .put(&s.url("/api/v1/policies/typo"))
        .header("Authorization", s.bearer())
        .send("permit (principal, action, resource) when { principal.rolez.contains(\"x\") };")?;
    assert_eq!(put.status().as_u16(), 400);
    Ok(())
}

//! Tenants against the real server: each tenant's streams, rules, SQL, `system.*` rows,
//! audit trail, MQTT telemetry and archive are its own; a name never reaches another
//! tenant's, and a platform operator works in a tenant only by naming it.

use rumqttc::{ConnectReturnCode, Event, Packet, QoS, SubscribeReasonCode};
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT, parquet_files};
use crate::identity::{add_client, call, call_in, client_token, connect, suback};

fn bearer_of(s: &Server, id: &str, secret: &str) -> anyhow::Result<String> {
    Ok(format!("Bearer {}", client_token(s, id, secret, "")?["access_token"].as_str().unwrap_or("")))
}

/// `SELECT count(*)` as `auth` (in its own tenant).
fn count(s: &Server, auth: &str, sql: &str) -> anyhow::Result<i64> {
    let (st, body) = call(s, "POST", "/api/v1/sql", Some(auth), Some(&json!({ "sql": sql })))?;
    anyhow::ensure!(st == 200, "{sql}: {st} {body}");
    let row = body.get(0).and_then(Value::as_object).and_then(|o| o.values().next().cloned());
    row.and_then(|v| v.as_i64()).ok_or_else(|| anyhow::anyhow!("{sql}: no count in {body}"))
}

fn ingest(s: &Server, auth: &str, stream: &str, events: Value) -> anyhow::Result<()> {
    let (st, body) = call(s, "POST", &format!("/api/v1/streams/{stream}/events"), Some(auth), Some(&events))?;
    anyhow::ensure!(st == 200, "ingest into {stream}: {st} {body}");
    Ok(())
}

fn deploy(s: &Server, auth: &str, text: &str) -> anyhow::Result<(u16, Value)> {
    let mut resp = s
        .agent()
        .post(&s.url("/api/v1/rules"))
        .header("Authorization", auth)
        .header("Content-Type", "text/plain")
        .send(text)?;
    let status = resp.status().as_u16();
    Ok((status, serde_json::from_str(&resp.body_mut().read_to_string()?).unwrap_or(Value::Null)))
}

fn stream_names(s: &Server, auth: &str) -> anyhow::Result<Vec<String>> {
    let (st, body) = call(s, "GET", "/api/v1/streams", Some(auth), None)?;
    anyhow::ensure!(st == 200, "{st} {body}");
    Ok(body["streams"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

#[test]
fn each_tenant_sees_only_its_own_streams_rules_state_and_audit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = Server::start(dir.path(), &[])?;
    let admin = s.bearer();
    for t in ["acme", "globex"] {
        let (st, body) = s.post_json("/api/v1/tenants", &json!({ "id": t }))?;
        assert_eq!(st, 201, "{body}");
    }
    // A tenant id is a directory of the archive: anything else is refused.
    let (st, body) = s.post_json("/api/v1/tenants", &json!({"id": "../etc"}))?;
    assert_eq!(st, 400, "{body}");
    let (a, a_secret) = add_client(&s, json!({"tenant": "acme", "roles": ["admin"]}))?;
    let (g, g_secret) = add_client(&s, json!({"tenant": "globex", "roles": ["admin"]}))?;
    let (ta, tg) = (bearer_of(&s, &a, &a_secret)?, bearer_of(&s, &g, &g_secret)?);

    // The same stream name in three tenants: three streams.
    ingest(&s, &ta, "telemetry", json!([{"device_id": "a1", "temp": 10}, {"device_id": "a1", "temp": 20}]))?;
    ingest(&s, &tg, "telemetry", json!([{"device_id": "g1", "temp": 30}]))?;
    ingest(&s, &tg, "globex_only", json!({"device_id": "g1", "x": 1}))?;
    ingest(&s, &admin, "telemetry", json!({"device_id": "d0", "temp": 0}))?;
    // Line protocol lands in the caller's tenant too.
    let (st, body) = {
        let mut resp = s
            .agent()
            .post(&s.url("/api/v2/write?precision=s"))
            .header("Authorization", &ta)
            .send("telemetry,device_id=a2 temp=5 1700000000\n")?;
        (resp.status().as_u16(), resp.body_mut().read_to_string()?)
    };
    assert_eq!(st, 204, "{body}");
    assert_eq!(count(&s, &ta, "SELECT count(*) FROM telemetry")?, 3);
    assert_eq!(count(&s, &tg, "SELECT count(*) FROM telemetry")?, 1);
    assert_eq!(count(&s, &admin, "SELECT count(*) FROM telemetry")?, 1);
    assert!(!stream_names(&s, &ta)?.contains(&"globex_only".to_owned()));
    assert!(stream_names(&s, &tg)?.contains(&"globex_only".to_owned()));
    // No spelling of another tenant's table resolves: it is not in the caller's schema.
    for sql in [
        "SELECT * FROM globex_only",
        "SELECT * FROM \"globex/telemetry\"",
        "SELECT * FROM ferrite.public.globex_only",
        "SELECT * FROM information_schema.tables WHERE table_name = 'globex_only'",
    ] {
        let (st, body) = call(&s, "POST", "/api/v1/sql", Some(&ta), Some(&json!({ "sql": sql })))?;
        assert!(st == 400 || body.as_array().is_some_and(Vec::is_empty), "{sql}: {st} {body}");
    }

    // The platform operator works in a tenant by naming it; a tenant's admin may not.
    let sql = json!({"sql": "SELECT count(*) AS n FROM telemetry"});
    let (st, body) = call_in(&s, "POST", "/api/v1/sql", &admin, "acme", Some(&sql))?;
    assert_eq!((st, body[0]["n"].as_i64()), (200, Some(3)), "{body}");
    let (st, body) = call_in(&s, "POST", "/api/v1/sql", &ta, "globex", Some(&sql))?;
    assert_eq!(st, 403, "{body}");
    let (st, body) = call_in(&s, "POST", "/api/v1/sql", &admin, "Not/A/Tenant", Some(&sql))?;
    assert_eq!((st, body["error"]["code"].as_str()), (400, Some("invalid_tenant")), "{body}");
    let (st, body) = call_in(&s, "POST", "/api/v1/sql", &admin, "initech", Some(&sql))?;
    assert_eq!((st, body["error"]["code"].as_str()), (404, Some("unknown_tenant")), "{body}");

    // Rules run inside their tenant: the same rule name in two tenants, each reading its
    // own `telemetry` and writing its own `hot`.
    let (st, body) = deploy(&s, &ta, "rule hot { from telemetry[temp > 50] select device_id, temp insert into hot }")?;
    assert_eq!((st, &body), (201, &json!({"deployed": ["hot"]})));
    let (st, body) = deploy(
        &s,
        &tg,
        "rule hot { from telemetry[temp > 85] window tumbling 1h by device_id select device_id, \
                         max(temp) AS top insert into hot }",
    )?;
    assert_eq!((st, &body), (201, &json!({"deployed": ["hot"]})));
    ingest(&s, &ta, "telemetry", json!([{"device_id": "a1", "temp": 99, "ts": "2026-01-01T00:00:00Z"}]))?;
    ingest(&s, &tg, "telemetry", json!([{"device_id": "g1", "temp": 95, "ts": "2026-01-01T00:00:00Z"}]))?;
    ingest(&s, &tg, "telemetry", json!([{"device_id": "g1", "temp": 60, "ts": "2026-01-01T00:00:01Z"}]))?;
    s.wait_for("acme's rule output", |s| Ok(count(s, &ta, "SELECT count(*) FROM hot").unwrap_or(0) == 1))?;
    assert_eq!(count(&s, &ta, "SELECT count(*) FROM hot WHERE device_id = 'a1' AND temp = 99")?, 1);
    let (_, rules) = call(&s, "GET", "/api/v1/rules", Some(&ta), None)?;
    assert_eq!(rules["rules"].as_array().map(Vec::len), Some(1), "{rules}");
    assert_eq!((&rules["rules"][0]["name"], &rules["rules"][0]["inputs"]), (&json!("hot"), &json!(["telemetry"])));
    // globex's window is open: system.rule_state shows it to globex only, under its name.
    let (_, state) = call(
        &s,
        "POST",
        "/api/v1/sql",
        Some(&tg),
        Some(&json!({"sql": "SELECT rule, device_id FROM system.rule_state"})),
    )?;
    assert_eq!(state, json!([{"rule": "hot", "device_id": "g1"}]));
    for auth in [&ta, &admin] {
        assert_eq!(count(&s, auth, "SELECT count(*) FROM system.rule_state")?, 0);
        assert_eq!(count(&s, auth, "SELECT count(*) FROM system.watermarks WHERE device_id = 'g1'")?, 0);
    }
    assert_eq!(count(&s, &admin, "SELECT count(*) FROM telemetry")?, 1, "no rule reached the default tenant");
    // Removing acme's rule leaves globex's.
    let (st, _) = call_in(&s, "DELETE", "/api/v1/rules/hot", &ta, "acme", None)?;
    assert_eq!(st, 204);
    assert_eq!(call(&s, "GET", "/api/v1/rules/hot", Some(&ta), None)?.0, 404);
    assert_eq!(call(&s, "GET", "/api/v1/rules/hot", Some(&tg), None)?.0, 200);

    // A tenant's rules act only on its own devices: a1 is acme's, g1 globex's.
    add_client(&s, json!({"id": "a1", "kind": "device", "tenant": "acme"}))?;
    let (_, g1_secret) = add_client(&s, json!({"id": "g1", "kind": "device", "tenant": "globex"}))?;
    let (st, body) =
        deploy(&s, &ta, "rule cmd { from telemetry[temp > 1000] then publish 'devices/{device_id}/commands' }")?;
    assert_eq!(st, 201, "{body}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let received = rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "watcher", "admin", &s.token).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.subscribe("devices/+/commands", QoS::AtLeastOnce).await?;
        assert!(matches!(suback(&mut ev).await?[..], [SubscribeReasonCode::Success(_)]));
        // g1's command first, a1's second; a1's must arrive, g1's never.
        ingest(&s, &ta, "telemetry", json!({"device_id": "g1", "temp": 2000}))?;
        s.wait_for("the denied publish", |s| {
            Ok(s.metric("ferrite_rule_publish_failures_total{reason=\"denied\"}")? >= 1)
        })?;
        ingest(&s, &ta, "telemetry", json!({"device_id": "a1", "temp": 2000}))?;
        let topic = tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = ev.poll().await? {
                    return anyhow::Ok(p.topic);
                }
            }
        })
        .await??;
        anyhow::Ok(topic)
    })?;
    assert_eq!(received, "devices/a1/commands");

    // acme's admin (its client secret as MQTT password) may subscribe to acme's devices'
    // topics, not to globex's.
    rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "acme-admin", &a, &a_secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.subscribe("devices/g1/telemetry", QoS::AtMostOnce).await?;
        assert_eq!(suback(&mut ev).await?, vec![SubscribeReasonCode::Failure]);
        c.subscribe("devices/a1/telemetry", QoS::AtMostOnce).await?;
        assert!(matches!(suback(&mut ev).await?[..], [SubscribeReasonCode::Success(_)]));
        anyhow::Ok(())
    })?;

    // A globex device's MQTT telemetry lands in globex's stream.
    rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "g1", "g1", &g1_secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.publish("devices/g1/telemetry", QoS::AtLeastOnce, false, r#"{"temp": 42}"#).await?;
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await?
    })?;
    s.wait_for("g1's MQTT event", |s| Ok(count(s, &tg, "SELECT count(*) FROM telemetry WHERE temp = 42")? == 1))?;
    assert_eq!(count(&s, &admin, "SELECT count(*) FROM telemetry WHERE temp = 42")?, 0);

    // Audit records go to the tenant of whom they are about: acme's denial is acme's.
    s.wait_for("acme's audit", |s| {
        Ok(count(s, &ta, "SELECT count(*) FROM audit WHERE event = 'denied'").unwrap_or(0) >= 1)
    })?;
    s.wait_for("globex's audit", |s| {
        Ok(count(s, &tg, "SELECT count(*) FROM audit WHERE event = 'token_issued'").unwrap_or(0) >= 1)
    })?;
    assert_eq!(count(&s, &admin, "SELECT count(*) FROM audit WHERE tenant = 'acme'")?, 0);
    assert_eq!(count(&s, &tg, "SELECT count(*) FROM audit WHERE tenant = 'acme'")?, 0);

    // The archive is per tenant, and a restart keeps every tenant's streams apart.
    s.stop()?;
    for t in ["acme", "globex", "default"] {
        let files = parquet_files(&dir.path().join("archive").join(t).join("telemetry"));
        assert!(!files.is_empty(), "no archive files for {t}");
    }
    s = Server::start(dir.path(), &[])?;
    let ta = bearer_of(&s, &a, &a_secret)?;
    let telemetry = |auth: &str| count(&s, auth, "SELECT count(*) FROM telemetry");
    assert_eq!((telemetry(&ta)?, telemetry(&s.bearer())?), (6, 1));
    Ok(())
}

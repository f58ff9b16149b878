//! The device registry against the real server, with rumqttc clients acting as devices:
//! provisioning one by one, in bulk (JSON, CSV) and by self-registration; availability;
//! the registry as a SQL table joined with telemetry; disable (disconnected at once,
//! refused after), enable, rotate; tenants; bad input.

use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, Event, Packet, QoS};
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};
use crate::identity::{add_client, call, client_token, connect};

/// A request with a JSON body and the admin's token (or `auth`).
fn send(s: &Server, method: &str, path: &str, auth: Option<&str>, body: &Value) -> anyhow::Result<(u16, Value)> {
    s.send_json(method, path, auth, body)
}

fn secret_of(v: &Value) -> String {
    v["credentials"]["client_secret"].as_str().unwrap_or("").to_owned()
}

fn sql(s: &Server, auth: &str, q: &str) -> anyhow::Result<Value> {
    let (st, body) = call(s, "POST", "/api/v1/sql", Some(auth), Some(&json!({ "sql": q })))?;
    anyhow::ensure!(st == 200, "{q}: {st} {body}");
    Ok(body)
}

#[test]
fn devices_are_registered_seen_disabled_and_kept() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = Server::start(dir.path(), &[])?;
    let admin = s.bearer();

    // One device: its credentials come back once.
    let (st, t1) = send(
        &s,
        "POST",
        "/api/v1/devices",
        None,
        &json!({"id": "th-1", "name": "lobby", "type": "thermostat", "groups": ["building-7"], "firmware": "2.1",
                "attributes": {"floor": 3}, "location": {"lat": 52.52, "lon": 13.40}}),
    )?;
    assert_eq!(st, 201, "{t1}");
    assert_eq!((&t1["status"], &t1["online"], &t1["level"]), (&json!("active"), &json!(false), &json!("full")));
    let t1_secret = secret_of(&t1);
    assert_eq!(t1_secret.len(), 43);
    let (st, body) = send(&s, "POST", "/api/v1/devices", None, &json!({"id": "th-1"}))?;
    assert_eq!((st, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
    for bad in [json!({"id": "a/b"}), json!({"level": "total"}), json!({"colour": "red"}), json!({"id": "import"})] {
        let (st, body) = send(&s, "POST", "/api/v1/devices", None, &bad)?;
        assert_eq!(st, 400, "{bad}: {body}");
    }

    // 10,000 devices in one request; the bad rows are reported, the rest kept.
    let mut rows: Vec<Value> =
        (0..10_000).map(|i| json!({"id": format!("s-{i:05}"), "type": "sensor", "groups": ["fleet"]})).collect();
    rows[17] = json!({"id": "th-1"});
    rows[42] = json!({"id": "s-00001"});
    rows[99] = json!({"id": "s-x", "level": "total"});
    let started = Instant::now();
    let (st, report) = send(&s, "POST", "/api/v1/devices/import", None, &Value::Array(rows))?;
    let took = started.elapsed();
    assert_eq!(st, 200, "{report}");
    assert_eq!(report["created"], 9_997, "{}", report["failed"]);
    let failed: Vec<(u64, String)> = report["failed"]
        .as_array()
        .map(|a| {
            a.iter().map(|f| (f["row"].as_u64().unwrap_or(0), f["error"].as_str().unwrap_or("").to_owned())).collect()
        })
        .unwrap_or_default();
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), vec![18, 43, 100], "{failed:?}");
    assert!(failed[0].1.contains("already exists") && failed[1].1.contains("duplicate of row 2"), "{failed:?}");
    assert_eq!(report["credentials"].as_array().map(Vec::len), Some(9_997));
    eprintln!("imported 10,000 devices in {took:?}");

    // CSV, with attributes as attr.* columns.
    let csv = "id,type,tags,groups,attr.building,lat,lon\nc-1,meter,a;b,building-7,7,1.5,2.5\nc-2,meter,,,,,\nc-3,meter,,,,91,0\n";
    let mut resp = s
        .agent()
        .post(&s.url("/api/v1/devices/import"))
        .header("Authorization", &admin)
        .header("Content-Type", "text/csv")
        .send(csv)?;
    let report: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
    assert_eq!((report["created"].as_u64(), report["failed"][0]["row"].as_u64()), (Some(2), Some(3)), "{report}");
    // Over 16 MiB: refused whole, nothing kept.
    let big = format!("[{}]", vec![r#"{"id": "big-0000000000000000000000"}"#; 500_000].join(","));
    let (st, body) = {
        let mut r = s
            .agent()
            .post(&s.url("/api/v1/devices/import"))
            .header("Authorization", &admin)
            .header("Content-Type", "application/json")
            .send(big.as_bytes())?;
        (r.status().as_u16(), r.body_mut().read_to_string()?)
    };
    assert_eq!(st, 413, "{body}");

    // Filters and paging.
    let (_, page) = call(&s, "GET", "/api/v1/devices?group=building-7&limit=1", Some(&admin), None)?;
    assert_eq!((page["devices"][0]["id"].as_str(), page["next"].as_str()), (Some("c-1"), Some("c-1")), "{page}");
    let (_, page) = call(&s, "GET", "/api/v1/devices?group=building-7&after=c-1", Some(&admin), None)?;
    assert_eq!((page["devices"][0]["id"].as_str(), &page["next"]), (Some("th-1"), &Value::Null), "{page}");
    let (st, _) = call(&s, "GET", "/api/v1/devices?colour=red", Some(&admin), None)?;
    assert_eq!(st, 400);

    // The device connects and reports: online, last seen, its telemetry joins the registry.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (client, mut ev) = rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "th-1", "th-1", &t1_secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.publish("devices/th-1/telemetry", QoS::AtLeastOnce, false, r#"{"temp": 21.5}"#).await?;
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await??;
        anyhow::Ok((c, ev))
    })?;
    // A position report (any stream with `lat` and `lon`) moves the device.
    s.post_json("/api/v1/streams/location/events", &json!({"device_id": "th-1", "lat": 48.8566, "lon": 2.3522}))?;
    s.wait_for("th-1 located", |s| {
        let r = sql(s, &admin, "SELECT lat, lon FROM device_location WHERE device_id = 'th-1'");
        Ok(r.is_ok_and(|r| r == json!([{"lat": 48.8566, "lon": 2.3522}])))
    })?;
    let (_, moved) = call(&s, "GET", "/api/v1/devices/th-1", Some(&admin), None)?;
    assert_eq!(moved["location"], json!({"lat": 48.8566, "lon": 2.3522}));
    s.wait_for("th-1 online", |s| {
        Ok(sql(s, &admin, "SELECT status FROM device_status WHERE device_id = 'th-1'")
            .is_ok_and(|r| r[0]["status"] == "online"))
    })?;
    let joined = sql(
        &s,
        &admin,
        "SELECT d.device_id, d.firmware, t.temp, d.online, d.last_seen IS NOT NULL AS seen FROM devices d \
         JOIN telemetry t ON t.device_id = d.device_id \
         WHERE d.type = 'thermostat' AND array_has(d.groups, 'building-7') AND d.firmware < '2.3'",
    )?;
    assert_eq!(joined, json!([{"device_id": "th-1", "firmware": "2.1", "temp": 21.5, "online": true, "seen": true}]));

    // Disable: the live session ends within a second, a reconnect is refused.
    let disabled_at = Instant::now();
    let (st, body) = send(&s, "POST", "/api/v1/devices/th-1/disable", None, &json!({}))?;
    assert_eq!((st, body["status"].as_str()), (200, Some("disabled")), "{body}");
    let ended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if ev.poll().await.is_err() {
                    return;
                }
            }
        })
        .await
    });
    assert!(ended.is_ok(), "the session was still open a second after the disable");
    eprintln!("disable to disconnect: {:?}", disabled_at.elapsed());
    drop(client);
    rt.block_on(async {
        assert_eq!(connect(&s, "th-1", "th-1", &t1_secret).await?.2, ConnectReturnCode::BadUserNamePassword);
        anyhow::Ok(())
    })?;
    s.wait_for("th-1 offline", |s| {
        Ok(sql(s, &admin, "SELECT reason FROM device_status WHERE device_id = 'th-1' AND status = 'offline'")
            .is_ok_and(|r| r[0]["reason"] == "kicked"))
    })?;
    // The queries of docs/devices.md run as written.
    let gone = sql(
        &s,
        &admin,
        "SELECT device_id, max(time) AS since FROM device_status GROUP BY device_id \
         HAVING last_value(status ORDER BY time) = 'offline' AND max(time) < now() + INTERVAL '1 hour'",
    )?;
    assert_eq!(gone[0]["device_id"], "th-1", "{gone}");
    let temps = sql(
        &s,
        &admin,
        "SELECT d.device_id, d.firmware, avg(t.temp) AS temp FROM devices d JOIN telemetry t ON t.device_id = d.device_id \
         WHERE d.type = 'thermostat' AND array_has(d.groups, 'building-7') AND d.firmware < '2.3' \
         GROUP BY d.device_id, d.firmware",
    )?;
    assert_eq!(temps, json!([{"device_id": "th-1", "firmware": "2.1", "temp": 21.5}]));
    // Enable lets it in again; rotate replaces its secret.
    assert_eq!(send(&s, "POST", "/api/v1/devices/th-1/enable", None, &json!({}))?.0, 200);
    let (st, rotated) = send(&s, "POST", "/api/v1/devices/th-1/rotate", None, &json!({}))?;
    assert_eq!(st, 200, "{rotated}");
    let new_secret = secret_of(&rotated);
    rt.block_on(async {
        assert_eq!(connect(&s, "th-1", "th-1", &t1_secret).await?.2, ConnectReturnCode::BadUserNamePassword);
        assert_eq!(connect(&s, "th-1", "th-1", &new_secret).await?.2, ConnectReturnCode::Success);
        anyhow::Ok(())
    })?;

    // Self-registration: pending (refused) until approved.
    let (st, p) = send(&s, "POST", "/api/v1/provisioning-secrets", None, &json!({"type": "kiosk", "ttl_days": 1}))?;
    assert_eq!(st, 201, "{p}");
    let provisioning = p["secret"].as_str().unwrap_or("").to_owned();
    let anonymous = |body: Value| -> anyhow::Result<(u16, Value)> {
        let mut r = s
            .agent()
            .post(&s.url("/api/v1/devices/register"))
            .header("Content-Type", "application/json")
            .send(body.to_string())?;
        let st = r.status().as_u16();
        Ok((st, serde_json::from_str(&r.body_mut().read_to_string()?)?))
    };
    let (st, body) = anonymous(json!({"provisioning_secret": "guess", "id": "k-1"}))?;
    assert_eq!(st, 401, "{body}");
    let (st, k1) = anonymous(json!({"provisioning_secret": provisioning, "id": "k-1"}))?;
    assert_eq!((st, k1["status"].as_str(), k1["type"].as_str()), (201, Some("pending"), Some("kiosk")), "{k1}");
    let k1_secret = secret_of(&k1);
    rt.block_on(async {
        assert_eq!(connect(&s, "k-1", "k-1", &k1_secret).await?.2, ConnectReturnCode::BadUserNamePassword);
        anyhow::Ok(())
    })?;
    assert_eq!(send(&s, "POST", "/api/v1/devices/th-1/approve", None, &json!({}))?.0, 400, "th-1 is not pending");
    assert_eq!(send(&s, "POST", "/api/v1/devices/k-1/approve", None, &json!({}))?.0, 200);
    rt.block_on(async {
        assert_eq!(connect(&s, "k-1", "k-1", &k1_secret).await?.2, ConnectReturnCode::Success);
        anyhow::Ok(())
    })?;

    // Another tenant sees none of it; its admin may not manage these devices.
    s.post_json("/api/v1/tenants", &json!({"id": "globex"}))?;
    let (g, g_secret) = add_client(&s, json!({"tenant": "globex", "roles": ["admin"]}))?;
    let tg = format!("Bearer {}", client_token(&s, &g, &g_secret, "")?["access_token"].as_str().unwrap_or(""));
    assert_eq!(call(&s, "GET", "/api/v1/devices/th-1", Some(&tg), None)?.0, 404);
    assert_eq!(send(&s, "POST", "/api/v1/devices/th-1/disable", Some(&tg), &json!({}))?.0, 404);
    assert_eq!(sql(&s, &tg, "SELECT count(*) AS n FROM devices")?[0]["n"], 0);
    // Another tenant's data naming th-1 does not move it (events of one device reach one
    // shard in order: once the default tenant's later report shows, globex's was seen).
    let (st, _) = call(
        &s,
        "POST",
        "/api/v1/streams/location/events",
        Some(&tg),
        Some(&json!({"device_id": "th-1", "lat": 0.0, "lon": 0.0})),
    )?;
    assert_eq!(st, 200);
    s.post_json("/api/v1/streams/location/events", &json!({"device_id": "th-1", "lat": 40.0, "lon": 2.3522}))?;
    s.wait_for("th-1's own report", |s| {
        Ok(call(s, "GET", "/api/v1/devices/th-1", Some(&admin), None)?.1["location"]["lat"] == 40.0)
    })?;
    assert_eq!(sql(&s, &admin, "SELECT count(*) AS n FROM device_location WHERE lat = 0")?[0]["n"], 0);
    // A viewer lists but does not change.
    let (v, v_secret) = add_client(&s, json!({"roles": ["viewer"]}))?;
    let tv = format!("Bearer {}", client_token(&s, &v, &v_secret, "")?["access_token"].as_str().unwrap_or(""));
    assert_eq!(call(&s, "GET", "/api/v1/devices/th-1", Some(&tv), None)?.0, 200);
    assert_eq!(send(&s, "PATCH", "/api/v1/devices/th-1", Some(&tv), &json!({"firmware": "9"}))?.0, 403);
    let (st, changed) = send(&s, "PATCH", "/api/v1/devices/th-1", None, &json!({"firmware": "2.3", "tags": ["x"]}))?;
    assert_eq!((st, changed["firmware"].as_str()), (200, Some("2.3")), "{changed}");

    // Decommission: gone from the registry, its credentials with it.
    assert_eq!(s.delete("/api/v1/devices/c-2")?, 204);
    assert_eq!(call(&s, "GET", "/api/v1/devices/c-2", Some(&admin), None)?.0, 404);

    // A restart keeps the registry.
    s.stop()?;
    s = Server::start(dir.path(), &[])?;
    let admin = s.bearer();
    let n = sql(&s, &admin, "SELECT count(*) AS n, count(last_seen) AS seen FROM devices")?;
    assert_eq!(n, json!([{"n": 10_000, "seen": 2}]), "1 + 9,997 + 2 - 1 + k-1; th-1 and k-1 seen");
    let (_, th1) = call(&s, "GET", "/api/v1/devices/th-1", Some(&admin), None)?;
    assert_eq!((th1["firmware"].as_str(), th1["tags"].clone()), (Some("2.3"), json!(["x"])));
    Ok(())
}

#[test]
fn the_device_command_line_drives_the_registry() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let server = s.url("");
    let data = dir.path().to_str().unwrap_or_default().to_owned();
    let run = |args: &[&str]| -> anyhow::Result<(bool, Value, String)> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(args)
            .args(["--server", &server, "--data-dir", &data])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        Ok((
            out.status.success(),
            serde_json::from_str(&stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).into(),
        ))
    };
    let (ok, added, err) = run(&["device", "add", "--id", "cli-1", "--type", "pump", "--groups", "site-a,site-b"])?;
    assert!(ok, "{err}");
    assert_eq!((added["groups"].clone(), secret_of(&added).len()), (json!(["site-a", "site-b"]), 43), "{added}");
    let csv = dir.path().join("more.csv");
    std::fs::write(&csv, "id,type,groups\ncli-2,pump,site-a\ncli-1,pump,\n")?;
    let (ok, report, err) = run(&["device", "import", csv.to_str().unwrap_or_default()])?;
    assert!(ok, "{err}");
    assert_eq!((report["created"].as_u64(), report["failed"][0]["id"].as_str()), (Some(1), Some("cli-1")), "{report}");
    let (ok, listed, _) = run(&["device", "list", "--group", "site-a"])?;
    assert!(ok);
    let ids: Vec<&str> =
        listed.as_array().map(|a| a.iter().filter_map(|d| d["id"].as_str()).collect()).unwrap_or_default();
    assert_eq!(ids, vec!["cli-1", "cli-2"]);
    let (ok, disabled, _) = run(&["device", "disable", "cli-1"])?;
    assert!(ok && disabled["status"] == "disabled", "{disabled}");
    let (ok, _, _) = run(&["device", "remove", "cli-2"])?;
    assert!(ok);
    let (ok, _, err) = run(&["device", "show", "cli-2"])?;
    assert!(!ok && err.contains("404"), "{err}");
    Ok(())
}

#[test]
fn a_device_that_stays_offline_raises_an_alert() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (_, d) = send(&s, "POST", "/api/v1/devices", None, &json!({"id": "d-off"}))?;
    let secret = secret_of(&d);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (client, ev) = rt.block_on(async {
        let (c, ev, code) = connect(&s, "d-off", "d-off", &secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        anyhow::Ok((c, ev))
    })?;
    s.wait_for("device_status", |s| Ok(sql(s, &s.bearer(), "SELECT count(*) AS n FROM device_status").is_ok()))?;
    // The rule of docs/rules.md, with a one-second absence.
    let rule = "rule stays_offline {
        from every a = device_status[status = 'offline'] -> not device_status[status = 'online'] for 1s
        select a.device_id, a.reason
        then alert severity 'warning' message '{device_id} is offline ({reason})'
    }";
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule.as_bytes())?;
    assert_eq!(status, 201, "{body}");
    // The device drops off without a DISCONNECT.
    drop((client, ev));
    drop(rt);
    s.wait_for("the alert", |s| {
        Ok(sql(s, &s.bearer(), "SELECT message FROM alerts WHERE rule = 'stays_offline'")
            .is_ok_and(|r| r == json!([{"message": "d-off is offline (lost)"}])))
    })?;
    Ok(())
}

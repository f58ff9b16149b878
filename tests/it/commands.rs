//! Commands from HTTP and rules to devices over MQTT, against the real server: device types
//! and their limits, persistence across a restart, delivery at QoS 1 on subscribe, answers
//! correlated, expiry, and every refusal named and audited.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Packet, QoS};
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};
use crate::identity::{call, connect};

fn send(s: &Server, method: &str, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    s.send_json(method, path, None, body)
}

fn command(s: &Server, device: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    send(s, "POST", &format!("/api/v1/devices/{device}/commands"), &body)
}

fn status_of(s: &Server, device: &str, id: &str) -> anyhow::Result<Value> {
    Ok(call(s, "GET", &format!("/api/v1/devices/{device}/commands/{id}"), Some(&s.bearer()), None)?.1)
}

/// The next command a device receives.
async fn next_command(ev: &mut EventLoop) -> anyhow::Result<Value> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = ev.poll().await? {
                return anyhow::Ok(serde_json::from_slice(&p.payload)?);
            }
        }
    })
    .await?
}

/// Polls until the client has sent what it queued.
async fn drain(ev: &mut EventLoop) {
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if ev.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
}

async fn answer(c: &AsyncClient, ev: &mut EventLoop, device: &str, id: &str, status: &str) -> anyhow::Result<()> {
    let body = json!({"id": id, "status": status, "result": {"done": true}}).to_string();
    c.publish(format!("devices/{device}/commands/result"), QoS::AtLeastOnce, false, body).await?;
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await?
}

#[test]
fn commands_are_bounded_durable_delivered_and_answered() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = Server::start(dir.path(), &[])?;
    let (st, t) = send(
        &s,
        "PUT",
        "/api/v1/device-types/thermostat",
        &json!({"commands": {"set_temp": {"params": {"target": {"type": "number", "min": 5, "max": 30, "required": true}}}},
                "max_per_minute": 5}),
    )?;
    assert_eq!(st, 200, "{t}");
    let (st, bad) = send(&s, "PUT", "/api/v1/device-types/x", &json!({"commands": {"reboot": {}}}))?;
    assert_eq!(st, 400, "a type may not redefine a standard command: {bad}");
    let mut secrets = std::collections::HashMap::new();
    for (id, level) in [("th-1", "full"), ("th-2", "semi")] {
        let (st, d) = send(&s, "POST", "/api/v1/devices", &json!({"id": id, "type": "thermostat", "level": level}))?;
        assert_eq!(st, 201, "{d}");
        secrets.insert(id, d["credentials"]["client_secret"].as_str().unwrap_or("").to_owned());
    }

    // Refused before anything reaches a device, each naming its limit.
    for (device, body, want) in [
        ("th-1", json!({"name": "set_temp", "params": {"target": 99}}), "above its maximum 30"),
        ("th-1", json!({"name": "set_temp", "params": {"target": "hot"}}), "must be a number"),
        ("th-1", json!({"name": "set_temp", "params": {}}), "needs the parameter `target`"),
        ("th-1", json!({"name": "fly"}), "has no command \"fly\""),
        ("th-2", json!({"name": "wipe"}), "semi-managed"),
    ] {
        let (st, e) = command(&s, device, body.clone())?;
        assert_eq!(st, 422, "{body}: {e}");
        assert!(e["error"]["message"].as_str().unwrap_or("").contains(want), "{body}: {e}");
    }
    assert_eq!(command(&s, "nobody", json!({"name": "lock"}))?.0, 404);

    // A command for th-1 while it is offline waits, across a restart.
    let (st, queued) = command(&s, "th-1", json!({"name": "set_temp", "params": {"target": 21.5}, "timeout": 600}))?;
    assert_eq!((st, queued["status"].as_str()), (202, Some("queued")), "{queued}");
    let set_id = queued["id"].as_str().unwrap_or("").to_owned();
    let (_, lock) = command(&s, "th-1", json!({"name": "lock", "params": {"message": "stolen"}}))?;
    let lock_id = lock["id"].as_str().unwrap_or("").to_owned();
    s.stop()?;
    s = Server::start(dir.path(), &[])?;
    assert_eq!(status_of(&s, "th-1", &set_id)?["status"], "queued");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let secret = secrets["th-1"].clone();
    rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "th-1", "th-1", &secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.subscribe("devices/th-1/commands", QoS::AtLeastOnce).await?;
        // Delivered on subscribe, in order; the client acknowledges each (PUBACK).
        let first = next_command(&mut ev).await?;
        assert_eq!(
            (&first["id"], &first["name"], &first["params"]),
            (&json!(set_id), &json!("set_temp"), &json!({"target": 21.5}))
        );
        let second = next_command(&mut ev).await?;
        assert_eq!((&second["id"], &second["name"]), (&json!(lock_id), &json!("lock")));
        drain(&mut ev).await;
        answer(&c, &mut ev, "th-1", &set_id, "succeeded").await?;
        answer(&c, &mut ev, "th-1", &lock_id, "failed").await?;
        // Live: a wipe reaches the connected device at once.
        let (st, wipe) = command(&s, "th-1", json!({"name": "wipe"}))?;
        assert_eq!(st, 202, "{wipe}");
        let got = next_command(&mut ev).await?;
        assert_eq!(got["name"], "wipe");
        drain(&mut ev).await;
        let wipe_id = got["id"].as_str().unwrap_or("").to_owned();
        s.wait_for("the wipe delivered", |s| Ok(status_of(s, "th-1", &wipe_id)?["status"] == "delivered"))?;
        answer(&c, &mut ev, "th-1", &wipe_id, "succeeded").await?;
        // Answers that are not this device's, or not open, are refused and counted.
        answer(&c, &mut ev, "th-1", "no-such-command", "succeeded").await?;
        anyhow::Ok(())
    })?;
    s.wait_for("the answers recorded", |s| {
        Ok(status_of(s, "th-1", &set_id)?["status"] == "succeeded"
            && status_of(s, "th-1", &lock_id)?["status"] == "failed")
    })?;
    assert_eq!(status_of(&s, "th-1", &set_id)?["result"], json!({"done": true}));
    assert!(s.metric("ferrite_command_results_refused_total{reason=\"unknown_command\"}")? >= 1);

    // th-2 answering th-1's open command is refused.
    let (_, open) = command(&s, "th-1", json!({"name": "locate", "timeout": 1}))?;
    let open_id = open["id"].as_str().unwrap_or("").to_owned();
    let secret2 = secrets["th-2"].clone();
    rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "th-2", "th-2", &secret2).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        answer(&c, &mut ev, "th-2", &open_id, "succeeded").await
    })?;
    s.wait_for("the wrong device's answer refused", |s| {
        Ok(s.metric("ferrite_command_results_refused_total{reason=\"wrong_device\"}")? >= 1)
    })?;
    // Nobody answers it: it expires.
    s.wait_for("the command expired", |s| Ok(status_of(s, "th-1", &open_id)?["status"] == "expired"))?;

    // The rate: five a minute for a thermostat (three accepted so far, plus this one).
    assert_eq!(command(&s, "th-1", json!({"name": "unlock"}))?.0, 202);
    let (st, e) = command(&s, "th-1", json!({"name": "unlock"}))?;
    assert_eq!(st, 422, "{e}");
    assert!(e["error"]["message"].as_str().unwrap_or("").contains("in the last minute"), "{e}");

    // Every step is in the `commands` stream; every refusal in the audit trail.
    s.wait_for("the lifecycle in SQL", |s| {
        let rows = s.sql(&format!("SELECT status FROM commands WHERE command_id = '{set_id}' ORDER BY time"))?;
        let steps: Vec<&str> = rows.iter().filter_map(|r| r["status"].as_str()).collect();
        Ok(steps == ["queued", "sent", "delivered", "succeeded"])
    })?;
    s.wait_for("refusals audited", |s| {
        Ok(s.sql_count("SELECT count(*) FROM audit WHERE event = 'command_refused'")? >= 6)
    })?;
    Ok(())
}

#[test]
fn a_rules_commands_pass_the_same_limits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    send(
        &s,
        "PUT",
        "/api/v1/device-types/valve",
        &json!({"commands": {"open": {"params": {"percent": {"type": "integer", "min": 0, "max": 100, "required": true}}}},
                "max_per_minute": 2}),
    )?;
    let (_, d) = send(&s, "POST", "/api/v1/devices", &json!({"id": "v-1", "type": "valve"}))?;
    // The stream exists before the rule (below its threshold).
    s.post_json("/api/v1/streams/telemetry/events", &json!({"device_id": "v-1", "pressure": 1}))?;
    let secret = d["credentials"]["client_secret"].as_str().unwrap_or("").to_owned();
    let rule = "rule open_valve { from telemetry[pressure > 5] select device_id, pressure \
                then command device_id 'open' {\"percent\": \"{pressure}\"} }";
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule.as_bytes())?;
    assert_eq!(status, 201, "{body}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "v-1", "v-1", &secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.subscribe("devices/v-1/commands", QoS::AtLeastOnce).await?;
        drain(&mut ev).await;
        // In bounds: it reaches the valve.
        s.post_json("/api/v1/streams/telemetry/events", &json!({"device_id": "v-1", "pressure": 40}))?;
        let got = next_command(&mut ev).await?;
        assert_eq!((&got["name"], &got["params"]), (&json!("open"), &json!({"percent": 40})));
        anyhow::Ok(())
    })?;
    // Out of bounds, then a burst over the rate: refused, counted and audited, never sent.
    s.post_json("/api/v1/streams/telemetry/events", &json!({"device_id": "v-1", "pressure": 500}))?;
    let burst: Vec<Value> = (0..5).map(|i| json!({"device_id": "v-1", "pressure": 10 + i})).collect();
    s.post_json("/api/v1/streams/telemetry/events", &Value::Array(burst))?;
    s.wait_for("the rule's refusals", |s| {
        Ok(s.sql_count("SELECT count(*) FROM audit WHERE event = 'command_refused' AND device_id = 'rules'")? >= 5)
    })?;
    let audit = s.sql("SELECT detail FROM audit WHERE event = 'command_refused' AND detail LIKE '%maximum%'")?;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(s.metric("ferrite_commands_refused_total{reason=\"limit\"}")? >= 5);
    // Two a minute for a valve: the first reached it, the second waits for its session.
    s.wait_for("two accepted", |s| Ok(s.sql_count("SELECT count(*) FROM commands WHERE status = 'queued'")? == 2))?;
    assert_eq!(s.sql_count("SELECT count(*) FROM commands WHERE status = 'queued'")?, 2);
    Ok(())
}

/// A device that subscribes to its commands and desired state, and answers every command
/// with `answer`; returns once it is subscribed.
fn spawn_device(
    rt: &tokio::runtime::Runtime,
    s: &Server,
    id: &str,
    secret: &str,
    answer: &'static str,
) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut o = rumqttc::MqttOptions::new(id, s.mqtt.ip().to_string(), s.mqtt.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_credentials(id, secret);
    let id = id.to_owned();
    rt.spawn(async move {
        let (c, mut ev) = AsyncClient::new(o, 100);
        let mut subacks = 0;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.subscribe(format!("devices/{id}/commands"), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    if subacks == 1 {
                        let _ = ready_tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/commands") => {
                    let cmd: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    let body = json!({"id": cmd["id"], "status": answer}).to_string();
                    let _ = c.publish(format!("devices/{id}/commands/result"), QoS::AtLeastOnce, false, body).await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready_rx.recv_timeout(TIMEOUT)?;
    Ok(())
}

#[test]
fn bulk_jobs_run_bounded_and_stop_at_their_failure_threshold() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let rows: Vec<Value> = (0..24)
        .map(|i| json!({"id": format!("l-{i:02}"), "type": "light", "groups": [if i < 12 { "bad" } else { "ok" }]}))
        .collect();
    let (st, report) = send(&s, "POST", "/api/v1/devices/import", &Value::Array(rows))?;
    assert_eq!((st, report["created"].as_u64()), (200, Some(24)), "{report}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    for c in report["credentials"].as_array().cloned().unwrap_or_default() {
        let id = c["client_id"].as_str().unwrap_or("");
        let answer = if id < "l-12" { "failed" } else { "succeeded" };
        spawn_device(&rt, &s, id, c["client_secret"].as_str().unwrap_or(""), answer)?;
    }
    // Every device of group `bad` fails: the job stops once half of at least 4 finished did.
    let (st, job) = send(
        &s,
        "POST",
        "/api/v1/jobs",
        &json!({"command": {"name": "locate"}, "target": {"group": "bad"}, "concurrency": 2,
                "max_failure_rate": 0.5, "min_samples": 4}),
    )?;
    assert_eq!((st, job["total"].as_u64()), (202, Some(12)), "{job}");
    let id = job["id"].as_str().unwrap_or("").to_owned();
    let get = |id: &str| -> anyhow::Result<Value> {
        Ok(call(&s, "GET", &format!("/api/v1/jobs/{id}"), Some(&s.bearer()), None)?.1)
    };
    s.wait_for("the job to stop", |_| Ok(get(&id)?["status"] == "stopped" && get(&id)?["in_flight"] == 0))?;
    let v = get(&id)?;
    assert!(v["reason"].as_str().unwrap_or("").contains("threshold"), "{v}");
    let sent = v["sent"].as_u64().unwrap_or(99);
    assert!((4..12).contains(&sent), "stopped early, two in flight at most past the threshold: {v}");
    assert_eq!(v["failed"].as_u64(), Some(sent), "{v}");

    // By query: every device answers; the job completes.
    let (st, job) = send(
        &s,
        "POST",
        "/api/v1/jobs",
        &json!({"command": {"name": "reboot", "params": {"delay_secs": 5}},
                "target": {"sql": "SELECT device_id FROM devices WHERE array_has(groups, 'ok')"}, "concurrency": 4}),
    )?;
    assert_eq!((st, job["total"].as_u64()), (202, Some(12)), "{job}");
    let id = job["id"].as_str().unwrap_or("").to_owned();
    s.wait_for("the job to complete", |_| Ok(get(&id)?["status"] == "completed"))?;
    let v = get(&id)?;
    assert_eq!(
        (v["succeeded"].as_u64(), v["failed"].as_u64(), v["refused"].as_u64()),
        (Some(12), Some(0), Some(0)),
        "{v}"
    );
    // Bad jobs are refused with a reason.
    let (st, e) =
        send(&s, "POST", "/api/v1/jobs", &json!({"command": {"name": "locate"}, "target": {"group": "none"}}))?;
    assert_eq!(st, 400, "{e}");
    let (st, e) =
        send(&s, "POST", "/api/v1/jobs", &json!({"command": {"name": "locate"}, "target": {"sql": "SELECT 1 AS x"}}))?;
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap_or("").contains("device_id"), "{e}");
    Ok(())
}

#[test]
fn the_twin_is_versioned_pushed_and_reported() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let mut secrets = std::collections::HashMap::new();
    for (id, level) in [("tw-1", "full"), ("tw-2", "full"), ("tw-3", "none")] {
        let (_, d) = send(&s, "POST", "/api/v1/devices", &json!({"id": id, "level": level}))?;
        secrets.insert(id, d["credentials"]["client_secret"].as_str().unwrap_or("").to_owned());
    }
    let patch = |id: &str, body: Value| s.send_json("PATCH", &format!("/api/v1/devices/{id}/twin"), None, &body);
    let twin = |id: &str| -> anyhow::Result<Value> {
        Ok(call(&s, "GET", &format!("/api/v1/devices/{id}/twin"), Some(&s.bearer()), None)?.1)
    };
    let (st, t) = patch("tw-1", json!({"desired": {"target": 21, "net": {"ssid": "plant"}}}))?;
    assert_eq!(
        (st, &t["version"], &t["delta"]),
        (200, &json!(1), &json!({"target": 21, "net": {"ssid": "plant"}})),
        "{t}"
    );
    let (st, e) = patch("tw-3", json!({"desired": {"x": 1}}))?;
    assert_eq!(st, 422, "a non-managed device takes no desired state: {e}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let secret = secrets["tw-1"].clone();
    rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "tw-1", "tw-1", &secret).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        // On subscribe: the current desired state.
        c.subscribe("devices/tw-1/shadow/desired", QoS::AtLeastOnce).await?;
        let got = next_command(&mut ev).await?;
        assert_eq!(got, json!({"version": 1, "state": {"target": 21, "net": {"ssid": "plant"}}}));
        // A change based on an old version is refused with the current one.
        let (st, e) = patch("tw-1", json!({"desired": {"target": 25}, "version": 0}))?;
        assert_eq!((st, e["error"]["code"].as_str()), (409, Some("stale_version")), "{e}");
        // A change on the current version is pushed at once.
        let (st, t) = patch("tw-1", json!({"desired": {"target": 22, "net": null}, "version": 1}))?;
        assert_eq!((st, &t["version"]), (200, &json!(2)), "{t}");
        let got = next_command(&mut ev).await?;
        assert_eq!(got, json!({"version": 2, "state": {"target": 22}}));
        // The device reports; an older report is refused.
        c.publish(
            "devices/tw-1/shadow/reported",
            QoS::AtLeastOnce,
            false,
            json!({"version": 5, "state": {"target": 22, "fw": "2.1"}}).to_string(),
        )
        .await?;
        c.publish(
            "devices/tw-1/shadow/reported",
            QoS::AtLeastOnce,
            false,
            json!({"version": 4, "state": {"target": 0}}).to_string(),
        )
        .await?;
        drain(&mut ev).await;
        anyhow::Ok(())
    })?;
    s.wait_for("the report", |_| Ok(twin("tw-1")?["reported_version"] == 5))?;
    let t = twin("tw-1")?;
    assert_eq!((&t["reported"], &t["delta"]), (&json!({"target": 22, "fw": "2.1"}), &json!({})), "{t}");
    assert!(s.metric("ferrite_twin_reports_refused_total{reason=\"stale\"}")? >= 1);
    // Another device cannot report for tw-1 (the policy drops it at the door).
    let secret2 = secrets["tw-2"].clone();
    rt.block_on(async {
        let (c, mut ev, _) = connect(&s, "tw-2", "tw-2", &secret2).await?;
        c.publish(
            "devices/tw-1/shadow/reported",
            QoS::AtLeastOnce,
            false,
            json!({"state": {"target": 99}}).to_string(),
        )
        .await?;
        drain(&mut ev).await;
        anyhow::Ok(())
    })?;
    assert_eq!(twin("tw-1")?["reported"]["target"], 22);
    s.wait_for("the twin history", |s| {
        Ok(s.sql_count("SELECT count(*) FROM device_twin WHERE device_id = 'tw-1'")? == 3)
    })?;
    Ok(())
}

#[test]
fn credentials_rotate_over_the_command_channel() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (_, d) = send(&s, "POST", "/api/v1/devices", &json!({"id": "r-1"}))?;
    let old = d["credentials"]["client_secret"].as_str().unwrap_or("").to_owned();
    // Not through the generic commands route: the platform makes the secret.
    let (st, e) = command(&s, "r-1", json!({"name": "rotate_credentials", "params": {"deadline_secs": 600}}))?;
    assert_eq!(st, 400, "{e}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let new = rt.block_on(async {
        let (c, mut ev, code) = connect(&s, "r-1", "r-1", &old).await?;
        assert_eq!(code, ConnectReturnCode::Success);
        c.subscribe("devices/r-1/commands", QoS::AtLeastOnce).await?;
        drain(&mut ev).await;
        let (st, started) = send(&s, "POST", "/api/v1/devices/r-1/credentials/rotate", &json!({"deadline_secs": 600}))?;
        assert_eq!(st, 202, "{started}");
        let got = next_command(&mut ev).await?;
        assert_eq!((&got["name"], &got["params"]["deadline_secs"]), (&json!("rotate_credentials"), &json!(600)));
        let new = got["params"]["client_secret"].as_str().unwrap_or("").to_owned();
        assert_eq!(new.len(), 43);
        drain(&mut ev).await;
        // Until the device confirms, both secrets work.
        assert_eq!(connect(&s, "r-1-new", "r-1", &new).await?.2, ConnectReturnCode::Success);
        assert_eq!(connect(&s, "r-1-old", "r-1", &old).await?.2, ConnectReturnCode::Success);
        // The secret is never stored nor shown.
        let id = got["id"].as_str().unwrap_or("").to_owned();
        let shown = status_of(&s, "r-1", &id)?;
        assert!(!shown.to_string().contains(&new), "{shown}");
        answer(&c, &mut ev, "r-1", &id, "succeeded").await?;
        anyhow::Ok(new)
    })?;
    // Confirmed: the old secret stops working, the new one goes on.
    s.wait_for("the old secret revoked", |s| {
        let code = rt.block_on(async { connect(s, "r-1-check", "r-1", &old).await.map(|r| r.2) })?;
        Ok(code == ConnectReturnCode::BadUserNamePassword)
    })?;
    rt.block_on(async {
        assert_eq!(connect(&s, "r-1-after", "r-1", &new).await?.2, ConnectReturnCode::Success);
        anyhow::Ok(())
    })?;
    Ok(())
}

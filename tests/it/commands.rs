//! Commands from HTTP and rules to devices over MQTT, against the real server: device types
//! and their limits, persistence across a restart, delivery at QoS 1 on subscribe, answers
//! correlated, expiry, and every refusal named and audited.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, Packet, QoS};
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};
use crate::identity::{call, connect};

fn send(s: &Server, method: &str, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let url = s.url(path);
    let req = if method == "PUT" { s.agent().put(&url) } else { s.agent().post(&url) };
    let mut resp =
        req.header("Authorization", &s.bearer()).header("Content-Type", "application/json").send(body.to_string())?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
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
    let mut resp = s
        .agent()
        .post(&s.url("/api/v1/rules"))
        .header("Authorization", &s.bearer())
        .header("Content-Type", "text/plain")
        .send(rule)?;
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.body_mut().read_to_string()?);
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

//! Rules end to end: the golden suite through `ferrite rules test`, `ferrite rules check`
//! diagnostics, and a running server loading, hot-reloading and serving rules, with outputs
//! in SQL and commands on MQTT.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use rumqttc::{Packet, QoS};
use serde_json::{Value, json};

use crate::harness::Server;
use crate::mqtt::{client, runtime, until};

fn ferrite(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_ferrite")).args(args).output()?)
}

fn cases_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests/cases")
}

#[test]
fn the_golden_rule_cases_pass_in_every_shape() -> anyhow::Result<()> {
    let dir = cases_dir();
    let out = ferrite(&["rules", "test", dir.to_str().context("path")?])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let cases = std::fs::read_dir(&dir)?.count();
    assert!(cases >= 13, "only {cases} cases");
    assert!(stdout.contains(&format!("{cases} passed, 0 failed")), "{stdout}");
    Ok(())
}

#[test]
fn a_wrong_expectation_fails_with_a_diff() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let case = cases_dir().join("tumbling_by_device");
    for f in ["rule.rules", "input.ndjson", "expected.ndjson"] {
        std::fs::copy(case.join(f), tmp.path().join(f))?;
    }
    let expected = std::fs::read_to_string(tmp.path().join("expected.ndjson"))?;
    std::fs::write(tmp.path().join("expected.ndjson"), expected.replace("\"avg_temp\":90.0", "\"avg_temp\":91.0"))?;
    let out = ferrite(&["rules", "test", tmp.path().to_str().context("path")?])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("- {\"avg_temp\":91.0"), "{stdout}");
    assert!(stdout.contains("+ {\"avg_temp\":90.0"), "{stdout}");
    Ok(())
}

#[test]
fn rules_check_prints_position_line_caret_and_hint() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("bad.rules");
    std::fs::write(&file, "rule r {\n    from telemetry\n    window tumbing 1m by device_id\n    insert into o\n}\n")?;
    let out =
        ferrite(&["rules", "check", file.to_str().context("path")?, "--data-dir", tmp.path().to_str().context("p")?])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("error: unknown window kind `tumbing`"), "{stderr}");
    assert!(stderr.contains("bad.rules:3:12"), "{stderr}");
    assert!(stderr.contains("3 |     window tumbing 1m by device_id"), "{stderr}");
    assert!(stderr.contains("  |            ^^^^^^^"), "{stderr}");
    assert!(stderr.contains("= hint: expected one of: tumbling"), "{stderr}");
    // The design rules are valid (their stream does not exist yet: a warning, not an error).
    let design = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests/design.rules");
    let out = ferrite(&[
        "rules",
        "check",
        design.to_str().context("path")?,
        "--data-dir",
        tmp.path().to_str().context("p")?,
    ])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Regression: with no stream in the catalog, `rules check` said "syntax ok" for SQL that
/// does not parse.
#[test]
fn rules_check_finds_sql_errors_without_any_stream() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("bad.rules");
    std::fs::write(&file, "rule r {\n    from telemetry[temperature >]\n    insert into o\n}\n")?;
    let out =
        ferrite(&["rules", "check", file.to_str().context("path")?, "--data-dir", tmp.path().to_str().context("p")?])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("invalid SQL in the filter"), "{stderr}");
    assert!(stderr.contains("bad.rules:2:"), "{stderr}");
    Ok(())
}

/// Regression: the API refused a rule over a stream nobody had written yet, while the same
/// file in the rules directory waited for it.
#[test]
fn a_posted_rule_waits_for_its_stream() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let s = Server::start(data.path(), &[])?;
    let rule = "rule later { from sensors[level > 5] select device_id, level insert into high_levels }";
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule.as_bytes())?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["waiting"], json!(["later"]), "{body}");
    let (_, listing) = s.get("/api/v1/rules")?;
    assert!(listing.contains("\"waiting\""), "{listing}");
    s.post_json("/api/v1/streams/sensors/events", &json!([{"device_id": "d1", "level": 1.0}]))?;
    s.wait_for("the rule to deploy", |s| Ok(s.get("/api/v1/rules/later")?.0 == 200))?;
    s.post_json("/api/v1/streams/sensors/events", &json!([{"device_id": "d1", "level": 9.0}]))?;
    s.wait_for("the derived row", |s| {
        Ok(s.sql("SELECT count(*) AS n FROM high_levels").is_ok_and(|r| r == vec![json!({"n": 1})]))
    })?;
    Ok(())
}

fn rules_state(s: &Server) -> anyhow::Result<Value> {
    let (status, body) = s.get("/api/v1/rules")?;
    if status != 200 {
        bail!("GET /api/v1/rules answered {status}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

fn file_status(s: &Server) -> anyhow::Result<String> {
    Ok(rules_state(s)?["files"][0]["status"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_server_runs_rules_from_files_and_the_api() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let rules_dir = tempfile::tempdir()?;
    let file = rules_dir.path().join("site.rules");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests/design.rules"), &file)?;
    let s = Server::start(data.path(), &["--rules-dir", rules_dir.path().to_str().context("path")?])?;
    // `telemetry` does not exist yet: the file waits for it.
    assert_eq!(file_status(&s)?, "waiting");
    let post = |events: Vec<Value>| -> anyhow::Result<()> {
        let (status, body) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events))?;
        if status / 100 != 2 {
            bail!("ingest answered {status}: {body}");
        }
        Ok(())
    };
    post(vec![json!({"device_id": "d1", "ts": "2025-12-31T23:59:00Z", "temperature": 20.0, "door": "closed"})])?;
    s.wait_for("the rule file to deploy", |s| Ok(file_status(s)? == "deployed"))?;
    // Commands reach registered devices only (their type's limits apply).
    let (status, body) = s.post_json("/api/v1/devices", &json!({"id": "d1", "type": "fridge"}))?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s.put_json(
        "/api/v1/device-types/fridge",
        &json!({"commands": {"close_door": {"params": {"after_secs": {"type": "integer", "min": 0, "max": 600}}}}}),
    )?;
    assert_eq!(status, 200, "{body}");

    runtime()?.block_on(async {
        let (device, mut ev) = client(&s, "d1");
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        device.subscribe("devices/d1/commands", QoS::AtLeastOnce).await?;
        until(&mut ev, |p| matches!(p, Packet::SubAck(_))).await?;
        post(vec![
            json!({"device_id": "d1", "ts": "2026-01-01T00:00:10Z", "temperature": 85.0, "door": "open"}),
            json!({"device_id": "d1", "ts": "2026-01-01T00:00:20Z", "temperature": 91.0}),
            json!({"device_id": "d1", "ts": "2026-01-01T00:00:40Z", "temperature": 95.0}),
            json!({"device_id": "d1", "ts": "2026-01-01T00:01:10Z", "temperature": 20.0}),
        ])?;
        let got = until(&mut ev, |p| matches!(p, Packet::Publish(_))).await?;
        let Packet::Publish(p) = got else { bail!("not a publish") };
        let cmd: Value = serde_json::from_slice(&p.payload)?;
        assert_eq!(cmd["name"], "close_door");
        assert!(cmd["id"].is_string(), "{cmd}");
        anyhow::Ok(())
    })?;
    // The alert and the derived stream are streams like any other. (The command is sent
    // while the shard is still committing the alert: wait for it.)
    s.wait_for("the alert", |s| Ok(s.rows("alerts")?.0 >= 1))?;
    let alerts = s.sql("SELECT rule, device_id, message, state FROM alerts WHERE rule = 'door_left_open'")?;
    assert_eq!(
        alerts,
        vec![json!({"rule": "door_left_open", "device_id": "d1", "message": "door open on d1", "state": "raised"})]
    );
    let hot = s.sql("SELECT device_id, round(avg_temp, 2) AS avg_temp, n, time FROM hot_devices")?;
    assert_eq!(hot, vec![json!({"device_id": "d1", "avg_temp": 90.33, "n": 3, "time": "2026-01-01T00:01:00Z"})]);
    // The first event came before the rules were deployed: they saw the other four.
    let info: Value = serde_json::from_str(&s.get("/api/v1/rules/hot_devices")?.1)?;
    assert_eq!(info["events_in"], 4, "{info}");
    assert_eq!(info["matches"], 1, "{info}");
    assert_eq!(s.metric("ferrite_rule_events_in_total{rule=\"hot_devices\"}")?, 4);
    // Rule state is inspectable by SQL: d1's open minute, its pending silence check, its clock.
    let state = s.sql("SELECT rule, kind, device_id, detail, start, \"end\" FROM system.rule_state ORDER BY rule")?;
    assert_eq!(
        state,
        vec![
            json!({"rule": "hot_devices", "kind": "window", "device_id": "d1", "detail": "d1",
                   "start": "2026-01-01T00:01:00Z", "end": "2026-01-01T00:02:00Z"}),
            json!({"rule": "silent_device", "kind": "partial_match", "device_id": "d1", "detail": "at step 2 of 2",
                   "start": "2026-01-01T00:01:10Z", "end": null}),
        ]
    );
    let marks = s.sql("SELECT newest_event, watermark FROM system.watermarks WHERE rule = 'hot_devices'")?;
    assert_eq!(marks, vec![json!({"newest_event": "2026-01-01T00:01:10Z", "watermark": "2026-01-01T00:01:10Z"})]);

    // A broken edit is refused; the running version keeps running.
    std::fs::write(&file, "rule hot_devices {\n  from telemetry\n  window tumbling 1x by device_id\n}\n")?;
    s.wait_for("the broken file to be refused", |s| Ok(file_status(s)? == "failed"))?;
    let state = rules_state(&s)?;
    assert!(state["files"][0]["error"].as_str().unwrap_or_default().contains("site.rules:3:"), "{state}");
    assert_eq!(state["rules"].as_array().map(Vec::len), Some(3), "{state}");
    // A fixed edit replaces the file's rules.
    std::fs::write(&file, "rule cold { from telemetry[temperature < 0] insert into cold }\n")?;
    s.wait_for("the edited file to deploy", |s| {
        let st = rules_state(s)?;
        Ok(st["rules"].as_array().map(|r| r.len()) == Some(1) && st["rules"][0]["name"] == "cold")
    })?;

    // The API: deploy, errors with positions, get, delete.
    let (status, body) =
        s.post("/api/v1/rules", "text/plain", b"rule hot2 {\n  from telemetry[nope > 1]\n  insert into x\n}")?;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_rule");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("request:2:18"), "{body}");
    let (status, body) =
        s.post("/api/v1/rules", "text/plain", b"rule warm { from telemetry[temperature > 30] insert into warm }")?;
    assert_eq!((status, body), (201, json!({"deployed": ["warm"]})));
    post(vec![json!({"device_id": "d2", "ts": "2026-01-01T00:00:00Z", "temperature": 31.0})])?;
    s.wait_for("the API rule's output", |s| Ok(s.sql_count("SELECT count(*) FROM warm")? == 1))?;
    // A shadow version beside it: compared, not committed, then promoted.
    let (status, body) = s.post(
        "/api/v1/rules?shadow=true",
        "text/plain",
        b"rule warm { from telemetry[temperature > 35] insert into warm }",
    )?;
    assert_eq!((status, body), (201, json!({"shadowed": ["warm"]})));
    post(vec![json!({"device_id": "d2", "ts": "2026-01-01T00:00:01Z", "temperature": 32.0})])?;
    s.wait_for("the live rule's second row", |s| Ok(s.sql_count("SELECT count(*) FROM warm")? == 2))?;
    let report: Value = serde_json::from_str(&s.get("/api/v1/rules/warm/shadow")?.1)?;
    assert_eq!((&report["live_rows"], &report["shadow_rows"]), (&json!(1), &json!(0)), "{report}");
    assert_eq!(report["only_live"][0]["temperature"], json!(32.0), "{report}");
    let (status, _) = s.post("/api/v1/rules/warm/shadow/promote", "text/plain", b"")?;
    assert_eq!(status, 200);
    assert!(
        serde_json::from_str::<Value>(&s.get("/api/v1/rules/warm")?.1)?["text"].as_str().unwrap_or("").contains("> 35")
    );
    assert_eq!(s.get("/api/v1/rules/warm/shadow")?.0, 404);
    assert_eq!(s.delete("/api/v1/rules/warm")?, 204);
    assert_eq!(s.get("/api/v1/rules/warm")?.0, 404);
    assert_eq!(s.delete("/api/v1/rules/warm")?, 404);
    s.stop()?;
    Ok(())
}

#[test]
fn replay_runs_rules_over_history_and_writes_back() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let s = Server::start(data.path(), &["--persist-interval", "100ms"])?;
    // A month-old hour of history for two devices: d1 overheats in its second minute.
    let mut events = Vec::new();
    for (minute, temps) in [(0, [70.0, 75.0]), (1, [85.0, 95.0]), (2, [60.0, 60.0])] {
        for (i, t) in temps.iter().enumerate() {
            events.push(json!({"device_id": "d1", "ts": format!("2026-10-01T10:0{minute}:{:02}Z", 10 + i * 20), "temperature": t}));
            events.push(json!({"device_id": "d2", "ts": format!("2026-10-01T10:0{minute}:{:02}Z", 15 + i * 20), "temperature": 20.0}));
        }
    }
    events.push(json!({"device_id": "d2", "ts": "2026-10-01T10:00:00Z", "temperature": 20.0, "door": "closed"}));
    let (status, body) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events))?;
    assert_eq!(status / 100, 2, "{body}");
    // Once archived: replay reads the archive (and the hot buffer) through SQL.
    s.wait_for("a persist", |s| Ok(s.rows("telemetry")?.1 > 0))?;
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests/design.rules");
    let url = format!("http://{}", s.http);
    let args = [
        "rules",
        "replay",
        rules.to_str().context("path")?,
        "--from",
        "2026-10-01T00:00:00Z",
        "--to",
        "2026-10-02T00:00:00Z",
        "--server",
        &url,
        "--token",
        &s.token,
    ];
    let out = ferrite(&args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = stdout.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let hot: Vec<&Value> = rows.iter().filter(|r| r["stream"] == "hot_devices").collect();
    assert_eq!(hot.len(), 1, "{rows:?}");
    assert_eq!(
        (&hot[0]["device_id"], &hot[0]["avg_temp"], &hot[0]["time"]),
        (&json!("d1"), &json!(90.0), &json!("2026-10-01T10:02:00Z"))
    );
    // Both devices fall silent at the end of the history.
    let silent = rows.iter().filter(|r| r["stream"] == "alerts" && r["rule"] == "silent_device").count();
    assert_eq!(silent, 2, "{rows:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("100.0%"));

    let mut with_write = args.to_vec();
    with_write.extend(["--write-prefix", "replay_"]);
    let out = ferrite(&with_write)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.sql_count("SELECT count(*) FROM replay_hot_devices")?, 1);
    assert_eq!(s.sql_count("SELECT count(*) FROM replay_alerts WHERE rule = 'silent_device'")?, 2);
    s.stop()?;
    Ok(())
}

#[test]
fn rules_as_data_per_device_limits_loaded_from_the_stream() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let s = Server::start(data.path(), &[])?;
    let post = |stream: &str, events: Value| -> anyhow::Result<()> {
        let (status, body) = s.post_json(&format!("/api/v1/streams/{stream}/events"), &events)?;
        if status / 100 != 2 {
            bail!("ingest answered {status}: {body}");
        }
        Ok(())
    };
    // Limits exist before the rule: deploying it reads them through SQL.
    post("rule_params", json!([{"device_id": "d1", "max_temp": 30.0}, {"device_id": "d2", "max_temp": 50.0}]))?;
    post("telemetry", json!([{"device_id": "d0", "temperature": 1.0}]))?;
    let rule = b"rule over {\n  from telemetry[temperature > rule_params.max_temp]\n  join rule_params on rule_params.device_id = device_id\n  select device_id, temperature, rule_params.max_temp as max_t\n  insert into over_limit\n}";
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule)?;
    assert_eq!(status, 201, "{body}");
    post("telemetry", json!([{"device_id": "d1", "temperature": 40.0}, {"device_id": "d2", "temperature": 40.0}]))?;
    s.wait_for("d1 over its limit", |s| Ok(s.sql_count("SELECT count(*) FROM over_limit")? == 1))?;
    // A new limit is an event like any other; the rule uses it from then on.
    post("rule_params", json!([{"device_id": "d2", "max_temp": 35.0}]))?;
    post("telemetry", json!([{"device_id": "d2", "temperature": 40.0}]))?;
    s.wait_for("d2 over its new limit", |s| {
        Ok(s.sql_count("SELECT count(*) FROM over_limit WHERE device_id = 'd2'")? == 1)
    })?;
    let rows = s.sql("SELECT device_id, max_t FROM over_limit ORDER BY device_id")?;
    assert_eq!(rows, vec![json!({"device_id": "d1", "max_t": 30.0}), json!({"device_id": "d2", "max_t": 35.0})]);
    s.stop()?;
    Ok(())
}

/// Accepts one HTTP request on an ephemeral port and hands over its path and body.
fn one_request_server() -> anyhow::Result<(std::net::SocketAddr, std::sync::mpsc::Receiver<(String, String)>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let (stream, _) = listener.accept()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let mut stream = stream;
        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
        let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let _ = tx.send((path, String::from_utf8_lossy(&body).into_owned()));
        Ok(())
    });
    Ok((addr, rx))
}

#[test]
fn a_webhook_action_posts_the_row() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let (hook, received) = one_request_server()?;
    let s = Server::start(data.path(), &["--webhook-allow-hosts", &format!("hooks.example.com,{hook}")])?;
    let (status, body) =
        s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "d0", "temperature": 1.0}]))?;
    assert_eq!(status / 100, 2, "{body}");
    // A host that is not listed is refused at deploy, naming the setting.
    let other = "rule leak { from telemetry select device_id then webhook 'http://127.0.0.2:9/x' {} }";
    let (status, body) = s.post("/api/v1/rules", "text/plain", other.as_bytes())?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("webhook_allow_hosts"), "{body}");
    let rule = format!(
        "rule hook {{ from telemetry[temperature > 100] select device_id, temperature then webhook 'http://{hook}/hooks/{{device_id}}' {{\"hot\": \"{{temperature}}\"}} }}"
    );
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule.as_bytes())?;
    assert_eq!(status, 201, "{body}");
    s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "boiler-1", "temperature": 120.0}]))?;
    let (path, body) = received.recv_timeout(crate::harness::TIMEOUT)?;
    assert_eq!(path, "/hooks/boiler-1");
    assert_eq!(serde_json::from_str::<Value>(&body)?, json!({"hot": 120.0}));
    s.wait_for("the webhook counter", |s| Ok(s.metric("ferrite_webhooks_total{outcome=\"ok\"}")? == 1))?;
    s.stop()?;
    Ok(())
}

#[test]
fn rules_read_table_files_only_under_the_table_directory() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let rules_dir = tempfile::tempdir()?;
    std::fs::write(rules_dir.path().join("limits.csv"), "device_id,max_t\nd1,30\n")?;
    let outside = data.path().join("secret.csv");
    std::fs::write(&outside, "device_id,max_t\nd1,30\n")?;
    let s = Server::start(data.path(), &["--rules-dir", &rules_dir.path().display().to_string()])?;
    s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "d1", "temperature": 1.0}]))?;
    let rule = |path: &str| {
        format!(
            "table limits from '{path}'\nrule over {{ from telemetry join limits on limits.device_id = device_id select device_id, limits.max_t as m insert into over }}"
        )
    };
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule(&outside.display().to_string()).as_bytes())?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("rules_table_dir"), "{body}");
    let traversal = format!("../{}", outside.display());
    let (status, _) = s.post("/api/v1/rules", "text/plain", rule(&traversal).as_bytes())?;
    assert_eq!(status, 400);
    // A file in the rules directory (relative paths start there for the API) is fine.
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule("limits.csv").as_bytes())?;
    assert_eq!(status, 201, "{body}");
    Ok(())
}

#[test]
fn explain_says_where_a_rule_stopped_for_a_device() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let s = Server::start(data.path(), &[])?;
    // The door opens at 10:00 and the temperature rises 11 minutes later: too late.
    let events = json!([
        {"device_id": "d1", "ts": "2026-10-01T10:00:00Z", "door": "open", "temperature": 20.0},
        {"device_id": "d1", "ts": "2026-10-01T10:05:00Z", "temperature": 22.0},
        {"device_id": "d1", "ts": "2026-10-01T10:11:00Z", "temperature": 90.0},
        {"device_id": "d2", "ts": "2026-10-01T10:00:00Z", "door": "open", "temperature": 20.0},
    ]);
    assert_eq!(s.post_json("/api/v1/streams/telemetry/events", &events)?.0 / 100, 2);
    let design = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests/design.rules"))?;
    assert_eq!(s.post("/api/v1/rules", "text/plain", &design)?.0, 201);
    let url = format!("http://{}", s.http);
    let explain = |rule: &str| -> anyhow::Result<String> {
        let out = ferrite(&[
            "rules",
            "explain",
            rule,
            "--device",
            "d1",
            "--from",
            "2026-10-01T00:00:00Z",
            "--to",
            "2026-10-02T00:00:00Z",
            "--server",
            &url,
            "--token",
            &s.token,
        ])?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(stdout)
    };
    let door = explain("door_left_open")?;
    assert!(door.contains("3 events of `telemetry`"), "{door}");
    assert!(door.contains("steps 1..1 (… a = telemetry[door = 'open']): 1 matches"), "{door}");
    assert!(door.contains("0 matches"), "{door}");
    assert!(door.contains("the pattern stops at step 2 (a match must complete within 600s)"), "{door}");
    assert!(door.contains("the rule did not fire"), "{door}");
    let hot = explain("hot_devices")?;
    assert!(hot.contains("filter `temperature is not null`: 3 of 3 events pass"), "{hot}");
    assert!(hot.contains("\"avg_temp\":90.0") && hot.contains("(having `avg_temp > 80`: true)"), "{hot}");
    assert!(hot.contains("(having `avg_temp > 80`: false)"), "{hot}");
    assert!(hot.contains("the rule fired 1 times"), "{hot}");
    s.stop()?;
    Ok(())
}

#[test]
fn a_restart_keeps_open_windows_and_partial_matches() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let rules_dir = tempfile::tempdir()?;
    std::fs::write(
        rules_dir.path().join("state.rules"),
        "stream telemetry { field v float  field door string }
rule sums {
    from telemetry[v is not null]
    window tumbling 10m by device_id
    select device_id, count(*) as n, sum(v) as total
    insert into sums
}
rule opened_then_hot {
    from every a = telemetry[door = 'open'] -> b = telemetry[v > 50] within 1h
    select a.device_id, b.v as hot
    insert into opened_hot
}
",
    )?;
    let flags = ["--rules-dir", rules_dir.path().to_str().context("path")?];
    let post = |s: &Server, events: Vec<Value>| -> anyhow::Result<()> {
        let (status, body) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events))?;
        anyhow::ensure!(status == 200, "ingest answered {status}: {body}");
        Ok(())
    };
    let at = |minute: i64| 1_767_225_600_000i64 + minute * 60_000;
    let s = Server::start(data.path(), &flags)?;
    // Five events of the first window, and the first step of the pattern.
    post(&s, (0..5).map(|m| json!({"device_id": "r1", "ts": at(m), "v": 1.0})).collect())?;
    post(&s, vec![json!({"device_id": "r1", "ts": at(5), "door": "open"})])?;
    assert!(s.stop()?.success());

    let s = Server::start(data.path(), &flags)?;
    let open = s.sql_count("SELECT count(*) FROM system.rule_state WHERE device_id = 'r1'")?;
    assert_eq!(open, 2, "the open window and the partial match are back before any new event");
    post(&s, (6..12).map(|m| json!({"device_id": "r1", "ts": at(m), "v": 60.0})).collect())?;
    s.wait_for("the window to close", |s| Ok(s.sql_count("SELECT count(*) FROM sums")? == 1))?;
    let row = &s.sql("SELECT n, total FROM sums")?[0];
    // Minutes 0-4 before the restart, 6-9 after (minute 5 is the door, without `v`).
    assert_eq!((row["n"].as_i64(), row["total"].as_f64()), (Some(9), Some(5.0 + 4.0 * 60.0)), "{row}");
    s.wait_for("the pattern to complete", |s| Ok(s.sql_count("SELECT count(*) FROM opened_hot")? == 1))?;
    assert!(s.stop()?.success());
    Ok(())
}

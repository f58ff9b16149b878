//! The agent against the real server: cut connections, restarts while offline, a full
//! buffer, a damaged buffer, tokens that expire, and wipe.

mod common;

use common::{Agent, Proxy, Result, Server, fail, seqs};
use serde_json::json;

fn id_args<'a>(id: &'a str, secret: &'a str) -> Vec<&'a str> {
    vec!["--device-id", id, "--client-secret", secret]
}

/// Every seq from 1 to `n` exactly once, event times rising with seq.
fn exactly_once(rows: &[(i64, i64)], n: i64) -> Result<()> {
    let got: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let want: Vec<i64> = (1..=n).collect();
    if got != want {
        let dupes = got.windows(2).filter(|w| w[0] == w[1]).count();
        return fail(format!("{} rows, {dupes} repeated seqs; want each of 1..={n} once: {got:?}", got.len()));
    }
    if rows.windows(2).any(|w| w[1].1 < w[0].1) {
        return fail("event times do not rise with seq: the original times were not kept");
    }
    Ok(())
}

#[test]
fn a_cut_connection_delivers_every_reading_in_order_exactly_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let proxy = Proxy::start(server.mqtt)?;
    let secret = server.device("cut-1", json!({}))?;
    let mut args = id_args("cut-1", &secret);
    args.extend(["--interval", "20ms", "--qos", "2", "--readings", "150", "--batch", "5", "--backfill-rate", "50"]);
    let mut agent = Agent::start(&server, proxy.addr, &dir.path().join("agent"), &args)?;
    agent.wait("20 readings acknowledged", |s| s["counters"]["acknowledged"].as_u64() >= Some(20))?;
    proxy.cut();
    agent.wait("30 readings buffered offline", |s| s["connected"] == false && s["buffered"].as_u64() >= Some(30))?;
    proxy.restore();
    // It stops once its 150 readings are all acknowledged.
    assert_eq!(agent.exit()?, 0);
    let status = agent.status();
    assert!(status["counters"]["backfilled"].as_u64() >= Some(30), "{status}");
    assert!(status["counters"]["connects"].as_u64() >= Some(2), "{status}");
    exactly_once(&seqs(&server, "telemetry", "cut-1")?, 150)
}

#[test]
fn an_agent_restarted_while_offline_loses_nothing_from_its_buffer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let proxy = Proxy::start(server.mqtt)?;
    proxy.cut();
    let secret = server.device("restart-1", json!({}))?;
    let state = dir.path().join("agent");
    let mut args = id_args("restart-1", &secret);
    args.extend(["--interval", "10ms"]);
    let mut agent = Agent::start(&server, proxy.addr, &state, &args)?;
    agent.wait("40 readings buffered", |s| s["buffered"].as_u64() >= Some(40))?;
    agent.kill();
    let taken: i64 = std::fs::read_to_string(state.join("seq"))?.trim().parse()?;
    proxy.restore();
    // Started again with no new readings: it back-fills its buffer, then stops.
    let mut agent = Agent::start(&server, proxy.addr, &state, &["--readings", "0", "--backfill-rate", "100"])?;
    assert_eq!(agent.exit()?, 0);
    let rows = seqs(&server, "telemetry", "restart-1")?;
    let last = rows.last().map_or(0, |r| r.0);
    assert!(last >= 40 && last < taken, "the buffered readings arrived (last seq {last})");
    exactly_once(&rows, last)
}

#[test]
fn a_full_buffer_drops_the_oldest_and_reports_how_many() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let proxy = Proxy::start(server.mqtt)?;
    proxy.cut();
    let secret = server.device("full-1", json!({}))?;
    let mut args = id_args("full-1", &secret);
    args.extend(["--interval", "5ms", "--spool-bytes", "16384", "--readings", "400", "--backfill-rate", "200"]);
    let mut agent = Agent::start(&server, proxy.addr, &dir.path().join("agent"), &args)?;
    let s = agent.wait("400 readings taken", |s| s["counters"]["readings"].as_u64() == Some(400))?;
    let dropped = s["dropped_pending_report"].as_u64().unwrap_or(0) as i64;
    assert!(dropped > 0, "a 16 KiB buffer cannot hold 400 readings: {s}");
    proxy.restore();
    assert_eq!(agent.exit()?, 0);
    let reported =
        server.count("SELECT CAST(sum(buffer_dropped) AS BIGINT) FROM telemetry WHERE device_id = 'full-1'")?;
    assert_eq!(reported, dropped, "the drop count is reported on reconnect");
    let rows: Vec<(i64, i64)> = seqs(&server, "telemetry", "full-1")?.into_iter().filter(|r| r.0 <= 400).collect();
    // The oldest went: what arrived is the newest readings, each once, up to the last.
    assert_eq!(rows.len() as i64 + dropped, 400);
    let first = rows.first().map_or(0, |r| r.0);
    assert_eq!(first, dropped + 1, "the oldest readings were the ones dropped");
    let want: Vec<i64> = (first..=400).collect();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), want);
    Ok(())
}

#[test]
fn a_damaged_buffer_record_is_skipped_and_the_rest_delivered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let proxy = Proxy::start(server.mqtt)?;
    proxy.cut();
    let secret = server.device("torn-1", json!({}))?;
    let state = dir.path().join("agent");
    let mut args = id_args("torn-1", &secret);
    args.extend(["--interval", "5ms", "--readings", "50"]);
    let mut agent = Agent::start(&server, proxy.addr, &state, &args)?;
    agent.wait("50 readings buffered", |s| s["buffered"].as_u64() == Some(50))?;
    agent.kill();
    // A flipped byte in the 10th record's payload, and half a record torn off the end.
    let seg = std::fs::read_dir(state.join("spool"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .ok_or("no spool segment")?;
    let mut bytes = std::fs::read(&seg)?;
    let starts: Vec<usize> = bytes.windows(4).enumerate().filter(|(_, w)| *w == b"FRR1").map(|(i, _)| i).collect();
    assert_eq!(starts.len(), 50);
    bytes[starts[9] + 20 + 3] ^= 0x55;
    bytes.extend_from_within(starts[0]..starts[0] + 17);
    std::fs::write(&seg, &bytes)?;
    proxy.restore();
    let mut agent = Agent::start(&server, proxy.addr, &state, &["--readings", "0", "--backfill-rate", "100"])?;
    assert_eq!(agent.exit()?, 0);
    let got: Vec<i64> = seqs(&server, "telemetry", "torn-1")?.iter().map(|r| r.0).collect();
    let want: Vec<i64> = (1..=50).filter(|s| *s != 10).collect();
    assert_eq!(got, want, "only the damaged record is missing");
    Ok(())
}

#[test]
fn an_agent_stays_connected_across_several_token_lifetimes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Tokens of 12 s are refreshed 10 s before they expire: every 2 s.
    let server = Server::start(&dir.path().join("server"), &["--access-token-ttl", "12s"])?;
    let secret = server.device("tok-1", json!({}))?;
    let mut args = id_args("tok-1", &secret);
    args.extend(["--interval", "25ms", "--readings", "320"]);
    let mut agent = Agent::start(&server, server.mqtt, &dir.path().join("agent"), &args)?;
    assert_eq!(agent.exit()?, 0);
    let s = agent.status();
    assert!(s["counters"]["token_refreshes"].as_u64() >= Some(3), "{s}");
    assert!(s["counters"]["connects"].as_u64() >= Some(4), "reconnected with each new token: {s}");
    exactly_once(&seqs(&server, "telemetry", "tok-1")?, 320)
}

#[test]
fn wipe_erases_every_credential_and_stops_the_agent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let secret = server.device("wipe-1", json!({}))?;
    let state = dir.path().join("agent");
    let mut args = id_args("wipe-1", &secret);
    args.extend(["--interval", "50ms"]);
    let mut agent = Agent::start(&server, server.mqtt, &state, &args)?;
    agent.wait("connected", |s| s["connected"] == true && s["counters"]["acknowledged"].as_u64() >= Some(1))?;
    let (status, c) = server.call("POST", "/api/v1/devices/wipe-1/commands", Some(&json!({"name": "wipe"})))?;
    assert_eq!(status, 202, "{c}");
    assert_eq!(agent.exit()?, 0);
    let command = c["id"].as_str().ok_or("no command id")?.to_owned();
    server.wait_for("the wipe answered", |s| {
        let (_, v) = s.call("GET", &format!("/api/v1/devices/wipe-1/commands/{command}"), None)?;
        Ok(v["status"] == "succeeded")
    })?;
    assert!(!state.join("credentials.json").exists());
    assert!(!state.join("spool").exists());
    // No file left holds the secret or a token.
    for entry in walk(&state) {
        let text = String::from_utf8_lossy(&std::fs::read(&entry)?).into_owned();
        assert!(!text.contains(&secret), "{} still holds the secret", entry.display());
        assert!(!text.contains("eyJ"), "{} still holds a token", entry.display());
    }
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_gateway_forwards_telemetry_and_commands_for_its_children() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let secret = server.device("gw-1", json!({"type": "gateway"}))?;
    server.device("child-1", json!({"parent": "gw-1"}))?;
    server.device("stranger", json!({}))?;
    let mut args = id_args("gw-1", &secret);
    args.extend(["--interval", "100ms", "--gateway-listen", "127.0.0.1:0"]);
    let agent = Agent::start(&server, server.mqtt, &dir.path().join("agent"), &args)?;
    let s = agent.wait("the gateway listening", |s| s["connected"] == true && s["gateway"].is_string())?;
    let addr = s["gateway"].as_str().ok_or("no gateway address")?.to_owned();

    let mut child = std::net::TcpStream::connect(&addr)?;
    child.set_read_timeout(Some(common::TIMEOUT))?;
    writeln!(child, r#"{{"hello": "child-1"}}"#)?;
    for i in 0..5 {
        writeln!(child, r#"{{"ts": {}, "level": {i}, "pump": "on"}}"#, 1_764_000_000_000i64 + i)?;
    }
    server.wait_for("the child's readings under its own id", |s| {
        Ok(s.count_or_zero("SELECT count(*) FROM telemetry WHERE device_id = 'child-1'") == 5)
    })?;
    agent.wait("the child subscribed", |s| s["children"].as_array().is_some_and(|c| !c.is_empty()))?;
    // A command to the child reaches its socket; its answer ends the command.
    let (status, c) = server.call("POST", "/api/v1/devices/child-1/commands", Some(&json!({"name": "locate"})))?;
    assert_eq!(status, 202, "{c}");
    let command = c["id"].as_str().ok_or("no command id")?.to_owned();
    let mut line = String::new();
    BufReader::new(child.try_clone()?).read_line(&mut line)?;
    let got: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(got["command"]["id"], command.as_str(), "{line}");
    writeln!(child, r#"{{"result": {{"id": "{command}", "status": "succeeded", "result": {{"lat": 1.5}}}}}}"#)?;
    server.wait_for("the child's answer", |s| {
        let (_, v) = s.call("GET", &format!("/api/v1/devices/child-1/commands/{command}"), None)?;
        Ok(v["status"] == "succeeded" && v["result"]["lat"] == 1.5)
    })?;
    // A device that is not its child: the platform refuses what the gateway publishes for it.
    let mut other = std::net::TcpStream::connect(&addr)?;
    writeln!(other, r#"{{"hello": "stranger"}}"#)?;
    writeln!(other, r#"{{"level": 1}}"#)?;
    writeln!(child, r#"{{"level": 99}}"#)?;
    server.wait_for("the child's later reading", |s| {
        Ok(s.count("SELECT count(*) FROM telemetry WHERE device_id = 'child-1' AND level = 99")? == 1)
    })?;
    assert_eq!(server.count("SELECT count(*) FROM telemetry WHERE device_id = 'stranger'")?, 0);
    Ok(())
}

/// Sends command `name` to `device` and waits for its answer; the command's final view.
fn command(server: &Server, device: &str, name: &str, params: serde_json::Value) -> Result<serde_json::Value> {
    let (status, c) = server.call(
        "POST",
        &format!("/api/v1/devices/{device}/commands"),
        Some(&json!({"name": name, "params": params})),
    )?;
    if status != 202 {
        return fail(format!("{name}: {status} {c}"));
    }
    let id = c["id"].as_str().ok_or("no command id")?.to_owned();
    let mut last = serde_json::Value::Null;
    server.wait_for(&format!("the answer to {name}"), |s| {
        let (_, v) = s.call("GET", &format!("/api/v1/devices/{device}/commands/{id}"), None)?;
        let done = v["status"] == "succeeded" || v["status"] == "failed";
        last = v;
        Ok(done)
    })?;
    Ok(last)
}

#[test]
fn management_commands_and_the_twin_are_applied_and_answered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let (s, t) = server.call("PUT", "/api/v1/device-types/sensor", Some(&json!({"commands": {"pump": {}}})))?;
    assert_eq!(s, 200, "{t}");
    let secret = server.device("mgmt-1", json!({}))?;
    let state = dir.path().join("agent");
    let mut args = id_args("mgmt-1", &secret);
    args.extend(["--interval", "50ms", "--location", "48.1,11.5", "--actuator", "pump:echo pumped"]);
    let agent = Agent::start(&server, server.mqtt, &state, &args)?;
    agent.wait("connected", |s| s["connected"] == true)?;

    // lock: telemetry stops (and the lock survives in settings.json); unlock: it resumes.
    assert_eq!(command(&server, "mgmt-1", "lock", json!({"message": "maintenance"}))?["status"], "succeeded");
    let locked_at = agent.wait("locked", |s| s["locked"] == true)?["counters"]["readings"].as_u64().unwrap_or(0);
    let refused = command(&server, "mgmt-1", "pump", json!({}))?;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert!(refused["result"]["error"].as_str().is_some_and(|e| e.contains("locked")), "{refused}");
    assert_eq!(agent.status()["counters"]["readings"].as_u64(), Some(locked_at), "no readings while locked");
    assert!(std::fs::read_to_string(state.join("settings.json"))?.contains("\"locked\": true"));
    assert_eq!(command(&server, "mgmt-1", "unlock", json!({}))?["status"], "succeeded");
    agent.wait("readings again", |s| s["counters"]["readings"].as_u64() > Some(locked_at + 3))?;
    let pumped = command(&server, "mgmt-1", "pump", json!({}))?;
    assert_eq!(pumped["result"]["output"], "pumped", "the actuator ran: {pumped}");

    // set_config: stored, applied, and reported in the twin.
    let c = command(&server, "mgmt-1", "set_config", json!({"config": {"interval_ms": 20, "site": "b7"}}))?;
    assert_eq!(c["result"]["applied"], json!(["interval_ms"]), "{c}");
    assert_eq!(c["result"]["stored"], json!(["site"]), "{c}");
    assert!(std::fs::read_to_string(state.join("settings.json"))?.contains("\"site\": \"b7\""));
    assert_eq!(command(&server, "mgmt-1", "enable_feature", json!({"feature": "eco"}))?["status"], "succeeded");
    server.wait_for("the reported twin", |s| {
        let (_, t) = s.call("GET", "/api/v1/devices/mgmt-1/twin", None)?;
        Ok(t["reported"]["config"]["site"] == "b7" && t["reported"]["features"] == json!(["eco"]))
    })?;
    // Desired state: what the agent knows is applied, the rest reported as rejected.
    let (s, t) = server.call(
        "PATCH",
        "/api/v1/devices/mgmt-1/twin",
        Some(&json!({"desired": {"batch": 10, "colour": "red"}})),
    )?;
    assert_eq!(s, 200, "{t}");
    server.wait_for("the desired state handled", |s| {
        let (_, t) = s.call("GET", "/api/v1/devices/mgmt-1/twin", None)?;
        Ok(t["reported"]["config"]["batch"] == 10 && t["reported"]["rejected"]["colour"].is_string())
    })?;
    // locate: answered with the position, which reaches the registry.
    let l = command(&server, "mgmt-1", "locate", json!({}))?;
    assert_eq!(l["result"]["lat"], 48.1, "{l}");
    server.wait_for("the location in the registry", |s| {
        let (_, d) = s.call("GET", "/api/v1/devices/mgmt-1", None)?;
        Ok(d["location"]["lat"] == 48.1)
    })?;

    // Credential rotation: the agent takes the new secret, the old one stops working.
    let (status, c) =
        server.call("POST", "/api/v1/devices/mgmt-1/credentials/rotate", Some(&json!({"deadline_secs": 600})))?;
    assert_eq!(status, 202, "{c}");
    let id = c["id"].as_str().ok_or("no id")?.to_owned();
    server.wait_for("the rotation confirmed", |s| {
        let (_, v) = s.call("GET", &format!("/api/v1/devices/mgmt-1/commands/{id}"), None)?;
        Ok(v["status"] == "succeeded")
    })?;
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("credentials.json"))?)?;
    assert_ne!(stored["client_secret"], secret.as_str(), "the new secret is stored");
    // The server commits the rotation (revokes the old secret) once the answer is in.
    server.wait_for("the old secret revoked", |s| {
        let old = ureq::post(&s.url("/oauth2/token")).config().http_status_as_error(false).build().send_form([
            ("grant_type", "client_credentials"),
            ("client_id", "mgmt-1"),
            ("client_secret", secret.as_str()),
        ])?;
        Ok(old.status().as_u16() == 401)
    })?;
    let before = agent.status()["counters"]["acknowledged"].as_u64().unwrap_or(0);
    agent
        .wait("still delivering after the rotation", |s| s["counters"]["acknowledged"].as_u64() > Some(before + 20))?;

    // reboot: the agent re-executes itself (its counters start again) and reconnects.
    let high = agent.status()["counters"]["readings"].as_u64().unwrap_or(0);
    assert_eq!(command(&server, "mgmt-1", "reboot", json!({"delay_secs": 0}))?["status"], "succeeded");
    agent.wait("restarted and connected", |s| {
        s["counters"]["readings"].as_u64().is_some_and(|r| r > 0 && r < high) && s["connected"] == true
    })?;
    Ok(())
}

#[test]
fn a_device_registers_itself_under_a_uuid_it_keeps_and_waits_for_approval() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let (status, p) = server.call("POST", "/api/v1/provisioning-secrets", Some(&json!({"type": "kiosk"})))?;
    assert_eq!(status, 201, "{p}");
    let provisioning = p["secret"].as_str().ok_or("no secret")?.to_owned();
    let state = dir.path().join("agent");
    let args = ["--provisioning-secret", provisioning.as_str(), "--interval", "50ms"];
    let mut agent = Agent::start(&server, server.mqtt, &state, &args)?;
    let s = agent.wait("registered", |s| s["device_id"].is_string())?;
    let id = s["device_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let (_, d) = server.call("GET", &format!("/api/v1/devices/{id}"), None)?;
    assert_eq!(d["status"], "pending", "{d}");
    // Restarted before approval: the same id, no second registration.
    agent.kill();
    let agent = Agent::start(&server, server.mqtt, &state, &args)?;
    agent.wait("the same id", |s| s["device_id"] == id.as_str())?;
    let (status, v) = server.call("POST", &format!("/api/v1/devices/{id}/approve"), None)?;
    assert_eq!(status, 200, "{v}");
    agent.wait("approved, connected and delivering", |s| {
        s["connected"] == true && s["counters"]["acknowledged"].as_u64() >= Some(5)
    })?;
    let (_, list) = server.call("GET", "/api/v1/devices", None)?;
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1), "registered once: {list}");
    Ok(())
}

#[test]
fn when_mqtt_stays_down_the_backlog_goes_over_http() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let proxy = Proxy::start(server.mqtt)?;
    proxy.cut();
    let secret = server.device("http-1", json!({}))?;
    let mut args = id_args("http-1", &secret);
    args.extend(["--interval", "10ms", "--readings", "100", "--http-fallback", "500ms"]);
    let mut agent = Agent::start(&server, proxy.addr, &dir.path().join("agent"), &args)?;
    assert_eq!(agent.exit()?, 0, "it delivered everything without MQTT");
    let s = agent.status();
    assert_eq!(s["counters"]["http_sent"], 100, "{s}");
    exactly_once(&seqs(&server, "telemetry", "http-1")?, 100)
}

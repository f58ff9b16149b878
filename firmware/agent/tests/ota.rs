//! Software updates end to end: `ferrite ota keygen|sign`, upload with signature checks,
//! campaigns in waves, the agent's download, verification, A/B install and rollback.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Agent, Result, Server, fail};
use serde_json::{Value, json};

/// A key pair and an artifact signed with it: (public key hex, artifact path, manifest).
fn signed_artifact(dir: &Path, version: &str, content: &[u8]) -> Result<(String, PathBuf, Value)> {
    let keys = dir.join("keys");
    let bin = common::server_bin()?;
    if !keys.join("ota.key").exists() {
        let out = Command::new(&bin).args(["ota", "keygen", "--out"]).arg(&keys).output()?;
        if !out.status.success() {
            return fail(format!("keygen: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    let file = dir.join(format!("firmware-{version}.bin"));
    std::fs::write(&file, content)?;
    let out = Command::new(&bin)
        .args(["ota", "sign"])
        .arg(&file)
        .arg("--key")
        .arg(keys.join("ota.key"))
        .args(["--version", version])
        .output()?;
    if !out.status.success() {
        return fail(format!("sign: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let manifest: Value = serde_json::from_slice(&std::fs::read(format!("{}.sig.json", file.display()))?)?;
    Ok((std::fs::read_to_string(keys.join("ota.pub"))?.trim().to_owned(), file, manifest))
}

/// Trusts the key and uploads the artifact; its id.
fn upload(server: &Server, key: &str, file: &Path, manifest: &Value, version: &str) -> Result<String> {
    let (status, v) = server.call("POST", "/api/v1/ota/keys", Some(&json!({"public_key": key, "name": "release"})))?;
    if status != 201 {
        return fail(format!("trust key: {status} {v}"));
    }
    let path = format!(
        "/api/v1/ota/artifacts?version={version}&device_type=sensor&signature={}&sha256={}",
        manifest["signature"].as_str().unwrap_or_default(),
        manifest["sha256"].as_str().unwrap_or_default()
    );
    let (status, v) = server.post_bytes(&path, &std::fs::read(file)?)?;
    if status != 201 {
        return fail(format!("upload: {status} {v}"));
    }
    Ok(v["id"].as_str().ok_or("no artifact id")?.to_owned())
}

fn campaign(server: &Server, body: Value) -> Result<String> {
    let (status, v) = server.call("POST", "/api/v1/ota/campaigns", Some(&body))?;
    if status != 202 {
        return fail(format!("campaign: {status} {v}"));
    }
    Ok(v["id"].as_str().ok_or("no campaign id")?.to_owned())
}

fn wait_campaign(server: &Server, id: &str) -> Result<Value> {
    let mut last = Value::Null;
    server.wait_for("the campaign to end", |s| {
        let (_, v) = s.call("GET", &format!("/api/v1/ota/campaigns/{id}"), None)?;
        let done = v["status"] != "running";
        last = v;
        Ok(done)
    })?;
    Ok(last)
}

fn agent_for(server: &Server, dir: &Path, id: &str, key: &str, health: &str) -> Result<Agent> {
    let secret = server.device(id, json!({}))?;
    let args = [
        "--device-id",
        id,
        "--client-secret",
        &secret,
        "--interval",
        "200ms",
        "--version",
        "1.0",
        "--ota-key",
        key,
        "--health-check",
        health,
    ];
    let agent = Agent::start(server, server.mqtt, &dir.join(id), &args)?;
    agent.wait("connected", |s| s["connected"] == true)?;
    Ok(agent)
}

#[test]
fn uploads_without_a_valid_signature_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let (key, file, manifest) = signed_artifact(dir.path(), "2.0", b"new firmware image")?;
    // No trusted key yet.
    let sig = manifest["signature"].as_str().unwrap_or_default();
    let (status, v) =
        server.post_bytes(&format!("/api/v1/ota/artifacts?version=2.0&device_type=sensor&signature={sig}"), b"x")?;
    assert_eq!(status, 422, "{v}");
    assert!(v.to_string().contains("trusts no OTA key"), "{v}");
    let id = upload(&server, &key, &file, &manifest, "2.0")?;
    // Unsigned.
    let (status, v) = server.post_bytes("/api/v1/ota/artifacts?version=2.1&device_type=sensor", b"other image")?;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("unsigned"), "{v}");
    // Another file under the first one's signature.
    let (status, v) = server.post_bytes(
        &format!("/api/v1/ota/artifacts?version=2.1&device_type=sensor&signature={sig}"),
        b"tampered image",
    )?;
    assert_eq!(status, 422, "{v}");
    assert!(v.to_string().contains("does not verify"), "{v}");
    // The good one is listed, and served with ranges.
    let (status, list) = server.call("GET", "/api/v1/ota/artifacts", None)?;
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(1)));
    let mut resp = ureq::get(&server.url(&format!("/api/v1/ota/artifacts/{id}/content")))
        .header("Authorization", &format!("Bearer {}", server.token))
        .header("Range", "bytes=4-11")
        .call()?;
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(resp.body_mut().read_to_string()?, "firmware");
    Ok(())
}

#[test]
fn an_update_installs_and_a_tampered_or_unhealthy_one_leaves_the_version() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let (key, file, manifest) = signed_artifact(dir.path(), "2.0", &vec![7u8; 300_000])?;
    let artifact = upload(&server, &key, &file, &manifest, "2.0")?;
    let good = agent_for(&server, dir.path(), "ota-good", &key, "true")?;
    let sick = agent_for(&server, dir.path(), "ota-sick", &key, "exit 3")?;

    let id = campaign(
        &server,
        json!({"artifact": artifact, "target": {"devices": ["ota-good", "ota-sick"]}, "max_failure_rate": 1.0}),
    )?;
    let view = wait_campaign(&server, &id)?;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["states"]["succeeded"], 1, "{view}");
    assert_eq!(view["states"]["rolled_back"], 1, "{view}");
    good.wait("the new version", |s| s["firmware"] == "2.0")?;
    // (its status may show 2.0 for a moment: it switched, then switched back)
    sick.wait("back on 1.0 after the failed health check", |s| s["firmware"] == "1.0")?;
    let (_, d) = server.call("GET", "/api/v1/devices/ota-good", None)?;
    assert_eq!(d["firmware"], "2.0", "the registry records the installed version");
    // Every step is a row of the `ota` stream.
    // (rows are appended as the states change; the last may land after the view moved)
    server.wait_for("every state of the rolled-back device in the ota stream", |s| {
        let states: Vec<String> = s
            .sql("SELECT state FROM ota WHERE device_id = 'ota-sick' ORDER BY time")?
            .iter()
            .filter_map(|r| r["state"].as_str().map(str::to_owned))
            .collect();
        Ok(["pending", "sent", "downloading", "verifying", "installing", "rolled_back"]
            .iter()
            .all(|want| states.iter().any(|x| x == want)))
    })?;

    // The stored artifact damaged after upload: the device refuses it and stays on 1.0.
    let (key2, file2, manifest2) = signed_artifact(dir.path(), "3.0", &vec![9u8; 1000])?;
    assert_eq!(key2, key);
    let artifact2 = upload(&server, &key, &file2, &manifest2, "3.0")?;
    let stored = server.data.join("archive/_artifacts/default").join(&artifact2);
    let mut bytes = std::fs::read(&stored)?;
    bytes[500] ^= 1;
    std::fs::write(&stored, bytes)?;
    let id = campaign(&server, json!({"artifact": artifact2, "target": {"devices": ["ota-sick"]}}))?;
    let view = wait_campaign(&server, &id)?;
    assert_eq!(view["states"]["failed"], 1, "{view}");
    sick.wait("still on 1.0", |s| s["firmware"] == "1.0")?;
    server.wait_for("the refusal's reason in the ota stream", |s| {
        let rows = s.sql(&format!("SELECT detail FROM ota WHERE campaign = '{id}' AND state = 'failed'"))?;
        Ok(rows.iter().any(|r| r["detail"].as_str().is_some_and(|d| d.contains("SHA-256"))))
    })?;
    Ok(())
}

#[test]
fn a_campaign_whose_second_wave_fails_stops_at_the_threshold() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let (key, file, manifest) = signed_artifact(dir.path(), "2.0", b"wave firmware")?;
    let artifact = upload(&server, &key, &file, &manifest, "2.0")?;
    // Rollout order is by id: w1 | w2 | w3, w4.
    let _a = agent_for(&server, dir.path(), "w1", &key, "true")?;
    let _b = agent_for(&server, dir.path(), "w2", &key, "false")?;
    let _c = agent_for(&server, dir.path(), "w3", &key, "true")?;
    let _d = agent_for(&server, dir.path(), "w4", &key, "true")?;
    for d in ["w1", "w2", "w3", "w4"] {
        let (s, v) = server.call("PATCH", &format!("/api/v1/devices/{d}"), Some(&json!({"groups": ["fleet"]})))?;
        assert_eq!(s, 200, "{v}");
    }
    let id = campaign(
        &server,
        json!({"artifact": artifact, "target": {"group": "fleet"},
               "waves": [{"percent": 25}, {"percent": 50, "delay_secs": 1}, {"percent": 100}],
               "max_failure_rate": 0.2}),
    )?;
    let view = wait_campaign(&server, &id)?;
    assert_eq!(view["status"], "stopped", "{view}");
    assert!(view["reason"].as_str().is_some_and(|r| r.contains("wave 2")), "{view}");
    assert_eq!(view["states"]["succeeded"], 1);
    assert_eq!(view["states"]["rolled_back"], 1);
    assert_eq!(view["states"]["pending"], 2, "the third wave never started: {view}");
    let (_, devices) = server.call("GET", &format!("/api/v1/ota/campaigns/{id}/devices"), None)?;
    let pending: Vec<&str> = devices
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["state"] == "pending")
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert_eq!(pending, ["w3", "w4"]);
    Ok(())
}

#[test]
fn a_semi_managed_device_gets_no_update() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let (key, file, manifest) = signed_artifact(dir.path(), "2.0", b"firmware")?;
    let artifact = upload(&server, &key, &file, &manifest, "2.0")?;
    server.device("semi-1", json!({"level": "semi"}))?;
    server.device("pump-1", json!({"type": "pump"}))?;
    // Only devices of the artifact's type take part; the others are counted as skipped.
    let (status, v) = server.call(
        "POST",
        "/api/v1/ota/campaigns",
        Some(&json!({"artifact": artifact, "target": {"devices": ["pump-1"]}})),
    )?;
    assert_eq!(status, 400, "{v}");
    let id = campaign(&server, json!({"artifact": artifact, "target": {"devices": ["semi-1", "pump-1", "ghost"]}}))?;
    let view = wait_campaign(&server, &id)?;
    assert_eq!(view["total"], 1, "{view}");
    assert_eq!(view["skipped"], json!({"other_type": 1, "unknown": 1}), "{view}");
    assert_eq!(view["states"]["failed"], 1, "{view}");
    server.wait_for("the refusal in the ota stream", |s| {
        let rows = s.sql("SELECT * FROM ota WHERE device_id = 'semi-1' AND state = 'failed'")?;
        Ok(rows.iter().any(|r| r["detail"].as_str().is_some_and(|d| d.contains("semi-managed"))))
    })?;
    Ok(())
}

#[test]
fn a_campaign_a_restart_interrupted_keeps_its_record_as_stopped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("server");
    let server = Server::start(&data, &[])?;
    let (key, file, manifest) = signed_artifact(dir.path(), "2.0", b"firmware")?;
    let artifact = upload(&server, &key, &file, &manifest, "2.0")?;
    // The device is offline: its install waits, and the campaign runs on.
    server.device("offline-1", json!({}))?;
    // (targeted by a query over the registry's table)
    let id = campaign(
        &server,
        json!({"artifact": artifact, "target": {"sql": "SELECT device_id FROM devices WHERE firmware <> '2.0'"}}),
    )?;
    server.wait_for("the install queued", |s| {
        let (_, v) = s.call("GET", &format!("/api/v1/ota/campaigns/{id}"), None)?;
        Ok(v["states"]["sent"] == 1)
    })?;
    drop(server);
    let server = Server::start(&data, &[])?;
    let (status, v) = server.call("GET", &format!("/api/v1/ota/campaigns/{id}"), None)?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "stopped", "{v}");
    assert!(v["reason"].as_str().is_some_and(|r| r.contains("restart")), "{v}");
    // The artifact is still there, bytes and all.
    let (status, list) = server.call("GET", "/api/v1/ota/artifacts", None)?;
    assert_eq!((status, list[0]["id"].as_str()), (200, Some(artifact.as_str())));
    Ok(())
}

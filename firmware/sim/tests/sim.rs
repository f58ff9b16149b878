//! The simulator against the real server: what it says was acknowledged is what SQL holds.

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::{Result, Server, fail};
use serde_json::Value;

fn sim(server: &Server, args: &[&str]) -> Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite-sim"))
        .args(["--http", &format!("http://{}", server.http), "--mqtt", &server.mqtt.to_string()])
        .arg("--token-file")
        .arg(server.data.join("admin.token"))
        .args(["--summary-json", "--progress", "0"])
        .args(args)
        .output()?;
    if !out.status.success() {
        return fail(format!("ferrite-sim failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn the_simulators_acknowledged_count_equals_the_rows_in_sql() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let s = sim(&server, &["--devices", "300", "--rate", "10/s", "--duration", "3s", "--malformed", "2%"])?;
    for k in ["devices", "sent", "acknowledged", "dropped", "stream"] {
        assert!(s.get(k).is_some(), "the summary has no `{k}`: {s}");
    }
    assert_eq!(s["devices"], 300);
    assert_eq!(s["stream"], "trucks");
    // Each device its own connection. (Not all 300 at once, nor a rate: beside the other
    // test on two cores, a debug server can be slow enough that one device connects as
    // another one's three seconds end.)
    assert_eq!(s["connects"], 300, "every device had its own connection: {s}");
    let acked = s["acknowledged"].as_i64().unwrap_or(0);
    assert!(acked >= 300, "each device got readings through: {s}");
    assert_eq!(s["sent"].as_i64(), Some(acked));
    assert_eq!(server.count("SELECT count(*) FROM trucks")?, acked);
    assert!(s["malformed"].as_i64() > Some(0), "{s}");
    let (_, metrics) = server.call("GET", "/metrics", None)?;
    let rejected: i64 = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("ferrite_rejected_events_total") && l.contains("transport=\"mqtt\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum();
    assert_eq!(Some(rejected), s["malformed"].as_i64(), "the server rejected and counted each malformed message");
    Ok(())
}

#[test]
fn under_faults_no_reading_is_lost() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), &[])?;
    let s = sim(
        &server,
        &[
            "--devices",
            "100",
            "--rate",
            "10/s",
            "--duration",
            "4s",
            "--profile",
            "sensors",
            "--prefix",
            "room",
            "--partition",
            "30%@1s+2s",
            "--disconnect-every",
            "2s",
            "--clock-skew",
            "3s",
            "--burst",
            "10@1s",
        ],
    )?;
    assert_eq!(s["stream"], "telemetry");
    assert_eq!(s["dropped"], 0, "{s}");
    assert_eq!(s["buffered"], 0, "everything buffered was delivered by the end: {s}");
    assert!(s["disconnects"].as_i64() > Some(100), "{s}");
    let readings = s["readings"].as_i64().unwrap_or(0);
    let distinct =
        server.count("SELECT count(DISTINCT concat(device_id, '/', CAST(seq AS VARCHAR))) FROM telemetry")?;
    assert_eq!(distinct, readings, "every reading arrived: {s}");
    // A message whose PUBACK a cut lost is sent again: rows can exceed acknowledgements.
    assert!(server.count("SELECT count(*) FROM telemetry")? >= s["acknowledged"].as_i64().unwrap_or(0));
    Ok(())
}

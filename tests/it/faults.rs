//! Faults on the write path, end to end: a persist that keeps failing neither duplicates
//! rows for outside readers nor grows memory without bound, and the server says so.

use serde_json::{Value, json};

use crate::harness::{Server, events};

fn python_has_duckdb() -> anyhow::Result<bool> {
    let probe = std::process::Command::new("python3").args(["-c", "import duckdb"]).output();
    if probe.map(|o| o.status.success()).unwrap_or(false) {
        return Ok(true);
    }
    if std::env::var_os("CI").is_some() {
        anyhow::bail!("duckdb must be installed in CI (.ci/run installs it)");
    }
    eprintln!("skipping: pip install duckdb to run this check");
    Ok(false)
}

fn healthz(s: &Server) -> anyhow::Result<(u16, Value)> {
    let (status, body) = s.get("/healthz")?;
    Ok((status, serde_json::from_str(&body)?))
}

#[test]
fn a_persist_failing_for_one_stream_leaves_no_duplicates_for_duckdb() -> anyhow::Result<()> {
    if !python_has_duckdb()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--persist-interval", "100ms"])?;
    // A file where stream `z`'s directory must go: every persist of `z` fails, after
    // stream `a` (persisted first) was uploaded.
    let tenant = dir.path().join("archive").join("default");
    std::fs::create_dir_all(&tenant)?;
    std::fs::write(tenant.join("z"), b"in the way")?;
    s.post_json("/api/v1/streams/a/events", &json!(events(0, 100, 5)))?;
    s.post_json("/api/v1/streams/z/events", &json!(events(0, 70, 5)))?;
    s.wait_for("three failed persists", |s| Ok(s.metric("ferrite_persist_failures_total")? >= 3))?;
    let (status, body) = healthz(&s)?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["reasons"][0]["component"], "persist", "{body}");

    std::fs::remove_file(tenant.join("z"))?;
    s.wait_for("a healthy server with everything persisted", |s| {
        Ok(healthz(s)?.0 == 200 && s.rows("a")? == (0, 100) && s.rows("z")? == (0, 70))
    })?;
    let script = r#"
import sys, duckdb
root = sys.argv[1]
con = duckdb.connect()
for stream, want in (("a", 100), ("z", 70)):
    n, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT seq) FROM read_parquet('{root}/{stream}/**/*.parquet', hive_partitioning=true)"
    ).fetchone()
    assert n == want and distinct == want, (stream, n, distinct)
print("no duplicates")
"#;
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(&tenant).output()?;
    assert!(
        out.status.success(),
        "duckdb check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn memory_is_bounded_while_persists_fail_and_ingest_resumes_after() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--persist-interval", "1h", "--hot-buffer-max", "64KiB"])?;
    // A file where the tenant's archive directory must go: every persist fails.
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive)?;
    std::fs::write(archive.join("default"), b"in the way")?;

    let mut accepted = 0u64;
    let mut refused = None;
    for round in 0..500 {
        let (status, retry_after, body) =
            s.post_json_raw("/api/v1/streams/telemetry/events", &json!(events(round * 500, 500, 20)))?;
        match status {
            200 => accepted += serde_json::from_str::<Value>(&body)?["accepted"].as_u64().unwrap_or(0),
            // Between the soft and hard bounds a growing share of requests is shed.
            503 if body.contains("\"busy\"") => continue,
            503 => {
                refused = Some((retry_after, body));
                break;
            }
            other => anyhow::bail!("unexpected status {other}: {body}"),
        }
    }
    let (retry_after, body) = refused.ok_or_else(|| anyhow::anyhow!("never refused: memory grows without bound"))?;
    assert!(retry_after.as_deref().is_some_and(|r| r.parse::<u64>().is_ok()), "503 with Retry-After: {retry_after:?}");
    assert!(body.contains("overloaded"), "{body}");
    let (status, health) = healthz(&s)?;
    assert_eq!(status, 503);
    let components: Vec<&str> =
        health["reasons"].as_array().into_iter().flatten().filter_map(|r| r["component"].as_str()).collect();
    assert!(components.contains(&"persist") && components.contains(&"ingest"), "{health}");

    std::fs::remove_file(archive.join("default"))?;
    s.wait_for("the overload to end", |s| Ok(healthz(s)?.0 == 200))?;
    let (status, body) = s.post_json("/api/v1/streams/telemetry/events", &json!(events(1_000_000, 10, 2)))?;
    assert_eq!(status, 200, "{body}");
    accepted += 10;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, accepted as i64, "nothing acknowledged was lost");
    Ok(())
}

/// Every bound on what a client can grow refuses with a clear error and a metric, and the
/// rest of the server goes on.
#[test]
fn bounds_on_what_clients_can_grow() -> anyhow::Result<()> {
    use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet, QoS, SubscribeReasonCode};

    use crate::mqtt::{client, runtime, until};

    let dir = tempfile::tempdir()?;
    // About bounds, not identity (the audit stream would take one of the two streams).
    let s = Server::start(
        dir.path(),
        &[
            "--auth",
            "off",
            "--max-streams",
            "2",
            "--max-fields-per-stream",
            "2",
            "--max-hours-per-request",
            "2",
            "--mqtt-max-connections-per-ip",
            "1",
            "--mqtt-max-subscriptions",
            "1",
        ],
    )?;
    let post = |stream: &str, body: Value| s.post_json(&format!("/api/v1/streams/{stream}/events"), &body);

    // Hours: one request spanning three event-time hours is refused whole.
    let (status, body) = post(
        "a",
        json!([{"device_id": "d", "ts": "2026-01-01T00:00:00Z", "v": 1},
               {"device_id": "d", "ts": "2026-01-01T01:00:00Z", "v": 1},
               {"device_id": "d", "ts": "2026-01-01T02:00:00Z", "v": 1}]),
    )?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "too_many_hours", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("max_hours_per_request"), "{body}");
    assert_eq!(s.metric("ferrite_rejected_events_total{transport=\"http\",reason=\"too_many_hours\"}")?, 3);

    // Fields: the event that would add a third field is rejected, the others are kept.
    let (status, body) = post("a", json!([{"device_id": "d", "v": 1, "w": 2}, {"device_id": "d", "v": 3, "x": 4}]))?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    assert_eq!(body["errors"][0]["code"], "too_many_fields", "{body}");

    // Streams: a third stream is refused.
    assert_eq!(post("b", json!({"device_id": "d", "v": 1}))?.0, 200);
    let (status, body) = post("c", json!({"device_id": "d", "v": 1}))?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("max_streams"), "{body}");

    runtime()?.block_on(async {
        // Subscriptions: the second filter of a session gets a failure code.
        let (c, mut ev) = client(&s, "subscriber");
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        c.subscribe("alerts/#", QoS::AtMostOnce).await?;
        c.subscribe("devices/+/commands", QoS::AtMostOnce).await?;
        let first = until(&mut ev, |p| matches!(p, Packet::SubAck(_))).await?;
        let second = until(&mut ev, |p| matches!(p, Packet::SubAck(_))).await?;
        assert!(
            matches!(first, Packet::SubAck(a) if a.return_codes == vec![SubscribeReasonCode::Success(QoS::AtMostOnce)])
        );
        assert!(matches!(second, Packet::SubAck(a) if a.return_codes == vec![SubscribeReasonCode::Failure]));

        // Connections: a second connection from the same address is refused at CONNECT.
        let (_c2, mut ev2) = client(&s, "second");
        let refused = tokio::time::timeout(crate::harness::TIMEOUT, async {
            loop {
                match ev2.poll().await {
                    Err(ConnectionError::ConnectionRefused(code)) => return Some(code),
                    Err(_) => return None,
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await?;
        assert_eq!(refused, Some(ConnectReturnCode::ServiceUnavailable));
        anyhow::Ok(())
    })?;
    assert_eq!(s.metric("ferrite_mqtt_refused_total{reason=\"subscriptions\"}")?, 1);
    assert_eq!(s.metric("ferrite_mqtt_refused_total{reason=\"connections_per_ip\"}")?, 1);
    assert_eq!(post("a", json!({"device_id": "d", "v": 5}))?.0, 200, "the server goes on");
    Ok(())
}

/// A tmpfs mounted for a test's life (unmounted, lazily, when dropped).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts `size` of tmpfs at `dir`; `None` where this process may not mount (not root,
    /// or a container without the capability).
    fn mount(dir: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self(dir.to_owned()))
    }

    /// Bytes free on it.
    fn available(&self) -> anyhow::Result<u64> {
        let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(&self.0).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).and_then(|l| l.trim().parse().ok()).ok_or_else(|| anyhow::anyhow!("df said {text:?}"))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_writes_with_503_loses_nothing_acknowledged_and_recovers_without_a_restart() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "16m") else {
        eprintln!("skipping: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return Ok(());
    };
    let flags = ["--auth", "off", "--shards", "1", "--persist-interval", "1h", "--compaction", "false"];
    let s = Server::start(&data, &flags)?;
    // Fill the disk but for 256 KiB.
    let filler = data.join("filler");
    let room = disk.available()?.saturating_sub(256 * 1024);
    std::fs::write(&filler, vec![0u8; usize::try_from(room)?])?;

    // Writes until the WAL cannot append: refused with 503 and Retry-After, not acknowledged.
    let (mut acked, mut refused) = (0usize, None);
    for i in 0..400 {
        let (status, retry, body) =
            s.post_json_raw("/api/v1/streams/telemetry/events", &json!(events(i * 200, 200, 7)))?;
        if status == 200 {
            acked += 1;
            continue;
        }
        refused = Some((status, retry, body));
        break;
    }
    let Some((status, retry, body)) = refused else { anyhow::bail!("the disk never filled") };
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "Retry-After on a full disk");
    assert!(body.contains("commit_failed") && body.contains("retry"), "{body}");
    assert!(acked > 0, "some writes fit before the disk filled");
    assert!(s.metric("ferrite_wal_failures_total")? >= 1);
    // Still full: still refused, and the server serves reads.
    let (status, _, _) = s.post_json_raw("/api/v1/streams/telemetry/events", &json!(events(90_000, 200, 7)))?;
    assert_eq!(status, 503);
    let want = (acked * 200) as i64;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, want, "every acknowledged event, nothing else");

    // Space comes back: writes resume without a restart.
    std::fs::remove_file(&filler)?;
    let (status, _, body) = s.post_json_raw("/api/v1/streams/telemetry/events", &json!(events(100_000, 200, 7)))?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, want + 200);
    // And a restart replays exactly what was acknowledged.
    s.kill()?;
    let s = Server::start(&data, &flags)?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, want + 200);
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, want + 200);
    drop(s);
    drop(disk);
    Ok(())
}

#[test]
fn a_damaged_archive_file_is_quarantined_on_start_and_everything_else_is_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let flags = ["--auth", "off", "--persist-interval", "100ms", "--compaction", "false"];
    let s = Server::start(dir.path(), &flags)?;
    // Three persists, three files.
    for (i, n) in [(0usize, 300usize), (300, 200), (500, 100)] {
        s.post_json("/api/v1/streams/telemetry/events", &json!(events(i, n, 5)))?;
        let want = (i + n) as u64;
        s.wait_for("the events archived", |s| Ok(s.rows("telemetry")? == (0, want)))?;
    }
    assert!(s.stop()?.success());
    let catalog: Value = serde_json::from_slice(&std::fs::read(dir.path().join("catalog/files.json"))?)?;
    let files = catalog["streams"]["telemetry"].as_array().cloned().unwrap_or_default();
    assert_eq!(files.len(), 3, "{catalog}");
    let root = dir.path().join("archive");
    let path_of = |f: &Value| root.join(f["path"].as_str().unwrap_or_default());
    // One file cut in half (a torn copy, a bad disk), one gone.
    let cut = path_of(&files[0]);
    let len = std::fs::metadata(&cut)?.len();
    std::fs::OpenOptions::new().write(true).open(&cut)?.set_len(len / 2)?;
    std::fs::remove_file(path_of(&files[1]))?;

    let s = Server::start(dir.path(), &flags)?;
    // The third file is served; the damaged ones are counted and named in the log.
    let kept = files[2]["rows"].as_i64().unwrap_or(-1);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, kept);
    assert_eq!(s.metric("ferrite_archive_quarantined_files_total{reason=\"size\"}")?, 1);
    assert_eq!(s.metric("ferrite_archive_quarantined_files_total{reason=\"missing\"}")?, 1);
    // Moved aside, never deleted, with what it should have been beside it.
    let aside = root.join("_quarantine").join(files[0]["path"].as_str().unwrap_or_default());
    assert_eq!(std::fs::metadata(&aside)?.len(), len / 2);
    let entry: Value = serde_json::from_slice(&std::fs::read(aside.with_extension("parquet.entry.json"))?)?;
    assert_eq!(entry["rows"], files[0]["rows"]);
    assert!(!cut.exists());
    // Ingest goes on, and the next start finds nothing more to quarantine.
    s.post_json("/api/v1/streams/telemetry/events", &json!(events(1000, 50, 5)))?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, kept + 50);
    assert!(s.stop()?.success());
    let s = Server::start(dir.path(), &flags)?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, kept + 50);
    assert_eq!(s.metric("ferrite_archive_quarantined_files_total{reason=\"size\"}")?, 0);
    Ok(())
}

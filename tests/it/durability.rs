//! Durability and consistency: the hot/archive boundary, graceful restart, kill -9.

use serde_json::json;

use crate::harness::{Server, events, parquet_files};

#[test]
fn query_across_the_hot_archive_boundary_sees_each_event_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--persist-interval", "100ms"])?;
    let ingest = |from: usize, n: usize| -> anyhow::Result<()> {
        let (st, b) = s.post_json("/api/v1/streams/telemetry/events", &json!(events(from, n, 10)))?;
        anyhow::ensure!(st == 200 && b["accepted"] == n, "ingest answered {st}: {b}");
        Ok(())
    };
    ingest(0, 500)?;
    s.wait_for("the first events to be archived", |s| Ok(s.rows("telemetry")? == (0, 500)))?;
    assert!(!parquet_files(&dir.path().join("archive")).is_empty());

    // Keep writing while persists run every 100 ms; every query must see every acknowledged
    // event exactly once, whichever side of the boundary it is on at that instant.
    let mut expected = 500;
    let mut saw_both = false;
    for round in 0..40 {
        ingest(expected, 50)?;
        expected += 50;
        let (hot, archived) = s.rows("telemetry")?;
        saw_both |= hot > 0 && archived > 0;
        let row =
            &s.sql("SELECT count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, max(seq) AS hi FROM telemetry")?[0];
        assert_eq!(row["n"], expected, "round {round}: {row}");
        assert_eq!(row["d"], expected, "round {round}: duplicates across the boundary: {row}");
        assert_eq!((row["lo"].as_f64(), row["hi"].as_f64()), (Some(0.0), Some(expected as f64 - 1.0)));
    }
    assert!(saw_both, "the test never caught rows on both sides of the boundary");
    s.wait_for("everything archived", |s| Ok(s.rows("telemetry")?.0 == 0))?;
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, expected as i64);
    Ok(())
}

#[test]
fn graceful_stop_persists_and_restart_keeps_everything() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/telemetry/events", &json!(events(0, 300, 7)))?;
    s.post_json("/api/v1/streams/power/events", &json!([{"device_id": "m", "watts": 5}]))?;
    assert_eq!(s.rows("telemetry")?, (300, 0), "nothing is archived before the persist interval");
    let status = s.stop()?;
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    // The hot buffer was persisted on the way out and the WAL is empty.
    assert!(!parquet_files(&dir.path().join("archive").join("default").join("telemetry")).is_empty());
    let wal_files: usize = std::fs::read_dir(dir.path().join("wal"))?
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(0))
        .sum();
    assert_eq!(wal_files, 0, "persisted WAL segments are deleted");

    let s = Server::start(dir.path(), &[])?;
    assert_eq!(s.rows("telemetry")?, (0, 300));
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, 300);
    assert_eq!(s.sql_count("SELECT count(*) FROM power")?, 1);
    // New data after the restart joins the old.
    s.post_json("/api/v1/streams/telemetry/events", &json!(events(300, 10, 7)))?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 310);
    Ok(())
}

#[test]
fn kill_9_after_2xx_loses_no_acknowledged_event() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--shards", "2"])?;
    let mut acked = 0;
    for i in 0..30 {
        let (st, b) = s.post_json("/api/v1/streams/telemetry/events", &json!(events(i * 100, 100, 13)))?;
        assert_eq!(st, 200, "{b}");
        acked += b["accepted"].as_u64().unwrap_or(0);
    }
    // SIGKILL right after the last 2xx: no persist, no flush, no clean-up.
    s.kill()?;
    assert!(parquet_files(&dir.path().join("archive")).is_empty(), "nothing was persisted before the kill");

    let s = Server::start(dir.path(), &["--shards", "2"])?;
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, acked as i64);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, acked as i64);
    // Killed again after a persist cycle: nothing is replayed twice.
    let status = s.stop()?;
    assert!(status.success());
    let s = Server::start(dir.path(), &["--shards", "1"])?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, acked as i64);
    s.kill()?;
    let s = Server::start(dir.path(), &["--shards", "3"])?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, acked as i64, "no duplicate after kill + restart");
    Ok(())
}

#[test]
fn mqtt_qos1_ack_survives_kill_9() -> anyhow::Result<()> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let mut opts = MqttOptions::new("k9", s.mqtt.ip().to_string(), s.mqtt.port());
    opts.set_credentials("admin", s.token.clone());
    let (client, mut conn) = Client::new(opts, 10);
    let mut acks = 0;
    for i in 0..25 {
        client.publish("devices/k9/telemetry", QoS::AtLeastOnce, false, format!(r#"{{"seq": {i}}}"#))?;
        for ev in conn.iter() {
            if let Event::Incoming(Packet::PubAck(_)) = ev? {
                acks += 1;
                break;
            }
        }
    }
    assert_eq!(acks, 25);
    s.kill()?;
    let s = Server::start(dir.path(), &[])?;
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry WHERE device_id = 'k9'")?, 25);
    Ok(())
}

#[test]
fn the_write_path_killed_at_each_step_keeps_every_acknowledged_event_once() -> anyhow::Result<()> {
    use std::os::unix::process::ExitStatusExt;
    // The WAL points die at the fourth group commit (three requests acknowledged before);
    // the persist points at the first persist with rows.
    for point in [
        "wal.mid_append@4",
        "wal.before_fsync@4",
        "persist.mid_upload",
        "persist.after_checkpoint",
        "persist.before_catalog",
        "persist.before_wal_removal",
    ] {
        let dir = tempfile::tempdir()?;
        let interval = if point.starts_with("persist") { "200ms" } else { "1h" };
        let flags = ["--auth", "off", "--shards", "1", "--persist-interval", interval, "--compaction", "false"];
        let s = Server::start_with_env(dir.path(), &flags, &[("FERRITE_KILL_AT", point.to_owned())])?;
        // Requests until one gets no answer (the one cut, or one after the kill); for the
        // persist points three, then the persist that follows dies.
        let mut acked = 0usize;
        for i in 0..20 {
            match s.post_json("/api/v1/streams/telemetry/events", &json!(events(i * 100, 100, 7))) {
                Ok((200, _)) => acked += 1,
                Ok((st, b)) => anyhow::bail!("{point}: answered {st}: {b}"),
                Err(_) => break,
            }
            if point.starts_with("persist") && acked == 3 {
                break;
            }
        }
        assert!(acked >= 1, "{point}: killed before any answer");
        let status = s.exited()?;
        assert_eq!(status.signal(), Some(9), "{point}: {status:?}");

        // Restarted (persisting often): every acknowledged event once; the cut request's
        // maybe, never twice.
        let restart = ["--auth", "off", "--shards", "1", "--persist-interval", "200ms"];
        let s = Server::start(dir.path(), &restart)?;
        let total = s.sql_count("SELECT count(*) FROM telemetry")?;
        assert_eq!(total, s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, "{point}: no duplicate");
        let want = (acked * 100) as i64;
        assert_eq!(s.sql_count(&format!("SELECT count(*) FROM telemetry WHERE seq < {want}"))?, want, "{point}");
        assert!(total <= want + 100, "{point}: {total} rows");
        // Nothing half-written is left in the archive, and the next persist and restart
        // keep the same rows.
        let root = dir.path().join("archive");
        s.wait_for("the hot buffer archived", |s| Ok(s.rows("telemetry")?.0 == 0))?;
        let temporary: Vec<_> = walk(&root).into_iter().filter(|p| p.to_string_lossy().ends_with(".tmp")).collect();
        assert!(temporary.is_empty(), "{point}: {temporary:?}");
        assert!(s.stop()?.success());
        let s = Server::start(dir.path(), &restart)?;
        assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, total, "{point}: after a clean restart");
        assert!(s.stop()?.success());
    }
    Ok(())
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

//! The archive over time in a running server: compaction, retention and erasing one
//! device's data, each checked through SQL, the files on disk and DuckDB.

use serde_json::{Value, json};

use crate::harness::{Server, events, parquet_files};

/// Flags that make maintenance run at once and often.
const FAST: [&str; 8] =
    ["--persist-interval", "100ms", "--compact-after", "0s", "--compaction-interval", "200ms", "--retired-grace", "0s"];

fn stream_info(s: &Server, stream: &str) -> anyhow::Result<Value> {
    let (_, body) = s.get("/api/v1/streams")?;
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["streams"].as_array().into_iter().flatten().find(|x| x["name"] == stream).cloned().unwrap_or(Value::Null))
}

/// Rows of `dir` (a stream's archive directory) as DuckDB counts them: `None` when DuckDB is
/// not installed outside CI.
fn duckdb_count(dir: &std::path::Path) -> anyhow::Result<Option<(i64, i64)>> {
    let probe = std::process::Command::new("python3").args(["-c", "import duckdb"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        anyhow::ensure!(std::env::var_os("CI").is_none(), "duckdb must be installed in CI (.ci/run installs it)");
        eprintln!("skipping the DuckDB check: pip install duckdb");
        return Ok(None);
    }
    let script = "import sys, duckdb\nprint(*duckdb.connect().execute(f\"SELECT count(*), count(DISTINCT seq) FROM \
                  read_parquet('{sys.argv[1]}/**/*.parquet', union_by_name=true)\").fetchone())";
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(dir).output()?;
    anyhow::ensure!(out.status.success(), "duckdb: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let mut n = text.split_whitespace().map(str::parse::<i64>);
    match (n.next(), n.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok(Some((a, b))),
        _ => anyhow::bail!("unexpected duckdb output {text:?}"),
    }
}

#[test]
fn a_running_server_compacts_an_hours_files_into_one_and_every_reader_sees_each_row_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Compaction waits until the persists are done: one file per persist first.
    let s = Server::start(dir.path(), &["--persist-interval", "100ms", "--compaction", "false"])?;
    for i in 0..5 {
        s.post_json("/api/v1/streams/telemetry/events", &json!(events(i * 200, 200, 7)))?;
        let want = (i as u64 + 1) * 200;
        s.wait_for("the batch to be archived", |s| Ok(s.rows("telemetry")?.1 == want))?;
    }
    // At least one file per batch: a persist that runs between the two shards' commits of
    // one request writes that request in two files.
    let files = stream_info(&s, "telemetry")?["archive"]["files"].as_u64().unwrap_or(0);
    assert!(files >= 5, "{files} files");
    assert!(s.stop()?.success());

    let s = Server::start(dir.path(), &FAST)?;
    s.wait_for("one file", |s| Ok(stream_info(s, "telemetry")?["archive"]["files"] == 1))?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 1000);
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, 1000);
    assert!(s.metric("ferrite_compacted_files_total")? >= 5);
    let root = dir.path().join("archive");
    s.wait_for("replaced files to go", |_| Ok(parquet_files(&root.join("_retired")).is_empty()))?;
    let on_disk = parquet_files(&root.join("default").join("telemetry"));
    assert_eq!(on_disk.len(), 1, "{on_disk:?}");
    if let Some(counts) = duckdb_count(&root.join("default").join("telemetry"))? {
        assert_eq!(counts, (1000, 1000), "DuckDB over the archive directory");
    }
    assert!(s.stop()?.success());
    Ok(())
}

#[test]
fn a_compaction_killed_at_any_step_leaves_every_row_once_after_a_restart() -> anyhow::Result<()> {
    use std::os::unix::process::ExitStatusExt;
    for point in ["rewrite.after_read", "rewrite.after_write", "rewrite.after_catalog", "rewrite.mid_retire"] {
        let dir = tempfile::tempdir()?;
        let s = Server::start(dir.path(), &["--persist-interval", "100ms", "--compaction", "false"])?;
        for i in 0..4 {
            s.post_json("/api/v1/streams/telemetry/events", &json!(events(i * 250, 250, 7)))?;
            let want = (i as u64 + 1) * 250;
            s.wait_for("the batch to be archived", |s| Ok(s.rows("telemetry")?.1 == want))?;
        }
        assert!(s.stop()?.success());

        // The compactor reaches the step and the process dies there, SIGKILLed.
        let status = Server::run_to_exit(dir.path(), &FAST, &[("FERRITE_KILL_AT", point.to_owned())])?;
        assert_eq!(status.signal(), Some(9), "{point}: {status:?}");

        // Whatever the step, a restart serves every row once, then the next pass finishes.
        let s = Server::start(dir.path(), &FAST)?;
        assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 1000, "{point}");
        assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, 1000, "{point}");
        s.wait_for("one file", |s| Ok(stream_info(s, "telemetry")?["archive"]["files"] == 1))?;
        assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 1000, "{point}");
        let root = dir.path().join("archive");
        s.wait_for("replaced files to go", |_| Ok(parquet_files(&root.join("_retired")).is_empty()))?;
        let on_disk = parquet_files(&root.join("default").join("telemetry"));
        assert_eq!(on_disk.len(), 1, "{point}: no orphan left beside the catalogued file: {on_disk:?}");
        assert!(s.stop()?.success());
    }
    Ok(())
}

#[test]
fn retention_hides_and_drops_old_hours_and_is_set_by_the_api_or_a_rule_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &FAST)?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let old: Vec<Value> =
        (0..50).map(|i| json!({"device_id": "d", "ts": now_ms - 5 * 3_600_000 + i, "seq": i, "v": 1.0})).collect();
    let new: Vec<Value> = (50..80).map(|i| json!({"device_id": "d", "ts": now_ms + i, "seq": i, "v": 1.0})).collect();
    s.post_json("/api/v1/streams/telemetry/events", &json!(old))?;
    s.post_json("/api/v1/streams/telemetry/events", &json!(new))?;
    s.wait_for("the rows to be archived", |s| Ok(s.rows("telemetry")?.1 == 80))?;
    assert_eq!(stream_info(&s, "telemetry")?["retention"], Value::Null);

    // Bad requests are refused with the reason; nothing changes.
    let put = |body: Value| s.send_json("PUT", "/api/v1/streams/telemetry/retention", None, &body);
    let (status, body) = put(json!({"retention": "30m"}))?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_retention")), "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("at least 1h")), "{body}");
    let (status, body) = put(json!({"retention": "ninety days"}))?;
    assert_eq!(status, 400, "{body}");
    let (status, _) = s.send_json("PUT", "/api/v1/streams/bad%20name/retention", None, &json!({"retention": "2h"}))?;
    assert_eq!(status, 400);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 80);

    let (status, body) = put(json!({"retention": "2h"}))?;
    assert_eq!((status, &body["retention"]), (200, &json!("2h")), "{body}");
    // Never answered past the horizon, at once; dropped from disk on the next pass.
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 30);
    s.wait_for("the old hour's file to go", |s| Ok(s.rows("telemetry")?.1 == 30))?;
    let root = dir.path().join("archive");
    s.wait_for("no retired files", |_| Ok(parquet_files(&root.join("_retired")).is_empty()))?;
    assert_eq!(parquet_files(&root.join("default").join("telemetry")).len(), 1);
    assert_eq!(s.sql_count("SELECT count(*) FROM audit WHERE event = 'stream_retention_set'")?, 1);

    // A rule file's stream declaration is the other way to set it.
    let (status, body) = s.post("/api/v1/rules", "text/plain", b"stream telemetry { retention 1d }")?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(stream_info(&s, "telemetry")?["retention"], "1d");
    let (status, body) = s.post("/api/v1/rules", "text/plain", b"stream telemetry { retention 10m }")?;
    assert_eq!(status, 400, "{body}");
    // Lifting it keeps rows for ever again; what was dropped stays dropped.
    let (status, _) = put(json!({"retention": null}))?;
    assert_eq!(status, 200);
    assert_eq!(stream_info(&s, "telemetry")?["retention"], Value::Null);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 30);
    assert!(s.stop()?.success());
    Ok(())
}

#[test]
fn decommission_with_purge_erases_the_devices_rows_and_a_data_subject_request_needs_no_registration()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--persist-interval", "200ms"])?;
    let (status, body) = s.post_json("/api/v1/devices", &json!({"id": "dev-1"}))?;
    assert_eq!(status, 201, "{body}");
    // dev-0..dev-4; part archived, part still in memory when the purge comes.
    s.post_json("/api/v1/streams/telemetry/events", &json!(events(0, 500, 5)))?;
    s.wait_for("the first rows to be archived", |s| Ok(s.rows("telemetry")?.1 == 500))?;
    s.post_json("/api/v1/streams/power/events", &json!(events(500, 100, 5)))?;
    s.post_json("/api/v1/streams/telemetry/events", &json!(events(600, 50, 5)))?;

    let (status, report) = s.delete_json("/api/v1/devices/dev-1?purge=true")?;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rows_deleted"], 100 + 20 + 10, "{report}");
    let mut streams: Vec<&str> = report["streams"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    streams.sort();
    assert_eq!(streams, vec!["power", "telemetry"]);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'dev-1'")?, 0);
    assert_eq!(s.sql_count("SELECT count(*) FROM power WHERE device_id = 'dev-1'")?, 0);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 550 - 110);
    assert_eq!(s.get("/api/v1/devices/dev-1")?.0, 404, "decommissioned");
    let last = "SELECT count(*) FROM last_values('telemetry') WHERE device_id = 'dev-1'";
    assert_eq!(s.sql_count(last)?, 0, "nor in the last-value cache");
    assert_eq!(s.sql_count("SELECT count(*) FROM last_values('telemetry')")?, 4);
    assert_eq!(
        s.sql_count("SELECT count(*) FROM audit WHERE event = 'device_data_purged' AND detail LIKE 'dev-1:%'")?,
        1
    );

    // A data-subject request for a device that was never registered; then one for nobody.
    let (status, report) = s.post_json("/api/v1/devices/dev-2/purge", &json!({}))?;
    assert_eq!((status, report["rows_deleted"].as_u64()), (200, Some(130)), "{report}");
    let (status, body) = s.post_json("/api/v1/devices/nobody/purge", &json!({}))?;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("no data")), "{body}");

    // What was purged stays purged across a restart (nothing comes back from the WAL), and
    // no archive file on disk still holds it once the replaced files are gone.
    assert!(s.stop()?.success());
    let s = Server::start(dir.path(), &[])?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id IN ('dev-1', 'dev-2')")?, 0);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 550 - 220);
    assert_eq!(s.sql_count("SELECT count(*) FROM last_values('telemetry')")?, 3, "dev-0, dev-3, dev-4");
    let files = parquet_files(&dir.path().join("archive"));
    assert!(files.iter().all(|f| !f.to_string_lossy().contains("_retired")), "{files:?}");
    assert!(s.stop()?.success());
    Ok(())
}

#[test]
fn json_integers_stay_integers_until_a_fraction_widens_the_field_for_every_reader() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--persist-interval", "100ms"])?;
    let post = |body: Value| s.post_json("/api/v1/streams/counts/events", &body);
    let (status, body) = post(json!([{"device_id": "a", "n": 1, "m": 7}, {"device_id": "b", "n": 2, "m": 8}]))?;
    assert_eq!(status, 200, "{body}");
    let types = "SELECT arrow_typeof(n) AS n, arrow_typeof(m) AS m FROM counts LIMIT 1";
    assert_eq!(s.sql(types)?[0], json!({"n": "Int64", "m": "Int64"}));
    s.wait_for("an Int64 file", |s| Ok(s.rows("counts")?.1 == 2))?;
    // A fraction over JSON, and a float over line protocol, widen their fields.
    let (status, body) = post(json!({"device_id": "c", "n": 0.5}))?;
    assert_eq!(status, 200, "{body}");
    let (status, _) = s.post("/api/v2/write", "text/plain", b"counts,device_id=d m=1.5")?;
    assert_eq!(status, 204);
    assert_eq!(s.sql(types)?[0], json!({"n": "Float64", "m": "Float64"}));
    let sums = "SELECT sum(n) AS n, sum(m) AS m FROM counts";
    assert_eq!(s.sql(sums)?[0], json!({"n": 3.5, "m": 16.5}));
    s.wait_for("a Float64 file", |s| Ok(s.rows("counts")?.1 == 4))?;
    assert_eq!(s.sql(sums)?[0], json!({"n": 3.5, "m": 16.5}), "an Int64 file and a Float64 file");
    let info = stream_info(&s, "counts")?;
    let n_type =
        info["columns"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "n")).map(|c| c["type"].clone());
    assert_eq!(n_type, Some(json!("float")));
    // A string is still refused, now against float.
    let (status, body) = post(json!({"device_id": "e", "n": "many"}))?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("field `n` is float, got string"), "{body}");
    assert!(s.stop()?.success());

    let s = Server::start(dir.path(), &[])?;
    assert_eq!(s.sql(types)?[0], json!({"n": "Float64", "m": "Float64"}), "after a restart");
    assert_eq!(s.sql(sums)?[0], json!({"n": 3.5, "m": 16.5}));
    assert!(s.stop()?.success());
    let root = dir.path().join("archive").join("default").join("counts");
    let probe = std::process::Command::new("python3").args(["-c", "import duckdb"]).output();
    if probe.map(|o| o.status.success()).unwrap_or(false) {
        let script = "import sys, duckdb\nprint(*duckdb.connect().execute(f\"SELECT sum(n), typeof(sum(n)) FROM \
                      read_parquet('{sys.argv[1]}/**/*.parquet', union_by_name=true)\").fetchone())";
        let out = std::process::Command::new("python3").arg("-c").arg(script).arg(&root).output()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout)?.trim(), "3.5 DOUBLE");
    } else {
        anyhow::ensure!(std::env::var_os("CI").is_none(), "duckdb must be installed in CI");
    }
    Ok(())
}

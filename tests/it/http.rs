//! HTTP ingest (JSON, NDJSON, line protocol), SQL, streams, metrics and bad input.

use serde_json::{Value, json};

use crate::harness::{Server, events};

#[test]
fn every_http_format_lands_in_sql() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;

    let (status, body) = s.post_json(
        "/api/v1/streams/telemetry/events",
        &json!({"device_id": "a", "temperature": 21.5, "door": "open"}),
    )?;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(1)), "{body}");

    let (status, body) = s.post_json(
        "/api/v1/streams/telemetry/events",
        &json!([{"device_id": "b", "temperature": 22, "ts": "2026-01-01T00:00:00Z"}, {"device_id": "c", "ts": 1767225600000i64}]),
    )?;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(2)), "{body}");

    let ndjson = "{\"device_id\":\"d\",\"temperature\":1}\n{\"device_id\":\"e\",\"temperature\":2}\n";
    let (status, body) = s.post("/api/v1/streams/telemetry/events", "application/x-ndjson", ndjson.as_bytes())?;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(2)), "{body}");

    let lp = "telemetry,device_id=f temperature=3.5,door=\"closed\" 1767225600000000000\n\
              cpu,host=server1 usage=0.5,cores=8i,bytes_in=18446744073709551615u\n";
    let (status, _) = s.post("/api/v2/write?bucket=x&precision=ns", "text/plain", lp.as_bytes())?;
    assert_eq!(status, 204);

    let rows = s.sql("SELECT device_id, temperature, door FROM telemetry ORDER BY device_id")?;
    let devices: Vec<&str> = rows.iter().filter_map(|r| r["device_id"].as_str()).collect();
    assert_eq!(devices, vec!["a", "b", "c", "d", "e", "f"]);
    assert_eq!(rows[5]["door"], "closed");
    assert_eq!(rows[1]["temperature"], 22.0);
    assert_eq!(s.sql("SELECT time FROM telemetry WHERE device_id = 'c'")?[0]["time"], "2026-01-01T00:00:00Z");
    assert_eq!(s.sql_count("SELECT cores FROM cpu WHERE device_id = 'server1'")?, 8);
    let types =
        s.sql("SELECT arrow_typeof(cores) AS i, arrow_typeof(bytes_in) AS u, CAST(bytes_in AS VARCHAR) AS v FROM cpu")?;
    assert_eq!(
        (&types[0]["i"], &types[0]["u"], &types[0]["v"]),
        (&json!("Int64"), &json!("UInt64"), &json!("18446744073709551615"))
    );

    // The DESIGN's example query, with a time predicate relative to now().
    let recent = s.sql(
        "SELECT device_id, avg(temperature) AS t FROM telemetry WHERE time > now() - interval '5 minutes' GROUP BY 1 ORDER BY 1",
    )?;
    let recent: Vec<&str> = recent.iter().filter_map(|r| r["device_id"].as_str()).collect();
    assert_eq!(recent, vec!["a", "d", "e"], "only events stamped on receipt are recent");

    // CSV and Arrow IPC by Accept.
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let mut csv = agent
        .post(&s.url("/api/v1/sql"))
        .header("Authorization", s.bearer())
        .header("Accept", "text/csv")
        .send(json!({"sql": "SELECT device_id FROM telemetry ORDER BY 1 LIMIT 2"}).to_string().as_bytes())?;
    assert_eq!(csv.body_mut().read_to_string()?, "device_id\na\nb\n");
    let mut ipc = agent
        .post(&s.url("/api/v1/sql"))
        .header("Authorization", s.bearer())
        .header("Accept", "application/vnd.apache.arrow.stream")
        .send(json!({"sql": "SELECT count(*) AS n FROM telemetry"}).to_string().as_bytes())?;
    let bytes = ipc.body_mut().read_to_vec()?;
    let batches: Vec<_> =
        arrow::ipc::reader::StreamReader::try_new(bytes.as_slice(), None)?.collect::<Result<_, _>>()?;
    let n = batches[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().map(|a| a.value(0));
    assert_eq!(n, Some(6));

    // Streams and schemas.
    let (_, streams) = s.get("/api/v1/streams")?;
    let streams: Value = serde_json::from_str(&streams)?;
    let t = streams["streams"].as_array().and_then(|a| a.iter().find(|x| x["name"] == "telemetry")).cloned();
    let cols: Vec<String> = t
        .map(|t| {
            t["columns"].as_array().into_iter().flatten().map(|c| format!("{}:{}", c["name"], c["type"])).collect()
        })
        .unwrap_or_default();
    // Columns in order of first appearance in the first payload: temperature before door.
    assert_eq!(
        cols,
        vec![r#""time":"timestamp""#, r#""device_id":"string""#, r#""temperature":"float""#, r#""door":"string""#]
    );

    // Health and metrics.
    assert_eq!(s.get("/healthz")?.0, 200);
    assert_eq!(s.metric("ferrite_ingested_events_total{stream=\"telemetry\",transport=\"http\"}")?, 5);
    assert_eq!(s.metric("ferrite_ingested_events_total{stream=\"telemetry\",transport=\"influx\"}")?, 1);
    assert!(s.metric("ferrite_queries_total{outcome=\"ok\"}")? >= 5);
    let (_, metrics) = s.get("/metrics")?;
    for name in [
        "ferrite_wal_commit_seconds_count",
        "ferrite_query_seconds_count",
        "ferrite_ingested_bytes_total",
        "ferrite_batches_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    Ok(())
}

#[test]
fn schema_evolves_on_write_and_rejects_conflicts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/power/events", &json!({"device_id": "m1", "watts": 10.0}))?;
    s.post_json(
        "/api/v1/streams/power/events",
        &json!({"device_id": "m1", "watts": 11.0, "volts": 230.0, "phase": "L1"}),
    )?;
    let rows = s.sql("SELECT watts, volts, phase FROM power ORDER BY watts")?;
    assert_eq!(rows[0]["volts"], Value::Null, "{rows:?}");
    assert_eq!(rows[1]["volts"], 230.0);
    assert_eq!(rows[1]["phase"], "L1");

    let (status, body) = s.post_json("/api/v1/streams/power/events", &json!({"device_id": "m1", "watts": "lots"}))?;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_events");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("stream `power`: field `watts` is float, got string"), "{msg}");
    assert_eq!(s.metric("ferrite_rejected_events_total{transport=\"http\",reason=\"type_conflict\"}")?, 1);

    // The schema and data survive a restart.
    assert!(s.stop()?.success());
    let s = Server::start(dir.path(), &[])?;
    assert_eq!(s.sql_count("SELECT count(volts) FROM power")?, 1);
    let (status, _) = s.post_json("/api/v1/streams/power/events", &json!({"device_id": "m2", "watts": true}))?;
    assert_eq!(status, 400, "the type learned before the restart still holds");
    Ok(())
}

#[test]
fn bad_input_gets_clear_errors_and_loses_nothing_else() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--max-payload", "64KiB"])?;
    let post = |path: &str, ct: &str, body: &[u8]| s.post(path, ct, body);
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_owned();

    let (st, b) = post("/api/v1/streams/telemetry/events", "application/json", b"{\"device_id\": \"a\", \"t\": ")?;
    assert_eq!((st, code(&b)), (400, "malformed_json".to_owned()));
    assert!(b["error"]["message"].as_str().unwrap_or_default().contains("line 1, column"), "{b}");

    let big = format!("[{}]", vec![r#"{"device_id":"a","t":1}"#; 4000].join(","));
    let (st, b) = post("/api/v1/streams/telemetry/events", "application/json", big.as_bytes())?;
    assert_eq!((st, code(&b)), (413, "payload_too_large".to_owned()));

    let (st, b) = post("/api/v1/streams/telemetry/events", "application/json", b"[1, \"x\"]")?;
    assert_eq!((st, code(&b)), (400, "invalid_events".to_owned()));
    assert_eq!(b["error"]["details"][0]["code"], "not_an_object");

    let (st, b) = post("/api/v1/streams/bad-name/events", "application/json", b"{\"device_id\":\"a\"}")?;
    assert_eq!((st, code(&b)), (400, "invalid_stream_name".to_owned()));

    // A batch with good and bad events keeps the good ones.
    let mixed = json!([
        {"device_id": "ok1", "t": 1},
        {"device_id": "bad", "ts": "last tuesday", "t": 2},
        {"t": 3},
        {"device_id": "ok2", "t": 4}
    ]);
    let (st, b) = s.post_json("/api/v1/streams/telemetry/events", &mixed)?;
    assert_eq!((st, b["accepted"].as_u64(), b["rejected"].as_u64()), (200, Some(2), Some(2)), "{b}");
    assert_eq!(b["errors"][0]["code"], "bad_timestamp");
    assert_eq!(b["errors"][1]["code"], "missing_device_id");

    let (st, b) = post("/api/v2/write", "text/plain", b"m,host=a v=1\nm,host=b v=\nm v=1 123\n")?;
    assert_eq!((st, code(&b)), (400, "invalid_line_protocol".to_owned()));
    assert_eq!(b["error"]["details"]["accepted"], 1);
    let (st, b) = post("/api/v2/write?precision=weeks", "text/plain", b"m,host=a v=1")?;
    assert_eq!((st, code(&b)), (400, "invalid_precision".to_owned()));

    let (st, b) = s.post_json("/api/v1/sql", &json!({"sql": "SELECT * FROM missing_stream"}))?;
    assert_eq!((st, code(&b)), (400, "unknown_table".to_owned()));
    let (st, b) = s.post_json("/api/v1/sql", &json!({"sql": "SELEKT 1"}))?;
    assert_eq!((st, code(&b)), (400, "sql_syntax".to_owned()));
    let (st, b) = s.post_json("/api/v1/sql", &json!({"sql": "SELECT no_such_column FROM telemetry"}))?;
    assert_eq!((st, code(&b)), (400, "invalid_query".to_owned()));
    let (st, b) = post("/api/v1/sql", "application/json", b"not json")?;
    assert_eq!((st, code(&b)), (400, "bad_request".to_owned()));

    // The server lives on and kept exactly the valid events.
    let devices: Vec<String> = s
        .sql("SELECT device_id FROM telemetry ORDER BY 1")?
        .iter()
        .filter_map(|r| r["device_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(devices, vec!["ok1", "ok2"]);
    assert_eq!(s.sql_count("SELECT count(*) FROM m")?, 1);
    assert!(s.metric("ferrite_rejected_events_total{transport=\"http\",reason=\"payload_too_large\"}")? >= 1);
    assert_eq!(s.metric("ferrite_rejected_events_total{transport=\"http\",reason=\"malformed_json\"}")?, 1);
    Ok(())
}

#[test]
fn ndjson_of_many_devices() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--shards", "3"])?;
    let body: String = events(0, 5000, 97).iter().map(|e| format!("{e}\n")).collect();
    let (st, b) = s.post("/api/v1/streams/telemetry/events", "application/x-ndjson", body.as_bytes())?;
    assert_eq!((st, b["accepted"].as_u64()), (200, Some(5000)));
    assert_eq!(s.sql_count("SELECT count(DISTINCT device_id) FROM telemetry")?, 97);
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry")?, 5000);
    Ok(())
}

#[test]
fn configuration_precedence_file_env_flag() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ferrite.toml");
    std::fs::write(&config, "max_payload = \"1KiB\"\npersist_interval = \"1h\"\n")?;
    let cfg = config.display().to_string();
    let body = json!([{"device_id": "a", "pad": "x".repeat(1500)}]);
    let status_with = |extra: &[&str], env: &[(&str, String)]| -> anyhow::Result<u16> {
        let data = tempfile::tempdir()?;
        let mut args = vec!["--config", cfg.as_str()];
        args.extend_from_slice(extra);
        let s = Server::start_with_env(data.path(), &args, env)?;
        Ok(s.post_json("/api/v1/streams/t/events", &body)?.0)
    };
    assert_eq!(status_with(&[], &[])?, 413, "the file's 1KiB limit applies");
    let env = [("FERRITE_MAX_PAYLOAD", "4KiB".to_owned())];
    assert_eq!(status_with(&[], &env)?, 200, "the environment overrides the file");
    assert_eq!(status_with(&["--max-payload", "1KiB"], &env)?, 413, "a flag overrides the environment");

    // A bad file is refused with the file named.
    std::fs::write(&config, "max_paylod = \"1KiB\"\n")?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrite")).args(["serve", "--config", &cfg]).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ferrite.toml") && err.contains("max_paylod"), "{err}");
    Ok(())
}

#[test]
fn device_tags_name_the_device_of_lines_without_device_id_or_host() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--device-tags", "name,vin"])?;
    // What TSBS's IoT generator writes: trucks named by `name`, numeric tags, an `i` status.
    let lp = "readings,name=truck_0,fleet=South,driver=Trish,model=H-2,load_capacity=1500 latitude=52.31854,velocity=12 1451606400000000000\n\
              diagnostics,name=truck_0,fleet=South fuel_state=0.9,current_load=1200,status=0i 1451606400000000000\n\
              readings,vin=WVW1,fleet=East velocity=3 1451606410000000000\n\
              readings,fleet=East velocity=4 1451606420000000000\n";
    let (status, body) = s.post("/api/v2/write", "text/plain", lp.as_bytes())?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"]["accepted"], 3, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default().to_owned() + &body.to_string();
    assert!(msg.contains("line 4") && msg.contains("`name`, `vin`"), "{body}");
    let rows = s.sql("SELECT device_id, name, fleet, velocity FROM readings ORDER BY time")?;
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0]["device_id"].as_str(), rows[0]["name"].as_str()), (Some("truck_0"), Some("truck_0")));
    assert_eq!(rows[1]["device_id"], "WVW1");
    assert_eq!(s.sql_count("SELECT status FROM diagnostics WHERE device_id = 'truck_0'")?, 0);
    Ok(())
}

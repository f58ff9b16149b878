//! API usage as data: HTTP calls and MQTT sessions become rows of the `api_usage` stream,
//! queryable by SQL and usable by rules (an alert on a client's failed calls).

use rumqttc::{Packet, QoS};
use serde_json::{Value, json};

use crate::harness::Server;
use crate::mqtt::{client, runtime, until};

#[test]
fn api_calls_and_mqtt_sessions_are_rows_that_sql_and_rules_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    for seq in 0..3 {
        let (st, body) = s.post_json("/api/v1/streams/telemetry/events", &json!({"device_id": "u-1", "seq": seq}))?;
        assert_eq!(st, 200, "{body}");
    }
    // An MQTT session: three QoS 1 publishes, then DISCONNECT.
    runtime()?.block_on(async {
        let (c, mut ev) = client(&s, "usage-client");
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        for i in 0..3 {
            c.publish("devices/u-2/telemetry", QoS::AtLeastOnce, false, format!(r#"{{"seq": {i}}}"#)).await?;
            until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
        }
        c.disconnect().await?;
        while ev.poll().await.is_ok() {}
        anyhow::Ok(())
    })?;
    s.wait_for("the session's usage row", |s| {
        Ok(s.sql_count("SELECT count(*) FROM api_usage WHERE class = 'session'").unwrap_or(0) == 1)
    })?;

    let ingest = s.sql(
        "SELECT device_id, transport, method, status, count(*) AS calls, min(bytes_in) AS smallest \
         FROM api_usage WHERE route = '/api/v1/streams/{stream}/events' \
         GROUP BY device_id, transport, method, status",
    )?;
    assert_eq!(ingest.len(), 1, "{ingest:?}");
    let row = &ingest[0];
    assert_eq!((row["device_id"].as_str(), row["transport"].as_str()), (Some("admin"), Some("http")));
    assert_eq!(
        (row["method"].as_str(), row["status"].as_i64(), row["calls"].as_i64()),
        (Some("POST"), Some(200), Some(3))
    );
    assert!(row["smallest"].as_i64().unwrap_or(0) > 10, "request bytes: {row}");

    let session = s.sql("SELECT * FROM api_usage WHERE class = 'session'")?;
    let row = &session[0];
    assert_eq!(row["transport"], "mqtt");
    assert_eq!(row["route"], "usage-client", "the client id");
    assert_eq!((row["status"].as_i64(), row["reason"].as_str()), (Some(200), Some("disconnect")));
    assert_eq!(row["messages"].as_i64(), Some(3));
    assert!(row["bytes_in"].as_i64().unwrap_or(0) > 0 && row["bytes_out"].as_i64().unwrap_or(0) > 0, "{row}");

    // A rule over the stream: three failed calls of one client raise an alert.
    let rule = "rule client_errors {\n\
                    from api_usage[status >= 400]\n\
                    window tumbling count 3 by device_id\n\
                    select device_id, count(*) as errors\n\
                    then alert severity 'warning' message '{device_id} had {errors} failed API calls'\n\
                }\n";
    let (st, body) = s.post("/api/v1/rules", "text/plain", rule.as_bytes())?;
    assert!(st == 200 || st == 201, "{st} {body}");
    // (Polling a stream that does not exist yet fails too: count from here.)
    let failed_before = s.sql_count("SELECT count(*) FROM api_usage WHERE route = '/api/v1/sql' AND status = 400")?;
    for _ in 0..3 {
        let (st, _) = s.post_json("/api/v1/sql", &json!({"sql": "SELECT * FROM no_such_stream"}))?;
        assert_eq!(st, 400);
    }
    s.wait_for("the alert on failed calls", |s| {
        let rows = s.sql("SELECT message FROM alerts").unwrap_or_default();
        Ok(rows.iter().any(|r: &Value| r["message"] == "admin had 3 failed API calls"))
    })?;
    let failed = s.sql_count("SELECT count(*) FROM api_usage WHERE route = '/api/v1/sql' AND status = 400")?;
    assert!(failed >= failed_before + 3, "{failed_before} then {failed}");
    // The query of docs/api.md runs as written.
    let rates = s.sql(
        "SELECT device_id, count(*) AS calls, avg(CASE WHEN status >= 400 THEN 1.0 ELSE 0.0 END) AS error_rate \
         FROM api_usage WHERE time > now() - INTERVAL '1 hour' GROUP BY device_id ORDER BY error_rate DESC",
    )?;
    let admin = rates.iter().find(|r| r["device_id"] == "admin").cloned().unwrap_or_default();
    assert!(admin["error_rate"].as_f64().is_some_and(|r| r > 0.0 && r < 1.0), "{rates:?}");
    Ok(())
}

#[test]
fn usage_can_be_turned_off() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--api-usage", "false"])?;
    let (st, _) = s.post_json("/api/v1/streams/telemetry/events", &json!({"device_id": "u-1", "v": 1}))?;
    assert_eq!(st, 200);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 1);
    let (st, body) = s.post_json("/api/v1/sql", &json!({"sql": "SELECT count(*) FROM api_usage"}))?;
    assert_eq!(st, 400, "no api_usage stream when usage is off: {body}");
    Ok(())
}

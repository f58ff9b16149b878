//! Declared stream schemas: types enforced on write, units and tags, timestamp fields.

use serde_json::{Value, json};

use crate::harness::Server;

fn columns(s: &Server, stream: &str) -> anyhow::Result<Vec<Value>> {
    let (status, body) = s.get("/api/v1/streams")?;
    anyhow::ensure!(status == 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    let found = v["streams"].as_array().into_iter().flatten().find(|x| x["name"] == stream).cloned();
    Ok(found.map(|x| x["columns"].as_array().cloned().unwrap_or_default()).unwrap_or_default())
}

fn column(cols: &[Value], name: &str) -> Value {
    cols.iter().find(|c| c["name"] == name).cloned().unwrap_or(Value::Null)
}

const DECLARATION: &[u8] = b"
stream telemetry {
    retention 30d
    field temperature float unit 'celsius'
    field count int
    field site string tag
    field seen_at timestamp
}
";

#[test]
fn declared_types_units_and_tags_hold_on_write() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (status, body) = s.post("/api/v1/rules", "text/plain", DECLARATION)?;
    assert_eq!(status, 201, "{body}");
    // The stream exists with its declared columns before any event.
    let cols = columns(&s, "telemetry")?;
    assert_eq!(
        column(&cols, "temperature"),
        json!({"name": "temperature", "type": "float", "nullable": true, "declared": true, "unit": "celsius"})
    );
    assert_eq!(column(&cols, "site")["tag"], true);
    assert_eq!(column(&cols, "count")["type"], "integer");
    assert_eq!(column(&cols, "seen_at")["type"], "timestamp");

    // An integer into the float field is a float; a timestamp field takes RFC 3339 text and
    // epoch milliseconds.
    let (status, body) = s.post_json(
        "/api/v1/streams/telemetry/events",
        &json!([
            {"device_id": "d1", "temperature": 21, "count": 3, "site": "b7", "seen_at": "2026-11-30T10:00:00Z"},
            {"device_id": "d2", "temperature": 19.5, "count": 4, "site": "b8", "seen_at": 1796032800000i64}
        ]),
    )?;
    assert_eq!((status, body["accepted"].clone()), (200, json!(2)), "{body}");
    let rows = s.sql("SELECT device_id, temperature, count, seen_at FROM telemetry ORDER BY device_id")?;
    assert_eq!(rows[0]["temperature"], 21.0);
    assert_eq!(rows[1]["seen_at"], rows[0]["seen_at"], "both spellings of the same instant: {rows:?}");
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE seen_at = TIMESTAMP '2026-11-30T10:00:00Z'")?, 2);

    // What does not fit a declared type is refused, with the reason, and loses nothing else;
    // a declared integer is never widened by a fraction.
    let (status, body) = s.post_json(
        "/api/v1/streams/telemetry/events",
        &json!([
            {"device_id": "d3", "count": 2.5},
            {"device_id": "d3", "seen_at": "yesterday"},
            {"device_id": "d3", "temperature": "hot"},
            {"device_id": "d3", "count": 7}
        ]),
    )?;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["accepted"].clone(), body["rejected"].clone()), (json!(1), json!(3)), "{body}");
    let errors = body["errors"].to_string();
    assert!(errors.contains("count") && errors.contains("integer"), "{errors}");
    assert!(errors.contains("seen_at") && errors.contains("RFC 3339"), "{errors}");
    assert_eq!(column(&columns(&s, "telemetry")?, "count")["type"], "integer", "not widened");

    // The declarations survive a restart, and so does their enforcement.
    s.stop()?;
    let s = Server::start(dir.path(), &[])?;
    assert_eq!(column(&columns(&s, "telemetry")?, "temperature")["unit"], "celsius");
    let (_, body) = s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "d4", "count": 1.5}]))?;
    assert!(body.to_string().contains("type_conflict"), "{body}");
    Ok(())
}

#[test]
fn a_declaration_that_conflicts_with_written_data_is_refused_and_explained() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/power/events", &json!([{"device_id": "m1", "watts": 1.5, "phase": 1}]))?;
    // watts holds floats already: declaring it int is refused, and the file's rule with it.
    let file = b"stream power { field watts int }\nrule big { from power[watts > 1000] select device_id insert into big_loads }";
    let (status, body) = s.post("/api/v1/rules", "text/plain", file)?;
    assert_eq!(status, 400, "{body}");
    let text = body.to_string();
    assert!(text.contains("declared int") && text.contains("already holds it as float"), "{text}");
    let (_, rules) = s.get("/api/v1/rules")?;
    assert!(!rules.contains("\"big\""), "nothing of the file was deployed: {rules}");
    // An integer field declared float is widened, as a fraction would.
    let (status, body) = s.post("/api/v1/rules", "text/plain", b"stream power { field phase float unit 'index' }")?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(column(&columns(&s, "power")?, "phase")["type"], "float");
    assert_eq!(s.sql_count("SELECT count(*) FROM power WHERE phase = 1.0")?, 1);
    // A bad declaration is a parse error with its place.
    let (status, body) = s.post("/api/v1/rules", "text/plain", b"stream power { field site int tag }")?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("only a string field can be a tag"), "{body}");
    Ok(())
}

//! Arrow Flight SQL with a real client: ADBC's Flight SQL driver (Python).

use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::harness::{Server, events};

const SCRIPT: &str = r#"
import json, sys
import adbc_driver_flightsql.dbapi as flight
uri, token = sys.argv[1], sys.argv[2]
tenant = sys.argv[3] if len(sys.argv) > 3 else None
kwargs = {"adbc.flight.sql.authorization_header": "Bearer " + token}
if tenant:
    kwargs["adbc.flight.sql.rpc.call_header.x-ferrite-tenant"] = tenant
out = {}
with flight.connect(uri, db_kwargs=kwargs, autocommit=True) as conn:
    with conn.cursor() as cur:
        for item in json.loads(sys.argv[4] if len(sys.argv) > 4 else "[]"):
            name, sql, params = item[0], item[1], (item[2] if len(item) > 2 else None)
            try:
                if params is None:
                    cur.execute(sql)
                else:
                    cur.execute(sql, params)
                table = cur.fetch_arrow_table()
                out[name] = {"rows": table.num_rows, "columns": table.column_names,
                             "types": [str(t) for t in table.schema.types],
                             "first": table.slice(0, 1).to_pylist()}
            except Exception as e:
                out[name] = {"error": str(e)}
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    out["tables"] = sorted(t["table_name"] for c in objects for s in (c["catalog_db_schemas"] or [])
                           for t in (s["db_schema_tables"] or []) if s["db_schema_name"] == "public")
print(json.dumps(out, default=str))
"#;

fn adbc(s: &Server, token: &str, tenant: Option<&str>, queries: &[(&str, &str)]) -> anyhow::Result<Value> {
    adbc_with(s, token, tenant, queries.iter().map(|(n, q)| json!([n, q])).collect())
}

/// `queries` as `[name, sql]` or `[name, sql, [parameters...]]` (a prepared statement).
fn adbc_with(s: &Server, token: &str, tenant: Option<&str>, queries: Vec<Value>) -> anyhow::Result<Value> {
    if Command::new("python3")
        .args(["-c", "import adbc_driver_flightsql"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        bail!("adbc-driver-flightsql is not installed (scripts/test.sh installs it)");
    }
    let addr = s.flight.context("the server has no Flight SQL listener")?;
    let queries = serde_json::to_string(&queries)?;
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(format!("grpc://{addr}"))
        .arg(token)
        .arg(tenant.unwrap_or(""))
        .arg(queries)
        .output()?;
    if !out.status.success() {
        bail!("adbc failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn adbc_reads_arrow_and_lists_the_tables() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (status, _) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events(0, 5000, 10)))?;
    assert_eq!(status, 200);
    let v = adbc(
        &s,
        &s.token,
        None,
        &[
            ("all", "SELECT device_id, temperature, time FROM telemetry"),
            ("agg", "SELECT device_id, count(*) AS n FROM telemetry GROUP BY device_id ORDER BY device_id"),
            ("write", "DROP TABLE telemetry"),
            ("bad", "SELECT nope FROM telemetry"),
        ],
    )?;
    assert_eq!(v["all"]["rows"], 5000, "{v}");
    assert_eq!(v["all"]["types"], json!(["string", "double", "timestamp[ns, tz=UTC]"]), "{v}");
    assert_eq!(v["agg"]["rows"], 10);
    assert_eq!(v["agg"]["first"], json!([{"device_id": "dev-0", "n": 500}]));
    assert!(v["write"]["error"].as_str().is_some_and(|e| e.contains("not supported") || e.contains("DDL")), "{v}");
    assert!(v["bad"]["error"].as_str().is_some_and(|e| e.contains("nope")), "{v}");
    assert!(v["tables"].as_array().is_some_and(|t| t.iter().any(|x| x == "telemetry")), "{v}");
    Ok(())
}

#[test]
fn prepared_statements_bind_parameters_as_jdbc_and_adbc_send_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (status, _) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events(0, 1000, 10)))?;
    assert_eq!(status, 200);
    let v = adbc_with(
        &s,
        &s.token,
        None,
        vec![
            json!(["one", "SELECT count(*) AS n FROM telemetry WHERE device_id = ?", ["dev-3"]]),
            json!(["two", "SELECT count(*) AS n FROM telemetry WHERE device_id = ? AND seq < ?", ["dev-3", 500]]),
            json!(["dollar", "SELECT count(*) AS n FROM telemetry WHERE seq >= $1", [900]]),
            json!(["quoted", "SELECT '?' AS q, count(*) AS n FROM telemetry WHERE device_id = ?", ["dev-1"]]),
            json!(["strings", "SELECT device_id FROM telemetry WHERE seq = ?", [7]]),
            json!(["too_few", "SELECT count(*) FROM telemetry WHERE device_id = ? AND seq < ?", ["dev-3"]]),
            json!(["write", "DELETE FROM telemetry WHERE device_id = ?", ["dev-3"]]),
        ],
    )?;
    assert_eq!(v["one"]["first"], json!([{"n": 100}]), "{v}");
    assert_eq!(v["two"]["first"], json!([{"n": 50}]), "{v}");
    assert_eq!(v["dollar"]["first"], json!([{"n": 100}]), "{v}");
    assert_eq!(v["quoted"]["first"], json!([{"q": "?", "n": 100}]), "{v}");
    assert_eq!(v["strings"]["types"], json!(["string"]), "results keep the plain string type: {v}");
    assert_eq!(v["strings"]["first"], json!([{"device_id": "dev-7"}]), "{v}");
    assert!(v["too_few"]["error"].as_str().is_some_and(|e| e.contains("parameter")), "{v}");
    assert!(v["write"]["error"].is_string(), "a prepared statement is read-only too: {v}");
    Ok(())
}

#[test]
fn a_token_reads_its_own_tenant_only_and_a_bad_one_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "d1", "temperature": 1.5}]))?;
    let acme = s.tenant_token("acme", &["viewer"])?;

    // Another tenant's table does not exist for acme's token, and acme may not name the
    // default tenant.
    let v = adbc(&s, &acme, None, &[("other", "SELECT count(*) FROM telemetry")])?;
    assert!(v["other"]["error"].as_str().is_some_and(|e| e.contains("telemetry")), "{v}");
    let refused = adbc(&s, &acme, Some("default"), &[]);
    assert!(refused.is_err_and(|e| e.to_string().contains("may not query")), "the tenant header is checked");
    // The admin picks a tenant with the header.
    let v = adbc(&s, &s.token, Some("default"), &[("mine", "SELECT count(*) AS n FROM telemetry")])?;
    assert_eq!(v["mine"]["first"], json!([{"n": 1}]), "{v}");
    // A bad token is refused.
    let bad = adbc(&s, "not-a-token", None, &[]);
    assert!(bad.is_err_and(|e| e.to_string().to_lowercase().contains("unauthenticated")), "a bad token is refused");
    Ok(())
}

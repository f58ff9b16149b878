//! The PostgreSQL wire protocol with real clients: the distribution's `psql`, and psycopg
//! (Python) for the extended protocol, typed rows and cancel requests.

use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::harness::{Server, events};

/// `psql` (PATH, or the distribution's versioned directory).
fn psql_bin() -> anyhow::Result<String> {
    if Command::new("psql").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok("psql".into());
    }
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/psql"))
        .find(|p| p.exists());
    found.map(|p| p.display().to_string()).context("psql is not installed (scripts/test.sh installs postgresql)")
}

/// Runs `psql -At` with `password` and `dbname`; (success, stdout, stderr).
fn psql(s: &Server, password: &str, dbname: &str, commands: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let pg = s.pg.context("the server has no pg listener")?;
    let mut cmd = Command::new(psql_bin()?);
    cmd.arg(format!("host={} port={} user=analyst dbname={dbname} sslmode=disable", pg.ip(), pg.port()))
        .args(["-At", "-X"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn python(script: &str, args: &[String]) -> anyhow::Result<Value> {
    let out = Command::new("python3").arg("-c").arg(script).args(args).output()?;
    if !out.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn psql_reads_the_streams_with_a_token_and_describes_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (status, _) = s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events(0, 300, 3)))?;
    assert_eq!(status, 200);
    let token = s.token.clone();

    let (ok, out, err) = psql(&s, &token, "ferrite", &["SELECT count(*), count(DISTINCT device_id) FROM telemetry"])?;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "300|3");
    // The catalog queries psql sends for \dt and \d.
    let (ok, out, err) = psql(&s, &token, "ferrite", &["\\dt"])?;
    assert!(ok, "{err}");
    assert!(out.contains("telemetry"), "{out}");
    let (ok, out, err) = psql(&s, &token, "ferrite", &["\\d telemetry"])?;
    assert!(ok, "{err}");
    assert!(out.contains("device_id") && out.contains("time"), "{out}");
    // The same answer as the HTTP endpoint.
    let http = s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'dev-1'")?;
    let (_, out, _) = psql(&s, &token, "ferrite", &["SELECT count(*) FROM telemetry WHERE device_id = 'dev-1'"])?;
    assert_eq!(out.trim(), http.to_string());
    Ok(())
}

#[test]
fn a_bad_password_and_a_write_are_refused_with_their_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "d1", "temperature": 1.5}]))?;
    let (ok, _, err) = psql(&s, "not-a-token", "ferrite", &["SELECT 1"])?;
    assert!(!ok);
    assert!(err.contains("password authentication failed") && err.contains("access token"), "{err}");

    for write in [
        "CREATE TABLE x (a INT)",
        "INSERT INTO telemetry (device_id) VALUES ('x')",
        "DROP TABLE telemetry",
        "COPY telemetry TO '/tmp/x.csv'",
    ] {
        // The session goes on after the refusal: the second command still answers.
        let (_, out, err) = psql(&s, &s.token, "ferrite", &[write, "SELECT count(*) FROM telemetry"])?;
        assert!(err.contains("read-only"), "{write}: {err}");
        assert_eq!(out.trim(), "1", "{write}: {out}");
    }
    // SET and SHOW, as clients send them at connect.
    let (ok, out, err) = psql(&s, &s.token, "ferrite", &["SET application_name = 'grafana'", "SHOW application_name"])?;
    assert!(ok, "{err}");
    assert!(out.contains("grafana"), "{out}");
    Ok(())
}

#[test]
fn a_connection_sees_one_tenant_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "d1", "temperature": 1.5}]))?;
    let acme = s.tenant_token("acme", &["viewer", "ingest"])?;
    // acme writes its own stream.
    let mut resp = s
        .agent()
        .post(&s.url("/api/v1/streams/pumps/events"))
        .header("Authorization", &format!("Bearer {acme}"))
        .send(r#"[{"device_id": "p1", "flow": 3.5}, {"device_id": "p2", "flow": 1.0}]"#)?;
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.body_mut().read_to_string()?);

    let (ok, out, err) = psql(&s, &acme, "ferrite", &["SELECT count(*) FROM pumps"])?;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2");
    let (ok, _, err) = psql(&s, &acme, "ferrite", &["SELECT count(*) FROM telemetry"])?;
    assert!(!ok && err.contains("telemetry"), "another tenant's stream does not exist for acme: {err}");
    // Asking for the default tenant by database name is refused.
    let (ok, _, err) = psql(&s, &acme, "default", &["SELECT 1"])?;
    assert!(!ok && err.contains("may not query"), "{err}");
    // The platform admin picks a tenant by database name.
    let (ok, out, err) = psql(&s, &s.token, "acme", &["SELECT count(*) FROM pumps"])?;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2");
    Ok(())
}

#[test]
fn psycopg_binds_parameters_gets_typed_rows_and_cancels() -> anyhow::Result<()> {
    if Command::new("python3").args(["-c", "import psycopg"]).output().map(|o| !o.status.success()).unwrap_or(true) {
        bail!("psycopg is not installed (scripts/test.sh installs it)");
    }
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json(
        "/api/v1/streams/telemetry/events",
        &json!([
            {"device_id": "d1", "temperature": 21.5, "count": 3, "ts": "2026-11-30T10:00:00Z"},
            {"device_id": "d2", "temperature": 19.0, "count": 4, "ts": "2026-11-30T10:00:01Z"}
        ]),
    )?;
    let pg = s.pg.context("no pg listener")?;
    let script = r#"
import json, sys, threading, time
import psycopg
host, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = psycopg.connect(host=host, port=port, user="analyst", password=password, dbname="ferrite", autocommit=True)
out = {}
with conn.cursor() as cur:
    cur.execute("SELECT device_id, temperature, count, time FROM telemetry WHERE device_id = %s", ("d1",))
    row = cur.fetchone()
    out["row"] = [row[0], row[1], row[2], row[3].isoformat()]
    out["types"] = [type(v).__name__ for v in row]
    cur.execute("SELECT count(*) FROM telemetry WHERE temperature > %s", (20,))
    out["warm"] = cur.fetchone()[0]
# A long statement, cancelled from another thread: a cancel that arrives before the statement
# runs cancels nothing, so it is sent again until the statement has ended.
done = threading.Event()
def cancel():
    while not done.wait(0.2):
        conn.cancel()
threading.Thread(target=cancel).start()
started = time.time()
try:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM generate_series(1, 50000000000) WHERE value % 7 = 3")
        out["cancel"] = "finished"
except psycopg.errors.QueryCanceled as e:
    out["cancel"] = "cancelled"
out["cancel_seconds"] = round(time.time() - started, 1)
done.set()
with conn.cursor() as cur:
    cur.execute("SELECT 1")
    out["after"] = cur.fetchone()[0]
print(json.dumps(out))
"#;
    let v = python(script, &[pg.ip().to_string(), pg.port().to_string(), s.token.clone()])?;
    assert_eq!(v["row"], json!(["d1", 21.5, 3, "2026-11-30T10:00:00+00:00"]), "{v}");
    assert_eq!(v["types"], json!(["str", "float", "int", "datetime"]), "{v}");
    assert_eq!(v["warm"], 1, "{v}");
    assert_eq!(v["cancel"], "cancelled", "{v}");
    assert!(v["cancel_seconds"].as_f64() < Some(5.0), "the cancel stops the statement at once: {v}");
    assert_eq!(v["after"], 1, "the connection lives on after a cancel: {v}");
    Ok(())
}

#[test]
fn every_sql_panel_of_the_grafana_dashboard_runs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let now = "2026-11-30T10:00:00Z";
    s.post_json(
        "/api/v1/streams/telemetry/events",
        &json!([
            {"device_id": "d1", "temperature": 21.5, "ts": now},
            {"device_id": "d2", "temperature": 19.0, "ts": now}
        ]),
    )?;
    let (status, v) = s.post_json("/api/v1/devices", &json!({"id": "d1"}))?;
    assert_eq!(status, 201, "{v}");
    // An alert as the rules write it (the stream exists once a rule raised one).
    s.post_json(
        "/api/v1/streams/alerts/events",
        &json!([{"device_id": "d1", "ts": now, "rule": "hot", "key": "d1", "severity": "warning", "message": "hot", "state": "raised"}]),
    )?;
    let dashboard: Value = serde_json::from_str(include_str!("../../docs/grafana/ferrite-devices.json"))?;
    let mut ran = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(sql) = target["rawSql"].as_str() else { continue };
            // What Grafana's PostgreSQL data source expands the macro to.
            let sql =
                sql.replace("$__timeFilter(time)", "time BETWEEN '2026-11-30T00:00:00Z' AND '2026-12-01T00:00:00Z'");
            let (ok, out, err) = psql(&s, &s.token, "ferrite", &[&sql])?;
            assert!(ok && !out.trim().is_empty(), "panel {:?}: {err}\n{sql}", panel["title"]);
            ran += 1;
        }
    }
    assert_eq!(ran, 6, "every SQL panel ran");
    Ok(())
}

/// A self-signed certificate for 127.0.0.1 (its own CA), by the `openssl` CLI.
fn self_signed(dir: &std::path::Path, name: &str) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl is not installed (scripts/test.sh installs it)")?;
    if !out.status.success() {
        bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((cert, key))
}

/// `psql -At -c sql` with libpq's TLS settings `ssl`; (success, stdout, stderr).
fn psql_tls(s: &Server, ssl: &str, sql: &str) -> anyhow::Result<(bool, String, String)> {
    let pg = s.pg.context("the server has no pg listener")?;
    let out = Command::new(psql_bin()?)
        .arg(format!("host={} port={} user=analyst dbname=ferrite {ssl}", pg.ip(), pg.port()))
        .args(["-At", "-X", "-c", sql])
        .env("PGPASSWORD", &s.token)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn with_a_certificate_tls_is_required_and_a_renewed_certificate_is_used_without_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = tempfile::tempdir()?;
    let (first, first_key) = self_signed(pki.path(), "first")?;
    let (cert, key) = (pki.path().join("server.crt"), pki.path().join("server.key"));
    std::fs::copy(&first, &cert)?;
    std::fs::copy(&first_key, &key)?;
    let tls = ["--tls-cert".to_owned(), cert.display().to_string(), "--tls-key".to_owned(), key.display().to_string()];
    let s = Server::start(dir.path(), &tls.iter().map(String::as_str).collect::<Vec<_>>())?;
    s.post_json("/api/v1/streams/telemetry/events", &Value::Array(events(0, 30, 3)))?;

    let verify = |root: &std::path::Path| format!("sslmode=verify-full sslrootcert={}", root.display());
    let (ok, out, err) = psql_tls(&s, &verify(&first), "SELECT count(*) FROM telemetry")?;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "30");
    // A session in clear text is refused before it sends its password, and told how to connect.
    let (ok, _, err) = psql_tls(&s, "sslmode=disable", "SELECT 1")?;
    assert!(!ok);
    assert!(err.contains("requires TLS") && err.contains("sslmode=require"), "{err}");

    // The certificate is renewed on disk (a new key): the next connection gets the new one.
    let (second, second_key) = self_signed(pki.path(), "second")?;
    std::fs::copy(&second, &cert)?;
    std::fs::copy(&second_key, &key)?;
    let (ok, out, err) = psql_tls(&s, &verify(&second), "SELECT count(*) FROM telemetry")?;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "30");
    let (ok, _, err) = psql_tls(&s, &verify(&first), "SELECT 1")?;
    assert!(!ok, "the old certificate is no longer served: {err}");
    drop(s);

    // Half a TLS configuration, or a key that is not PEM, stops the start with the reason.
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(["serve", "--data-dir"])
            .arg(dir.path())
            .args(["--http-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--pg-listen", "127.0.0.1:0"])
            .args(["--flight-listen", "off", "--coap-listen", "off"])
            .args(args)
            .output()?;
        assert!(!out.status.success());
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let err = run(&["--tls-cert", &tls[1]])?;
    assert!(err.contains("tls_cert and tls_key"), "{err}");
    let not_pem = pki.path().join("junk.key");
    std::fs::write(&not_pem, "not a key")?;
    let err = run(&["--tls-cert", &tls[1], "--tls-key", &not_pem.display().to_string()])?;
    assert!(err.contains("junk.key"), "{err}");
    Ok(())
}

#[test]
fn a_statement_past_the_daily_query_quota_is_refused_with_53400() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--tenant-daily-queries", "2"])?;
    let (ok, out, err) = psql(&s, &s.token, "ferrite", &["SELECT 1", "SELECT 2", "SELECT 3"])?;
    assert!(!ok, "the third statement passed: {out}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1", "2"]);
    assert!(err.contains("daily quota of 2 queries"), "{err}");
    // The same count on every door: HTTP is refused too.
    assert_eq!(s.post_json("/api/v1/sql", &json!({"sql": "SELECT 1"}))?.0, 429);
    Ok(())
}

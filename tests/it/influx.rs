//! The InfluxDB doors against the real server: `/write` as InfluxDB 1.x answers it,
//! `/api/v3/write_lp` as InfluxDB 3 does, the credentials their clients send, `db` naming a
//! tenant, and the device tag chosen by the request, the stream's declaration, or the
//! configuration, with TSBS IoT's own data shape.

use base64::Engine;
use serde_json::{Value, json};

use crate::harness::Server;

/// A POST of `body` to `path` with the given `Authorization` (none when `None`).
fn write(s: &Server, path: &str, auth: Option<&str>, body: &str) -> anyhow::Result<(u16, Value)> {
    let mut req = s.agent().post(&s.url(path)).header("Content-Type", "text/plain; charset=utf-8");
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut resp = req.send(body)?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// TSBS IoT's lines for one truck at one time (`tsbs_generate_data --use-case=iot
/// --format=influx`): its eight tags, a `readings` line and a `diagnostics` line.
fn tsbs_lines(truck: usize, t: i64, zero_name: bool) -> String {
    let fleets = ["East", "West", "North", "South"];
    let models = [("F-150", 2000, 200, 15), ("G-2000", 5000, 300, 19), ("H-2", 1500, 150, 12)];
    let (model, load, fuel, nominal) = models[truck % 3];
    let name = if zero_name { String::new() } else { format!("name=truck_{truck},") };
    let tags = format!(
        "{name}fleet={},driver=Trish,model={model},device_version=v1.{},load_capacity={load},fuel_capacity={fuel},nominal_fuel_consumption={nominal}",
        fleets[truck % 4],
        truck % 5
    );
    format!(
        "readings,{tags} latitude={:.5},longitude={:.5},elevation={},velocity={},heading={},grade={},fuel_consumption={:.1} {t}\n\
         diagnostics,{tags} fuel_state={:.1},current_load={},status={}i {t}\n",
        10.0 + truck as f64 / 7.0,
        20.0 + truck as f64 / 9.0,
        100 + truck,
        truck % 90,
        truck % 360,
        truck % 7,
        12.5,
        0.9,
        truck * 10,
        truck % 5,
    )
}

#[test]
fn influx_1x_writes_with_its_clients_credentials_and_answers_in_its_shape() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let token = s.bearer().trim_start_matches("Bearer ").to_owned();

    // Every form an InfluxDB client sends its credentials in.
    let (st, b) =
        write(&s, "/write?db=default&precision=s", Some(&format!("Token {token}")), "cpu,host=a usage=1 1\n")?;
    anyhow::ensure!(st == 204, "Token: {st} {b}");
    let (st, b) = write(&s, &format!("/write?u=telegraf&p={token}&precision=s"), None, "cpu,host=b usage=2 2\n")?;
    anyhow::ensure!(st == 204, "u/p: {st} {b}");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("telegraf:{token}"));
    let (st, b) = write(&s, "/write?precision=s", Some(&format!("Basic {basic}")), "cpu,host=c usage=3 3\n")?;
    anyhow::ensure!(st == 204, "Basic: {st} {b}");
    let (st, b) =
        write(&s, "/api/v2/write?bucket=x&precision=s", Some(&format!("Token {token}")), "cpu,host=d usage=4 4\n")?;
    anyhow::ensure!(st == 204, "Token on v2: {st} {b}");
    // Wrong or missing ones are refused, and write nothing.
    let wrong = base64::engine::general_purpose::STANDARD.encode("telegraf:not-a-token");
    let (st, _) = write(&s, "/write", Some(&format!("Basic {wrong}")), "cpu,host=e usage=5 5\n")?;
    anyhow::ensure!(st == 401, "a wrong password: {st}");
    let (st, _) = write(&s, "/write?p=not-a-token", None, "cpu,host=e usage=5 5\n")?;
    anyhow::ensure!(st == 401, "a wrong p: {st}");
    let (st, _) = write(&s, "/write", None, "cpu,host=e usage=5 5\n")?;
    anyhow::ensure!(st == 401, "no credentials: {st}");
    // `p` is read on /write only: elsewhere a token in the URL is no credential.
    let (st, _) = write(&s, &format!("/api/v2/write?p={token}"), None, "cpu,host=e usage=5 5\n")?;
    anyhow::ensure!(st == 401, "p on v2: {st}");
    let hosts = s.sql("SELECT device_id FROM cpu ORDER BY time")?;
    anyhow::ensure!(hosts.len() == 4, "{hosts:?}");

    // A partial write: the good lines are kept, the answer is 1.x's `{"error"}`.
    let auth = format!("Token {token}");
    let body = "cpu,host=f usage=6 6\ncpu,host=g usage= 7\ncpu,host=h usage=8 8\n";
    let (st, b) = write(&s, "/write?precision=s", Some(&auth), body)?;
    let err = b["error"].as_str().unwrap_or("");
    anyhow::ensure!(st == 400 && err.starts_with("partial write") && err.contains("dropped=1"), "{st} {b}");
    anyhow::ensure!(err.contains("line 2") && err.contains("usage="), "the refused line is named: {err}");
    anyhow::ensure!(s.sql_count("SELECT count(*) AS n FROM cpu")? == 6, "the two good lines were written");
    // The minutes and hours of 1.x, and a precision it does not have.
    let (st, b) = write(&s, "/write?precision=h", Some(&auth), "cpu,host=i usage=9 1\n")?;
    anyhow::ensure!(st == 204, "{st} {b}");
    let rows = s.sql("SELECT CAST(time AS BIGINT) AS t FROM cpu WHERE device_id = 'i'")?;
    anyhow::ensure!(rows.first().and_then(|r| r["t"].as_i64()) == Some(3_600_000_000_000), "{rows:?}");
    let (st, b) = write(&s, "/write?precision=fortnight", Some(&auth), "cpu,host=j usage=9 1\n")?;
    anyhow::ensure!(st == 400 && b["error"].as_str().is_some_and(|e| e.contains("fortnight")), "{st} {b}");
    // A JSON body (2.x's JSON points, or events) is refused whole with what to do instead.
    let (st, b) =
        write(&s, "/write", Some(&auth), r#"[{"measurement": "cpu", "tags": {"host": "k"}, "fields": {"usage": 1}}]"#)?;
    let err = b["error"].as_str().unwrap_or("");
    anyhow::ensure!(st == 400 && err.contains("line protocol") && err.contains("/api/v1/streams/"), "{st} {b}");
    anyhow::ensure!(s.sql_count("SELECT count(*) AS n FROM cpu")? == 7, "nothing of the refused bodies was written");

    // `db` names a tenant that exists; the admin may write there.
    let (st, b) = s.post_json("/api/v1/tenants", &json!({"id": "acme"}))?;
    anyhow::ensure!(st == 201, "{st} {b}");
    let (st, b) = write(&s, "/write?db=acme&precision=s", Some(&auth), "cpu,host=z usage=1 1\n")?;
    anyhow::ensure!(st == 204, "{st} {b}");
    let mut resp = s
        .agent()
        .post(&s.url("/api/v1/sql"))
        .header("Authorization", &s.bearer())
        .header("Ferrite-Tenant", "acme")
        .header("Content-Type", "application/json")
        .send(json!({"sql": "SELECT device_id FROM cpu"}).to_string())?;
    let acme: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
    anyhow::ensure!(acme == json!([{"device_id": "z"}]), "acme's cpu: {acme}");
    anyhow::ensure!(s.sql_count("SELECT count(*) AS n FROM cpu WHERE device_id = 'z'")? == 0, "not in default");
    // A `db` that names no tenant is ignored: the caller's tenant.
    let (st, _) = write(&s, "/write?db=benchmark&precision=s", Some(&auth), "cpu,host=y usage=1 1\n")?;
    anyhow::ensure!(st == 204 && s.sql_count("SELECT count(*) AS n FROM cpu WHERE device_id = 'y'")? == 1);
    Ok(())
}

#[test]
fn influx_3_write_lp_accepts_partial_or_nothing_and_guesses_the_precision() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let auth = s.bearer();

    // `auto`: seconds, milliseconds and nanoseconds of the same instant land on it.
    let body = "m,host=a v=1 1700000000\nm,host=b v=2 1700000000000\nm,host=c v=3 1700000000000000000\n";
    let (st, b) = write(&s, "/api/v3/write_lp?db=default", Some(&auth), body)?;
    anyhow::ensure!(st == 204, "{st} {b}");
    let times = s.sql("SELECT DISTINCT CAST(time AS BIGINT) AS t FROM m")?;
    anyhow::ensure!(times == vec![json!({"t": 1_700_000_000_000_000_000_i64})], "{times:?}");

    // accept_partial=false: one bad line, nothing written, each bad line listed.
    let body = "m,host=d v=4 1700000001\nm,host=e v=\nm v=6 1700000001\n";
    let (st, b) = write(&s, "/api/v3/write_lp?precision=second&accept_partial=false", Some(&auth), body)?;
    anyhow::ensure!(st == 400 && b["error"].as_str().is_some_and(|e| e.contains("nothing written")), "{st} {b}");
    let data = b["data"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(data.len() == 2, "{b}");
    anyhow::ensure!(data[0]["line_number"] == 2 && data[0]["original_line"] == "m,host=e v=", "{b}");
    anyhow::ensure!(
        data[1]["line_number"] == 3 && data[1]["error_message"].as_str().is_some_and(|m| m.contains("device")),
        "{b}"
    );
    anyhow::ensure!(s.sql_count("SELECT count(*) AS n FROM m")? == 3, "nothing of it was written");
    // The default (accept_partial=true): the good line is written, the bad ones listed.
    let (st, b) = write(&s, "/api/v3/write_lp?precision=second", Some(&auth), body)?;
    anyhow::ensure!(st == 400 && b["error"].as_str().is_some_and(|e| e.starts_with("partial write")), "{st} {b}");
    anyhow::ensure!(s.sql_count("SELECT count(*) AS n FROM m")? == 4, "the good line was written");
    // no_sync: answered once queued; the row arrives.
    let (st, b) =
        write(&s, "/api/v3/write_lp?precision=second&no_sync=true", Some(&auth), "m,host=f v=7 1700000002\n")?;
    anyhow::ensure!(st == 204, "{st} {b}");
    s.wait_for("the no_sync row", |s| Ok(s.sql_count("SELECT count(*) AS n FROM m WHERE device_id = 'f'")? == 1))?;
    let (st, b) = write(&s, "/api/v3/write_lp?precision=week", Some(&auth), "m,host=g v=1 1\n")?;
    anyhow::ensure!(st == 400 && b["error"].as_str().is_some_and(|e| e.contains("auto")), "{st} {b}");
    Ok(())
}

#[test]
fn tsbs_iot_data_loads_unchanged_with_the_device_tag_of_the_users_choice() -> anyhow::Result<()> {
    // TSBS's trucks, one in a hundred of their entries without a `name` (TSBS zeroes tags).
    let mut body = String::new();
    let mut zeroed = 0;
    for tick in 0..10_i64 {
        for truck in 0..40 {
            let zero = (tick as usize * 40 + truck) % 100 == 7;
            zeroed += usize::from(zero);
            body.push_str(&tsbs_lines(truck, 1_451_606_400_000_000_000 + tick * 10_000_000_000, zero));
        }
    }
    let lines = body.lines().count();

    // Per request: `device_tag=name`; the zeroed lines have no device and are refused.
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let auth = s.bearer();
    let (st, b) = write(&s, "/write?db=benchmark&device_tag=name", Some(&auth), &body)?;
    anyhow::ensure!(
        st == 400 && b["error"].as_str().is_some_and(|e| e.contains(&format!("dropped={}", 2 * zeroed))),
        "{st} {b}"
    );
    let trucks = s.sql_count("SELECT count(DISTINCT device_id) AS n FROM readings")?;
    anyhow::ensure!(trucks == 40, "{trucks} trucks");
    anyhow::ensure!(s.sql_count("SELECT count(*) AS n FROM readings WHERE device_id <> name")? == 0);
    drop(s);

    // Declared on the streams, with a device for the nameless lines: every line accepted.
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let auth = s.bearer();
    let decl = "stream readings { device_tag name default_device 'unnamed' }\n\
                stream diagnostics { device_tag name default_device 'unnamed' }\n";
    let mut resp = s.agent().post(&s.url("/api/v1/rules")).header("Authorization", &auth).send(decl)?;
    anyhow::ensure!(resp.status() == 201, "{}", resp.body_mut().read_to_string()?);
    let (st, b) = write(&s, "/write?db=benchmark", Some(&auth), &body)?;
    anyhow::ensure!(st == 204, "every line accepted: {st} {b}");
    let rows =
        s.sql_count("SELECT count(*) AS n FROM readings")? + s.sql_count("SELECT count(*) AS n FROM diagnostics")?;
    anyhow::ensure!(rows as usize == lines, "{rows} rows of {lines} lines");
    let unnamed = s.sql_count("SELECT count(*) AS n FROM readings WHERE device_id = 'unnamed' AND name IS NULL")?;
    anyhow::ensure!(unnamed as usize == zeroed, "{unnamed} nameless readings, {zeroed} zeroed");
    let status = s.sql("SELECT arrow_typeof(status) AS t FROM diagnostics LIMIT 1")?;
    anyhow::ensure!(status == vec![json!({"t": "Int64"})], "TSBS's `i` integers stay integers: {status:?}");
    drop(s);

    // In the configuration: `device_tags = ["name"]` and `default_device`.
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--device-tags", "name", "--default-device", "unnamed"])?;
    let (st, b) = write(&s, "/write?db=benchmark", Some(&s.bearer()), &body)?;
    anyhow::ensure!(st == 204, "{st} {b}");
    let trucks = s.sql_count("SELECT count(DISTINCT device_id) AS n FROM diagnostics")?;
    anyhow::ensure!(trucks == 41, "40 trucks and `unnamed`: {trucks}");
    Ok(())
}

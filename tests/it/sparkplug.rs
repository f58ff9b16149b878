//! Sparkplug B against the real server, with a real Sparkplug edge node (pysparkplug, an
//! implementation of the specification that shares nothing with Ferrite's encoder): births,
//! data by alias, device availability in the registry, commands as DCMD and NCMD, and the
//! bad inputs of the issue (data before a birth, an unknown alias, a death of an older
//! birth, a truncated protobuf), each refused and counted while the rest carries on.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};

/// The edge node script, driven line by line.
struct Edge {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Edge {
    /// Starts the edge node `edge` of `group`; `None` (the test skips) without pysparkplug
    /// outside CI.
    fn start(s: &Server, group: &str, edge: &str, (user, password): (&str, &str)) -> anyhow::Result<Option<Self>> {
        // pysparkplug needs paho-mqtt 1.x: scripts/test.sh installs it in a virtual
        // environment of its own.
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/py-sparkplug/bin/python");
        let python = if std::path::Path::new(venv).exists() { venv } else { "python3" };
        let probe = Command::new(python).args(["-c", "import pysparkplug"]).output();
        if !probe.map(|o| o.status.success()).unwrap_or(false) {
            if std::env::var_os("CI").is_some() {
                anyhow::bail!("pysparkplug must be installed in CI (scripts/test.sh installs it)");
            }
            eprintln!("skipping: run scripts/test.sh (it installs pysparkplug) to run the Sparkplug B test");
            return Ok(None);
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/sparkplug_edge.py");
        let mut child = Command::new(python)
            .arg(script)
            .args([&s.mqtt.ip().to_string(), &s.mqtt.port().to_string(), user, password, group, edge])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let edge = Self { child, stdin, lines };
        edge.expect("ready")?;
        Ok(Some(edge))
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The next line that starts with `prefix` (others are skipped).
    fn expect(&self, prefix: &str) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line =
                self.lines.recv_timeout(left).map_err(|_| anyhow::anyhow!("no {prefix:?} from the edge node"))?;
            if line.starts_with("error") {
                anyhow::bail!("the edge node: {line}");
            }
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }
}

fn online(s: &Server, id: &str) -> anyhow::Result<bool> {
    let (status, body) = s.get(&format!("/api/v1/devices/{id}"))?;
    anyhow::ensure!(status == 200, "{id}: {status} {body}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["online"] == true)
}

/// `SELECT count(*) ...` of stream `plant_1`, 0 while the stream does not exist yet.
fn count(s: &Server, sql: &str) -> anyhow::Result<i64> {
    match s.sql_count(sql) {
        Err(e) if e.to_string().contains("unknown_table") => Ok(0),
        other => other,
    }
}

fn refused(s: &Server, reason: &str) -> anyhow::Result<u64> {
    s.metric(&format!("ferrite_sparkplug_refused_total{{reason=\"{reason}\"}}"))
}

#[test]
fn a_sparkplug_edge_node_births_reports_receives_commands_and_its_bad_messages_are_counted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    // The registry knows the node and its device; a device type says what `write` takes.
    let (st, b) = s.put_json(
        "/api/v1/device-types/pump",
        &json!({"commands": {"write": {"params": {"Running": {"type": "boolean"}}}}}),
    )?;
    anyhow::ensure!(st == 200, "{st} {b}");
    let mut secret = String::new();
    for (id, ty) in [("edge1", "gateway"), ("edge1:pump1", "pump")] {
        let (st, b) = s.post_json("/api/v1/devices", &json!({"id": id, "type": ty}))?;
        anyhow::ensure!(st == 201, "{st} {b}");
        if id == "edge1" {
            secret = b["credentials"]["client_secret"].as_str().unwrap_or_default().to_owned();
        }
    }
    // The edge node is the device `edge1`: the default policies let it publish its own
    // Sparkplug topics (its devices' included) and read its commands, and nothing else.
    for (resource, decision) in
        [("topic::\"spBv1.0/plant-1/DDATA/edge1/pump1\"", "allow"), ("topic::\"spBv1.0/plant-1/NDATA/edge2\"", "deny")]
    {
        let (st, b) = s.post_json(
            "/api/v1/policies/check",
            &json!({"principal": "device::\"edge1\"", "action": "publish", "resource": resource}),
        )?;
        anyhow::ensure!(st == 200 && b["decision"] == decision, "{resource}: {st} {b}");
    }
    let Some(mut edge) = Edge::start(&s, "plant-1", "edge1", ("edge1", &secret))? else { return Ok(()) };

    // NBIRTH: the node's metrics are a row of stream `plant_1`, typed as the birth says.
    edge.send("birth")?;
    edge.expect("connected")?;
    let births = |s: &Server| count(s, "SELECT count(*) AS n FROM plant_1 WHERE device_id = 'edge1'");
    if let Err(e) = s.wait_for("the NBIRTH row", |s| Ok(births(s)? == 1)) {
        // Say what there was (a CI run once found two rows: the script stamped each metric
        // of its birth on its own, and they straddled a millisecond).
        let more: Vec<String> = edge.lines.try_iter().collect();
        let sessions = s.metric("ferrite_mqtt_connections_total")?;
        let messages = s.metric("ferrite_sparkplug_messages_total{type=\"NBIRTH\"}")?;
        anyhow::bail!(
            "{e}: {} rows of edge1, {messages} NBIRTH messages read, {sessions} MQTT connections; the edge node \
             then said {more:?}",
            births(&s)?
        );
    }
    let row = s.sql(
        "SELECT \"Inputs/Temperature\" AS t, \"Outputs/LED\" AS led, \"Counter\" AS c, \"Mode\" AS m, \"Big\" AS big, \
         arrow_typeof(\"Counter\") AS ct, arrow_typeof(\"Big\") AS bt FROM plant_1",
    )?;
    let expected = json!([{"t": 20.5, "led": false, "c": -5, "m": "auto", "big": 9223372036854775813_u64, "ct": "Int64", "bt": "UInt64"}]);
    anyhow::ensure!(Value::Array(row.clone()) == expected, "{row:?}");
    s.wait_for("edge1 online", |s| online(s, "edge1"))?;

    // DBIRTH, then data by alias alone (the birth's types) and by name.
    edge.send("device pump1")?;
    edge.expect("sent DBIRTH")?;
    s.wait_for("pump1 online", |s| online(s, "edge1:pump1"))?;
    edge.send("data 21.75")?;
    edge.send("device_data pump1 2.5")?;
    s.wait_for("the data rows", |s| {
        Ok(count(s, "SELECT count(*) AS n FROM plant_1 WHERE \"Inputs/Temperature\" = 21.75")? == 1
            && count(s, "SELECT count(*) AS n FROM plant_1 WHERE device_id = 'edge1:pump1' AND \"Pressure\" = 2.5")?
                == 1)
    })?;

    // A command to the device goes out as DCMD, its parameter typed as the birth said.
    let (st, b) =
        s.post_json("/api/v1/devices/edge1:pump1/commands", &json!({"name": "write", "params": {"Running": false}}))?;
    anyhow::ensure!(st == 202, "{st} {b}");
    let cmd = edge.expect("cmd")?;
    anyhow::ensure!(cmd.contains("spBv1.0/plant-1/DCMD/edge1/pump1") && cmd.contains("Running=False"), "{cmd}");

    // An unknown alias: that metric refused and counted, the rest of the message kept, and
    // the node asked for a rebirth.
    edge.send("unknown_alias")?;
    let rebirth = edge.expect("cmd")?;
    anyhow::ensure!(rebirth.contains("NCMD/edge1") && rebirth.contains("Node Control/Rebirth=True"), "{rebirth}");
    s.wait_for("the kept metric", |s| {
        Ok(count(s, "SELECT count(*) AS n FROM plant_1 WHERE \"Mode\" = 'manual'")? == 1)
    })?;
    anyhow::ensure!(refused(&s, "unknown_alias")? == 1);

    // A truncated protobuf: refused and counted; the session lives on.
    edge.send("truncated")?;
    s.wait_for("the truncated payload counted", |s| Ok(refused(s, "invalid_payload")? == 1))?;
    // A death of another birth (bdSeq): ignored and counted; the node stays online.
    edge.send("stale_death")?;
    s.wait_for("the stale death counted", |s| Ok(refused(s, "stale_death")? == 1))?;
    anyhow::ensure!(online(&s, "edge1")?, "a stale NDEATH took the node offline");
    edge.send("data 22.5")?;
    s.wait_for("data after the bad messages", |s| {
        Ok(count(s, "SELECT count(*) AS n FROM plant_1 WHERE \"Inputs/Temperature\" = 22.5")? == 1)
    })?;
    anyhow::ensure!(s.metric("ferrite_sparkplug_seq_gaps_total")? == 0, "pysparkplug's seq has no gap");
    // The messages' bytes count as ingested bytes (and toward a tenant's daily bytes).
    let bytes = s.metric("ferrite_ingested_bytes_total{stream=\"plant_1\",transport=\"mqtt\"}")?;
    anyhow::ensure!(bytes > 100, "{bytes} bytes counted");

    // DDEATH: the device goes offline; then the node's session ends: the node does too.
    edge.send("lost pump1")?;
    s.wait_for("pump1 offline", |s| Ok(!online(s, "edge1:pump1")?))?;
    edge.send("quit")?;
    edge.expect("bye")?;
    s.wait_for("edge1 offline", |s| Ok(!online(s, "edge1")?))?;

    // Data from a node that never sent its birth: refused, counted, a rebirth requested.
    let (mut mqtt, _) = crate::mqtt::Raw::connect(&s, "spy", true)?;
    mqtt.subscribe("spBv1.0/plant-1/NCMD/#", rumqttc::mqttbytes::QoS::AtMostOnce)?;
    let token = s.bearer().trim_start_matches("Bearer ").to_owned();
    let Some(mut stranger) = Edge::start(&s, "plant-1", "edge9", ("admin", &token))? else { return Ok(()) };
    stranger.send("stray")?;
    stranger.expect("sent NDATA stray")?;
    let p = mqtt.next_publish()?;
    anyhow::ensure!(p.topic == "spBv1.0/plant-1/NCMD/edge9", "{}", p.topic);
    anyhow::ensure!(refused(&s, "no_birth")? >= 1);
    anyhow::ensure!(count(&s, "SELECT count(*) AS n FROM plant_1 WHERE device_id = 'edge9'")? == 0);
    Ok(())
}

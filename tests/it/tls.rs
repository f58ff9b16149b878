//! TLS on the doors devices use: MQTT over TLS with device certificates (mutual TLS),
//! HTTPS, certificates renewed under live sessions, and MQTT over WebSocket (ws:// and
//! wss://). The peers are real: `ferrite certs dev` makes the certificates, mosquitto_pub
//! and mosquitto_sub (OpenSSL) speak MQTT over TLS, curl speaks HTTPS, openssl s_client
//! reads the served certificate, and paho-mqtt (Python) speaks MQTT over WebSocket.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde_json::json;

use crate::harness::Server;

/// Whether `program` runs; in CI a missing one fails the test (the test command installs it).
fn have(program: &str, probe: &[&str]) -> anyhow::Result<bool> {
    if Command::new(program).args(probe).output().is_ok() {
        return Ok(true);
    }
    if std::env::var_os("CI").is_some() {
        bail!("{program} is not installed; .ci/run installs it");
    }
    eprintln!("skipping: {program} is not installed");
    Ok(false)
}

/// `ferrite certs dev --out dir args...`.
fn certs_dev(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out =
        Command::new(env!("CARGO_BIN_EXE_ferrite")).args(["certs", "dev", "--out"]).arg(dir).args(args).output()?;
    anyhow::ensure!(out.status.success(), "certs dev failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ferrite serve` on `dir` with the server certificate of `pki` and, when `mutual`, its CA
/// as the device CA.
fn serve_tls(dir: &Path, pki: &Path, mutual: bool) -> anyhow::Result<Server> {
    let (cert, key, ca) = (pki.join("server.pem"), pki.join("server.key"), pki.join("ca.pem"));
    let mut flags = vec!["--tls-cert", path_str(&cert)?, "--tls-key", path_str(&key)?];
    if mutual {
        flags.extend(["--tls-client-ca", path_str(&ca)?]);
    }
    Server::start(dir, &flags)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

/// mosquitto_pub over TLS to the server's 8883 listener: (success, stderr).
fn mosquitto_pub_tls(s: &Server, tls: &[String], args: &[&str]) -> anyhow::Result<(bool, String)> {
    let addr = s.mqtts.context("no mqtts listener")?;
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &addr.port().to_string(), "-V", "mqttv311"])
        .args(tls)
        .args(args)
        .output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

fn client_cert(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "--cert".to_owned(),
        dir.join(format!("{name}.pem")).display().to_string(),
        "--key".to_owned(),
        dir.join(format!("{name}.key")).display().to_string(),
    ]
}

fn cafile(pki: &Path) -> Vec<String> {
    vec!["--cafile".to_owned(), pki.join("ca.pem").display().to_string()]
}

#[test]
fn a_device_certificate_is_the_device_identity_and_strangers_are_refused() -> anyhow::Result<()> {
    if !have("mosquitto_pub", &["--help"])? {
        return Ok(());
    }
    let (dir, pki, other) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
    let printed = certs_dev(pki.path(), &["--device", "dev-1", "--device", "ghost"])?;
    assert!(printed.contains("--tls-client-ca"), "certs dev says how to use what it wrote: {printed}");
    // Running it again reuses the CA: a device added later chains to the same root.
    certs_dev(pki.path(), &["--device", "dev-2"])?;
    // A device named like the CA's or the server's files is refused, and they stay.
    let ca_before = std::fs::read(pki.path().join("ca.key"))?;
    assert!(certs_dev(pki.path(), &["--device", "ca"]).is_err());
    assert_eq!(std::fs::read(pki.path().join("ca.key"))?, ca_before);
    // Another CA, with a certificate naming the same device.
    certs_dev(other.path(), &["--device", "dev-1"])?;

    let s = serve_tls(dir.path(), pki.path(), true)?;
    for id in ["dev-1", "dev-2"] {
        let (st, body) = s.post_json("/api/v1/devices", &json!({"id": id}))?;
        assert_eq!(st, 201, "{body}");
    }
    let ca = cafile(pki.path());
    let with = |dir: &Path, name: &str| [ca.clone(), client_cert(dir, name)].concat();
    let publish = |id: &str, seq: u32| {
        vec![
            "-i".to_owned(),
            id.to_owned(),
            "-q".to_owned(),
            "1".to_owned(),
            "-t".to_owned(),
            format!("devices/{id}/telemetry"),
            "-m".to_owned(),
            format!("{{\"seq\": {seq}}}"),
        ]
    };
    let run = |tls: &[String], args: Vec<String>| {
        mosquitto_pub_tls(&s, tls, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // The device by its certificate alone (no username, no password), QoS 1 acknowledged.
    let (ok, err) = run(&with(pki.path(), "dev-1"), publish("dev-1", 1))?;
    assert!(ok, "dev-1 with its certificate: {err}");
    let (ok, err) = run(&with(pki.path(), "dev-2"), publish("dev-2", 2))?;
    assert!(ok, "dev-2, certified by the same CA in a second run: {err}");

    // Policies see the certificate's device: dev-1 may not publish as dev-2 (dropped).
    let mut as_other = publish("dev-1", 3);
    as_other[5] = "devices/dev-2/telemetry".to_owned();
    let (ok, err) = run(&with(pki.path(), "dev-1"), as_other)?;
    assert!(ok, "a denied QoS 1 publish is still acknowledged (MQTT 3.1.1): {err}");

    // Refused at the handshake: a certificate of another CA, and a plaintext client.
    let (ok, err) = run(&with(other.path(), "dev-1"), publish("dev-1", 4))?;
    assert!(!ok, "a certificate of an unknown CA was accepted");
    eprintln!("unknown CA: {err}");
    let addr = s.mqtts.context("no mqtts")?;
    let plain = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "-u", "admin", "-P", &s.token])
        .args(["-q", "1", "-t", "devices/dev-1/telemetry", "-m", r#"{"seq": 5}"#])
        .output()?;
    assert!(!plain.status.success(), "a plaintext client on the TLS port got through");

    // Refused at the CONNECT: a valid certificate of a device that is not registered, and a
    // username that is not the certificate's device.
    let (ok, err) = run(&with(pki.path(), "ghost"), publish("ghost", 6))?;
    assert!(!ok && err.to_lowercase().contains("not authori"), "unregistered device: {ok} {err}");
    let mut claims_other = publish("dev-1", 7);
    claims_other.extend(["-u".to_owned(), "dev-2".to_owned()]);
    let (ok, err) = run(&with(pki.path(), "dev-1"), claims_other)?;
    assert!(!ok, "a certificate for dev-1 connected as dev-2: {err}");

    // Without a client certificate, a CONNECT password over TLS still works.
    let mut admin = publish("dev-1", 8);
    admin.extend(["-u".to_owned(), "admin".to_owned(), "-P".to_owned(), s.token.clone()]);
    let (ok, err) = run(&ca, admin)?;
    assert!(ok, "password over TLS: {err}");

    // A disabled device's certificate no longer gets in.
    let (st, body) = s.post_json("/api/v1/devices/dev-2/disable", &json!({}))?;
    assert_eq!(st, 200, "{body}");
    let (ok, _) = run(&with(pki.path(), "dev-2"), publish("dev-2", 9))?;
    assert!(!ok, "a disabled device connected with its certificate");

    s.wait_for("the accepted events", |s| Ok(s.sql_count("SELECT count(*) FROM telemetry")? >= 3))?;
    let rows = s.sql("SELECT device_id, seq FROM telemetry ORDER BY seq")?;
    assert_eq!(
        serde_json::Value::Array(rows),
        json!([{"device_id": "dev-1", "seq": 1}, {"device_id": "dev-2", "seq": 2}, {"device_id": "dev-1", "seq": 8}])
    );
    assert!(s.metric("ferrite_tls_handshake_failures_total{listener=\"mqtts\"}")? >= 2);
    assert_eq!(s.get("/healthz")?.0, 200);
    Ok(())
}

#[test]
fn a_device_certificate_authenticates_https_requests_like_a_token() -> anyhow::Result<()> {
    if !have("curl", &["--version"])? {
        return Ok(());
    }
    let (dir, pki) = (tempfile::tempdir()?, tempfile::tempdir()?);
    certs_dev(pki.path(), &["--device", "dev-1", "--device", "ghost"])?;
    let s = serve_tls(dir.path(), pki.path(), true)?;
    let (st, body) = s.post_json("/api/v1/devices", &json!({"id": "dev-1"}))?;
    assert_eq!(st, 201, "{body}");
    let https = s.https.context("no https listener")?;
    let post = |cert: Option<&str>, event: serde_json::Value| -> anyhow::Result<u16> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", "--cacert"])
            .arg(pki.path().join("ca.pem"));
        if let Some(name) = cert {
            cmd.args(client_cert(pki.path(), name));
        }
        let out = cmd
            .args(["-H", "Content-Type: application/json", "-d", &event.to_string()])
            .arg(format!("https://localhost:{}/api/v1/streams/telemetry/events", https.port()))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    // The certificate is the credential: no token, the device's own events accepted.
    assert_eq!(post(Some("dev-1"), json!({"device_id": "dev-1", "seq": 1}))?, 200);
    // Bound to its device as with its token: another device's event is rejected (400).
    assert_eq!(post(Some("dev-1"), json!({"device_id": "dev-2", "seq": 2}))?, 400);
    // A certificate of a device that is not registered, and no credential at all: 401.
    assert_eq!(post(Some("ghost"), json!({"device_id": "ghost", "seq": 3}))?, 401);
    assert_eq!(post(None, json!({"device_id": "dev-1", "seq": 4}))?, 401);
    s.wait_for("the accepted event", |s| Ok(s.sql_count("SELECT count(*) FROM telemetry")? >= 1))?;
    assert_eq!(
        serde_json::Value::Array(s.sql("SELECT device_id, seq FROM telemetry")?),
        json!([{"device_id": "dev-1", "seq": 1}])
    );
    Ok(())
}

/// The certificate a TLS listener serves, as base64 DER (via `openssl s_client`).
fn served_certificate(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", "localhost"])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    pem_body(&text).with_context(|| format!("no certificate in s_client's output: {text}"))
}

fn pem_body(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = text[start..].find("-----END CERTIFICATE-----")? + start;
    Some(text[start..end].chars().filter(|c| !c.is_whitespace()).collect())
}

#[test]
fn https_serves_the_api_and_a_renewed_certificate_keeps_live_sessions() -> anyhow::Result<()> {
    if !have("mosquitto_sub", &["--help"])? || !have("curl", &["--version"])? || !have("openssl", &["version"])? {
        return Ok(());
    }
    let (dir, pki) = (tempfile::tempdir()?, tempfile::tempdir()?);
    certs_dev(pki.path(), &[])?;
    let s = serve_tls(dir.path(), pki.path(), false)?;
    let https = s.https.context("no https listener")?;
    let ca = pki.path().join("ca.pem");
    let curl = |path: &str, extra: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&ca)
            .args(extra)
            .arg(format!("https://localhost:{}{path}", https.port()))
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (ok, body) = curl("/healthz", &[])?;
    assert!(ok && body.contains("ok"), "healthz over HTTPS: {body}");
    let auth = format!("Authorization: Bearer {}", s.token);
    let (ok, body) = curl(
        "/api/v1/streams/telemetry/events",
        &["-H", &auth, "-H", "Content-Type: application/json", "-d", r#"{"device_id": "h-1", "v": 1}"#],
    )?;
    assert!(ok, "ingest over HTTPS: {body}");
    let (ok, body) = curl(
        "/api/v1/sql",
        &["-H", &auth, "-H", "Content-Type: application/json", "-d", r#"{"sql": "SELECT v FROM telemetry"}"#],
    )?;
    assert!(ok && body.contains(r#""v":1"#), "SQL over HTTPS: {body}");
    // Plain HTTP on the HTTPS port is refused; the server lives on.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://127.0.0.1:{}/healthz", https.port())])
        .output()?;
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("ok"), "plain HTTP answered on the HTTPS port");

    // A live MQTT over TLS session, subscribed before the renewal.
    let mqtts = s.mqtts.context("no mqtts")?;
    // stdbuf: mosquitto_sub's stdout is a pipe here, line-buffered so that SUBACK is seen.
    let mut sub = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", "localhost", "-p", &mqtts.port().to_string(), "--cafile"])
        .arg(&ca)
        .args(["-u", "admin", "-P", &s.token, "-t", "alerts/renewal", "-C", "1", "-W", "30", "-d", "-V", "mqttv311"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(sub.stdout.take().context("no stdout")?).lines();
    for line in lines.by_ref() {
        if line?.contains("SUBACK") {
            break;
        }
    }

    let before = served_certificate(https)?;
    assert_eq!(before, pem_body(&std::fs::read_to_string(pki.path().join("server.pem"))?).context("pem")?);
    certs_dev(pki.path(), &["--renew"])?;
    s.signal("HUP")?;
    let renewed = pem_body(&std::fs::read_to_string(pki.path().join("server.pem"))?).context("pem")?;
    assert_ne!(before, renewed);
    assert_eq!(served_certificate(https)?, renewed, "HTTPS serves the renewed certificate");
    assert_eq!(served_certificate(mqtts)?, renewed, "MQTT over TLS serves the renewed certificate");

    // The session from before the renewal still receives.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &mqtts.port().to_string(), "--cafile"])
        .arg(&ca)
        .args(["-u", "admin", "-P", &s.token, "-t", "alerts/renewal", "-m", "still here", "-q", "1"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let received: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(sub.wait()?.success());
    assert!(received.iter().any(|l| l == "still here"), "the live session received nothing: {received:?}");
    Ok(())
}

const PAHO: &str = r#"
import json, ssl, sys, threading
import paho.mqtt.client as mqtt
host, port, token, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
got = threading.Event()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ws-client", transport="websockets",
                protocol=mqtt.MQTTv311)
c.ws_set_options(path="/mqtt")
c.username_pw_set("admin", token)
if ca:
    c.tls_set(ca_certs=ca)
c.on_message = lambda client, userdata, msg: got.set() if msg.payload == b"echo" else None
subscribed = threading.Event()
c.on_subscribe = lambda *args: subscribed.set()
c.connect(host, port)
c.loop_start()
c.subscribe("alerts/ws", qos=0)
assert subscribed.wait(20), "no SUBACK"
for seq in range(3):
    info = c.publish("devices/ws-1/telemetry", json.dumps({"seq": seq, "over": "wss" if ca else "ws"}), qos=1)
    info.wait_for_publish(20)
    assert info.is_published(), "no PUBACK"
c.publish("alerts/ws", b"echo", qos=0)
assert got.wait(20), "the subscription received nothing"
c.disconnect()
c.loop_stop()
print("ok")
"#;

#[test]
fn mqtt_over_websocket_on_http_and_https() -> anyhow::Result<()> {
    let paho = Command::new("python3").args(["-c", "import paho.mqtt.client"]).output();
    if !paho.is_ok_and(|o| o.status.success()) {
        if std::env::var_os("CI").is_some() {
            bail!("paho-mqtt (Python) is not installed; .ci/run installs it");
        }
        eprintln!("skipping: paho-mqtt is not installed (pip install paho-mqtt)");
        return Ok(());
    }
    let (dir, pki) = (tempfile::tempdir()?, tempfile::tempdir()?);
    certs_dev(pki.path(), &[])?;
    let s = serve_tls(dir.path(), pki.path(), false)?;
    let https = s.https.context("no https")?;
    let ca = pki.path().join("ca.pem").display().to_string();
    for (host, port, ca) in [("127.0.0.1", s.http.port(), ""), ("localhost", https.port(), ca.as_str())] {
        let out = Command::new("python3")
            .args(["-c", PAHO, host, &port.to_string(), &s.token, ca])
            .stdin(Stdio::null())
            .output()?;
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "paho over {}: {}{}",
            if ca.is_empty() { "ws" } else { "wss" },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    s.wait_for("six events over WebSocket", |s| {
        Ok(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'ws-1'")? == 6)
    })?;
    let over = s.sql("SELECT over, count(*) AS n FROM telemetry GROUP BY over ORDER BY over")?;
    assert_eq!(serde_json::Value::Array(over), json!([{"over": "ws", "n": 3}, {"over": "wss", "n": 3}]));

    // An upgrade without the `mqtt` subprotocol is refused with a reason.
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let mut resp = agent
        .get(&s.url("/mqtt"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .call()?;
    assert_eq!(resp.status().as_u16(), 400);
    let body = resp.body_mut().read_to_string()?;
    assert!(body.contains("Sec-WebSocket-Protocol: mqtt"), "{body}");
    Ok(())
}

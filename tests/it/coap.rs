//! CoAP against a real client (libcoap's `coap-client`, from the distribution's packages)
//! and against datagrams written here from RFC 7252: telemetry in JSON and CBOR durable
//! once answered, commands reaching a device that sleeps through Observe, retransmissions
//! taken once, and bad input (an unknown critical option, a flood from one address, the
//! wrong content format) refused with the reason while the rest goes on.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};

/// libcoap's client: Debian names it by its TLS library.
fn coap_client() -> anyhow::Result<&'static str> {
    for name in ["coap-client-notls", "coap-client", "coap-client-openssl", "coap-client-gnutls"] {
        if Command::new(name).arg("-h").output().is_ok() {
            return Ok(name);
        }
    }
    anyhow::bail!("no coap-client: install libcoap3-bin (scripts/test.sh does)")
}

/// Runs one request with `coap-client`: what it printed (2.xx payloads on stdout, the
/// code and diagnostic of an error on stderr).
fn coap(args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = Command::new(coap_client()?).args(["-B", "20"]).args(args).output()?;
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// A CoAP message, encoded here from RFC 7252 §3 (not with the server's library).
fn message(kind: u8, code: u8, mid: u16, token: &[u8], options: &[(u16, &[u8])], payload: &[u8]) -> Vec<u8> {
    fn nibble(v: usize) -> (u8, Vec<u8>) {
        match v {
            0..=12 => (v as u8, Vec::new()),
            13..=268 => (13, vec![(v - 13) as u8]),
            _ => (14, ((v - 269) as u16).to_be_bytes().to_vec()),
        }
    }
    let mut m = vec![0x40 | kind << 4 | token.len() as u8, code];
    m.extend_from_slice(&mid.to_be_bytes());
    m.extend_from_slice(token);
    let mut last = 0;
    for (number, value) in options {
        let (d, dext) = nibble(usize::from(number - last));
        let (l, lext) = nibble(value.len());
        last = *number;
        m.push(d << 4 | l);
        m.extend(dext);
        m.extend(lext);
        m.extend_from_slice(value);
    }
    if !payload.is_empty() {
        m.push(0xff);
        m.extend_from_slice(payload);
    }
    m
}

const CON: u8 = 0;
const POST: u8 = 0x02;

/// A confirmable `POST /telemetry?u={device}` of `body`.
fn post_telemetry(mid: u16, device: &str, body: &[u8]) -> Vec<u8> {
    let query = format!("u={device}");
    message(CON, POST, mid, &mid.to_be_bytes(), &[(11, b"telemetry"), (15, query.as_bytes())], body)
}

/// The next datagram `socket` receives (its read timeout is [`TIMEOUT`]).
fn receive(socket: &UdpSocket) -> anyhow::Result<Vec<u8>> {
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).context("no answer")?;
    Ok(buf[..n].to_vec())
}

fn socket(local: &str, server: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = UdpSocket::bind(local)?;
    s.connect(server)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

#[test]
fn coap_telemetry_in_json_and_cbor_is_durable_once_answered_and_bad_requests_say_why() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--auth", "off"])?;
    let base = format!("coap://{}", s.coap.context("no coap listener")?);

    // JSON, confirmable (coap-client's default): answered 2.04, nothing on stderr.
    let (_, err) = coap(&["-m", "post", "-t", "json", "-e", r#"{"temp":21.5}"#, &format!("{base}/telemetry?u=c-1")])?;
    assert_eq!(err.trim(), "", "a clean 2.04");
    // CBOR ({"power": 3.5, "on": true}) into another stream.
    let cbor = [0xa2, 0x65, b'p', b'o', b'w', b'e', b'r', 0xfb, 0x40, 0x0c, 0, 0, 0, 0, 0, 0, 0x62, b'o', b'n', 0xf5];
    let file = dir.path().join("reading.cbor");
    std::fs::write(&file, cbor)?;
    let file = file.display().to_string();
    let (_, err) = coap(&["-m", "post", "-t", "cbor", "-f", &file, &format!("{base}/telemetry/power?u=c-1")])?;
    assert_eq!(err.trim(), "");
    // A batch with one bad event: the good ones kept, the bad one reported in the 2.04.
    let batch = json!([{"temp": 20}, {"temp": "warm"}, {"temp": 22}]).to_string();
    let (out, err) = coap(&["-m", "post", "-t", "json", "-e", &batch, &format!("{base}/telemetry?u=c-1")])?;
    assert_eq!(err.trim(), "");
    let report: Value = serde_json::from_str(out.trim()).with_context(|| format!("report {out:?}"))?;
    assert_eq!((report["accepted"].as_u64(), report["rejected"].as_u64()), (Some(2), Some(1)), "{report}");

    // Refusals, each with its code and the reason.
    for (args, code, why) in [
        (vec!["-m", "post", "-t", "json", "-e", "{\"temp\":", "/telemetry?u=c-1"], "4.00", "malformed"),
        (vec!["-m", "post", "-t", "0", "-e", "21.5", "/telemetry?u=c-1"], "4.15", "application/json"),
        (vec!["-m", "post", "-t", "json", "-e", "{}", "-O", "65001,0x01", "/telemetry?u=c-1"], "4.02", "critical"),
        (vec!["-m", "post", "-t", "json", "-e", "{\"t\":1}", "/telemetry"], "4.00", "name the device"),
        (vec!["-m", "get", "/commands?u=c-1"], "4.00", "Observe"),
        (vec!["-m", "delete", "/telemetry?u=c-1"], "4.05", "POST"),
        (vec!["-m", "get", "/"], "4.04", "well-known"),
    ] {
        let mut args = args;
        let uri = format!("{base}{}", args.pop().unwrap_or_default());
        args.push(&uri);
        let (_, err) = coap(&args)?;
        assert!(err.contains(code) && err.contains(why), "{args:?}: want {code} ({why}), got {err:?}");
    }
    assert!(s.metric("ferrite_coap_refused_total{reason=\"bad_option\"}")? >= 1);
    // Discovery.
    let (out, _) = coap(&["-m", "get", &format!("{base}/.well-known/core")])?;
    assert!(out.contains("</telemetry>") && out.contains("</commands>;rt=\"ferrite.commands\";obs"), "{out}");

    // With identity off, a whole topic names the device: its commands reach the observer.
    let (st, d) = s.post_json("/api/v1/devices", &json!({"id": "open-1"}))?;
    assert_eq!(st, 201, "{d}");
    let observer = Observer::start(&format!("{base}/devices/open-1/commands"))?;
    let (st, ping) = s.post_json("/api/v1/devices/open-1/commands", &json!({"name": "reboot"}))?;
    assert_eq!(st, 202, "{ping}");
    assert_eq!(observer.next_command()?["id"], ping["id"]);
    drop(observer);

    // Answered means in the WAL: killed at once, the restarted server has every row.
    s.kill()?;
    let s = Server::start(dir.path(), &["--auth", "off"])?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'c-1'")?, 3);
    let rows = s.sql("SELECT power, \"on\" FROM power WHERE device_id = 'c-1'")?;
    assert_eq!(rows, vec![json!({"power": 3.5, "on": true})]);
    Ok(())
}

#[test]
fn coap_retransmissions_are_taken_once_pings_reset_and_a_flood_from_one_address_is_throttled() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--auth", "off", "--coap-max-rate-per-ip", "50"])?;
    let server = s.coap.context("no coap listener")?;
    let a = socket("127.0.0.1:0", server)?;

    // A ping (an empty confirmable message) is answered with a reset of its message id.
    a.send(&message(CON, 0, 0x0101, &[], &[], &[]))?;
    let rst = receive(&a)?;
    assert_eq!((rst[0] >> 4 & 3, rst[1], &rst[2..4]), (3, 0, &[0x01, 0x01][..]), "RST {rst:?}");

    // A confirmable POST and its retransmission (same message id): one row, the same answer.
    let post = post_telemetry(0x2000, "dup-1", br#"{"n":1}"#);
    a.send(&post)?;
    let first = receive(&a)?;
    assert_eq!((first[0] >> 4 & 3, first[1]), (2, 0x44), "ACK 2.04 {first:?}");
    a.send(&post)?;
    let again = receive(&a)?;
    assert_eq!(again, first, "the retransmission is answered from the exchange cache");
    assert_eq!(s.metric("ferrite_coap_duplicates_total")?, 1);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'dup-1'")?, 1);

    // A flood from one address: past 50 a second, dropped and counted, with a 4.29 to say so.
    // Sent in bursts until the 4.29 comes (the kernel drops what overflows the server's
    // socket buffer, so a burst may not reach the limit on a slow machine).
    a.set_read_timeout(Some(Duration::from_millis(200)))?;
    let (mut sent, mut throttled) = (0u16, false);
    let deadline = Instant::now() + TIMEOUT;
    while !throttled && Instant::now() < deadline {
        for _ in 0..100 {
            a.send(&post_telemetry(0x3000 + sent, "flood-1", br#"{"n":1}"#))?;
            sent += 1;
        }
        let mut buf = [0u8; 2048];
        while let Ok(n) = a.recv(&mut buf) {
            if buf[1] == 0x9d {
                throttled = true;
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(text.contains("requests a second"), "{text}");
            }
        }
    }
    assert!(throttled, "no 4.29 after {sent} requests");
    assert!(s.metric("ferrite_coap_refused_total{reason=\"throttled\"}")? > 0);
    // Another address is served meanwhile.
    let b = socket("127.0.0.2:0", server)?;
    b.send(&post_telemetry(0x0001, "other-1", br#"{"n":1}"#))?;
    assert_eq!(receive(&b)?[1], 0x44, "another address gets 2.04");
    // Malformed datagrams are counted and the server lives on.
    a.send(&[0x40])?;
    a.send(&[0x40, 0x02, 0x00, 0x01, 0xd1])?;
    let ok = socket("127.0.0.3:0", server)?;
    ok.send(&post_telemetry(0x0002, "other-2", br#"{"n":2}"#))?;
    assert_eq!(receive(&ok)?[1], 0x44);
    let kept = s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'flood-1'")?;
    assert!(kept > 0 && kept < i64::from(sent), "kept {kept} of {sent}");
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id LIKE 'other-%'")?, 2);
    Ok(())
}

/// Lines a long-running `coap-client -s` prints, as they come.
struct Observer {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Observer {
    fn start(uri: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(coap_client()?)
            .args(["-s", "60", "-B", "60", "-w", "-m", "get", uri])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// The next command notified.
    fn next_command(&self) -> anyhow::Result<Value> {
        loop {
            let line = self.lines.recv_timeout(TIMEOUT).context("no notification")?;
            if let Ok(v) = serde_json::from_str::<Value>(line.trim())
                && v.get("id").is_some()
            {
                return Ok(v);
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_coap_device_proves_who_it_is_and_gets_its_commands_through_observe_after_sleeping() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let base = format!("coap://{}", s.coap.context("no coap listener")?);
    let (st, d) = s.post_json("/api/v1/devices", &json!({"id": "sleepy"}))?;
    assert_eq!(st, 201, "{d}");
    let secret = d["credentials"]["client_secret"].as_str().unwrap_or_default().to_owned();
    let me = format!("u=sleepy&p={secret}");

    // Who it is: nothing, a wrong secret, another device's topic.
    let reading = r#"{"temp":19}"#;
    for (uri, code) in [
        (format!("{base}/telemetry"), "4.01"),
        (format!("{base}/telemetry?u=sleepy&p=wrong"), "4.01"),
        (format!("{base}/devices/someone-else/telemetry?{me}"), "4.03"),
    ] {
        let (_, err) = coap(&["-m", "post", "-t", "json", "-e", reading, &uri])?;
        assert!(err.contains(code), "{uri}: want {code}, got {err:?}");
    }
    let (_, err) = coap(&["-m", "post", "-t", "json", "-e", reading, &format!("{base}/telemetry?{me}")])?;
    assert_eq!(err.trim(), "");
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'sleepy'")?, 1);

    // A command while it sleeps waits.
    let (st, lock) = s.post_json("/api/v1/devices/sleepy/commands", &json!({"name": "lock", "timeout": 600}))?;
    assert_eq!((st, lock["status"].as_str()), (202, Some("queued")), "{lock}");
    let lock_id = lock["id"].as_str().unwrap_or_default().to_owned();
    let status = |id: &str| -> anyhow::Result<String> {
        let (_, body) = s.get(&format!("/api/v1/devices/sleepy/commands/{id}"))?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["status"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(status(&lock_id)?, "queued");

    // It wakes and observes its commands: what waited arrives, and its ACK is the delivery.
    let observer = Observer::start(&format!("{base}/commands?{me}"))?;
    let got = observer.next_command()?;
    assert_eq!((&got["id"], &got["name"]), (&json!(lock_id), &json!("lock")), "{got}");
    s.wait_for("the lock delivered", |_| Ok(status(&lock_id)? == "delivered"))?;
    // While it observes, a new command arrives at once.
    let (st, reboot) = s.post_json("/api/v1/devices/sleepy/commands", &json!({"name": "reboot"}))?;
    assert_eq!(st, 202, "{reboot}");
    let reboot_id = reboot["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(observer.next_command()?["id"], json!(reboot_id));
    s.wait_for("the reboot delivered", |_| Ok(status(&reboot_id)? == "delivered"))?;

    // Its answer, posted to /commands/result, closes the command.
    let answer = json!({"id": lock_id, "status": "succeeded", "result": {"locked": true}}).to_string();
    let (_, err) = coap(&["-m", "post", "-t", "json", "-e", &answer, &format!("{base}/commands/result?{me}")])?;
    assert_eq!(err.trim(), "");
    s.wait_for("the lock succeeded", |_| Ok(status(&lock_id)? == "succeeded"))?;
    assert_eq!(s.metric("ferrite_coap_observations")?, 1);

    // It reboots and observes from a new address: the new registration takes over.
    let server = s.coap.context("no coap listener")?;
    let register = |socket: &UdpSocket, mid: u16| -> anyhow::Result<()> {
        let (u, p) = ("u=sleepy".to_owned(), format!("p={secret}"));
        let options: [(u16, &[u8]); 4] = [(6, &[]), (11, b"commands"), (15, u.as_bytes()), (15, p.as_bytes())];
        socket.send(&message(CON, 0x01, mid, b"obs", &options, &[]))?;
        let answer = receive(socket)?;
        assert_eq!((answer[0] >> 4 & 3, answer[1]), (2, 0x45), "ACK 2.05 {answer:?}");
        assert!(parse(&answer).0.iter().any(|(n, _)| *n == 6), "the registration is confirmed with Observe");
        Ok(())
    };
    let rebooted = socket("127.0.0.4:0", server)?;
    register(&rebooted, 0x0100)?;
    let (_, wipe) = s.post_json("/api/v1/devices/sleepy/commands", &json!({"name": "wipe"}))?;
    let wipe_id = wipe["id"].as_str().unwrap_or_default().to_owned();
    let notification = receive(&rebooted)?;
    assert_eq!((notification[0] >> 4 & 3, notification[1]), (0, 0x45), "a CON 2.05 notification");
    let command: Value = serde_json::from_slice(parse(&notification).1)?;
    assert_eq!(command["id"], json!(wipe_id));
    // It resets the notification (it cannot take it now): the command goes back to the queue.
    let mut rst = message(3, 0, u16::from_be_bytes([notification[2], notification[3]]), &[], &[], &[]);
    rst.truncate(4);
    rebooted.send(&rst)?;
    s.wait_for("the wipe queued again", |_| Ok(status(&wipe_id)? == "queued"))?;
    // Observing again, it gets the command and acknowledges it: delivered.
    let again = socket("127.0.0.5:0", server)?;
    register(&again, 0x0200)?;
    let notification = receive(&again)?;
    let command: Value = serde_json::from_slice(parse(&notification).1)?;
    assert_eq!(command["id"], json!(wipe_id));
    again.send(&message(2, 0, u16::from_be_bytes([notification[2], notification[3]]), &[], &[], &[]))?;
    s.wait_for("the wipe delivered", |_| Ok(status(&wipe_id)? == "delivered"))?;
    drop(observer);
    Ok(())
}

/// The options (number, value) and payload of a message, read from RFC 7252 §3.1.
fn parse(m: &[u8]) -> (Vec<(u16, Vec<u8>)>, &[u8]) {
    let mut i = 4 + usize::from(m[0] & 0x0f);
    let (mut number, mut options) = (0u16, Vec::new());
    let extended = |i: &mut usize, v: u8| -> usize {
        match v {
            13 => {
                *i += 1;
                usize::from(m[*i - 1]) + 13
            }
            14 => {
                *i += 2;
                usize::from(u16::from_be_bytes([m[*i - 2], m[*i - 1]])) + 269
            }
            v => usize::from(v),
        }
    };
    while i < m.len() && m[i] != 0xff {
        let (d, l) = (m[i] >> 4, m[i] & 0x0f);
        i += 1;
        number += extended(&mut i, d) as u16;
        let len = extended(&mut i, l);
        options.push((number, m[i..i + len].to_vec()));
        i += len;
    }
    (options, m.get(i + 1..).unwrap_or_default())
}

#[test]
fn a_taken_default_coap_port_leaves_the_server_up_without_coap_and_a_taken_chosen_one_stops_it() -> anyhow::Result<()> {
    // Hold the default port, as another CoAP server (or a second Ferrite) on the machine would.
    let Ok(_holder) = UdpSocket::bind("0.0.0.0:5683") else {
        eprintln!("skipping: UDP 5683 is already taken on this machine");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let serve = |coap: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferrite"));
        c.args(["serve", "--data-dir"]).arg(dir.path()).args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--pg-listen",
            "off",
            "--flight-listen",
            "off",
            "--auth",
            "off",
            "--log",
            "warn",
        ]);
        c.args(coap).env_remove("FERRITE_COAP_LISTEN").stderr(Stdio::piped()).stdout(Stdio::piped());
        c
    };
    // The default address taken: the server starts without CoAP, and says why.
    let mut child = serve(&[]).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let _ = child.kill();
    let out = child.wait_with_output()?;
    assert!(line.starts_with("ferrite listening:") && !line.contains("coap="), "{line:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("CoAP is off: its default port is taken"), "{log}");
    // Another address asked for and taken: the start stops with the reason.
    let taken = UdpSocket::bind("127.0.0.1:0")?;
    let asked = taken.local_addr()?.to_string();
    let out = serve(&["--coap-listen", &asked]).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen for CoAP") && err.contains("--coap-listen"), "{err}");
    Ok(())
}

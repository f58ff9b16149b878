//! MQTT ingest with real clients: rumqttc (QoS 0 and 1) and the mosquitto_pub CLI.

use std::time::Duration;

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

use crate::harness::{Server, TIMEOUT};

pub(crate) fn client(s: &Server, id: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, s.mqtt.ip().to_string(), s.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    // The admin may publish and subscribe for any device.
    opts.set_credentials("admin", s.token.clone());
    AsyncClient::new(opts, 100)
}

/// Polls the event loop until `pred` matches an incoming packet.
pub(crate) async fn until(ev: &mut EventLoop, mut pred: impl FnMut(&Packet) -> bool) -> anyhow::Result<Packet> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(p)) if pred(&p) => return Ok(p),
                Ok(_) => {}
                Err(e) => bail!("mqtt connection error: {e}"),
            }
        }
    })
    .await
    .context("timed out waiting for an MQTT packet")?
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

#[test]
fn qos1_puback_means_committed_and_queryable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    runtime()?.block_on(async {
        let (c, mut ev) = client(&s, "dev-1");
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        for i in 0..20 {
            let payload = format!(r#"{{"ts": {}, "temperature": {i}.5, "door": "open"}}"#, 1_764_000_000_000i64 + i);
            c.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, payload).await?;
            until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
            // The PUBACK came after the WAL commit, so the event is already queryable.
            assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, i + 1);
        }
        // An array payload on a named stream.
        c.publish("devices/dev-1/telemetry/power", QoS::AtLeastOnce, false, r#"[{"watts": 1}, {"watts": 2}]"#).await?;
        until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
        assert_eq!(s.sql_count("SELECT count(*) FROM power WHERE device_id = 'dev-1'")?, 2);

        // QoS 0: no acknowledgement; the event still lands.
        c.publish("devices/dev-2/telemetry", QoS::AtMostOnce, false, r#"{"temperature": 99}"#).await?;
        c.publish("devices/dev-1/telemetry", QoS::AtLeastOnce, false, r#"{"temperature": 1}"#).await?;
        until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
        s.wait_for("the QoS 0 event", |s| {
            Ok(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'dev-2'")? == 1)
        })?;
        anyhow::Ok(())
    })?;
    assert_eq!(s.metric("ferrite_mqtt_messages_total{qos=\"1\"}")?, 22);
    assert_eq!(s.metric("ferrite_ingested_events_total{stream=\"telemetry\",transport=\"mqtt\"}")?, 22);
    Ok(())
}

#[test]
fn bad_mqtt_payloads_are_counted_and_the_session_lives_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--max-payload", "1KiB"])?;
    runtime()?.block_on(async {
        let (c, mut ev) = client(&s, "bad-dev");
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        let cases: [(&str, Vec<u8>); 5] = [
            ("devices/d/telemetry", b"{not json".to_vec()),
            ("devices/d/telemetry", b"42".to_vec()),
            ("devices/d/telemetry", format!("[{}]", vec![r#"{"t":1}"#; 300].join(",")).into_bytes()),
            ("devices/d/telemetry/bad-stream", br#"{"t":1}"#.to_vec()),
            ("devices/d/telemetry", br#"[{"t": 1}, {"t": "x"}, {"t": 2}]"#.to_vec()),
        ];
        for (topic, payload) in cases {
            c.publish(topic, QoS::AtLeastOnce, false, payload).await?;
            until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
        }
        anyhow::Ok(())
    })?;
    let m =
        |reason: &str| s.metric(&format!("ferrite_rejected_events_total{{transport=\"mqtt\",reason=\"{reason}\"}}"));
    assert_eq!(m("malformed_json")?, 1);
    assert_eq!(m("not_an_object")?, 1);
    assert_eq!(m("payload_too_large")?, 1);
    assert_eq!(m("invalid_topic")?, 1);
    assert_eq!(m("type_conflict")?, 1);
    // The good events of the mixed array were kept.
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 2);
    Ok(())
}

#[test]
fn a_burst_of_qos0_messages_is_batched_and_a_bad_one_loses_nothing_else() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    runtime()?.block_on(async {
        let (c, mut ev) = client(&s, "burst");
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        // Publish from a task while this one drives the event loop (the client's request
        // queue is bounded).
        let publisher = tokio::spawn(async move {
            for i in 0..300 {
                let payload = match i {
                    100 => "{broken".to_owned(),
                    200 => r#"[{"seq": 200}, {"seq": 200.5}]"#.to_owned(),
                    _ => format!(r#"{{"seq": {i}}}"#),
                };
                let device = if i % 2 == 0 { "even" } else { "odd" };
                c.publish(format!("devices/{device}/telemetry"), QoS::AtMostOnce, false, payload).await?;
            }
            anyhow::Ok(c)
        });
        let mut sent = 0;
        tokio::time::timeout(TIMEOUT, async {
            while sent < 300 {
                if let Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) = ev.poll().await {
                    sent += 1;
                }
            }
        })
        .await?;
        let _client = publisher.await??;
        anyhow::Ok(())
    })?;
    // QoS 0 has no acknowledgement: the stream may not even exist when the publisher is done.
    s.wait_for("300 events", |s| {
        let (hot, archived) = s.rows("telemetry")?;
        Ok(hot + archived >= 300 && s.sql_count("SELECT count(*) FROM telemetry")? == 300)
    })?;
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'even'")?, 150, "149 + 2 from the array");
    assert_eq!(s.metric("ferrite_rejected_events_total{transport=\"mqtt\",reason=\"malformed_json\"}")?, 1);
    Ok(())
}

#[test]
fn messages_are_routed_to_subscribers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    runtime()?.block_on(async {
        let (device, mut dev_ev) = client(&s, "dev-9");
        until(&mut dev_ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        device.subscribe("devices/dev-9/commands", QoS::AtLeastOnce).await?;
        until(&mut dev_ev, |p| matches!(p, Packet::SubAck(_))).await?;

        let (app, mut app_ev) = client(&s, "operator");
        until(&mut app_ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        app.publish("devices/dev-9/commands", QoS::AtLeastOnce, false, r#"{"id":"1","name":"reboot","params":{}}"#)
            .await?;
        until(&mut app_ev, |p| matches!(p, Packet::PubAck(_))).await?;
        let got = until(&mut dev_ev, |p| matches!(p, Packet::Publish(_))).await?;
        let Packet::Publish(p) = got else { bail!("not a publish") };
        assert_eq!(p.topic, "devices/dev-9/commands");
        assert!(String::from_utf8_lossy(&p.payload).contains("reboot"));
        anyhow::Ok(())
    })
}

#[test]
fn mosquitto_pub_lands_in_sql() -> anyhow::Result<()> {
    if std::process::Command::new("mosquitto_pub").arg("--help").output().is_err() {
        if std::env::var_os("CI").is_some() {
            bail!("mosquitto_pub is not installed; .ci/run installs it");
        }
        eprintln!("skipping: mosquitto_pub is not installed (apt-get install mosquitto-clients)");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    for (qos, payload) in
        [("1", r#"{"temperature": 21.5, "door": "open"}"#), ("0", r#"[{"temperature": 1}, {"temperature": 2}]"#)]
    {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", &s.mqtt.ip().to_string(), "-p", &s.mqtt.port().to_string()])
            .args(["-u", "admin", "-P", &s.token])
            .args(["-V", "mqttv311", "-q", qos, "-t", "devices/sensor-7/telemetry", "-m", payload])
            .output()?;
        assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    s.wait_for("3 events from mosquitto_pub", |s| {
        Ok(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'sensor-7'")? == 3)
    })?;
    Ok(())
}

/// Regression: a non-ASCII topic panicked in rumqttc's matcher once any subscription
/// existed, killing the publisher's session, and (through a rule's `then publish`) the
/// shard thread with every device on it.
#[test]
fn non_ascii_topics_are_routed_and_kill_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let rule = "rule umlaut {\n    from telemetry[temperature > 0]\n    select device_id, temperature\n    then publish 'ü/{device_id}' {\"t\": \"{temperature}\"}\n}\n";
    s.post_json("/api/v1/streams/telemetry/events", &serde_json::json!({"device_id": "warm", "temperature": 0.0}))?;
    let (status, body) = s.post("/api/v1/rules", "text/plain", rule.as_bytes())?;
    assert_eq!(status / 100, 2, "{body}");
    runtime()?.block_on(async {
        let (sub, mut sub_ev) = client(&s, "watcher");
        until(&mut sub_ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        sub.subscribe("#", QoS::AtMostOnce).await?;
        until(&mut sub_ev, |p| matches!(p, Packet::SubAck(_))).await?;

        // A client publishes on a topic whose first character is two bytes long.
        let (c, mut ev) = client(&s, "pub-1");
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        c.publish("é/x", QoS::AtLeastOnce, false, "hello").await?;
        until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
        until(&mut sub_ev, |p| matches!(p, Packet::Publish(m) if m.topic == "é/x")).await?;

        // A rule publishes on a non-ASCII topic from the shard thread.
        c.publish("devices/dev-ü/telemetry", QoS::AtLeastOnce, false, r#"{"temperature": 3}"#).await?;
        until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
        until(&mut sub_ev, |p| matches!(p, Packet::Publish(m) if m.topic == "ü/dev-ü")).await?;
        anyhow::Ok(())
    })?;
    // Both shards still take data.
    let (status, body) =
        s.post_json("/api/v1/streams/telemetry/events", &serde_json::json!(crate::harness::events(0, 50, 10)))?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 52);
    Ok(())
}

/// MQTT forbids wildcards in a publish topic (client libraries refuse to send one, so this
/// speaks the protocol by hand): the session is closed, the server lives on.
#[test]
fn a_wildcard_publish_topic_closes_only_that_session() -> anyhow::Result<()> {
    use std::io::{Read, Write};

    use rumqttc::mqttbytes::v4::{Connect, Packet as Raw, Publish};
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let mut conn = std::net::TcpStream::connect(s.mqtt)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    let mut out = bytes::BytesMut::new();
    let mut connect = Connect::new("wild");
    connect.set_login("admin", &s.token);
    Raw::Connect(connect).write(&mut out, 1 << 20)?;
    let mut publish = Publish::new("devices/+/telemetry", rumqttc::mqttbytes::QoS::AtLeastOnce, b"{}".to_vec());
    publish.pkid = 1;
    Raw::Publish(publish).write(&mut out, 1 << 20)?;
    conn.write_all(&out)?;
    let mut got = Vec::new();
    conn.read_to_end(&mut got)?; // returns once the server closes the connection
    assert_eq!(got.first(), Some(&0x20), "a CONNACK, then the close, and no PUBACK: {got:?}");
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(s.metric("ferrite_rejected_events_total{transport=\"mqtt\",reason=\"invalid_topic\"}")?, 1);
    let (status, _) =
        s.post_json("/api/v1/streams/telemetry/events", &serde_json::json!({"device_id": "d", "v": 1}))?;
    assert_eq!(status, 200);
    Ok(())
}

/// A raw MQTT 3.1.1 connection on rumqttc's codec, so a test can lose a PUBREC on purpose,
/// or never acknowledge, or never read.
pub(crate) struct Raw {
    pub(crate) stream: std::net::TcpStream,
    buf: bytes::BytesMut,
}

impl Raw {
    pub(crate) fn connect(s: &Server, client_id: &str, clean_session: bool) -> anyhow::Result<(Self, bool)> {
        Self::connect_with_will(s, client_id, clean_session, None)
    }

    /// Connects as the admin, with `will` as the last will.
    pub(crate) fn connect_with_will(
        s: &Server,
        client_id: &str,
        clean_session: bool,
        will: Option<rumqttc::mqttbytes::v4::LastWill>,
    ) -> anyhow::Result<(Self, bool)> {
        use rumqttc::mqttbytes::v4::{Connect, Login};
        let stream = std::net::TcpStream::connect(s.mqtt)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let mut raw = Self { stream, buf: bytes::BytesMut::new() };
        let mut connect = Connect::new(client_id);
        connect.clean_session = clean_session;
        connect.last_will = will;
        connect.login = Some(Login::new("admin", s.token.clone()));
        raw.send(rumqttc::mqttbytes::v4::Packet::Connect(connect))?;
        match raw.read()? {
            rumqttc::mqttbytes::v4::Packet::ConnAck(a) => {
                anyhow::ensure!(a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success, "refused: {a:?}");
                Ok((raw, a.session_present))
            }
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    pub(crate) fn send(&mut self, p: rumqttc::mqttbytes::v4::Packet) -> anyhow::Result<()> {
        use std::io::Write;
        let mut b = bytes::BytesMut::new();
        p.write(&mut b, 1 << 20)?;
        self.stream.write_all(&b)?;
        Ok(())
    }

    pub(crate) fn read(&mut self) -> anyhow::Result<rumqttc::mqttbytes::v4::Packet> {
        use std::io::Read;
        loop {
            match rumqttc::mqttbytes::v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => bail!("bad packet from the server: {e}"),
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Subscribes to one filter; the QoS the server granted.
    pub(crate) fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<QoS> {
        use rumqttc::mqttbytes::v4::{Packet as P, Subscribe, SubscribeReasonCode};
        let mut sub = Subscribe::new(filter, qos);
        sub.pkid = 1;
        self.send(P::Subscribe(sub))?;
        match self.read()? {
            P::SubAck(a) => match a.return_codes.first() {
                Some(SubscribeReasonCode::Success(q)) => Ok(*q),
                other => bail!("subscription to {filter} refused: {other:?}"),
            },
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes; at QoS 1, waits for the PUBACK (skipping deliveries to this client).
    pub(crate) fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        pkid: u16,
        retain: bool,
        payload: &str,
    ) -> anyhow::Result<()> {
        use rumqttc::mqttbytes::v4::{Packet as P, Publish};
        let mut p = Publish::new(topic, qos, payload);
        p.pkid = pkid;
        p.retain = retain;
        self.send(P::Publish(p))?;
        if qos == QoS::AtMostOnce {
            return Ok(());
        }
        loop {
            match self.read()? {
                P::PubAck(a) if a.pkid == pkid => return Ok(()),
                P::Publish(_) => {}
                other => bail!("expected PUBACK {pkid}, got {other:?}"),
            }
        }
    }

    /// The next message delivered to this client.
    pub(crate) fn next_publish(&mut self) -> anyhow::Result<rumqttc::mqttbytes::v4::Publish> {
        match self.read()? {
            rumqttc::mqttbytes::v4::Packet::Publish(p) => Ok(p),
            other => bail!("expected a PUBLISH, got {other:?}"),
        }
    }

    /// Acknowledges a QoS 1 delivery.
    pub(crate) fn ack(&mut self, pkid: u16) -> anyhow::Result<()> {
        self.send(rumqttc::mqttbytes::v4::Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(pkid)))
    }

    /// A round trip: once the PINGRESP is back, the server has handled everything sent before.
    pub(crate) fn ping(&mut self) -> anyhow::Result<()> {
        self.send(rumqttc::mqttbytes::v4::Packet::PingReq)?;
        loop {
            match self.read()? {
                rumqttc::mqttbytes::v4::Packet::PingResp => return Ok(()),
                rumqttc::mqttbytes::v4::Packet::Publish(_) => {}
                other => bail!("expected PINGRESP, got {other:?}"),
            }
        }
    }

    fn publish_qos2(&mut self, topic: &str, pkid: u16, dup: bool, payload: &str) -> anyhow::Result<()> {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(topic, rumqttc::mqttbytes::QoS::ExactlyOnce, payload);
        p.pkid = pkid;
        p.dup = dup;
        self.send(rumqttc::mqttbytes::v4::Packet::Publish(p))?;
        match self.read()? {
            rumqttc::mqttbytes::v4::Packet::PubRec(r) if r.pkid == pkid => Ok(()),
            other => bail!("expected PUBREC {pkid}, got {other:?}"),
        }
    }
}

#[test]
fn a_kept_session_takes_a_qos2_retransmission_once_after_a_cut() -> anyhow::Result<()> {
    use rumqttc::mqttbytes::v4::{Packet as P, PubRel};
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let count = |s: &Server| s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'q2'");

    // First connection of a persistent session: nothing kept yet.
    let (mut a, present) = Raw::connect(&s, "q2-client", false)?;
    assert!(!present, "a first connection has no session to resume");
    a.send(P::Subscribe(rumqttc::mqttbytes::v4::Subscribe::new(
        "devices/q2/commands",
        rumqttc::mqttbytes::QoS::AtMostOnce,
    )))?;
    assert!(matches!(a.read()?, P::SubAck(_)));
    a.publish_qos2("devices/q2/telemetry", 7, false, r#"{"v": 1}"#)?;
    assert_eq!(count(&s)?, 1);
    // The PUBREC is "lost": the connection is cut before the PUBREL.
    drop(a);

    // The client cannot know the message was taken: it resumes and retransmits.
    let mut b = s_wait_resumed(&s, "q2-client")?;
    b.publish_qos2("devices/q2/telemetry", 7, true, r#"{"v": 1}"#)?;
    b.send(P::PubRel(PubRel::new(7)))?;
    assert!(matches!(b.read()?, P::PubComp(c) if c.pkid == 7));
    assert_eq!(count(&s)?, 1, "the retransmission of a taken QoS 2 message is not ingested again");
    // The kept subscription was restored: a command reaches the resumed session.
    let (status, _) = s.post("/api/v1/devices", "application/json", br#"{"id": "q2-other"}"#)?;
    assert_eq!(status, 201);
    let (c, mut ev) = client(&s, "q2-publisher");
    runtime()?.block_on(async {
        until(&mut ev, |p| matches!(p, Packet::ConnAck(_))).await?;
        c.publish("devices/q2/commands", QoS::AtLeastOnce, false, r#"{"id":"c1","name":"x","params":{}}"#).await?;
        until(&mut ev, |p| matches!(p, Packet::PubAck(_))).await?;
        anyhow::Ok(())
    })?;
    assert!(matches!(b.read()?, P::Publish(p) if p.topic == "devices/q2/commands"));
    drop(b);

    // A clean session drops what was kept: the same packet id is a new message then.
    let (mut c, present) = Raw::connect(&s, "q2-client", true)?;
    assert!(!present);
    c.publish_qos2("devices/q2/telemetry", 7, false, r#"{"v": 2}"#)?;
    assert_eq!(count(&s)?, 2);
    Ok(())
}

/// Connects `client_id` again with `clean_session = 0` until the server has kept the
/// previous connection's session (its end is noticed asynchronously).
pub(crate) fn s_wait_resumed(s: &Server, client_id: &str) -> anyhow::Result<Raw> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (raw, present) = Raw::connect(s, client_id, false)?;
        if present {
            return Ok(raw);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the session was never kept");
        drop(raw);
        std::thread::yield_now();
    }
}

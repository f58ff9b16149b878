//! Throttling: HTTP requests over their principal's limit get 429 with `Retry-After`; MQTT
//! publishers over theirs are slowed (reads paused) and lose nothing; a CONNECT storm is
//! admitted at the server's pace and what cannot be admitted soon is told to come back;
//! a tenant's connections are bounded.

use anyhow::Context;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet};
use rumqttc::{Event, QoS};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Server, TIMEOUT};
use crate::mqtt::{client, runtime, until};

#[test]
fn http_requests_over_the_limit_get_429_with_retry_after_and_lose_nothing_else() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--limit-ingest", "3/s", "--limit-query", "1000/s"])?;
    let event = |seq: u32| json!({"device_id": "lim-1", "seq": seq});
    let mut accepted = 0;
    let mut refused = None;
    for seq in 0..6 {
        let (status, retry, body) = s.post_json_raw("/api/v1/streams/telemetry/events", &event(seq))?;
        match status {
            200 => accepted += 1,
            429 => refused = Some((retry, body)),
            other => anyhow::bail!("unexpected {other}: {body}"),
        }
    }
    let (retry, body) = refused.context("six requests at once passed a limit of 3/s")?;
    assert!(accepted >= 3, "the bucket holds three at once: {accepted}");
    let retry: u64 = retry.context("429 without Retry-After")?.parse()?;
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(body["error"]["code"], "rate_limited");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("ingest") && message.contains("3/s") && message.contains("principal"), "{message}");
    // Other classes are not held back, and what was refused was not stored.
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, accepted);
    // After Retry-After, the same request passes.
    s.wait_for("the bucket to refill", |s| Ok(s.post_json("/api/v1/streams/telemetry/events", &event(99))?.0 == 200))?;
    assert!(s.metric("ferrite_throttled_total{class=\"ingest\",scope=\"principal\"}")? >= 1);
    Ok(())
}

#[test]
fn an_mqtt_publisher_over_its_rate_is_slowed_and_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--limit-mqtt-publish", "40/s"])?;
    runtime()?.block_on(async {
        let (c, mut ev) = client(&s, "fast-1");
        until(&mut ev, |p| matches!(p, rumqttc::Packet::ConnAck(_))).await?;
        let total = 120;
        let publisher = async {
            for i in 0..total {
                c.publish("devices/fast-1/telemetry", QoS::AtLeastOnce, false, format!(r#"{{"seq": {i}}}"#)).await?;
            }
            anyhow::Ok(())
        };
        let acks = async {
            let mut n = 0;
            while n < total {
                let event = tokio::time::timeout(TIMEOUT, ev.poll()).await.context("no PUBACK")??;
                n += usize::from(matches!(event, Event::Incoming(rumqttc::Packet::PubAck(_))));
            }
            anyhow::Ok(())
        };
        let (p, a) = tokio::join!(publisher, acks);
        p?;
        a?;
        anyhow::Ok(())
    })?;
    // Every message acknowledged is stored; the session was slowed, not dropped.
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry WHERE device_id = 'fast-1'")?, 120);
    assert!(s.metric("ferrite_mqtt_throttled_reads_total")? >= 1, "the reads were never paused");
    assert_eq!(s.metric("ferrite_mqtt_refused_total{reason=\"publish_rate\"}")?, 0);
    Ok(())
}

/// A raw MQTT 3.1.1 CONNECT as `admin`: the CONNACK's code, and the open stream.
async fn connect(s: &Server, id: &str) -> anyhow::Result<(ConnectReturnCode, TcpStream)> {
    let mut stream = TcpStream::connect(s.mqtt).await?;
    let mut out = BytesMut::new();
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c.login = Some(Login::new("admin", s.token.clone()));
    Packet::Connect(c).write(&mut out, 1 << 16)?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match Packet::read(&mut buf, 1 << 16) {
                Ok(Packet::ConnAck(a)) => return Ok((a.code, stream)),
                Ok(other) => anyhow::bail!("expected CONNACK, got {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => anyhow::bail!("{e}"),
            }
            if stream.read_buf(&mut buf).await? == 0 {
                anyhow::bail!("closed before CONNACK");
            }
        }
    })
    .await
    .context("no CONNACK")?
}

#[test]
fn a_connect_storm_is_admitted_at_the_servers_pace_and_the_rest_told_to_return() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--limit-mqtt-connect", "20/s"])?;
    // 20 at once, then 20 a second: up to 10 s of waiting admits about 200 more (plus 20 for
    // each second the CONNECTs take to arrive); the rest of 400 simultaneous CONNECTs get
    // "server unavailable" at once instead of piling up.
    let codes = runtime()?.block_on(async {
        let attempts = (0..400).map(|i| {
            let s = &s;
            async move { connect(s, &format!("storm-{i}")).await.map(|(code, stream)| (code, Some(stream))) }
        });
        let results = futures::future::join_all(attempts).await;
        results.into_iter().map(|r| r.map(|(code, _)| code)).collect::<anyhow::Result<Vec<_>>>()
    })?;
    let admitted = codes.iter().filter(|c| **c == ConnectReturnCode::Success).count();
    let refused = codes.iter().filter(|c| **c == ConnectReturnCode::ServiceUnavailable).count();
    assert_eq!(admitted + refused, 400, "{codes:?}");
    assert!(admitted >= 200, "admitted {admitted} of 400 at 20/s within 10 s");
    assert!(refused >= 50, "refused {refused}: the pace was not kept");
    assert!(s.metric("ferrite_mqtt_connects_paced_total")? >= 150);
    assert_eq!(s.metric("ferrite_mqtt_refused_total{reason=\"connect_rate\"}")?, refused as u64);
    Ok(())
}

#[test]
fn a_tenant_holds_at_most_its_connections() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--mqtt-max-connections-per-tenant", "2"])?;
    runtime()?.block_on(async {
        let (a, first) = connect(&s, "t-1").await?;
        let (b, _second) = connect(&s, "t-2").await?;
        assert_eq!((a, b), (ConnectReturnCode::Success, ConnectReturnCode::Success));
        let (c, _) = connect(&s, "t-3").await?;
        assert_eq!(c, ConnectReturnCode::ServiceUnavailable, "a third connection of the tenant");
        // A place freed is a place taken: once the server closed the first connection
        // (after a DISCONNECT), its place is free.
        let mut first = first;
        first.write_all(&[0xE0, 0x00]).await?;
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, first.read_to_end(&mut rest)).await.context("the server kept it open")??;
        let (code, _stream) = connect(&s, "t-4").await?;
        anyhow::ensure!(code == ConnectReturnCode::Success, "the freed place never came back: {code:?}");
        anyhow::Ok(())
    })?;
    assert!(s.metric("ferrite_mqtt_refused_total{reason=\"tenant_connections\"}")? >= 1);
    Ok(())
}

#[test]
fn a_tenant_past_its_daily_quotas_is_refused_on_every_door_and_a_restart_keeps_the_count() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let quotas = ["--tenant-daily-events", "5", "--tenant-daily-queries", "3"];
    let s = Server::start(dir.path(), &quotas)?;
    let events = |n: u32| json!((0..n).map(|i| json!({"device_id": "q-1", "seq": i})).collect::<Vec<_>>());
    assert_eq!(s.post_json("/api/v1/streams/telemetry/events", &events(3))?.0, 200);
    // Checked before, counted after: 3 of 5 used, so 3 more pass, and take the tenant past it.
    assert_eq!(s.post_json("/api/v1/streams/telemetry/events", &events(3))?.0, 200);
    let (status, retry, body) = s.post_json_raw("/api/v1/streams/telemetry/events", &events(1))?;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = retry.context("429 without Retry-After")?.parse()?;
    assert!((1..=86_400).contains(&retry), "Retry-After is the time to 00:00 UTC: {retry}");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("daily quota of 5 events") && message.contains("00:00 UTC"), "{message}");

    // MQTT: a QoS 1 message past the quota is not acknowledged; the session is closed, so
    // the client keeps it and sends it again later.
    let (mut raw, _) = crate::mqtt::Raw::connect(&s, "quota-dev", true)?;
    let e = raw.publish("devices/q-1/telemetry", QoS::AtLeastOnce, 1, false, r#"{"seq": 99}"#);
    assert!(e.is_err_and(|e| e.to_string().contains("closed")), "a PUBACK past the quota");

    // Queries: three a day; each statement counts (this count is the first).
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 6, "nothing past the quota was stored");
    s.sql("SELECT 1")?;
    s.sql("SELECT 2")?;
    let (status, body) = s.post_json("/api/v1/sql", &json!({"sql": "SELECT 3"}))?;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("quota_exceeded")), "{body}");
    // The rest of the API carries on.
    assert_eq!(s.get("/api/v1/streams")?.0, 200);
    assert_eq!(s.metric("ferrite_quota_refused_total{quota=\"events\"}")?, 2);
    assert_eq!(s.metric("ferrite_quota_refused_total{quota=\"queries\"}")?, 1);

    // The day's counts survive a restart.
    s.stop()?;
    let s = Server::start(dir.path(), &quotas)?;
    assert_eq!(s.post_json("/api/v1/streams/telemetry/events", &events(1))?.0, 429);
    assert_eq!(s.post_json("/api/v1/sql", &json!({"sql": "SELECT 1"}))?.0, 429);
    Ok(())
}

//! The embedded broker with raw MQTT clients: retained messages, last wills, QoS 1
//! delivery to services (kept across a cut), a second connection of the same client, and
//! a subscriber that never reads.

use std::io::Read;

use anyhow::bail;
use rumqttc::QoS;
use rumqttc::mqttbytes::v4::LastWill;

use crate::harness::{Server, TIMEOUT};
use crate::mqtt::{Raw, s_wait_resumed};

#[test]
fn retained_messages_and_last_wills_reach_later_subscribers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;

    // A device says it is online (retained), with a retained will saying otherwise.
    let will = LastWill::new("devices/w1/status", "offline", QoS::AtLeastOnce, true);
    let (mut device, _) = Raw::connect_with_will(&s, "w1", true, Some(will))?;
    device.publish("devices/w1/status", QoS::AtLeastOnce, 1, true, "online")?;

    // A watcher subscribing later gets the retained message first, flagged as retained,
    // at the lower of the two QoS.
    let (mut watcher, _) = Raw::connect(&s, "watcher", true)?;
    assert_eq!(watcher.subscribe("devices/+/status", QoS::ExactlyOnce)?, QoS::AtLeastOnce, "QoS 2 is granted as 1");
    let p = watcher.next_publish()?;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain, p.qos),
        ("devices/w1/status", &b"online"[..], true, QoS::AtLeastOnce)
    );
    watcher.ack(p.pkid)?;

    // The device's connection dies without DISCONNECT: its will goes out live (not flagged
    // as retained: the watcher's subscription was already there) and is retained.
    drop(device);
    let p = watcher.next_publish()?;
    assert_eq!((&p.payload[..], p.retain), (&b"offline"[..], false));
    watcher.ack(p.pkid)?;
    let (mut late, _) = Raw::connect(&s, "late", true)?;
    assert_eq!(late.subscribe("devices/w1/status", QoS::AtMostOnce)?, QoS::AtMostOnce);
    let p = late.next_publish()?;
    assert_eq!((&p.payload[..], p.retain, p.qos), (&b"offline"[..], true, QoS::AtMostOnce));

    // An empty retained message clears the topic: a new subscriber's first message is the
    // next live one.
    watcher.publish("devices/w1/status", QoS::AtLeastOnce, 2, true, "")?;
    let (mut fresh, _) = Raw::connect(&s, "fresh", true)?;
    fresh.subscribe("devices/w1/status", QoS::AtMostOnce)?;
    watcher.publish("devices/w1/status", QoS::AtMostOnce, 0, false, "marker")?;
    let p = fresh.next_publish()?;
    assert_eq!((&p.payload[..], p.retain), (&b"marker"[..], false), "nothing retained is left");
    Ok(())
}

#[test]
fn retained_messages_survive_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (mut device, _) = Raw::connect(&s, "r-dev", true)?;
    device.publish("devices/r-dev/status", QoS::AtLeastOnce, 1, true, "online")?;
    drop(device);
    s.stop()?;
    let s = Server::start(dir.path(), &[])?;
    let (mut watcher, _) = Raw::connect(&s, "r-watch", true)?;
    watcher.subscribe("devices/+/status", QoS::AtMostOnce)?;
    let p = watcher.next_publish()?;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("devices/r-dev/status", &b"online"[..], true));
    Ok(())
}

#[test]
fn a_persistent_service_subscriber_gets_every_qos1_message_across_a_cut() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (mut publisher, _) = Raw::connect(&s, "rules-out", true)?;
    let (mut svc, _) = Raw::connect(&s, "alert-svc", false)?;
    assert_eq!(svc.subscribe("alerts/#", QoS::AtLeastOnce)?, QoS::AtLeastOnce);

    publisher.publish("alerts/hot", QoS::AtLeastOnce, 1, false, "a1")?;
    let first = svc.next_publish()?;
    assert_eq!((&first.payload[..], first.qos, first.dup), (&b"a1"[..], QoS::AtLeastOnce, false));
    // Never acknowledged: the connection is cut, and a message comes while it is away.
    drop(svc);
    publisher.publish("alerts/hot", QoS::AtLeastOnce, 2, false, "a2")?;

    let mut svc = s_wait_resumed(&s, "alert-svc")?;
    let again = svc.next_publish()?;
    assert_eq!(
        (&again.payload[..], again.dup),
        (&b"a1"[..], true),
        "the unacknowledged message is sent again, as a duplicate"
    );
    svc.ack(again.pkid)?;
    let next = svc.next_publish()?;
    assert_eq!(&next.payload[..], b"a2", "the message published while it was away follows");
    svc.ack(next.pkid)?;
    svc.ping()?;

    // A second connection of the same client takes the session over: the first one is
    // closed, and the messages go to the newer one.
    let mut newer = s_wait_resumed(&s, "alert-svc")?;
    expect_closed(&mut svc)?;
    publisher.publish("alerts/cold", QoS::AtLeastOnce, 3, false, "a3")?;
    let p = newer.next_publish()?;
    assert_eq!((&p.payload[..], p.dup), (&b"a3"[..], false), "acknowledged messages are not sent again");
    newer.ack(p.pkid)?;
    assert_eq!(s.metric("ferrite_mqtt_dropped_total{reason=\"slow_subscriber\"}")?, 0);
    Ok(())
}

#[test]
fn a_subscriber_that_never_reads_is_disconnected_and_the_others_get_everything() -> anyhow::Result<()> {
    const MESSAGES: u16 = 3_000;
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (mut stuck, _) = Raw::connect(&s, "stuck", true)?;
    stuck.subscribe("alerts/#", QoS::AtLeastOnce)?;
    let (mut healthy, _) = Raw::connect(&s, "healthy", true)?;
    healthy.subscribe("alerts/#", QoS::AtLeastOnce)?;
    let (mut publisher, _) = Raw::connect(&s, "alerts-out", true)?;

    // The healthy subscriber reads and acknowledges on its own thread as the messages come.
    let reader = std::thread::spawn(move || -> anyhow::Result<u16> {
        let mut got = 0;
        while got < MESSAGES {
            let p = healthy.next_publish()?;
            healthy.ack(p.pkid)?;
            got += 1;
        }
        Ok(got)
    });
    for i in 1..=MESSAGES {
        publisher.publish("alerts/hot", QoS::AtLeastOnce, i, false, &format!("{{\"n\":{i}}}"))?;
    }
    match reader.join() {
        Ok(got) => assert_eq!(got?, MESSAGES, "the healthy subscriber got every message"),
        Err(_) => bail!("the reader panicked"),
    }
    // The stuck one was told to go: what it can still read ends with the server's close.
    expect_closed(&mut stuck)?;
    assert_eq!(s.metric("ferrite_mqtt_refused_total{reason=\"slow_subscriber\"}")?, 1);
    assert!(s.metric("ferrite_mqtt_dropped_total{reason=\"slow_subscriber\"}")? > 0);
    // The server lives on.
    let (mut after, _) = Raw::connect(&s, "after", true)?;
    after.subscribe("alerts/#", QoS::AtMostOnce)?;
    Ok(())
}

#[test]
fn a_burst_past_the_window_waits_for_acknowledgements() -> anyhow::Result<()> {
    const WINDOW: u16 = 1024;
    const MORE: u16 = 500;
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (mut svc, _) = Raw::connect(&s, "bursty", true)?;
    svc.subscribe("alerts/#", QoS::AtLeastOnce)?;
    let (mut publisher, _) = Raw::connect(&s, "burst-out", true)?;
    for i in 1..=WINDOW + MORE {
        publisher.publish("alerts/burst", QoS::AtLeastOnce, i, false, &i.to_string())?;
    }
    // A full window arrives before any acknowledgement; the rest waits for them, in order.
    let mut pkids = Vec::new();
    for i in 1..=WINDOW {
        let p = svc.next_publish()?;
        assert_eq!(p.payload, i.to_string().as_bytes(), "in publish order");
        pkids.push(p.pkid);
    }
    for pkid in pkids {
        svc.ack(pkid)?;
    }
    for i in WINDOW + 1..=WINDOW + MORE {
        let p = svc.next_publish()?;
        assert_eq!(p.payload, i.to_string().as_bytes(), "in publish order");
        svc.ack(p.pkid)?;
    }
    svc.ping()?;
    assert_eq!(s.metric("ferrite_mqtt_refused_total{reason=\"slow_subscriber\"}").unwrap_or(0), 0);
    Ok(())
}

/// Reads what is left until the server closes the connection.
fn expect_closed(raw: &mut Raw) -> anyhow::Result<()> {
    raw.stream.set_read_timeout(Some(TIMEOUT))?;
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        match raw.stream.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => bail!("the connection was not closed: {e}"),
        }
    }
}

//! MQTT 5 with a real client (paho-mqtt, Python, protocol v5) on the same port as 3.1.1:
//! reason codes, session expiry, topic aliases, request/response and user properties,
//! shared subscriptions; and a malformed property on a raw socket.

use std::io::{Read, Write};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::harness::{Server, TIMEOUT};
use crate::identity::{add_client, client_token};

/// Runs a paho-mqtt script with `args`; what it prints (JSON).
fn paho(script: &str, args: &[String]) -> anyhow::Result<Value> {
    let probe = Command::new("python3").args(["-c", "import paho.mqtt.client"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        bail!("paho-mqtt (Python) is not installed; scripts/test.sh installs it");
    }
    let out = Command::new("timeout").arg("60").arg("python3").arg("-c").arg(script).args(args).output()?;
    if !out.status.success() {
        bail!("the paho script failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Shared by the scripts: a v5 client that waits on events (never on sleeps).
const PRELUDE: &str = r##"
import json, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions
HOST, PORT = sys.argv[1], int(sys.argv[2])
WAIT = 20
# Notified at every message any client receives: waits are on it, never on a clock.
ARRIVED = threading.Condition()

def wait_until(cond, what):
    with ARRIVED:
        assert ARRIVED.wait_for(cond, WAIT), what

class V5:
    def __init__(self, cid, user, password, clean=True, expiry=None, will=None):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        if will:
            topic, payload, delay = will
            wp = Properties(PacketTypes.WILLMESSAGE); wp.WillDelayInterval = delay
            self.c.will_set(topic, payload, qos=1, retain=False, properties=wp)
        self.connected, self.subacked, self.gone = threading.Event(), threading.Event(), threading.Event()
        self.lock, self.messages, self.acks = threading.Lock(), [], {}
        self.c.on_connect = self.on_connect
        self.c.on_subscribe = lambda c, u, mid, codes, p: (setattr(self, "suback", [int(x.value) for x in codes]), self.subacked.set())
        self.c.on_publish = self.on_publish
        self.c.on_message = self.on_message
        self.c.on_disconnect = self.on_disconnect
        props = Properties(PacketTypes.CONNECT)
        if expiry is not None:
            props.SessionExpiryInterval = expiry
        self.c.connect(HOST, PORT, keepalive=30, clean_start=clean, properties=props)
        self.c.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK"
    def on_connect(self, c, u, flags, reason, props):
        self.connack, self.present, self.connack_props = int(reason.value), bool(flags.session_present), props
        self.connected.set()
    def on_publish(self, c, u, mid, reason, props):
        with self.lock:
            self.acks[mid] = int(reason.value)
    def on_message(self, c, u, m):
        with ARRIVED:
            with self.lock:
                self.messages.append(m)
            ARRIVED.notify_all()
    def on_disconnect(self, c, u, flags, reason, props):
        self.disconnect_reason = int(reason.value)
        self.gone.set()
    def subscribe(self, topic, qos=1, **opts):
        self.subacked.clear()
        self.c.subscribe(topic, options=SubscribeOptions(qos=qos, **opts))
        assert self.subacked.wait(WAIT), "no SUBACK"
        return self.suback
    def publish(self, topic, payload, qos=1, retain=False, props=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos > 0:
            info.wait_for_publish(WAIT)
            with self.lock:
                return self.acks.get(info.mid)
    def wait_messages(self, n):
        wait_until(lambda: len(self.messages) >= n, f"{len(self.messages)} of {n} messages")
        with self.lock:
            return list(self.messages)
    def close(self):
        self.c.disconnect()
        self.gone.wait(WAIT)
        self.c.loop_stop()
    def cut(self):
        # The connection ends without DISCONNECT (the will's case).
        self.c.loop_stop()
        self.c.socket().close()
"##;

#[test]
fn mqtt5_sessions_aliases_properties_and_shared_subscriptions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--mqtt-user-properties-as-fields", "true"])?;
    let script = format!(
        "{PRELUDE}{}",
        r##"
TOKEN = sys.argv[3]
out = {}
pub = V5("v5-pub", "admin", TOKEN)
out["connack"] = pub.connack
out["alias_max"] = getattr(pub.connack_props, "TopicAliasMaximum", None)
out["shared_available"] = getattr(pub.connack_props, "SharedSubscriptionAvailable", None)

# Telemetry with a topic alias: set once, then used with an empty topic.
p = Properties(PacketTypes.PUBLISH); p.TopicAlias = 1; p.UserProperty = ("firmware", "2.1")
out["alias_set"] = pub.publish("devices/v5-dev/telemetry", json.dumps({"seq": 1}), props=p)
p = Properties(PacketTypes.PUBLISH); p.TopicAlias = 1
out["alias_used"] = pub.publish("", json.dumps({"seq": 2}), props=p)

# Shared subscription: each message to one member of the group.
m1, m2 = V5("worker-1", "admin", TOKEN), V5("worker-2", "admin", TOKEN)
out["shared_suback"] = m1.subscribe("$share/workers/alerts/#") + m2.subscribe("$share/workers/alerts/#")
for i in range(20):
    p = Properties(PacketTypes.PUBLISH)
    p.ResponseTopic = "svc/replies"; p.CorrelationData = f"c-{i}".encode(); p.UserProperty = ("site", "north")
    p.MessageExpiryInterval = 300
    pub.publish("alerts/hot", json.dumps({"n": i}), props=p)
wait_until(lambda: len(m1.messages) + len(m2.messages) >= 20, "20 messages to the group")
out["shared_split"] = [len(m1.messages), len(m2.messages)]
first = (m1.messages or m2.messages)[0]
out["response_topic"] = getattr(first.properties, "ResponseTopic", None)
out["correlation"] = getattr(first.properties, "CorrelationData", b"").decode()
out["user_properties"] = getattr(first.properties, "UserProperty", None)
out["expiry_left"] = getattr(first.properties, "MessageExpiryInterval", None)

# Session expiry: kept for a client that asks, with what came while it was away.
keeper = V5("keeper", "admin", TOKEN, clean=True, expiry=300)
keeper.subscribe("jobs/#")
keeper.close()
pub.publish("jobs/1", "run")
keeper = V5("keeper", "admin", TOKEN, clean=False, expiry=300)
out["kept_present"] = keeper.present
out["kept_message"] = keeper.wait_messages(1)[0].payload.decode()
keeper.close()
brief = V5("brief", "admin", TOKEN, clean=True, expiry=0)
brief.subscribe("jobs/#")
brief.close()
brief = V5("brief", "admin", TOKEN, clean=False, expiry=0)
out["brief_present"] = brief.present
brief.close()

# A topic alias out of range: the server says why it closes.
bad = V5("bad-alias", "admin", TOKEN)
p = Properties(PacketTypes.PUBLISH); p.TopicAlias = 1000
bad.c.publish("devices/v5-dev/telemetry", "{}", qos=0, properties=p)
out["bad_alias_closed"] = bad.gone.wait(WAIT)
out["bad_alias_reason"] = getattr(bad, "disconnect_reason", None)
bad.c.loop_stop()
print(json.dumps(out))
"##
    );
    let addr = s.mqtt;
    let out = paho(&script, &[addr.ip().to_string(), addr.port().to_string(), s.token.clone()])?;
    assert_eq!(out["connack"], 0, "{out}");
    assert_eq!(out["alias_max"], 64);
    assert_eq!(out["shared_available"], 1);
    assert_eq!((out["alias_set"].as_i64(), out["alias_used"].as_i64()), (Some(0), Some(0)), "{out}");
    assert_eq!(out["shared_suback"], json!([1, 1]));
    let split: Vec<i64> = serde_json::from_value(out["shared_split"].clone())?;
    assert_eq!(split.iter().sum::<i64>(), 20, "each message to exactly one member: {split:?}");
    assert!(split.iter().all(|&n| n > 0), "both members took a share: {split:?}");
    assert_eq!(out["response_topic"], "svc/replies");
    assert!(out["correlation"].as_str().is_some_and(|c| c.starts_with("c-")), "{out}");
    assert_eq!(out["user_properties"], json!([["site", "north"]]));
    assert!(out["expiry_left"].as_i64().is_some_and(|s| (1..=300).contains(&s)), "{out}");
    assert_eq!((out["kept_present"].as_bool(), out["kept_message"].as_str()), (Some(true), Some("run")));
    assert_eq!(out["brief_present"], false, "a session with expiry 0 ends with its connection");
    assert_eq!((out["bad_alias_closed"].as_bool(), out["bad_alias_reason"].as_i64()), (Some(true), Some(0x94)));
    // Both aliased messages landed as telemetry of the device the topic names, the first
    // with its user property as a field.
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE device_id = 'v5-dev'")?, 2);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry WHERE firmware = '2.1'")?, 1);
    Ok(())
}

#[test]
fn an_mqtt5_device_answers_a_command_by_request_and_response() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let (st, d) = s.post_json("/api/v1/devices", &json!({"id": "v5-th"}))?;
    assert_eq!(st, 201, "{d}");
    let secret = d["credentials"]["client_secret"].as_str().unwrap_or("").to_owned();
    let (st, c) =
        s.post_json("/api/v1/devices/v5-th/commands", &json!({"name": "lock", "params": {"message": "hi"}}))?;
    assert_eq!(st, 202, "{c}");
    let id = c["id"].as_str().context("no command id")?.to_owned();
    let script = format!(
        "{PRELUDE}{}",
        r##"
SECRET = sys.argv[3]
out = {}
d = V5("v5-th", "v5-th", SECRET)
d.subscribe("devices/v5-th/commands")
m = d.wait_messages(1)[0]
out["response_topic"] = getattr(m.properties, "ResponseTopic", None)
out["correlation"] = getattr(m.properties, "CorrelationData", b"").decode()
# The answer names no id: the correlation data carries it.
p = Properties(PacketTypes.PUBLISH); p.CorrelationData = m.properties.CorrelationData
out["answer"] = d.publish(m.properties.ResponseTopic, json.dumps({"status": "succeeded", "result": {"locked": True}}), props=p)
d.close()
print(json.dumps(out))
"##
    );
    let addr = s.mqtt;
    let out = paho(&script, &[addr.ip().to_string(), addr.port().to_string(), secret])?;
    assert_eq!(out["response_topic"], "devices/v5-th/commands/result", "{out}");
    assert_eq!(out["correlation"], id.as_str());
    assert_eq!(out["answer"], 0);
    s.wait_for("the command's answer", |s| {
        let (_, body) = s.get(&format!("/api/v1/devices/v5-th/commands/{id}"))?;
        Ok(serde_json::from_str::<Value>(&body)?["status"] == "succeeded")
    })?;
    Ok(())
}

#[test]
fn mqtt5_refusals_carry_their_reason_codes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--tenant-daily-events", "3"])?;
    let (d1, secret) = add_client(&s, json!({"id": "d1", "kind": "device"}))?;
    let token = client_token(&s, &d1, &secret, "")?["access_token"].as_str().unwrap_or("").to_owned();
    let script = format!(
        "{PRELUDE}{}",
        r##"
TOKEN = sys.argv[3]
out = {}
# Wrong credentials: "bad user name or password" (0x86).
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="d1", protocol=mqtt.MQTTv5)
c.username_pw_set("d1", "wrong")
got = threading.Event()
c.on_connect = lambda c, u, f, reason, p: (out.__setitem__("bad_login", int(reason.value)), got.set())
c.connect(HOST, PORT); c.loop_start(); got.wait(WAIT); c.loop_stop()

d = V5("d1", "d1", TOKEN)
out["other_device"] = d.publish("devices/d2/telemetry", json.dumps({"seq": 0}))
out["subscribe_all"] = d.subscribe("#")
out["malformed"] = d.publish("devices/d1/telemetry", "{not json")
out["own"] = [d.publish("devices/d1/telemetry", json.dumps({"seq": i})) for i in range(1, 5)]
out["still_connected"] = d.c.is_connected()
d.close()
print(json.dumps(out))
"##
    );
    let addr = s.mqtt;
    let out = paho(&script, &[addr.ip().to_string(), addr.port().to_string(), token])?;
    assert_eq!(out["bad_login"], 0x86, "{out}");
    assert_eq!(out["other_device"], 0x87, "another device's topic: not authorized");
    assert_eq!(out["subscribe_all"], json!([0x87]));
    assert_eq!(out["malformed"], 0x99, "a payload the decoder cannot read: payload format invalid");
    // The daily quota of 3 events: the fourth is refused as "quota exceeded", and the
    // session lives on.
    assert_eq!(out["own"], json!([0, 0, 0, 0x97]), "{out}");
    assert_eq!(out["still_connected"], true);
    assert_eq!(s.sql_count("SELECT count(*) FROM telemetry")?, 3);
    Ok(())
}

#[test]
fn a_malformed_mqtt5_property_is_refused_with_a_reason_and_the_server_lives_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--auth", "off"])?;
    let mut conn = std::net::TcpStream::connect(s.mqtt)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    // CONNECT, protocol level 5, properties: one of type 0xFF (no such property).
    let body: Vec<u8> = [&[0, 4][..], b"MQTT", &[5, 0x02, 0, 30], &[2, 0xFF, 0], &[0, 1], b"x"].concat();
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    conn.write_all(&packet)?;
    let mut got = Vec::new();
    conn.read_to_end(&mut got)?;
    assert_eq!(got.first(), Some(&0x20), "a CONNACK: {got:?}");
    assert_eq!(got.get(3), Some(&0x81), "reason: malformed packet: {got:?}");
    // The server lives on for everyone else.
    assert_eq!(s.post_json("/api/v1/streams/telemetry/events", &json!({"device_id": "d", "v": 1}))?.0, 200);
    Ok(())
}

#[test]
fn an_mqtt5_subscriber_gets_no_more_unacknowledged_messages_than_its_receive_maximum() -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::v5::{self as m5, Packet as P5};
    use rumqttc::v5::mqttbytes::{Error as E5, QoS as Q5};
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &["--auth", "off"])?;
    let mut sub = std::net::TcpStream::connect(s.mqtt)?;
    sub.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = bytes::BytesMut::new();
    let send = |conn: &mut std::net::TcpStream, p: P5| -> anyhow::Result<()> {
        let mut b = bytes::BytesMut::new();
        p.write(&mut b, None)?;
        conn.write_all(&b)?;
        Ok(())
    };
    let read = |conn: &mut std::net::TcpStream, buf: &mut bytes::BytesMut| -> anyhow::Result<P5> {
        loop {
            match P5::read(buf, None) {
                Ok(p) => return Ok(p),
                Err(E5::InsufficientBytes(_)) => {}
                Err(e) => bail!("bad packet: {e}"),
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let props = m5::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: Some(2),
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    };
    let connect = m5::Connect { keep_alive: 30, client_id: "rm-2".into(), clean_start: true, properties: Some(props) };
    send(&mut sub, P5::Connect(connect, None, None))?;
    assert!(matches!(read(&mut sub, &mut buf)?, P5::ConnAck(_)));
    send(&mut sub, P5::Subscribe(m5::Subscribe::new(m5::Filter::new("jobs/#", Q5::AtLeastOnce), None)))?;
    assert!(matches!(read(&mut sub, &mut buf)?, P5::SubAck(_)));

    // Five QoS 1 messages, all routed once the publisher has its PUBACKs.
    let (mut publisher, _) = crate::mqtt::Raw::connect(&s, "rm-pub", true)?;
    for i in 1..=5u16 {
        publisher.publish("jobs/run", rumqttc::QoS::AtLeastOnce, i, false, &i.to_string())?;
    }
    // Everything the server queued for the subscriber comes before its PINGRESP: two.
    send(&mut sub, P5::PingReq(m5::PingReq))?;
    let mut first = Vec::new();
    loop {
        match read(&mut sub, &mut buf)? {
            P5::Publish(p) => first.push(p.pkid),
            P5::PingResp(_) => break,
            other => bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(first.len(), 2, "the receive maximum holds the rest back");
    // Each acknowledgement lets one more through, until all five arrived.
    let mut got = first.len();
    let mut unacked = first;
    while got < 5 {
        let pkid = unacked.pop().context("nothing to acknowledge")?;
        send(&mut sub, P5::PubAck(m5::PubAck::new(pkid, None)))?;
        match read(&mut sub, &mut buf)? {
            P5::Publish(p) => {
                unacked.push(p.pkid);
                got += 1;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn an_mqtt5_will_waits_for_its_delay_and_a_reconnect_cancels_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    let addr = s.mqtt;
    let args = [addr.ip().to_string(), addr.port().to_string(), s.token.clone()];
    // A will delayed by a second reaches a watcher once the connection is cut.
    let script = format!(
        "{PRELUDE}{}",
        r##"
TOKEN = sys.argv[3]
out = {}
watcher = V5("watcher", "admin", TOKEN)
watcher.subscribe("devices/+/status")
dev = V5("wd-1", "admin", TOKEN, expiry=60, will=("devices/wd-1/status", "offline", 1))
dev.cut()
out["will"] = watcher.wait_messages(1)[0].payload.decode()
watcher.close()
print(json.dumps(out))
"##
    );
    let out = paho(&script, &args)?;
    assert_eq!(out["will"], "offline");

    // A will delayed by a minute is cancelled by the client's reconnect.
    let cut = format!(
        "{PRELUDE}{}",
        r##"
TOKEN = sys.argv[3]
dev = V5("wd-2", "admin", TOKEN, expiry=60, will=("devices/wd-2/status", "offline", 60))
dev.cut()
print(json.dumps({}))
"##
    );
    paho(&cut, &args)?;
    s.wait_for("the server to hold the will", |s| Ok(s.metric("ferrite_mqtt_wills_delayed_total")? >= 2))?;
    let back = format!(
        "{PRELUDE}{}",
        r##"
TOKEN = sys.argv[3]
dev = V5("wd-2", "admin", TOKEN, clean=False, expiry=60)
out = {"present": dev.present}
dev.close()
print(json.dumps(out))
"##
    );
    assert_eq!(paho(&back, &args)?["present"], true);
    assert_eq!(s.metric("ferrite_mqtt_wills_cancelled_total")?, 1, "the reconnect cancelled the will");
    Ok(())
}

"""A Sparkplug B edge node, with pysparkplug (an implementation of the specification, not
Ferrite's encoder), driven by the lines of stdin; it prints what it does and receives as
lines of stdout for the test to wait on.

    python3 sparkplug_edge.py HOST PORT USERNAME PASSWORD GROUP EDGE

Commands (one per line): `birth` (connect: NBIRTH), `device NAME` (DBIRTH), `data VALUE`
(NDATA of Inputs/Temperature by its alias only), `device_data NAME VALUE` (DDATA),
`unknown_alias` (NDATA with an alias no birth defined), `stale_death` (an NDEATH whose bdSeq
is not the birth's), `truncated` (an NDATA cut in the middle), `lost NAME` (DDEATH),
`stray` (NDATA from a bare client, with no birth), `quit` (clean disconnect). Prints `ready`, `connected`, `sent ...`, and `cmd TOPIC
METRIC=VALUE ...` for every NCMD and DCMD received.
"""

import sys
import threading

import pysparkplug as sp
from pysparkplug import DataType, Metric, MessageType, Topic, QoS

host, port, user, password, group, edge = sys.argv[1:7]
port = int(port)
out_lock = threading.Lock()


def say(*words):
    with out_lock:
        print(*words, flush=True)


def now():
    return sp.get_current_timestamp()


def on_cmd(_node, message):
    metrics = " ".join(f"{m.name}={m.value}" for m in message.payload.metrics)
    say("cmd", str(message.topic), metrics)


client = sp.Client(username=user, password=password)
# pysparkplug births from its connection callback, on paho's thread: learn of the NBIRTH
# by wrapping the client's publish, so that nothing is sent before it.
born = threading.Event()
publish = client.publish


def publish_and_tell(message, **kwargs):
    publish(message, **kwargs)
    if message.topic.message_type == MessageType.NBIRTH:
        born.set()


client.publish = publish_and_tell
# The metrics of one message share one timestamp: Ferrite makes a row per timestamp, and
# metrics stamped a millisecond apart would be two rows (the test expects one).
born_at = now()
node_metrics = [
    Metric(born_at, "Inputs/Temperature", DataType.DOUBLE, value=20.5, alias=1),
    Metric(born_at, "Outputs/LED", DataType.BOOLEAN, value=False, alias=2),
    Metric(born_at, "Counter", DataType.INT32, value=-5, alias=3),
    Metric(born_at, "Mode", DataType.STRING, value="auto", alias=4),
    Metric(born_at, "Big", DataType.UINT64, value=2**63 + 5, alias=5),
]
node = sp.EdgeNode(group, edge, node_metrics, client=client, cmd_callback=on_cmd)
say("ready")

for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    cmd = words[0]
    if cmd == "birth":
        node.connect(host, port=port, blocking=False)
        if not born.wait(30):
            say("error", "no NBIRTH within 30 s")
            sys.exit(1)
        say("connected")
    elif cmd == "device":
        name = words[1]
        t = now()
        device = sp.Device(
            name,
            [
                Metric(t, "Pressure", DataType.FLOAT, value=1.5, alias=10),
                Metric(t, "Running", DataType.BOOLEAN, value=True, alias=11),
            ],
            cmd_callback=on_cmd,
        )
        node.register(device)
        say("sent", "DBIRTH", name)
    elif cmd == "data":
        # By alias alone, and without datatypes: the birth's (pysparkplug's `update` always
        # sends names, so the message is built from its classes and sent by its client).
        metrics = (Metric(now(), None, DataType.DOUBLE, value=float(words[1]), alias=1),)
        data = sp.NData(now(), seq=node._seq, metrics=metrics)
        topic = Topic(message_type=MessageType.NDATA, group_id=group, edge_node_id=edge)
        client.publish(sp.Message(topic=topic, payload=data, qos=QoS.AT_MOST_ONCE, retain=False))
        say("sent", "NDATA")
    elif cmd == "device_data":
        node.update_device(words[1], [Metric(now(), "Pressure", DataType.FLOAT, value=float(words[2]))])
        say("sent", "DDATA")
    elif cmd == "unknown_alias":
        t = now()
        metrics = (
            Metric(t, None, DataType.DOUBLE, value=1.0, alias=99),
            Metric(t, "Mode", DataType.STRING, value="manual"),
        )
        data = sp.NData(t, seq=node._seq, metrics=metrics)
        topic = Topic(message_type=MessageType.NDATA, group_id=group, edge_node_id=edge)
        client.publish(sp.Message(topic=topic, payload=data, qos=QoS.AT_MOST_ONCE, retain=False))
        say("sent", "NDATA", "unknown_alias")
    elif cmd == "stale_death":
        death = sp.NDeath(
            timestamp=now(),
            bd_seq_metric=Metric(now(), "bdSeq", DataType.INT64, value=77),
        )
        topic = Topic(message_type=MessageType.NDEATH, group_id=group, edge_node_id=edge)
        client.publish(sp.Message(topic=topic, payload=death, qos=QoS.AT_MOST_ONCE, retain=False))
        say("sent", "NDEATH", "stale")
    elif cmd == "truncated":
        data = sp.NData(now(), seq=0, metrics=(Metric(now(), "Mode", DataType.STRING, value="x" * 40),))
        raw = data.encode()
        topic = f"spBv1.0/{group}/NDATA/{edge}"
        client._client.publish(topic, raw[: len(raw) // 2], qos=0)
        say("sent", "NDATA", "truncated")
    elif cmd == "stray":
        # A node that never sent its birth: a bare client publishes NDATA.
        bare = sp.Client(username=user, password=password)
        up = threading.Event()
        bare.connect(host, port=port, blocking=False, callback=lambda _c: up.set())
        if not up.wait(30):
            say("error", "no connection")
            sys.exit(1)
        data = sp.NData(now(), seq=0, metrics=(Metric(now(), "Inputs/Temperature", DataType.DOUBLE, value=1.0),))
        topic = Topic(message_type=MessageType.NDATA, group_id=group, edge_node_id=edge)
        bare.publish(sp.Message(topic=topic, payload=data, qos=QoS.AT_MOST_ONCE, retain=False))
        say("sent", "NDATA", "stray")
    elif cmd == "lost":
        node.deregister(words[1])
        say("sent", "DDEATH", words[1])
    elif cmd == "quit":
        node.disconnect()
        say("bye")
        break

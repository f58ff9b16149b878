//! Every decoder a device or client can reach, fed arbitrary bytes and mutations of valid
//! inputs (flipped, truncated, spliced): each answers with rows or a clear error, never a
//! panic, and what it keeps is well formed. Proptest stands in for a coverage-guided fuzzer
//! (cargo-fuzz needs a nightly toolchain this project does not use); each case that once
//! failed is kept below as a regression.

use std::sync::Arc;

use bytes::BytesMut;
use ferrite_engine::{Metrics, StreamCatalog, StreamName};
use ferrite_ingest::builder::BatchBuilder;
use ferrite_ingest::json::{DeviceSource, JsonDecoder};
use ferrite_ingest::line_protocol::{self, DeviceNaming, Precision};
use ferrite_ingest::{mqtt5, sparkplug};
use proptest::prelude::*;

/// Valid inputs that mutations start from, so that mutants reach past the first byte.
const JSON_SEEDS: &[&str] = &[
    r#"{"device_id":"d1","ts":1700000000000,"temp":21.5,"on":true,"note":"ok"}"#,
    r#"[{"device_id":"d1","t":1},{"device_id":"d2","t":2.5,"s":"x"},{"device_id":"d3","ts":"2026-11-30T10:00:00Z"}]"#,
    r#"{"device_id":"d\u00e9","nested":{"a":[1,2,{"b":null}]},"big":18446744073709551615,"neg":-1e308}"#,
];
const LINE_SEEDS: &[&str] = &[
    "cpu,host=h1,region=eu usage=0.5,idle=99i,ok=true,name=\"x y\" 1700000000000000000\n",
    "readings,name=truck_1,fleet=South latitude=52.1,longitude=-3.2,velocity=10i 1451606400000000000\nm,device_id=a v=1u\n",
    "weather,host=a\\ b,loc=x\\,y t=1.5e3,s=\"q\\\"uote\" 1\n# comment\n\nm,host=h f=1",
];

/// A valid seed with up to eight mutations: a byte flipped, the input cut, bytes inserted.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (0..seeds.len(), prop::collection::vec((0usize..3, any::<usize>(), any::<u8>()), 0..8)).prop_map(
        move |(seed, edits)| {
            let mut b = seeds[seed].clone();
            for (kind, at, byte) in edits {
                let at = if b.is_empty() { 0 } else { at % b.len() };
                match kind {
                    0 if !b.is_empty() => b[at] ^= byte | 1,
                    1 => b.truncate(at),
                    _ => b.insert(at, byte),
                }
            }
            b
        },
    )
}

fn text_seeds(seeds: &[&str]) -> Vec<Vec<u8>> {
    seeds.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// MQTT 5 packets written from the specification: a CONNECT, a PUBLISH with a topic alias
/// and a payload format, a SUBSCRIBE; and a 3.1.1 PUBLISH.
fn mqtt_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'c'],
        vec![0x32, 0x11, 0, 5, b'a', b'/', b'b', b'/', b'c', 0, 1, 5, 0x23, 0, 1, 0x01, 1, b'h', b'i'],
        vec![0x82, 0x09, 0, 1, 0, 0, 3, b'a', b'/', b'#', 1],
        vec![0x32, 0x0a, 0, 3, b'a', b'/', b'b', 0, 7, b'{', b'}', b'\n'],
    ]
}

/// Cases per property: `FERRITE_FUZZ_CASES` for a longer run (docs/operations.md).
fn cases(default: u32) -> u32 {
    std::env::var("FERRITE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

fn json_decodes_or_refuses(payload: &[u8]) {
    let catalog = Arc::new(StreamCatalog::in_memory());
    let stream = StreamName::new("s").unwrap_or_else(|e| panic!("{e}"));
    for source in [DeviceSource::PerEvent, DeviceSource::Fixed("d1")] {
        let mut b = BatchBuilder::new(catalog.clone(), &stream).unwrap_or_else(|e| panic!("{e}"));
        let decoded = JsonDecoder::new(&mut b, source, 42).decode(payload);
        if decoded.is_ok() {
            // What was kept builds into a batch with the stream's columns.
            if let Some(batch) = b.finish() {
                assert!(batch.batch.num_columns() >= 2, "{:?}", String::from_utf8_lossy(payload));
            }
        }
    }
}

fn line_protocol_decodes_or_refuses(payload: &[u8]) {
    let catalog = Arc::new(StreamCatalog::in_memory());
    let Ok(text) = std::str::from_utf8(payload) else { return };
    let naming = DeviceNaming::configured(&["name".to_owned()], None);
    let out = line_protocol::decode(&catalog, "default", text, Precision::Nanoseconds, &naming, 42);
    let rows: usize = out.batches.iter().map(|b| b.batch.num_rows()).sum();
    assert_eq!(rows, out.accepted, "{text:?}");
}

fn mqtt_reads_or_refuses(packet: &[u8]) {
    let mut buf = BytesMut::from(packet);
    let mut aliases = mqtt5::TopicAliases::default();
    // Until the reader wants more bytes or refuses: never a panic, never a loop.
    for _ in 0..64 {
        match mqtt5::read(&mut buf, &mut aliases) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let mut buf = BytesMut::from(packet);
    for _ in 0..64 {
        if rumqttc::mqttbytes::v4::Packet::read(&mut buf, 1 << 20).is_err() {
            break;
        }
    }
}

fn sparkplug_reads_or_refuses(payload: &[u8]) {
    let catalog = Arc::new(StreamCatalog::in_memory());
    let state = sparkplug::Sparkplug::new(Arc::new(Metrics::new()));
    for topic in ["spBv1.0/g/NBIRTH/e", "spBv1.0/g/NDATA/e", "spBv1.0/g/DBIRTH/e/d", "spBv1.0/g/DDATA/e/d"] {
        let Some(Ok(t)) = sparkplug::parse_topic(topic) else { panic!("{topic}") };
        let mut builders = Vec::new();
        let _ = state.handle(&catalog, ("default", 1), &t, payload, &mut builders);
        for batch in sparkplug::finish(builders) {
            assert!(batch.batch.num_columns() >= 2);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(400)))]

    #[test]
    fn json_never_panics(payload in prop_oneof![bytes(), mutated(text_seeds(JSON_SEEDS))]) {
        json_decodes_or_refuses(&payload);
    }

    #[test]
    fn line_protocol_never_panics(payload in prop_oneof![bytes(), mutated(text_seeds(LINE_SEEDS))]) {
        line_protocol_decodes_or_refuses(&payload);
    }

    #[test]
    fn mqtt_packets_never_panic(packet in prop_oneof![bytes(), mutated(mqtt_seeds())]) {
        mqtt_reads_or_refuses(&packet);
    }

    #[test]
    fn sparkplug_payloads_never_panic(payload in bytes()) {
        sparkplug_reads_or_refuses(&payload);
    }
}

/// MQTT packets whose headers announce more than they carry, and valid packets cut short.
#[test]
fn mqtt_regressions() {
    for packet in [
        &[0x30, 0xff, 0xff, 0xff, 0x7f][..],
        &[0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0xff, 0xff][..],
        &[0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x01][..],
        &[0x32, 0x03, 0x00, 0x05, b'a'][..],
    ] {
        mqtt_reads_or_refuses(packet);
    }
}

//! Decode throughput: JSON and line protocol into Arrow `RecordBatch`es through Ferrite's
//! decoders, against `serde_json` into `Vec<Reading>` (typed structs, no Arrow) as the peer.
//! Batches of 1,000 TSBS-like readings from 100 devices; throughput in events and bytes.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrite_benches::{Reading, json_array, line_protocol, readings};
use ferrite_engine::{StreamCatalog, StreamName};
use ferrite_ingest::builder::BatchBuilder;
use ferrite_ingest::json::{DeviceSource, JsonDecoder};
use ferrite_ingest::line_protocol::{self, Precision};

fn decode(c: &mut Criterion) {
    let rs = readings(1000, 100);
    let json = json_array(&rs);
    let lp = line_protocol(&rs);
    let catalog = Arc::new(StreamCatalog::in_memory());
    let stream = StreamName::new("readings").unwrap_or_else(|e| panic!("{e}"));

    let mut g = c.benchmark_group("decode_json_1000");
    g.throughput(Throughput::Elements(rs.len() as u64));
    g.bench_function(BenchmarkId::new("ferrite_json_to_arrow", json.len()), |b| {
        b.iter(|| {
            let mut builder = BatchBuilder::new(catalog.clone(), &stream).unwrap_or_else(|e| panic!("{e}"));
            let rej = JsonDecoder::new(&mut builder, DeviceSource::PerEvent, 0).decode(black_box(&json));
            assert!(rej.map(|r| r.is_empty()).unwrap_or(false));
            black_box(builder.finish())
        })
    });
    g.bench_function(BenchmarkId::new("peer_serde_json_vec_struct", json.len()), |b| {
        b.iter(|| black_box(serde_json::from_slice::<Vec<Reading>>(black_box(&json)).map(|v| v.len())))
    });
    g.finish();

    let mut g = c.benchmark_group("decode_json_bytes_1000");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("ferrite_json_to_arrow", |b| {
        b.iter(|| {
            let mut builder = BatchBuilder::new(catalog.clone(), &stream).unwrap_or_else(|e| panic!("{e}"));
            let _ = JsonDecoder::new(&mut builder, DeviceSource::PerEvent, 0).decode(black_box(&json));
            black_box(builder.finish())
        })
    });
    g.finish();

    let lp_catalog = Arc::new(StreamCatalog::in_memory());
    let mut g = c.benchmark_group("decode_line_protocol_1000");
    g.throughput(Throughput::Elements(rs.len() as u64));
    g.bench_function(BenchmarkId::new("ferrite_lp_to_arrow", lp.len()), |b| {
        b.iter(|| {
            let out = line_protocol::decode(
                &lp_catalog,
                ferrite_engine::ids::DEFAULT_TENANT,
                black_box(&lp),
                Precision::Nanoseconds,
                &line_protocol::DeviceNaming::default(),
                0,
            );
            assert!(out.rejections.is_empty());
            black_box(out.batches)
        })
    });
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);

//! A policy decision on the MQTT publish path: cold (a session's first publish on a topic:
//! the Cedar evaluation) and warm (every later publish: the session's cache).
//!
//! `cargo bench -p ferrite-benches --bench policy`

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ferrite_engine::Metrics;
use ferrite_engine::auth::{AccessControl, Action, DecisionCache, RequestContext, Transport};
use ferrite_identity::{Identity, IdentityConfig};

fn decisions(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ferrite-bench-policy-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let identity = rt.block_on(Identity::open(IdentityConfig::new(&dir), Arc::new(Metrics::new()))).expect("identity");
    // A registered device: a session re-checks that its principal still holds.
    let client = ferrite_identity::store::ClientRecord {
        id: "d1".into(),
        tenant: "default".into(),
        kind: "device".into(),
        secret_hash: String::new(),
        roles: Vec::new(),
        device_type: None,
        children: Vec::new(),
        disabled: false,
        next_secret_hash: None,
    };
    rt.block_on(identity.add_client(client, None)).expect("device");
    let device = identity.known_principal("d1").expect("registered");
    let ctx = RequestContext::new(Transport::Mqtt, Some([127, 0, 0, 1].into()));
    let topic = "devices/d1/telemetry";
    assert!(identity.authorize(&device, Action::Publish, &ferrite_engine::Resource::topic(topic), &ctx).allowed);
    // Both paths must reach an allow (not a revoked session's early exit).
    let first = DecisionCache::default().decide(identity.as_ref(), &device, Action::Publish, topic, &ctx);
    assert!(first.allowed && first.fresh && !first.revoked);

    let mut group = c.benchmark_group("policy_decision");
    group.bench_function("cold_cache_publish", |b| {
        b.iter(|| {
            let mut cache = DecisionCache::default();
            cache.decide(identity.as_ref(), &device, Action::Publish, topic, &ctx).allowed
        })
    });
    let mut cache = DecisionCache::default();
    group.bench_function("warm_cache_publish", |b| {
        b.iter(|| cache.decide(identity.as_ref(), &device, Action::Publish, topic, &ctx).allowed)
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, decisions);
criterion_main!(benches);

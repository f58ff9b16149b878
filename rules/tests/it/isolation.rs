//! A rule that panics (here: in its action sink) is disabled with a clear status; the
//! shard and the other rules go on.

use std::sync::Arc;

use anyhow::Result;
use ferrite_engine::{ManualClock, Metrics};
use ferrite_rules::{ActionSink, RuleEngine};
use serde_json::json;

use crate::harness::{batch, rows_of, telemetry_catalog};

/// Panics on topics starting with `boom`, as a buggy sink would.
struct PanickingSink;

impl ActionSink for PanickingSink {
    fn publish(&self, _tenant: &str, topic: &str, _payload: Vec<u8>) {
        if topic.starts_with("boom") {
            panic!("sink cannot route `{topic}`");
        }
    }

    fn webhook(&self, _url: &str, _body: Vec<u8>) {}
}

#[test]
fn a_panicking_rule_is_disabled_and_the_others_keep_running() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let metrics = Arc::new(Metrics::new());
    let clock = Arc::new(ManualClock::new(0));
    let e = RuleEngine::new(1, catalog.clone(), metrics.clone(), Arc::new(PanickingSink), clock);
    let rules = r#"
rule bad {
    from telemetry[temperature > 0]
    select device_id
    then publish 'boom/{device_id}' {}
}
rule good {
    from telemetry[temperature > 0]
    select device_id, temperature
    insert into good_out
}
"#;
    e.deploy(rules, Some("test.rules")).map_err(|err| anyhow::anyhow!(err.render("test.rules", rules)))?;
    let b = batch(&catalog, "telemetry", &[json!({"t": 1, "temperature": 5.0})])?;
    let out = e.process(0, std::slice::from_ref(&b));
    assert_eq!(rows_of(&out, "good_out")?.len(), 1, "the other rule still ran on the same batch");
    let bad = e.info("bad")?;
    assert_eq!(bad.status, "failed");
    assert!(bad.last_error.as_deref().is_some_and(|m| m.contains("panicked")), "{:?}", bad.last_error);
    assert_eq!(metrics.counter_value("ferrite_rule_panics_total", &[("rule", "bad")]), 1);
    // The next batch: the failed rule no longer runs, the good one does.
    let out = e.process(0, &[b]);
    assert_eq!(rows_of(&out, "good_out")?.len(), 1);
    assert_eq!(metrics.counter_value("ferrite_rule_panics_total", &[("rule", "bad")]), 1);
    // Deploying it again gives it a fresh start.
    e.deploy(rules, Some("test.rules")).map_err(|err| anyhow::anyhow!(err.to_string()))?;
    assert_eq!(e.info("bad")?.status, "running");
    Ok(())
}

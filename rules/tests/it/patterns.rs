//! Pattern rules: followed-by with conditions on earlier steps, absence, counting, strict
//! sequences, and time passing for silent devices.

use anyhow::Result;
use serde_json::json;

use crate::harness::*;

#[test]
fn door_left_open_matches_a_rise_within_ten_minutes() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let rules = include_str!("../design.rules");
    let (e, _) = engine(&catalog, 1, rules)?;
    let b = batch(
        &catalog,
        "telemetry",
        &[
            json!({"t": 0, "d": "d1", "door": "open", "temperature": 20.0}),
            json!({"t": 60, "d": "d2", "temperature": 99.0}),
            json!({"t": 60, "d": "d1", "temperature": 22.0}),
            json!({"t": 120, "d": "d1", "temperature": 26.0}),
            json!({"t": 130, "d": "d3", "door": "open", "temperature": 20.0}),
            json!({"t": 800, "d": "d3", "temperature": 30.0}),
        ],
    )?;
    let out = run_all(&e, &[b]);
    let alerts: Vec<_> =
        rows_of(&out, "alerts")?.into_iter().filter(|r| r["rule"] == json!("door_left_open")).collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["message"], json!("door open on d1"));
    assert_eq!(alerts[0]["time"], json!(120.0));
    Ok(())
}

#[test]
fn a_silent_device_is_found_at_its_next_event_and_at_the_end() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(&catalog, 1, include_str!("../design.rules"))?;
    let b = batch(
        &catalog,
        "telemetry",
        &[
            json!({"t": 0, "temperature": 1.0}),
            json!({"t": 30, "temperature": 1.0}),
            json!({"t": 200, "temperature": 1.0}),
        ],
    )?;
    let out = run_all(&e, &[b]);
    let silent: Vec<f64> = rows_of(&out, "alerts")?
        .iter()
        .filter(|r| r["rule"] == json!("silent_device"))
        .map(|r| r["time"].as_f64().unwrap_or(f64::NAN))
        .collect();
    assert_eq!(silent, vec![150.0, 320.0]);
    Ok(())
}

#[test]
fn the_wall_clock_moves_a_silent_devices_time() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let rules = "rule silent { from every a = telemetry -> not telemetry[device_id = a.device_id] for 2m select a.device_id then alert message '{device_id} is silent' }";
    let (e, clock) = engine(&catalog, 1, rules)?;
    let b = batch(&catalog, "telemetry", &[json!({"t": 1000, "temperature": 1.0})])?;
    assert!(rows_of(&e.process(0, &[b]), "alerts")?.is_empty());
    clock.set(60 * S);
    assert!(rows_of(&e.tick(0), "alerts")?.is_empty(), "one silent minute is not two");
    clock.set(121 * S);
    let alerts = rows_of(&e.tick(0), "alerts")?;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["message"], json!("d1 is silent"));
    assert!(rows_of(&e.tick(0), "alerts")?.is_empty(), "fires once");
    Ok(())
}

#[test]
fn counted_steps_and_strict_sequences() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let rules = "rule three { from every a = telemetry[temperature > 30]{3} select a.temperature insert into three_out }\n\
                 rule strict { from every a = telemetry[door = 'open'], b = telemetry[door = 'closed'] select a.time as opened, b.time as closed insert into strict_out }";
    let (e, _) = engine(&catalog, 1, rules)?;
    let b = batch(
        &catalog,
        "telemetry",
        &[
            json!({"t": 0, "temperature": 31.0, "door": "open"}),
            json!({"t": 1, "temperature": 32.0, "door": "ajar"}),
            json!({"t": 2, "temperature": 33.0, "door": "closed"}),
            json!({"t": 3, "temperature": 10.0, "door": "open"}),
            json!({"t": 4, "temperature": 10.0, "door": "closed"}),
        ],
    )?;
    let out = run_all(&e, &[b]);
    // Three hot readings: the match ends at the third (every: starts at 0 only, as the
    // readings at 1 and 2 start matches that never reach three).
    assert_eq!(rows_of(&out, "three_out")?, vec![json!({"time": 2.0, "device_id": "d1", "temperature": 33.0})]);
    // Strict: open at 0 is broken by `ajar` at 1; open at 3 is closed right after.
    assert_eq!(
        rows_of(&out, "strict_out")?,
        vec![json!({"time": 4.0, "device_id": "d1", "opened": 3.0, "closed": 4.0})]
    );
    Ok(())
}

/// Records actions instead of sending them.
#[derive(Default)]
struct Recorder(parking_lot::Mutex<Vec<(String, String, serde_json::Value)>>);

impl ferrite_rules::ActionSink for Recorder {
    fn publish(&self, _tenant: &str, topic: &str, payload: Vec<u8>) {
        self.0.lock().push(("publish".into(), topic.into(), serde_json::from_slice(&payload).unwrap_or_default()));
    }
    fn webhook(&self, url: &str, body: Vec<u8>) {
        self.0.lock().push(("webhook".into(), url.into(), serde_json::from_slice(&body).unwrap_or_default()));
    }
}

#[test]
fn actions_fill_their_templates() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let recorder = std::sync::Arc::new(Recorder::default());
    let e = ferrite_rules::RuleEngine::new(
        1,
        catalog.clone(),
        std::sync::Arc::new(ferrite_engine::Metrics::new()),
        recorder.clone(),
        std::sync::Arc::new(ferrite_engine::ManualClock::new(0)),
    );
    let rules = "rule a { from telemetry[temperature > 30] select device_id, temperature \
                 then publish 'sites/{device_id}/hot' {\"t\": \"{temperature}\", \"note\": \"{device_id} is hot\"} \
                 then webhook 'http://hooks.example/{device_id}' \
                 then command device_id 'cool' {\"target\": 20} }";
    e.deploy(rules, None).map_err(|err| anyhow::anyhow!(err.render("t", rules)))?;
    e.process(
        0,
        &[batch(&catalog, "telemetry", &[json!({"t": 5, "temperature": 35.0}), json!({"t": 6, "temperature": 10.0})])?],
    );
    let got = recorder.0.lock().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0], ("publish".into(), "sites/d1/hot".into(), json!({"t": 35.0, "note": "d1 is hot"})));
    assert_eq!(
        got[1],
        ("webhook".into(), "http://hooks.example/d1".into(), json!({"device_id": "d1", "temperature": 35.0}))
    );
    assert_eq!(got[2].1, "devices/d1/commands");
    assert_eq!(got[2].2["name"], json!("cool"));
    assert_eq!(got[2].2["params"], json!({"target": 20}));
    Ok(())
}

#[test]
fn processing_time_uses_the_arrival_time() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let rules = "stream telemetry { time processing }\nrule w { from telemetry window tumbling 1m by device_id select count(*) as n insert into w_out }";
    let (e, clock) = engine(&catalog, 1, rules)?;
    // Event times an hour apart, but they arrive within the same minute: one window.
    clock.set(10 * S);
    e.process(0, &[batch(&catalog, "telemetry", &[json!({"t": 0, "temperature": 1.0})])?]);
    clock.set(20 * S);
    e.process(0, &[batch(&catalog, "telemetry", &[json!({"t": 3600, "temperature": 1.0})])?]);
    clock.set(70 * S);
    let out = e.process(0, &[batch(&catalog, "telemetry", &[json!({"t": 7200, "temperature": 1.0})])?]);
    assert_eq!(rows_of(&out, "w_out")?, vec![json!({"time": 60.0, "device_id": "d1", "n": 2})]);
    Ok(())
}

#[test]
fn either_step_of_an_or_group_moves_the_match_on() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let rules = "rule r { from every (a = telemetry[door = 'open'] or b = telemetry[temperature > 50]) -> c = telemetry[door = 'closed'] within 5m select c.device_id, a.time as opened, b.temperature as hot insert into o }";
    let (e, _) = engine(&catalog, 1, rules)?;
    let b = batch(
        &catalog,
        "telemetry",
        &[
            json!({"t": 0, "door": "open", "temperature": 20.0}),
            json!({"t": 10, "temperature": 60.0}),
            json!({"t": 20, "door": "closed", "temperature": 20.0}),
        ],
    )?;
    let out = run_all(&e, &[b]);
    let info = e.info("r")?;
    assert_eq!(info.last_error, None);
    assert_eq!(
        rows_of(&out, "o")?,
        vec![
            json!({"time": 20.0, "device_id": "d1", "opened": 0.0, "hot": null}),
            json!({"time": 20.0, "device_id": "d1", "opened": null, "hot": 60.0}),
        ]
    );
    Ok(())
}

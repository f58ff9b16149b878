//! Window rules: every window kind, `having`, alerts raised and cleared, late events.

use anyhow::Result;
use serde_json::json;

use crate::harness::*;

fn run(rules: &str, rows: &[serde_json::Value]) -> Result<Vec<ferrite_engine::StreamBatch>> {
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(&catalog, 1, rules)?;
    let b = batch(&catalog, "telemetry", rows)?;
    Ok(run_all(&e, &[b]))
}

#[test]
fn tumbling_windows_close_on_the_device_watermark_and_at_the_end() -> Result<()> {
    let out = run(
        include_str!("../design.rules"),
        &[
            json!({"t": 0, "d": "d1", "temperature": 80.0}),
            json!({"t": 30, "d": "d1", "temperature": 90.0}),
            json!({"t": 10, "d": "d2", "temperature": 100.0}),
            json!({"t": 60, "d": "d1", "temperature": 10.0}),
        ],
    )?;
    let rows = rows_of(&out, "hot_devices")?;
    assert_eq!(
        rows,
        vec![
            json!({"time": 60.0, "device_id": "d1", "avg_temp": 85.0, "n": 2}),
            json!({"time": 60.0, "device_id": "d2", "avg_temp": 100.0, "n": 1}),
        ]
    );
    Ok(())
}

#[test]
fn alerts_are_raised_once_and_cleared() -> Result<()> {
    let rules = "rule hot {\n from telemetry\n window tumbling 1m by device_id\n select device_id, avg(temperature) as t\n having t > 50\n then alert severity 'critical' message '{device_id} at {t}'\n}\n";
    let out = run(
        rules,
        &[
            json!({"t": 0, "temperature": 90.0}),
            json!({"t": 60, "temperature": 90.0}),
            json!({"t": 120, "temperature": 10.0}),
            json!({"t": 180, "temperature": 10.0}),
        ],
    )?;
    let alerts: Vec<(String, String)> = rows_of(&out, "alerts")?
        .iter()
        .map(|r| (r["state"].as_str().unwrap_or("").to_owned(), r["message"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(
        alerts,
        vec![("raised".to_owned(), "d1 at 90.0".to_owned()), ("cleared".to_owned(), "d1 at 10.0".to_owned())]
    );
    Ok(())
}

#[test]
fn late_events_go_to_the_late_stream() -> Result<()> {
    let rules = "stream telemetry { max_delay 10s }\nrule c { from telemetry window tumbling 1m by device_id select device_id, count(*) as n insert into counts }";
    let out = run(
        rules,
        &[
            json!({"t": 100, "temperature": 1.0}),
            json!({"t": 95, "temperature": 2.0}),
            json!({"t": 50, "temperature": 3.0}),
        ],
    )?;
    let late = rows_of(&out, "telemetry_late")?;
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["temperature"], json!(3.0));
    assert_eq!(late[0]["late_for_rule"], json!("c"));
    let counts = rows_of(&out, "counts")?;
    assert_eq!(counts, vec![json!({"time": 120.0, "device_id": "d1", "n": 2})]);
    Ok(())
}

#[test]
fn hopping_windows_overlap() -> Result<()> {
    let rules = "rule h { from telemetry window hopping 2m every 1m by device_id select window_start, count(*) as n insert into h_out }";
    let out = run(rules, &[json!({"t": 30, "temperature": 1.0}), json!({"t": 90, "temperature": 1.0})])?;
    let got: Vec<(f64, i64)> = rows_of(&out, "h_out")?
        .iter()
        .map(|r| (r["window_start"].as_f64().unwrap_or(f64::NAN), r["n"].as_i64().unwrap_or(-1)))
        .collect();
    assert_eq!(got, vec![(-60.0, 1), (0.0, 2), (60.0, 1)]);
    Ok(())
}

#[test]
fn sliding_windows_emit_per_event_and_retract() -> Result<()> {
    let rules = "rule s { from telemetry window sliding 5m by device_id select count(*) as n, sum(temperature) as total, max(temperature) as hi insert into s_out }";
    let out = run(
        rules,
        &[
            json!({"t": 0, "temperature": 5.0}),
            json!({"t": 60, "temperature": 1.0}),
            json!({"t": 400, "temperature": 2.0}),
        ],
    )?;
    let got: Vec<(i64, f64, f64)> = rows_of(&out, "s_out")?
        .iter()
        .map(|r| {
            (
                r["n"].as_i64().unwrap_or(-1),
                r["total"].as_f64().unwrap_or(f64::NAN),
                r["hi"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(got, vec![(1, 5.0, 5.0), (2, 6.0, 5.0), (1, 2.0, 2.0)]);
    Ok(())
}

#[test]
fn session_windows_split_on_gaps() -> Result<()> {
    let rules = "rule s { from telemetry window session 30s by device_id select window_start, window_end, count(*) as n insert into sessions }";
    let rows: Vec<_> = [0, 10, 20, 100, 110].iter().map(|t| json!({"t": t, "temperature": 1.0})).collect();
    let out = run(rules, &rows)?;
    let got: Vec<(f64, f64, i64)> = rows_of(&out, "sessions")?
        .iter()
        .map(|r| {
            (
                r["window_start"].as_f64().unwrap_or(f64::NAN),
                r["window_end"].as_f64().unwrap_or(f64::NAN),
                r["n"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(got, vec![(0.0, 20.0, 3), (100.0, 110.0, 2)]);
    Ok(())
}

#[test]
fn count_windows_tumble_and_slide() -> Result<()> {
    let rows: Vec<_> = [1.0, 2.0, 3.0].iter().enumerate().map(|(i, v)| json!({"t": i, "temperature": v})).collect();
    let out = run(
        "rule c { from telemetry window tumbling count 2 by device_id select sum(temperature) as s insert into c_out }",
        &rows,
    )?;
    assert_eq!(rows_of(&out, "c_out")?.iter().map(|r| r["s"].clone()).collect::<Vec<_>>(), vec![json!(3.0)]);
    let out = run(
        "rule c { from telemetry window sliding count 2 by device_id select sum(temperature) as s insert into c_out }",
        &rows,
    )?;
    assert_eq!(
        rows_of(&out, "c_out")?.iter().map(|r| r["s"].clone()).collect::<Vec<_>>(),
        vec![json!(1.0), json!(3.0), json!(5.0)]
    );
    Ok(())
}

#[test]
fn the_aggregate_library_is_datafusions() -> Result<()> {
    let rules = "rule a { from telemetry window tumbling 1m by device_id select count(distinct temperature) as k, stddev(temperature) as sd, first_value(temperature) as f, last_value(temperature) as l, approx_percentile_cont(temperature, 0.5) as p50, min(door) as dmin insert into a_out }";
    let rows: Vec<_> = [2.0, 4.0, 4.0, 6.0]
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"t": i, "temperature": v, "door": format!("x{i}")}))
        .collect();
    let out = run(rules, &rows)?;
    let r = &rows_of(&out, "a_out")?[0];
    assert_eq!(r["k"], json!(3));
    assert!((r["sd"].as_f64().unwrap_or(0.0) - 1.632_993).abs() < 1e-5, "{r}");
    assert_eq!((r["f"].clone(), r["l"].clone()), (json!(2.0), json!(6.0)));
    assert_eq!(r["p50"], json!(4.0));
    assert_eq!(r["dmin"], json!("x0"));
    Ok(())
}

#[test]
fn stateless_rules_filter_and_project() -> Result<()> {
    let rules = "rule f { from telemetry[temperature > 30] select device_id, temperature * 2 as double, upper(door) as door having double < 100 insert into f_out }";
    let out = run(
        rules,
        &[
            json!({"t": 0, "temperature": 20.0, "door": "a"}),
            json!({"t": 1, "temperature": 40.0, "door": "b"}),
            json!({"t": 2, "temperature": 60.0, "door": "c"}),
        ],
    )?;
    assert_eq!(rows_of(&out, "f_out")?, vec![json!({"time": 1.0, "device_id": "d1", "double": 80.0, "door": "B"})]);
    Ok(())
}

#[test]
fn open_windows_and_clocks_are_inspectable() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let rules = "stream telemetry { max_delay 5s }\nrule c { from telemetry window tumbling 1m by device_id select device_id, count(*) as n insert into counts }";
    let (e, _) = engine(&catalog, 2, rules)?;
    let b = batch(
        &catalog,
        "telemetry",
        &[json!({"t": 10, "d": "d1", "temperature": 1.0}), json!({"t": 62, "d": "d1", "temperature": 1.0})],
    )?;
    // The watermark (62 - 5 = 57 s) has not passed the first window's end: both are open.
    e.process(1, &[b]);
    let state = e.state_rows()?;
    assert_eq!(state.len(), 2, "{state:?}");
    assert!(state.iter().all(|r| r.shard == Some(1) && r.kind == "window" && r.detail == "d1"));
    let starts: Vec<i64> = state.iter().map(|r| r.start / S).collect();
    assert!(starts.contains(&0) && starts.contains(&60), "{starts:?}");
    let marks = e.watermark_rows();
    assert_eq!(marks.len(), 1);
    assert_eq!((marks[0].newest_event / S, marks[0].watermark / S), (62, 57));
    Ok(())
}

#[test]
fn a_static_table_enriches_events() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("sites.csv");
    std::fs::write(&csv, "device_id,site,floor\nd1,paris,2\nd2,lyon,1\n")?;
    let catalog = telemetry_catalog()?;
    let rules = format!(
        "table sites from '{}'\nrule r {{ from telemetry[sites.floor > 1 or sites.site is null] join sites on sites.device_id = device_id select device_id, sites.site as site, temperature insert into out }}",
        csv.display()
    );
    let (e, _) = engine(&catalog, 1, &rules)?;
    let b = batch(
        &catalog,
        "telemetry",
        &[
            json!({"t": 1, "d": "d1", "temperature": 1.0}),
            json!({"t": 2, "d": "d2", "temperature": 2.0}),
            json!({"t": 3, "d": "d3", "temperature": 3.0}),
        ],
    )?;
    let rows = rows_of(&e.process(0, &[b]), "out")?;
    assert_eq!(
        rows,
        vec![
            json!({"time": 1.0, "device_id": "d1", "site": "paris", "temperature": 1.0}),
            json!({"time": 3.0, "device_id": "d3", "site": null, "temperature": 3.0}),
        ]
    );
    Ok(())
}

#[test]
fn per_device_limits_come_from_a_stream_read_as_a_table() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let params = ferrite_engine::StreamName::new("rule_params")?;
    catalog.resolve_field(&params, "max_temp", ferrite_engine::FieldType::Float)?;
    let rules = "rule over { from telemetry[temperature > rule_params.max_temp] join rule_params on rule_params.device_id = device_id select device_id, temperature, rule_params.max_temp as limit then alert message '{device_id} above {limit}' }";
    let (e, _) = engine(&catalog, 2, rules)?;
    e.process(
        0,
        &[batch(
            &catalog,
            "rule_params",
            &[json!({"d": "d1", "max_temp": 30.0}), json!({"d": "d2", "max_temp": 50.0})],
        )?],
    );
    let hot = |e: &ferrite_rules::RuleEngine| -> Result<Vec<String>> {
        let b = batch(
            &catalog,
            "telemetry",
            &[
                json!({"t": 1, "d": "d1", "temperature": 40.0}),
                json!({"t": 1, "d": "d2", "temperature": 40.0}),
                json!({"t": 1, "d": "d3", "temperature": 40.0}),
            ],
        )?;
        Ok(rows_of(&e.process(1, &[b]), "alerts")?
            .iter()
            .map(|r| r["message"].as_str().unwrap_or("").to_owned())
            .collect())
    };
    assert_eq!(hot(&e)?, vec!["d1 above 30.0"]);
    // A new limit for d2, written like any event: the rule uses it from then on.
    e.process(1, &[batch(&catalog, "rule_params", &[json!({"d": "d2", "max_temp": 35.0})])?]);
    assert_eq!(hot(&e)?, vec!["d1 above 30.0", "d2 above 35.0"]);
    Ok(())
}

#[test]
fn output_first_and_last_every_period() -> Result<()> {
    let rows: Vec<_> = [(0, 1.0), (20, 2.0), (50, 3.0), (70, 4.0), (80, 5.0), (130, 6.0)]
        .iter()
        .map(|(t, v)| json!({"t": t, "temperature": v}))
        .collect();
    let values = |out: &[ferrite_engine::StreamBatch]| -> Result<Vec<(f64, f64)>> {
        Ok(rows_of(out, "o")?
            .iter()
            .map(|r| (r["time"].as_f64().unwrap_or(f64::NAN), r["temperature"].as_f64().unwrap_or(f64::NAN)))
            .collect())
    };
    let first =
        run("rule r { from telemetry select device_id, temperature output first every 1m insert into o }", &rows)?;
    assert_eq!(values(&first)?, vec![(0.0, 1.0), (70.0, 4.0), (130.0, 6.0)]);
    // `last`: each minute's last row, sent once the minute is over (the final one at the end).
    let last =
        run("rule r { from telemetry select device_id, temperature output last every 1m insert into o }", &rows)?;
    assert_eq!(values(&last)?, vec![(50.0, 3.0), (80.0, 5.0), (130.0, 6.0)]);
    Ok(())
}

#[test]
fn editing_one_rule_of_a_file_keeps_the_others_state() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let a =
        "rule a { from telemetry window tumbling 1m by device_id select device_id, count(*) as n insert into a_out }\n";
    let (e, _) = engine(&catalog, 1, &format!("{a}rule b {{ from telemetry[temperature > 1] insert into b_out }}"))?;
    e.process(0, &[batch(&catalog, "telemetry", &[json!({"t": 10, "temperature": 5.0})])?]);
    assert_eq!(e.state_rows()?.len(), 1, "a's window is open");
    e.deploy(&format!("{a}rule b {{ from telemetry[temperature > 2] insert into b_out }}"), Some("test.rules"))
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    assert_eq!(e.state_rows()?.len(), 1, "a kept its window");
    let out = e.finish(0);
    assert_eq!(rows_of(&out, "a_out")?, vec![json!({"time": 60.0, "device_id": "d1", "n": 1})]);
    // Changing `a` itself starts it afresh.
    e.deploy(
        "rule a { from telemetry window tumbling 2m by device_id select device_id, count(*) as n insert into a_out }",
        Some("test.rules"),
    )
    .map_err(|err| anyhow::anyhow!("{err}"))?;
    assert_eq!(e.state_rows()?.len(), 0);
    Ok(())
}

#[test]
fn a_rule_is_compiled_again_when_an_input_field_widens_to_float() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let stream = ferrite_engine::StreamName::new("telemetry")?;
    catalog.resolve_field(&stream, "count", ferrite_engine::FieldType::Int)?;
    let rules = "rule c { from telemetry window tumbling 1m by device_id select device_id, sum(count) as total insert into totals }";
    let (e, _) = engine(&catalog, 1, rules)?;
    let ints = batch(&catalog, "telemetry", &[json!({"t": 1, "count": 1})])?;
    let mut out = e.process(0, &[ints]);
    // A decoder widens the field (a JSON fraction arrived), then commits floats.
    catalog.widen_field(&stream, "count")?;
    let floats = batch(&catalog, "telemetry", &[json!({"t": 2, "count": 2.5}), json!({"t": 3, "count": 0.25})])?;
    out.extend(e.process(0, &[floats]));
    out.extend(e.finish(0));
    let totals = rows_of(&out, "totals")?;
    // The window restarted with the new plan: no truncation to 2 and 0.
    assert_eq!(totals, vec![json!({"time": 60.0, "device_id": "d1", "total": 2.75})]);
    let totals_schema = catalog.get(&ferrite_engine::StreamName::new("totals")?).map(|s| s.field_type("total"));
    assert_eq!(totals_schema, Some(Some(ferrite_engine::FieldType::Float)), "the derived field widened too");
    assert_eq!(e.list().len(), 1);
    Ok(())
}

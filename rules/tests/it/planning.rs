//! Compiling rules against a catalog: the design rules, and errors that point at the problem.

use std::sync::Arc;

use anyhow::Result;
use ferrite_engine::StreamCatalog;
use ferrite_rules::Error;

use crate::harness::*;

#[test]
fn the_design_rules_compile_against_the_catalog() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(&catalog, 1, include_str!("../design.rules"))?;
    let names: Vec<String> = e.list().into_iter().map(|r| r.name).collect();
    assert_eq!(names, vec!["hot_devices", "door_left_open", "silent_device"]);
    Ok(())
}

fn check_error(rules: &str) -> Result<String> {
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(&catalog, 1, "rule ok { from telemetry insert into ok_out }")?;
    match e.check(rules) {
        Err(err @ Error::Invalid(_)) => Ok(err.render("x.rules", rules)),
        Err(other) => anyhow::bail!("unexpected error {other}"),
        Ok(_) => anyhow::bail!("rule compiled but should not have"),
    }
}

#[test]
fn an_unknown_column_is_an_error_with_the_columns_as_hint() -> Result<()> {
    let text = check_error("rule r {\n  from telemetry[tempreature > 3]\n  insert into o\n}\n")?;
    assert!(text.contains("x.rules:2:18"), "{text}");
    assert!(text.contains("tempreature"), "{text}");
    assert!(text.contains("hint: the stream's columns are: time, device_id, temperature, door"), "{text}");
    Ok(())
}

#[test]
fn an_unknown_stream_is_an_error() -> Result<()> {
    let text = check_error("rule r { from telemetri insert into o }")?;
    assert!(text.contains("unknown stream `telemetri`"), "{text}");
    assert!(text.contains("x.rules:1:15"), "{text}");
    Ok(())
}

#[test]
fn a_bad_select_list_points_at_the_select() -> Result<()> {
    let text = check_error(
        "rule r {\n  from telemetry\n  window tumbling 1m by device_id\n  select device_id, avg(nope)\n  insert into o\n}\n",
    )?;
    assert!(text.contains("x.rules:4:10"), "{text}");
    assert!(text.contains("nope"), "{text}");
    Ok(())
}

#[test]
fn aggregates_without_a_window_are_refused() -> Result<()> {
    let text = check_error("rule r { from telemetry select avg(temperature) insert into o }")?;
    assert!(text.contains("aggregates need a window"), "{text}");
    Ok(())
}

#[test]
fn a_rule_cannot_insert_into_its_input() -> Result<()> {
    let text = check_error("rule r { from telemetry insert into telemetry }")?;
    assert!(text.contains("inserts into its own input"), "{text}");
    Ok(())
}

#[test]
fn a_placeholder_must_name_an_output_column() -> Result<()> {
    let text = check_error("rule r { from telemetry select device_id then alert message 'hot {temp}' }")?;
    assert!(text.contains("placeholder `{temp}` names no output column"), "{text}");
    Ok(())
}

#[test]
fn a_failed_deploy_keeps_the_running_rules() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(&catalog, 1, "rule a { from telemetry[temperature > 1] insert into a_out }")?;
    assert!(e.deploy("rule a { from telemetry[nope > 1] insert into a_out }", Some("test.rules")).is_err());
    let info = e.info("a")?;
    assert!(info.text.contains("temperature > 1"));
    Ok(())
}

#[test]
fn unbuilt_constructs_are_refused_with_an_explanation() -> Result<()> {
    let text = check_error(
        "rule r { from every a = telemetry -> b = telemetry join devices on devices.id = device_id insert into o }",
    )?;
    assert!(text.contains("a pattern cannot join a table"), "{text}");
    let text = check_error(
        "rule r { from telemetry window sliding 5m by device_id select approx_distinct(door) as k insert into o }",
    )?;
    assert!(text.contains("cannot be used in a sliding window"), "{text}");
    Ok(())
}

#[test]
fn the_readme_rule_compiles() -> Result<()> {
    let readme = include_str!("../../../README.md");
    let start = readme.find("<<'RULE'\n").map(|i| i + 9).unwrap_or(0);
    let end = readme[start..].find("\nRULE\n").map_or(start, |i| start + i);
    let rule = &readme[start..end];
    assert!(rule.starts_with("rule hot_fridges"), "{rule}");
    let catalog = telemetry_catalog()?;
    engine(&catalog, 1, rule)?;
    Ok(())
}

#[test]
fn a_shadow_runs_beside_the_live_rule_and_reports_differences() -> Result<()> {
    use serde_json::json;
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(
        &catalog,
        1,
        "rule hot { from telemetry[temperature > 30] select device_id, temperature insert into hot }",
    )?;
    assert!(e.deploy_shadow("rule cold { from telemetry insert into x }").is_err(), "no live rule to shadow");
    e.deploy_shadow("rule hot { from telemetry[temperature > 40] select device_id, temperature insert into hot }")?;
    assert!(e.info("hot")?.has_shadow);
    let b =
        batch(&catalog, "telemetry", &[json!({"t": 1, "temperature": 35.0}), json!({"t": 2, "temperature": 45.0})])?;
    let out = e.process(0, &[b]);
    // Only the live rule's rows are committed.
    assert_eq!(rows_of(&out, "hot")?.len(), 2);
    let report = e.shadow_report("hot")?;
    assert_eq!((report.live_rows, report.shadow_rows, report.differing), (2, 1, 1));
    assert_eq!(report.only_live[0]["temperature"], json!(35.0));
    assert!(report.only_shadow.is_empty());
    e.promote("hot")?;
    assert!(e.shadow_report("hot").is_err());
    let b =
        batch(&catalog, "telemetry", &[json!({"t": 3, "temperature": 35.0}), json!({"t": 4, "temperature": 45.0})])?;
    assert_eq!(rows_of(&e.process(0, &[b]), "hot")?.len(), 1, "the promoted version runs");
    Ok(())
}

#[test]
fn a_stream_declaration_sets_the_streams_retention_when_deployed() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let text = "stream telemetry { max_delay 5s retention 90d }\nrule r { from telemetry insert into r_out }";
    let (e, _) = engine(&catalog, 1, text)?;
    let stream = ferrite_engine::StreamName::new("telemetry")?;
    assert_eq!(catalog.retention(&stream), Some(std::time::Duration::from_secs(90 * 86_400)));
    // Checking a file changes nothing; deploying another declaration does.
    e.check("stream telemetry { retention 2h }")?;
    assert_eq!(catalog.retention(&stream), Some(std::time::Duration::from_secs(90 * 86_400)));
    e.deploy("stream telemetry { retention 2h }", Some("other.rules"))?;
    assert_eq!(catalog.retention(&stream), Some(std::time::Duration::from_secs(7200)));
    Ok(())
}

#[test]
fn a_file_declaring_a_new_streams_fields_deploys_at_once_and_its_rules_see_the_first_event() -> Result<()> {
    let catalog = Arc::new(StreamCatalog::in_memory());
    let text = "stream readings { field v float }\nrule copy { from readings[v > 1] insert into copied }";
    // Without the declaration the file would wait for the stream's first event.
    let (e, _) = engine(&catalog, 1, text)?;
    assert!(catalog.get(&ferrite_engine::StreamName::new("readings")?).is_some(), "the stream exists");
    let b = batch(&catalog, "readings", &[serde_json::json!({"t": 1, "v": 2.0})])?;
    assert_eq!(rows_of(&e.process(0, &[b]), "copied")?.len(), 1, "the first event is seen");
    Ok(())
}

#[test]
fn a_stream_declaration_chooses_the_device_tag_and_default_device() -> Result<()> {
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(&catalog, 1, "stream readings { device_tag name default_device 'unnamed' }")?;
    let stream = ferrite_engine::StreamName::new("readings")?;
    let (tag, device) = catalog.device_naming(&stream);
    assert_eq!((tag.as_deref(), device.as_deref()), (Some("name"), Some("unnamed")));
    // A quoted tag (any characters), and a device that is not a device id at its position.
    e.deploy("stream readings { device_tag 'truck name' }", Some("other.rules"))?;
    assert_eq!(catalog.device_naming(&stream).0.as_deref(), Some("truck name"));
    let msg = check_error("stream readings { default_device 'a/b' }")?;
    assert!(msg.contains("not a device id") && msg.contains("default_device 'unknown'"), "{msg}");
    let msg = check_error("stream readings { device_tags name }")?;
    assert!(msg.contains("device_tag NAME"), "{msg}");
    Ok(())
}

#[test]
fn a_retention_under_an_hour_is_an_error_at_the_duration() -> Result<()> {
    let msg = check_error("stream telemetry { retention 30m }")?;
    assert!(msg.contains("shorter than an hour") && msg.contains("retention 1h"), "{msg}");
    let msg = check_error("stream telemetry { keep 30d }")?;
    assert!(msg.contains("retention DURATION"), "{msg}");
    Ok(())
}

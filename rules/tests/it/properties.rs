//! Property tests: window and pattern operators against naive reference implementations,
//! on random out-of-order input, whatever the batch boundaries and the number of shards.

use std::collections::BTreeMap;

use anyhow::Result;
use ferrite_engine::StreamBatch;
use proptest::prelude::*;
use serde_json::json;

use crate::harness::*;

/// One event: device (0..4), time in seconds, temperature, and a door state (0..3).
#[derive(Debug, Clone)]
struct Ev {
    d: u8,
    t: i64,
    v: i64,
    door: u8,
}

fn events(max_len: usize) -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec((0u8..4, 0i64..600, -50i64..50, 0u8..3), 1..max_len)
        .prop_map(|v| v.into_iter().map(|(d, t, v, door)| Ev { d, t, v, door }).collect())
}

fn to_rows(evs: &[Ev]) -> Vec<serde_json::Value> {
    let doors = ["open", "closed", "ajar"];
    evs.iter()
        .map(|e| json!({"t": e.t, "d": format!("dev{}", e.d), "temperature": e.v as f64, "door": doors[e.door as usize]}))
        .collect()
}

/// Runs `rules` over `evs`, cut into batches at `cuts`, with rows routed to `shards` shards
/// by the engine's device hash; returns the rows of `stream`, sorted.
fn run_split(rules: &str, evs: &[Ev], cuts: &[usize], shards: usize, stream: &str) -> Result<Vec<String>> {
    let catalog = telemetry_catalog()?;
    let (e, _) = engine(&catalog, shards, rules)?;
    let mut out: Vec<StreamBatch> = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (evs.len() + 1)).collect();
    bounds.push(0);
    bounds.push(evs.len());
    bounds.sort_unstable();
    bounds.dedup();
    for w in bounds.windows(2) {
        let part = &evs[w[0]..w[1]];
        for shard in 0..shards {
            let mine: Vec<Ev> = part
                .iter()
                .filter(|ev| {
                    let id = format!("dev{}", ev.d);
                    (ferrite_engine::shard::device_hash(id.as_bytes()) % shards as u64) as usize == shard
                })
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            let b = batch(&catalog, "telemetry", &to_rows(&mine))?;
            out.extend(e.process(shard, &[b]));
        }
    }
    for shard in 0..shards {
        out.extend(e.finish(shard));
    }
    let mut rows: Vec<String> = rows_of(&out, stream)?.iter().map(|r| r.to_string()).collect();
    rows.sort();
    Ok(rows)
}

/// Tumbling windows (size 60 s, max_delay 5 s) by the naive definition: an event is late
/// when older than its device's newest earlier event minus the delay; every window of the
/// others is emitted with its count and sum.
fn tumbling_reference(evs: &[Ev]) -> Vec<String> {
    let mut newest: BTreeMap<u8, i64> = BTreeMap::new();
    let mut windows: BTreeMap<(u8, i64), (i64, f64)> = BTreeMap::new();
    for e in evs {
        let late = newest.get(&e.d).is_some_and(|m| e.t < m - 5);
        let m = newest.entry(e.d).or_insert(e.t);
        *m = (*m).max(e.t);
        if late {
            continue;
        }
        let w = windows.entry((e.d, e.t.div_euclid(60) * 60)).or_insert((0, 0.0));
        w.0 += 1;
        w.1 += e.v as f64;
    }
    let mut rows: Vec<String> = windows
        .into_iter()
        .map(|((d, start), (n, s))| {
            json!({"time": (start + 60) as f64, "device_id": format!("dev{d}"), "n": n, "s": s}).to_string()
        })
        .collect();
    rows.sort();
    rows
}

/// `every a = open -> b = closed within 90 s` by the naive definition: each `open` event
/// matches the first later `closed` event of its device if it is at most 90 s later and no
/// event of the device more than 90 s after the `open` came before it.
fn pattern_reference(evs: &[Ev]) -> Vec<String> {
    let mut rows = Vec::new();
    for (i, a) in evs.iter().enumerate() {
        if a.door != 0 {
            continue;
        }
        for b in evs[i + 1..].iter().filter(|b| b.d == a.d) {
            if b.t - a.t > 90 {
                break;
            }
            if b.door == 1 {
                rows.push(json!({"time": b.t as f64, "device_id": format!("dev{}", a.d), "a_t": a.t as f64, "b_t": b.t as f64}).to_string());
                break;
            }
        }
    }
    rows.sort();
    rows
}

/// Hopping windows (2 min every 1 min, max_delay 5 s): as tumbling, each event in two windows.
fn hopping_reference(evs: &[Ev]) -> Vec<String> {
    let mut newest: BTreeMap<u8, i64> = BTreeMap::new();
    let mut windows: BTreeMap<(u8, i64), (i64, f64)> = BTreeMap::new();
    for e in evs {
        let late = newest.get(&e.d).is_some_and(|m| e.t < m - 5);
        let m = newest.entry(e.d).or_insert(e.t);
        *m = (*m).max(e.t);
        if late {
            continue;
        }
        let last = e.t.div_euclid(60) * 60;
        for start in [last, last - 60] {
            let w = windows.entry((e.d, start)).or_insert((0, 0.0));
            w.0 += 1;
            w.1 += e.v as f64;
        }
    }
    let mut rows: Vec<String> = windows
        .into_iter()
        .map(|((d, start), (n, s))| {
            json!({"time": (start + 120) as f64, "device_id": format!("dev{d}"), "n": n, "s": s}).to_string()
        })
        .collect();
    rows.sort();
    rows
}

/// Per device, in time order: the sliding 5-minute window (t - 300 s, t] at every event,
/// sessions split by gaps of more than 30 s, and `every a -> not telemetry for 100s`.
fn per_device(evs: &[Ev]) -> BTreeMap<u8, Vec<&Ev>> {
    let mut by: BTreeMap<u8, Vec<&Ev>> = BTreeMap::new();
    for e in evs {
        by.entry(e.d).or_default().push(e);
    }
    by
}

fn sliding_reference(evs: &[Ev]) -> Vec<String> {
    let mut rows = Vec::new();
    for (d, es) in per_device(evs) {
        for (i, e) in es.iter().enumerate() {
            let inside: Vec<&&Ev> = es[..=i].iter().filter(|x| x.t > e.t - 300).collect();
            let s: f64 = inside.iter().map(|x| x.v as f64).sum();
            rows.push(
                json!({"time": e.t as f64, "device_id": format!("dev{d}"), "n": inside.len(), "s": s}).to_string(),
            );
        }
    }
    rows.sort();
    rows
}

fn session_reference(evs: &[Ev]) -> Vec<String> {
    let mut rows = Vec::new();
    for (d, es) in per_device(evs) {
        let mut start = 0;
        for i in 1..=es.len() {
            if i == es.len() || es[i].t - es[i - 1].t > 30 {
                let n = i - start;
                let end = es[i - 1].t;
                rows.push(
                    json!({"time": end as f64, "device_id": format!("dev{d}"), "n": n, "first": es[start].t as f64})
                        .to_string(),
                );
                start = i;
            }
        }
    }
    rows.sort();
    rows
}

fn absence_reference(evs: &[Ev]) -> Vec<String> {
    let mut rows = Vec::new();
    for (d, es) in per_device(evs) {
        for (i, e) in es.iter().enumerate() {
            if es.get(i + 1).is_none_or(|next| next.t > e.t + 100) {
                rows.push(
                    json!({"time": (e.t + 100) as f64, "device_id": format!("dev{d}"), "v": e.v as f64}).to_string(),
                );
            }
        }
    }
    rows.sort();
    rows
}

/// Count windows per device, in arrival order: every 3 events (tumbling; a partial last
/// window is dropped) and the last 2 (sliding).
fn count_reference(evs: &[Ev]) -> Vec<String> {
    let mut rows = Vec::new();
    for (d, es) in per_device(evs) {
        for chunk in es.chunks(3).filter(|c| c.len() == 3) {
            let s: f64 = chunk.iter().map(|e| e.v as f64).sum();
            rows.push(
                json!({"time": chunk[2].t as f64, "device_id": format!("dev{d}"), "kind": "t", "s": s}).to_string(),
            );
        }
        for (i, e) in es.iter().enumerate() {
            let s: f64 = es[i.saturating_sub(1)..=i].iter().map(|x| x.v as f64).sum();
            rows.push(json!({"time": e.t as f64, "device_id": format!("dev{d}"), "kind": "s", "s": s}).to_string());
        }
    }
    rows.sort();
    rows
}

const COUNT: &str = "rule t { from telemetry window tumbling count 3 by device_id select device_id, 't' as kind, sum(temperature) as s insert into w_out }\nrule s { from telemetry window sliding count 2 by device_id select device_id, 's' as kind, sum(temperature) as s insert into w_out }";

/// Pairs (open event a, closed event b) of one device at most 30 s apart, either order,
/// with b hotter than a.
fn join_reference(evs: &[Ev]) -> Vec<String> {
    let mut rows = Vec::new();
    for (i, a) in evs.iter().enumerate() {
        for (j, b) in evs.iter().enumerate() {
            if i != j && a.d == b.d && a.door == 0 && b.door == 1 && (a.t - b.t).abs() <= 30 && b.v > a.v {
                rows.push(json!({"time": a.t.max(b.t) as f64, "device_id": format!("dev{}", a.d), "a_t": a.t as f64, "b_t": b.t as f64}).to_string());
            }
        }
    }
    rows.sort();
    rows
}

const JOIN: &str = "rule j { from a = telemetry[door = 'open'] join b = telemetry on b.door = 'closed' and b.temperature > a.temperature within 30s select a.time as a_t, b.time as b_t insert into w_out }";

const HOPPING: &str = "stream telemetry { max_delay 5s }\nrule w { from telemetry window hopping 2m every 1m by device_id select device_id, count(*) as n, sum(temperature) as s insert into w_out }";
const SLIDING: &str = "rule w { from telemetry window sliding 5m by device_id select device_id, count(*) as n, sum(temperature) as s insert into w_out }";
const SESSION: &str = "rule w { from telemetry window session 30s by device_id select device_id, count(*) as n, min(time) as first insert into w_out }";
const ABSENCE: &str = "rule w { from every a = telemetry -> not telemetry for 100s select a.device_id, a.temperature as v insert into w_out }";

const TUMBLING: &str = "stream telemetry { max_delay 5s }\nrule w { from telemetry window tumbling 1m by device_id select device_id, count(*) as n, sum(temperature) as s insert into w_out }";
const PATTERN: &str = "rule p { from every a = telemetry[door = 'open'] -> b = telemetry[door = 'closed'] within 90s select a.time as a_t, b.time as b_t insert into p_out }";

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn tumbling_windows_match_the_reference(evs in events(60), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        let got = run_split(TUMBLING, &evs, &cuts, shards, "w_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, tumbling_reference(&evs));
    }

    #[test]
    fn count_windows_match_the_reference(evs in events(50), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        let mut evs = evs;
        evs.sort_by_key(|e| e.t);
        let got = run_split(COUNT, &evs, &cuts, shards, "w_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, count_reference(&evs));
    }

    #[test]
    fn stream_joins_match_the_reference(evs in events(40), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        let mut evs = evs;
        evs.sort_by_key(|e| e.t);
        let got = run_split(JOIN, &evs, &cuts, shards, "w_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, join_reference(&evs));
    }

    #[test]
    fn hopping_windows_match_the_reference(evs in events(50), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        let got = run_split(HOPPING, &evs, &cuts, shards, "w_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, hopping_reference(&evs));
    }

    #[test]
    fn sliding_windows_match_the_reference(evs in events(50), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        let mut evs = evs;
        evs.sort_by_key(|e| e.t);
        let got = run_split(SLIDING, &evs, &cuts, shards, "w_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, sliding_reference(&evs));
    }

    #[test]
    fn session_windows_match_the_reference(evs in events(50), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        let mut evs = evs;
        evs.sort_by_key(|e| e.t);
        let got = run_split(SESSION, &evs, &cuts, shards, "w_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, session_reference(&evs));
    }

    #[test]
    fn absence_matches_the_reference(evs in events(40), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        let mut evs = evs;
        evs.sort_by_key(|e| e.t);
        let got = run_split(ABSENCE, &evs, &cuts, shards, "w_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, absence_reference(&evs));
    }

    #[test]
    fn followed_by_within_matches_the_reference(evs in events(40), cuts in prop::collection::vec(0usize..100, 0..4), shards in 1usize..4) {
        // Patterns run in arrival order per device; feed each device's events in time order.
        let mut evs = evs;
        evs.sort_by_key(|e| e.t);
        let got = run_split(PATTERN, &evs, &cuts, shards, "p_out").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, pattern_reference(&evs));
    }
}

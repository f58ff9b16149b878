//! Rule state in checkpoints: every rule's state on a shard (or the state shared by all
//! shards) encoded, and restored into the rules deployed at the next start. A rule's state
//! is restored only into the same rule: same name, same text, same input and row schemas
//! (its fingerprint); any other rule starts empty, as after a deployment.

use super::state::*;
use super::*;
use crate::codec::{Dec, DeviceNames, Enc};

/// Version of the encoding below.
const FORMAT: u32 = 1;

/// A rule's identity across restarts.
fn fingerprint(rule: &LiveRule) -> u64 {
    let plan = &rule.plan;
    let text = format!(
        "{}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{}",
        plan.name, plan.text, plan.input_schemas, plan.row_schema, rule.shadow
    );
    ferrite_engine::shard::device_hash(text.as_bytes())
}

fn save_clock(e: &mut Enc, c: &DeviceClock) {
    e.i64(c.max_time);
    e.i64(c.last_seen);
    e.u64(c.epoch);
}

/// Reads a device clock; the wall-clock time of its last event becomes `now`: time stood
/// still while the server was down, so a device is not taken as silent for the downtime.
fn restore_clock(d: &mut Dec<'_>, now: i64) -> datafusion::error::Result<DeviceClock> {
    let max_time = d.i64()?;
    let _last_seen = d.i64()?;
    Ok(DeviceClock { max_time, last_seen: now, epoch: d.u64()? })
}

fn save_state(e: &mut Enc, s: &mut RuleState) -> datafusion::error::Result<()> {
    e.u64(s.epoch);
    save_clock(e, &s.stream);
    e.len(s.devices.len());
    for (d, c) in &s.devices {
        e.str(d);
        save_clock(e, c);
    }
    e.len(s.raised.len());
    for k in &s.raised {
        e.str(k);
    }
    e.len(s.rate.len());
    for (k, v) in &s.rate {
        e.str(k);
        e.i64(*v);
    }
    e.len(s.pending.len());
    for (k, p) in &s.pending {
        e.str(k);
        e.i64(p.period);
        e.batch(&p.row)?;
        e.i64(p.time);
        e.str(&p.device);
    }
    match &mut s.op {
        OpState::Stateless => e.u8(0),
        OpState::Window(w) => {
            e.u8(1);
            w.save(e)?;
        }
        OpState::Pattern(p) => {
            e.u8(2);
            p.save(e)?;
        }
        OpState::Join(j) => {
            e.u8(3);
            j.save(e)?;
        }
    }
    Ok(())
}

fn restore_state(d: &mut Dec<'_>, s: &mut RuleState, now: i64) -> datafusion::error::Result<()> {
    let mut names = DeviceNames::default();
    s.epoch = d.u64()?;
    s.stream = restore_clock(d, now)?;
    for _ in 0..d.len()? {
        let device = names.get(&d.string()?);
        let clock = restore_clock(d, now)?;
        s.devices.insert(device, clock);
    }
    for _ in 0..d.len()? {
        s.raised.insert(d.string()?);
    }
    for _ in 0..d.len()? {
        let k = d.string()?;
        s.rate.insert(k, d.i64()?);
    }
    for _ in 0..d.len()? {
        let k = d.string()?;
        let period = d.i64()?;
        let row = d.batch()?;
        let time = d.i64()?;
        let device = names.get(&d.string()?);
        s.pending.insert(k, emit::PendingRow { period, row, time, device });
    }
    let kind = d.u8()?;
    match (&mut s.op, kind) {
        (OpState::Stateless, 0) => {}
        (OpState::Window(w), 1) => w.restore(d, &mut names)?,
        (OpState::Pattern(p), 2) => p.restore(d, &mut names)?,
        (OpState::Join(j), 3) => j.restore(d, &mut names)?,
        _ => {
            return Err(datafusion::error::DataFusionError::Execution(
                "the checkpoint holds another kind of rule state".to_owned(),
            ));
        }
    }
    if !d.is_empty() {
        return Err(datafusion::error::DataFusionError::Execution(
            "the checkpoint holds more than the rule's state".to_owned(),
        ));
    }
    Ok(())
}

impl RuleEngine {
    /// Every deployed rule's state on `shard` (`None`: the state shared by all shards),
    /// encoded for a checkpoint. Accumulators are rebuilt from the state they hand over, so
    /// the rules go on unchanged.
    pub fn snapshot(&self, shard: Option<usize>) -> Result<Vec<u8>> {
        let rules = self.rules();
        let shadows = self.shadows.read().clone();
        let mut map = match shard {
            Some(s) => self.shards.get(s).ok_or_else(|| Error::Input(format!("no shard {s}")))?.lock(),
            None => self.global.lock(),
        };
        let mut e = Enc::default();
        e.u32(FORMAT);
        let mut entries = Vec::new();
        for rule in rules.iter().chain(shadows.iter()) {
            if rule.failed.load(Ordering::Relaxed) {
                continue;
            }
            let Some(state) = map.get_mut(&rule.state_key()).filter(|s| s.generation == rule.generation) else {
                continue;
            };
            let mut inner = Enc::default();
            save_state(&mut inner, state).map_err(|err| eval(rule, err))?;
            entries.push((rule.state_key(), fingerprint(rule), inner.buf));
        }
        e.len(entries.len());
        for (key, fp, bytes) in entries {
            e.str(&key);
            e.u64(fp);
            e.bytes(&bytes);
        }
        // Streams read as tables (`join rule_params`): their rows at the cut. At start they
        // are loaded from SQL, which already holds rows written after the cut; replaying the
        // events after the cut must see the table as it was then.
        let lookups: Vec<((String, String), SharedLookup)> = match shard {
            Some(_) => Vec::new(),
            None => self
                .lookups
                .read()
                .iter()
                .filter(|((table, _), _)| !table.contains('\u{1}'))
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect(),
        };
        e.len(lookups.len());
        for ((table, key), t) in lookups {
            let rows = t.write().live_rows()?;
            e.str(&table);
            e.str(&key);
            e.batch(&rows).map_err(|err| Error::Input(format!("table `{table}`: {err}")))?;
        }
        Ok(e.buf)
    }

    /// Restores what [`Self::snapshot`] encoded into the deployed rules of the same
    /// fingerprint; returns how many rules got their state back. A rule whose state cannot
    /// be read starts empty (logged); the others are restored.
    pub fn restore(&self, shard: Option<usize>, bytes: &[u8]) -> Result<usize> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let damaged = |e: datafusion::error::DataFusionError| Error::Input(e.to_string());
        let mut d = Dec::new(bytes);
        let format = d.u32().map_err(damaged)?;
        if format != FORMAT {
            return Err(Error::Input(format!("rule state checkpoint format {format} is not {FORMAT}")));
        }
        let rules = self.rules();
        let shadows = self.shadows.read().clone();
        let now = self.clock.now_nanos();
        let mut map = match shard {
            Some(s) => self.shards.get(s).ok_or_else(|| Error::Input(format!("no shard {s}")))?.lock(),
            None => self.global.lock(),
        };
        let mut restored = 0;
        for _ in 0..d.len().map_err(damaged)? {
            let key = d.string().map_err(damaged)?;
            let fp = d.u64().map_err(damaged)?;
            let bytes = d.bytes().map_err(damaged)?;
            let Some(rule) = rules.iter().chain(shadows.iter()).find(|r| r.state_key() == key) else {
                tracing::info!(rule = %key, "a checkpointed rule is no longer deployed; its state is dropped");
                continue;
            };
            if fingerprint(rule) != fp || is_global(rule) != shard.is_none() {
                tracing::info!(rule = %key, "a checkpointed rule was changed since; it starts with empty state");
                continue;
            }
            let mut state = new_state(rule)?;
            match restore_state(&mut Dec::new(bytes), &mut state, now) {
                Ok(()) => {
                    map.insert(key, state);
                    restored += 1;
                }
                Err(e) => {
                    tracing::error!(rule = %key, error = %e, "cannot restore a rule's state; it starts empty");
                    self.metrics.inc("ferrite_rule_restore_failures_total", &[("rule", &rule.label)], 1);
                }
            }
        }
        drop(map);
        for _ in 0..d.len().map_err(damaged)? {
            let table = d.string().map_err(damaged)?;
            let key = d.string().map_err(damaged)?;
            let rows = d.batch().map_err(damaged)?;
            let Some(t) = self.lookups.read().get(&(table.clone(), key)).cloned() else { continue };
            let mut fresh = t.read().emptied();
            fresh.apply(&rows)?;
            *t.write() = fresh;
        }
        Ok(restored)
    }
}

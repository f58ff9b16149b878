//! Letting time pass: closing windows and completing absences by the clock or at the end.

use super::emit::release_due;
use super::state::*;
use super::*;

impl RuleEngine {
    /// Lets time pass on `shard`: devices silent for a while have their time extrapolated by
    /// the wall clock, which closes their windows and completes their absences.
    pub fn tick(&self, shard: usize) -> Vec<StreamBatch> {
        let now = self.clock.now_nanos();
        self.advance(shard, &|clock: &DeviceClock, delay: i64| {
            // A device's time moves with the wall clock once it is silent.
            let silent_for = now.saturating_sub(clock.last_seen);
            (silent_for > 0).then(|| clock.max_time.saturating_add(silent_for).saturating_sub(delay))
        })
    }

    /// End of input (tests, replay): closes every window and completes every absence.
    pub fn finish(&self, shard: usize) -> Vec<StreamBatch> {
        self.advance(shard, &|_, _| Some(i64::MAX))
    }

    pub(super) fn advance(&self, shard: usize, time_of: &dyn Fn(&DeviceClock, i64) -> Option<i64>) -> Vec<StreamBatch> {
        let rules = self.rules();
        let shadows = self.shadows.read().clone();
        let Some(states) = self.shards.get(shard) else { return Vec::new() };
        let mut states = states.lock();
        let mut out = Vec::new();
        for rule in rules.iter().chain(shadows.iter()) {
            if rule.failed.load(Ordering::Relaxed) {
                continue;
            }
            let compared = rule.shadow || shadows.iter().any(|s| s.plan.name == rule.plan.name);
            // Shared state moves on shard 0's ticks only.
            let mut global;
            let map = if is_global(rule) {
                if shard != 0 {
                    continue;
                }
                global = self.global.lock();
                &mut *global
            } else {
                &mut *states
            };
            let Some(state) = map.get_mut(&rule.state_key()).filter(|s| s.generation == rule.generation) else {
                continue;
            };
            let delay = rule.plan.time.max_delay.saturating_add(rule.plan.time.lateness);
            let result = self.guarded(rule, || -> Result<Vec<StreamBatch>> {
                let emitted = match &mut state.op {
                    OpState::Stateless => return Ok(Vec::new()),
                    OpState::Window(w) => {
                        let mut emitted = Vec::new();
                        if is_global(rule) {
                            if let Some(t) = time_of(&state.stream, delay) {
                                emitted.extend(w.close_until(t).map_err(|e| eval(rule, e))?);
                            }
                        } else {
                            for d in w.devices() {
                                let Some(t) = state.devices.get(&d).and_then(|c| time_of(c, delay)) else { continue };
                                emitted.extend(w.close_device(&d, t).map_err(|e| eval(rule, e))?);
                            }
                        }
                        if emitted.is_empty() {
                            return Ok(Vec::new());
                        }
                        let times = WindowState::times(&emitted);
                        let devices = emitted_devices(rule, &emitted);
                        let batch = w.to_batch(&emitted).map_err(|e| eval(rule, e))?;
                        (batch, times, devices)
                    }
                    OpState::Join(_) => return Ok(Vec::new()),
                    OpState::Pattern(p) => {
                        let devices = &state.devices;
                        let matches = p.advance_all(&|d: &str| {
                            devices
                                .get(d)
                                .and_then(|c| time_of(c, rule.plan.time.max_delay))
                                .map(|t| if t == i64::MAX { t } else { t.saturating_add(1) })
                        });
                        if matches.is_empty() {
                            return Ok(Vec::new());
                        }
                        let times: Vec<i64> = matches.iter().map(|m| m.time).collect();
                        let devices: Vec<Arc<str>> = matches.iter().map(|m| m.device.clone()).collect();
                        let batch = p.to_batch(&matches).map_err(|e| eval(rule, e))?;
                        (batch, times, devices)
                    }
                };
                let (batch, times, devices) = emitted;
                self.emit(rule, state, batch, &times, &devices)
            });
            // `output last`: rows whose period has ended by their device's time go out.
            let result = result.and_then(|mut b| {
                self.guarded(rule, || {
                    let Some(rate) = rule.plan.output_rate.filter(|r| !r.first) else { return Ok(b) };
                    let global = is_global(rule);
                    let now_of: HashMap<String, i64> = state
                        .pending
                        .values()
                        .filter_map(|p| {
                            let clock = if global { Some(&state.stream) } else { state.devices.get(&p.device) };
                            clock.and_then(|c| time_of(c, 0)).map(|t| (p.device.to_string(), t))
                        })
                        .collect();
                    if let Some(r) = release_due(state, rate.every, &|d| now_of.get(d).copied())? {
                        let all = vec![true; r.batch.num_rows()];
                        b.extend(
                            self.deliver(rule, state, &r.batch, &r.times, &r.devices, &r.keys, &all, None, false)?,
                        );
                    }
                    Ok(b)
                })
            });
            match result {
                Ok(b) => {
                    if compared {
                        self.record_shadow_outputs(rule, &b);
                    }
                    if !rule.shadow {
                        out.extend(b);
                    }
                }
                Err(e) => self.record_error(rule, &e),
            }
        }
        out
    }
}

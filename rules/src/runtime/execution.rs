//! Running rules over committed batches on a shard, with panics contained per rule.

use super::ops::*;
use super::state::*;
use super::*;

impl RuleEngine {
    /// Runs every rule over `batches` committed on `shard`; returns derived batches.
    pub fn process(&self, shard: usize, batches: &[StreamBatch]) -> Vec<StreamBatch> {
        if self.catalog.widenings() != self.widenings_seen.load(Ordering::Relaxed) {
            self.replan_widened();
        }
        let rules = self.rules();
        let shadows = self.shadows.read().clone();
        let Some(states) = self.shards.get(shard) else { return Vec::new() };
        let mut states = states.lock();
        let mut out = Vec::new();
        for sb in batches {
            self.feed_lookups(sb);
            let reads = |r: &&Arc<LiveRule>| {
                !r.failed.load(Ordering::Relaxed) && r.plan.inputs.iter().any(|i| i == sb.stream.as_str())
            };
            for rule in rules.iter().filter(reads).chain(shadows.iter().filter(reads)) {
                let compared = rule.shadow || shadows.iter().any(|s| s.plan.name == rule.plan.name);
                let started = Instant::now();
                let mut global;
                let map = if is_global(rule) {
                    global = self.global.lock();
                    &mut *global
                } else {
                    &mut *states
                };
                let state = match state_in(map, rule) {
                    Ok(s) => s,
                    Err(e) => {
                        self.record_error(rule, &e);
                        continue;
                    }
                };
                match self.guarded(rule, || self.run(rule, state, sb, shard)) {
                    Ok(o) => {
                        if compared {
                            self.record_shadow_outputs(rule, &o.batches);
                        }
                        if !rule.shadow {
                            out.extend(o.batches);
                        }
                    }
                    Err(e) => self.record_error(rule, &e),
                }
                let elapsed = started.elapsed();
                rule.stats.busy_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
                rule.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.metrics.histogram("ferrite_rule_seconds", &[("rule", &rule.label)]).observe(elapsed);
                self.metrics
                    .gauge("ferrite_rule_state_size", &[("rule", &rule.label), ("shard", &shard.to_string())])
                    .set(state_size(state) as i64);
            }
        }
        out
    }

    /// Runs `f` for `rule`, turning a panic into an error that disables the rule, so that
    /// one rule's bug never takes down the shard thread (and every device on it).
    pub(super) fn guarded<T>(&self, rule: &LiveRule, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                rule.failed.store(true, Ordering::Relaxed);
                self.metrics.inc("ferrite_rule_panics_total", &[("rule", &rule.label)], 1);
                tracing::error!(rule = %rule.plan.name, %message, "rule panicked; disabled until deployed again");
                Err(Error::Panicked { rule: rule.plan.name.clone(), message })
            }
        }
    }

    pub(super) fn record_error(&self, rule: &LiveRule, e: &Error) {
        rule.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.inc("ferrite_rule_errors_total", &[("rule", &rule.label)], 1);
        tracing::warn!(rule = %rule.plan.name, error = %e, "rule failed on a batch");
        *rule.last_error.lock() = Some(e.to_string());
    }

    /// Runs one rule over one batch.
    pub(super) fn run(
        &self,
        rule: &LiveRule,
        state: &mut RuleState,
        sb: &StreamBatch,
        _shard: usize,
    ) -> Result<Outputs> {
        let plan = &rule.plan;
        let input_idx = plan.inputs.iter().position(|i| i == sb.stream.as_str()).unwrap_or(0);
        let batch = ferrite_engine::align_to_schema(&sb.batch, &plan.input_schemas[input_idx])?;
        let n = batch.num_rows();
        if n == 0 {
            return Ok(Outputs { batches: Vec::new() });
        }
        rule.stats.events_in.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.inc("ferrite_rule_events_in_total", &[("rule", &rule.label)], n as u64);
        let now = self.clock.now_nanos();
        let time = if plan.time.processing_time {
            TimestampNanosecondArray::from(vec![now; n]).with_timezone("UTC")
        } else {
            time_column(&batch)?
        };
        let device_col = batch
            .column_by_name(DEVICE_COLUMN)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| Error::Input(format!("stream `{}` has no device_id column", sb.stream)))?
            .clone();
        // Watermarks per device: late rows are those older than the device's newest event
        // minus `max_delay` and `lateness`, evaluated row by row in arrival order. Device ids
        // become shared strings, one allocation per device and rule, not per row. Stateless
        // rules need neither.
        // `output last` keeps rows per key over event time: it needs the clocks too.
        let stateful = !matches!(state.op, OpState::Stateless) || plan.output_rate.is_some_and(|r| !r.first);
        let mut late = vec![false; if stateful { n } else { 0 }];
        let mut any_late = false;
        let mut devices: Vec<Arc<str>> = Vec::with_capacity(if stateful { n } else { 0 });
        let mut touched: Vec<Arc<str>> = Vec::new();
        let global_rule = is_global(rule);
        if stateful {
            state.epoch += 1;
            let epoch = state.epoch;
            let delay = plan.time.max_delay.saturating_add(plan.time.lateness);
            for (i, late_i) in late.iter_mut().enumerate() {
                let d = device_col.value(i);
                let (key, c) = match state.devices.get_key_value_mut(d) {
                    Some((k, c)) => (k.clone(), c),
                    None => {
                        let k: Arc<str> = Arc::from(d);
                        let c = state.devices.entry(k.clone()).or_insert(DeviceClock {
                            max_time: i64::MIN,
                            last_seen: now,
                            epoch: 0,
                        });
                        (k, c)
                    }
                };
                c.last_seen = now;
                if global_rule && !time.is_null(i) {
                    // Windows across devices: lateness against the stream's clock.
                    let t = time.value(i);
                    if state.stream.max_time != i64::MIN && t < state.stream.max_time.saturating_sub(delay) {
                        *late_i = true;
                        any_late = true;
                    } else {
                        state.stream.max_time = state.stream.max_time.max(t);
                        c.max_time = c.max_time.max(t);
                    }
                    state.stream.last_seen = now;
                } else if !time.is_null(i) {
                    let t = time.value(i);
                    if c.max_time != i64::MIN && t < c.max_time.saturating_sub(delay) {
                        *late_i = true;
                        any_late = true;
                    } else if t > c.max_time {
                        c.max_time = t;
                        if c.epoch != epoch {
                            c.epoch = epoch;
                            touched.push(key.clone());
                        }
                    }
                }
                devices.push(key);
            }
        }
        let mut batches = Vec::new();
        if any_late && !rule.shadow {
            let mask = BooleanArray::from(late.clone());
            let late_rows = filter_record_batch(&batch, &mask)?;
            let count = late_rows.num_rows() as u64;
            rule.stats.late.fetch_add(count, Ordering::Relaxed);
            self.metrics.inc("ferrite_rule_late_events_total", &[("rule", &rule.label)], count);
            batches.push(self.late_batch(sb.stream.as_str(), &plan.name, &late_rows)?);
        }
        // A join adds the table's columns (after late events were set aside as they came).
        let batch = match &plan.join {
            Some(j) => self.enrich(rule, j, &batch)?,
            None => batch,
        };
        // The stream filter, then the operator.
        let mut keep: Option<BooleanArray> = None;
        for op in &plan.pre {
            if let PostOp::Filter(f) = op {
                let m = f.evaluate(&batch).map_err(|e| eval(rule, e))?.into_array(n).map_err(|e| eval(rule, e))?;
                let m = m.as_boolean().clone();
                keep = Some(match keep {
                    Some(k) => arrow::compute::and(&k, &m)?,
                    None => m,
                });
            }
        }
        let keep = match (keep, any_late) {
            (Some(k), true) => Some(and_not(&k, &BooleanArray::from(late.clone()))?),
            (None, true) => Some(arrow::compute::not(&BooleanArray::from(late.clone()))?),
            (k, false) => k,
        };
        let keep = keep.map(|k| prep(&k));
        let (batch, time, devices) = match &keep {
            Some(k) if k.true_count() < n => {
                let b = filter_record_batch(&batch, k)?;
                let t = arrow::compute::filter(&time, k)?
                    .as_primitive::<arrow::datatypes::TimestampNanosecondType>()
                    .clone();
                let d: Vec<Arc<str>> = if stateful {
                    devices.into_iter().zip(k.values().iter()).filter(|(_, k)| *k).map(|(d, _)| d).collect()
                } else {
                    Vec::new()
                };
                (b, t, d)
            }
            _ => (batch, time, devices),
        };
        let (op_batch, times, out_devices) = match &mut state.op {
            OpState::Stateless => {
                let times: Vec<i64> =
                    (0..time.len()).map(|i| if time.is_null(i) { now } else { time.value(i) }).collect();
                let col = batch.column_by_name(DEVICE_COLUMN).and_then(|c| c.as_string_opt::<i32>());
                let devices: Vec<Arc<str>> = match col {
                    Some(c) => (0..c.len()).map(|i| Arc::from(c.value(i))).collect(),
                    None => Vec::new(),
                };
                (batch, times, devices)
            }
            OpState::Window(w) => {
                let OperatorPlan::Window(wp) = &plan.operator else { return Err(Error::Input("plan mismatch".into())) };
                let rows = batch.num_rows();
                let keys = wp
                    .keys
                    .iter()
                    .map(|k| k.evaluate(&batch).and_then(|v| v.into_array(rows)))
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(|e| eval(rule, e))?;
                let args = wp
                    .aggregates
                    .iter()
                    .map(|a| {
                        a.args
                            .iter()
                            .map(|e| e.evaluate(&batch).and_then(|v| v.into_array(rows)))
                            .collect::<datafusion::error::Result<Vec<_>>>()
                    })
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(|e| eval(rule, e))?;
                let filters = wp
                    .aggregates
                    .iter()
                    .map(|a| {
                        a.filter
                            .as_ref()
                            .map(|f| f.evaluate(&batch).and_then(|v| v.into_array(rows)).map(|a| prep(a.as_boolean())))
                            .transpose()
                    })
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(|e| eval(rule, e))?;
                let input = WindowInput {
                    time: &time,
                    devices: &devices,
                    keys: &keys,
                    args: &args,
                    filters: &filters,
                    skip: None,
                };
                let mut emitted = w.update(&input).map_err(|e| eval(rule, e))?;
                let delay = plan.time.max_delay.saturating_add(plan.time.lateness);
                if global_rule {
                    if state.stream.max_time != i64::MIN {
                        let wm = state.stream.max_time.saturating_sub(delay);
                        emitted.extend(w.close_until(wm).map_err(|e| eval(rule, e))?);
                    }
                } else {
                    for d in &touched {
                        if let Some(c) = state.devices.get(d) {
                            emitted.extend(
                                w.close_device(d, c.max_time.saturating_sub(delay)).map_err(|e| eval(rule, e))?,
                            );
                        }
                    }
                }
                let over = w.size().saturating_sub(plan.state_limit);
                if over > 0 {
                    rule.stats.evicted.fetch_add(over as u64, Ordering::Relaxed);
                }
                let times = WindowState::times(&emitted);
                let devs = emitted_devices(rule, &emitted);
                (w.to_batch(&emitted).map_err(|e| eval(rule, e))?, times, devs)
            }
            OpState::Pattern(p) => {
                let input = PatternInput {
                    stream: sb.stream.as_str(),
                    batch: &batch,
                    time: &time,
                    devices: &devices,
                    skip: None,
                };
                let before = p.evicted;
                let matches = p.update(&input).map_err(|e| eval(rule, e))?;
                if p.evicted > before {
                    rule.stats.evicted.fetch_add(p.evicted - before, Ordering::Relaxed);
                    self.metrics.inc("ferrite_rule_evicted_total", &[("rule", &rule.label)], p.evicted - before);
                }
                let times: Vec<i64> = matches.iter().map(|m| m.time).collect();
                let devs: Vec<Arc<str>> = matches.iter().map(|m| m.device.clone()).collect();
                (p.to_batch(&matches).map_err(|e| eval(rule, e))?, times, devs)
            }
            OpState::Join(j) => {
                let delay = plan.time.max_delay.saturating_add(plan.time.lateness);
                let pairs = j.update(sb.stream.as_str(), &batch, &time, &devices, delay).map_err(|e| eval(rule, e))?;
                let times: Vec<i64> = pairs.iter().map(|p| p.time).collect();
                let devs: Vec<Arc<str>> = pairs.iter().map(|p| p.device.clone()).collect();
                (j.to_batch(&pairs).map_err(|e| eval(rule, e))?, times, devs)
            }
        };
        batches.extend(self.emit(rule, state, op_batch, &times, &out_devices)?);
        Ok(Outputs { batches })
    }
}

//! What a rule emits: derived rows, alerts, late events, actions, and `output` rates.

use super::ops::*;
use super::state::*;
use super::*;

impl RuleEngine {
    /// Applies `having`, the select list and output limits to the operator's output, and
    /// turns the rows into derived batches, alerts and actions.
    pub(super) fn emit(
        &self,
        rule: &LiveRule,
        state: &mut RuleState,
        op_batch: RecordBatch,
        times: &[i64],
        devices: &[Arc<str>],
    ) -> Result<Vec<StreamBatch>> {
        let plan = &rule.plan;
        if op_batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        let rows = op_batch.num_rows();
        // Keys of the rows, for alert state and rate limits only: the window key, or the
        // device.
        let needs_keys =
            plan.output_rate.is_some() || plan.actions.iter().any(|a| matches!(a, ActionPlan::Alert { .. }));
        let keys: Vec<String> = match &plan.operator {
            _ if !needs_keys => Vec::new(),
            OperatorPlan::Window(w) if w.keys.len() > 1 => (0..rows)
                .map(|i| {
                    let view = RowView::new(&op_batch, i, &[]);
                    (0..w.keys.len())
                        .map(|k| view.text(op_batch.schema().field(k).name()).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect(),
            _ => devices.iter().map(|d| d.to_string()).collect(),
        };
        let passed: Vec<bool> = match &plan.having {
            Some(h) => {
                let m =
                    h.evaluate(&op_batch).map_err(|e| eval(rule, e))?.into_array(rows).map_err(|e| eval(rule, e))?;
                let m = m.as_boolean();
                (0..rows).map(|i| m.is_valid(i) && m.value(i)).collect()
            }
            None => vec![true; rows],
        };
        // The select list (and a having written over it): filters drop rows, so the row
        // positions are carried along to keep times, devices and keys in step.
        let mut out_batch = op_batch;
        let mut idx: Vec<usize> = (0..rows).collect();
        for op in &plan.post {
            match op {
                PostOp::Filter(f) => {
                    let n = out_batch.num_rows();
                    let m =
                        f.evaluate(&out_batch).map_err(|e| eval(rule, e))?.into_array(n).map_err(|e| eval(rule, e))?;
                    let m = prep(m.as_boolean());
                    out_batch = filter_record_batch(&out_batch, &m)?;
                    idx = idx.into_iter().zip(m.values().iter()).filter(|(_, k)| *k).map(|(i, _)| i).collect();
                }
                project => out_batch = apply(rule, project, &out_batch)?,
            }
        }
        let times: Vec<i64> = idx.iter().map(|&i| times[i]).collect();
        let devices: Vec<Arc<str>> = idx.iter().map(|&i| devices[i].clone()).collect();
        let keys: Vec<String> = if needs_keys { idx.iter().map(|&i| keys[i].clone()).collect() } else { keys };
        let passed: Vec<bool> = idx.iter().map(|&i| passed[i]).collect();
        // `output last every D`: the passing rows wait, one per key, until their period ends.
        let (held, released) = match plan.output_rate {
            Some(rate) if !rate.first => {
                let (held, released) = hold_last(state, &out_batch, &times, &devices, &keys, &passed, rate.every)?;
                (Some(held), released)
            }
            _ => (None, None),
        };
        let mut batches =
            self.deliver(rule, state, &out_batch, &times, &devices, &keys, &passed, held.as_deref(), true)?;
        if let Some(r) = released {
            let all = vec![true; r.batch.num_rows()];
            batches.extend(self.deliver(rule, state, &r.batch, &r.times, &r.devices, &r.keys, &all, None, false)?);
        }
        Ok(batches)
    }

    /// Turns final rows into derived batches, alerts and actions. `held` rows wait for
    /// `output last`; `apply_rate` applies `output first`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver(
        &self,
        rule: &LiveRule,
        state: &mut RuleState,
        out_batch: &RecordBatch,
        times: &[i64],
        devices: &[Arc<str>],
        keys: &[String],
        passed: &[bool],
        held: Option<&[bool]>,
        apply_rate: bool,
    ) -> Result<Vec<StreamBatch>> {
        let plan = &rule.plan;
        let mut emitted_rows = Vec::new();
        let mut batches = Vec::new();
        let mut alert_rows: Vec<(usize, &'static str)> = Vec::new();
        let has_alert = plan.actions.iter().any(|a| matches!(a, ActionPlan::Alert { .. }));
        for i in 0..out_batch.num_rows() {
            if held.is_some_and(|h| h[i]) {
                continue;
            }
            if !passed[i] {
                if plan.having.is_some() && has_alert && state.raised.remove(&keys[i]) {
                    alert_rows.push((i, "cleared"));
                }
                continue;
            }
            if let Some(rate) = plan.output_rate.filter(|r| r.first && apply_rate) {
                let period = times[i].div_euclid(i64::try_from(rate.every.as_nanos()).unwrap_or(i64::MAX).max(1));
                if state.rate.get(&keys[i]) == Some(&period) {
                    continue;
                }
                state.rate.insert(keys[i].clone(), period);
            }
            emitted_rows.push(i);
            if has_alert {
                if plan.having.is_some() {
                    if state.raised.insert(keys[i].clone()) {
                        alert_rows.push((i, "raised"));
                    }
                } else {
                    alert_rows.push((i, "raised"));
                }
            }
        }
        let matched = emitted_rows.len() as u64;
        rule.stats.matches.fetch_add(matched, Ordering::Relaxed);
        self.metrics.inc("ferrite_rule_matches_total", &[("rule", &rule.label)], matched);
        if !emitted_rows.is_empty() {
            let idx = arrow::array::UInt32Array::from_iter_values(emitted_rows.iter().map(|i| *i as u32));
            let out = arrow::compute::take_record_batch(out_batch, &idx)?;
            rule.stats.events_out.fetch_add(out.num_rows() as u64, Ordering::Relaxed);
            self.metrics.inc("ferrite_rule_events_out_total", &[("rule", &rule.label)], out.num_rows() as u64);
            if let Some(target) = &plan.insert_into {
                let stream = StreamName::from_key(target)?;
                let t = TimestampNanosecondArray::from_iter_values(emitted_rows.iter().map(|i| times[*i]));
                let d = StringArray::from_iter_values(emitted_rows.iter().map(|i| devices[*i].as_ref()));
                batches.push(if rule.shadow {
                    raw_output(&stream, &out, t, d)?
                } else {
                    conform(&self.catalog, &stream, &out, &t, &d)?
                });
            }
            // A shadow acts on nothing; nor does recovery, for rows acted on before a crash.
            let acts = !rule.shadow && !self.replaying.load(Ordering::Relaxed);
            for (k, &i) in emitted_rows.iter().enumerate().filter(|_| acts) {
                let extra = [("rule", plan.local_name())];
                let view = RowView::new(&out, k, &extra);
                for a in &plan.actions {
                    match a {
                        ActionPlan::Alert { .. } => {}
                        ActionPlan::Publish { topic, template } => {
                            let body = template.as_ref().map_or_else(|| view.to_json(), |t| fill_json(t, &view));
                            self.actions.publish(
                                plan.tenant(),
                                &fill_text(topic, &view),
                                body.to_string().into_bytes(),
                            );
                        }
                        ActionPlan::Command { device_column, name, params } => {
                            let Some(device) = view.text(device_column).filter(|d| !d.is_empty()) else { continue };
                            let params = params.as_ref().map_or(serde_json::json!({}), |t| fill_json(t, &view));
                            let id = format!("{}-{}-{}", plan.local_name(), device, times[i]);
                            self.actions.command(plan.tenant(), plan.local_name(), &device, name, params, &id);
                        }
                        ActionPlan::Webhook { url, template } => {
                            let body = template.as_ref().map_or_else(|| view.to_json(), |t| fill_json(t, &view));
                            self.actions.webhook(&fill_text(url, &view), body.to_string().into_bytes());
                        }
                    }
                }
            }
        }
        if !alert_rows.is_empty() {
            batches.push(self.alerts(rule, out_batch, &alert_rows, times, devices, keys)?);
        }
        Ok(batches)
    }

    pub(super) fn alerts(
        &self,
        rule: &LiveRule,
        out: &RecordBatch,
        rows: &[(usize, &'static str)],
        times: &[i64],
        devices: &[Arc<str>],
        keys: &[String],
    ) -> Result<StreamBatch> {
        let (severity, message) = rule
            .plan
            .actions
            .iter()
            .find_map(|a| match a {
                ActionPlan::Alert { severity, message } => Some((severity.as_str(), message.as_str())),
                _ => None,
            })
            .unwrap_or(("warning", ""));
        let extra = [("rule", rule.plan.local_name()), ("severity", severity)];
        let msgs: Vec<String> = rows.iter().map(|(i, _)| fill_text(message, &RowView::new(out, *i, &extra))).collect();
        let schema = crate::output::alerts_schema();
        let t = TimestampNanosecondArray::from_iter_values(rows.iter().map(|(i, _)| times[*i])).with_timezone("UTC");
        let columns: Vec<ArrayRef> = vec![
            Arc::new(t),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|(i, _)| devices[*i].as_ref()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|_| rule.plan.local_name()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|(i, _)| keys[*i].as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|_| severity))),
            Arc::new(StringArray::from_iter_values(msgs.iter())),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|(_, s)| *s))),
        ];
        let batch = RecordBatch::try_new(schema, columns)?;
        let stream = StreamName::in_tenant(rule.plan.tenant(), ALERTS_STREAM)?;
        if rule.shadow {
            return Ok(StreamBatch::new(stream, batch));
        }
        let time = batch.column(0).as_primitive::<arrow::datatypes::TimestampNanosecondType>().clone();
        let device = batch.column(1).as_string::<i32>().clone();
        conform(&self.catalog, &stream, &batch, &time, &device)
    }

    pub(super) fn late_batch(&self, stream: &str, rule: &str, rows: &RecordBatch) -> Result<StreamBatch> {
        let target = StreamName::from_key(&format!("{stream}_late"))?;
        let mut fields: Vec<arrow::datatypes::Field> =
            rows.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(arrow::datatypes::Field::new("late_for_rule", DataType::Utf8, true));
        let mut columns = rows.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter_values((0..rows.num_rows()).map(|_| rule))));
        let with_rule = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?;
        let time = time_column(rows)?;
        let device = rows
            .column_by_name(DEVICE_COLUMN)
            .and_then(|c| c.as_string_opt::<i32>())
            .cloned()
            .unwrap_or_else(|| StringArray::from(Vec::<&str>::new()));
        conform(&self.catalog, &target, &with_rule, &time, &device)
    }
}

/// The row `output last` holds for a key.
pub(super) struct PendingRow {
    pub(super) period: i64,
    pub(super) row: RecordBatch,
    pub(super) time: i64,
    pub(super) device: Arc<str>,
}

/// Rows released by `output last`, ready to deliver.
pub(super) struct Released {
    pub(super) batch: RecordBatch,
    pub(super) times: Vec<i64>,
    pub(super) devices: Vec<Arc<str>>,
    pub(super) keys: Vec<String>,
}

/// `output last every D`: passing rows replace their key's pending row; a pending row of an
/// earlier period is released. Returns which rows are held and what is released.
pub(super) fn hold_last(
    state: &mut RuleState,
    out: &RecordBatch,
    times: &[i64],
    devices: &[Arc<str>],
    keys: &[String],
    passed: &[bool],
    every: std::time::Duration,
) -> Result<(Vec<bool>, Option<Released>)> {
    let every = i64::try_from(every.as_nanos()).unwrap_or(i64::MAX).max(1);
    let mut released = Vec::new();
    for i in (0..out.num_rows()).filter(|&i| passed[i]) {
        let period = times[i].div_euclid(every);
        let row = PendingRow { period, row: out.slice(i, 1), time: times[i], device: devices[i].clone() };
        if let Some(old) = state.pending.insert(keys[i].clone(), row)
            && old.period < period
        {
            released.push((keys[i].clone(), old));
        }
    }
    Ok((passed.to_vec(), collect_released(released)?))
}

/// Pending `output last` rows whose period has ended by their device's time.
pub(super) fn release_due(
    state: &mut RuleState,
    every: std::time::Duration,
    time_of: &dyn Fn(&str) -> Option<i64>,
) -> Result<Option<Released>> {
    let every = i64::try_from(every.as_nanos()).unwrap_or(i64::MAX).max(1);
    let due: Vec<String> = state
        .pending
        .iter()
        .filter(|(_, p)| time_of(&p.device).is_some_and(|t| t == i64::MAX || t >= (p.period + 1).saturating_mul(every)))
        .map(|(k, _)| k.clone())
        .collect();
    let rows = due.into_iter().filter_map(|k| state.pending.remove(&k).map(|p| (k, p))).collect();
    collect_released(rows)
}

pub(super) fn collect_released(mut rows: Vec<(String, PendingRow)>) -> Result<Option<Released>> {
    if rows.is_empty() {
        return Ok(None);
    }
    rows.sort_by(|a, b| (a.1.time, &a.0).cmp(&(b.1.time, &b.0)));
    let schema = rows[0].1.row.schema();
    let parts: Vec<&RecordBatch> = rows.iter().map(|(_, p)| &p.row).collect();
    let batch = arrow::compute::concat_batches(&schema, parts)?;
    Ok(Some(Released {
        batch,
        times: rows.iter().map(|(_, p)| p.time).collect(),
        devices: rows.iter().map(|(_, p)| p.device.clone()).collect(),
        keys: rows.into_iter().map(|(k, _)| k).collect(),
    }))
}

/// A shadow's derived rows as they are (`time`, `device_id`, the output columns), without
/// touching the catalog.
pub(super) fn raw_output(
    stream: &StreamName,
    out: &RecordBatch,
    time: TimestampNanosecondArray,
    device: StringArray,
) -> Result<StreamBatch> {
    let mut fields = vec![
        arrow::datatypes::Field::new(TIME_COLUMN, ferrite_engine::time_field_type(), false),
        arrow::datatypes::Field::new(DEVICE_COLUMN, DataType::Utf8, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(time.with_timezone("UTC")), Arc::new(device)];
    for (f, c) in out.schema().fields().iter().zip(out.columns()) {
        if f.name() == TIME_COLUMN || f.name() == DEVICE_COLUMN {
            continue;
        }
        fields.push(f.as_ref().clone());
        columns.push(c.clone());
    }
    let batch = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?;
    Ok(StreamBatch::new(stream.clone(), batch))
}

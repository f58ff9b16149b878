//! The pattern operator: a per-device automaton over the steps of a pattern.
//!
//! Each step's conditions are split by the planner into *local* conjuncts (over the event
//! alone), which are evaluated as one boolean kernel over the whole batch, and *cross*
//! conjuncts (reading earlier steps, `b.temperature > a.temperature + 5`), evaluated only
//! for candidate rows against each open partial match of their device. Rows that are no
//! step's candidate are skipped without touching any state, unless the pattern is a strict
//! sequence (where any event of the device breaks a partial match).
//!
//! Semantics (see docs/rules.md): `every` starts a partial match at each first-step event
//! (without it, only when the device has none open); `->` lets other events come between
//! steps, `,` does not; a counted step `{min,max}` collects events until the next step
//! matches; `not X for D` holds when no matching event arrives within D of the previous
//! step; `within D` bounds a whole match. A device's time is its own event time, extrapolated
//! by the wall clock while it is silent, so a device that back-fills is never judged by
//! the clocks of other devices.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, TimestampNanosecondArray};
use arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;

use crate::plan::PatternPlan;
use crate::scalar::{Value, from_scalar};

type DfResult<T> = datafusion::error::Result<T>;

#[derive(Clone)]
struct Partial {
    step: usize,
    count: u32,
    start: i64,
    deadline: i64,
    /// Per step: the last event it matched (columns of the step's stream).
    captured: Vec<Option<Arc<Vec<ScalarValue>>>>,
    /// The captured values cross conditions read (`PatternPlan::refs`), typed and inline.
    typed: Typed,
}

/// Typed captured values: inline for the usual one or two, so that testing a partial match
/// reads nothing outside it.
#[derive(Clone)]
enum Typed {
    Inline([Value; 2]),
    Heap(Vec<Value>),
}

impl Typed {
    fn new(n: usize) -> Self {
        if n <= 2 { Typed::Inline([Value::Null, Value::Null]) } else { Typed::Heap(vec![Value::Null; n]) }
    }

    fn get(&self, i: usize) -> Option<&Value> {
        match self {
            Typed::Inline(a) => a.get(i),
            Typed::Heap(v) => v.get(i),
        }
    }

    fn set(&mut self, i: usize, v: Value) {
        match self {
            Typed::Inline(a) => {
                if let Some(x) = a.get_mut(i) {
                    *x = v;
                }
            }
            Typed::Heap(h) => {
                if let Some(x) = h.get_mut(i) {
                    *x = v;
                }
            }
        }
    }
}

impl Partial {
    /// Records the event step `j` matched, and the typed values conditions read from it.
    fn capture(&mut self, plan: &PatternPlan, j: usize, row: Arc<Vec<ScalarValue>>) {
        for (slot, (step, col)) in plan.refs.iter().enumerate() {
            if *step == j {
                self.typed.set(slot, row.get(*col).and_then(from_scalar).unwrap_or(Value::Null));
            }
        }
        self.captured[j] = Some(row);
    }
}

#[derive(Default)]
struct DeviceState {
    partials: Vec<Partial>,
}

/// A completed match: the device, when it completed, and the captured events.
pub struct Match {
    /// The device.
    pub device: Arc<str>,
    /// Event time of completion (for an absence: its deadline).
    pub time: i64,
    captured: Vec<Option<Arc<Vec<ScalarValue>>>>,
}

/// One batch of one input stream, aligned to the schema the rule was planned with.
pub struct PatternInput<'a> {
    /// The stream.
    pub stream: &'a str,
    /// The rows.
    pub batch: &'a RecordBatch,
    /// Event times.
    pub time: &'a TimestampNanosecondArray,
    /// Device ids.
    pub devices: &'a [Arc<str>],
    /// Rows to skip (late).
    pub skip: Option<&'a [bool]>,
}

/// State of one pattern rule on one shard.
pub struct PatternState {
    plan: PatternPlan,
    devices: hashbrown::HashMap<Arc<str>, DeviceState, ahash::RandomState>,
    limit: usize,
    partials: usize,
    /// A cleared vector reused for rebuilding a device's partial matches.
    spare: Vec<Partial>,
    /// Partial matches dropped because the state limit was reached.
    pub evicted: u64,
}

impl PatternState {
    /// Fresh state; at most `limit` partial matches are kept.
    pub fn new(plan: PatternPlan, limit: usize) -> Self {
        Self {
            plan,
            devices: hashbrown::HashMap::default(),
            limit: limit.max(1),
            partials: 0,
            spare: Vec::new(),
            evicted: 0,
        }
    }

    /// Open partial matches.
    pub fn size(&self) -> usize {
        self.partials
    }

    /// Schema of the matches [`Self::to_batch`] builds.
    pub fn match_schema(&self) -> &SchemaRef {
        &self.plan.match_schema
    }

    /// Partial matches per device, for inspection: (device, step reached, start time).
    pub fn partials(&self) -> Vec<(Arc<str>, usize, i64)> {
        let mut out = Vec::new();
        for (d, s) in &self.devices {
            for p in &s.partials {
                out.push((d.clone(), p.step, p.start));
            }
        }
        out
    }

    /// Writes the partial matches to a checkpoint.
    pub(crate) fn save(&self, e: &mut crate::codec::Enc) -> DfResult<()> {
        e.u64(self.evicted);
        e.len(self.devices.len());
        for (device, state) in &self.devices {
            e.str(device);
            e.len(state.partials.len());
            for p in &state.partials {
                e.u64(p.step as u64);
                e.u32(p.count);
                e.i64(p.start);
                e.i64(p.deadline);
                e.len(p.captured.len());
                for c in &p.captured {
                    match c {
                        Some(row) => {
                            e.u8(1);
                            e.scalars(row)?;
                        }
                        None => e.u8(0),
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the partial matches [`Self::save`] wrote into this fresh state.
    pub(crate) fn restore(
        &mut self,
        d: &mut crate::codec::Dec<'_>,
        names: &mut crate::codec::DeviceNames,
    ) -> DfResult<()> {
        let plan = &self.plan;
        self.evicted = d.u64()?;
        for _ in 0..d.len()? {
            let device = names.get(&d.string()?);
            let mut partials = Vec::new();
            for _ in 0..d.len()? {
                let step = usize::try_from(d.u64()?).map_err(|_| internal("step out of range"))?;
                let (count, start, deadline) = (d.u32()?, d.i64()?, d.i64()?);
                let steps = d.len()?;
                if steps != plan.steps.len() || step > plan.steps.len() {
                    return Err(internal("a partial match of another pattern"));
                }
                let mut p = Partial {
                    step,
                    count,
                    start,
                    deadline,
                    captured: vec![None; steps],
                    typed: Typed::new(plan.refs.len()),
                };
                for j in 0..steps {
                    if d.bool()? {
                        p.capture(plan, j, Arc::new(d.scalars()?));
                    }
                }
                partials.push(p);
            }
            self.partials += partials.len();
            self.devices.insert(device, DeviceState { partials });
        }
        Ok(())
    }

    /// Feeds one batch; returns completed matches.
    pub fn update(&mut self, input: &PatternInput<'_>) -> DfResult<Vec<Match>> {
        let n = input.batch.num_rows();
        // Local conditions over the whole batch, once per step reading this stream.
        let mut local: Vec<Option<BooleanArray>> = Vec::with_capacity(self.plan.steps.len());
        for step in &self.plan.steps {
            if step.stream != input.stream {
                local.push(None);
                continue;
            }
            let mask = match &step.local {
                Some(e) => {
                    let arr = e.evaluate(input.batch)?.into_array(n)?;
                    arr.as_any()
                        .downcast_ref::<BooleanArray>()
                        .cloned()
                        .ok_or_else(|| internal("condition is not boolean"))?
                }
                None => BooleanArray::from(vec![true; n]),
            };
            local.push(Some(mask));
        }
        let local_ok = |j: usize, i: usize| matches!(local.get(j), Some(Some(m)) if m.is_valid(i) && m.value(i));
        let mut out = Vec::new();
        for i in 0..n {
            if input.skip.is_some_and(|s| s[i]) || input.time.is_null(i) {
                continue;
            }
            let t = input.time.value(i);
            let device = &input.devices[i];
            let is_candidate = (0..self.plan.steps.len()).any(|j| local_ok(j, i));
            if !is_candidate && !self.plan.strict {
                // Not a step of anything, but time passes for the device (absences, within).
                if let Some(state) = self.devices.get_mut(device) {
                    let before = state.partials.len();
                    advance_time(&self.plan, state, device, t, &mut out);
                    self.partials -= before - state.partials.len();
                    if state.partials.is_empty() {
                        self.devices.remove(device);
                    }
                }
                continue;
            }
            let mut row_cache: Option<Arc<Vec<ScalarValue>>> = None;
            let mut row = || -> DfResult<Arc<Vec<ScalarValue>>> {
                if let Some(r) = &row_cache {
                    return Ok(r.clone());
                }
                let r = Arc::new(
                    input
                        .batch
                        .columns()
                        .iter()
                        .map(|c| ScalarValue::try_from_array(c, i))
                        .collect::<DfResult<Vec<_>>>()?,
                );
                row_cache = Some(r.clone());
                Ok(r)
            };
            let plan = &self.plan;
            let state = self.devices.entry(device.clone()).or_default();
            let before = state.partials.len();
            advance_time(plan, state, device, t, &mut out);
            let step_matches = |j: usize, p: &Partial| -> DfResult<bool> {
                if !local_ok(j, i) {
                    return Ok(false);
                }
                cross_matches(plan, j, p, input.batch, i)
            };
            // The partials are rebuilt into the spare vector, which then takes their place.
            let mut kept = std::mem::take(&mut self.spare);
            kept.clear();
            let mut old = std::mem::take(&mut state.partials);
            for mut p in old.drain(..) {
                let step = &plan.steps[p.step];
                if step.absent_for.is_some() {
                    // The awaited absence is broken by a matching event.
                    if !step_matches(p.step, &p)? {
                        kept.push(p);
                    }
                    continue;
                }
                if let Some(g) = step.group.filter(|g| g.first) {
                    // Inside a group: `count` holds which of its two steps matched (bits 1, 2).
                    let j = p.step;
                    let hit = if p.count & 1 == 0 && step_matches(j, &p)? {
                        Some(j)
                    } else if p.count & 2 == 0 && step_matches(j + 1, &p)? {
                        Some(j + 1)
                    } else {
                        None
                    };
                    match hit {
                        Some(m) => {
                            p.count |= if m == j { 1 } else { 2 };
                            p.capture(plan, m, row()?);
                            finish_group(plan, p, g.and, t, device, &mut kept, &mut out);
                        }
                        None if plan.strict => {}
                        None => kept.push(p),
                    }
                    continue;
                }
                let next = p.step + 1;
                if p.count >= step.min && next < plan.steps.len() {
                    if let Some(g) = plan.steps[next].group.filter(|g| g.first) {
                        let hit = if step_matches(next, &p)? {
                            Some(next)
                        } else if step_matches(next + 1, &p)? {
                            Some(next + 1)
                        } else {
                            None
                        };
                        if let Some(m) = hit {
                            p.step = next;
                            p.count = if m == next { 1 } else { 2 };
                            p.capture(plan, m, row()?);
                            finish_group(plan, p, g.and, t, device, &mut kept, &mut out);
                            continue;
                        }
                    } else if step_matches(next, &p)? {
                        p.step = next;
                        p.count = 1;
                        p.capture(plan, next, row()?);
                        settle(plan, p, t, device, &mut kept, &mut out);
                        continue;
                    }
                }
                if step.max.is_none_or(|m| p.count < m) && step_matches(p.step, &p)? {
                    p.count += 1;
                    let at = p.step;
                    p.capture(plan, at, row()?);
                    settle(plan, p, t, device, &mut kept, &mut out);
                    continue;
                }
                if plan.strict {
                    // Strictly next: an event of the device that is not the next step breaks it.
                    continue;
                }
                kept.push(p);
            }
            // A new match starts at a first-step event (either step of a leading group).
            let first_group = plan.steps[0].group.filter(|g| g.first);
            let starts = local_ok(0, i) || (first_group.is_some() && local_ok(1, i));
            if starts && (plan.every || kept.is_empty()) {
                let mut p = Partial {
                    step: 0,
                    count: 0,
                    start: t,
                    deadline: i64::MAX,
                    captured: vec![None; plan.steps.len()],
                    typed: Typed::new(plan.refs.len()),
                };
                let hit = if local_ok(0, i) && cross_matches(plan, 0, &p, input.batch, i)? {
                    Some(0)
                } else if first_group.is_some() && local_ok(1, i) && cross_matches(plan, 1, &p, input.batch, i)? {
                    Some(1)
                } else {
                    None
                };
                match (hit, first_group) {
                    (Some(m), Some(g)) => {
                        p.count = if m == 0 { 1 } else { 2 };
                        p.capture(plan, m, row()?);
                        finish_group(plan, p, g.and, t, device, &mut kept, &mut out);
                    }
                    (Some(m), None) => {
                        p.count = 1;
                        p.capture(plan, m, row()?);
                        settle(plan, p, t, device, &mut kept, &mut out);
                    }
                    (None, _) => {}
                }
            }
            let after = kept.len();
            if kept.is_empty() {
                self.spare = kept;
                self.devices.remove(device);
            } else {
                state.partials = kept;
                self.spare = old;
            }
            self.partials = (self.partials + after).saturating_sub(before);
            if self.partials > self.limit {
                self.enforce_limit();
            }
        }
        Ok(out)
    }

    fn recount(&mut self) {
        self.partials = self.devices.values().map(|d| d.partials.len()).sum();
    }

    /// Drops the oldest partial matches beyond the limit, counting them.
    fn enforce_limit(&mut self) {
        while self.partials > self.limit {
            let oldest = self
                .devices
                .iter()
                .flat_map(|(d, s)| s.partials.iter().enumerate().map(move |(k, p)| (p.start, d.clone(), k)))
                .min_by_key(|(start, _, _)| *start);
            let Some((_, d, k)) = oldest else { break };
            if let Some(s) = self.devices.get_mut(&d) {
                s.partials.remove(k);
                if s.partials.is_empty() {
                    self.devices.remove(&d);
                }
            }
            self.partials -= 1;
            self.evicted += 1;
        }
    }

    /// Advances every device's time to `t_of(device)` (ticks on a live server, or the end
    /// of input with `i64::MAX`); returns matches completed by absences.
    pub fn advance_all(&mut self, t_of: &dyn Fn(&str) -> Option<i64>) -> Vec<Match> {
        let mut out = Vec::new();
        let devices: Vec<Arc<str>> = self.devices.keys().cloned().collect();
        for d in devices {
            let Some(t) = t_of(&d) else { continue };
            if let Some(state) = self.devices.get_mut(&d) {
                advance_time(&self.plan, state, &d, t, &mut out);
                if state.partials.is_empty() {
                    self.devices.remove(&d);
                }
            }
        }
        self.recount();
        out
    }

    /// Builds the batch of matches in the match schema (every named step's columns).
    pub fn to_batch(&self, matches: &[Match]) -> DfResult<RecordBatch> {
        let schema = self.plan.match_schema.clone();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        let mut col = 0;
        for (j, step) in self.plan.steps.iter().enumerate() {
            if step.alias.is_none() {
                continue;
            }
            for k in 0..step.width {
                let field = schema.field(col);
                let values: Vec<ScalarValue> = matches
                    .iter()
                    .map(|m| match &m.captured[j] {
                        Some(row) => row.get(k).cloned().unwrap_or(ScalarValue::Null),
                        None => ScalarValue::Null,
                    })
                    .collect();
                columns.push(crate::scalar::column_of(values, field.data_type())?);
                col += 1;
            }
        }
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(matches.len()));
        Ok(RecordBatch::try_new_with_options(schema, columns, &options)?)
    }
}

/// Lets the device's time reach `t`: absences whose deadline passed complete, matches
/// older than `within` expire.
fn advance_time(plan: &PatternPlan, state: &mut DeviceState, device: &Arc<str>, t: i64, out: &mut Vec<Match>) {
    let due = |p: &Partial| {
        if plan.steps[p.step].absent_for.is_some() {
            p.deadline < t
        } else {
            plan.within.is_some_and(|w| t.saturating_sub(p.start) > w)
        }
    };
    if !state.partials.iter().any(due) {
        return;
    }
    let mut kept = Vec::with_capacity(state.partials.len());
    let mut queue: Vec<Partial> = std::mem::take(&mut state.partials);
    queue.reverse();
    while let Some(mut p) = queue.pop() {
        let step = &plan.steps[p.step];
        if step.absent_for.is_some() {
            if p.deadline < t {
                // The absence held: move past it.
                if p.step + 1 == plan.steps.len() {
                    out.push(Match { device: device.clone(), time: p.deadline, captured: p.captured });
                    continue;
                }
                p.step += 1;
                p.count = 0;
                p.deadline = i64::MAX;
                queue.push(p);
                continue;
            }
        } else if let Some(w) = plan.within
            && t.saturating_sub(p.start) > w
        {
            continue;
        }
        kept.push(p);
    }
    state.partials = kept;
}

/// A group's steps matched so far are in `p.count` (bits 1 and 2): once the group holds
/// (`and`: both, `or`: either), the partial match moves past it.
fn finish_group(
    plan: &PatternPlan,
    mut p: Partial,
    and: bool,
    t: i64,
    device: &Arc<str>,
    kept: &mut Vec<Partial>,
    out: &mut Vec<Match>,
) {
    let holds = if and { p.count == 3 } else { p.count != 0 };
    if !holds {
        kept.push(p);
        return;
    }
    // Continue from the group's second step, as if it had just matched.
    p.step += 1;
    p.count = 1;
    settle(plan, p, t, device, kept, out);
}

/// After a step matched at `t`: completes the match, or moves into a following absence
/// (setting its deadline), or keeps waiting.
fn settle(
    plan: &PatternPlan,
    mut p: Partial,
    t: i64,
    device: &Arc<str>,
    kept: &mut Vec<Partial>,
    out: &mut Vec<Match>,
) {
    let step = &plan.steps[p.step];
    if p.count < step.min {
        kept.push(p);
        return;
    }
    let next = p.step + 1;
    if next == plan.steps.len() {
        out.push(Match { device: device.clone(), time: t, captured: p.captured });
        return;
    }
    if let Some(d) = plan.steps[next].absent_for {
        p.step = next;
        p.count = 0;
        p.deadline = if d < 0 { p.start.saturating_add(plan.within.unwrap_or(0)) } else { t.saturating_add(d) };
    }
    kept.push(p);
}

/// Evaluates the cross conditions of step `j` for row `i` against partial match `p`: one
/// row of the event's columns followed by every earlier named step's captured event.
fn cross_matches(plan: &PatternPlan, j: usize, p: &Partial, batch: &RecordBatch, i: usize) -> DfResult<bool> {
    let step = &plan.steps[j];
    let Some(expr) = &step.cross else { return Ok(true) };
    if let Some(fast) = &step.cross_scalar {
        // Column k after the event's: a typed value the partial keeps inline.
        let captured = |k: usize| -> Value {
            match step.ref_slots.get(k).copied().flatten() {
                Some(slot) => p.typed.get(slot).cloned().unwrap_or(Value::Null),
                None => Value::Null,
            }
        };
        return Ok(fast.holds(batch.columns(), i, &captured));
    }
    let mut columns: Vec<ArrayRef> = batch.columns().iter().map(|c| c.slice(i, 1)).collect();
    for (k, s) in plan.steps[..j].iter().enumerate() {
        if s.alias.is_none() {
            continue;
        }
        match &p.captured[k] {
            Some(row) => {
                for v in row.iter() {
                    columns.push(v.to_array()?);
                }
            }
            None => {
                for _ in 0..s.width {
                    let f = step.cross_schema.field(columns.len());
                    columns.push(arrow::array::new_null_array(f.data_type(), 1));
                }
            }
        }
    }
    let one = RecordBatch::try_new(step.cross_schema.clone(), columns)?;
    let v = expr.evaluate(&one)?.into_array(1)?;
    let b = v.as_any().downcast_ref::<BooleanArray>().ok_or_else(|| internal("condition is not boolean"))?;
    Ok(b.is_valid(0) && b.value(0))
}

fn internal(msg: &str) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Internal(msg.to_owned())
}

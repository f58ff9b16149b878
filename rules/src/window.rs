//! The window operator: per key and window, one DataFusion accumulator per aggregate.
//!
//! - Tumbling and hopping windows (time): each batch's rows are assigned their windows,
//!   grouped by (key, window) with one sort of row indices, and each group's accumulators
//!   get zero-copy slices of the argument columns (one `take` per argument per batch). A
//!   window closes (and emits) when its key's watermark passes its end.
//! - Sliding windows (the last `size` of event time, or the last `n` events) keep their
//!   rows' arguments and use DataFusion's retractable accumulators: each event adds
//!   itself and retracts what fell out, then emits.
//! - Session windows close after `gap` without events of their key.
//! - Tumbling count windows emit every `n` events of their key.
//!
//! The operator's output has the aggregate schema of the planned query: the key columns,
//! `window_start`, `window_end`, then one column per aggregate.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, TimestampNanosecondArray};
use arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;

use crate::ast::{Emit, WindowKind};
use crate::codec::{Dec, DeviceNames, Enc};
use crate::error::Result;
use crate::plan::WindowPlan;
use crate::slots::Slots;

type DfResult<T> = datafusion::error::Result<T>;

/// One open window of one key.
struct Group {
    key: OwnedRow,
    device: Arc<str>,
    start: i64,
    end: i64,
    accs: Vec<Box<dyn Accumulator>>,
    /// Sliding windows: the rows inside, oldest first (time, one value per argument).
    rows: VecDeque<(i64, Vec<Vec<ScalarValue>>)>,
    /// Count windows: events so far.
    count: u64,
    /// Session windows: time of the last event.
    last: i64,
}

/// An open window, for inspection.
#[derive(Debug, Clone)]
pub struct OpenWindow {
    /// Its device (for a window across devices: the one that opened it).
    pub device: Arc<str>,
    /// Its key, as text.
    pub key: String,
    /// Start (sliding, session and count windows: first event).
    pub start: i64,
    /// End (sliding, session and count windows: last event).
    pub end: i64,
}

/// A finished (or updated) window ready to be emitted.
pub struct Emitted {
    key: OwnedRow,
    /// The device whose watermark drove it (derived rows are written for this device).
    pub device: Arc<str>,
    start: i64,
    end: i64,
    values: Vec<ScalarValue>,
}

/// The rows of one input batch the operator should see: argument columns already computed.
pub struct WindowInput<'a> {
    /// Event times.
    pub time: &'a TimestampNanosecondArray,
    /// Device ids, one per row.
    pub devices: &'a [Arc<str>],
    /// Key columns.
    pub keys: &'a [ArrayRef],
    /// Per aggregate: its argument columns.
    pub args: &'a [Vec<ArrayRef>],
    /// Per aggregate: its `FILTER` mask, if any.
    pub filters: &'a [Option<BooleanArray>],
    /// Rows to skip (late), if any.
    pub skip: Option<&'a [bool]>,
}

/// State of one window rule on one shard.
pub struct WindowState {
    plan: WindowPlan,
    converter: RowConverter,
    /// Sliding, session and count windows: one group of accumulators per key.
    groups: HashMap<(OwnedRow, i64), Group>,
    /// Per device: open session windows (for closing on the device's watermark).
    by_device: HashMap<Arc<str>, Vec<(i64, OwnedRow, i64)>>,
    /// Tumbling and hopping windows: columnar slots.
    slots: Slots,
    /// Per device: its open tumbling or hopping windows' slots.
    slots_by_device: HashMap<Arc<str>, Vec<u32>, ahash::RandomState>,
    /// Hopping windows whose aggregates combine (count, sum, avg, min, max) keep one slot
    /// per `slide`-long pane; a window is the combination of its panes when it closes.
    panes: Option<i64>,
    /// With panes: per key, the start of the last window emitted.
    emitted_upto: HashMap<OwnedRow, i64>,
}

impl WindowState {
    /// Fresh state for `plan`; `key_types` are the Arrow types of the key expressions.
    pub fn new(
        plan: WindowPlan,
        key_types: Vec<arrow::datatypes::DataType>,
        input: &arrow::datatypes::Schema,
    ) -> Result<Self> {
        let key_types = if key_types.is_empty() { vec![arrow::datatypes::DataType::Boolean] } else { key_types };
        let converter = RowConverter::new(key_types.into_iter().map(SortField::new).collect())?;
        let slots = Slots::new(&plan.aggregates, input);
        let panes = match plan.kind {
            // Per device only: a key's panes must be found in one device's list.
            WindowKind::Hopping { slide, .. }
                if slots.all_native() && plan.emit == Emit::OnClose && plan.per_device =>
            {
                Some(nanos(slide))
            }
            _ => None,
        };
        Ok(Self {
            plan,
            converter,
            groups: HashMap::new(),
            by_device: HashMap::new(),
            slots,
            slots_by_device: HashMap::default(),
            panes,
            emitted_upto: HashMap::new(),
        })
    }

    /// Open windows.
    pub fn size(&self) -> usize {
        self.groups.len() + self.slots.len()
    }

    /// Whether windows slide (their accumulators retract what leaves them).
    fn sliding(&self) -> bool {
        matches!(self.plan.kind, WindowKind::Sliding { .. } | WindowKind::CountSliding { .. })
    }

    fn new_accs(&self) -> DfResult<Vec<Box<dyn Accumulator>>> {
        let sliding = self.sliding();
        self.plan
            .aggregates
            .iter()
            .map(|a| if sliding { a.function.create_sliding_accumulator() } else { a.function.create_accumulator() })
            .collect()
    }

    /// Feeds a batch; returns windows to emit now (updates, or sliding/count/session
    /// windows that completed).
    pub fn update(&mut self, input: &WindowInput<'_>) -> DfResult<Vec<Emitted>> {
        let rows = if self.plan.keys.is_empty() {
            // One global window: every row has the same (constant) key.
            let constant: ArrayRef = Arc::new(BooleanArray::from(vec![true; input.time.len()]));
            self.converter.convert_columns(&[constant])?
        } else {
            self.converter.convert_columns(input.keys)?
        };
        match self.plan.kind {
            WindowKind::Tumbling { size } => self.update_timed(input, &rows, nanos(size), nanos(size)),
            // Panes: each event updates the one pane it falls in.
            WindowKind::Hopping { .. } if self.panes.is_some() => {
                let slide = self.panes.unwrap_or(1);
                self.update_timed(input, &rows, slide, slide)
            }
            WindowKind::Hopping { size, slide } => self.update_timed(input, &rows, nanos(size), nanos(slide)),
            _ => self.update_per_event(input, &rows),
        }
    }

    /// Tumbling and hopping windows: find each row's slots (one per window it is in), then
    /// fold the batch into them aggregate by aggregate.
    fn update_timed(
        &mut self,
        input: &WindowInput<'_>,
        rows: &arrow::row::Rows,
        size: i64,
        slide: i64,
    ) -> DfResult<Vec<Emitted>> {
        let n = input.time.len();
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(n * (size / slide).max(1) as usize);
        for i in 0..n {
            if input.skip.is_some_and(|s| s[i]) || input.time.is_null(i) {
                continue;
            }
            let t = input.time.value(i);
            let key = rows.row(i);
            let device = &input.devices[i];
            let mut start = t - t.rem_euclid(slide);
            while start > t - size {
                let (slot, new) = self.slots.slot(key, start, device)?;
                if new {
                    match self.slots_by_device.get_mut(device.as_ref()) {
                        Some(list) => list.push(slot),
                        None => {
                            self.slots_by_device.insert(device.clone(), vec![slot]);
                        }
                    }
                }
                pairs.push((slot, i as u32));
                start -= slide;
            }
        }
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        self.slots.update(&pairs, input.args, input.filters)?;
        let mut out = Vec::new();
        if self.plan.emit == Emit::OnUpdate {
            let mut touched: Vec<u32> = pairs.iter().map(|p| p.0).collect();
            touched.sort_unstable();
            touched.dedup();
            for slot in touched {
                if let Some((key, device, start)) = self.slots.meta(slot) {
                    let values = self.slots.values(slot)?;
                    out.push(Emitted { key, device, start, end: start + size, values });
                }
            }
        }
        Ok(out)
    }

    /// Sliding, session and count windows: event by event, in arrival order.
    fn update_per_event(&mut self, input: &WindowInput<'_>, rows: &arrow::row::Rows) -> DfResult<Vec<Emitted>> {
        let mut out = Vec::new();
        for i in 0..input.time.len() {
            if input.skip.is_some_and(|s| s[i]) || input.time.is_null(i) {
                continue;
            }
            let t = input.time.value(i);
            let key = rows.row(i).owned();
            let values: Vec<Vec<ScalarValue>> = input
                .args
                .iter()
                .enumerate()
                .map(|(a, args)| {
                    let pass = input.filters[a].as_ref().is_none_or(|m| m.is_valid(i) && m.value(i));
                    if pass {
                        args.iter().map(|c| ScalarValue::try_from_array(c, i)).collect::<DfResult<Vec<_>>>()
                    } else {
                        Ok(Vec::new())
                    }
                })
                .collect::<DfResult<_>>()?;
            let map_key = (key.clone(), 0);
            let kind = self.plan.kind;
            // Session: an event after the gap closes the open session first.
            if let WindowKind::Session { gap } = kind
                && let Some(g) = self.groups.get(&map_key)
                && t - g.last > nanos(gap)
                && let Some(mut g) = self.groups.remove(&map_key)
            {
                out.push(emit_now(&mut g)?);
            }
            if !self.groups.contains_key(&map_key) {
                let accs = self.new_accs()?;
                self.groups.insert(
                    map_key.clone(),
                    Group {
                        key: key.clone(),
                        device: input.devices[i].clone(),
                        start: t,
                        end: t,
                        accs,
                        rows: VecDeque::new(),
                        count: 0,
                        last: t,
                    },
                );
                if matches!(kind, WindowKind::Session { .. }) {
                    self.by_device.entry(input.devices[i].clone()).or_default().push((i64::MIN, key.clone(), 0));
                }
            }
            let group = self.groups.get_mut(&map_key).ok_or_else(|| internal("group vanished"))?;
            for (acc, v) in group.accs.iter_mut().zip(&values) {
                if !v.is_empty() {
                    let arrays = v.iter().map(ScalarValue::to_array).collect::<DfResult<Vec<_>>>()?;
                    acc.update_batch(&arrays)?;
                }
            }
            group.count += 1;
            group.last = group.last.max(t);
            group.end = group.end.max(t);
            match kind {
                WindowKind::Sliding { size } => {
                    group.rows.push_back((t, values));
                    let horizon = t - nanos(size);
                    while group.rows.front().is_some_and(|(rt, _)| *rt <= horizon) {
                        if let Some((_, old)) = group.rows.pop_front() {
                            retract(group, &old)?;
                        }
                    }
                    group.start = horizon;
                    group.end = t;
                    out.push(emit_now(group)?);
                }
                WindowKind::CountSliding { n } => {
                    group.rows.push_back((t, values));
                    while group.rows.len() > n as usize {
                        if let Some((_, old)) = group.rows.pop_front() {
                            retract(group, &old)?;
                        }
                    }
                    group.start = group.rows.front().map_or(t, |r| r.0);
                    group.end = t;
                    out.push(emit_now(group)?);
                }
                WindowKind::CountTumbling { n } => {
                    if group.count >= u64::from(n) {
                        if let Some(mut g) = self.groups.remove(&map_key) {
                            out.push(emit_now(&mut g)?);
                        }
                    } else if self.plan.emit == Emit::OnUpdate {
                        out.push(emit_now(group)?);
                    }
                }
                WindowKind::Session { .. } => {
                    if self.plan.emit == Emit::OnUpdate {
                        out.push(emit_now(group)?);
                    }
                }
                WindowKind::Tumbling { .. } | WindowKind::Hopping { .. } => {}
            }
        }
        Ok(out)
    }

    /// Closes the windows of `device` that its watermark `wm` has passed.
    pub fn close_device(&mut self, device: &str, wm: i64) -> DfResult<Vec<Emitted>> {
        let mut out = Vec::new();
        let size = match self.plan.kind {
            WindowKind::Tumbling { size } | WindowKind::Hopping { size, .. } => nanos(size),
            WindowKind::Session { .. } => 0,
            // Sliding windows emit per event; count windows close on counts.
            _ => return Ok(out),
        };
        if let (Some(slide), true) = (self.panes, size > 0) {
            return self.close_panes(device, wm, size, slide);
        }
        if size > 0 {
            let Some(list) = self.slots_by_device.get_mut(device) else { return Ok(out) };
            let mut closing = Vec::new();
            let slots = &self.slots;
            list.retain(|&slot| match slots.start(slot) {
                Some(start) if start.saturating_add(size) <= wm => {
                    closing.push((start, slot));
                    false
                }
                Some(_) => true,
                None => false,
            });
            if list.is_empty() {
                self.slots_by_device.remove(device);
            }
            closing.sort_unstable();
            for (_, slot) in closing {
                if let Some(c) = self.slots.close(slot)?
                    && self.plan.emit == Emit::OnClose
                {
                    out.push(Emitted {
                        key: c.key,
                        device: c.device,
                        start: c.start,
                        end: c.start + size,
                        values: c.values,
                    });
                }
            }
            return Ok(out);
        }
        let session_gap = match self.plan.kind {
            WindowKind::Session { gap } => Some(nanos(gap)),
            _ => None,
        };
        let Some(list) = self.by_device.get_mut(device) else { return Ok(out) };
        let mut keep = Vec::with_capacity(list.len());
        let mut closing = Vec::new();
        for (end, key, start) in list.drain(..) {
            let end = match session_gap {
                Some(gap) => self.groups.get(&(key.clone(), start)).map_or(i64::MIN, |g| g.last.saturating_add(gap)),
                None => end,
            };
            if end <= wm { closing.push((end, key, start)) } else { keep.push((end, key, start)) }
        }
        *list = keep;
        if list.is_empty() {
            self.by_device.remove(device);
        }
        closing.sort_by_key(|(end, _, start)| (*end, *start));
        for (_, key, start) in closing {
            if let Some(mut g) = self.groups.remove(&(key, start))
                && (self.plan.emit == Emit::OnClose || session_gap.is_some())
            {
                out.push(emit_now(&mut g)?);
            }
        }
        Ok(out)
    }

    /// Hopping windows over panes: emits the windows of `device`'s keys that `wm` has
    /// passed, each the combination of its panes, and frees the panes no open window needs.
    fn close_panes(&mut self, device: &str, wm: i64, size: i64, slide: i64) -> DfResult<Vec<Emitted>> {
        let mut out = Vec::new();
        let Some(list) = self.slots_by_device.get(device) else { return Ok(out) };
        let mut by_key: HashMap<OwnedRow, Vec<(i64, u32, Arc<str>)>> = HashMap::new();
        for &slot in list {
            if let Some((key, dev, start)) = self.slots.meta(slot) {
                by_key.entry(key).or_default().push((start, slot, dev));
            }
        }
        let mut freed = Vec::new();
        for (key, mut panes) in by_key {
            panes.sort_by_key(|p| p.0);
            let (first, last) = (panes[0].0, panes[panes.len() - 1].0);
            let mut s = first - size + slide;
            if let Some(done) = self.emitted_upto.get(&key) {
                s = s.max(done + slide);
            }
            let mut upto = None;
            while s <= last && s.saturating_add(size) <= wm {
                let members: Vec<u32> = panes.iter().filter(|p| p.0 >= s && p.0 < s + size).map(|p| p.1).collect();
                if let (false, Some(values)) = (members.is_empty(), self.slots.combined(&members)) {
                    out.push(Emitted { key: key.clone(), device: panes[0].2.clone(), start: s, end: s + size, values });
                }
                upto = Some(s);
                s += slide;
            }
            for p in &panes {
                if p.0.saturating_add(size) <= wm {
                    freed.push(p.1);
                }
            }
            if panes.iter().all(|p| p.0.saturating_add(size) <= wm) {
                self.emitted_upto.remove(&key);
            } else if let Some(u) = upto {
                self.emitted_upto.insert(key, u);
            }
        }
        for slot in &freed {
            self.slots.close(*slot)?;
        }
        if let Some(list) = self.slots_by_device.get_mut(device) {
            list.retain(|s| !freed.contains(s));
            if list.is_empty() {
                self.slots_by_device.remove(device);
            }
        }
        out.sort_by_key(|e| (e.end, e.start));
        Ok(out)
    }

    /// Closes every window whose end `wm` has passed, whatever its device (windows not
    /// keyed by device close on the stream's watermark).
    pub fn close_until(&mut self, wm: i64) -> DfResult<Vec<Emitted>> {
        let mut out = Vec::new();
        let mut devices = self.devices();
        devices.sort();
        devices.dedup();
        for d in devices {
            out.extend(self.close_device(&d, wm)?);
        }
        out.sort_by_key(|e| (e.end, e.start));
        Ok(out)
    }

    /// Every open window, for inspection: (device, key as text, start, end; for sliding,
    /// session and count windows the times of their first and last events).
    pub fn open_windows(&self) -> DfResult<Vec<OpenWindow>> {
        let size = match (self.plan.kind, self.panes) {
            // With panes, an open slot is one pane.
            (WindowKind::Hopping { .. }, Some(slide)) => slide,
            (WindowKind::Tumbling { size } | WindowKind::Hopping { size, .. }, _) => nanos(size),
            _ => 0,
        };
        let mut items: Vec<(&OwnedRow, Arc<str>, i64, i64)> =
            self.slots.open().map(|(k, d, start)| (k, d.clone(), start, start + size)).collect();
        items.extend(self.groups.values().map(|g| (&g.key, g.device.clone(), g.start, g.end)));
        let keys: Vec<String> = if self.plan.keys.is_empty() || items.is_empty() {
            vec![String::new(); items.len()]
        } else {
            let cols = self.converter.convert_rows(items.iter().map(|i| i.0.row()))?;
            let options = arrow::util::display::FormatOptions::default();
            let formatters = cols
                .iter()
                .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()?;
            (0..items.len())
                .map(|r| formatters.iter().map(|f| f.value(r).to_string()).collect::<Vec<_>>().join(","))
                .collect()
        };
        Ok(items
            .into_iter()
            .zip(keys)
            .map(|((_, device, start, end), key)| OpenWindow { device, key, start, end })
            .collect())
    }

    /// Devices with open windows (for idle closing).
    pub fn devices(&self) -> Vec<Arc<str>> {
        self.by_device.keys().chain(self.slots_by_device.keys()).cloned().collect()
    }

    /// Closes every window that can close (end of input): tumbling, hopping and session
    /// windows emit; partial count windows are dropped, as they never completed.
    pub fn close_all(&mut self) -> DfResult<Vec<Emitted>> {
        let mut out = Vec::new();
        for d in self.devices() {
            out.extend(self.close_device(&d, i64::MAX)?);
        }
        Ok(out)
    }

    /// Writes the open windows to a checkpoint. Accumulators hand over their intermediate
    /// state and go on from it; sliding windows' `min` and `max` are rebuilt from the rows
    /// they hold instead (their state alone cannot retract).
    pub(crate) fn save(&mut self, e: &mut Enc) -> DfResult<()> {
        e.len(self.slots_by_device.len());
        for (device, list) in &self.slots_by_device {
            e.str(device);
            e.len(list.len());
            for &slot in list {
                self.slots.save_slot(slot, e)?;
            }
        }
        let replayed = self.replayed_aggregates();
        let fresh = self.fresh_accumulators();
        e.len(self.groups.len());
        for ((key, part), g) in &mut self.groups {
            e.bytes(key.row().as_ref());
            e.i64(*part);
            e.str(&g.device);
            e.i64(g.start);
            e.i64(g.end);
            e.u64(g.count);
            e.i64(g.last);
            e.len(g.rows.len());
            for (t, values) in &g.rows {
                e.i64(*t);
                e.len(values.len());
                for v in values {
                    e.scalars(v)?;
                }
            }
            for (a, acc) in g.accs.iter_mut().enumerate() {
                if !replayed[a] {
                    crate::codec::save_accumulator(e, acc, || fresh(a))?;
                }
            }
        }
        e.len(self.by_device.values().map(Vec::len).sum());
        for (device, list) in &self.by_device {
            for (end, key, start) in list {
                e.str(device);
                e.i64(*end);
                e.bytes(key.row().as_ref());
                e.i64(*start);
            }
        }
        e.len(self.emitted_upto.len());
        for (key, upto) in &self.emitted_upto {
            e.bytes(key.row().as_ref());
            e.i64(*upto);
        }
        Ok(())
    }

    /// Reads the open windows [`Self::save`] wrote into this fresh state.
    pub(crate) fn restore(&mut self, d: &mut Dec<'_>, devices: &mut DeviceNames) -> DfResult<()> {
        let parser = self.converter.parser();
        for _ in 0..d.len()? {
            let device = devices.get(&d.string()?);
            let mut list = Vec::new();
            for _ in 0..d.len()? {
                let key = d.bytes()?;
                let start = d.i64()?;
                list.push(self.slots.restore_slot(parser.parse(key), start, &device, d)?);
            }
            self.slots_by_device.insert(device, list);
        }
        let replayed = self.replayed_aggregates();
        for _ in 0..d.len()? {
            let key = parser.parse(d.bytes()?).owned();
            let part = d.i64()?;
            let device = devices.get(&d.string()?);
            let (start, end, count, last) = (d.i64()?, d.i64()?, d.u64()?, d.i64()?);
            let mut rows = VecDeque::new();
            for _ in 0..d.len()? {
                let t = d.i64()?;
                let values = (0..d.len()?).map(|_| d.scalars()).collect::<DfResult<Vec<_>>>()?;
                rows.push_back((t, values));
            }
            let mut accs = self.new_accs()?;
            for (a, acc) in accs.iter_mut().enumerate() {
                if replayed[a] {
                    for (_, values) in &rows {
                        if let Some(v) = values.get(a).filter(|v| !v.is_empty()) {
                            let arrays = v.iter().map(ScalarValue::to_array).collect::<DfResult<Vec<_>>>()?;
                            acc.update_batch(&arrays)?;
                        }
                    }
                } else {
                    crate::codec::restore_accumulator(d, acc)?;
                }
            }
            self.groups.insert((key.clone(), part), Group { key, device, start, end, accs, rows, count, last });
        }
        for _ in 0..d.len()? {
            let device = devices.get(&d.string()?);
            let end = d.i64()?;
            let key = parser.parse(d.bytes()?).owned();
            let start = d.i64()?;
            self.by_device.entry(device).or_default().push((end, key, start));
        }
        for _ in 0..d.len()? {
            let key = parser.parse(d.bytes()?).owned();
            self.emitted_upto.insert(key, d.i64()?);
        }
        Ok(())
    }

    /// Per aggregate: whether a checkpoint rebuilds it from the window's rows (sliding `min`
    /// and `max`) rather than from its saved state.
    fn replayed_aggregates(&self) -> Vec<bool> {
        let sliding = self.sliding();
        self.plan.aggregates.iter().map(|a| sliding && matches!(a.function.fun().name(), "min" | "max")).collect()
    }

    fn fresh_accumulators(&self) -> impl Fn(usize) -> DfResult<Box<dyn Accumulator>> + use<> {
        let sliding = self.sliding();
        let functions: Vec<_> = self.plan.aggregates.iter().map(|a| a.function.clone()).collect();
        move |a: usize| {
            let f = functions.get(a).ok_or_else(|| internal("no such aggregate"))?;
            if sliding { f.create_sliding_accumulator() } else { f.create_accumulator() }
        }
    }

    /// Builds the operator's output batch from emitted windows.
    pub fn to_batch(&self, emitted: &[Emitted]) -> DfResult<RecordBatch> {
        let mut columns: Vec<ArrayRef> = if self.plan.keys.is_empty() {
            Vec::new()
        } else {
            self.converter.convert_rows(emitted.iter().map(|e| e.key.row()))?
        };
        let starts = TimestampNanosecondArray::from_iter_values(emitted.iter().map(|e| e.start)).with_timezone("UTC");
        let ends = TimestampNanosecondArray::from_iter_values(emitted.iter().map(|e| e.end)).with_timezone("UTC");
        columns.push(Arc::new(starts));
        columns.push(Arc::new(ends));
        for a in 0..self.plan.aggregates.len() {
            let field = self.plan.output.field(columns.len());
            let values: Vec<ScalarValue> = emitted.iter().map(|e| e.values[a].clone()).collect();
            columns.push(crate::scalar::column_of(values, field.data_type())?);
        }
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(emitted.len()));
        Ok(RecordBatch::try_new_with_options(self.plan.output.clone(), columns, &options)?)
    }

    /// Event times of emitted windows: the window end (sliding: the event's time).
    pub fn times(emitted: &[Emitted]) -> Vec<i64> {
        emitted.iter().map(|e| e.end).collect()
    }
}

fn retract(group: &mut Group, old: &[Vec<ScalarValue>]) -> DfResult<()> {
    for (acc, v) in group.accs.iter_mut().zip(old) {
        if !v.is_empty() {
            let arrays = v.iter().map(ScalarValue::to_array).collect::<DfResult<Vec<_>>>()?;
            acc.retract_batch(&arrays)?;
        }
    }
    Ok(())
}

fn emit_now(g: &mut Group) -> DfResult<Emitted> {
    let values = g.accs.iter_mut().map(|a| a.evaluate()).collect::<DfResult<Vec<_>>>()?;
    Ok(Emitted { key: g.key.clone(), device: g.device.clone(), start: g.start, end: g.end, values })
}

fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn internal(msg: &str) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Internal(msg.to_owned())
}

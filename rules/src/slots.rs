//! Columnar state for tumbling and hopping windows: every open (key, window) pair owns a
//! *slot*, a row index into one state vector per aggregate. A batch is folded in with one
//! hash lookup per row and window (no allocation when the slot exists) and one tight loop
//! per aggregate over (slot, row) pairs. `count`, `sum`, `avg`, `min` and `max` over
//! numbers keep their state in those vectors; every other aggregate (and those with
//! `DISTINCT` or `FILTER`) falls back to a DataFusion accumulator per slot, fed zero-copy
//! slices of the batch after one sort of the pairs. A closed window frees its slot for the
//! next one, so memory follows the number of open windows.

use std::sync::Arc;

use ahash::RandomState;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, UInt32Array};
use arrow::compute::{filter as filter_array, take};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use arrow::row::{OwnedRow, Row};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;
use hashbrown::HashTable;

use crate::plan::AggregatePlan;

type DfResult<T> = datafusion::error::Result<T>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

/// One aggregate kept natively: per slot, the count of non-null inputs and a running value.
struct Native {
    kind: Kind,
    int: bool,
    n: Vec<i64>,
    f: Vec<f64>,
    i: Vec<i64>,
}

impl Native {
    fn of(plan: &AggregatePlan, input: &arrow::datatypes::Schema) -> Option<Self> {
        let f = &plan.function;
        if f.is_distinct() || plan.filter.is_some() || plan.args.len() != 1 {
            return None;
        }
        let kind = match f.fun().name() {
            "count" => Kind::Count,
            "sum" => Kind::Sum,
            "avg" => Kind::Avg,
            "min" => Kind::Min,
            "max" => Kind::Max,
            _ => return None,
        };
        let ty = plan.args[0].data_type(input).ok()?;
        let int = match ty {
            DataType::Float64 => false,
            DataType::Int64 => true,
            _ if kind == Kind::Count => false,
            _ => return None,
        };
        Some(Self { kind, int, n: Vec::new(), f: Vec::new(), i: Vec::new() })
    }

    fn reset(&mut self, slot: usize) {
        if self.n.len() <= slot {
            let len = slot + 1;
            self.n.resize(len, 0);
            self.f.resize(len, 0.0);
            self.i.resize(len, 0);
        }
        self.n[slot] = 0;
        self.f[slot] = match self.kind {
            Kind::Min => f64::INFINITY,
            Kind::Max => f64::NEG_INFINITY,
            _ => 0.0,
        };
        self.i[slot] = match self.kind {
            Kind::Min => i64::MAX,
            Kind::Max => i64::MIN,
            _ => 0,
        };
    }

    fn update(&mut self, values: &ArrayRef, pairs: &[(u32, u32)]) -> DfResult<()> {
        let valid = |row: usize| values.is_valid(row);
        let all_valid = values.null_count() == 0;
        if self.kind == Kind::Count {
            for &(s, r) in pairs {
                if all_valid || valid(r as usize) {
                    self.n[s as usize] += 1;
                }
            }
            return Ok(());
        }
        if self.int {
            let a = values.as_primitive::<Int64Type>().values();
            for &(s, r) in pairs {
                let (s, r) = (s as usize, r as usize);
                if !(all_valid || valid(r)) {
                    continue;
                }
                let v = a[r];
                self.n[s] += 1;
                match self.kind {
                    Kind::Sum => self.i[s] = self.i[s].wrapping_add(v),
                    Kind::Avg => self.f[s] += v as f64,
                    Kind::Min => self.i[s] = self.i[s].min(v),
                    Kind::Max => self.i[s] = self.i[s].max(v),
                    Kind::Count => {}
                }
            }
        } else {
            let a = values.as_primitive::<Float64Type>().values();
            for &(s, r) in pairs {
                let (s, r) = (s as usize, r as usize);
                if !(all_valid || valid(r)) {
                    continue;
                }
                let v = a[r];
                self.n[s] += 1;
                match self.kind {
                    Kind::Sum | Kind::Avg => self.f[s] += v,
                    Kind::Min => self.f[s] = self.f[s].min(v),
                    Kind::Max => self.f[s] = self.f[s].max(v),
                    Kind::Count => {}
                }
            }
        }
        Ok(())
    }

    /// The value over several slots taken together (the panes of a hopping window).
    fn combined(&self, slots: &[u32]) -> ScalarValue {
        let n: i64 = slots.iter().map(|&s| self.n[s as usize]).sum();
        let f = slots.iter().map(|&s| self.f[s as usize]);
        let i = slots.iter().map(|&s| self.i[s as usize]);
        match self.kind {
            Kind::Count => ScalarValue::Int64(Some(n)),
            Kind::Avg => ScalarValue::Float64((n > 0).then(|| f.sum::<f64>() / n as f64)),
            Kind::Sum if self.int => ScalarValue::Int64((n > 0).then(|| i.fold(0i64, i64::wrapping_add))),
            Kind::Sum => ScalarValue::Float64((n > 0).then(|| f.sum())),
            Kind::Min if self.int => ScalarValue::Int64((n > 0).then(|| i.min().unwrap_or(i64::MAX))),
            Kind::Min => ScalarValue::Float64((n > 0).then(|| f.fold(f64::INFINITY, f64::min))),
            Kind::Max if self.int => ScalarValue::Int64((n > 0).then(|| i.max().unwrap_or(i64::MIN))),
            Kind::Max => ScalarValue::Float64((n > 0).then(|| f.fold(f64::NEG_INFINITY, f64::max))),
        }
    }

    fn value(&self, slot: usize) -> ScalarValue {
        let n = self.n[slot];
        match self.kind {
            Kind::Count => ScalarValue::Int64(Some(n)),
            Kind::Avg => ScalarValue::Float64((n > 0).then(|| self.f[slot] / n as f64)),
            _ if self.int => ScalarValue::Int64((n > 0).then_some(self.i[slot])),
            _ => ScalarValue::Float64((n > 0).then_some(self.f[slot])),
        }
    }
}

enum Agg {
    Native(Native),
    /// Per slot, a DataFusion accumulator (created when the slot opens).
    Fallback(Vec<Option<Box<dyn Accumulator>>>),
}

/// Metadata of one slot.
struct Slot {
    key: OwnedRow,
    device: Arc<str>,
    start: i64,
}

/// A closed window's values.
pub struct Closed {
    /// The key.
    pub key: OwnedRow,
    /// The device.
    pub device: Arc<str>,
    /// Window start.
    pub start: i64,
    /// One value per aggregate.
    pub values: Vec<ScalarValue>,
}

/// The open windows of a tumbling or hopping window rule on one shard.
pub struct Slots {
    plans: Vec<AggregatePlan>,
    aggs: Vec<Agg>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    index: HashTable<u32>,
    hasher: RandomState,
    open: usize,
}

impl Slots {
    /// Empty state for `plans` over rows of `input`.
    pub fn new(plans: &[AggregatePlan], input: &arrow::datatypes::Schema) -> Self {
        let aggs = plans
            .iter()
            .map(|p| match Native::of(p, input) {
                Some(n) => Agg::Native(n),
                None => Agg::Fallback(Vec::new()),
            })
            .collect();
        Self {
            plans: plans.to_vec(),
            aggs,
            slots: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            hasher: RandomState::new(),
            open: 0,
        }
    }

    /// Open windows.
    pub fn len(&self) -> usize {
        self.open
    }

    /// Whether no window is open.
    pub fn is_empty(&self) -> bool {
        self.open == 0
    }

    fn hash(&self, key: Row<'_>, start: i64) -> u64 {
        self.hasher.hash_one((key.as_ref(), start))
    }

    /// The slot of (key, start), opened if new. Returns it and whether it is new.
    pub fn slot(&mut self, key: Row<'_>, start: i64, device: &Arc<str>) -> DfResult<(u32, bool)> {
        let h = self.hash(key, start);
        let slots = &self.slots;
        if let Some(&s) =
            self.index.find(h, |&s| slots[s as usize].as_ref().is_some_and(|x| x.start == start && x.key.row() == key))
        {
            return Ok((s, false));
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let idx = s as usize;
        self.slots[idx] = Some(Slot { key: key.owned(), device: device.clone(), start });
        for (agg, plan) in self.aggs.iter_mut().zip(&self.plans) {
            match agg {
                Agg::Native(n) => n.reset(idx),
                Agg::Fallback(accs) => {
                    if accs.len() <= idx {
                        accs.resize_with(idx + 1, || None);
                    }
                    accs[idx] = Some(plan.function.create_accumulator()?);
                }
            }
        }
        let hasher = &self.hasher;
        let slots = &self.slots;
        self.index.insert_unique(h, s, |&x| {
            let slot = slots[x as usize].as_ref();
            slot.map_or(0, |sl| hasher.hash_one((sl.key.row().as_ref(), sl.start)))
        });
        self.open += 1;
        Ok((s, true))
    }

    /// Folds rows into their slots: `pairs` are (slot, row) in row order; `args` and
    /// `filters` are the batch's argument columns and `FILTER` masks per aggregate.
    pub fn update(
        &mut self,
        pairs: &[(u32, u32)],
        args: &[Vec<ArrayRef>],
        filters: &[Option<BooleanArray>],
    ) -> DfResult<()> {
        let mut sorted: Option<(Vec<(u32, u32)>, UInt32Array)> = None;
        for (a, agg) in self.aggs.iter_mut().enumerate() {
            match agg {
                Agg::Native(n) => n.update(&args[a][0], pairs)?,
                Agg::Fallback(accs) => {
                    let (sp, idx) = sorted.get_or_insert_with(|| {
                        let mut sp = pairs.to_vec();
                        sp.sort_by_key(|p| p.0);
                        let idx = UInt32Array::from_iter_values(sp.iter().map(|p| p.1));
                        (sp, idx)
                    });
                    let taken = args[a].iter().map(|c| take(c.as_ref(), idx, None)).collect::<Result<Vec<_>, _>>()?;
                    let mask = match &filters[a] {
                        Some(m) => Some(take(m, idx, None)?.as_boolean().clone()),
                        None => None,
                    };
                    let mut offset = 0;
                    while offset < sp.len() {
                        let s = sp[offset].0;
                        let len = sp[offset..].iter().take_while(|p| p.0 == s).count();
                        let slices: Vec<ArrayRef> = taken.iter().map(|c| c.slice(offset, len)).collect();
                        let slices = match &mask {
                            Some(m) => {
                                let m = m.slice(offset, len);
                                slices.iter().map(|c| filter_array(c, &m)).collect::<Result<Vec<_>, _>>()?
                            }
                            None => slices,
                        };
                        if let Some(Some(acc)) = accs.get_mut(s as usize) {
                            acc.update_batch(&slices)?;
                        }
                        offset += len;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether every aggregate is kept natively (then slots can be combined: panes).
    pub fn all_native(&self) -> bool {
        self.aggs.iter().all(|a| matches!(a, Agg::Native(_)))
    }

    /// The values of several slots taken together; `None` unless every aggregate is native.
    pub fn combined(&self, slots: &[u32]) -> Option<Vec<ScalarValue>> {
        self.aggs
            .iter()
            .map(|a| match a {
                Agg::Native(n) => Some(n.combined(slots)),
                Agg::Fallback(_) => None,
            })
            .collect()
    }

    /// Current values of a slot.
    pub fn values(&mut self, slot: u32) -> DfResult<Vec<ScalarValue>> {
        let idx = slot as usize;
        self.aggs
            .iter_mut()
            .map(|agg| match agg {
                Agg::Native(n) => Ok(n.value(idx)),
                Agg::Fallback(accs) => match accs.get_mut(idx) {
                    Some(Some(acc)) => acc.evaluate(),
                    _ => Ok(ScalarValue::Null),
                },
            })
            .collect()
    }

    /// Key, device and start of an open slot.
    pub fn meta(&self, slot: u32) -> Option<(OwnedRow, Arc<str>, i64)> {
        self.slots.get(slot as usize).and_then(|s| s.as_ref()).map(|s| (s.key.clone(), s.device.clone(), s.start))
    }

    /// Every open slot: key, device and start.
    pub fn open(&self) -> impl Iterator<Item = (&OwnedRow, &Arc<str>, i64)> {
        self.slots.iter().flatten().map(|s| (&s.key, &s.device, s.start))
    }

    /// Start of a slot's window.
    pub fn start(&self, slot: u32) -> Option<i64> {
        self.slots.get(slot as usize).and_then(|s| s.as_ref()).map(|s| s.start)
    }

    /// Writes an open slot's key, start and aggregate states to a checkpoint (the caller
    /// writes its device).
    pub(crate) fn save_slot(&mut self, slot: u32, e: &mut crate::codec::Enc) -> DfResult<()> {
        let idx = slot as usize;
        let Some(meta) = self.slots.get(idx).and_then(|s| s.as_ref()) else {
            return Err(datafusion::error::DataFusionError::Internal(format!("slot {slot} is not open")));
        };
        e.bytes(meta.key.row().as_ref());
        e.i64(meta.start);
        for (agg, plan) in self.aggs.iter_mut().zip(&self.plans) {
            match agg {
                Agg::Native(n) => {
                    e.i64(n.n[idx]);
                    e.f64(n.f[idx]);
                    e.i64(n.i[idx]);
                }
                Agg::Fallback(accs) => match accs.get_mut(idx) {
                    Some(Some(acc)) => {
                        e.u8(1);
                        crate::codec::save_accumulator(e, acc, || plan.function.create_accumulator())?;
                    }
                    _ => e.u8(0),
                },
            }
        }
        Ok(())
    }

    /// Opens the slot of (`key`, `start`) for `device` and reads its aggregate states from a
    /// checkpoint (after the key and start, which the caller read).
    pub(crate) fn restore_slot(
        &mut self,
        key: Row<'_>,
        start: i64,
        device: &Arc<str>,
        d: &mut crate::codec::Dec<'_>,
    ) -> DfResult<u32> {
        let (slot, _) = self.slot(key, start, device)?;
        let idx = slot as usize;
        for agg in &mut self.aggs {
            match agg {
                Agg::Native(n) => {
                    n.n[idx] = d.i64()?;
                    n.f[idx] = d.f64()?;
                    n.i[idx] = d.i64()?;
                }
                Agg::Fallback(accs) => {
                    if d.bool()? {
                        let Some(Some(acc)) = accs.get_mut(idx) else {
                            return Err(datafusion::error::DataFusionError::Internal(format!(
                                "slot {slot} has no accumulator"
                            )));
                        };
                        crate::codec::restore_accumulator(d, acc)?;
                    }
                }
            }
        }
        Ok(slot)
    }

    /// Closes a slot: returns its key, device, start and values, and frees it.
    pub fn close(&mut self, slot: u32) -> DfResult<Option<Closed>> {
        let values = self.values(slot)?;
        let Some(meta) = self.slots.get_mut(slot as usize).and_then(Option::take) else { return Ok(None) };
        let h = self.hasher.hash_one((meta.key.row().as_ref(), meta.start));
        if let Ok(entry) = self.index.find_entry(h, |&s| s == slot) {
            entry.remove();
        }
        for agg in &mut self.aggs {
            if let Agg::Fallback(accs) = agg
                && let Some(a) = accs.get_mut(slot as usize)
            {
                *a = None;
            }
        }
        self.free.push(slot);
        self.open -= 1;
        Ok(Some(Closed { key: meta.key, device: meta.device, start: meta.start, values }))
    }
}

//! The stream join: `from a = s1 join b = s2 on CONDITION within D` pairs each event of one
//! side with the events of the other side of the same device at most D apart in event time
//! for which the condition holds. Each side keeps, per device, the events still within reach
//! (newest event time minus D and the allowed delay); an arriving event is tested against the
//! other side's events only, then joins its own side. An event is not joined with itself.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, TimestampNanosecondArray};
use datafusion::common::ScalarValue;

use crate::plan::StreamJoinPlan;

type DfResult<T> = datafusion::error::Result<T>;

type Row = Arc<Vec<ScalarValue>>;

#[derive(Default)]
struct Sides {
    left: VecDeque<(i64, Row)>,
    right: VecDeque<(i64, Row)>,
    newest: i64,
}

/// A joined pair.
pub struct Pair {
    /// The device.
    pub device: Arc<str>,
    /// The later of the two events' times.
    pub time: i64,
    left: Row,
    right: Row,
}

/// State of one stream join on one shard.
pub struct JoinState {
    plan: StreamJoinPlan,
    devices: hashbrown::HashMap<Arc<str>, Sides, ahash::RandomState>,
    size: usize,
}

impl JoinState {
    /// Empty state.
    pub fn new(plan: StreamJoinPlan) -> Self {
        Self { plan, devices: hashbrown::HashMap::default(), size: 0 }
    }

    /// Buffered events.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Buffered events per device, for inspection: (device, side, time).
    pub fn buffered(&self) -> Vec<(Arc<str>, &'static str, i64)> {
        let mut out = Vec::new();
        for (d, s) in &self.devices {
            out.extend(s.left.iter().map(|(t, _)| (d.clone(), "left", *t)));
            out.extend(s.right.iter().map(|(t, _)| (d.clone(), "right", *t)));
        }
        out
    }

    /// Writes the buffered events to a checkpoint.
    pub(crate) fn save(&self, e: &mut crate::codec::Enc) -> DfResult<()> {
        e.len(self.devices.len());
        for (device, sides) in &self.devices {
            e.str(device);
            e.i64(sides.newest);
            for side in [&sides.left, &sides.right] {
                e.len(side.len());
                for (t, row) in side {
                    e.i64(*t);
                    e.scalars(row)?;
                }
            }
        }
        Ok(())
    }

    /// Reads the buffered events [`Self::save`] wrote into this fresh state.
    pub(crate) fn restore(
        &mut self,
        d: &mut crate::codec::Dec<'_>,
        names: &mut crate::codec::DeviceNames,
    ) -> DfResult<()> {
        for _ in 0..d.len()? {
            let device = names.get(&d.string()?);
            let mut sides = Sides { newest: d.i64()?, ..Sides::default() };
            for side in [&mut sides.left, &mut sides.right] {
                for _ in 0..d.len()? {
                    let t = d.i64()?;
                    side.push_back((t, Arc::new(d.scalars()?)));
                }
            }
            self.size += sides.left.len() + sides.right.len();
            self.devices.insert(device, sides);
        }
        Ok(())
    }

    /// Feeds a batch of `stream`; returns the pairs it completes.
    pub fn update(
        &mut self,
        stream: &str,
        batch: &RecordBatch,
        time: &TimestampNanosecondArray,
        devices: &[Arc<str>],
        delay: i64,
    ) -> DfResult<Vec<Pair>> {
        let is_left = stream == self.plan.left_stream;
        let is_right = stream == self.plan.right_stream;
        let n = batch.num_rows();
        let left_mask = match (&self.plan.left_filter, is_left) {
            (Some(f), true) => {
                let m = f.evaluate(batch)?.into_array(n)?;
                m.as_any().downcast_ref::<BooleanArray>().cloned()
            }
            _ => None,
        };
        let within = self.plan.within;
        let mut out = Vec::new();
        for (i, device) in devices.iter().enumerate().take(n) {
            if time.is_null(i) {
                continue;
            }
            let t = time.value(i);
            let sides = self.devices.entry(device.clone()).or_default();
            sides.newest = sides.newest.max(t);
            let horizon = sides.newest.saturating_sub(within).saturating_sub(delay);
            let before = sides.left.len() + sides.right.len();
            sides.left.retain(|(lt, _)| *lt >= horizon);
            sides.right.retain(|(rt, _)| *rt >= horizon);
            let left_ok = is_left && left_mask.as_ref().is_none_or(|m| m.is_valid(i) && m.value(i));
            if !left_ok && !is_right {
                // Filtered out of the only side this stream feeds: its time counts, its row is
                // not needed.
                self.size = (self.size + sides.left.len() + sides.right.len()).saturating_sub(before);
                continue;
            }
            let row: Row = Arc::new(
                batch.columns().iter().map(|c| ScalarValue::try_from_array(c, i)).collect::<DfResult<Vec<_>>>()?,
            );
            if is_right {
                for (lt, l) in &sides.left {
                    if (t - lt).abs() <= within && self.plan.holds(l, &row)? {
                        out.push(Pair {
                            device: devices[i].clone(),
                            time: t.max(*lt),
                            left: l.clone(),
                            right: row.clone(),
                        });
                    }
                }
            }
            if left_ok {
                for (rt, r) in &sides.right {
                    if (t - rt).abs() <= within && self.plan.holds(&row, r)? {
                        out.push(Pair {
                            device: devices[i].clone(),
                            time: t.max(*rt),
                            left: row.clone(),
                            right: r.clone(),
                        });
                    }
                }
                sides.left.push_back((t, row.clone()));
            }
            if is_right {
                sides.right.push_back((t, row));
            }
            let after = sides.left.len() + sides.right.len();
            self.size = (self.size + after).saturating_sub(before);
        }
        Ok(out)
    }

    /// The pairs as a batch of the match schema (left columns, then right columns).
    pub fn to_batch(&self, pairs: &[Pair]) -> DfResult<RecordBatch> {
        let schema = self.plan.match_schema.clone();
        let wl = self.plan.left_width;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for (k, field) in schema.fields().iter().enumerate() {
            let values: Vec<ScalarValue> =
                pairs.iter().map(|p| if k < wl { p.left[k].clone() } else { p.right[k - wl].clone() }).collect();
            columns.push(crate::scalar::column_of(values, field.data_type())?);
        }
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(pairs.len()));
        Ok(RecordBatch::try_new_with_options(schema, columns, &options)?)
    }
}

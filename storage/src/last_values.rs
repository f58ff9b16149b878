//! The last-value cache: the newest row (by `time`) of every device of a stream, kept in
//! columns beside the hot buffer, so that "the latest reading of every device" is a copy of
//! a few vectors instead of a scan of the hot buffer and the archive.
//!
//! It sees exactly the rows SQL sees: it is updated in the same critical section as the hot
//! buffer, a purge removes the device, and the query hides rows past a retention. It
//! survives restarts as an Arrow IPC snapshot per stream, written at each persist after the
//! WAL is cut (so it covers every row up to the cut) and before the catalog moves past the
//! cut; the WAL replay then adds what came later. A stream without a snapshot (an archive
//! written before the cache existed) is rebuilt from its files when storage opens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray,
    UInt64Array,
};
use arrow::buffer::{BooleanBuffer, NullBuffer};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use ferrite_engine::{DEVICE_COLUMN, TIME_COLUMN, time_field_type};

use ferrite_engine::StreamName;
use parking_lot::RwLock;

use crate::error::{Result, io};
use crate::{Storage, StreamData};

/// One field column of the cache: a value and a validity flag per device slot.
#[derive(Debug)]
enum Values {
    Float(Vec<f64>),
    Int(Vec<i64>),
    UInt(Vec<u64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Time(Vec<i64>),
}

#[derive(Debug)]
struct Column {
    name: Arc<str>,
    data_type: DataType,
    values: Values,
    valid: Vec<bool>,
}

impl Column {
    fn new(name: &str, data_type: &DataType, slots: usize) -> Option<Self> {
        let values = match data_type {
            DataType::Float64 => Values::Float(vec![0.0; slots]),
            DataType::Int64 => Values::Int(vec![0; slots]),
            DataType::UInt64 => Values::UInt(vec![0; slots]),
            DataType::Boolean => Values::Bool(vec![false; slots]),
            DataType::Utf8 => Values::Str(vec![String::new(); slots]),
            DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, _) => Values::Time(vec![0; slots]),
            _ => return None,
        };
        Some(Self { name: Arc::from(name), data_type: data_type.clone(), values, valid: vec![false; slots] })
    }

    fn grow(&mut self) {
        self.valid.push(false);
        match &mut self.values {
            Values::Float(v) => v.push(0.0),
            Values::Int(v) | Values::Time(v) => v.push(0),
            Values::UInt(v) => v.push(0),
            Values::Bool(v) => v.push(false),
            Values::Str(v) => v.push(String::new()),
        }
    }

    /// Turns an integer column into a float one (its field was widened).
    fn widen_to_float(&mut self) {
        let values = match &self.values {
            Values::Int(v) => v.iter().map(|&x| x as f64).collect(),
            Values::UInt(v) => v.iter().map(|&x| x as f64).collect(),
            _ => return,
        };
        self.values = Values::Float(values);
        self.data_type = DataType::Float64;
    }

    /// Sets `slot` from `row` of `array` (of this column's type), or to null.
    fn set(&mut self, slot: usize, array: Option<&dyn Array>, row: usize) {
        let Some(a) = array.filter(|a| a.is_valid(row)) else {
            self.valid[slot] = false;
            return;
        };
        let ok = match &mut self.values {
            Values::Float(v) => a.as_any().downcast_ref::<Float64Array>().map(|a| v[slot] = a.value(row)),
            Values::Int(v) => a.as_any().downcast_ref::<Int64Array>().map(|a| v[slot] = a.value(row)),
            Values::UInt(v) => a.as_any().downcast_ref::<UInt64Array>().map(|a| v[slot] = a.value(row)),
            Values::Bool(v) => a.as_any().downcast_ref::<BooleanArray>().map(|a| v[slot] = a.value(row)),
            Values::Time(v) => a.as_any().downcast_ref::<TimestampNanosecondArray>().map(|a| v[slot] = a.value(row)),
            Values::Str(v) => a.as_any().downcast_ref::<StringArray>().map(|a| {
                // Reuses the slot's buffer: no allocation once it is large enough.
                v[slot].clear();
                v[slot].push_str(a.value(row));
            }),
        };
        self.valid[slot] = ok.is_some();
    }

    /// The column as an Arrow array of slots `idx`, in that order.
    fn array(&self, idx: &[usize]) -> ArrayRef {
        let nulls = NullBuffer::new(BooleanBuffer::from_iter(idx.iter().map(|&i| self.valid[i])));
        let nulls = (nulls.null_count() > 0).then_some(nulls);
        match &self.values {
            Values::Float(v) => Arc::new(Float64Array::new(idx.iter().map(|&i| v[i]).collect(), nulls)),
            Values::Int(v) => Arc::new(Int64Array::new(idx.iter().map(|&i| v[i]).collect(), nulls)),
            Values::UInt(v) => Arc::new(UInt64Array::new(idx.iter().map(|&i| v[i]).collect(), nulls)),
            Values::Bool(v) => Arc::new(BooleanArray::new(BooleanBuffer::from_iter(idx.iter().map(|&i| v[i])), nulls)),
            Values::Time(v) => Arc::new(
                TimestampNanosecondArray::new(idx.iter().map(|&i| v[i]).collect(), nulls)
                    .with_data_type(self.data_type.clone()),
            ),
            Values::Str(v) => {
                Arc::new(StringArray::from_iter(idx.iter().map(|&i| self.valid[i].then_some(v[i].as_str()))))
            }
        }
    }
}

/// The newest row of each device of one stream.
#[derive(Debug, Default)]
pub(crate) struct LastValues {
    slot_of: HashMap<Box<str>, u32>,
    devices: Vec<Box<str>>,
    times: Vec<i64>,
    columns: Vec<Column>,
    /// Bumped by every change.
    version: u64,
    /// The version the last snapshot on disk holds.
    stored: u64,
    /// Scratch of one update: the row each improved slot takes, by slot.
    pending: Vec<u32>,
    touched: Vec<u32>,
}

const NONE: u32 = u32::MAX;

impl LastValues {
    fn slot(&mut self, device: &str) -> usize {
        if let Some(&s) = self.slot_of.get(device) {
            return s as usize;
        }
        let s = self.devices.len();
        self.slot_of.insert(Box::from(device), s as u32);
        self.devices.push(Box::from(device));
        self.times.push(i64::MIN);
        self.pending.push(NONE);
        for c in &mut self.columns {
            c.grow();
        }
        s
    }

    /// Takes in the rows of `batch` (first columns `time` and `device_id`): a device's slot
    /// takes the row with the newest time (the later row among equal times).
    pub(crate) fn update(&mut self, batch: &RecordBatch) {
        let (Some(time), Some(ids)) = (
            batch.column(0).as_any().downcast_ref::<TimestampNanosecondArray>(),
            batch.column(1).as_any().downcast_ref::<StringArray>(),
        ) else {
            return;
        };
        // Pass 1: the winning row of each slot.
        self.touched.clear();
        let times = time.values();
        for row in 0..batch.num_rows() {
            if ids.is_null(row) {
                continue;
            }
            let slot = self.slot(ids.value(row));
            if times[row] >= self.times[slot] {
                self.times[slot] = times[row];
                if self.pending[slot] == NONE {
                    self.touched.push(slot as u32);
                }
                self.pending[slot] = row as u32;
            }
        }
        if self.touched.is_empty() {
            return;
        }
        // Pass 2: copy the winning rows, column by column; a column the batch lacks is null.
        let schema = batch.schema();
        for f in schema.fields().iter().skip(2) {
            match self.columns.iter_mut().find(|c| c.name.as_ref() == f.name().as_str()) {
                None => {
                    if let Some(c) = Column::new(f.name(), f.data_type(), self.devices.len()) {
                        self.columns.push(c);
                    }
                }
                // A field widened from integer to float: the column follows.
                Some(c) if f.data_type() == &DataType::Float64 => c.widen_to_float(),
                Some(_) => {}
            }
        }
        for c in &mut self.columns {
            let array = schema.index_of(&c.name).ok().map(|i| batch.column(i)).and_then(|a| {
                if a.data_type() == &c.data_type {
                    Some(a.clone())
                } else {
                    // An integer batch written before its field was widened.
                    arrow::compute::cast(a, &c.data_type).ok()
                }
            });
            for &slot in &self.touched {
                c.set(slot as usize, array.as_deref(), self.pending[slot as usize] as usize);
            }
        }
        for &slot in &self.touched {
            self.pending[slot as usize] = NONE;
        }
        self.version += 1;
    }

    /// Forgets `device`; true when it was held.
    pub(crate) fn remove(&mut self, device: &str) -> bool {
        let Some(slot) = self.slot_of.remove(device) else { return false };
        let slot = slot as usize;
        let last = self.devices.len() - 1;
        self.devices.swap_remove(slot);
        self.times.swap_remove(slot);
        self.pending.swap_remove(slot);
        for c in &mut self.columns {
            c.valid.swap_remove(slot);
            match &mut c.values {
                Values::Float(v) => {
                    v.swap_remove(slot);
                }
                Values::Int(v) | Values::Time(v) => {
                    v.swap_remove(slot);
                }
                Values::UInt(v) => {
                    v.swap_remove(slot);
                }
                Values::Bool(v) => {
                    v.swap_remove(slot);
                }
                Values::Str(v) => {
                    v.swap_remove(slot);
                }
            }
        }
        if slot != last
            && let Some(moved) = self.slot_of.get_mut(self.devices[slot].as_ref())
        {
            *moved = slot as u32;
        }
        self.version += 1;
        true
    }

    /// Whether the snapshot on disk is behind.
    pub(crate) fn dirty(&self) -> bool {
        self.version != self.stored
    }

    /// The snapshot on disk now holds `version` (from [`LastValues::snapshot`]).
    pub(crate) fn mark_stored(&mut self, version: u64) {
        self.stored = self.stored.max(version);
    }

    /// The rows as a batch of `schema` (`time`, `device_id`, then fields; a field the cache
    /// has not seen is null), without devices whose row is older than `horizon`.
    pub(crate) fn to_batch(&self, schema: &SchemaRef, horizon: Option<i64>) -> Result<RecordBatch> {
        // The slots to show, once for every column.
        let idx: Vec<usize> = match horizon {
            Some(h) => (0..self.devices.len()).filter(|&i| self.times[i] >= h).collect(),
            None => (0..self.devices.len()).collect(),
        };
        let n = idx.len();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let array: ArrayRef = match f.name().as_str() {
                TIME_COLUMN => Arc::new(
                    TimestampNanosecondArray::from_iter_values(idx.iter().map(|&i| self.times[i]))
                        .with_data_type(f.data_type().clone()),
                ),
                DEVICE_COLUMN => Arc::new(StringArray::from_iter_values(idx.iter().map(|&i| self.devices[i].as_ref()))),
                name => match self.columns.iter().find(|c| c.name.as_ref() == name) {
                    Some(c) if &c.data_type == f.data_type() => c.array(&idx),
                    Some(c) => arrow::compute::cast(&c.array(&idx), f.data_type())
                        .unwrap_or_else(|_| arrow::array::new_null_array(f.data_type(), n)),
                    None => arrow::array::new_null_array(f.data_type(), n),
                },
            };
            columns.push(array);
        }
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }

    /// The whole cache as a batch of its own schema, and the version it holds; written with
    /// [`write_snapshot`] outside the stream's lock.
    pub(crate) fn snapshot(&self) -> Result<(RecordBatch, u64)> {
        Ok((self.snapshot_batch()?, self.version))
    }

    fn snapshot_batch(&self) -> Result<RecordBatch> {
        let mut fields =
            vec![Field::new(TIME_COLUMN, time_field_type(), false), Field::new(DEVICE_COLUMN, DataType::Utf8, false)];
        fields.extend(self.columns.iter().map(|c| Field::new(c.name.as_ref(), c.data_type.clone(), true)));
        self.to_batch(&Arc::new(Schema::new(fields)), None)
    }

    /// Writes the snapshot to `path` now.
    #[cfg(test)]
    pub(crate) fn store(&mut self, path: &Path) -> Result<()> {
        let (batch, version) = self.snapshot()?;
        write_snapshot(path, &batch)?;
        self.mark_stored(version);
        Ok(())
    }

    /// Reads a snapshot written by [`LastValues::store`].
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(io("read last values", path))?;
        let reader = arrow::ipc::reader::FileReader::try_new(file, None)?;
        let mut lv = Self::default();
        for batch in reader {
            lv.update(&batch?);
        }
        lv.stored = lv.version;
        Ok(lv)
    }
}

/// Writes a snapshot batch to `path` atomically (Arrow IPC file).
pub(crate) fn write_snapshot(path: &Path, batch: &RecordBatch) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut w = arrow::ipc::writer::FileWriter::try_new(&mut bytes, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
    }
    ferrite_engine::catalog::write_atomic(path, &bytes).map_err(io("write last values", path))
}

/// Where the snapshot of stream `key` (`name` or `tenant/name`) lives.
pub(crate) fn snapshot_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{}.arrow", key.replace('/', "~")))
}

/// The stream key of a snapshot file name.
pub(crate) fn key_of(file_name: &str) -> Option<String> {
    file_name.strip_suffix(".arrow").map(|k| k.replace('~', "/"))
}

impl Storage {
    /// Writes the last-values snapshot of `name` when it changed since the last one. The
    /// copy is taken under the stream's read lock; the file is written outside it.
    pub(crate) fn store_last_values(&self, name: &StreamName, data: &RwLock<StreamData>) -> Result<()> {
        let (batch, version) = {
            let d = data.read();
            if !d.last.dirty() {
                return Ok(());
            }
            d.last.snapshot()?
        };
        write_snapshot(&snapshot_path(&self.last_values_dir, name.as_str()), &batch)?;
        data.write().last.mark_stored(version);
        Ok(())
    }

    /// Builds the last values of the streams that have archive files but no snapshot (an
    /// archive from before the cache, or a snapshot that did not read) from those files.
    pub(crate) fn rebuild_last_values(&self, cached: &std::collections::HashSet<StreamName>) -> Result<()> {
        let streams: Vec<(StreamName, Arc<RwLock<StreamData>>)> =
            self.streams.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (name, data) in streams {
            let files = data.read().files.clone();
            if cached.contains(&name) || files.is_empty() {
                continue;
            }
            tracing::info!(stream = %name, files = files.len(), "building the stream's last values from its archive");
            for f in &files {
                for batch in self.read_archived(&f.path)? {
                    data.write().last.update(&batch);
                }
            }
            self.store_last_values(&name, &data)?;
        }
        Ok(())
    }

    /// The newest row of each device of `stream`, in the stream's current schema, as SQL
    /// sees them (rows past a retention's horizon excepted); `None` for an unknown stream.
    pub fn last_values(&self, stream: &StreamName) -> Result<Option<RecordBatch>> {
        let Some(schema) = self.catalog.get(stream).map(|s| s.arrow.clone()) else { return Ok(None) };
        let horizon = self.horizon_of(stream);
        let Some(data) = self.streams.read().get(stream).cloned() else {
            return Ok(Some(RecordBatch::new_empty(schema)));
        };
        let d = data.read();
        Ok(Some(d.last.to_batch(&schema, horizon)?))
    }

    /// Forgets `device` in the last values of `tenant`'s streams but `audit` (a purge), and
    /// writes the changed snapshots at once so that a restart does not bring it back.
    pub(crate) fn forget_last_values(&self, tenant: &str, device: &str) -> Result<()> {
        let streams: Vec<(StreamName, Arc<RwLock<StreamData>>)> = self
            .streams
            .read()
            .iter()
            .filter(|(k, _)| k.tenant() == tenant && k.local() != ferrite_engine::auth::AUDIT_STREAM)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, data) in streams {
            if data.write().last.remove(device) {
                self.store_last_values(&name, &data)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(rows: &[(i64, &str, Option<f64>)], with_s: Option<&[&str]>) -> RecordBatch {
        let mut fields =
            vec![Field::new("time", time_field_type(), false), Field::new("device_id", DataType::Utf8, false)];
        fields.push(Field::new("v", DataType::Float64, true));
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(TimestampNanosecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()).with_timezone("UTC")),
            Arc::new(StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
        ];
        if let Some(s) = with_s {
            fields.push(Field::new("s", DataType::Utf8, true));
            cols.push(Arc::new(StringArray::from(s.to_vec())));
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).expect("batch")
    }

    fn rows(lv: &LastValues) -> Vec<String> {
        let b = lv.snapshot_batch().expect("snapshot");
        let mut out: Vec<String> = (0..b.num_rows())
            .map(|i| {
                let t = b.column(0).as_any().downcast_ref::<TimestampNanosecondArray>().map(|t| t.value(i));
                let rest = (1..b.num_columns())
                    .map(|c| arrow::util::display::array_value_to_string(b.column(c), i).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(",");
                format!("{},{rest}", t.unwrap_or(-1))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn keeps_the_newest_row_of_each_device_whole() {
        let mut lv = LastValues::default();
        lv.update(&batch(&[(5, "a", Some(1.0)), (3, "a", Some(2.0)), (4, "b", None)], None));
        lv.update(&batch(&[(4, "a", Some(9.0)), (6, "b", Some(3.0))], Some(&["x", "y"])));
        // a keeps time 5 (the later batch's 4 is older); b takes the row with s = "y".
        assert_eq!(rows(&lv), vec!["5,a,1.0,", "6,b,3.0,y"]);
        // A newer row without `s` nulls it: the cache holds rows, not values per column.
        lv.update(&batch(&[(7, "b", Some(4.0))], None));
        assert_eq!(rows(&lv)[1], "7,b,4.0,");
        // Equal times: the later row wins.
        lv.update(&batch(&[(7, "b", Some(5.0))], None));
        assert_eq!(rows(&lv)[1], "7,b,5.0,");
    }

    #[test]
    fn remove_keeps_the_other_slots_right_and_snapshots_round_trip() -> anyhow::Result<()> {
        let mut lv = LastValues::default();
        lv.update(&batch(&[(1, "a", Some(1.0)), (2, "b", Some(2.0)), (3, "c", Some(3.0))], Some(&["p", "q", "r"])));
        assert!(lv.remove("a"));
        assert!(!lv.remove("a"));
        lv.update(&batch(&[(9, "c", Some(30.0))], Some(&["z"])));
        assert_eq!(rows(&lv), vec!["2,b,2.0,q", "9,c,30.0,z"]);
        let dir = tempfile::tempdir()?;
        let path = snapshot_path(dir.path(), "acme/t");
        assert_eq!(key_of(path.file_name().and_then(|n| n.to_str()).unwrap_or_default()).as_deref(), Some("acme/t"));
        lv.store(&path)?;
        let back = LastValues::load(&path)?;
        assert_eq!(rows(&back), rows(&lv));
        Ok(())
    }

    #[test]
    fn the_batch_follows_the_streams_schema_and_hides_rows_past_a_horizon() -> anyhow::Result<()> {
        let mut lv = LastValues::default();
        lv.update(&batch(&[(1, "a", Some(1.0)), (5, "b", Some(2.0))], None));
        let schema = Arc::new(Schema::new(vec![
            Field::new("time", time_field_type(), false),
            Field::new("device_id", DataType::Utf8, false),
            Field::new("v", DataType::Float64, true),
            Field::new("later", DataType::Int64, true),
        ]));
        let b = lv.to_batch(&schema, Some(2))?;
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.column(3).null_count(), 1);
        assert_eq!(b.column(1).as_any().downcast_ref::<StringArray>().map(|a| a.value(0)), Some("b"));
        Ok(())
    }
}

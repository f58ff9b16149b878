//! Checkpoints of the observers' state (rules) at a consistent cut of every shard, and the
//! recovery that continues from one after a crash.
//!
//! A cut is taken on the shard threads, between groups, with every shard paused: each
//! shard closes its WAL segment (the cut is its last sequence number) and its observers
//! encode their state; shard 0 also encodes the state shared by all shards. Storage writes
//! the checkpoint before it commits the persist whose WAL cut it is, so a checkpoint's cut
//! is never older than what the archive holds.
//!
//! After a crash, recovery restores that state and runs the observers again over the input
//! entries the WAL holds after the cut, in their order. Rule outputs are deterministic given
//! state and input, so the outputs committed before the crash are found again among the
//! recomputed ones; only the rest (those the crash lost) are committed.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::row::{RowConverter, SortField};

use crate::batch::{StreamBatch, align_to_schema, widest_schema};
use crate::error::Result;
use crate::ids::StreamName;

/// A consistent cut of every shard and the observers' state at that point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Per shard: the sequence number of its last WAL entry at the cut.
    pub cuts: Vec<u64>,
    /// Per observer (by [`crate::BatchObserver::checkpoint_name`]): its state.
    pub states: BTreeMap<String, ObserverState>,
}

/// One observer's state in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObserverState {
    /// State shared by all shards.
    pub shared: Vec<u8>,
    /// Per shard: its own state.
    pub shards: Vec<Vec<u8>>,
}

/// A WAL entry after a checkpoint's cut, as recovery needs it.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// Whether an observer derived it (a rule output) rather than a client sent it.
    pub derived: bool,
    /// The rows.
    pub batch: StreamBatch,
}

/// What storage found for recovery at start: the last checkpoint and, per shard, the WAL
/// entries after its cut in order.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// Per shard of the checkpoint: entries after its cut.
    pub entries: Vec<Vec<Replayed>>,
}

/// What recovery did, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Input rows the observers saw again.
    pub input_rows: usize,
    /// Derived rows recomputed that the WAL already held (committed before the crash).
    pub found_rows: usize,
    /// Derived rows recomputed that the crash had lost, committed now.
    pub committed_rows: usize,
}

/// The rows committed before the crash, per stream, counted by their encoded value: the
/// recomputed outputs are checked off against them.
pub(crate) struct Committed {
    by_stream: HashMap<StreamName, Vec<RecordBatch>>,
    counts: HashMap<StreamName, Counted>,
}

/// One stream's committed rows: the encoding (over the widest schema) and each row's count.
type Counted = (RowConverter, arrow::datatypes::SchemaRef, HashMap<Vec<u8>, usize>);

impl Committed {
    pub(crate) fn new(derived: impl IntoIterator<Item = StreamBatch>) -> Self {
        let mut by_stream: HashMap<StreamName, Vec<RecordBatch>> = HashMap::new();
        for sb in derived {
            by_stream.entry(sb.stream).or_default().push(sb.batch);
        }
        Self { by_stream, counts: HashMap::new() }
    }

    /// Removes from `recomputed` the rows already committed (each committed row matches one
    /// recomputed row at most); returns what is left and how many rows were found.
    pub(crate) fn subtract(&mut self, recomputed: Vec<StreamBatch>) -> Result<(Vec<StreamBatch>, usize)> {
        let mut out = Vec::with_capacity(recomputed.len());
        let mut found = 0;
        for sb in recomputed {
            let Some(committed) = self.by_stream.get(&sb.stream) else {
                out.push(sb);
                continue;
            };
            let (converter, schema, counts) = match self.counts.entry(sb.stream.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(count(committed, &sb.batch)?),
            };
            let aligned = match align_to_schema(&sb.batch, schema) {
                Ok(a) => a,
                // Wider than what the stream held before the crash: none of it was committed.
                Err(_) => {
                    out.push(sb);
                    continue;
                }
            };
            let rows = converter.convert_columns(aligned.columns())?;
            let keep: BooleanArray = rows
                .iter()
                .map(|r| match counts.get_mut(r.as_ref()) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        found += 1;
                        Some(false)
                    }
                    _ => Some(true),
                })
                .collect();
            let left = filter_record_batch(&sb.batch, &keep)?;
            if left.num_rows() > 0 {
                out.push(StreamBatch::new(sb.stream, left));
            }
        }
        Ok((out, found))
    }
}

/// Counts `committed` rows by their encoding over the widest schema of them and `next`.
fn count(committed: &[RecordBatch], next: &RecordBatch) -> Result<Counted> {
    let mut schemas: Vec<_> = committed.iter().map(RecordBatch::schema).collect();
    schemas.push(next.schema());
    let schema = widest_schema(&schemas).unwrap_or_else(|| next.schema());
    let converter = RowConverter::new(schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())?;
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for b in committed {
        let rows = converter.convert_columns(align_to_schema(b, &schema)?.columns())?;
        for r in rows.iter() {
            *counts.entry(r.as_ref().to_vec()).or_default() += 1;
        }
    }
    Ok((converter, schema, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::time_field_type;
    use arrow::array::{Float64Array, StringArray, TimestampNanosecondArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn rows(stream: &str, values: &[(i64, &str, f64)]) -> StreamBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("time", time_field_type(), false),
            Field::new("device_id", DataType::Utf8, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampNanosecondArray::from_iter_values(values.iter().map(|v| v.0)).with_timezone("UTC")),
                Arc::new(StringArray::from_iter_values(values.iter().map(|v| v.1))),
                Arc::new(Float64Array::from_iter_values(values.iter().map(|v| v.2))),
            ],
        )
        .expect("batch");
        StreamBatch::new(StreamName::new(stream).expect("name"), batch)
    }

    #[test]
    fn recomputed_rows_already_committed_are_found_once_each() -> Result<()> {
        let mut c = Committed::new([rows("avg", &[(1, "a", 1.0), (2, "a", 2.0), (2, "a", 2.0)])]);
        let (left, found) = c.subtract(vec![
            rows("avg", &[(1, "a", 1.0), (2, "a", 2.0), (2, "a", 2.0), (2, "a", 2.0), (3, "b", 3.0)]),
            rows("other", &[(1, "a", 1.0)]),
        ])?;
        assert_eq!(found, 3);
        let left_rows: usize = left.iter().map(StreamBatch::num_rows).sum();
        assert_eq!(left_rows, 3, "one extra duplicate, one new row, the other stream's row");
        assert_eq!(left[0].stream.as_str(), "avg");
        assert_eq!(left[0].num_rows(), 2);
        Ok(())
    }
}

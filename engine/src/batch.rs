//! The unit of data on the bus: an Arrow `RecordBatch` that belongs to one stream.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};

use crate::error::Result;
use crate::ids::StreamName;

/// Name of the event-time column present in every stream.
pub const TIME_COLUMN: &str = "time";
/// Name of the device id column present in every stream.
pub const DEVICE_COLUMN: &str = "device_id";

/// Arrow type of the `time` column: UTC timestamps in nanoseconds.
pub fn time_field_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some(Arc::from("UTC")))
}

/// Rows of one stream, as an Arrow batch whose first two columns are `time` and `device_id`.
#[derive(Debug, Clone)]
pub struct StreamBatch {
    /// The stream these rows belong to.
    pub stream: StreamName,
    /// The rows.
    pub batch: RecordBatch,
}

impl StreamBatch {
    /// Pairs a stream with its rows.
    pub fn new(stream: StreamName, batch: RecordBatch) -> Self {
        Self { stream, batch }
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }
}

/// Returns `batch` with exactly the columns of `schema`, in its order, matched by name:
/// columns the batch lacks (added to the stream after the batch was written) become null
/// columns, columns `schema` lacks are dropped, and a column of another type is cast
/// (rules read streams with the types they were planned with).
pub fn align_to_schema(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let n = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast(c, f.data_type()),
            None => Ok(new_null_array(f.data_type(), n)),
        })
        .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
    Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &options)?)
}

/// The schema that holds every batch of `schemas` (versions of one stream's schema): every
/// column of any of them, in order of first appearance, an integer column that is float in
/// another as float (a widened field).
pub fn widest_schema<'a>(schemas: impl IntoIterator<Item = &'a SchemaRef>) -> Option<SchemaRef> {
    let schemas: Vec<&SchemaRef> = schemas.into_iter().collect();
    let first = *schemas.first()?;
    if schemas.iter().all(|s| Arc::ptr_eq(s, first) || s.fields() == first.fields()) {
        return Some(first.clone());
    }
    let mut fields: Vec<arrow::datatypes::FieldRef> = Vec::new();
    for s in &schemas {
        for f in s.fields() {
            match fields.iter_mut().find(|x| x.name() == f.name()) {
                None => fields.push(f.clone()),
                Some(x) => {
                    if matches!(x.data_type(), DataType::Int64 | DataType::UInt64)
                        && f.data_type() == &DataType::Float64
                    {
                        *x = f.clone();
                    }
                }
            }
        }
    }
    Some(Arc::new(arrow::datatypes::Schema::new(fields)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Float64Array, StringArray, TimestampNanosecondArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn the_widest_schema_holds_every_column_and_widens_integers() {
        let f = |n: &str, t: DataType| Field::new(n, t, true);
        let a: SchemaRef = Arc::new(Schema::new(vec![f("x", DataType::Int64), f("y", DataType::Utf8)]));
        let b: SchemaRef =
            Arc::new(Schema::new(vec![f("x", DataType::Float64), f("y", DataType::Utf8), f("z", DataType::Boolean)]));
        let w = widest_schema([&a, &b, &a])
            .map(|s| s.fields().iter().map(|f| format!("{}:{}", f.name(), f.data_type())).collect::<Vec<_>>());
        assert_eq!(w, Some(vec!["x:Float64".to_owned(), "y:Utf8".to_owned(), "z:Boolean".to_owned()]));
        assert!(widest_schema([&a, &a.clone()]).is_some_and(|s| Arc::ptr_eq(&s, &a)), "one schema: no new one");
        assert!(widest_schema(std::iter::empty::<&SchemaRef>()).is_none());
    }

    #[test]
    fn align_adds_null_columns() -> Result<()> {
        let small = Arc::new(Schema::new(vec![
            Field::new(TIME_COLUMN, time_field_type(), false),
            Field::new(DEVICE_COLUMN, DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            small,
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![1]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["d"])),
            ],
        )?;
        let big = Arc::new(Schema::new(vec![
            Field::new(TIME_COLUMN, time_field_type(), false),
            Field::new(DEVICE_COLUMN, DataType::Utf8, false),
            Field::new("t", DataType::Float64, true),
        ]));
        let out = align_to_schema(&batch, &big)?;
        assert_eq!(out.num_columns(), 3);
        let t = out.column(2).as_any().downcast_ref::<Float64Array>().map(|a| a.null_count());
        assert_eq!(t, Some(1));
        Ok(())
    }
}

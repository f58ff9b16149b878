//! Column helpers of rule execution: filters, projections, the time column (a leaf the
//! other runtime modules share).

use super::state::eval;
use super::*;

/// A filter mask without nulls (null counts as false).
pub(super) fn prep(b: &BooleanArray) -> BooleanArray {
    if b.null_count() == 0 {
        BooleanArray::new(b.values().clone(), None)
    } else {
        arrow::compute::prep_null_mask_filter(b)
    }
}

pub(super) fn apply(rule: &LiveRule, op: &PostOp, batch: &RecordBatch) -> Result<RecordBatch> {
    let n = batch.num_rows();
    match op {
        PostOp::Filter(f) => {
            let m = f.evaluate(batch).map_err(|e| eval(rule, e))?.into_array(n).map_err(|e| eval(rule, e))?;
            Ok(filter_record_batch(batch, &prep(m.as_boolean()))?)
        }
        PostOp::Project(exprs, schema) => {
            let columns = exprs
                .iter()
                .zip(schema.fields())
                .map(|(e, f)| {
                    let a = e.evaluate(batch)?.into_array(n)?;
                    if a.data_type() != f.data_type() { Ok(cast(&a, f.data_type())?) } else { Ok(a) }
                })
                .collect::<datafusion::error::Result<Vec<_>>>()
                .map_err(|e| eval(rule, e))?;
            let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
            Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &options)?)
        }
    }
}

pub(super) fn time_column(batch: &RecordBatch) -> Result<TimestampNanosecondArray> {
    let col = batch.column_by_name(TIME_COLUMN).ok_or_else(|| Error::Input("batch without a time column".into()))?;
    let col = cast(col, &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())))?;
    Ok(col.as_primitive::<arrow::datatypes::TimestampNanosecondType>().clone())
}

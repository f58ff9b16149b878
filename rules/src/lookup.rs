//! Lookup tables for `join T on T.key = column`: a static table from a CSV or Parquet file
//! declared in the rule file, or a stream read as a table (the latest row per key, like a
//! changelog), which is how per-device parameters (`rule_params`) reach a rule. A batch is
//! enriched with the table's columns, named `T.column`, in one vectorised `interleave` per
//! column after one hash lookup per row; rows without a match get nulls.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, new_null_array};
use arrow::compute::{cast, interleave};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{Error, Result};

/// Latest rows by key.
#[derive(Debug)]
pub struct LookupTable {
    schema: SchemaRef,
    key: String,
    chunks: Vec<RecordBatch>,
    index: HashMap<String, (usize, usize)>,
}

/// Chunks kept before the table is compacted to its live rows.
const MAX_CHUNKS: usize = 64;

impl LookupTable {
    /// An empty table of `schema`, keyed by its column `key`.
    pub fn new(schema: SchemaRef, key: &str) -> Self {
        Self { schema, key: key.to_owned(), chunks: Vec::new(), index: HashMap::new() }
    }

    /// Rows in the table (distinct keys).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Applies rows (later rows of a key replace earlier ones); rows without a key are
    /// ignored. Columns are matched by name; missing ones are null.
    pub fn apply(&mut self, batch: &RecordBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let chunk = ferrite_engine::align_to_schema(batch, &self.schema)?;
        let keys = key_strings(
            chunk
                .column_by_name(&self.key)
                .ok_or_else(|| Error::Input(format!("lookup key `{}` missing", self.key)))?,
        )?;
        let c = self.chunks.len();
        for (row, k) in keys.into_iter().enumerate() {
            if let Some(k) = k {
                self.index.insert(k, (c, row));
            }
        }
        self.chunks.push(chunk);
        if self.chunks.len() > MAX_CHUNKS {
            self.compact()?;
        }
        Ok(())
    }

    fn compact(&mut self) -> Result<()> {
        let mut entries: Vec<(String, (usize, usize))> = self.index.drain().collect();
        entries.sort_by_key(|(_, at)| *at);
        let picks: Vec<(usize, usize)> = entries.iter().map(|(_, at)| *at).collect();
        let columns = (0..self.schema.fields().len())
            .map(|i| {
                let arrays: Vec<&dyn Array> = self.chunks.iter().map(|c| c.column(i).as_ref()).collect();
                interleave(&arrays, &picks)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(picks.len()));
        let chunk = RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)?;
        self.index = entries.into_iter().enumerate().map(|(row, (k, _))| (k, (0, row))).collect();
        self.chunks = vec![chunk];
        Ok(())
    }

    /// The live rows (the latest of each key), for a checkpoint; [`Self::apply`] of them to an
    /// empty table of the same schema rebuilds this one.
    pub fn live_rows(&mut self) -> Result<RecordBatch> {
        if self.chunks.len() != 1 || self.chunks[0].num_rows() != self.index.len() {
            self.compact()?;
        }
        Ok(self.chunks.first().cloned().unwrap_or_else(|| RecordBatch::new_empty(self.schema.clone())))
    }

    /// An empty table with this one's schema and key.
    pub fn emptied(&self) -> Self {
        Self::new(self.schema.clone(), &self.key)
    }

    /// The table's columns for each value of `keys` (null where no row matches), named
    /// `{prefix}.{column}`.
    pub fn enrich(&self, keys: &ArrayRef, prefix: &str) -> Result<Vec<(Field, ArrayRef)>> {
        let keys = key_strings(keys)?;
        // One extra chunk holds a row of nulls for the misses.
        let miss = self.chunks.len();
        let picks: Vec<(usize, usize)> =
            keys.iter().map(|k| k.as_ref().and_then(|k| self.index.get(k).copied()).unwrap_or((miss, 0))).collect();
        self.schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let nulls = new_null_array(f.data_type(), 1);
                let mut arrays: Vec<&dyn Array> = self.chunks.iter().map(|c| c.column(i).as_ref()).collect();
                arrays.push(nulls.as_ref());
                let col = interleave(&arrays, &picks)?;
                Ok((Field::new(format!("{prefix}.{}", f.name()), f.data_type().clone(), true), col))
            })
            .collect()
    }
}

/// Keys as strings (numbers and strings compare by their text, so `1` matches `'1'`).
fn key_strings(col: &ArrayRef) -> Result<Vec<Option<String>>> {
    let col = if col.data_type() == &DataType::Utf8 { col.clone() } else { cast(col, &DataType::Utf8)? };
    let s = col.as_string::<i32>();
    Ok((0..s.len()).map(|i| s.is_valid(i).then(|| s.value(i).to_owned())).collect())
}

/// Reads a static table from a CSV (with a header row) or Parquet file.
pub fn read_file(path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), source: e };
    let is_parquet = path.extension().is_some_and(|x| x == "parquet");
    if is_parquet {
        let file = std::fs::File::open(path).map_err(io)?;
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        let schema = builder.schema().clone();
        let reader = builder.build().map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        return Ok((schema, batches));
    }
    let mut file = std::fs::File::open(path).map_err(io)?;
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (schema, _) = format.infer_schema(&mut file, Some(10_000))?;
    let schema = Arc::new(schema);
    let file = std::fs::File::open(path).map_err(io)?;
    let reader = arrow::csv::ReaderBuilder::new(schema.clone()).with_header(true).build(file)?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// The schema of an enriched batch: the stream's columns, then the table's as `T.column`.
pub fn enriched_schema(stream: &Schema, table: &str, table_schema: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = stream.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(
        table_schema.fields().iter().map(|f| Field::new(format!("{table}.{}", f.name()), f.data_type().clone(), true)),
    );
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};

    #[test]
    fn latest_row_per_key_wins_and_misses_are_null() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("limit", DataType::Float64, true),
        ]));
        let mut t = LookupTable::new(schema.clone(), "device_id");
        let b = |d: Vec<&str>, l: Vec<f64>| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(d)), Arc::new(Float64Array::from(l))])
        };
        t.apply(&b(vec!["a", "b"], vec![1.0, 2.0])?)?;
        t.apply(&b(vec!["a"], vec![3.0])?)?;
        for _ in 0..70 {
            t.apply(&b(vec!["c"], vec![9.0])?)?;
        }
        assert_eq!(t.len(), 3);
        let keys: ArrayRef = Arc::new(StringArray::from(vec!["a", "x", "b"]));
        let cols = t.enrich(&keys, "p")?;
        assert_eq!(cols[1].0.name(), "p.limit");
        let limits = cols[1].1.as_any().downcast_ref::<Float64Array>().map(|a| a.iter().collect::<Vec<_>>());
        assert_eq!(limits, Some(vec![Some(3.0), None, Some(2.0)]));
        Ok(())
    }
}

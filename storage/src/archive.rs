//! Parquet encoding of the archive: one file per stream and event-time hour per persist,
//! rows sorted by `device_id` then `time`, zstd, page-level statistics and page index, a
//! bloom filter on `device_id`, row groups of up to one million rows.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::compute::{SortColumn, lexsort_to_indices, take_record_batch};
use arrow::datatypes::DataType;
use chrono::{DateTime, Datelike, Timelike, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Rows per Parquet row group (large, for scans).
pub const ROW_GROUP_ROWS: usize = 1024 * 1024;

/// A Parquet file of the archive, as the file catalog records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchivedFile {
    /// Path relative to the archive root (`{tenant}/{stream}/date=…/hour=…/….parquet`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Rows in the file.
    pub rows: u64,
    /// Smallest `time` (ns).
    pub min_time: i64,
    /// Largest `time` (ns).
    pub max_time: i64,
    /// Smallest `device_id`.
    pub min_device: String,
    /// Largest `device_id`.
    pub max_device: String,
}

/// Rows of one event-time hour, sorted and ready to encode.
pub struct HourChunk {
    /// Start of the hour, ns since the epoch.
    pub hour_start: i64,
    /// The rows, sorted by `device_id` then `time`.
    pub batch: RecordBatch,
}

/// Nanoseconds in an hour: the archive's partition size.
pub const NS_PER_HOUR: i64 = 3_600_000_000_000;

/// Sorts `batch` by (`device_id`, `time`) and splits it by event-time hour.
pub fn split_by_hour(batch: &RecordBatch) -> Result<Vec<HourChunk>> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let time = batch.column(0);
    let hours: TimestampNanosecondArray = time
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .map(|t| t.unary(|v| v.div_euclid(NS_PER_HOUR) * NS_PER_HOUR))
        .ok_or_else(|| arrow::error::ArrowError::SchemaError("first column is not a ns timestamp".into()))?;
    let sort = [
        SortColumn { values: Arc::new(hours.clone()), options: None },
        SortColumn { values: batch.column(1).clone(), options: None },
        SortColumn { values: time.clone(), options: None },
    ];
    let idx = lexsort_to_indices(&sort, None)?;
    let sorted = take_record_batch(batch, &idx)?;
    let sorted_hours = arrow::compute::take(&hours, &idx, None)?;
    let sorted_hours = sorted_hours
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .ok_or_else(|| arrow::error::ArrowError::SchemaError("hours".into()))?;
    let mut out = Vec::new();
    let mut start = 0;
    let n = sorted.num_rows();
    while start < n {
        let h = sorted_hours.value(start);
        let mut end = start + 1;
        while end < n && sorted_hours.value(end) == h {
            end += 1;
        }
        out.push(HourChunk { hour_start: h, batch: sorted.slice(start, end - start) });
        start = end;
    }
    Ok(out)
}

/// The Hive partition directory of an hour: `date=YYYY-MM-DD/hour=HH`.
pub fn partition_dir(hour_start: i64) -> String {
    let dt: DateTime<Utc> = DateTime::from_timestamp_nanos(hour_start);
    format!("date={:04}-{:02}-{:02}/hour={:02}", dt.year(), dt.month(), dt.day(), dt.hour())
}

/// Writer settings of archive files of `schema`. Floats are byte-stream-split (their
/// exponent and high mantissa bytes, alike along a sorted device's series, compress apart
/// from the noisy low bytes) and `time` is delta-encoded (a device's readings are a steady
/// step apart): on TSBS's IoT data that takes the archive from 2.7 to under 2.5 bytes per
/// numeric value. DuckDB, polars, Spark and pyarrow read both encodings.
pub fn writer_properties(schema: &arrow::datatypes::Schema) -> WriterProperties {
    let mut b = WriterProperties::builder();
    for f in schema.fields() {
        let path = ColumnPath::from(f.name().as_str());
        match f.data_type() {
            DataType::Float64 | DataType::Float32 => {
                b = b
                    .set_column_dictionary_enabled(path.clone(), false)
                    .set_column_encoding(path, Encoding::BYTE_STREAM_SPLIT);
            }
            DataType::Timestamp(_, _) if f.name() == "time" => {
                b = b
                    .set_column_dictionary_enabled(path.clone(), false)
                    .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
            }
            _ => {}
        }
    }
    b.set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_sorting_columns(Some(vec![
            SortingColumn { column_idx: 1, descending: false, nulls_first: false },
            SortingColumn { column_idx: 0, descending: false, nulls_first: false },
        ]))
        .set_column_bloom_filter_enabled("device_id".into(), true)
        .set_created_by("ferrite".into())
        .build()
}

/// Encodes one sorted chunk as a Parquet file in memory; returns the bytes and the
/// file's catalog entry (without its path).
pub fn encode(chunk: &HourChunk) -> Result<(Vec<u8>, ArchivedFile)> {
    let batch = &chunk.batch;
    let mut bytes = Vec::new();
    let mut w = ArrowWriter::try_new(&mut bytes, batch.schema(), Some(writer_properties(&batch.schema())))?;
    w.write(batch)?;
    w.close()?;
    let time = batch.column(0).as_any().downcast_ref::<TimestampNanosecondArray>();
    let dev = batch.column(1).as_any().downcast_ref::<StringArray>();
    let (min_time, max_time) =
        time.map(|t| (arrow::compute::min(t).unwrap_or(0), arrow::compute::max(t).unwrap_or(0))).unwrap_or((0, 0));
    let (min_device, max_device) = match dev {
        Some(d) if !d.is_empty() => (d.value(0).to_owned(), d.value(d.len() - 1).to_owned()),
        _ => (String::new(), String::new()),
    };
    let file = ArchivedFile {
        path: String::new(),
        size: bytes.len() as u64,
        rows: batch.num_rows() as u64,
        min_time,
        max_time,
        min_device,
        max_device,
    };
    Ok((bytes, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_dirs() {
        assert_eq!(partition_dir(0), "date=1970-01-01/hour=00");
        assert_eq!(partition_dir(1_700_000_000_000_000_000), "date=2023-11-14/hour=22");
    }
}

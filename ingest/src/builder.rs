//! Column builders that decoders write into directly, one row at a time, with the ability
//! to take back a half-written row when the event turns out to be invalid.
//!
//! A row is opened with [`BatchBuilder::begin_row`], filled with `set_*` calls, and either
//! kept with [`BatchBuilder::end_row`] or dropped with [`BatchBuilder::abort_row`]. Columns
//! are padded with nulls lazily, so an event that sets 3 of 50 columns costs 3 pushes.

use std::sync::Arc;

use ahash::AHashMap;
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray, UInt64Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use ferrite_engine::{FieldType, StreamBatch, StreamCatalog, StreamName, StreamSchema};

/// Why one event was rejected; the rest of its payload is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// 0-based position of the event in its payload (line number - 1 for NDJSON and line protocol).
    pub index: usize,
    /// Short reason code, also the `reason` label of the rejection counter.
    pub reason: &'static str,
    /// Human-readable explanation naming stream, field and values.
    pub message: String,
}

enum Data {
    Float(Vec<f64>),
    Int(Vec<i64>),
    UInt(Vec<u64>),
    Bool(Vec<bool>),
    Str {
        offsets: Vec<i32>,
        bytes: Vec<u8>,
    },
    /// Timestamps (nanoseconds): columns of derived streams, and fields a stream declares
    /// `timestamp`, which take RFC 3339 strings and epoch milliseconds.
    Time(Vec<i64>),
}

struct Column {
    ty: FieldType,
    data: Data,
    valid: Vec<bool>,
}

impl Column {
    fn new(ty: FieldType) -> Self {
        let data = match ty {
            FieldType::Float => Data::Float(Vec::new()),
            FieldType::Int => Data::Int(Vec::new()),
            FieldType::UInt => Data::UInt(Vec::new()),
            FieldType::Bool => Data::Bool(Vec::new()),
            FieldType::String => Data::Str { offsets: vec![0], bytes: Vec::new() },
            FieldType::Timestamp => Data::Time(Vec::new()),
        };
        Self { ty, data, valid: Vec::new() }
    }

    fn len(&self) -> usize {
        self.valid.len()
    }

    /// Turns an integer column into a float one, keeping its values (the field was widened).
    fn widen_to_float(&mut self) {
        let data = match &self.data {
            Data::Int(v) => v.iter().map(|&x| x as f64).collect(),
            Data::UInt(v) => v.iter().map(|&x| x as f64).collect(),
            _ => return,
        };
        self.data = Data::Float(data);
        self.ty = FieldType::Float;
    }

    fn pad_to(&mut self, rows: usize) {
        while self.valid.len() < rows {
            self.valid.push(false);
            match &mut self.data {
                Data::Float(v) => v.push(0.0),
                Data::Int(v) | Data::Time(v) => v.push(0),
                Data::UInt(v) => v.push(0),
                Data::Bool(v) => v.push(false),
                Data::Str { offsets, bytes } => offsets.push(bytes.len() as i32),
            }
        }
    }

    fn truncate(&mut self, rows: usize) {
        if self.valid.len() <= rows {
            return;
        }
        self.valid.truncate(rows);
        match &mut self.data {
            Data::Float(v) => v.truncate(rows),
            Data::Int(v) | Data::Time(v) => v.truncate(rows),
            Data::UInt(v) => v.truncate(rows),
            Data::Bool(v) => v.truncate(rows),
            Data::Str { offsets, bytes } => {
                offsets.truncate(rows + 1);
                bytes.truncate(offsets[rows] as usize);
            }
        }
    }

    fn finish(self, rows: usize) -> ArrayRef {
        let mut s = self;
        s.pad_to(rows);
        let nulls = if s.valid.iter().all(|v| *v) { None } else { Some(NullBuffer::from(s.valid)) };
        match s.data {
            Data::Float(v) => Arc::new(Float64Array::new(v.into(), nulls)),
            Data::Int(v) => Arc::new(Int64Array::new(v.into(), nulls)),
            Data::UInt(v) => Arc::new(UInt64Array::new(v.into(), nulls)),
            Data::Time(v) => Arc::new(TimestampNanosecondArray::new(v.into(), nulls).with_timezone("UTC")),
            Data::Bool(v) => Arc::new(BooleanArray::new(v.into(), nulls)),
            Data::Str { offsets, bytes } => Arc::new(string_array(offsets, bytes, nulls)),
        }
    }
}

fn string_array(offsets: Vec<i32>, bytes: Vec<u8>, nulls: Option<NullBuffer>) -> StringArray {
    // Offsets are monotonically increasing and the bytes are concatenated `&str`s, so the
    // array is valid; `try_new` still checks, and an error here would be a bug.
    let offsets = OffsetBuffer::new(offsets.into());
    match StringArray::try_new(offsets, bytes.into(), nulls) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "invalid string column built; this is a bug");
            StringArray::from(Vec::<&str>::new())
        }
    }
}

/// What went wrong with a value; the decoder turns it into a [`Rejection`].
#[derive(Debug)]
pub struct ValueError {
    /// Short reason code.
    pub reason: &'static str,
    /// Explanation.
    pub message: String,
}

impl From<ferrite_engine::Error> for ValueError {
    fn from(e: ferrite_engine::Error) -> Self {
        let reason = match &e {
            ferrite_engine::Error::TypeConflict { .. } => "type_conflict",
            ferrite_engine::Error::InvalidFieldName { .. } => "invalid_field",
            ferrite_engine::Error::TooManyFields { .. } => "too_many_fields",
            ferrite_engine::Error::TooManyStreams { .. } => "too_many_streams",
            ferrite_engine::Error::InvalidDeviceId { .. } => "invalid_device_id",
            _ => "internal",
        };
        ValueError { reason, message: e.to_string() }
    }
}

/// Builds the rows of one stream.
pub struct BatchBuilder {
    catalog: Arc<StreamCatalog>,
    schema: Arc<StreamSchema>,
    index: AHashMap<Arc<str>, usize>,
    columns: Vec<Column>,
    time: Vec<i64>,
    dev_offsets: Vec<i32>,
    dev_bytes: Vec<u8>,
    rows: usize,
    row_time: Option<i64>,
    row_device: bool,
}

impl BatchBuilder {
    /// The catalog the builder resolves fields in.
    pub fn catalog(&self) -> &Arc<StreamCatalog> {
        &self.catalog
    }

    /// A builder for `stream`; registers the stream in the catalog if it is new.
    pub fn new(catalog: Arc<StreamCatalog>, stream: &StreamName) -> ferrite_engine::Result<Self> {
        let schema = catalog.ensure_stream(stream)?;
        let mut b = Self {
            catalog,
            schema: schema.clone(),
            index: AHashMap::new(),
            columns: Vec::new(),
            time: Vec::new(),
            dev_offsets: vec![0],
            dev_bytes: Vec::new(),
            rows: 0,
            row_time: None,
            row_device: false,
        };
        b.adopt(schema);
        Ok(b)
    }

    /// The stream being built.
    pub fn stream(&self) -> &StreamName {
        &self.schema.name
    }

    /// Rows kept so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn adopt(&mut self, schema: Arc<StreamSchema>) {
        // A field widened since this builder last looked: its column becomes float too.
        for (c, (_, ty)) in self.columns.iter_mut().zip(schema.fields.iter()) {
            if c.ty != *ty && *ty == FieldType::Float {
                c.widen_to_float();
            }
        }
        for (i, (name, ty)) in schema.fields.iter().enumerate().skip(self.columns.len()) {
            self.index.insert(name.clone(), i);
            self.columns.push(Column::new(*ty));
        }
        self.schema = schema;
    }

    /// Opens a new row.
    pub fn begin_row(&mut self) {
        self.row_time = None;
        self.row_device = false;
    }

    /// Sets the event time of the open row, nanoseconds since the epoch.
    pub fn set_time(&mut self, nanos: i64) {
        self.row_time = Some(nanos);
    }

    /// Whether the open row has a time yet.
    pub fn has_time(&self) -> bool {
        self.row_time.is_some()
    }

    /// Whether the open row has a device id yet.
    pub fn has_device(&self) -> bool {
        self.row_device
    }

    /// Sets the device id of the open row (validated by the caller).
    pub fn set_device(&mut self, id: &str) {
        if self.row_device {
            let start = self.dev_offsets[self.rows] as usize;
            self.dev_bytes.truncate(start);
        }
        self.dev_bytes.extend_from_slice(id.as_bytes());
        self.row_device = true;
    }

    fn column(&mut self, name: &str, proposed: FieldType) -> Result<usize, ValueError> {
        let idx = match self.index.get(name) {
            Some(i) => *i,
            None => {
                let (schema, _) = self.catalog.resolve_field(&self.schema.name, name, proposed)?;
                self.adopt(schema);
                match self.index.get(name) {
                    Some(i) => *i,
                    None => {
                        return Err(ValueError { reason: "internal", message: format!("field `{name}` vanished") });
                    }
                }
            }
        };
        // A float into an integer field widens the field to float, for good (the catalog
        // records it; data written before reads as float). Off the hot path: only on the
        // first float for such a field.
        if proposed == FieldType::Float && matches!(self.columns[idx].ty, FieldType::Int | FieldType::UInt) {
            let schema = self.catalog.widen_field(&self.schema.name, name)?;
            self.adopt(schema);
        }
        let col = &mut self.columns[idx];
        // An integer fits a float column; an unsigned one a signed column too (checked by
        // `set_uint`).
        let fits = matches!(
            (col.ty, proposed),
            (FieldType::Float, FieldType::Int | FieldType::UInt)
                | (FieldType::Int, FieldType::UInt)
                | (FieldType::Timestamp, FieldType::String | FieldType::Int)
        );
        if col.ty != proposed && !fits {
            return Err(ferrite_engine::Error::TypeConflict {
                stream: self.schema.name.to_string(),
                field: name.to_owned(),
                expected: col.ty.name(),
                found: proposed.name(),
            }
            .into());
        }
        if col.len() > self.rows {
            return Err(ValueError {
                reason: "duplicate_field",
                message: format!("stream `{}`: field `{name}` appears twice in one event", self.schema.name),
            });
        }
        col.pad_to(self.rows);
        Ok(idx)
    }

    /// Sets a float field.
    pub fn set_float(&mut self, name: &str, v: f64) -> Result<(), ValueError> {
        let i = self.column(name, FieldType::Float)?;
        let c = &mut self.columns[i];
        match &mut c.data {
            Data::Float(d) => d.push(v),
            _ => return Err(conflict(&self.schema.name, name, c.ty, FieldType::Float)),
        }
        c.valid.push(true);
        Ok(())
    }

    /// Sets an integer field; into a float column it is stored as a float.
    pub fn set_int(&mut self, name: &str, v: i64) -> Result<(), ValueError> {
        let i = self.column(name, FieldType::Int)?;
        let c = &mut self.columns[i];
        match &mut c.data {
            Data::Int(d) => d.push(v),
            Data::Float(d) => d.push(v as f64),
            // A timestamp field takes epoch milliseconds, as `ts` does.
            Data::Time(d) => match v.checked_mul(1_000_000) {
                Some(ns) => d.push(ns),
                None => return Err(bad_time(&self.schema.name, name, &v.to_string())),
            },
            _ => return Err(conflict(&self.schema.name, name, c.ty, FieldType::Int)),
        }
        c.valid.push(true);
        Ok(())
    }

    /// Sets an unsigned integer field (line protocol `u`); into a float column it is stored
    /// as a float, into a signed integer column (a field first written with `i`) when it fits.
    pub fn set_uint(&mut self, name: &str, v: u64) -> Result<(), ValueError> {
        let i = self.column(name, FieldType::UInt)?;
        let c = &mut self.columns[i];
        match &mut c.data {
            Data::UInt(d) => d.push(v),
            Data::Float(d) => d.push(v as f64),
            Data::Int(d) => match i64::try_from(v) {
                Ok(x) => d.push(x),
                Err(_) => {
                    return Err(ValueError {
                        reason: "type_conflict",
                        message: format!(
                            "stream `{}`: field `{name}` is a signed integer and {v} is past its range",
                            self.schema.name
                        ),
                    });
                }
            },
            _ => return Err(conflict(&self.schema.name, name, c.ty, FieldType::UInt)),
        }
        c.valid.push(true);
        Ok(())
    }

    /// Sets a JSON number: a new field written with an integer (no fraction, no exponent)
    /// becomes an integer column; a fraction into an integer column widens it to float
    /// (for good: the catalog records it, and older data reads as float).
    pub fn set_number(&mut self, name: &str, v: f64, integral: Option<i64>) -> Result<(), ValueError> {
        match (self.index.get(name).map(|i| self.columns[*i].ty), integral) {
            (None | Some(FieldType::Int | FieldType::Timestamp), Some(i)) => self.set_int(name, i),
            (Some(FieldType::UInt), Some(i)) if i >= 0 => self.set_uint(name, i as u64),
            _ => self.set_float(name, v),
        }
    }

    /// Sets a boolean field.
    pub fn set_bool(&mut self, name: &str, v: bool) -> Result<(), ValueError> {
        let i = self.column(name, FieldType::Bool)?;
        let c = &mut self.columns[i];
        match &mut c.data {
            Data::Bool(d) => d.push(v),
            _ => return Err(conflict(&self.schema.name, name, c.ty, FieldType::Bool)),
        }
        c.valid.push(true);
        Ok(())
    }

    /// Sets a string field.
    pub fn set_str(&mut self, name: &str, v: &str) -> Result<(), ValueError> {
        let i = self.column(name, FieldType::String)?;
        let c = &mut self.columns[i];
        match &mut c.data {
            Data::Str { offsets, bytes } => {
                bytes.extend_from_slice(v.as_bytes());
                offsets.push(bytes.len() as i32);
            }
            // A timestamp field takes RFC 3339 text.
            Data::Time(d) => match crate::json::parse_rfc3339(v) {
                Some(ns) => d.push(ns),
                None => return Err(bad_time(&self.schema.name, name, v)),
            },
            _ => return Err(conflict(&self.schema.name, name, c.ty, FieldType::String)),
        }
        c.valid.push(true);
        Ok(())
    }

    /// Keeps the open row. `default_time` is used when the event carried no time.
    pub fn end_row(&mut self, default_time: i64) {
        self.time.push(self.row_time.unwrap_or(default_time));
        self.dev_offsets.push(self.dev_bytes.len() as i32);
        self.rows += 1;
    }

    /// Drops the open row and everything written into it.
    pub fn abort_row(&mut self) {
        for c in &mut self.columns {
            c.truncate(self.rows);
        }
        let start = self.dev_offsets[self.rows] as usize;
        self.dev_bytes.truncate(start);
        self.row_time = None;
        self.row_device = false;
    }

    /// Drops every row after the first `rows` (and the open row): takes back a whole
    /// payload that turned out to be malformed half-way.
    pub fn rollback_to(&mut self, rows: usize) {
        if rows >= self.rows {
            self.abort_row();
            return;
        }
        self.rows = rows;
        self.time.truncate(rows);
        self.dev_offsets.truncate(rows + 1);
        self.abort_row();
    }

    /// The finished batch (with every column of the stream's current schema), or `None`
    /// if no row was kept.
    pub fn finish(self) -> Option<StreamBatch> {
        if self.rows == 0 {
            return None;
        }
        let rows = self.rows;
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len() + 2);
        arrays.push(Arc::new(TimestampNanosecondArray::new(self.time.into(), None).with_timezone("UTC")));
        arrays.push(Arc::new(string_array(self.dev_offsets, self.dev_bytes, None)));
        arrays.extend(self.columns.into_iter().map(|c| c.finish(rows)));
        match RecordBatch::try_new(self.schema.arrow.clone(), arrays) {
            Ok(b) => Some(StreamBatch::new(self.schema.name.clone(), b)),
            Err(e) => {
                tracing::error!(error = %e, "built an invalid batch; this is a bug");
                None
            }
        }
    }
}

fn conflict(stream: &StreamName, field: &str, expected: FieldType, found: FieldType) -> ValueError {
    ferrite_engine::Error::TypeConflict {
        stream: stream.to_string(),
        field: field.to_owned(),
        expected: expected.name(),
        found: found.name(),
    }
    .into()
}

/// A value that is not a time, for a timestamp field.
fn bad_time(stream: &ferrite_engine::StreamName, field: &str, v: &str) -> ValueError {
    ValueError {
        reason: "bad_timestamp",
        message: format!(
            "stream `{stream}`: field `{field}` is a timestamp; {v:?} is neither RFC 3339 \
             (2026-11-30T10:00:00Z) nor epoch milliseconds"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Array;

    #[test]
    fn rollback_takes_back_whole_rows() -> anyhow::Result<()> {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let mut b = BatchBuilder::new(catalog, &StreamName::new("t")?)?;
        for (d, v) in [("a", "1"), ("bb", "2"), ("ccc", "3")] {
            b.begin_row();
            b.set_device(d);
            b.set_str("s", v).map_err(|e| anyhow::anyhow!(e.message))?;
            b.end_row(0);
        }
        b.begin_row();
        b.set_device("half");
        b.rollback_to(1);
        b.begin_row();
        b.set_device("e");
        b.end_row(0);
        let out = b.finish().ok_or_else(|| anyhow::anyhow!("no batch"))?;
        let d = out.batch.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("d"))?;
        assert_eq!(d.iter().flatten().collect::<Vec<_>>(), vec!["a", "e"]);
        let s = out.batch.column(2).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("s"))?;
        assert_eq!(s.value(0), "1");
        assert!(s.is_null(1));
        Ok(())
    }

    #[test]
    fn abort_takes_back_a_row() -> anyhow::Result<()> {
        let catalog = Arc::new(StreamCatalog::in_memory());
        let mut b = BatchBuilder::new(catalog, &StreamName::new("t")?)?;
        b.begin_row();
        b.set_device("a");
        b.set_float("x", 1.0).map_err(|e| anyhow::anyhow!(e.message))?;
        b.set_str("s", "keep").map_err(|e| anyhow::anyhow!(e.message))?;
        b.end_row(5);
        b.begin_row();
        b.set_device("bbbbbb");
        b.set_str("s", "drop me").map_err(|e| anyhow::anyhow!(e.message))?;
        assert!(b.set_str("x", "oops").is_err(), "x is a float column");
        b.abort_row();
        b.begin_row();
        b.set_device("c");
        b.end_row(6);
        let out = b.finish().ok_or_else(|| anyhow::anyhow!("no batch"))?;
        assert_eq!(out.batch.num_rows(), 2);
        let s = out.batch.column(3).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("s"))?;
        assert_eq!(s.value(0), "keep");
        assert!(s.is_null(1));
        let d = out.batch.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| anyhow::anyhow!("d"))?;
        assert_eq!(d.value(1), "c");
        Ok(())
    }
}

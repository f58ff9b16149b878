//! The binary encoding of rule state checkpoints: little-endian integers, length-prefixed
//! bytes, and scalar values (the common types inline, any other as a one-row Arrow IPC
//! stream). A checkpoint is read back only by the version that wrote it or a later one, and
//! only for a rule whose fingerprint matches (see `runtime::checkpoint`), so the layout
//! carries no per-field tags.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;

type DfResult<T> = datafusion::error::Result<T>;

/// Writes a checkpoint.
#[derive(Default)]
pub(crate) struct Enc {
    pub(crate) buf: Vec<u8>,
}

impl Enc {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.buf.extend_from_slice(v);
    }

    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    pub(crate) fn scalars(&mut self, values: &[ScalarValue]) -> DfResult<()> {
        self.len(values.len());
        for v in values {
            self.scalar(v)?;
        }
        Ok(())
    }

    pub(crate) fn batch(&mut self, batch: &RecordBatch) -> DfResult<()> {
        let mut out = Vec::new();
        {
            let mut w = StreamWriter::try_new(&mut out, &batch.schema())?;
            w.write(batch)?;
            w.finish()?;
        }
        self.bytes(&out);
        Ok(())
    }

    pub(crate) fn scalar(&mut self, v: &ScalarValue) -> DfResult<()> {
        macro_rules! opt {
            ($tag:expr, $x:expr, $put:expr) => {{
                self.u8($tag);
                match $x {
                    Some(x) => {
                        self.u8(1);
                        #[allow(clippy::redundant_closure_call)]
                        ($put)(self, x);
                    }
                    None => self.u8(0),
                }
            }};
        }
        match v {
            ScalarValue::Null => self.u8(0),
            ScalarValue::Boolean(x) => opt!(1, x, |e: &mut Self, x: &bool| e.bool(*x)),
            ScalarValue::Int64(x) => opt!(2, x, |e: &mut Self, x: &i64| e.i64(*x)),
            ScalarValue::Int32(x) => opt!(3, x, |e: &mut Self, x: &i32| e.i64(i64::from(*x))),
            ScalarValue::UInt64(x) => opt!(4, x, |e: &mut Self, x: &u64| e.u64(*x)),
            ScalarValue::UInt32(x) => opt!(5, x, |e: &mut Self, x: &u32| e.u64(u64::from(*x))),
            ScalarValue::Float64(x) => opt!(6, x, |e: &mut Self, x: &f64| e.f64(*x)),
            ScalarValue::Float32(x) => opt!(7, x, |e: &mut Self, x: &f32| e.f64(f64::from(*x))),
            ScalarValue::Utf8(x) => opt!(8, x, |e: &mut Self, x: &String| e.str(x)),
            ScalarValue::LargeUtf8(x) => opt!(9, x, |e: &mut Self, x: &String| e.str(x)),
            ScalarValue::Utf8View(x) => opt!(10, x, |e: &mut Self, x: &String| e.str(x)),
            ScalarValue::Binary(x) => opt!(11, x, |e: &mut Self, x: &Vec<u8>| e.bytes(x)),
            ScalarValue::TimestampNanosecond(x, tz) => self.timestamp(12, *x, tz.as_deref()),
            ScalarValue::TimestampMicrosecond(x, tz) => self.timestamp(13, *x, tz.as_deref()),
            ScalarValue::TimestampMillisecond(x, tz) => self.timestamp(14, *x, tz.as_deref()),
            ScalarValue::TimestampSecond(x, tz) => self.timestamp(15, *x, tz.as_deref()),
            other => {
                // Lists (array_agg, distinct counts), decimals, structs...: as Arrow IPC.
                self.u8(255);
                let array = other.to_array()?;
                let schema = Arc::new(Schema::new(vec![Field::new("v", array.data_type().clone(), true)]));
                self.batch(&RecordBatch::try_new(schema, vec![array])?)?;
            }
        }
        Ok(())
    }

    /// A timestamp of the unit `tag` says: its time zone, then its value, each optional.
    fn timestamp(&mut self, tag: u8, x: Option<i64>, tz: Option<&str>) {
        self.u8(tag);
        match tz {
            Some(t) => {
                self.u8(1);
                self.str(t);
            }
            None => self.u8(0),
        }
        match x {
            Some(x) => {
                self.u8(1);
                self.i64(x);
            }
            None => self.u8(0),
        }
    }
}

/// Reads a checkpoint; every read is bounds-checked (a damaged file is an error, never a
/// panic).
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn damaged(what: &str) -> DataFusionError {
    DataFusionError::Execution(format!("rule state checkpoint is damaged: {what}"))
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> DfResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| damaged("cut short"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> DfResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> DfResult<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn bool(&mut self) -> DfResult<bool> {
        Ok(self.u8()? != 0)
    }

    pub(crate) fn u32(&mut self) -> DfResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> DfResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> DfResult<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub(crate) fn f64(&mut self) -> DfResult<f64> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    /// A count of items that follow, each at least one byte (bounds a damaged count).
    pub(crate) fn len(&mut self) -> DfResult<usize> {
        let n = self.u64()?;
        usize::try_from(n).ok().filter(|n| *n <= self.buf.len() - self.pos).ok_or_else(|| damaged("a count too large"))
    }

    pub(crate) fn bytes(&mut self) -> DfResult<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    pub(crate) fn string(&mut self) -> DfResult<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| damaged("text that is not UTF-8"))
    }

    pub(crate) fn scalars(&mut self) -> DfResult<Vec<ScalarValue>> {
        let n = self.len()?;
        (0..n).map(|_| self.scalar()).collect()
    }

    pub(crate) fn batch(&mut self) -> DfResult<RecordBatch> {
        let bytes = self.bytes()?;
        let mut reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
        match reader.next() {
            Some(b) => Ok(b?),
            None => Err(damaged("an empty Arrow stream")),
        }
    }

    pub(crate) fn scalar(&mut self) -> DfResult<ScalarValue> {
        let tag = self.u8()?;
        let present = |d: &mut Self| d.bool();
        Ok(match tag {
            0 => ScalarValue::Null,
            1 => ScalarValue::Boolean(if present(self)? { Some(self.bool()?) } else { None }),
            2 => ScalarValue::Int64(if present(self)? { Some(self.i64()?) } else { None }),
            3 => ScalarValue::Int32(if present(self)? { Some(self.i64()? as i32) } else { None }),
            4 => ScalarValue::UInt64(if present(self)? { Some(self.u64()?) } else { None }),
            5 => ScalarValue::UInt32(if present(self)? { Some(self.u64()? as u32) } else { None }),
            6 => ScalarValue::Float64(if present(self)? { Some(self.f64()?) } else { None }),
            7 => ScalarValue::Float32(if present(self)? { Some(self.f64()? as f32) } else { None }),
            8 => ScalarValue::Utf8(if present(self)? { Some(self.string()?) } else { None }),
            9 => ScalarValue::LargeUtf8(if present(self)? { Some(self.string()?) } else { None }),
            10 => ScalarValue::Utf8View(if present(self)? { Some(self.string()?) } else { None }),
            11 => ScalarValue::Binary(if present(self)? { Some(self.bytes()?.to_vec()) } else { None }),
            12..=15 => {
                let tz: Option<Arc<str>> = if present(self)? { Some(Arc::from(self.string()?)) } else { None };
                let x = if present(self)? { Some(self.i64()?) } else { None };
                match tag {
                    12 => ScalarValue::TimestampNanosecond(x, tz),
                    13 => ScalarValue::TimestampMicrosecond(x, tz),
                    14 => ScalarValue::TimestampMillisecond(x, tz),
                    _ => ScalarValue::TimestampSecond(x, tz),
                }
            }
            255 => {
                let batch = self.batch()?;
                if batch.num_columns() != 1 || batch.num_rows() != 1 {
                    return Err(damaged("a value that is not one row of one column"));
                }
                ScalarValue::try_from_array(batch.column(0), 0)?
            }
            _ => return Err(damaged("an unknown value type")),
        })
    }
}

/// Device ids read back from a checkpoint, one shared string per device.
#[derive(Default)]
pub(crate) struct DeviceNames(std::collections::HashMap<String, Arc<str>>);

impl DeviceNames {
    pub(crate) fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.0.get(name) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(name);
        self.0.insert(name.to_owned(), a.clone());
        a
    }
}

/// Saves an accumulator's intermediate state, then rebuilds the accumulator from it (some
/// accumulators hand their state over when asked for it), so that it goes on unchanged.
pub(crate) fn save_accumulator(
    e: &mut Enc,
    acc: &mut Box<dyn datafusion::logical_expr::Accumulator>,
    fresh: impl FnOnce() -> DfResult<Box<dyn datafusion::logical_expr::Accumulator>>,
) -> DfResult<()> {
    let state = acc.state()?;
    e.scalars(&state)?;
    let mut rebuilt = fresh()?;
    merge_state(&mut rebuilt, &state)?;
    *acc = rebuilt;
    Ok(())
}

/// Merges a saved intermediate state into a fresh accumulator.
pub(crate) fn restore_accumulator(
    d: &mut Dec<'_>,
    acc: &mut Box<dyn datafusion::logical_expr::Accumulator>,
) -> DfResult<()> {
    let state = d.scalars()?;
    merge_state(acc, &state)
}

fn merge_state(acc: &mut Box<dyn datafusion::logical_expr::Accumulator>, state: &[ScalarValue]) -> DfResult<()> {
    if state.is_empty() {
        return Ok(());
    }
    let arrays = state.iter().map(ScalarValue::to_array).collect::<DfResult<Vec<ArrayRef>>>()?;
    acc.merge_batch(&arrays)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit of a timestamp scalar's type.
    fn unit_of(v: &ScalarValue) -> Option<arrow::datatypes::TimeUnit> {
        match v.data_type() {
            arrow::datatypes::DataType::Timestamp(u, _) => Some(u),
            _ => None,
        }
    }

    #[test]
    fn scalars_round_trip_with_their_types() -> DfResult<()> {
        let values = vec![
            ScalarValue::Null,
            ScalarValue::Boolean(Some(true)),
            ScalarValue::Int64(None),
            ScalarValue::Int64(Some(-7)),
            ScalarValue::Int32(Some(3)),
            ScalarValue::UInt64(Some(u64::MAX)),
            ScalarValue::Float64(Some(2.5)),
            ScalarValue::Float64(None),
            ScalarValue::Utf8(Some("é-device".into())),
            ScalarValue::Utf8View(None),
            ScalarValue::TimestampNanosecond(Some(42), Some(Arc::from("UTC"))),
            ScalarValue::TimestampMillisecond(None, None),
            // Through the IPC fallback: a list, as array_agg's state holds.
            ScalarValue::List(ScalarValue::new_list_nullable(
                &[ScalarValue::Int64(Some(1)), ScalarValue::Int64(None)],
                &arrow::datatypes::DataType::Int64,
            )),
        ];
        let mut e = Enc::default();
        e.scalars(&values)?;
        let mut d = Dec::new(&e.buf);
        let back = d.scalars()?;
        assert!(d.is_empty());
        assert_eq!(back, values);
        assert_eq!(unit_of(&back[10]), Some(arrow::datatypes::TimeUnit::Nanosecond));
        Ok(())
    }

    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        let mut e = Enc::default();
        e.scalars(&[ScalarValue::Utf8(Some("abc".into())), ScalarValue::Int64(Some(1))]).ok();
        for cut in 0..e.buf.len() {
            assert!(Dec::new(&e.buf[..cut]).scalars().is_err(), "cut at {cut} was read");
        }
        let mut huge = Enc::default();
        huge.u64(u64::MAX);
        assert!(Dec::new(&huge.buf).scalars().is_err());
    }
}

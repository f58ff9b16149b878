//! What rules produce: rows of derived streams (conformed to the catalog so that they are
//! first-class streams), alerts, and actions handed to an [`ActionSink`] (MQTT publish,
//! device commands, webhooks). Templates (`'door open on {device_id}'`, JSON with
//! `"{column}"` strings) are filled from the output row.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use ferrite_engine::{DEVICE_COLUMN, FieldType, StreamBatch, StreamCatalog, StreamName, TIME_COLUMN, time_field_type};

use crate::error::{Error, Result};

/// Name of the stream alerts are written to.
pub const ALERTS_STREAM: &str = "alerts";

/// Where rule actions go. The server implements it with its MQTT broker and an HTTP client;
/// `ferrite rules test` records them.
pub trait ActionSink: Send + Sync {
    /// Publishes `payload` on an MQTT topic (commands go to `devices/{id}/commands`) for a
    /// rule of `tenant` (the sink decides whether that tenant may reach the topic).
    fn publish(&self, tenant: &str, topic: &str, payload: Vec<u8>);
    /// POSTs `body` (JSON) to `url`; must not block the caller.
    fn webhook(&self, url: &str, body: Vec<u8>);
    /// Sends command `name` with `params` to `device` for rule `rule` of `tenant`. The
    /// server hands it to the actuation service (the device type's limits, the rate and
    /// the policies apply, with the tenant's rules as the sender); by default it is
    /// published as `{"id", "name", "params", "rule"}` on `devices/{device}/commands`.
    fn command(&self, tenant: &str, rule: &str, device: &str, name: &str, params: serde_json::Value, id: &str) {
        let body = serde_json::json!({"id": id, "name": name, "params": params, "rule": rule});
        self.publish(tenant, &format!("devices/{device}/commands"), body.to_string().into_bytes());
    }
}

/// An [`ActionSink`] that drops everything (rules without a broker).
#[derive(Debug, Default)]
pub struct NoActions;

impl ActionSink for NoActions {
    fn publish(&self, _tenant: &str, _topic: &str, _payload: Vec<u8>) {}
    fn webhook(&self, _url: &str, _body: Vec<u8>) {}
}

/// Schema of the `alerts` stream.
pub fn alerts_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(TIME_COLUMN, time_field_type(), false),
        Field::new(DEVICE_COLUMN, DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, true),
        Field::new("key", DataType::Utf8, true),
        Field::new("severity", DataType::Utf8, true),
        Field::new("message", DataType::Utf8, true),
        Field::new("state", DataType::Utf8, true),
    ]))
}

/// The `{name}` placeholders of a template, in order.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let name = &after[..close];
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(name);
        }
        rest = &after[close + 1..];
    }
    out
}

/// Row access for templates: the formatted value of each column of one output row.
pub struct RowView<'a> {
    schema: &'a Schema,
    columns: &'a [ArrayRef],
    row: usize,
    extra: &'a [(&'a str, &'a str)],
}

impl<'a> RowView<'a> {
    /// A view of `row` of `batch`, with extra names (`rule`, `severity`).
    pub fn new(batch: &'a RecordBatch, row: usize, extra: &'a [(&'a str, &'a str)]) -> Self {
        Self { schema: batch.schema_ref(), columns: batch.columns(), row, extra }
    }

    /// The value of column `name` as text (`None`: no such column; null: empty string).
    pub fn text(&self, name: &str) -> Option<String> {
        if let Some((_, v)) = self.extra.iter().find(|(n, _)| *n == name) {
            return Some((*v).to_owned());
        }
        let i = self.schema.index_of(name).ok()?;
        let col = &self.columns[i];
        if col.is_null(self.row) {
            return Some(String::new());
        }
        let f = ArrayFormatter::try_new(col.as_ref(), &FormatOptions::default()).ok()?;
        Some(f.value(self.row).to_string())
    }

    /// The value of column `name` as JSON.
    pub fn json(&self, name: &str) -> Option<serde_json::Value> {
        if let Some((_, v)) = self.extra.iter().find(|(n, _)| *n == name) {
            return Some(serde_json::Value::String((*v).to_owned()));
        }
        let i = self.schema.index_of(name).ok()?;
        let col = &self.columns[i];
        if col.is_null(self.row) {
            return Some(serde_json::Value::Null);
        }
        use arrow::array::AsArray;
        use arrow::datatypes::{Float64Type, Int64Type, UInt64Type};
        Some(match col.data_type() {
            DataType::Boolean => serde_json::Value::Bool(col.as_boolean().value(self.row)),
            DataType::Int64 => serde_json::Value::from(col.as_primitive::<Int64Type>().value(self.row)),
            DataType::UInt64 => serde_json::Value::from(col.as_primitive::<UInt64Type>().value(self.row)),
            DataType::Float64 => serde_json::Number::from_f64(col.as_primitive::<Float64Type>().value(self.row))
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32 => match cast(&col.slice(self.row, 1), &DataType::Int64) {
                Ok(a) => serde_json::Value::from(a.as_primitive::<Int64Type>().value(0)),
                Err(_) => serde_json::Value::Null,
            },
            DataType::Float32 => match cast(&col.slice(self.row, 1), &DataType::Float64) {
                Ok(a) => serde_json::Number::from_f64(a.as_primitive::<Float64Type>().value(0))
                    .map_or(serde_json::Value::Null, serde_json::Value::Number),
                Err(_) => serde_json::Value::Null,
            },
            _ => serde_json::Value::String(self.text(name).unwrap_or_default()),
        })
    }

    /// The whole row as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for f in self.schema.fields() {
            map.insert(f.name().clone(), self.json(f.name()).unwrap_or(serde_json::Value::Null));
        }
        serde_json::Value::Object(map)
    }
}

/// Fills `{name}` placeholders of a text template.
pub fn fill_text(template: &str, row: &RowView<'_>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if row.text(&after[..close]).is_some() => {
                out.push_str(&row.text(&after[..close]).unwrap_or_default());
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Fills a JSON template: a string that is exactly `"{name}"` becomes the typed value,
/// other strings get their placeholders filled as text.
pub fn fill_json(template: &serde_json::Value, row: &RowView<'_>) -> serde_json::Value {
    use serde_json::Value;
    match template {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}'))
                && let Some(v) = row.json(name)
            {
                return v;
            }
            Value::String(fill_text(s, row))
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| fill_json(v, row)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), fill_json(v, row))).collect()),
        other => other.clone(),
    }
}

/// The schema a derived stream will have once `output` rows are inserted into it: the
/// existing columns (if the stream exists), then the output's new columns as the catalog
/// stores them. Lets later rules of the same deployment read a stream nobody wrote yet.
pub fn derived_schema(existing: Option<SchemaRef>, output: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = match &existing {
        Some(s) => s.fields().iter().map(|f| f.as_ref().clone()).collect(),
        None => {
            vec![Field::new(TIME_COLUMN, time_field_type(), false), Field::new(DEVICE_COLUMN, DataType::Utf8, false)]
        }
    };
    for f in output.fields() {
        if fields.iter().any(|x| x.name() == f.name()) {
            continue;
        }
        if let Some(ft) = field_type_of(f.data_type()) {
            fields.push(Field::new(f.name(), ft.data_type(), true));
        }
    }
    Arc::new(Schema::new(fields))
}

/// Registers the columns a rule will insert into `stream`, so the stream and its schema
/// exist (and other rules and SQL can use them) before the first row arrives.
pub fn register_derived(catalog: &StreamCatalog, stream: &StreamName, output: &Schema) -> Result<()> {
    catalog.ensure_stream(stream)?;
    for f in output.fields() {
        if f.name() == TIME_COLUMN || f.name() == DEVICE_COLUMN {
            continue;
        }
        if let Some(ft) = field_type_of(f.data_type()) {
            resolve(catalog, stream, f.name(), ft)?;
        }
    }
    Ok(())
}

/// Adds (or finds) column `name` of type `ft` in `stream`; a column of another type is an
/// error naming both, but integers go into a float column, and floats widen an integer one.
fn resolve(
    catalog: &StreamCatalog,
    stream: &StreamName,
    name: &str,
    ft: FieldType,
) -> Result<Arc<ferrite_engine::StreamSchema>> {
    let (schema, actual) = catalog.resolve_field(stream, name, ft)?;
    let integer = |t: FieldType| matches!(t, FieldType::Int | FieldType::UInt);
    if actual == FieldType::Float && integer(ft) {
        return Ok(schema);
    }
    if integer(actual) && ft == FieldType::Float {
        return Ok(catalog.widen_field(stream, name)?);
    }
    if actual != ft {
        return Err(ferrite_engine::Error::TypeConflict {
            stream: stream.to_string(),
            field: name.to_owned(),
            expected: actual.name(),
            found: ft.name(),
        }
        .into());
    }
    Ok(schema)
}

/// The catalog type a column of Arrow type `dt` is stored as (`None`: a stream cannot hold it).
pub fn field_type_of(dt: &DataType) -> Option<FieldType> {
    Some(match dt {
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => FieldType::Float,
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => FieldType::Int,
        DataType::UInt64 => FieldType::UInt,
        DataType::Boolean => FieldType::Bool,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => FieldType::String,
        DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => FieldType::Timestamp,
        _ => return None,
    })
}

/// Turns a rule's output rows into a batch of stream `stream` as the catalog has it: `time`
/// and `device_id` first (from `time`/`device_id` output columns, else the given ones),
/// then every other output column, registered in the catalog and cast to its type.
pub fn conform(
    catalog: &StreamCatalog,
    stream: &StreamName,
    out: &RecordBatch,
    time: &TimestampNanosecondArray,
    device: &StringArray,
) -> Result<StreamBatch> {
    let schema = out.schema();
    let time_col: ArrayRef = match schema.index_of(TIME_COLUMN) {
        Ok(i) => cast(out.column(i), &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())))?,
        Err(_) => Arc::new(time.clone().with_timezone("UTC")),
    };
    let device_col: ArrayRef = match schema.index_of(DEVICE_COLUMN) {
        Ok(i) => cast(out.column(i), &DataType::Utf8)?,
        Err(_) => Arc::new(device.clone()),
    };
    if time_col.null_count() > 0 || device_col.null_count() > 0 {
        return Err(Error::Input(format!("derived stream `{stream}`: `time` and `device_id` must not be null")));
    }
    let mut stream_schema = catalog.ensure_stream(stream)?;
    let mut named: Vec<(String, ArrayRef)> = Vec::new();
    for (f, col) in schema.fields().iter().zip(out.columns()) {
        if f.name() == TIME_COLUMN || f.name() == DEVICE_COLUMN {
            continue;
        }
        let Some(ft) = field_type_of(f.data_type()) else {
            return Err(Error::Input(format!(
                "derived stream `{stream}`: column `{}` has type {}, which a stream cannot hold",
                f.name(),
                f.data_type()
            )));
        };
        stream_schema = resolve(catalog, stream, f.name(), ft)?;
        named.push((f.name().clone(), cast(col, &ft.data_type())?));
    }
    let arrow_schema = stream_schema.arrow.clone();
    let rows = out.num_rows();
    let columns: Vec<ArrayRef> = arrow_schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == TIME_COLUMN {
                time_col.clone()
            } else if f.name() == DEVICE_COLUMN {
                device_col.clone()
            } else {
                named
                    .iter()
                    .find(|(n, _)| n == f.name())
                    .map(|(_, c)| c.clone())
                    .unwrap_or_else(|| arrow::array::new_null_array(f.data_type(), rows))
            }
        })
        .collect();
    let batch = RecordBatch::try_new(arrow_schema, columns)?;
    Ok(StreamBatch::new(stream.clone(), batch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Float64Array;

    #[test]
    fn templates_fill_text_and_typed_json() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("t", DataType::Float64, true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec!["d1"])), Arc::new(Float64Array::from(vec![Some(21.5)]))],
        )?;
        let extra = [("rule", "r")];
        let row = RowView::new(&b, 0, &extra);
        assert_eq!(fill_text("{device_id} is at {t} ({rule}) {nope}", &row), "d1 is at 21.5 (r) {nope}");
        let t: serde_json::Value = serde_json::json!({"temp": "{t}", "msg": "hot {device_id}"});
        assert_eq!(fill_json(&t, &row), serde_json::json!({"temp": 21.5, "msg": "hot d1"}));
        assert_eq!(placeholders("a {x} {y_1} {}"), vec!["x", "y_1"]);
        Ok(())
    }
}

//! The registry as a SQL table of each tenant (`SELECT * FROM devices`), so that "which
//! thermostats in building 7 run firmware 2.1?" is one query, joined with telemetry.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use ferrite_engine::SystemTable;

use crate::registry::{DeviceView, Registry};

/// The table's name.
pub const TABLE: &str = "devices";

/// `devices`: one row per registered device of the querying tenant.
pub struct DevicesTable(pub Arc<Registry>);

fn list(values: impl Iterator<Item = Vec<String>>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for v in values {
        for s in v {
            b.values().append_value(s);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn millis(v: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter(v).with_timezone("UTC"))
}

impl SystemTable for DevicesTable {
    fn name(&self) -> &str {
        TABLE
    }

    fn schema(&self) -> SchemaRef {
        let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        let strings = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
        Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("name", DataType::Utf8, false),
            Field::new("type", DataType::Utf8, false),
            Field::new("owner", DataType::Utf8, false),
            Field::new("level", DataType::Utf8, false),
            Field::new("parent", DataType::Utf8, true),
            Field::new("attributes", DataType::Utf8, false),
            Field::new("tags", strings.clone(), false),
            Field::new("groups", strings, false),
            Field::new("firmware", DataType::Utf8, false),
            Field::new("lat", DataType::Float64, true),
            Field::new("lon", DataType::Float64, true),
            Field::new("status", DataType::Utf8, false),
            Field::new("online", DataType::Boolean, false),
            Field::new("last_seen", ts.clone(), true),
            Field::new("created_at", ts.clone(), false),
            Field::new("updated_at", ts, false),
        ]))
    }

    fn rows(&self, tenant: &str) -> Result<Vec<RecordBatch>, String> {
        let rows: Vec<DeviceView> = self.0.all(tenant);
        let d = || rows.iter().map(|r| &r.device);
        let text =
            |f: fn(&crate::model::Device) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(d().map(f))) };
        let columns: Vec<ArrayRef> = vec![
            text(|d| &d.id),
            text(|d| &d.name),
            text(|d| &d.device_type),
            text(|d| &d.owner),
            text(|d| d.level.as_str()),
            Arc::new(StringArray::from_iter(d().map(|d| d.parent.as_deref()))),
            Arc::new(StringArray::from_iter_values(
                d().map(|d| serde_json::Value::Object(d.attributes.clone()).to_string()),
            )),
            list(d().map(|d| d.tags.clone())),
            list(d().map(|d| d.groups.clone())),
            text(|d| &d.firmware),
            Arc::new(Float64Array::from_iter(d().map(|d| d.location.map(|l| l.lat)))),
            Arc::new(Float64Array::from_iter(d().map(|d| d.location.map(|l| l.lon)))),
            text(|d| d.status.as_str()),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.online)))),
            millis(rows.iter().map(|r| r.last_seen)),
            millis(d().map(|d| Some(d.created_at))),
            millis(d().map(|d| Some(d.updated_at))),
        ];
        let batch = RecordBatch::try_new(self.schema(), columns).map_err(|e| e.to_string())?;
        Ok(vec![batch])
    }
}

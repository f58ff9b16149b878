//! Rule state as SQL tables: `system.rule_state` (every open window and partial match) and
//! `system.watermarks` (every device's clock per rule), computed when queried.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use ferrite_engine::{SystemTable, time_field_type};

use crate::runtime::RuleEngine;

/// One open window or partial match.
#[derive(Debug, Clone)]
pub struct StateRow {
    /// The rule.
    pub rule: String,
    /// The shard holding it (`None`: state shared by all shards).
    pub shard: Option<usize>,
    /// `window` or `partial_match`.
    pub kind: &'static str,
    /// The device it belongs to (for a window across devices: the device that opened it).
    pub device_id: String,
    /// The window's key, or the step a partial match waits for.
    pub detail: String,
    /// Window start, or the partial match's first event.
    pub start: i64,
    /// Window end (absent for partial matches).
    pub end: Option<i64>,
}

/// One device's clock as a rule sees it.
#[derive(Debug, Clone)]
pub struct WatermarkRow {
    /// The rule.
    pub rule: String,
    /// The shard (`None`: shared state).
    pub shard: Option<usize>,
    /// The device.
    pub device_id: String,
    /// Its newest event time.
    pub newest_event: i64,
    /// Its watermark: newest event minus `max_delay`.
    pub watermark: i64,
    /// Wall-clock time of its last event.
    pub last_seen: i64,
}

/// `system.rule_state`.
pub struct RuleStateTable(pub Arc<RuleEngine>);

/// `system.watermarks`.
pub struct WatermarksTable(pub Arc<RuleEngine>);

/// The tenant of a rule key and the rule's name in it (`tenant/name`, or `name` in the
/// default tenant).
pub fn split_rule_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((ferrite_engine::ids::DEFAULT_TENANT, key))
}

/// Keeps `tenant`'s rows and names their rules as the tenant knows them.
fn of_tenant<T>(rows: Vec<T>, tenant: &str, rule: impl Fn(&mut T) -> &mut String) -> Vec<T> {
    rows.into_iter()
        .filter_map(|mut r| {
            let name = rule(&mut r);
            let (t, local) = split_rule_key(name);
            if t != tenant {
                return None;
            }
            *name = local.to_owned();
            Some(r)
        })
        .collect()
}

fn ts(v: impl IntoIterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from_iter(v).with_timezone("UTC"))
}

impl SystemTable for RuleStateTable {
    fn name(&self) -> &str {
        "rule_state"
    }

    fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("rule", DataType::Utf8, false),
            Field::new("shard", DataType::Int64, true),
            Field::new("kind", DataType::Utf8, false),
            Field::new("device_id", DataType::Utf8, false),
            Field::new("detail", DataType::Utf8, false),
            Field::new("start", time_field_type(), false),
            Field::new("end", time_field_type(), true),
        ]))
    }

    fn rows(&self, tenant: &str) -> Result<Vec<RecordBatch>, String> {
        let rows = of_tenant(self.0.state_rows().map_err(|e| e.to_string())?, tenant, |r| &mut r.rule);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.rule.as_str()))),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.shard.map(|s| s as i64)))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.kind))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.device_id.as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.detail.as_str()))),
            ts(rows.iter().map(|r| Some(r.start))),
            ts(rows.iter().map(|r| r.end)),
        ];
        RecordBatch::try_new(self.schema(), columns).map(|b| vec![b]).map_err(|e| e.to_string())
    }
}

impl SystemTable for WatermarksTable {
    fn name(&self) -> &str {
        "watermarks"
    }

    fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("rule", DataType::Utf8, false),
            Field::new("shard", DataType::Int64, true),
            Field::new("device_id", DataType::Utf8, false),
            Field::new("newest_event", time_field_type(), false),
            Field::new("watermark", time_field_type(), false),
            Field::new("last_seen", time_field_type(), false),
        ]))
    }

    fn rows(&self, tenant: &str) -> Result<Vec<RecordBatch>, String> {
        let rows = of_tenant(self.0.watermark_rows(), tenant, |r| &mut r.rule);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.rule.as_str()))),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.shard.map(|s| s as i64)))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.device_id.as_str()))),
            ts(rows.iter().map(|r| Some(r.newest_event))),
            ts(rows.iter().map(|r| Some(r.watermark))),
            ts(rows.iter().map(|r| Some(r.last_seen))),
        ];
        RecordBatch::try_new(self.schema(), columns).map(|b| vec![b]).map_err(|e| e.to_string())
    }
}

//! The query layer over a real storage directory: pruning and hot/archive unification.

use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use ferrite_engine::{FieldType, Metrics, ShardStore, StreamBatch, StreamCatalog, StreamName};
use ferrite_query::QueryService;
use ferrite_storage::{Storage, StorageConfig};

const HOUR: i64 = 3_600_000_000_000;

struct Fixture {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    storage: Arc<Storage>,
    service: QueryService,
}

fn fixture() -> anyhow::Result<Fixture> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let catalog = Arc::new(StreamCatalog::in_memory());
    let stream = StreamName::new("telemetry")?;
    let (schema, _) = catalog.resolve_field(&stream, "temperature", FieldType::Float)?;
    let metrics = Arc::new(Metrics::new());
    let config = StorageConfig { data_dir: dir.path().to_owned(), shards: 1, ..StorageConfig::default() };
    let storage = Storage::open(config, catalog.clone(), metrics.clone(), rt.handle().clone())?;
    // Three event-time hours, devices a..d, 1,000 rows per hour.
    for hour in 0..3i64 {
        let t: Vec<i64> = (0..1000).map(|i| hour * HOUR + i * 1_000_000).collect();
        let d: Vec<String> = (0..1000).map(|i| format!("{}", (b'a' + (i % 4) as u8 + hour as u8) as char)).collect();
        let v: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let batch = RecordBatch::try_new(
            schema.arrow.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(t).with_timezone("UTC")),
                Arc::new(StringArray::from(d)),
                Arc::new(Float64Array::from(v)),
            ],
        )?;
        storage.commit(0, &[StreamBatch::new(stream.clone(), batch)]).map_err(anyhow::Error::msg)?;
    }
    let service = QueryService::new(catalog, storage.clone(), metrics)?;
    Ok(Fixture { _rt: rt, _dir: dir, storage, service })
}

impl Fixture {
    fn rows(&self, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
        Ok(self._rt.block_on(self.service.sql(sql))?.batches)
    }

    fn count(&self, sql: &str) -> anyhow::Result<i64> {
        let b = self.rows(sql)?;
        let a = b[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .ok_or_else(|| anyhow::anyhow!("not i64"))?;
        Ok(a.value(0))
    }

    fn plan(&self, sql: &str) -> anyhow::Result<String> {
        let b = self.rows(&format!("EXPLAIN {sql}"))?;
        Ok(arrow::util::pretty::pretty_format_batches(&b)?.to_string())
    }
}

#[test]
fn hot_and_archive_are_one_table() -> anyhow::Result<()> {
    let f = fixture()?;
    assert_eq!(f.count("SELECT count(*) FROM telemetry")?, 3000);
    f.storage.persist()?;
    assert_eq!(f.count("SELECT count(*) FROM telemetry")?, 3000);
    assert_eq!(f.storage.snapshot(&StreamName::new("telemetry")?).files.len(), 3, "one file per hour");
    Ok(())
}

#[test]
fn time_and_device_predicates_prune_files_and_reach_parquet() -> anyhow::Result<()> {
    let f = fixture()?;
    f.storage.persist()?;
    let one_hour = "SELECT count(*) FROM telemetry WHERE time >= to_timestamp_nanos(3600000000000) AND time < to_timestamp_nanos(7200000000000)";
    assert_eq!(f.count(one_hour)?, 1000);
    let plan = f.plan(one_hour)?;
    assert!(plan.contains("file_groups={1 group"), "only the one file of that hour is scanned:\n{plan}");
    assert!(plan.contains("predicate="), "the filter is pushed into the Parquet scan:\n{plan}");

    // Device `a` only exists in hour 0 (hours shift the device letters).
    let dev = "SELECT count(*) FROM telemetry WHERE device_id = 'a'";
    assert_eq!(f.count(dev)?, 250);
    let plan = f.plan(dev)?;
    assert!(plan.contains("file_groups={1 group"), "device range pruning:\n{plan}");

    // Nothing matches: no file is opened at all.
    let none = "SELECT count(*) FROM telemetry WHERE time > to_timestamp_nanos(99000000000000000)";
    assert_eq!(f.count(none)?, 0);
    assert!(!f.plan(none)?.contains("DataSourceExec: file_groups"));
    Ok(())
}

#[test]
fn sql_errors_are_classified() -> anyhow::Result<()> {
    let f = fixture()?;
    let err = |sql: &str| f._rt.block_on(f.service.sql(sql)).err().map(|e| e.code());
    assert_eq!(err("SELECT * FROM nope"), Some("unknown_table"));
    assert_eq!(err("SELEC 1"), Some("sql_syntax"));
    assert_eq!(err("SELECT nope FROM telemetry"), Some("invalid_query"));
    Ok(())
}

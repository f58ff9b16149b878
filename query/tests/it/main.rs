//! The query layer over a real storage directory: pruning and hot/archive unification.

use std::sync::Arc;

use anyhow::Context;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use ferrite_engine::{FieldType, Metrics, ShardStore, StreamBatch, StreamCatalog, StreamName};
use ferrite_query::{Error, QueryConfig, QueryService};
use ferrite_storage::{Storage, StorageConfig};

const HOUR: i64 = 3_600_000_000_000;

struct Fixture {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    storage: Arc<Storage>,
    service: QueryService,
}

fn fixture() -> anyhow::Result<Fixture> {
    fixture_with(QueryConfig::default())
}

fn fixture_with(limits: QueryConfig) -> anyhow::Result<Fixture> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let catalog = Arc::new(StreamCatalog::in_memory());
    let stream = StreamName::new("telemetry")?;
    catalog.resolve_field(&stream, "temperature", FieldType::Float)?;
    let metrics = Arc::new(Metrics::new());
    let config = StorageConfig { data_dir: dir.path().to_owned(), shards: 1, ..StorageConfig::default() };
    let storage = Storage::open(config, catalog.clone(), metrics.clone(), rt.handle().clone())?;
    commit_hours(&storage, &catalog)?;
    let service = QueryService::with_config(catalog, storage.clone(), metrics, limits)?;
    Ok(Fixture { _rt: rt, _dir: dir, storage, service })
}

/// Three event-time hours, devices a..d, 1,000 rows per hour.
fn commit_hours(storage: &Storage, catalog: &StreamCatalog) -> anyhow::Result<()> {
    let stream = StreamName::new("telemetry")?;
    let schema = catalog.get(&stream).ok_or_else(|| anyhow::anyhow!("no stream"))?;
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
    Ok(())
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

#[test]
fn the_sql_door_is_read_only() -> anyhow::Result<()> {
    let f = fixture()?;
    let outside = f._dir.path().join("secret.csv");
    std::fs::write(&outside, "a,b\n1,2\n")?;
    let copy_to = f._dir.path().join("copied.csv");
    let attempts = [
        "CREATE SCHEMA ferrite.x".to_owned(),
        format!("CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '{}'", outside.display()),
        format!("COPY (SELECT 1) TO '{}'", copy_to.display()),
        "INSERT INTO telemetry VALUES (now(), 'x', 1.0)".to_owned(),
        "SET datafusion.execution.batch_size = 1".to_owned(),
        "CREATE TABLE m AS SELECT 1".to_owned(),
        "DROP TABLE telemetry".to_owned(),
    ];
    for sql in &attempts {
        match f._rt.block_on(f.service.sql(sql)) {
            Err(e @ Error::ReadOnly(_)) => assert_eq!(e.code(), "read_only"),
            other => anyhow::bail!("{sql:?} was not refused as read-only: {other:?}"),
        }
    }
    assert!(!copy_to.exists(), "COPY wrote a file");
    // A file URL as a table name reaches no object store either.
    let url = format!("SELECT * FROM 'file://{}'", outside.display());
    assert!(f._rt.block_on(f.service.sql(&url)).is_err());
    // Queries still work.
    assert_eq!(f.count("SELECT count(*) FROM telemetry")?, 3000);
    assert!(!f.plan("SELECT count(*) FROM telemetry")?.is_empty(), "EXPLAIN is a query");
    Ok(())
}

#[test]
fn results_are_capped_in_size() -> anyhow::Result<()> {
    let f = fixture_with(QueryConfig { max_result_bytes: 16 * 1024, ..QueryConfig::default() })?;
    match f._rt.block_on(f.service.sql("SELECT * FROM telemetry")) {
        Err(e @ Error::ResourcesExhausted(_)) => assert!(e.to_string().contains("sql_max_result"), "{e}"),
        other => anyhow::bail!("an oversized result was not refused: {:?}", other.map(|r| r.batches.len())),
    }
    assert_eq!(f.count("SELECT count(*) FROM telemetry")?, 3000, "small results still pass");
    Ok(())
}

#[test]
fn a_query_past_its_time_limit_is_cancelled() -> anyhow::Result<()> {
    let f = fixture_with(QueryConfig { timeout: std::time::Duration::from_millis(200), ..QueryConfig::default() })?;
    // A hundred billion rows: hours of work, cancelled after 200 ms.
    let sql = "SELECT count(*) FROM range(100000000000) AS t(x) WHERE x % 7 = 3";
    let started = std::time::Instant::now();
    match f._rt.block_on(f.service.sql(sql)) {
        Err(e @ Error::Timeout(_)) => assert_eq!(e.code(), "query_timeout"),
        other => anyhow::bail!("not cancelled: {:?}", other.map(|r| r.batches.len())),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    Ok(())
}

#[test]
fn a_query_over_the_memory_pool_fails_cleanly() -> anyhow::Result<()> {
    let f = fixture_with(QueryConfig { memory_limit: 64 * 1024, ..QueryConfig::default() })?;
    let sql = "SELECT a.device_id, count(*) FROM telemetry a JOIN telemetry b ON a.device_id = b.device_id GROUP BY 1";
    match f._rt.block_on(f.service.sql(sql)) {
        Err(e @ Error::ResourcesExhausted(_)) => assert!(e.to_string().contains("sql_memory_limit"), "{e}"),
        other => anyhow::bail!("the memory pool did not hold: {:?}", other.map(|r| r.batches.len())),
    }
    Ok(())
}

#[test]
fn a_query_planned_before_a_compaction_and_run_after_it_sees_each_row_once() -> anyhow::Result<()> {
    use datafusion::prelude::SessionContext;
    let f = fixture()?;
    f.storage.persist()?;
    commit_hours(&f.storage, f.service.catalog())?;
    f.storage.persist()?;
    let stream = StreamName::new("telemetry")?;
    assert_eq!(f.storage.snapshot(&stream).files.len(), 6, "two files per hour");
    // A session over the same table and store as the service's, so the plan can be held
    // between planning (the snapshot) and execution.
    let ctx = SessionContext::new();
    let url = url::Url::parse(ferrite_query::table::ARCHIVE_URL)?;
    ctx.register_object_store(&url, f.storage.object_store());
    let schema = f.service.catalog().get(&stream).ok_or_else(|| anyhow::anyhow!("schema"))?.arrow.clone();
    ctx.register_table(
        "telemetry",
        Arc::new(ferrite_query::table::StreamTable::new(stream.clone(), schema, f.storage.clone())),
    )?;
    let plan = f._rt.block_on(async {
        ctx.sql("SELECT count(*), count(DISTINCT (device_id, time)) FROM telemetry").await?.create_physical_plan().await
    })?;
    let report = f.storage.compact(i64::MAX / 2, false)?;
    assert_eq!((report.files_in, report.files_out), (6, 3));
    let batches = f._rt.block_on(datafusion::physical_plan::collect(plan, ctx.task_ctx()))?;
    let counts: Vec<i64> = (0..2)
        .map(|c| {
            batches[0].column(c).as_any().downcast_ref::<arrow::array::Int64Array>().map(|a| a.value(0)).unwrap_or(-1)
        })
        .collect();
    assert_eq!(counts, vec![6000, 3000], "the old files, read from where they were retired to");
    assert_eq!(f.count("SELECT count(*) FROM telemetry")?, 6000, "a new query reads the merged files");
    assert_eq!(f.storage.snapshot(&stream).files.len(), 3);
    Ok(())
}

#[test]
fn last_values_are_the_rows_distinct_on_finds_and_bad_calls_say_why() -> anyhow::Result<()> {
    let f = fixture()?;
    f.storage.persist()?;
    commit_hours(&f.storage, f.service.catalog())?;
    let pretty = |sql: &str| -> anyhow::Result<String> {
        Ok(arrow::util::pretty::pretty_format_batches(&f.rows(sql)?)?.to_string())
    };
    let cached = pretty("SELECT device_id, time, temperature FROM last_values('telemetry') ORDER BY device_id")?;
    let scanned = pretty(
        "SELECT DISTINCT ON (device_id) device_id, time, temperature FROM telemetry ORDER BY device_id, time DESC",
    )?;
    assert_eq!(cached, scanned);
    assert_eq!(f.count("SELECT count(*) FROM last_values('telemetry')")?, 6, "devices a..f");
    for (sql, says) in [
        ("SELECT * FROM last_values('nope')", "unknown stream `nope`"),
        ("SELECT * FROM last_values(1)", "the stream's name as a string"),
    ] {
        let err = f.rows(sql).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(says), "{sql}: {err}");
    }
    Ok(())
}

#[test]
fn a_field_widened_from_integer_to_float_reads_as_float_in_old_files_and_memory() -> anyhow::Result<()> {
    let f = fixture()?;
    let catalog = f.service.catalog().clone();
    let stream = StreamName::new("counts")?;
    catalog.resolve_field(&stream, "n", FieldType::Int)?;
    let int_schema = catalog.get(&stream).ok_or_else(|| anyhow::anyhow!("schema"))?.arrow.clone();
    let int_batch = |t: i64, d: &str, n: i64| -> anyhow::Result<StreamBatch> {
        let b = RecordBatch::try_new(
            int_schema.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![t]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec![d])),
                Arc::new(arrow::array::Int64Array::from(vec![n])),
            ],
        )?;
        Ok(StreamBatch::new(stream.clone(), b))
    };
    f.storage.commit(0, &[int_batch(1, "a", 1)?, int_batch(2, "b", 2)?]).map_err(anyhow::Error::msg)?;
    f.storage.persist()?;
    let float_schema = catalog.widen_field(&stream, "n")?.arrow.clone();
    let b = RecordBatch::try_new(
        float_schema,
        vec![
            Arc::new(TimestampNanosecondArray::from(vec![3]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(Float64Array::from(vec![2.5])),
        ],
    )?;
    f.storage.commit(0, &[StreamBatch::new(stream.clone(), b)]).map_err(anyhow::Error::msg)?;
    // A decoder that had not seen the widening yet still sends an integer.
    f.storage.commit(0, &[int_batch(4, "c", 4)?]).map_err(anyhow::Error::msg)?;
    let check = |when: &str| -> anyhow::Result<()> {
        let rows = f.rows("SELECT sum(n) AS s, arrow_typeof(n) AS t FROM counts GROUP BY 2")?;
        let text = arrow::util::pretty::pretty_format_batches(&rows)?.to_string();
        assert!(text.contains("9.5") && text.contains("Float64"), "{when}: {text}");
        let last = f.rows("SELECT device_id, n FROM last_values('counts') ORDER BY device_id")?;
        let text = arrow::util::pretty::pretty_format_batches(&last)?.to_string();
        assert!(text.contains("| a         | 2.5 |") && text.contains("| c         | 4.0 |"), "{when}: {text}");
        Ok(())
    };
    check("an Int64 file, a float and an integer batch in memory")?;
    f.storage.persist()?;
    check("an Int64 file and a Float64 file")?;
    let report = f.storage.compact(i64::MAX / 2, false)?;
    assert!(report.files_in >= 2, "{report:?}");
    check("compacted into one Float64 file")?;
    Ok(())
}

#[test]
fn date_trunc_on_the_utc_time_column_groups_by_hour_and_day_and_strings_come_out_plain() -> anyhow::Result<()> {
    let f = fixture()?;
    f.storage.persist()?;
    let by = |sql: &str| -> anyhow::Result<Vec<(i64, i64)>> {
        let mut out = Vec::new();
        for b in f.rows(sql)? {
            assert_eq!(b.schema().field(0).data_type().to_string(), "Timestamp(ns, \"UTC\")", "{sql}");
            let t = b.column(0).as_any().downcast_ref::<TimestampNanosecondArray>().context("time")?;
            let n = b.column(1).as_any().downcast_ref::<arrow::array::Int64Array>().context("count")?;
            out.extend((0..b.num_rows()).map(|i| (t.value(i), n.value(i))));
        }
        Ok(out)
    };
    let hours = by("SELECT date_trunc('hour', time) AS h, count(*) FROM telemetry GROUP BY 1 ORDER BY 1")?;
    assert_eq!(hours, vec![(0, 1000), (HOUR, 1000), (2 * HOUR, 1000)]);
    assert_eq!(
        by("SELECT date_bin(INTERVAL '1 hour', time) AS h, count(*) FROM telemetry GROUP BY 1 ORDER BY 1")?,
        hours
    );
    assert_eq!(by("SELECT datetrunc('day', time) AS d, count(*) FROM telemetry GROUP BY 1")?, vec![(0, 3000)]);
    // Weeks go through DataFusion's own calendar path: 1970-01-01 was a Thursday.
    assert_eq!(
        by("SELECT date_trunc('week', time) AS w, count(*) FROM telemetry GROUP BY 1")?,
        vec![(-3 * 24 * HOUR, 3000)]
    );
    // Tables scan strings as views; results carry plain strings.
    let b = f.rows("SELECT device_id, max(device_id) AS m FROM telemetry GROUP BY device_id")?;
    assert_eq!(b[0].schema().field(0).data_type(), &arrow::datatypes::DataType::Utf8);
    assert_eq!(b[0].schema().field(1).data_type(), &arrow::datatypes::DataType::Utf8);
    Ok(())
}

//! The archive is plain Parquet in the Hive layout, readable as it is by other tools.

use std::fs::File;

use arrow::array::{Array, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::serialized_reader::ReadOptionsBuilder;
use serde_json::json;

use crate::harness::{Server, events, parquet_files};

#[test]
fn archive_files_are_sorted_zstd_parquet_with_page_index_in_hive_layout() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    // Two event-time hours, many devices, out of order.
    let mut evs = events(0, 2000, 50);
    evs.reverse();
    evs.push(json!({"device_id": "late", "ts": "2026-03-01T10:59:59Z", "temperature": 1.0, "seq": 9999}));
    s.post_json("/api/v1/streams/telemetry/events", &json!(evs))?;
    assert!(s.stop()?.success());

    // The platform's own streams (audit, api_usage) are archived too; this test is about
    // telemetry.
    let files: Vec<_> = parquet_files(&dir.path().join("archive"))
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("/telemetry/"))
        .collect();
    let rel: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(dir.path().join("archive")).map(|p| p.display().to_string()).unwrap_or_default())
        .collect();
    assert_eq!(rel.len(), 2, "{rel:?}");
    assert!(rel[0].starts_with("default/telemetry/date=2025-11-24/hour=16/"), "{rel:?}");
    assert!(rel[1].starts_with("default/telemetry/date=2026-03-01/hour=10/"), "{rel:?}");

    let mut total = 0;
    for f in &files {
        let options = ReadOptionsBuilder::new().with_page_index().build();
        let reader = SerializedFileReader::new_with_options(File::open(f)?, options)?;
        let meta = reader.metadata();
        let rg = meta.row_group(0);
        assert!(matches!(rg.column(0).compression(), Compression::ZSTD(_)), "zstd");
        assert!(rg.column(1).statistics().is_some(), "column statistics");
        assert!(meta.column_index().is_some() && meta.offset_index().is_some(), "page index");
        assert!(rg.sorting_columns().is_some(), "sorting columns recorded");

        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(f)?)?;
        let schema = builder.schema().clone();
        assert_eq!(schema.field(0).name(), "time");
        assert_eq!(schema.field(0).data_type(), &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())));
        assert_eq!(schema.field(1).name(), "device_id");
        for batch in builder.build()? {
            let batch = batch?;
            total += batch.num_rows();
            let t =
                batch.column(0).as_any().downcast_ref::<TimestampNanosecondArray>().ok_or(anyhow::anyhow!("time"))?;
            let d = batch.column(1).as_any().downcast_ref::<StringArray>().ok_or(anyhow::anyhow!("device"))?;
            for i in 1..batch.num_rows() {
                let prev = (d.value(i - 1), t.value(i - 1));
                let cur = (d.value(i), t.value(i));
                assert!(prev <= cur, "rows not sorted by device_id, time at {i}: {prev:?} > {cur:?}");
            }
        }
    }
    assert_eq!(total, 2001);
    Ok(())
}

/// DuckDB, pyarrow and polars read the archive as it is (Hive partitions included).
#[test]
fn duckdb_pyarrow_and_polars_read_the_archive() -> anyhow::Result<()> {
    let probe = std::process::Command::new("python3").args(["-c", "import duckdb, pyarrow, polars"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        if std::env::var_os("CI").is_some() {
            anyhow::bail!("duckdb, pyarrow and polars must be installed in CI (.ci/run installs them)");
        }
        eprintln!("skipping: pip install duckdb pyarrow polars to run this interop check");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let s = Server::start(dir.path(), &[])?;
    s.post_json("/api/v1/streams/telemetry/events", &json!(events(0, 1000, 10)))?;
    s.post_json("/api/v1/streams/telemetry/events", &json!([{"device_id": "x", "seq": 1000, "extra": "new column"}]))?;
    assert!(s.stop()?.success());
    let root = dir.path().join("archive").join("default").join("telemetry");
    let script = r#"
import sys, duckdb, pyarrow.dataset as ds, polars as pl
root = sys.argv[1]
con = duckdb.connect()
n, devices, tz = con.execute(
    f"SELECT count(*), count(DISTINCT device_id), typeof(min(time)) FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true, union_by_name=true)"
).fetchone()
assert n == 1001, n
assert devices == 11, devices
assert tz in ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ_NS"), tz
parts = con.execute(f"SELECT DISTINCT date, hour FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true, union_by_name=true)").fetchall()
assert len(parts) >= 1, parts
t = ds.dataset(root, format="parquet", partitioning="hive").to_table()
assert t.num_rows == 1001, t.num_rows
assert str(t.schema.field("time").type) == "timestamp[ns, tz=UTC]", t.schema.field("time").type
df = pl.scan_parquet(f"{root}/**/*.parquet", hive_partitioning=True, missing_columns="insert", extra_columns="ignore").collect()
assert df.height == 1001, df.height
print("interop ok")
"#;
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(&root).output()?;
    assert!(
        out.status.success(),
        "interop script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn archive_on_s3_compatible_storage() -> anyhow::Result<()> {
    let Some(s3) = crate::harness::start_s3()? else { return Ok(()) };
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let created = agent.put(&format!("{}/ferrite-bucket", s3.endpoint)).send_empty()?;
    assert!(created.status().is_success(), "create bucket: {}", created.status());
    let env = crate::harness::S3Server::env(&s3.endpoint);
    let dir = tempfile::tempdir()?;
    let args = ["--archive-url", "s3://ferrite-bucket/prod/archive"];
    let s = Server::start_with_env(dir.path(), &args, &env)?;
    s.post_json("/api/v1/streams/telemetry/events", &json!(events(0, 400, 4)))?;
    assert!(s.stop()?.success());
    assert!(parquet_files(dir.path()).is_empty(), "nothing archived locally");

    let mut list = agent.get(&format!("{}/ferrite-bucket?list-type=2&prefix=prod/archive/", s3.endpoint)).call()?;
    let xml = list.body_mut().read_to_string()?;
    assert!(xml.contains("<Key>prod/archive/default/telemetry/date=2025-11-24/hour=16/"), "{xml}");

    // A restart reads the archive back from the object store.
    let s = Server::start_with_env(dir.path(), &args, &env)?;
    assert_eq!(s.sql_count("SELECT count(DISTINCT seq) FROM telemetry WHERE device_id = 'dev-1'")?, 100);
    Ok(())
}

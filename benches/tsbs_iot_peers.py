"""The TSBS IoT queries on DuckDB (SQL from the caller, on stdin as JSON) and polars (lazy
frames below), over the Parquet files Ferrite archived. Called by `tsbs_iot` (the Rust
benchmark); prints `engine query median_ms rows` lines.

    python3 benches/tsbs_iot_peers.py ARCHIVE_ROOT RUNS END_NS < queries.json
"""

import json
import statistics
import sys
import time

root, runs, end_ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
queries = json.load(sys.stdin)


def timed(run):
    times, rows = [], 0
    for _ in range(runs):
        s = time.perf_counter()
        rows = run()
        times.append(time.perf_counter() - s)
    return statistics.median(times) * 1000, rows


import duckdb  # noqa: E402

con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
for table in ("readings", "diagnostics"):
    con.execute(
        f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{root}/{table}/**/*.parquet', "
        "hive_partitioning = true, union_by_name = true)"
    )
for name, sql in queries.items():
    ms, rows = timed(lambda: len(con.execute(sql).fetchall()))
    print("duckdb", name, ms, rows, flush=True)

try:
    import polars as pl
except ImportError:
    sys.exit(0)

HOUR = 3_600_000_000_000
end = pl.lit(end_ns).cast(pl.Datetime("ns", "UTC"))


def scan(table):
    return pl.scan_parquet(f"{root}/{table}/**/*.parquet", hive_partitioning=True, missing_columns="insert")


def window(ns):
    start = pl.lit(end_ns - ns).cast(pl.Datetime("ns", "UTC"))
    return (pl.col("time") >= start) & (pl.col("time") < end)


named = pl.col("name").is_not_null()
south = pl.col("fleet") == "South"
ten = pl.col("time").dt.truncate("10m").alias("ten_minutes")


def latest(table, cols):
    """The newest row of each truck of the South fleet (DISTINCT ON (name) ... ORDER BY time DESC)."""
    return (
        scan(table)
        .filter(south & named)
        .group_by("name")
        .agg([pl.col(c).get(pl.col("time").arg_max()) for c in cols])
    )


def sessions(ns, more_than):
    return (
        scan("readings")
        .filter(window(ns) & named & south)
        .group_by(ten, "name", "driver")
        .agg(pl.col("velocity").mean().alias("v"))
        .filter(pl.col("v") > 1)
        .group_by("name", "driver")
        .agg(pl.len().alias("n"))
        .filter(pl.col("n") > more_than)
    )


def driving_session():
    status = (
        scan("readings")
        .filter(named)
        .group_by("name", ten)
        .agg((pl.col("velocity").mean() > 5).alias("driving"))
        .sort("name", "ten_minutes")
        .with_columns(pl.col("driving").shift(1).over("name").alias("prev"))
        .filter(pl.col("driving") != pl.col("prev"))
        .with_columns(pl.col("ten_minutes").shift(-1).over("name").alias("stop"))
        .filter(pl.col("driving"))
    )
    return (
        status.group_by("name", pl.col("ten_minutes").dt.truncate("1d").alias("day"))
        .agg((pl.col("stop") - pl.col("ten_minutes")).dt.total_seconds().mean().alias("duration_s"))
        .sort("name", "day")
    )


def breakdowns():
    b = (
        scan("diagnostics")
        .filter(named)
        .group_by(ten, "name", "model")
        .agg(((pl.col("status") > 0).cast(pl.Float64).fill_null(0.0).mean() >= 0.5).alias("broken_down"))
        .sort("name", "ten_minutes")
        .with_columns(pl.col("broken_down").shift(-1).over("name").alias("next_broken_down"))
    )
    return (
        b.filter((~pl.col("broken_down")) & pl.col("next_broken_down"))
        .group_by("model")
        .agg(pl.len().alias("breakdowns"))
    )


plans = {
    "last-loc": lambda: latest("readings", ["driver", "longitude", "latitude"]),
    "low-fuel": lambda: latest("diagnostics", ["driver", "fuel_state"]).filter(pl.col("fuel_state") < 0.1),
    "high-load": lambda: latest("diagnostics", ["driver", "current_load", "load_capacity"]).filter(
        pl.col("current_load") / pl.col("load_capacity").cast(pl.Float64) > 0.9
    ),
    "stationary-trucks": lambda: scan("readings")
    .filter(window(600_000_000_000) & named & south)
    .group_by("name", "driver")
    .agg(pl.col("velocity").mean().alias("v"))
    .filter(pl.col("v") < 1),
    "long-driving-sessions": lambda: sessions(4 * HOUR, 22),
    "long-daily-sessions": lambda: sessions(24 * HOUR, 60),
    "avg-vs-projected-fuel-consumption": lambda: scan("readings")
    .filter(
        (pl.col("velocity") > 1)
        & pl.col("fleet").is_not_null()
        & pl.col("nominal_fuel_consumption").is_not_null()
        & named
    )
    .group_by("fleet")
    .agg(
        pl.col("fuel_consumption").mean().alias("avg_fuel_consumption"),
        pl.col("nominal_fuel_consumption").cast(pl.Float64).mean().alias("projected_fuel_consumption"),
    ),
    "avg-daily-driving-duration": lambda: scan("readings")
    .filter(named)
    .group_by(ten, "name", "fleet", "driver")
    .agg(pl.col("velocity").mean().alias("v"))
    .filter(pl.col("v") > 1)
    .group_by(pl.col("ten_minutes").dt.truncate("1d").alias("day"), "name", "fleet", "driver")
    .agg((pl.len() / 6.0).alias("hours"))
    .group_by("fleet", "name", "driver")
    .agg(pl.col("hours").mean().alias("avg_daily_hours")),
    "avg-daily-driving-session": driving_session,
    "avg-load": lambda: scan("diagnostics")
    .filter(named)
    .group_by("name", "fleet", "model", "load_capacity")
    .agg(pl.col("current_load").mean().alias("avg_load"))
    .group_by("fleet", "model", "load_capacity")
    .agg((pl.col("avg_load") / pl.col("load_capacity").cast(pl.Float64)).mean().alias("avg_load_percentage")),
    "daily-activity": lambda: scan("diagnostics")
    .filter(named)
    .group_by(pl.col("time").dt.truncate("1d").alias("day"), ten, "name", "fleet", "model")
    .agg(pl.len().alias("n"), pl.col("status").mean().alias("s"))
    .filter(pl.col("s") < 1)
    .group_by("fleet", "model", "day")
    .agg((pl.col("n").sum() / 144.0).alias("daily_activity"))
    .sort("day"),
    "breakdown-frequency": breakdowns,
}
for name, plan in plans.items():
    ms, rows = timed(lambda: plan().collect().height)
    print("polars", name, ms, rows, flush=True)

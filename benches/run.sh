#!/usr/bin/env bash
# Runs every benchmark with its peer side by side, as recorded in BENCHMARKS.md.
# Needs: mosquitto (apt), duckdb (pip). Release builds; expect a long first build.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES="${FERRITE_BENCH_FEATURES:-}"   # "polars" adds the polars peer (a heavy build)

cargo build --release --bin ferrite
cargo build --release -p ferrite-benches --bins ${FEATURES:+--features $FEATURES}

echo "== machine"; nproc; grep -m1 'model name' /proc/cpuinfo || true; free -g | head -2
echo "== decode (criterion)"
cargo bench -p ferrite-benches --bench decode -- --noplot 2>&1 | grep -E '^(decode|  *time|  *thrpt)|thrpt'
echo "== http ingest"
./target/release/ingest_http "${HTTP_THREADS:-4}" "${HTTP_SECONDS:-10}"
echo "== mqtt ingest"
./target/release/ingest_mqtt "${MQTT_PUBLISHERS:-100}" "${MQTT_MESSAGES:-2000}"
echo "== persist and query"
./target/release/query "${QUERY_ROWS:-10000000}" "${QUERY_RUNS:-5}"

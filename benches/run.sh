#!/usr/bin/env bash
# Runs every benchmark with its peer side by side, as recorded in BENCHMARKS.md.
# Needs: mosquitto (apt), duckdb and polars (pip). Release build (no LTO); the first one is long.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES="${FERRITE_BENCH_FEATURES:-}"   # "polars" adds the polars Rust-crate peer (a heavy build)

# One invocation for every binary, so features unify the same way each time (no rebuilds).
cargo build --release -p ferrite -p ferrite-benches --bins --benches ${FEATURES:+--features ferrite-benches/$FEATURES}

echo "== machine"; nproc; grep -m1 'model name' /proc/cpuinfo || true; free -g | head -2
echo "== decode (criterion)"
"$(ls -t target/release/deps/decode-* | grep -v '\.d$' | head -1)" --bench --warm-up-time 1 --measurement-time 4 --noplot
echo "== http ingest"
./target/release/ingest_http "${HTTP_THREADS:-4}" "${HTTP_SECONDS:-10}"
echo "== mqtt ingest"
for _ in 1 2 3; do ./target/release/ingest_mqtt "${MQTT_PUBLISHERS:-100}" "${MQTT_MESSAGES:-2000}"; done
echo "== persist and query"
./target/release/query "${QUERY_ROWS:-10000000}" "${QUERY_RUNS:-5}"

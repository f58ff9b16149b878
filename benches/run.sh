#!/usr/bin/env bash
# Runs every benchmark with its peer side by side, and prints, after each one's raw output,
# the rows of its table in BENCHMARKS.md (so that the file is pasted from a run, not retyped).
# Needs: mosquitto and influxdb (apt), duckdb and polars (pip). Release build (no LTO); the first one is long.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES="${FERRITE_BENCH_FEATURES:-}"   # "polars" adds the polars Rust-crate peer (a heavy build)

# One invocation for every binary, so features unify the same way each time (no rebuilds).
cargo build --release -p ferrite -p ferrite-benches --bins --benches ${FEATURES:+--features ferrite-benches/$FEATURES}
# The device side (its own workspace): the agent and the fleet simulator.
(cd firmware && cargo build --release -p ferrite-agent -p ferrite-sim)

# key=value lines of the scenario binaries, as markdown rows of the named keys.
rows() { # prefix key...
    local prefix=$1; shift
    awk -v prefix="$prefix" -v keys="$*" '
        $1 == prefix {
            n = split(keys, k, " ")
            for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            printf "|"; for (j = 1; j <= n; j++) printf " %s |", v[k[j]]; printf "\n"
        }'
}
# criterion's "time: [low median high]" lines as `| benchmark | median | throughput median |`.
criterion_rows() {
    awk '
        /^[A-Za-z_0-9\/.-]+$/ { name = $1 }
        /^[A-Za-z_0-9\/.-]+ +time:/ { name = $1 }
        /time:/ { split($0, a, "["); split(a[2], t, " "); median = t[3] " " t[4] }
        /thrpt:/ { split($0, a, "["); split(a[2], t, " "); printf "| %s | %s | %s %s |\n", name, median, t[3], t[4] }'
}
# criterion's time lines alone, as `| benchmark | median |` (benchmarks without a throughput).
criterion_times() {
    awk '
        /^[A-Za-z_0-9\/.-]+$/ { name = $1 }
        /^[A-Za-z_0-9\/.-]+ +time:/ { name = $1 }
        /time:/ { split($0, a, "["); split(a[2], t, " "); printf "| %s | %s %s |\n", name, t[3], t[4] }'
}

echo "== machine"; nproc; grep -m1 'model name' /proc/cpuinfo || true; free -g | head -2; date -u
echo "== decode (criterion)"
"$(ls -t target/release/deps/decode-* | grep -v '\.d$' | head -1)" --bench --warm-up-time 1 --measurement-time 4 --noplot | tee /tmp/ferrite-bench-decode.txt
criterion_rows < /tmp/ferrite-bench-decode.txt
echo "== rules (criterion)"
"$(ls -t target/release/deps/rules-* | grep -v '\.d$' | head -1)" --bench --warm-up-time 1 --measurement-time 4 --noplot | tee /tmp/ferrite-bench-rules.txt
criterion_rows < /tmp/ferrite-bench-rules.txt
echo "== http ingest"
./target/release/ingest_http "${HTTP_THREADS:-4}" "${HTTP_SECONDS:-10}" | tee /tmp/ferrite-bench-http.txt
rows http_ingest format events_per_s MB_per_s < /tmp/ferrite-bench-http.txt
echo "== mqtt ingest (three runs)"
for _ in 1 2 3; do ./target/release/ingest_mqtt "${MQTT_PUBLISHERS:-100}" "${MQTT_MESSAGES:-2000}"; done | tee /tmp/ferrite-bench-mqtt.txt
rows mqtt_ingest scenario ferrite_msgs_per_s ferrite_dropped mosquitto_msgs_per_s mosquitto_dropped ratio < /tmp/ferrite-bench-mqtt.txt
echo "== mqtt over TLS against plaintext, Ferrite and mosquitto (three runs)"
for _ in 1 2 3; do ./target/release/mqtt_tls "${TLS_PUBLISHERS:-50}" "${MQTT_MESSAGES:-2000}"; done | tee /tmp/ferrite-bench-tls.txt
rows mqtt_tls ferrite_plain ferrite_tls ferrite_plain_again ferrite_tls_ratio mosquitto_plain mosquitto_tls mosquitto_plain_again mosquitto_tls_ratio < /tmp/ferrite-bench-tls.txt
echo "== memory per idle MQTT connection, Ferrite and mosquitto"
./target/release/mqtt_idle "${IDLE_CONNECTIONS:-10000}" | tee /tmp/ferrite-bench-idle.txt
rows mqtt_idle connections ferrite_rss_before_kib ferrite_rss_after_kib ferrite_bytes_per_connection mosquitto_rss_before_kib mosquitto_rss_after_kib mosquitto_bytes_per_connection < /tmp/ferrite-bench-idle.txt
echo "== Sparkplug B DATA against JSON over MQTT, the same metrics (alternating rounds)"
./target/release/sparkplug "${TLS_PUBLISHERS:-50}" "${MQTT_MESSAGES:-2000}" 10 3 | tee /tmp/ferrite-bench-sparkplug.txt
rows sparkplug publishers metrics sparkplug_msgs_per_s json_msgs_per_s sparkplug/json sparkplug_metrics_per_s sparkplug_bytes json_bytes < /tmp/ferrite-bench-sparkplug.txt
echo "== CoAP confirmable posts against MQTT QoS 1 publishes, one at a time per client (alternating rounds)"
./target/release/coap "${COAP_CLIENTS:-64}" "${COAP_MESSAGES:-2000}" 3 | tee /tmp/ferrite-bench-coap.txt
rows coap clients messages coap_posts_per_s mqtt_qos1_per_s coap/mqtt coap_cpu_s_per_m mqtt_cpu_s_per_m duplicates < /tmp/ferrite-bench-coap.txt
echo "== MQTT 5 against MQTT 3.1.1, Ferrite and mosquitto"
./target/release/mqtt5 "${TLS_PUBLISHERS:-50}" "${MQTT_MESSAGES:-2000}" 3 | tee /tmp/ferrite-bench-mqtt5.txt
rows mqtt5 ferrite_v311 ferrite_v5 ferrite_v5_ratio mosquitto_v311 mosquitto_v5 mosquitto_v5_ratio < /tmp/ferrite-bench-mqtt5.txt
echo "== fan-out: one publisher to 1,000 subscribers, Ferrite and mosquitto (burst and paced, QoS 0 and 1)"
./target/release/mqtt_fanout "${FANOUT_SUBSCRIBERS:-1000}" "${FANOUT_MESSAGES:-500}" | tee /tmp/ferrite-bench-fanout.txt
rows mqtt_fanout mode qos ferrite_deliveries_per_s mosquitto_deliveries_per_s rate_ratio ferrite_cpu_us_per_1k mosquitto_cpu_us_per_1k cpu_ratio < /tmp/ferrite-bench-fanout.txt
echo "== the rate limiter's cost on MQTT QoS 1 ingest (limits on but never reached, against none)"
./target/release/mqtt_throttle "${TLS_PUBLISHERS:-50}" "${MQTT_MESSAGES:-2000}" 5 | tee /tmp/ferrite-bench-throttle.txt
rows mqtt_throttle rounds no_limits_median limits_on_median cost_percent < /tmp/ferrite-bench-throttle.txt
echo "== api_usage's cost on one-event HTTP requests (on against off, alternating)"
./target/release/http_usage "${HTTP_THREADS:-4}" 5 3 | tee /tmp/ferrite-bench-usage.txt
rows http_usage threads rounds off_median on_median cost_percent < /tmp/ferrite-bench-usage.txt
echo "== policy decisions (criterion)"
"$(ls -t target/release/deps/policy-* | grep -v '\.d$' | head -1)" --bench --warm-up-time 1 --measurement-time 4 --noplot | tee /tmp/ferrite-bench-policy.txt
criterion_times < /tmp/ferrite-bench-policy.txt
echo "== identity on against --auth off (three alternating runs)"
./target/release/identity "${MQTT_PUBLISHERS:-100}" "${MQTT_MESSAGES:-2000}" "${HTTP_THREADS:-4}" "${HTTP_SECONDS:-10}" 3 | tee /tmp/ferrite-bench-identity.txt
rows identity_summary scenario off_median on_median on/off < /tmp/ferrite-bench-identity.txt
rows identity_summary scenario threads tokens_per_s_median < /tmp/ferrite-bench-identity.txt | grep token_endpoint
echo "== devices: provisioning, disable to disconnect, commands, registry lookups (three runs)"
./target/release/devices "${DEVICES:-100000}" 20 3 "${CONNECTED_DEVICES:-10000}" "${HTTP_THREADS:-4}" | tee /tmp/ferrite-bench-devices.txt
rows devices run scenario devices per_s median_ms max_ms connected lookups_per_s touches_per_s < /tmp/ferrite-bench-devices.txt
echo "== compaction: files and bytes per value before and after, ingest with compaction running against without"
./target/release/compaction "${COMPACT_HOURS:-10}" 30 20000 "${HTTP_SECONDS:-15}" 3 | tee /tmp/ferrite-bench-compaction.txt
rows compaction_files hours files_before files_after rows bytes_per_value_before bytes_per_value_after seconds < /tmp/ferrite-bench-compaction.txt
rows compaction_ingest run compaction events_per_s files_merged_during_load < /tmp/ferrite-bench-compaction.txt
rows compaction_summary scenario off_median on_median on/off < /tmp/ferrite-bench-compaction.txt
echo "== last values of 100,000 devices: the cache against DISTINCT ON (Ferrite, DuckDB)"
./target/release/last_values "${LAST_DEVICES:-100000}" 10 20 | tee /tmp/ferrite-bench-last.txt
rows last_values devices rows cache_ms ferrite_distinct_on_ms duckdb_distinct_on_ms cache/duckdb < /tmp/ferrite-bench-last.txt
echo "== persist and query"
./target/release/query "${QUERY_ROWS:-10000000}" "${QUERY_RUNS:-5}" | tee /tmp/ferrite-bench-query.txt
rows persist rows seconds rows_per_s arrow_MB_per_s parquet_MB files < /tmp/ferrite-bench-query.txt
awk '$1 == "query" { name = $2; for (i = 3; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
     printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", name, v["ferrite_ms"], v["duckdb_ms"], v["polars_rust_ms"], v["polars_py_ms"], v["ferrite/duckdb"], v["ferrite/polars_rust"], v["ferrite/polars_py"] }' /tmp/ferrite-bench-query.txt
echo "== TSBS IoT: load through line protocol, compaction, the twelve queries (Ferrite, DuckDB, polars)"
./target/release/tsbs_iot "${TSBS_TRUCKS:-100}" "${TSBS_HOURS:-72}" "${TSBS_RUNS:-5}" 30 | tee /tmp/ferrite-bench-tsbs.txt
rows tsbs_load trucks hours lines accepted refused_no_name decode_commit_lines_per_s < /tmp/ferrite-bench-tsbs.txt
rows tsbs_archive stream rows files_before files_after bytes_per_value_before bytes_per_value_after < /tmp/ferrite-bench-tsbs.txt
rows tsbs_query query rows ferrite_ms duckdb_ms polars_ms ferrite/duckdb ferrite/polars < /tmp/ferrite-bench-tsbs.txt
echo "== TSBS IoT through InfluxDB 1.x's /write: Ferrite and InfluxDB 1.6 (Debian's influxdb), the same batches (three runs)"
if ! command -v influxd >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq influxdb >/dev/null || true
fi
for _ in 1 2 3; do ./target/release/tsbs_write "${TSBS_WRITE_TRUCKS:-1000}" "${TSBS_WRITE_HOURS:-3}" 10000 2; done | tee /tmp/ferrite-bench-tsbs-write.txt
rows tsbs_write server lines rows_acked refused_batches rows_per_s server_cpu_s_per_million_rows < /tmp/ferrite-bench-tsbs-write.txt
rows tsbs_write server rows_in_sql every_line_accepted < /tmp/ferrite-bench-tsbs-write.txt | grep -v '|  |'
echo "== rules latency: maximum load, then half of it (three runs)"
MAX_LINE=$(./target/release/rules_latency 3000000 "${LATENCY_SECONDS:-10}" 4)
echo "$MAX_LINE"
MAX=$(echo "$MAX_LINE" | tr ' ' '\n' | awk -F= '$1 == "achieved_events_per_s" { print $2 }')
HALF=$(( ${MAX%.*} / 2 ))
for _ in 1 2 3; do ./target/release/rules_latency "$HALF" "${LATENCY_SECONDS:-10}" 4; done | tee /tmp/ferrite-bench-latency.txt
echo "$MAX_LINE" | rows rules_latency target_events_per_s achieved_events_per_s measured p50_ms p99_ms max_ms load_windows_emitted
rows rules_latency target_events_per_s achieved_events_per_s measured p50_ms p99_ms max_ms load_windows_emitted < /tmp/ferrite-bench-latency.txt
echo "== the fleet simulator against the benches' MQTT load generator, on mosquitto"
bash benches/sim_capacity.sh "${SIM_DEVICES:-10000}" 1 "${SIM_SECONDS:-30}"
echo "== the device agent: CPU and memory per reading, back-fill"
bash benches/agent.sh "${AGENT_READINGS:-10000}"
echo "== reading 10 M rows: Flight SQL, PostgreSQL wire and HTTP"
bash benches/sql_clients.sh "${SQL_ROWS:-10000000}" 3

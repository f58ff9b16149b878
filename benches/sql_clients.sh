#!/usr/bin/env bash
# Reading ROWS rows (default 10 M) out of Ferrite through each door analysts use: Arrow
# Flight SQL (ADBC, Arrow batches), the PostgreSQL wire protocol (psql, text rows) and the
# HTTP endpoint (CSV and Arrow IPC), the same query on the same server in the same run. The
# figure is rows/s from the request to the last byte, median of RUNS runs.
#
# Not the same work: psql holds the whole result in memory before printing it to /dev/null
# (as it does without FETCH_COUNT); ADBC builds a pyarrow Table in memory; curl writes to
# /dev/null; the HTTP endpoint buffers the result on the server (up to sql_max_result)
# before the first byte, Flight SQL and pgwire stream it. psql's rows and CSV are text,
# Flight and Arrow IPC binary.
#
#   bash benches/sql_clients.sh [ROWS] [RUNS]
# Needs target/release/ferrite (cargo build --release -p ferrite), psql, curl, and Python's
# adbc-driver-flightsql.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-10000000}"
RUNS="${2:-3}"
BIN=target/release/ferrite
[ -x "$BIN" ] || { echo "missing $BIN: cargo build --release -p ferrite"; exit 1; }
PSQL="$(command -v psql || ls /usr/lib/postgresql/*/bin/psql | tail -1)"

WORK="$(mktemp -d)"
"$BIN" serve --data-dir "$WORK/data" --http-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --pg-listen 127.0.0.1:0 --flight-listen 127.0.0.1:0 --coap-listen off \
    --sql-max-result 8GiB --sql-timeout 600s --log warn > "$WORK/server.out" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do grep -q "ferrite listening" "$WORK/server.out" 2>/dev/null && break; sleep 0.1; done
LINE="$(grep "ferrite listening" "$WORK/server.out")"
HTTP="$(echo "$LINE" | sed -E 's/.*http=([^ ]+).*/\1/')"
PG="$(echo "$LINE" | sed -E 's/.*pg=([^ ]+).*/\1/')"
FLIGHT="$(echo "$LINE" | sed -E 's/.*flight=([^ ]+).*/\1/')"
TOKEN="$(cat "$WORK/data/admin.token")"

echo "loading $ROWS rows (4 columns: time, device_id, temperature, seq) over line protocol"
python3 - "$ROWS" > "$WORK/load.lp" <<'PY'
import sys
n = int(sys.argv[1])
base = 1_764_000_000_000_000_000
out = sys.stdout
for i in range(n):
    out.write(f"telemetry,device_id=dev-{i % 1000} temperature={20 + (i % 100) / 10},seq={i}i {base + i * 1000}\n")
PY
split -l 10000 "$WORK/load.lp" "$WORK/part."
for f in "$WORK"/part.*; do
    curl -s -f -H "Authorization: Bearer $TOKEN" --data-binary @"$f" "http://$HTTP/api/v2/write?precision=ns" > /dev/null
done
COUNT="$(curl -s -H "Authorization: Bearer $TOKEN" -d '{"sql": "SELECT count(*) AS n FROM telemetry"}' "http://$HTTP/api/v1/sql" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["n"])')"
[ "$COUNT" = "$ROWS" ] || { echo "loaded $COUNT rows, want $ROWS"; exit 1; }
Q="SELECT time, device_id, temperature, seq FROM telemetry"

time_it() { # command... ; prints seconds
    local start end
    start=$(date +%s.%N); "$@" > /dev/null; end=$(date +%s.%N)
    python3 -c "print(round($end - $start, 3))"
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
run() { # label command...
    local label=$1; shift
    local times=()
    for _ in $(seq 1 "$RUNS"); do times+=("$(time_it "$@")"); done
    local m; m="$(printf '%s\n' "${times[@]}" | median)"
    python3 -c "print(f'| $label | $ROWS | {$m:.2f} | {$ROWS / $m:,.0f} | ${times[*]} |')"
}
echo "| client | rows | median s | rows/s | runs (s) |"
echo "|---|---|---|---|---|"
cat > "$WORK/adbc.py" <<'PY'
import sys
import adbc_driver_flightsql.dbapi as flight
with flight.connect("grpc://" + sys.argv[1], db_kwargs={"adbc.flight.sql.authorization_header": "Bearer " + sys.argv[2]}, autocommit=True) as conn:
    cur = conn.cursor()
    cur.execute(sys.argv[3])
    t = cur.fetch_arrow_table()
    assert t.num_rows == int(sys.argv[4]), t.num_rows
PY
run "ADBC, Arrow Flight SQL (Arrow batches)" python3 "$WORK/adbc.py" "$FLIGHT" "$TOKEN" "$Q" "$ROWS"
run "psql, PostgreSQL wire (text rows)" env PGPASSWORD="$TOKEN" "$PSQL" "host=${PG%:*} port=${PG##*:} user=bench dbname=ferrite" -At -X -c "$Q"
run "curl, HTTP /api/v1/sql (CSV)" curl -s -f -H "Authorization: Bearer $TOKEN" -H 'Accept: text/csv' -d "{\"sql\": \"$Q\"}" "http://$HTTP/api/v1/sql"
run "curl, HTTP /api/v1/sql (Arrow IPC)" curl -s -f -H "Authorization: Bearer $TOKEN" -H 'Accept: application/vnd.apache.arrow.stream' -d "{\"sql\": \"$Q\"}" "http://$HTTP/api/v1/sql"

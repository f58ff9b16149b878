#!/usr/bin/env bash
# ferrite-agent's own cost and its back-fill rate, against a release `ferrite serve` on this
# machine (identity on, the agent authenticates with its token like a real device):
#
# 1. live: READINGS readings, one every 2 ms, fsync on every spool append (the default):
#    CPU per reading (user+sys of the agent process) and peak RSS, by /usr/bin/time;
# 2. back-fill: the agent buffers READINGS readings with MQTT unreachable, is stopped, then
#    started again with the server reachable and no new readings: readings/s until its
#    spool is empty (batches of 100, --backfill-rate 1000 messages/s; one message in
#    flight, each acknowledged after the server's WAL fsync).
#
#   bash benches/agent.sh [READINGS]
# Needs target/release/ferrite (cargo build --release -p ferrite) and
# firmware/target/release/ferrite-agent (cd firmware && cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
SERVER_BIN=target/release/ferrite
AGENT=firmware/target/release/ferrite-agent
for b in "$SERVER_BIN" "$AGENT"; do [ -x "$b" ] || { echo "missing $b: build it first (see the header)"; exit 1; }; done

WORK="$(mktemp -d)"
"$SERVER_BIN" serve --data-dir "$WORK/server" --http-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --pg-listen off --flight-listen off --coap-listen off --log warn > "$WORK/server.out" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do grep -q "ferrite listening" "$WORK/server.out" 2>/dev/null && break; sleep 0.1; done
LINE="$(grep "ferrite listening" "$WORK/server.out")"
HTTP="$(echo "$LINE" | sed -E 's/.*http=([^ ]+).*/\1/')"
MQTT="$(echo "$LINE" | sed -E 's/.*mqtt=([^ ]+).*/\1/')"
TOKEN="$(cat "$WORK/server/admin.token")"
register() {
    curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d "{\"id\": \"$1\"}" \
        "http://$HTTP/api/v1/devices" | python3 -c 'import json,sys; print(json.load(sys.stdin)["credentials"]["client_secret"])'
}
count() {
    curl -s -H "Authorization: Bearer $TOKEN" -d "{\"sql\": \"SELECT count(*) AS n FROM telemetry WHERE device_id = '$1'\"}" \
        "http://$HTTP/api/v1/sql" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["n"])'
}

echo "| run | readings | wall s | agent CPU s | CPU µs/reading | peak RSS MB | readings/s |"
echo "|---|---|---|---|---|---|---|"

SECRET="$(register live-1)"
/usr/bin/time -f '%e %U %S %M' -o "$WORK/time" "$AGENT" --state-dir "$WORK/live" --http "http://$HTTP" --mqtt "$MQTT" \
    --device-id live-1 --client-secret "$SECRET" --interval 2ms --readings "$N" --sensor sim:temperature --sensor sim:humidity 2> "$WORK/agent.err"
read -r wall user sys rss < "$WORK/time"
[ "$(count live-1)" = "$N" ] || { echo "live: $(count live-1) rows, want $N"; exit 1; }
python3 -c "w,u,s,r,n=$wall,$user,$sys,$rss,$N; print(f'| live, 1 reading / 2 ms, fsync each | {n} | {w:.1f} | {u+s:.2f} | {(u+s)/n*1e6:.0f} | {r/1024:.1f} | {n/w:,.0f} |')"

SECRET="$(register backfill-1)"
CLOSED="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$AGENT" --state-dir "$WORK/backfill" --http "http://$HTTP" --mqtt "127.0.0.1:$CLOSED" --http-fallback off \
    --device-id backfill-1 --client-secret "$SECRET" --interval 1ms --readings "$N" --no-sync 2>/dev/null &
AGENT_PID=$!
for _ in $(seq 1 6000); do
    python3 -c "import json,sys; s=json.load(open('$WORK/backfill/status.json')); sys.exit(0 if s['buffered'] >= $N else 1)" 2>/dev/null && break
    sleep 0.05
done
kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
/usr/bin/time -f '%e %U %S %M' -o "$WORK/time" "$AGENT" --state-dir "$WORK/backfill" --http "http://$HTTP" --mqtt "$MQTT" \
    --readings 0 --interval 10ms --batch 100 --backfill-rate 1000 2> "$WORK/agent.err"
read -r wall user sys rss < "$WORK/time"
[ "$(count backfill-1)" = "$N" ] || { echo "back-fill: $(count backfill-1) rows, want $N"; exit 1; }
python3 -c "w,u,s,r,n=$wall,$user,$sys,$rss,$N; print(f'| back-fill after a restart, batches of 100 | {n} | {w:.1f} | {u+s:.2f} | {(u+s)/n*1e6:.0f} | {r/1024:.1f} | {n/w:,.0f} |')"

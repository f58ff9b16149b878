#!/usr/bin/env bash
# One command for a newcomer: a server with an example rule, and a simulated fleet of 50 room
# sensors (ferrite-sim) publishing over MQTT as registered devices. Within a minute it
# shows telemetry in SQL, alerts raised by the rule, and the commands the rule sent to
# devices (which the simulated devices answer). Leaves the server running in the
# foreground until Ctrl-C when DEMO_KEEP=1.
#
#   bash scripts/demo.sh                 # 60 seconds of fleet, then a summary
#   DEMO_SECONDS=300 DEMO_DEVICES=500 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TO_RUN="${DEMO_SECONDS:-60}"
DEVICES="${DEMO_DEVICES:-50}"
DATA="${DEMO_DATA:-demo-data}"
HTTP_PORT="${DEMO_HTTP_PORT:-8080}"
MQTT_PORT="${DEMO_MQTT_PORT:-1883}"

log() { printf '\n==> %s\n' "$*"; }

log "building the server and the fleet simulator (debug; the first build takes a while)"
cargo build -q -p ferrite
(cd firmware && cargo build -q -p ferrite-sim)

rm -rf "$DATA"
mkdir -p "$DATA/rules"
cat > "$DATA/rules/demo.rules" <<'RULE'
# A room whose 10-second average passes 22.5 C raises an alert, and the platform asks the
# sensor to report where it is (the standard `locate` command).
rule warm_rooms {
    from telemetry[temperature is not null]
    window tumbling 10s by device_id
    select device_id, avg(temperature) as avg_temp
    having avg_temp > 22.5
    then alert severity 'warning' message '{device_id} is at {avg_temp} C'
    then command device_id 'locate' {}
}
RULE
./target/debug/ferrite rules check "$DATA/rules/demo.rules"

log "starting ferrite serve (http :$HTTP_PORT, mqtt :$MQTT_PORT, data in $DATA/)"
./target/debug/ferrite serve --data-dir "$DATA" --rules-dir "$DATA/rules" \
    --http-listen "127.0.0.1:$HTTP_PORT" --mqtt-listen "127.0.0.1:$MQTT_PORT" --log warn > "$DATA/server.out" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    grep -q "ferrite listening" "$DATA/server.out" 2>/dev/null && break
    sleep 0.1
done
grep -q "ferrite listening" "$DATA/server.out" || { echo "the server did not start"; exit 1; }

sql() {
    ./target/debug/ferrite sql --server "http://127.0.0.1:$HTTP_PORT" --data-dir "$DATA" "$1"
}

log "a fleet of $DEVICES sensors for ${SECONDS_TO_RUN}s (ferrite-sim; counters every 5 s)"
./firmware/target/debug/ferrite-sim --http "http://127.0.0.1:$HTTP_PORT" --mqtt "127.0.0.1:$MQTT_PORT" \
    --token-file "$DATA/admin.token" --devices "$DEVICES" --rate 1/s --duration "${SECONDS_TO_RUN}s" \
    --profile sensors --progress 5s &
SIM=$!

sleep 20
log "telemetry so far"
sql "SELECT count(*) AS readings, count(DISTINCT device_id) AS devices, round(avg(temperature), 2) AS avg_temp FROM telemetry"
log "alerts the rule raised"
sql "SELECT time, device_id, severity, message FROM alerts ORDER BY time DESC LIMIT 5"
log "commands the rule sent, and the devices' answers"
sql "SELECT time, device_id, name, status FROM commands ORDER BY time DESC LIMIT 5"

wait $SIM
log "at the end"
sql "SELECT count(*) AS readings FROM telemetry"
sql "SELECT status, count(*) AS n FROM commands GROUP BY status ORDER BY status"
echo
echo "The server's token is in $DATA/admin.token; try: ./target/debug/ferrite sql --server http://127.0.0.1:$HTTP_PORT --data-dir $DATA \"SELECT * FROM last_values('telemetry') LIMIT 5\""
if [ "${DEMO_KEEP:-0}" = 1 ]; then
    log "the server keeps running; Ctrl-C stops it"
    wait $SERVER
fi

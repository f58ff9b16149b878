#!/usr/bin/env bash
# ferrite-sim's capacity against the benchmarks' own MQTT load generator (mqtt_load), both
# publishing QoS 1 to the same mosquitto on this machine, both measured the same way by
# /usr/bin/time (wall time, user+sys CPU, peak RSS of the load process).
#
# Not the same work: ferrite-sim paces each device (a timer per device, a reading made from
# its own signal, an offline buffer, ~110-byte `sensors` readings); mqtt_load publishes a
# fixed ~70-byte message in a tight loop. Run 1 asks both for the same connections and
# messages (ferrite-sim at its rate, mqtt_load as fast as it can); run 2 saturates both.
#
#   bash benches/sim_capacity.sh [DEVICES] [RATE_PER_DEVICE] [SECONDS]
# Needs: target/release/mqtt_load (cargo build --release -p ferrite-benches --bins),
# firmware/target/release/ferrite-sim (cd firmware && cargo build --release), mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES="${1:-10000}"
RATE="${2:-1}"
SECS="${3:-30}"
SIM=firmware/target/release/ferrite-sim
PEER=target/release/mqtt_load
for b in "$SIM" "$PEER"; do [ -x "$b" ] || { echo "missing $b: build it first (see the header)"; exit 1; }; done
command -v mosquitto >/dev/null || { echo "mosquitto is not installed"; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat > "$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
max_connections -1
max_queued_messages 0
persistence false
log_dest none
CONF
mosquitto -c "$WORK/mosquitto.conf" &
BROKER=$!
trap 'kill $BROKER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 50); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

measure() { /usr/bin/time -f '%e %U %S %M' -o "$WORK/time" "$@" > "$WORK/out"; }
row() { # tool connections messages msgs_per_s
    read -r wall user sys rss < "$WORK/time"
    python3 - "$@" "$wall" "$user" "$sys" "$rss" <<'PY'
import sys
tool, conns, msgs, rate, wall, user, sys_, rss = sys.argv[1:9]
cpu = float(user) + float(sys_)
print(f"| {tool} | {conns} | {int(float(msgs))} | {float(rate):,.0f} | {float(wall):.1f} | {cpu:.1f} | {cpu / float(msgs) * 1e6:.1f} | {int(rss) / 1024:.0f} |")
PY
}
json() { python3 -c "import json,sys; print(json.load(open('$WORK/out'))['$1'])"; }

echo "| tool | connections | messages | msgs/s | wall s | CPU s | CPU µs/msg | peak RSS MB |"
echo "|---|---|---|---|---|---|---|---|"
measure "$SIM" --no-provision --mqtt "127.0.0.1:$PORT" --devices "$DEVICES" --rate "$RATE/s" --duration "${SECS}s" \
    --profile sensors --summary-json --progress 0 --connect-rate 5000
echo "sim_peak_connected=$(json connected_peak) acknowledged=$(json acknowledged)" >&2
row "ferrite-sim ($RATE/s each for ${SECS}s)" "$(json connected_peak)" "$(json acknowledged)" "$(json acknowledged_per_sec)"
measure "$PEER" "$PORT" "$DEVICES" "$((RATE * SECS))"
row "mqtt_load (same messages, unpaced)" "$DEVICES" "$(json messages)" "$(json msgs_per_s)"
# Saturation: 1,000 connections, as fast as each tool goes.
measure "$SIM" --no-provision --mqtt "127.0.0.1:$PORT" --devices 1000 --rate 1000/s --duration 10s \
    --profile sensors --summary-json --progress 0 --connect-rate 5000 --drain 60s
row "ferrite-sim (saturated, 10s)" "$(json connected_peak)" "$(json acknowledged)" "$(python3 -c "import json; s=json.load(open('$WORK/out')); print(s['acknowledged']/s['elapsed_secs'])")"
measure "$PEER" "$PORT" 1000 300
row "mqtt_load (saturated)" 1000 "$(json messages)" "$(json msgs_per_s)"

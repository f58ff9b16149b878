#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (idempotently), then
# gates formatting, lints and docs, and runs every unit, integration and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Real peers the tests talk to: the mosquitto CLI clients; DuckDB, pyarrow and polars for the
# archive interop check; psql (with PostgreSQL below) and psycopg for the PostgreSQL wire;
# ADBC's Flight SQL driver for Flight SQL; libcoap's coap-client for CoAP.
if ! command -v mosquitto_pub >/dev/null 2>&1; then
    log "installing mosquitto-clients"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto-clients >/dev/null
fi
if ! command -v curl >/dev/null 2>&1; then
    log "installing curl (the HTTPS test's client)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl >/dev/null
fi
if ! command -v openssl >/dev/null 2>&1; then
    log "installing openssl (certificates for the TLS tests)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
fi
if ! command -v coap-client-notls >/dev/null 2>&1; then
    log "installing libcoap3-bin (coap-client, the CoAP tests' client)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libcoap3-bin >/dev/null
fi
if ! python3 -c 'import duckdb, pyarrow, polars' >/dev/null 2>&1; then
    log "installing duckdb, pyarrow and polars (Python) for the interop check"
    python3 -m pip install --quiet --disable-pip-version-check duckdb pyarrow polars
fi

if ! python3 -c 'import psycopg' >/dev/null 2>&1; then
    log "installing psycopg (Python) for the PostgreSQL wire protocol test"
    python3 -m pip install --quiet --disable-pip-version-check 'psycopg[binary]'
fi

if ! python3 -c 'import adbc_driver_flightsql.dbapi' >/dev/null 2>&1; then
    log "installing the ADBC Flight SQL driver (Python) for the Flight SQL test"
    python3 -m pip install --quiet --disable-pip-version-check adbc-driver-flightsql adbc-driver-manager
fi

if ! python3 -c 'import paho.mqtt.client as m; m.CallbackAPIVersion' >/dev/null 2>&1; then
    log "installing paho-mqtt (Python) for the MQTT over WebSocket test"
    python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=2'
fi

# pysparkplug needs paho-mqtt 1.x, the MQTT 5 tests paho-mqtt 2: it lives in a virtual
# environment of its own under target/ (the Sparkplug test runs that interpreter).
if ! target/py-sparkplug/bin/python -c 'import pysparkplug' >/dev/null 2>&1; then
    log "installing pysparkplug (Python, in target/py-sparkplug) for the Sparkplug B test"
    mkdir -p target
    python3 -m venv target/py-sparkplug
    target/py-sparkplug/bin/pip install --quiet --disable-pip-version-check pysparkplug
fi

if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
    log "installing moto[server] (a local S3-compatible server) for the s3:// archive test"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi

# A real PostgreSQL for the identity store's tests: the distribution's server, started as
# an unprivileged user in a temporary directory on a free port, stopped on exit.
find_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(find_pg_bin)" ] && ! command -v initdb >/dev/null 2>&1; then
    log "installing postgresql"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null || true
fi
PG_BIN="$(find_pg_bin)"
if [ -n "$PG_BIN" ] || command -v initdb >/dev/null 2>&1; then
    INITDB="${PG_BIN:+$PG_BIN/}initdb"; PG_CTL="${PG_BIN:+$PG_BIN/}pg_ctl"
    PG_DIR="$(mktemp -d /tmp/ferrite-pg.XXXXXX)"
    PG_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    if [ "$(id -u)" = 0 ]; then
        id ferrite-pg >/dev/null 2>&1 || useradd --system --no-create-home ferrite-pg 2>/dev/null || true
        chown ferrite-pg "$PG_DIR"; AS="runuser -u ferrite-pg --"
    else
        AS=""
    fi
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
    $AS "$INITDB" -D "$PG_DIR/data" -U ferrite --auth=trust >/dev/null
    $AS "$PG_CTL" -D "$PG_DIR/data" -l "$PG_DIR/log" -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" -w start >/dev/null
    trap '$AS "$PG_CTL" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$PG_DIR"' EXIT
    export FERRITE_TEST_POSTGRES_URL="postgres://ferrite@127.0.0.1:$PG_PORT/postgres"
else
    log "PostgreSQL cannot be installed here: the identity store's PostgreSQL test will say it skipped"
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

log "cargo test"
cargo test --workspace

# firmware/ is its own workspace (kept out of the server's dependency graph).
log "firmware: fmt, clippy, tests"
(cd firmware && cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings && cargo test --workspace)

log "firmware: the no_std core for a microcontroller (thumbv7em-none-eabihf)"
if ! rustup target list --installed 2>/dev/null | grep -qx thumbv7em-none-eabihf; then
    rustup target add thumbv7em-none-eabihf || true
fi
if rustup target list --installed 2>/dev/null | grep -qx thumbv7em-none-eabihf; then
    # The core alone, and linked into a bare image (allocator, panic handler, every path kept).
    (cd firmware && cargo build -p ferrite-agent-core --target thumbv7em-none-eabihf --release \
        && cargo build -p ferrite-agent-size-probe --target thumbv7em-none-eabihf --release)
else
    echo "SKIPPED: the thumbv7em-none-eabihf target cannot be installed here (rustup has no network); the no_std build was not checked"
fi

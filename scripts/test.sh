#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (idempotently), then
# gates formatting, lints and docs, and runs every unit, integration and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Real peers the tests talk to: the mosquitto CLI clients, and DuckDB, pyarrow and polars
# for the archive interop check.
if ! command -v mosquitto_pub >/dev/null 2>&1; then
    log "installing mosquitto-clients"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto-clients >/dev/null
fi
if ! python3 -c 'import duckdb, pyarrow, polars' >/dev/null 2>&1; then
    log "installing duckdb, pyarrow and polars (Python) for the interop check"
    python3 -m pip install --quiet --disable-pip-version-check duckdb pyarrow polars
fi

if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
    log "installing moto[server] (a local S3-compatible server) for the s3:// archive test"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

log "cargo test"
cargo test --workspace

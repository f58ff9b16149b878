#!/usr/bin/env bash
# The long crash loop, run before a release: 20 SIGKILLs at random moments of a mixed load
# (HTTP and MQTT QoS 1 ingest, a windowed rule into a derived stream, persists with rule
# checkpoints and compactions, SQL queries), then the checks of tests/it/crash_loop.rs:
# every acknowledged event once, the derived stream equal to a clean run's.
#
#   bash scripts/crash_loop.sh [KILLS] [RUNS]
#
# KILLS (default 20) per run, RUNS (default 1) runs with fresh random kill moments; a failing
# run prints its FERRITE_CRASH_SEED, which replays its kill moments.
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-20}"
runs="${2:-1}"
for run in $(seq 1 "$runs"); do
    echo "==> crash loop run $run of $runs: $kills kills"
    FERRITE_CRASH_KILLS="$kills" cargo test --test it -- --exact \
        crash_loop::a_crash_loop_under_mixed_load_loses_and_duplicates_nothing_and_rules_match_a_clean_run \
        --nocapture
done

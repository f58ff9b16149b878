#!/usr/bin/env bash
# The soak of docs/operations.md: `minutes` (default 30) at `rate` events/s (default 100000)
# with a windowed rule, persists and compactions; prints every sample and a summary, and
# plots memory, archive files and latency to benches/soak.png.
# Needs a release build (it makes one) and matplotlib (pip install matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-30}"
RATE="${2:-100000}"
cargo build --release -p ferrite -p ferrite-benches --bin ferrite --bin soak
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check matplotlib
./target/release/soak "$MINUTES" "$RATE" 10 /tmp/ferrite-soak.csv | tee /tmp/ferrite-soak.txt
python3 benches/soak_plot.py /tmp/ferrite-soak.csv benches/soak.png
echo "plot: benches/soak.png"

"""Plots a soak's samples (the CSV `soak` writes): resident memory, archive files and
request latency over time, as one PNG. Needs matplotlib (pip install matplotlib).

python3 benches/soak_plot.py /tmp/ferrite-soak.csv benches/soak.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    minutes = [float(r["t_s"]) / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(minutes, [float(r["rss_mib"]) for r in rows], color="tab:blue")
    axes[0].set_ylabel("resident memory (MiB)")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(minutes, [int(r["files"]) for r in rows], color="tab:green")
    axes[1].set_ylabel("archive files")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(minutes, [float(r["p99_ms"]) for r in rows], label="p99", color="tab:red")
    axes[2].plot(minutes, [float(r["p50_ms"]) for r in rows], label="p50", color="tab:orange")
    axes[2].set_ylabel("request latency (ms)")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(loc="upper right")
    axes[2].set_xlabel("minutes")
    eps = sorted(float(r["events_per_s"]) for r in rows)
    fig.suptitle(f"Ferrite soak: {eps[len(eps) // 2]:,.0f} events/s over HTTP, a windowed rule, persists and compactions")
    fig.tight_layout()
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Bar charts of a training benchmark: real tokens/s and peak memory per recipe.

    python bench/plot_bench.py bench/results/cpu_tiny_rows2.json [-o OUT.png]

Reads the JSON that `bench_training.py --json` writes (also called by `bench_training.py --plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def plot_bench(report: dict, path: str) -> str:
    """Two panels side by side, one bar per recipe; the seed recipe's bars grey, ours blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if "skipped" not in r]
    if not results:
        raise ValueError("no measured recipe to plot")
    names = [r["recipe"] for r in results][::-1]  # first recipe on top
    colors = ["#9e9e9e" if name.startswith("seed") else "#1f77b4" for name in names]
    base = next((r["tokens_per_s"] for r in results if r["recipe"].startswith("seed") and r["rows"] == 1), None)
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.6), sharey=True)
    tokens = [r["tokens_per_s"] for r in results][::-1]
    speed.barh(names, tokens, color=colors)
    for y, value in enumerate(tokens):
        speed.text(value, y, f" {value:,.0f}" + (f" ({value / base:.1f}x)" if base else ""), va="center", fontsize=8)
    speed.set_xlabel("real tokens/s (padding not counted)")
    speed.set_xlim(0, max(tokens) * 1.3)
    peaks = [r["peak_mib"] / 1024 for r in results][::-1]
    memory.barh(names, peaks, color=colors)
    for y, value in enumerate(peaks):
        memory.text(value, y, f" {value:,.1f}", va="center", fontsize=8)
    on_cpu = report.get("args", {}).get("device") == "cpu"
    memory.set_xlabel("peak memory, GiB" + (" (resident set growth)" if on_cpu else ""))
    memory.set_xlim(0, max(peaks) * 1.2)
    env = report.get("environment", {})
    figure.suptitle(f"{env.get('device', '')}, model {report.get('args', {}).get('model', '')}, "
                    f"torch {env.get('torch', '')}, {env.get('date', '')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="results of bench_training.py --json")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: the JSON's name with .png)")
    args = parser.parse_args(argv)
    try:
        with open(args.json, encoding="utf-8") as f:
            report = json.load(f)
        path = plot_bench(report, args.output or os.path.splitext(args.json)[0] + ".png")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.json}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

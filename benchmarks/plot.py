"""A PNG of a bench_loss JSON: median time and extra peak memory per case, one column per dtype.

python -m benchmarks.plot benchmarks/results/bench_loss-<device>-<date>.json [--out plot.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import _util


def plot_results(json_path: Path, png_path: Path | None = None) -> Path | None:
    """Write the PNG (default: the JSON's path with .png); None when matplotlib is missing."""
    plt = _util.pyplot()
    if plt is None:
        return None
    payload = json.loads(Path(json_path).read_text())
    rows = payload["cases"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    metrics = (
        ("median_ms", "median forward+backward (ms)", 1.0),
        ("peak_extra_bytes", "extra peak memory (MiB)", 2**20),
    )
    fig, axes = plt.subplots(len(metrics), len(dtypes), figsize=(6 * len(dtypes), 7), squeeze=False)
    width = 0.8 / len(cases)
    for col, dtype in enumerate(dtypes):
        shapes = list(dict.fromkeys((r["n"], r["vocab"]) for r in rows if r["dtype"] == dtype))
        by_key = {(r["n"], r["vocab"], r["case"]): r for r in rows if r["dtype"] == dtype}
        for row, (field, label, unit) in enumerate(metrics):
            ax = axes[row][col]
            for i, case in enumerate(cases):
                # Skipped or out-of-memory cases leave a gap rather than a misleading zero bar.
                values = [by_key.get((n, v, case), {}).get(field) for n, v in shapes]
                xs = [k + (i - (len(cases) - 1) / 2) * width for k, value in enumerate(values) if value is not None]
                ax.bar(xs, [value / unit for value in values if value is not None], width, label=case)
            ax.set_xticks(range(len(shapes)), [f"N={n}\nV={v}" for n, v in shapes], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"{dtype}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    png_path = Path(png_path) if png_path else Path(json_path).with_suffix(".png")
    title = f"NLFT loss, forward+backward: {payload['device']} ({payload['date'][:10]})"
    return _util.save_figure(fig, png_path, title)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default: the JSON's with .png)")
    args = p.parse_args(argv)
    png = plot_results(args.json, args.out)
    print(f"wrote {png}" if png else "matplotlib is not installed: pip install matplotlib (the [bench] extra)")


if __name__ == "__main__":
    main()

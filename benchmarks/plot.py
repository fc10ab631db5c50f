"""Speed-up plots from a benchmark JSONL file (``benchmarks.run --out``).

``python -m benchmarks.plot results/bench.jsonl [--out-dir results/plots]`` draws, for attention
pooling, the speed-up of each provider over the eager reference

* against the sequence length T (at the most common B and D of the file), and
* against the embedding size D (at the most common B and T),

one PNG per (mode, dtype, device, activation, lengths): rows of other activations or of other
valid lengths (``--lengths uniform``) are never set against each other. When a file holds several
runs of the same row, the latest wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {"compile": "tab:orange", "torch": "tab:blue", "triton": "tab:green"}


def load_rows(path: str) -> List[dict]:
    """The ``ok`` rows of a JSONL file, the last measurement of each (op, provider, mode, shape,
    dtype, activation, device) kept."""
    latest: Dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("status") != "ok" or "shape_dict" not in row:
            continue
        key = (row["op"], row["provider"], row["mode"], row["shape"], row["dtype"], row.get("activation"),
               row["device_name"])
        latest[key] = row
    return list(latest.values())


def speedup_series(rows: Sequence[dict], sweep: str, fixed: Dict[str, int]) -> Dict[str, List[tuple]]:
    """``{provider: [(x, reference_ms / provider_ms), ...]}`` over ``sweep`` with the other shape
    keys held at ``fixed``."""
    def matches(row):
        return all(row["shape_dict"].get(k) == v for k, v in fixed.items())
    reference = {r["shape_dict"][sweep]: r["median_ms"] for r in rows if r["provider"] == "reference" and matches(r)}
    series: Dict[str, List[tuple]] = {}
    for row in rows:
        x = row["shape_dict"].get(sweep)
        if row["provider"] == "reference" or not matches(row) or x not in reference:
            continue
        series.setdefault(row["provider"], []).append((x, reference[x] / row["median_ms"]))
    return {p: sorted(points) for p, points in series.items()}


def _most_common(rows: Sequence[dict], key: str) -> Optional[int]:
    counts = Counter(r["shape_dict"].get(key) for r in rows)
    return counts.most_common(1)[0][0] if counts else None


def plot_file(path: str, out_dir: str) -> List[Path]:
    """Writes the PNGs of the attention rows (other ops are not plotted): per (mode, dtype,
    device, activation, lengths), one against T and one against D, each only where some provider
    has two or more points; returns their paths."""
    rows = [r for r in load_rows(path) if r["op"] == "attention"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def variant(row):
        return (row["mode"], row["dtype"], row["device_name"], row.get("activation") or "sigmoid",
                row["shape_dict"].get("lengths", "full"))

    for mode, dtype, device, activation, lengths in sorted({variant(r) for r in rows}):
        subset = [r for r in rows if variant(r) == (mode, dtype, device, activation, lengths)]
        options = "" if (activation, lengths) == ("sigmoid", "full") else f", {activation}, lengths {lengths}"
        for sweep, others, label in (("T", ("B", "D"), "sequence length T"), ("D", ("B", "T"), "embedding size D")):
            fixed = {k: _most_common(subset, k) for k in others}
            series = speedup_series(subset, sweep, fixed)
            if not any(len(points) >= 2 for points in series.values()):
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider, points in sorted(series.items()):
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=provider, color=_COLORS.get(provider))
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_xticks(sorted({x for points in series.values() for x, _ in points}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylabel("speed-up over eager reference")
            held = ", ".join(f"{k}={v}" for k, v in fixed.items())
            ax.set_title(f"attention {mode}, {dtype}{options}, {held}\n{device}", fontsize=9)
            ax.legend()
            fig.tight_layout()
            slug = f"attention_{mode.replace('+', '_')}_{dtype}{_slug(options)}_vs_{sweep}_{_slug(device)}.png"
            fig.savefig(out / slug, dpi=120)
            plt.close(fig)
            written.append(out / slug)
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:40]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    parser.add_argument("jsonl", nargs="?", default="results/bench.jsonl")
    parser.add_argument("--out-dir", default="results/plots")
    args = parser.parse_args(argv)
    written = plot_file(args.jsonl, args.out_dir)
    for path in written:
        print(path)
    if not written:
        print("no attention sweep with two or more points in", args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())

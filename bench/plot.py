"""PNG plots drawn from benchmark CSVs (or run.py's rows):

    <prefix>_throughput_vs_tokens.png   tokens/s vs ids per batch, one panel per mode
    <prefix>_train_time_vs_vocab.png    training-step time vs vocabulary size
    <prefix>_speedup_vs_eager.png       eager reference time / DeFINE provider time, per mode

    python -m bench.plot bench/results/A.csv [B.csv ...] [--out DIR]

A plot whose data the CSVs lack still gets written, saying so, so a run always leaves all three.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import read_csv  # noqa: E402

MODE_ORDER = ("forward", "forward_backward", "train", "inference")


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _series(rows: Iterable[dict], metric: str, x_field: str, mode: str) -> Dict[str, List[tuple]]:
    """{label: sorted [(x, value)]} for one metric and mode; label = provider (+ workload)."""
    selected = [r for r in rows if r["metric"] == metric and r["mode"] == mode
                and _num(r[x_field]) is not None and _num(r["value"]) is not None]
    workloads = {r["workload"].split("-V")[0] for r in selected}
    series = defaultdict(dict)
    for r in selected:
        label = r["provider"] if len(workloads) <= 1 else f"{r['provider']} ({r['workload'].split('-V')[0]})"
        series[label][_num(r[x_field])] = _num(r["value"])
    return {label: sorted(points.items()) for label, points in series.items()}


def _color(label: str, labels: List[str]):
    """One color per provider across every panel of a figure."""
    return plt.cm.tab20.colors[sorted(labels).index(label) % 20]


def _modes(rows) -> List[str]:
    present = {r["mode"] for r in rows}
    return [m for m in MODE_ORDER if m in present] or ["train"]


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(rows) -> str:
    devices = sorted({r["device"] for r in rows if r.get("device")})
    dtypes = sorted({r["dtype"] for r in rows if r.get("dtype") and r["provider"] != "dense-matmul"})
    return f"{', '.join(devices)} · {', '.join(dtypes)}"


def _only_largest(rows, field: str):
    """Rows at the largest value of `field` (a sweep over the other axis stays one line each)."""
    values = [_num(r.get(field)) for r in rows if r["metric"] == "time" and _num(r.get(field)) is not None]
    if not values:
        return rows, None
    top = max(values)
    return [r for r in rows if _num(r.get(field)) in (None, top)], int(top)


def plot_throughput(rows, path: Path) -> Path:
    rows, vocab = _only_largest(rows, "vocab_size")
    modes = _modes(rows)
    columns = min(len(modes), 2)
    lines = -(-len(modes) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6.5 * columns, 4.5 * lines), squeeze=False)
    for ax in axes.flat[len(modes):]:
        ax.set_visible(False)
    labels = sorted({label for mode in modes for label in _series(rows, "tokens_per_s", "tokens", mode)})
    for ax, mode in zip(axes.flat, modes):
        series = _series(rows, "tokens_per_s", "tokens", mode)
        for label, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                    color=_color(label, labels))
        if series:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            _empty(ax, "no tokens/s rows")
        ax.set(title=mode, xlabel="ids per batch", ylabel="tokens / s")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Throughput vs batch size ({_title(rows)}, vocabulary {vocab})")
    return _save(fig, path)


def plot_train_vs_vocab(rows, path: Path) -> Path:
    rows, tokens = _only_largest(rows, "tokens")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    series = _series(rows, "time", "vocab_size", "train")
    for label, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if series:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        _empty(ax, "no training-step rows")
    ax.set(title=f"Training step vs vocabulary ({_title(rows)}, {tokens} ids)", xlabel="vocabulary size",
           ylabel="ms per step (median)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_speedup(rows, path: Path) -> Path:
    # DeFINE providers only: the baselines' ratios dwarf the backends' and say nothing of them.
    selected = [r for r in rows if r["metric"] == "time_vs_eager" and _num(r["value"])
                and r["provider"].startswith("define")]
    workloads = sorted({r["workload"] for r in selected}) or [""]
    fig, axes = plt.subplots(len(workloads), 1, figsize=(9, 3.5 * len(workloads)), squeeze=False)
    for ax, workload in zip(axes[:, 0], workloads):
        mine = [r for r in selected if r["workload"] == workload]
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in mine)]
        names = sorted({r["provider"] for r in mine})
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = {r["mode"]: 1 / _num(r["value"]) for r in mine if r["provider"] == name}
            ax.bar([m + i * width for m in range(len(modes))], [values.get(m, float("nan")) for m in modes],
                   width, label=name)
        if mine:
            ax.set_xticks([m + 0.4 - width / 2 for m in range(len(modes))], modes)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2)
        else:
            _empty(ax, "no rows with the eager reference")
        ax.set(title=f"Speed-up over the eager reference · {workload}", ylabel="× (higher is faster)")
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_all(rows, out_dir: Path, prefix: str = "bench") -> List[Path]:
    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_throughput(rows, out_dir / f"{prefix}_throughput_vs_tokens.png"),
            plot_train_vs_vocab(rows, out_dir / f"{prefix}_train_time_vs_vocab.png"),
            plot_speedup(rows, out_dir / f"{prefix}_speedup_vs_eager.png")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the first CSV's)")
    parser.add_argument("--prefix", default=None, help="file name prefix (default: the first CSV's stem)")
    args = parser.parse_args(argv)
    rows = read_csv(args.csv)
    for path in plot_all(rows, args.out or args.csv[0].parent, args.prefix or args.csv[0].stem):
        print(path)


if __name__ == "__main__":
    main()

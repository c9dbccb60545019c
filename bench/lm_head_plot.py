"""The PNG of `python -m bench.lm_head` (and of make bench's whole-model comparison): per section
(part · workload · T) a row with two panels, median time and peak memory above the process's
start, one bar per variant and dtype (fp32 solid, bf16 hatched), log scale; a case that did not
run is named at its place (does not fit / unavailable / error).

    python -m bench.lm_head_plot bench/results/<...>_lm-head.csv [--out X.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .lm_head_cases import VARIANTS  # noqa: E402
from .report import read_csv  # noqa: E402

ORDER = [v for part in ("head", "step") for v in VARIANTS[part]]
# One colour per variant in every figure; baselines grey, fused ones strong.
COLORS = {"unfused": "#7f7f7f", "fused": "#d62728", "fused-reference": "#ff9896", "chunked": "#1f77b4",
          "adaptive": "#2ca02c", "unfused-augmented": "#8c564b", "fused-augmented": "#9467bd",
          "fused-augmented-reference": "#c5b0d5", "step-embedding": "#7f7f7f",
          "step-define-fused": "#d62728", "step-define-reference": "#ff9896"}
DTYPES = ("float32", "bfloat16")
HATCH = {"float32": "", "bfloat16": "///"}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16 autocast"}
STATUS = ("skipped", "unavailable", "error")


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _sections(rows: List[dict]) -> Dict[tuple, Dict[tuple, dict]]:
    """(mode, workload, vocab, tokens) -> (variant, dtype) -> {metric: row}."""
    sections: Dict[tuple, Dict[tuple, dict]] = {}
    for row in rows:
        if row["provider"] == "goal" or row["metric"] not in ("time", "peak_memory", "estimated_memory") + STATUS:
            continue
        key = (row["mode"], row["workload"], row["vocab_size"], int(_num(row["tokens"])))
        sections.setdefault(key, {}).setdefault((row["provider"], row["dtype"]), {})[row["metric"]] = row
    return dict(sorted(sections.items(), key=lambda kv: (kv[0][0], _num(kv[0][2]) or 0, kv[0][3])))


def _status_text(cell: dict) -> str:
    for status in STATUS:
        if status in cell:
            if status == "skipped":
                need = _num(cell.get("estimated_memory", {}).get("value"))
                return f"does not fit (needs ~{need / 1024:.1f} GB)" if need else "does not fit"
            return status
    return "not measured"


def _tidy(ax) -> None:
    """Plain-number labels on a log axis (1, 2, 5, 10, 20 ...; powers of ten alone when the axis
    spans more than three decades, where 1-2-5 labels run into each other), none on minor ticks."""
    low, high = ax.get_xlim()
    subs = (1.0, 2.0, 5.0) if high / low <= 1e3 else (1.0,)
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.10g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def figure(rows: List[dict]):
    sections = _sections(rows)
    heights = [max(len({v for v, _ in cells}), 1) * 0.5 + 1.1 for cells in sections.values()] or [2.0]
    fig, axes = plt.subplots(len(heights), 2, figsize=(14, sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    if not sections:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no measured cases", ha="center", va="center", transform=ax.transAxes)
    for axes_row, ((mode, workload, vocab, tokens), cells) in zip(axes, sections.items()):
        variants = [v for v in ORDER if any((v, d) in cells for d in DTYPES)]
        variants += sorted({v for v, _ in cells} - set(variants))
        for ax, metric, unit in ((axes_row[0], "time", f"ms per {mode}, median (log scale; lower is better)"),
                                 (axes_row[1], "peak_memory", "MB, peak RSS above the process's start, median "
                                                              "(log scale; lower is better)")):
            values = [v for v in (_num(c.get(metric, {}).get("value")) for c in cells.values()) if v]
            for i, variant in enumerate(variants):
                for j, dtype in enumerate(DTYPES):
                    y = len(variants) - 1 - i + (0.2 if j == 0 else -0.2)
                    cell = cells.get((variant, dtype))
                    if cell is None:
                        continue
                    value = _num(cell.get(metric, {}).get("value"))
                    if value:
                        ax.barh(y, value, height=0.38, color=COLORS.get(variant, "#17becf"), hatch=HATCH[dtype],
                                edgecolor="white" if dtype == "float32" else "black", linewidth=0.4)
                        ax.text(value, y, f" {value:,.0f}" if value >= 1000 else f" {value:.3g}", va="center",
                                fontsize=6.5)
                    else:  # at the axis's left edge, whatever the scale
                        ax.text(0.01, y, f"{_DTYPE_NAMES[dtype]}: {_status_text(cell)}", va="center",
                                fontsize=6.5, color="#b00000", transform=ax.get_yaxis_transform())
            ax.set_xscale("log")
            if values:
                ax.set_xlim(min(values) / 3, max(values) * 6)
                _tidy(ax)
            else:  # nothing ran in this section: no scale to show
                ax.set_xticks([])
            ax.set_yticks(range(len(variants))[::-1], variants, fontsize=8)
            ax.set_ylim(-0.7, len(variants) - 0.3)
            ax.set_xlabel(unit, fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(alpha=0.3, axis="x")
        vocab_text = f"V={int(_num(vocab)):,}" if _num(vocab) else ""
        axes_row[0].set_title(f"{mode} · {workload} ({vocab_text}) · T={tokens:,} · time", fontsize=9)
        axes_row[1].set_title(f"{mode} · {workload} ({vocab_text}) · T={tokens:,} · peak memory", fontsize=9)
    context = {(r.get("device", ""), r.get("commit", "")) for r in rows if r.get("device")}
    device, commit = next(iter(context)) if context else ("", "")
    fig.suptitle(f"Tied LM head and LM training step: time and peak memory per variant\n{device} · commit {commit} · "
                 "fp32 solid, bf16 autocast hatched", fontsize=11)
    handles = [Patch(facecolor="#bbbbbb", hatch=HATCH[d], edgecolor="black" if d == "bfloat16" else "white",
                     label=_DTYPE_NAMES[d]) for d in DTYPES]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


def plot(rows: List[dict], path: Path) -> Path:
    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    fig = figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_head_plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: the first CSV's, .png)")
    args = parser.parse_args(argv)
    print(plot(read_csv(args.csv), args.out or args.csv[0].with_suffix(".png")))


if __name__ == "__main__":
    main()

"""The headline CPU plot, drawn from `python -m bench.cpu_goals` CSVs:

    python -m bench.plot_goals bench/results/A_cpu-goals_C.csv [B.csv ...] --machine "2-core ..." \
        [--out bench/results/cpu-goals_C.png]

Four panels (fp32 forward, fp32 forward+backward, bf16 forward+backward, training step), one
horizontal bar per case: the median ms of the last CSV given, its p20-p80 as a whisker, and the
medians of the other CSVs (repeat runs of the same code) as dots. Each panel's title gives its goal
as the last CSV records it. Colours are fixed per implementation, whatever the panel holds.
The CSVs do not record the CPU model, so `--machine` names it.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (case in the CSV, label on the plot, implementation); implementations give the colours.
PANELS = [
    ("fp32 forward (no grad)", [("goal: cpu_cpp fp32 fwd / plain eager fwd", "cpu_cpp / plain stack")], [
        ("plain-eager fwd", "plain PyTorch stack", "plain"),
        ("cpu_cpp-save fwd", "DeFINE cpu_cpp", "cpu_cpp"),
    ]),
    ("fp32 forward + backward", [("goal: cpu_cpp fp32 fwd+bwd / best plain", "cpu_cpp / faster plain stack")], [
        ("plain-eager fwd+bwd", "plain PyTorch stack", "plain"),
        ("plain-compile fwd+bwd", "plain stack, torch.compile", "compile"),
        ("torch-save fwd+bwd", "DeFINE reference (torch)", "reference"),
        ("cpu_cpp-save fwd+bwd", "DeFINE cpu_cpp", "cpu_cpp"),
    ]),
    ("bf16 forward + backward", [("goal: cpu_cpp bf16 module fwd+bwd / fp32", "cpu_cpp bf16 weights / cpu_cpp fp32"),
                                 ("goal: cpu_cpp autocast fwd+bwd / fp32", "autocast / cpu_cpp fp32")], [
        ("plain-eager bf16 fwd+bwd", "plain PyTorch stack, bf16", "plain"),
        ("torch bf16 fwd+bwd", "DeFINE reference (torch), bf16", "reference"),
        ("cpu_cpp-save bf16 fwd+bwd", "DeFINE cpu_cpp, bf16 weights", "cpu_cpp"),
        ("cpu_cpp-save autocast fwd+bwd", "DeFINE cpu_cpp, fp32 weights + bf16 autocast", "cpu_cpp"),
    ]),
    ("training step (forward, backward, optimizer)",
     [("goal: best DeFINE train fp32 / embedding fp32", "best DeFINE / nn.Embedding, fp32"),
      ("goal: best DeFINE train autocast / best embedding", "best DeFINE / faster nn.Embedding, autocast")], [
        ("embedding train fp32", "nn.Embedding + fused AdamW", "embedding"),
        ("embedding train autocast", "nn.Embedding + fused AdamW, bf16 autocast", "embedding"),
        ("cpu_cpp train fp32", "DeFINE cpu_cpp + fused AdamW", "cpu_cpp"),
        ("cpu_cpp-sparse train fp32", "DeFINE cpu_cpp sparse + SparseAdam", "cpu_cpp"),
        ("cpu_cpp train autocast", "DeFINE cpu_cpp + fused AdamW, bf16 autocast", "cpu_cpp"),
        ("cpu_cpp-sparse train autocast", "DeFINE cpu_cpp sparse + SparseAdam, bf16 autocast", "cpu_cpp"),
    ]),
]

COLORS = {"embedding": "#4d4d4d", "plain": "#9e9e9e", "compile": "#8e6bbf", "reference": "#e69f00",
          "cpu_cpp": "#0072b2"}
NAMES = {"embedding": "nn.Embedding", "plain": "plain PyTorch stack (eager)", "compile": "plain stack, torch.compile",
         "reference": "DeFINE, reference backend", "cpu_cpp": "DeFINE, cpu_cpp backend"}


def read_goals_csv(path: Path) -> Dict[str, dict]:
    """case -> row of one cpu_goals CSV."""
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _float(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def goal_text(run: Dict[str, dict], prefix: str, description: str) -> str:
    """'cpu_cpp / plain stack 0.85x (goal <= 0.90x, under it in 19/25 rounds)' from the goal row
    whose case starts with prefix; '' when the run has no such row."""
    for case, row in run.items():
        if case.startswith(prefix):
            goal = case.rsplit("<=", 1)[-1].strip(" )")
            return (f"{description} {float(row['median_ms']):.2f}x (goal <= {goal}x; under it in "
                    f"{row['rounds_under_goal']} rounds)")
    return ""


def figure_goals(runs: List[Dict[str, dict]], machine: str):
    """The figure; runs in order, the last one drawn as bars."""
    main = runs[-1]
    any_row = next(iter(main.values()))
    heights = [len(cases) + 0.4 * len(goals) for _, goals, cases in PANELS]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9.0, 1.0 + 0.52 * sum(heights) + 0.7 * len(PANELS)),
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, goals, cases) in zip(axes, PANELS):
        present = [c for c in cases if c[0] in main]
        ys = list(range(len(present)))[::-1]
        right = max(max(_float(main[c][k]) or 0 for k in ("median_ms", "p80_ms")) for c, _, _ in present)
        for y, (case, label, kind) in zip(ys, present):
            row = main[case]
            median, p20, p80 = (_float(row[k]) for k in ("median_ms", "p20_ms", "p80_ms"))
            ax.barh(y, median, color=COLORS[kind], height=0.65)
            if p20 is not None and p80 is not None:
                ax.errorbar(median, y, xerr=[[median - p20], [p80 - median]], color="black", capsize=3,
                            linewidth=1)
            others = [_float(r[case]["median_ms"]) for r in runs[:-1] if case in r]
            ax.plot(others, [y] * len(others), linestyle="", marker="o", markersize=4,
                    markerfacecolor="white", markeredgecolor="black")
            ax.text(max(p80 or 0.0, median) + 0.02 * right, y, f"{median:.0f} ms", va="center", fontsize=8)
        ax.set_yticks(ys, [label for _, label, _ in present], fontsize=8)
        ax.set_ylim(-0.6, len(present) - 0.4)
        ax.set_xlim(0, right * 1.18)
        lines = [goal_text(main, prefix, description) for prefix, description in goals]
        ax.set_title("\n".join([title] + [line for line in lines if line]), fontsize=9, loc="left")
        if ax is not axes[-1]:
            ax.set_xlabel("ms", fontsize=8, loc="right")
        ax.grid(alpha=0.3, axis="x")
    axes[-1].set_xlabel("ms per call, lower is faster: median of the last run, whisker p20-p80, dots the other"
                        " runs' medians", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k], label=NAMES[k]) for k in COLORS]
    handles.append(plt.Line2D([], [], linestyle="", marker="o", markerfacecolor="white", markeredgecolor="black",
                              label="median of another run"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"DeFINE on CPU: wt103-base, {int(any_row['tokens']):,} WikiText-2 ids ({int(any_row['unique']):,} distinct)\n"
                 f"{machine}, {any_row['threads']} threads, torch {any_row['torch']}, commit {any_row['commit']}, "
                 f"{len(runs)} runs", fontsize=10)
    fig.tight_layout()
    return fig


def plot_goals(paths: List[Path], out: Path, machine: str) -> Path:
    fig = figure_goals([read_goals_csv(p) for p in paths], machine)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot_goals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path, help="cpu_goals CSVs of one commit, oldest first")
    parser.add_argument("--machine", required=True, help="the CPU the runs were made on")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the last CSV)")
    args = parser.parse_args(argv)
    last = args.csv[-1]
    out = args.out or last.with_name("cpu-goals_" + last.stem.rsplit("_", 1)[-1] + ".png")
    print(plot_goals(args.csv, out, args.machine))


if __name__ == "__main__":
    main()

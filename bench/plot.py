"""PNG plots drawn from benchmark CSVs (or run.py's rows):

    <prefix>_throughput_vs_tokens.png   tokens/s vs ids per batch; a panel per (workload, vocabulary)
                                        and mode
    <prefix>_train_time_vs_vocab.png    training-step time vs vocabulary size; a panel per batch size
    <prefix>_speedup_vs_eager.png       eager reference time / DeFINE provider time; a panel per
                                        (workload, vocabulary) and mode, bars from 1x

    python -m bench.plot bench/results/A.csv [B.csv ...] [--out DIR]

Every measured series appears in a panel (nothing is dropped for lack of room); a panel with a
single x value shows points per provider instead of one-point lines. Each provider has one colour
in every figure (`provider_color`). A plot whose data the CSVs lack still gets written, saying so,
so a run always leaves all three.
"""
from __future__ import annotations

import argparse
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Set

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from .report import read_csv  # noqa: E402

MODE_ORDER = ("forward", "forward_backward", "train", "inference")
MODE_NAMES = {"forward": "forward", "forward_backward": "forward + backward", "train": "training step",
              "inference": "inference (eval)"}

# One colour per provider name, whatever else a figure holds (tab20 pairs: a backend and its
# no-dedup variant share a hue). Unknown names get a stable colour from their hash.
_TAB20 = plt.cm.tab20.colors
PROVIDER_COLORS = {name: _TAB20[i] for i, name in enumerate((
    "embedding", "embedding-sparse", "define-torch", "define-torch-nodedup", "define-cpu_cpp",
    "define-cpu_cpp-nodedup", "define-triton", "define-triton-nodedup", "define-cuda",
    "define-cuda-nodedup", "define-compile", "define-cache", "define-torch-sparse",
    "define-cpu_cpp-sparse", "relative-slimembedding", "define-triton-sparse",
    "relative-adaptiveinput", "relative-adaptivedefine", "define-cuda-sparse", "dense-matmul"))}

_PROVIDER_NAMES = {"embedding": "nn.Embedding", "embedding-sparse": "nn.Embedding sparse",
                   "define-cache": "DeFINE eval cache", "define-compile": "DeFINE torch.compile",
                   "relative-slimembedding": "SlimEmbedding", "relative-adaptiveinput": "AdaptiveInput",
                   "relative-adaptivedefine": "AdaptiveDeFINE", "dense-matmul": "dense matmul"}


def provider_color(provider: str):
    if provider in PROVIDER_COLORS:
        return PROVIDER_COLORS[provider]
    return plt.cm.tab20b.colors[zlib.crc32(provider.encode()) % 20]


def provider_label(provider: str) -> str:
    """Readable legend name: define-torch-nodedup -> 'DeFINE torch, no dedup'."""
    if provider in _PROVIDER_NAMES:
        return _PROVIDER_NAMES[provider]
    if provider.startswith("define-"):
        backend, _, variant = provider[len("define-"):].partition("-")
        extra = {"nodedup": ", no dedup", "sparse": ", sparse"}.get(variant, f", {variant}" if variant else "")
        return f"DeFINE {backend}{extra}"
    return provider


def _num(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def base_workload(row: dict) -> str:
    """The workload name without run.py's vocabulary suffix (wt2-small-V10000 -> wt2-small)."""
    name, vocab = row["workload"], str(row.get("vocab_size", ""))
    suffix = f"-V{vocab}"
    return name[:-len(suffix)] if vocab and name.endswith(suffix) else name


def _measured(rows, metric: str) -> List[dict]:
    return [r for r in rows if r["metric"] == metric and _num(r["value"]) is not None
            and r["provider"] != "dense-matmul"]


def series_key(row: dict) -> tuple:
    """What identifies one measured series point: provider, workload, vocabulary, ids, mode."""
    return (row["provider"], base_workload(row), str(row.get("vocab_size", "")), str(row["tokens"]),
            row["mode"])


def _modes(rows) -> List[str]:
    present = {r["mode"] for r in rows}
    return [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER))


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _tidy_log_axes(fig) -> None:
    """No overlapping minor-tick labels on log axes spanning less than a decade."""
    for ax in fig.axes:
        for axis, scale, limits in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()),
                                    (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
            if scale == "log" and limits[0] > 0 and limits[1] / limits[0] < 10:
                axis.set_minor_formatter(ticker.NullFormatter())
                axis.set_major_locator(ticker.MaxNLocator(4))
                axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))


def _save(fig, path: Path) -> Path:
    _tidy_log_axes(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _context(rows) -> str:
    devices = sorted({r["device"] for r in rows if r.get("device")})
    dtypes = sorted({r["dtype"] for r in rows if r.get("dtype") and r["provider"] != "dense-matmul"})
    return " · ".join(filter(None, [", ".join(devices), ", ".join(dtypes)]))


def _grid(count_rows: int, count_cols: int, width: float, height: float):
    fig, axes = plt.subplots(count_rows, count_cols, figsize=(width * count_cols, height * count_rows),
                             squeeze=False)
    return fig, axes


def _legend(fig, providers: Set[str]) -> None:
    handles = [plt.Line2D([], [], color=provider_color(p), marker="o", linestyle="-", label=provider_label(p))
               for p in sorted(providers)]
    if handles:
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(handles), 4), fontsize=8, frameon=False)


def _draw_series(ax, rows, x_field: str, drawn: Optional[Set[tuple]], log_x: bool) -> Set[str]:
    """Lines over x_field per provider, or points per provider when there is one x value."""
    by_provider = defaultdict(dict)
    for r in rows:
        by_provider[r["provider"]][_num(r[x_field])] = _num(r["value"])
        if drawn is not None:
            drawn.add(series_key(r))
    xs = {x for points in by_provider.values() for x in points}
    names = sorted(by_provider)
    if len(xs) > 1:
        for name in names:
            points = sorted(by_provider[name].items())
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=provider_color(name))
        if log_x:
            ax.set_xscale("log", base=2 if x_field == "tokens" else 10)
    else:  # one x value: a dot per provider, named on the y axis
        for i, name in enumerate(names):
            ax.plot(list(by_provider[name].values()), [i], marker="o", markersize=7, linestyle="",
                    color=provider_color(name))
        ax.set_yticks(range(len(names)), [provider_label(n) for n in names], fontsize=7)
        ax.set_ylim(-0.7, len(names) - 0.3)
    return set(names)


def _panel(row) -> tuple:
    """The (workload, vocabulary) panel a row is drawn in."""
    return base_workload(row), str(row.get("vocab_size", ""))


def _panels(selected) -> list:
    return sorted({_panel(r) for r in selected}, key=lambda p: (p[0], _num(p[1]) or 0))


def figure_throughput(rows, drawn: Optional[Set[tuple]] = None):
    selected = _measured(rows, "tokens_per_s")
    panels = _panels(selected)
    modes = _modes(selected)
    fig, axes = _grid(max(len(panels), 1), max(len(modes), 1), 4.6, 3.4)
    providers: Set[str] = set()
    if not selected:
        _empty(axes[0, 0], "no tokens/s rows")
    for i, (workload, vocab) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i, j]
            mine = [r for r in selected if _panel(r) == (workload, vocab) and r["mode"] == mode]
            tokens = sorted({int(_num(r["tokens"])) for r in mine})
            title = f"{workload} · V={vocab} · {MODE_NAMES.get(mode, mode)}"
            if not mine:
                _empty(ax, "not measured")
                ax.set_title(title, fontsize=9)
                continue
            multi = len(tokens) > 1
            providers |= _draw_series(ax, mine, "tokens", drawn, log_x=True)
            if multi:
                ax.set(xlabel="ids per batch", ylabel="tokens / s")
            else:
                ax.set(xlabel="tokens / s")
                title += f" · {tokens[0]} ids"
            if multi:
                ax.set_yscale("log")
            else:
                ax.set_xscale("log")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Throughput (tokens/s, higher is better) · {_context(rows)}")
    fig.tight_layout()
    _legend(fig, providers)
    return fig


def figure_train_vs_vocab(rows, drawn: Optional[Set[tuple]] = None):
    selected = [r for r in _measured(rows, "time") if r["mode"] == "train" and _num(r.get("vocab_size"))]
    panels = sorted({(base_workload(r), str(r["tokens"])) for r in selected},
                    key=lambda p: (p[0], _num(p[1]) or 0))
    fig, axes = _grid(1, max(len(panels), 1), 5.0, 3.8)
    providers: Set[str] = set()
    if not selected:
        _empty(axes[0, 0], "no training-step rows")
    for ax, (workload, tokens) in zip(axes[0], panels):
        mine = [r for r in selected if (base_workload(r), str(r["tokens"])) == (workload, tokens)]
        vocabs = {r["vocab_size"] for r in mine}
        providers |= _draw_series(ax, mine, "vocab_size", drawn, log_x=True)
        if len(vocabs) > 1:
            ax.set(xlabel="vocabulary size", ylabel="ms per step (median)")
            ax.set_yscale("log")
            title = f"{workload} · {tokens} ids per batch"
        else:
            ax.set(xlabel="ms per step (median)")
            ax.set_xscale("log")
            title = f"{workload} · V={next(iter(vocabs))} · {tokens} ids per batch"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training step time (lower is better) · {_context(rows)}")
    fig.tight_layout()
    _legend(fig, providers)
    return fig


EAGER_PROVIDER = "define-torch"  # the reference every time_vs_eager ratio is taken against


def figure_speedup(rows, drawn: Optional[Set[tuple]] = None):
    """eager time / provider time for the DeFINE providers, bars from 1x.

    A panel per (workload, vocabulary) and mode, a bar per (ids per batch, provider). The axis is
    linear, symmetric-log past 2x when a ratio exceeds 4x (the eval cache), so a 0.75x bar reads
    as 0.75x. nn.Embedding and the relatives are left out (different layers, not other ways to
    compute DeFINE; their ratios are in the table), and so is the reference itself (always 1x).
    """
    selected = [r for r in _measured(rows, "time_vs_eager") if r["provider"].startswith("define")
                and r["provider"] != EAGER_PROVIDER and _num(r["value"]) > 0]
    panels = _panels(selected)
    modes = _modes(selected)
    most = max([sum(1 for r in selected if r["mode"] == m and _panel(r) == panel)
                for panel in panels for m in modes] + [1])
    fig, axes = _grid(max(len(panels), 1), max(len(modes), 1), 5.0, 0.32 * most + 1.4)
    providers: Set[str] = set()
    if not selected:
        _empty(axes[0, 0], "no rows with the eager reference")
    for i, (workload, vocab) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i, j]
            mine = [r for r in selected if _panel(r) == (workload, vocab) and r["mode"] == mode]
            title = f"{workload} · V={vocab} · {MODE_NAMES.get(mode, mode)}"
            token_counts = sorted({int(_num(r["tokens"])) for r in mine})
            if len(token_counts) == 1:
                title += f" · {token_counts[0]} ids"
            ax.set_title(title, fontsize=9)
            if not mine:
                _empty(ax, "not measured")
                continue
            mine.sort(key=lambda r: (_num(r["tokens"]), provider_label(r["provider"])))
            positions = list(range(len(mine)))[::-1]
            ratios = [1.0 / _num(r["value"]) for r in mine]
            for y, r, ratio in zip(positions, mine, ratios):
                ax.barh(y, ratio - 1.0, left=1.0, color=provider_color(r["provider"]), height=0.7)
                # Labels right of the bar's far end, or of the 1x line for a slowdown, so that
                # they never run into the tick labels.
                ax.text(max(ratio, 1.0), y, f" {ratio:.2f}x", va="center", ha="left", fontsize=7)
                providers.add(r["provider"])
                if drawn is not None:
                    drawn.add(series_key(r))
            names = [provider_label(r["provider"]) for r in mine]
            if len(token_counts) > 1:
                names = [f"{r['tokens']} ids: {name}" for r, name in zip(mine, names)]
            ax.set_yticks(positions, names, fontsize=7)
            ax.set_ylim(-0.7, len(mine) - 0.3)
            ax.axvline(1.0, color="black", linewidth=0.8)
            top = max(ratios + [1.0])
            if top > 4:
                ax.set_xscale("symlog", linthresh=2.0, linscale=2.0)
                ax.set_xlim(0.0, top * 3)
            else:
                ax.set_xlim(0.0, top * 1.25 + 0.1)
            ax.set(xlabel="× define-torch (higher is faster)")
            ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Speed-up of DeFINE providers over the eager reference (define-torch = 1x) · {_context(rows)}")
    fig.tight_layout()
    _legend(fig, providers)
    return fig


def plot_throughput(rows, path: Path) -> Path:
    return _save(figure_throughput(rows), path)


def plot_train_vs_vocab(rows, path: Path) -> Path:
    return _save(figure_train_vs_vocab(rows), path)


def plot_speedup(rows, path: Path) -> Path:
    return _save(figure_speedup(rows), path)


def _clean(rows) -> List[dict]:
    return [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]


def plot_all(rows, out_dir: Path, prefix: str = "bench") -> List[Path]:
    rows = _clean(rows)
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

"""The seeded suite's answer: per (dataset, variant) the mean and 95% t-interval of validation and
test perplexity, tokens/s, seconds per epoch, peak memory and seconds to a target validation
perplexity; the paper's orderings and the issue's goals judged from those intervals; plots of
perplexity against parameters and against wall-clock.

    python -m bench.lm.summary bench/results/lm_suite        # reads runs/*.csv, writes summary.*

`judge(rows)` is the pure rule (rows as read from the CSVs, values as strings or numbers): an
ordering "A < B" is held only when A's interval lies wholly below B's (stats.compare); overlap is
"not resolved", with the seeds per variant that would resolve it at the observed spread.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

from . import stats
from .report import read_rows, write_rows

# (label, A, B): "A's test perplexity < B's" (Mehta et al. 2020 Table 4; Inan et al. 2017)
ORDERINGS = (
    ("tied < untied (RE)", "tied", "untied"),
    ("REAL < RE (tied + augmented loss < tied)", "tied_al", "tied"),
    ("DeFINE < linear transform", "define", "linear"),
    ("DeFINE < GLT", "define", "glt"),
    ("define < define_nomix", "define", "define_nomix"),
    ("define_nomix < hgt", "define_nomix", "hgt"),
    ("DeFINE + AL < DeFINE", "define_al", "define"),
    ("DeFINE (fewer parameters) <= untied", "define", "untied"),
)
# tied nn.Embedding test perplexity below these (the goals for the full run)
PPL_GOALS = {"wt2": 150.0, "wikitext-2": 150.0, "ptb": 130.0}
SPEED_GOAL = dict(variant="define", baseline="tied_unfused", time_ratio=0.5, param_ratio=0.6, dataset="wt2")
METRICS = ("val_ppl", "test_ppl", "tokens_per_s", "seconds_per_epoch", "peak_rss_mb", "train_seconds",
           "seconds_to_target", "load_avg")
SUMMARY_COLUMNS = (("dataset", "model", "variant", "n", "params_total", "params_embedding", "params_transform",
                    "params_context", "params_output", "reached_target", "target_ppl")
                   + tuple(f"{m}_{part}" for m in METRICS for part in ("mean", "low", "high")))


def _float(value) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def group_rows(rows: list) -> dict:
    """{(dataset, model): {variant: [rows]}}, the last row of each (variant, seed) winning."""
    latest = {}
    for row in rows:
        latest[(row["dataset"], row["model"], row["variant"], str(row["seed"]))] = row
    groups = {}
    for (dataset, model, variant, _), row in latest.items():
        groups.setdefault((dataset, model), {}).setdefault(variant, []).append(row)
    return groups


def values(rows: list, metric: str) -> list:
    return [v for v in (_float(row.get(metric)) for row in rows) if v is not None]


def summarise(rows: list, confidence: float = 0.95) -> list:
    """One dict per (dataset, model, variant): n, parameters, and mean/low/high of METRICS."""
    out = []
    for (dataset, model), variants in group_rows(rows).items():
        for variant, members in variants.items():
            entry = dict(dataset=dataset, model=model, variant=variant, n=len(members),
                         reached_target=sum(1 for r in members if _float(r.get("seconds_to_target")) is not None),
                         target_ppl=members[0].get("target_ppl", ""))
            for group in ("total", "embedding", "transform", "context", "output"):
                entry[f"params_{group}"] = int(_float(members[0].get(f"params_{group}")) or 0)
            for metric in METRICS:
                interval = stats.mean_ci(values(members, metric), confidence)
                entry.update({f"{metric}_mean": interval.mean, f"{metric}_low": interval.low,
                              f"{metric}_high": interval.high})
            out.append(entry)
    return out


def judge(rows: list, confidence: float = 0.95, max_seeds: int = 50) -> list:
    """Verdicts on ORDERINGS and the goals, per (dataset, model). Each: dict(dataset, model,
    claim, a, b, verdict, seeds_needed, a_mean, a_low, a_high, b_mean, b_low, b_high, reason)."""
    out = []
    for (dataset, model), variants in group_rows(rows).items():
        def record(claim, a, b, verdict, extra=""):
            reason = verdict.reason + (f"; {extra}" if extra else "")
            out.append(dict(dataset=dataset, model=model, claim=claim, a=a, b=b, verdict=verdict.verdict,
                            seeds_needed=verdict.seeds_needed if verdict.verdict == stats.NOT_RESOLVED else "",
                            a_mean=verdict.a.mean, a_low=verdict.a.low, a_high=verdict.a.high,
                            b_mean=verdict.b.mean, b_low=verdict.b.low, b_high=verdict.b.high, reason=reason))

        def params(variant):
            return _float(variants[variant][0].get("params_total")) or 0.0

        for claim, a, b in ORDERINGS:
            if a not in variants or b not in variants:
                continue
            verdict = stats.compare(values(variants[a], "test_ppl"), values(variants[b], "test_ppl"),
                                    confidence, max_seeds)
            ratio = params(a) / params(b) if params(b) else math.nan
            extra = f"parameters {a}/{b} = {ratio:.2f}"
            if claim.startswith("DeFINE (fewer") and ratio >= 1.0:
                verdict = verdict._replace(verdict=stats.NOT_HELD, seeds_needed=None)
                extra += " (not fewer)"
            record(claim, a, b, verdict, extra)
        if model != "transformer":  # the goals are stated for the Transformer
            continue
        goal = PPL_GOALS.get(dataset)
        if goal is not None and "tied" in variants:
            record(f"tied test perplexity < {goal:g}", "tied", "goal",
                   stats.below(values(variants["tied"], "test_ppl"), goal, confidence))
        a, b = SPEED_GOAL["variant"], SPEED_GOAL["baseline"]
        if a in variants and b in variants:
            ratio = params(a) / params(b) if params(b) else math.nan
            scaled = [SPEED_GOAL["time_ratio"] * v for v in values(variants[b], "seconds_per_epoch")]
            verdict = stats.compare(values(variants[a], "seconds_per_epoch"), scaled, confidence, max_seeds)
            if ratio > SPEED_GOAL["param_ratio"]:
                verdict = verdict._replace(verdict=stats.NOT_HELD, seeds_needed=None)
            record(f"{a} s/epoch < {SPEED_GOAL['time_ratio']}x {b} at <= {SPEED_GOAL['param_ratio']}x parameters",
                   a, f"{SPEED_GOAL['time_ratio']}x {b}", verdict, f"parameters {a}/{b} = {ratio:.2f}")
    return out


def extra_seeds(verdicts: list, have: dict, max_seeds: int) -> dict:
    """{(dataset, variant): seeds wanted} for unresolved comparisons that the observed spread says
    <= max_seeds seeds would resolve (`have`: {(dataset, variant): seeds run})."""
    wanted = {}
    for v in verdicts:
        needed = v["seeds_needed"]
        if v["verdict"] != stats.NOT_RESOLVED or needed in ("", None) or needed > max_seeds:
            continue
        for variant in (v["a"], v["b"]):
            key = (v["dataset"], variant)
            if key in have and needed > have[key]:
                wanted[key] = max(wanted.get(key, 0), needed)
    return wanted


def _fmt(mean, low, high, digits=1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if (isinstance(low, float) and math.isnan(low)) or low == high:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(summary: list, verdicts: list, title: str) -> str:
    lines = [f"# {title}", "", "Mean [95% t-interval] over seeds; n = seeds. Parameters: embedding / transform / "
             "body / output (M). s/epoch and tokens/s: training steps only (evaluation excluded); peak MB: "
             "resident memory above the run's start; to target: training seconds until validation perplexity "
             "(on the periodic validation slice) first reached the target, over the seeds that reached it. "
             "Timings are the machine's only where the load average (summary.csv, load_avg) stayed below its "
             "core count.", ""]
    for dataset in sorted({s["dataset"] for s in summary}):
        members = sorted((s for s in summary if s["dataset"] == dataset), key=lambda s: s["test_ppl_mean"])
        lines += [f"## {dataset} ({members[0]['model']})", "",
                  "| variant | n | params (M) | emb / transf / body / out | val ppl | test ppl | tokens/s | "
                  "s/epoch | peak MB | s to target (reached) |", "|" + "---|" * 10]
        for s in members:
            split = " / ".join(f"{s[f'params_{g}'] / 1e6:.2f}" for g in ("embedding", "transform", "context", "output"))
            target = (f"{_fmt(s['seconds_to_target_mean'], s['seconds_to_target_low'], s['seconds_to_target_high'], 0)}"
                      f" ({s['reached_target']}/{s['n']} at {s['target_ppl'] or '–'})")
            lines.append(f"| {s['variant']} | {s['n']} | {s['params_total'] / 1e6:.2f} | {split} | "
                         f"{_fmt(s['val_ppl_mean'], s['val_ppl_low'], s['val_ppl_high'])} | "
                         f"{_fmt(s['test_ppl_mean'], s['test_ppl_low'], s['test_ppl_high'])} | "
                         f"{_fmt(s['tokens_per_s_mean'], s['tokens_per_s_low'], s['tokens_per_s_high'], 0)} | "
                         f"{_fmt(s['seconds_per_epoch_mean'], s['seconds_per_epoch_low'], s['seconds_per_epoch_high'], 0)} | "
                         f"{_fmt(s['peak_rss_mb_mean'], s['peak_rss_mb_low'], s['peak_rss_mb_high'], 0)} | {target} |")
        lines.append("")
        rows = [v for v in verdicts if v["dataset"] == dataset]
        if rows:
            lines += ["| claim (test perplexity unless stated) | verdict | A | B | seeds to resolve | why |",
                      "|---|---|---|---|---|---|"]
            for v in rows:
                lines.append(f"| {v['claim']} | **{v['verdict']}** | {v['a']} {_fmt(v['a_mean'], v['a_low'], v['a_high'])} "
                             f"| {v['b']} {_fmt(v['b_mean'], v['b_low'], v['b_high'])} | {v['seeds_needed'] or '–'} | {v['reason']} |")
            lines.append("")
    return "\n".join(lines)


def label_offsets(axis, points: list, gap: float = 10.0, near: float = 70.0) -> list:
    """(name, x, y, lift): each point's label raised `lift` points above the point, so that labels
    of points within `near` points of each other horizontally stand at least `gap` points apart
    (variants of equal size and close perplexity otherwise print over each other)."""
    axis.autoscale_view()
    per_point = axis.figure.dpi / 72.0
    placed, out = [], []
    for name, x, y in sorted(points, key=lambda point: point[2]):
        px, py = axis.transData.transform((x, y))
        label = py + 3 * per_point
        for other_x, other_label in placed:
            if abs(other_x - px) < near * per_point:
                label = max(label, other_label + gap * per_point)
        placed.append((px, label))
        out.append((name, x, y, (label - py) / per_point))
    return out


def plot(rows: list, summary: list, curves: list, path: Path) -> Path:
    """Left: test perplexity (mean, 95% interval) against parameters; right: validation
    perplexity against training seconds, one line per run; one row of panels per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({s["dataset"] for s in summary})
    variants = sorted({s["variant"] for s in summary})
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    figure, axes = plt.subplots(len(datasets), 2, figsize=(13, 4.8 * len(datasets)), squeeze=False)
    for (left, right), dataset in zip(axes, datasets):
        left.set(xlabel="parameters (M, total)", ylabel="test perplexity (mean, 95% interval)", yscale="log",
                 title=f"{dataset}: perplexity vs parameters")
        points = []
        for s in (s for s in summary if s["dataset"] == dataset):
            x, y = s["params_total"] / 1e6, s["test_ppl_mean"]
            error = None if math.isnan(s["test_ppl_low"]) else [[y - s["test_ppl_low"]], [s["test_ppl_high"] - y]]
            left.errorbar(x, y, yerr=error, fmt="o", color=colors[s["variant"]], capsize=3)
            points.append((s["variant"], x, y))
        for variant, x, y, lift in label_offsets(left, points):
            left.annotate(variant, (x, y), textcoords="offset points", xytext=(4, lift), fontsize=8)
        seen = set()
        for run in curves:
            if run["dataset"] != dataset:
                continue
            points = run["points"]
            label = run["variant"] if run["variant"] not in seen else None
            seen.add(run["variant"])
            right.plot([float(p["train_seconds"]) for p in points], [float(p["val_ppl"]) for p in points],
                       color=colors.get(run["variant"], "k"), alpha=0.7, lw=1, label=label)
        right.set(xlabel="training seconds", ylabel="validation perplexity (slice)", yscale="log",
                  title=f"{dataset}: perplexity vs wall-clock")
        if seen:
            right.legend(fontsize=7, ncol=2)
        for axis in (left, right):
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def load(directory: Path) -> tuple:
    """(rows, curves) of every finished run under directory/runs."""
    rows, curves = [], []
    for path in sorted((Path(directory) / "runs").glob("*.csv")):
        if path.name.endswith("_curve.csv"):
            continue
        run_rows = read_rows(path)
        rows.extend(run_rows)
        curve = path.with_name(path.stem + "_curve.csv")
        if run_rows and curve.exists():
            first = run_rows[0]
            curves.append(dict(dataset=first["dataset"], variant=first["variant"], points=read_rows(curve)))
    return rows, curves


def write(directory: Path, title: str = "LM suite summary", confidence: float = 0.95) -> dict:
    directory = Path(directory)
    rows, curves = load(directory)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {directory / 'runs'}")
    summary, verdicts = summarise(rows, confidence), judge(rows, confidence)
    write_rows(directory / "summary.csv", summary, SUMMARY_COLUMNS)
    write_rows(directory / "verdicts.csv", verdicts, tuple(verdicts[0]) if verdicts else ("dataset",))
    text = markdown(summary, verdicts, title)
    (directory / "summary.md").write_text(text + "\n")
    png = plot(rows, summary, curves, directory / "summary.png")
    return dict(summary=summary, verdicts=verdicts, markdown=text, png=png)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lm.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="a suite folder (holding runs/)")
    p.add_argument("--title", default="LM suite summary")
    args = p.parse_args(argv)
    result = write(Path(args.directory), args.title)
    print(result["markdown"])
    print(f"plot: {result['png']}")


if __name__ == "__main__":
    main()

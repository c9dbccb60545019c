"""The numbers of `python -m bench.lm_head` from its per-round results: medians and spreads,
ratios against the baseline of the same run (of the medians, and within each round), the goal
verdicts, the markdown table and the CSV rows (bench/report.py's long format).

A result entry: {case, estimate (bytes), status ("ok" | "skipped" | "unavailable" | "error"),
message, rounds: [{round, seconds, peak_mb, peak_rss_mb, flop, yardstick {dtype: FLOP/s}, ...}]}.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional

from .lm_head_cases import BASELINE, Case

MODES = {"head": "head fwd+bwd", "step": "train step"}
GB = 2 ** 30
ESTIMATE_NOTE = "from the shapes (lm_head_cases.estimate_bytes)"
# (label, part, numerator variant, denominator variant(s: the best of them per round),
#  "time" | "memory", dtypes, goal)
# The goals are set for the WikiText-103 vocabulary; at other sizes their verdicts say so, since
# a small vocabulary leaves the output layer a smaller share of the step.
GOAL_WORKLOAD = "wt103-base"
GOALS = [
    ("fused / unfused time", "head", "fused", "unfused", "time", ("bfloat16",), 0.15),
    ("fused / unfused time", "head", "fused", "unfused", "time", ("float32",), 0.50),
    ("fused / unfused peak memory", "head", "fused", "unfused", "memory", ("float32", "bfloat16"), 0.10),
    ("fused augmented / fused CE-only time", "head", "fused-augmented", "fused", "time",
     ("float32", "bfloat16"), 1.6),
    ("fused augmented / TiedOutput+AugmentedLoss peak memory", "head", "fused-augmented",
     "unfused-augmented", "memory", ("float32", "bfloat16"), 0.10),
    ("fused / best chunked F.linear_cross_entropy time", "head", "fused", ("chunked", "chunked-tuned"),
     "time", ("float32", "bfloat16"), 0.20),
    ("fused / least chunked F.linear_cross_entropy peak memory", "head", "fused", ("chunked", "chunked-tuned"),
     "memory", ("float32", "bfloat16"), 1.0),
    ("whole step DeFINE+fused / Embedding+Linear+CE time", "step", "step-define-fused",
     "step-embedding", "time", ("bfloat16",), 0.20),
    ("whole step DeFINE+fused / Embedding+Linear+CE peak memory", "step", "step-define-fused",
     "step-embedding", "memory", ("bfloat16",), 0.20),
]


def quantiles(values: List[float]) -> tuple:
    """(median, p20, p80)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=5, method="inclusive")
    return statistics.median(values), q[0], q[-1]


def _by_round(entry: dict, field: str) -> Dict[int, float]:
    return {r["round"]: r[field] for r in entry["rounds"]}


def compare(entry: dict, bases, field: str) -> Optional[dict]:
    """entry / the best (lowest) of `bases` for `field` ("seconds" or "peak_mb"): the ratio of
    the medians, and the ratios within each round that entry and a base both ran."""
    bases = [b for b in (bases if isinstance(bases, list) else [bases]) if b and b["rounds"]]
    if not entry or not entry["rounds"] or not bases:
        return None
    mine = _by_round(entry, field)
    theirs = [_by_round(b, field) for b in bases]
    per_round = []
    for r in sorted(mine):
        values = [t[r] for t in theirs if r in t]
        if values and min(values) > 0:
            per_round.append(mine[r] / min(values))
    if not per_round:
        return None
    med = statistics.median(mine.values()) / min(statistics.median(t.values()) for t in theirs)
    round_median, p20, p80 = quantiles(per_round)
    return dict(of_medians=med, round_median=round_median, p20=p20, p80=p80, per_round=per_round)


def find(results: Dict[str, dict], case: Case, variant: str) -> Optional[dict]:
    """The entry of `variant` with the same part, workload, T and dtype as `case`."""
    return next((e for e in results.values() if e["case"].key == case.key and e["case"].variant == variant), None)


def _short(entry: dict) -> str:
    return f"{entry['case'].variant} {entry['status']}" + (
        f" ({entry['message'].split(':')[0]})" if entry["status"] != "skipped" else f" ({entry['message']})")


def evaluate_goals(results: Dict[str, dict]) -> List[dict]:
    """Each goal per (workload, T, dtype) present: verdict from the same-round median ratio."""
    goals = []
    keys = sorted({e["case"].key for e in results.values()})
    for label, part, top, bottom, what, dtypes, goal in GOALS:
        bottom = list(bottom) if isinstance(bottom, tuple) else [bottom]
        for key in keys:
            if key[0] != part or key[3] not in dtypes:
                continue
            anchor = next(e["case"] for e in results.values() if e["case"].key == key)
            num = find(results, anchor, top)
            dens = [d for d in (find(results, anchor, b) for b in bottom) if d is not None]
            if num is None or not dens:
                continue
            row = dict(label=f"{label} · {key[1]} · T={key[2]} · {key[3]}", goal=goal, what=what,
                       key=key, numerator=top, denominator="/".join(bottom))
            field = "seconds" if what == "time" else "peak_mb"
            ratio = compare(num, dens, field)
            skipped = [d for d in dens if d["status"] == "skipped"]
            if ratio is not None:
                met = sum(r <= goal for r in ratio["per_round"])
                row.update(ratio, rounds_met=met, rounds=len(ratio["per_round"]),
                           verdict="met" if ratio["round_median"] <= goal else "not met")
            elif not num["rounds"]:
                row["verdict"] = f"n/a: {_short(num)}"
            elif skipped and what == "memory":
                need = min(d["estimate"] for d in skipped)
                estimated = statistics.median(_by_round(num, "peak_mb").values()) * 2**20 / need
                row.update(of_medians=estimated, verdict=("met" if estimated <= goal else "not met")
                           + f" against the estimate for {skipped[0]['case'].variant} (~{need / GB:.1f} GB; "
                             "it does not fit)")
            else:
                row["verdict"] = "n/a: " + "; ".join(_short(d) for d in dens)
            if key[1] != GOAL_WORKLOAD:
                row["verdict"] += f" (the goal is set for {GOAL_WORKLOAD})"
            goals.append(row)
    return goals


# ----------------------------------------------------------------------------- output
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def _params(counts: dict) -> str:
    if set(counts) == {"head"}:
        return f"{counts['head'] / 1e6:.2f}M"
    return " · ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) + f" (total {sum(counts.values()) / 1e6:.2f}M)"


def summary(entry: dict) -> dict:
    """Medians and spreads of one case's ok rounds."""
    rounds = entry["rounds"]
    ms = quantiles([r["seconds"] * 1e3 for r in rounds])
    kind = entry["case"].dtype
    shares = [100 * r["flop"] / r["seconds"] / r["yardstick"][kind] for r in rounds]
    rates = {d: quantiles([r["yardstick"][d] / 1e9 for r in rounds]) for d in rounds[0]["yardstick"]}
    return dict(ms=ms, peak=quantiles([r["peak_mb"] for r in rounds]),
                rss=max(r["peak_rss_mb"] for r in rounds), flop=rounds[0]["flop"], share=quantiles(shares),
                tflops=rounds[0]["flop"] / (ms[0] / 1e3) / 1e12, params=rounds[0]["params"],
                unique=rounds[0]["unique"], rates=rates, note=rounds[0].get("note", ""))


def markdown(results: Dict[str, dict], goals: List[dict]) -> str:
    sections: Dict[tuple, List[dict]] = {}
    for entry in results.values():
        c = entry["case"]
        sections.setdefault((c.part, c.spec.name, c.spec.vocab_size, c.tokens), []).append(entry)
    lines = []
    header = ("| variant | dtype | ms median (p20–p80) | × baseline time (same-round median, p20–p80) | "
              "peak MB above start (p20–p80) | × baseline memory | peak RSS MB | GFLOP | % of same-round "
              "matmul | params | status |")
    for (part, workload, vocab, tokens), entries in sections.items():
        base = BASELINE[part]
        lines += ["", f"### {MODES[part]} · {workload} (V={vocab:,}) · T={tokens:,} · baseline {base}", "",
                  header, "|" + "---|" * 11]
        rates = {}
        for entry in entries:
            c = entry["case"]
            if not entry["rounds"]:
                lines.append(f"| {c.variant} | {c.dtype} | — | — | — | — | — | — | — | — | "
                             f"{entry['status']}: {entry['message']} |")
                continue
            s = summary(entry)
            for d, q in s["rates"].items():
                rates.setdefault(d, []).append(q[0])
            baseline = find(results, c, base)
            t = compare(entry, baseline, "seconds")
            m = compare(entry, baseline, "peak_mb")
            status = f"ok ({len(entry['rounds'])} rounds)" if entry["status"] == "ok" else \
                f"{entry['status']} after {len(entry['rounds'])} rounds: {entry['message']}"
            if s["note"]:
                status += f"; {s['note']}"
            lines.append(
                f"| {c.variant} | {c.dtype} | {_fmt(s['ms'][0])} ({_fmt(s['ms'][1])}–{_fmt(s['ms'][2])}) | "
                + (f"{_fmt(t['of_medians'])} ({_fmt(t['round_median'])}, {_fmt(t['p20'])}–{_fmt(t['p80'])}) | "
                   if t else "— | ")
                + f"{_fmt(s['peak'][0], 4)} ({_fmt(s['peak'][1], 4)}–{_fmt(s['peak'][2], 4)}) | "
                + (f"{_fmt(m['of_medians'])} | " if m else "— | ")
                + f"{_fmt(s['rss'], 4)} | {_fmt(s['flop'] / 1e9)} | {_fmt(s['share'][0])} | "
                  f"{_params(s['params'])} | {status} |")
        if rates:
            lines.append("")
            lines.append("Matmul yardstick ([min(T, 4096), 512] x [512, 2048], median over the cases' rounds): "
                         + ", ".join(f"{d} {statistics.median(v):.0f} GFLOP/s" for d, v in rates.items()))
    if goals:
        lines += ["", "Goals (ratio of medians; same-round median, p20–p80; rounds under the goal):"]
        for g in goals:
            if "round_median" in g:
                lines.append(f"- {g['label']} ≤ {g['goal']}: {g['of_medians']:.3f} (same-round "
                             f"{g['round_median']:.3f}, {g['p20']:.3f}–{g['p80']:.3f}; "
                             f"{g['rounds_met']}/{g['rounds']} rounds) — **{g['verdict']}**")
            elif "of_medians" in g:
                lines.append(f"- {g['label']} ≤ {g['goal']}: {g['of_medians']:.3f} — **{g['verdict']}**")
            else:
                lines.append(f"- {g['label']} ≤ {g['goal']}: **{g['verdict']}**")
    return "\n".join(lines)


def csv_rows(results: Dict[str, dict], goals: List[dict], meta: dict) -> List[dict]:
    """report.COLUMNS rows: per case its time, samples, memory, FLOP, share, parameters, ratios,
    yardsticks per round, or its status; then one row per goal."""
    rows = []
    for entry in results.values():
        c = entry["case"]
        base = dict(meta, workload=c.spec.name, provider=c.variant, mode=MODES[c.part], dtype=c.dtype,
                    tokens=c.tokens, vocab_size=c.spec.vocab_size, corpus="zipf", unique_ids="", note="")

        def row(metric, unit, value, p20=None, p80=None, note=""):
            rows.append(dict(base, metric=metric, unit=unit, value=value, p20=p20, p80=p80, note=note))
        if entry["status"] != "ok":
            row(entry["status"], "", None, note=entry["message"])
        if entry["status"] == "skipped":
            row("estimated_memory", "MB", entry["estimate"] / 2**20, note=ESTIMATE_NOTE)
        if not entry["rounds"]:
            continue
        s = summary(entry)
        base["unique_ids"] = s["unique"]
        row("time", "ms", *s["ms"], note=s["note"])
        for r in entry["rounds"]:
            row("time_sample", "ms", r["seconds"] * 1e3, note=f"round {r['round'] + 1}")
            for d, rate in r["yardstick"].items():
                row(f"matmul_{d}", "GFLOP/s", rate / 1e9,
                    note=f"round {r['round'] + 1}: [min(T, 4096), 512] x [512, 2048]")
        row("peak_memory", "MB", *s["peak"], note="peak RSS (getrusage) above the process's RSS at its start")
        row("peak_rss", "MB", s["rss"], note="getrusage ru_maxrss, whole process")
        row("estimated_memory", "MB", entry["estimate"] / 2**20, note=ESTIMATE_NOTE)
        row("gflop", "GFLOP", s["flop"] / 1e9, note="GEMM FLOP of one step")
        row("tflops", "TFLOP/s", s["tflops"])
        row("matmul_share", "%", *s["share"], note=f"of the same-round {c.dtype} matmul rate")
        for part, count in s["params"].items():
            row(f"params_{part}", "count", count)
        baseline = find(results, c, BASELINE[c.part])
        for metric, field in (("time_vs_baseline", "seconds"), ("memory_vs_baseline", "peak_mb")):
            ratio = compare(entry, baseline, field)
            if ratio:
                row(metric, "x", ratio["of_medians"], ratio["p20"], ratio["p80"],
                    note=f"ratio of medians vs {BASELINE[c.part]}; same-round median {ratio['round_median']:.4g}")
    for g in goals:
        part, workload, tokens, dtype = g["key"]
        rows.append(dict(meta, workload=workload, provider="goal", mode=MODES[part], dtype=dtype, tokens=tokens,
                         metric="goal", unit="x", value=g.get("round_median", g.get("of_medians")),
                         p20=g.get("p20"), p80=g.get("p80"), vocab_size="", unique_ids="", corpus="zipf",
                         note=f"{g['label']} <= {g['goal']}: {g['verdict']}"
                              + (f"; ratio of medians {g['of_medians']:.4g}; {g['rounds_met']}/{g['rounds']} rounds"
                                 if "rounds" in g else "")))
    return rows



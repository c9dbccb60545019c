"""`python -m bench.lm_head`: the fused tied LM head (define_kernels.lm_head_loss) against the
unfused TiedOutput + F.cross_entropy, torch's chunked F.linear_cross_entropy and
nn.AdaptiveLogSoftmaxWithLoss, with and without the augmented loss; and a whole LM training
step, DeFINE + body + fused head vs nn.Embedding + body + tied nn.Linear + F.cross_entropy.
The variants are described in bench/lm_head_cases.py.

    python -m bench.lm_head                                   # everything (the full run, hours on 2 cores)
    python -m bench.lm_head --parts head --workload wt2-small --tokens 1024 --rounds 2
    python -m bench.lm_head --parts step --workload wt2-small --tokens 4096 --dtypes bf16

Every round runs each case once, in a fixed order, each in its own process (forked from a
server that imported torch once), so its peak RSS (resource.getrusage) is its own: the table
gives the peak above the process's RSS at its start. The process times one step after
`--warmup` untimed ones, then measures the matmul yardstick ([min(T, 4096), 512] x [512, 2048],
fp32 and bf16) of the same round; a case's share is its GEMM FLOP rate over that round's rate.
Ratios are against the baseline (unfused head; nn.Embedding step) of the same run: the ratio of
the medians, and the median (p20-p80) of the ratios within a round. A case whose estimated
memory (lm_head_cases.estimate_bytes) is over `--memory-budget-gb` (default 0.8 x MemTotal) is
not started ("does not fit (needs ~N GB)"); one that fails or is unavailable is reported with
its message and not retried in later rounds. Writes
bench/results/<date>-<time>_<machine>_<commit>_lm-head.csv (bench/report.py's long format) and a
PNG beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import report
from .lm_head_cases import BASELINE, SMALL_ONLY, VARIANTS, Case, child_main, estimate_bytes
from .workloads import parse_workload

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
MODES = {"head": "head fwd+bwd", "step": "train step"}
GB = 2 ** 30
# (label, part, numerator variant, denominator variant(s: the best of them per round),
#  "time" | "memory", dtypes, goal)
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


def _list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _workloads(text: str) -> List[str]:
    """Comma list; the key=value fields of a custom: spec stay with it."""
    names = []
    for item in _list(text):
        if "=" in item and names and names[-1].startswith("custom:"):
            names[-1] += "," + item
        else:
            names.append(item)
    return names


def _ints(text: str) -> List[int]:
    try:
        return [int(item) for item in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GB


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_head", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=_list, default=["head", "step"], help="head, step or both")
    parser.add_argument("--workload", type=_workloads, default=["wt2-small", "wt103-base"],
                        help="comma list of workload names (V, n, m, DeFINE config) or custom:V=..,n=..,...")
    parser.add_argument("--tokens", type=_ints, default=[4096, 8192], help="comma list of T")
    parser.add_argument("--dtypes", type=_list, default=["float32", "bfloat16"],
                        help="float32 and/or bfloat16 (autocast), also fp32 / bf16")
    parser.add_argument("--variants", type=_list, default=None,
                        help=f"comma list (default all): head {list(VARIANTS['head'])}, step {list(VARIANTS['step'])}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process before the timed one")
    parser.add_argument("--seq-len", type=int, default=512, help="whole step: sequence length (B = T / L)")
    parser.add_argument("--layers", type=int, default=4, help="whole step: Transformer layers")
    parser.add_argument("--heads", type=int, default=8, help="whole step: attention heads")
    parser.add_argument("--alpha", type=float, default=0.5, help="augmented loss weight")
    parser.add_argument("--tau", type=float, default=10.0, help="augmented loss temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-budget-gb", type=float, default=None,
                        help="skip cases estimated above this (default 0.8 x MemTotal)")
    parser.add_argument("--reference-max-elements", type=float, default=33_278 * 4096,
                        help="run the reference-backend variants and chunked (torch's default chunking) "
                             "only where T x V is at most this")
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds per case process")
    parser.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    parser.add_argument("--csv", type=Path, default=None,
                        help="CSV path (default <out-dir>/<date>-<time>_<machine>_<commit>_<tag>.csv)")
    parser.add_argument("--tag", default="lm-head")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--fail", default=None, help=argparse.SUPPRESS)  # tests: cases named so raise
    args = parser.parse_args(argv)
    for part in args.parts:
        if part not in VARIANTS:
            parser.error(f"--parts: {part!r} is not one of {sorted(VARIANTS)}")
    try:
        args.dtypes = [DTYPE_NAMES[name] for name in args.dtypes]
    except KeyError as error:
        parser.error(f"--dtypes: {error.args[0]!r} is not one of {sorted(DTYPE_NAMES)}")
    known = {v for part in args.parts for v in VARIANTS[part]}
    for variant in args.variants or []:
        if variant not in known:
            parser.error(f"--variants: {variant!r} is not one of {sorted(known)}")
    try:
        for name in args.workload:
            parse_workload(name)
    except ValueError as error:
        parser.error(str(error))
    if args.rounds < 1 or args.warmup < 0 or min(args.tokens, default=0) < 1:
        parser.error("--rounds and --tokens must be >= 1, --warmup >= 0")
    if args.memory_budget_gb is None:
        args.memory_budget_gb = 0.8 * mem_total_bytes() / GB
    return args


def plan(args: argparse.Namespace) -> List[Case]:
    """Every case in run order: part, workload, T, dtype, then the variant catalog's order
    (the baseline first)."""
    cases = []
    for part in args.parts:
        for workload in args.workload:
            vocab = parse_workload(workload).vocab_size
            for tokens in args.tokens:
                for dtype in args.dtypes:
                    for variant in VARIANTS[part]:
                        if args.variants and variant not in args.variants:
                            continue
                        if variant in SMALL_ONLY and tokens * vocab > args.reference_max_elements:
                            continue
                        case = Case(part, workload, tokens, dtype, variant, seed=args.seed,
                                    seq_len=args.seq_len, layers=args.layers, heads=args.heads,
                                    alpha=args.alpha, tau=args.tau, warmup=args.warmup)
                        cases.append(dataclasses.replace(case, fail=bool(args.fail) and args.fail in case.name))
    return cases


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["bench.lm_head_server"])
        return context
    return multiprocessing.get_context("spawn")


def run_one(context, case: Case, timeout: float) -> dict:
    """The case in a fresh process; a crash, a kill or a timeout becomes an error result."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child_main, args=(dataclasses.asdict(case), sender), daemon=True)
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            result = receiver.recv()
        else:
            process.kill()
            result = dict(status="error", message=f"timed out after {timeout:.0f} s (--case-timeout)")
    except EOFError:
        result = None
    process.join()
    if result is None:
        code = process.exitcode
        why = " (killed: out of memory?)" if code == -9 else ""
        result = dict(status="error", message=f"the case's process died with exit code {code}{why}")
    return result


def run_cases(cases: List[Case], args: argparse.Namespace) -> Dict[str, dict]:
    """name -> {case, estimate, status, message, rounds: [result per ok round]}."""
    budget = args.memory_budget_gb * GB
    results = {}
    for case in cases:
        need = estimate_bytes(case)
        entry = dict(case=case, estimate=need, status="ok", message="", rounds=[])
        if need > budget:
            entry.update(status="skipped", message=f"does not fit (needs ~{need / GB:.1f} GB; "
                                                   f"budget {args.memory_budget_gb:.1f} GB)")
        results[case.name] = entry
    context = _context()
    for index in range(args.rounds):
        for case in cases:
            entry = results[case.name]
            if entry["status"] != "ok":
                continue
            result = run_one(context, case, args.case_timeout)
            if result["status"] != "ok":
                entry.update(status=result["status"], message=result["message"])
            else:
                entry["rounds"].append(dict(result, round=index))
            if not args.quiet:
                done = (f"{result['seconds'] * 1e3:.0f} ms, {result['peak_mb']:.0f} MB"
                        if result["status"] == "ok" else f"{result['status']}: {result['message']}")
                print(f"[round {index + 1}/{args.rounds}] {case.name}: {done}", file=sys.stderr, flush=True)
    return results


# ----------------------------------------------------------------------------- statistics
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
                lines.append(f"- {g['label']} ≤ {g['goal']}: {g['of_medians']:.3f} (same-round {g['round_median']:.3f}, "
                             f"{g['p20']:.3f}–{g['p80']:.3f}; {g['rounds_met']}/{g['rounds']} rounds) — **{g['verdict']}**")
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
            row("estimated_memory", "MB", entry["estimate"] / 2**20, note="from the shapes (lm_head_cases.estimate_bytes)")
        if not entry["rounds"]:
            continue
        s = summary(entry)
        base["unique_ids"] = s["unique"]
        row("time", "ms", *s["ms"], note=s["note"])
        for r in entry["rounds"]:
            row("time_sample", "ms", r["seconds"] * 1e3, note=f"round {r['round'] + 1}")
            for d, rate in r["yardstick"].items():
                row(f"matmul_{d}", "GFLOP/s", rate / 1e9, note=f"round {r['round'] + 1}: [min(T, 4096), 512] x [512, 2048]")
        row("peak_memory", "MB", *s["peak"], note="peak RSS (getrusage) above the process's RSS at its start")
        row("peak_rss", "MB", s["rss"], note="getrusage ru_maxrss, whole process")
        row("estimated_memory", "MB", entry["estimate"] / 2**20, note="from the shapes (lm_head_cases.estimate_bytes)")
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


def run(args: argparse.Namespace) -> tuple:
    """(results, goals, rows, csv path); prints progress to stderr."""
    import torch
    meta = report.metadata(torch.device("cpu"))
    cases = plan(args)
    if any(c.variant.startswith(("fused", "step-define")) for c in cases):
        _prepare_library()
    results = run_cases(cases, args)
    goals = evaluate_goals(results)
    rows = csv_rows(results, goals, meta)
    path = report.write_csv(rows, args.csv or report.results_path(meta, args.out_dir, args.tag))
    return results, goals, rows, path


def _prepare_library() -> None:
    """Build (or load) define_kernels_C here once, so no case's process pays for a JIT build."""
    from define_kernels.backends import cpp_ext
    cpp_ext.load_library()


def main(argv: Optional[List[str]] = None) -> Path:
    args = parse_args(argv)
    started = time.perf_counter()
    results, goals, rows, path = run(args)
    print(markdown(results, goals))
    print(f"\nCSV: {path}  ({time.perf_counter() - started:.0f} s)")
    if not args.no_plot:
        from .lm_head_plot import plot
        print(f"plot: {plot(rows, path.with_suffix('.png'))}")
    return path


if __name__ == "__main__":
    main()

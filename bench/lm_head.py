"""`python -m bench.lm_head`: the fused tied LM head (define_kernels.lm_head_loss) against the
unfused TiedOutput + F.cross_entropy, torch's chunked F.linear_cross_entropy and
nn.AdaptiveLogSoftmaxWithLoss, with and without the augmented loss; and a whole LM training
step, DeFINE + body + fused head vs nn.Embedding + body + tied nn.Linear + F.cross_entropy.
The variants are described in bench/lm_head_cases.py.

    python -m bench.lm_head            # the full run (make bench-lm-head): ~1.5 h on 2 quiet cores
    python -m bench.lm_head --parts head                      # the head alone, all sizes
    python -m bench.lm_head --parts step                      # the whole training step, all sizes
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
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import report
from .lm_head_cases import SMALL_ONLY, VARIANTS, Case, child_main, estimate_bytes
from .lm_head_report import csv_rows, evaluate_goals, markdown
from .workloads import comma_list, int_list, parse_workload, workload_list

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
GB = 2 ** 30


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
    parser.add_argument("--parts", type=comma_list, default=["head", "step"], help="head, step or both")
    parser.add_argument("--workload", type=workload_list, default=["wt2-small", "wt103-base"],
                        help="comma list of workload names (V, n, m, DeFINE config) or custom:V=..,n=..,...")
    parser.add_argument("--tokens", type=int_list, default=[4096, 8192], help="comma list of T")
    parser.add_argument("--dtypes", type=comma_list, default=["float32", "bfloat16"],
                        help="float32 and/or bfloat16 (autocast), also fp32 / bf16")
    parser.add_argument("--variants", type=comma_list, default=None,
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

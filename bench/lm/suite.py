"""The seeded LM suite: every (seed, dataset, variant) run of the Transformer preset at a fixed
token budget, one process at a time, then the summary (bench/lm/summary.py).

The budget (tokens per run, the same for every variant and seed of a dataset) is measured once
per suite folder: --run-minutes of training of the slowest variant (--calibrate-variant, untied)
at the tokens/s bench/lm/calibrate.py measures on this machine; kept in <dir>/budget.json so
reruns and added seeds train the same budget. --train-budget sets it instead.

    make lm                                     # = nohup python -m bench.lm.suite ... & (background)
    python -m bench.lm.suite --plan             # the runs and the estimated CPU time, nothing run
    python -m bench.lm.suite --quick            # CI smoke: tiny model, few steps, 1 seed, 3 variants

Resumable: each run writes <dir>/runs/<dataset>_<variant>_s<seed>.csv when it finishes (its log
beside it, its validation curve in ..._curve.csv); a rerun skips finished runs and continues an
unfinished one from its checkpoint (<dir>/ckpt/<run>/, deleted once the run has finished). Runs
go seed-major (all variants of seed 1, then seed 2, ...), so a suite stopped half-way still
compares variants. After --seeds seeds, the comparisons the summary leaves "not resolved" get
more seeds for their two variants, up to --max-seeds, where the observed spread says that many
would resolve them. One suite per folder at a time (a lock file).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import summary
from .report import RESULTS_DIR, commit_id, read_rows

REPO = Path(__file__).resolve().parents[2]

DEFAULT_DIR = RESULTS_DIR / "lm_suite"
VARIANTS = ("tied_unfused", "tied", "untied", "tied_al", "adaptive_softmax", "linear", "glt", "hgt",
            "define_nomix", "define", "define_al")
# Per dataset: the validation perplexity "to target" is timed to, and the variants run (the unfused
# baseline only where the wall-clock goal is stated). The token budget per run is calibrated.
DATASETS = {
    "wt2": dict(target_ppl=400.0, variants=VARIANTS),
    "ptb": dict(target_ppl=250.0, variants=tuple(v for v in VARIANTS if v != "tied_unfused")),
}
# Training tokens/s of the calibration variant (untied, the slowest) guessed for --plan before a
# calibration exists: CPU-time measurements on the shared, loaded 2-core machine of 2026-12-05,
# so rough. The suite itself measures them (bench/lm/calibrate.py) and keeps them in budget.json.
GUESSED_TOKENS_PER_S = {"wt2": 900.0, "ptb": 1400.0}
# evaluation on top of training (8 validation slices + the full validation and test splits)
EVAL_OVERHEAD = {"wt2": 1.35, "ptb": 1.2}
# The body: the Transformer preset, or the paper's LSTM family (bench.lm.train's `full` preset:
# 2 x 400 LSTM, Adam, plateau decay; DeFINE n = 128, k = 1024) at the same kind of budget.
MODELS = {
    "transformer": dict(args=["--preset", "transformer", "--model", "transformer"], prefix=""),
    "lstm": dict(args=["--preset", "full", "--model", "lstm", "--evals", "8", "--val-tokens", "20000"],
                 prefix="lstm_"),
}
QUICK_ARGS = ["--layers", "1", "--emb-dim", "32", "--hidden", "32", "--heads", "2", "--map-dim", "16",
              "--expand-dim", "64", "--depth", "2", "--max-groups", "2", "--batch-size", "8", "--bptt", "32",
              "--steps", "30", "--evals", "3", "--warmup", "5", "--lr", "3e-3", "--train-tokens", "60000",
              "--eval-tokens", "3000", "--val-tokens", "1500"]
QUICK_VARIANTS = ("tied_unfused", "tied", "define")


def run_name(dataset: str, variant: str, seed: int, prefix: str = "") -> str:
    return f"{prefix}{dataset}_{variant}_s{seed}"


def finished(csv_path: Path) -> bool:
    """The run's CSV holds a complete row (a run killed while writing it is not finished)."""
    try:
        rows = read_rows(csv_path)
    except (OSError, KeyError, ValueError):
        return False
    return bool(rows) and rows[-1].get("test_ppl") not in (None, "") and rows[-1].get("config") not in (None, "")


def plan(datasets: dict, seeds: list) -> list:
    """[(dataset, variant, seed)], seed-major."""
    return [(dataset, variant, seed) for seed in seeds for dataset, spec in datasets.items()
            for variant in spec["variants"]]


def budgets(directory: Path, datasets: dict, minutes: float, variant: str, extra: list, threads: int, log,
            model: str = "transformer") -> dict:
    """{dataset: tokens per run}: from <dir>/budget.json, else measured now (bench.lm.calibrate, the
    slowest variant) as `minutes` of training and written there, so every run and every rerun of
    this suite folder trains the same number of tokens."""
    path = directory / "budget.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    prefix = MODELS[model]["prefix"]
    for dataset in datasets:
        if prefix + dataset in saved:
            continue
        command = [sys.executable, "-m", "bench.lm.calibrate", "--dataset", dataset, "--variant", variant, "--",
                   *MODELS[model]["args"], "--threads", str(threads), *extra]
        log(f"calibrating {dataset}: {variant} tokens/s for a {minutes:g}-minute run")
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"calibration failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        budget = max(10_000, int(measured["tokens_per_s"] * 60 * minutes) // 10_000 * 10_000)
        saved[prefix + dataset] = dict(measured, model=model, train_budget=budget, minutes=minutes, date=time.strftime("%Y-%m-%d %H:%M"),
                              commit=commit_id())
        path.write_text(json.dumps(saved, indent=1) + "\n")
        log(f"  {dataset}: {measured['tokens_per_s']:.0f} tokens/s -> {budget} tokens per run")
    return {dataset: saved[prefix + dataset]["train_budget"] for dataset in datasets}


def run_one(directory: Path, dataset: str, variant: str, seed: int, spec: dict, extra: list, threads: int,
            keep_checkpoints: bool, log, model: str = "transformer") -> bool:
    name = run_name(dataset, variant, seed, MODELS[model]["prefix"])
    runs = directory / "runs"
    csv_path, curve, run_log = runs / f"{name}.csv", runs / f"{name}_curve.csv", runs / f"{name}.log"
    checkpoints = directory / "ckpt" / name
    if finished(csv_path):
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)  # left by a suite stopped after the run finished
        return True
    command = [sys.executable, "-m", "bench.lm.train", *MODELS[model]["args"],
               "--dataset", dataset, "--variants", variant, "--seed", str(seed), "--threads", str(threads),
               "--train-budget", str(spec["train_budget"]), "--target-ppl", str(spec["target_ppl"]),
               "--resume", "--no-progress", "--no-plot", "--tag", "suite", "--out", str(csv_path),
               "--curve-out", str(curve), "--checkpoint-dir", str(checkpoints), *extra]
    runs.mkdir(parents=True, exist_ok=True)
    resumed = " (resuming)" if checkpoints.exists() else ""
    log(f"run {name}{resumed}")
    started = time.perf_counter()
    with open(run_log, "a") as handle:
        handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} commit {commit_id()}: {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not finished(csv_path):
        log(f"  FAILED {name} (exit {done.returncode}, {seconds:.0f} s): see {run_log}")
        return False
    row = read_rows(csv_path)[-1]
    log(f"  done {name} in {seconds:.0f} s: val {row['val_ppl']} test {row['test_ppl']} "
        f"({row['tokens_per_s']} tokens/s, {row['epochs']} epochs, {row['stop_reason']})")
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return True


def estimate_hours(minutes: float, runs: list) -> float:
    """Upper estimate: every run as long as the calibration (slowest) variant, plus evaluation."""
    return sum(minutes * EVAL_OVERHEAD.get(d, 1.3) for d, _, _ in runs) / 60


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lm.suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help=f"suite folder (default {DEFAULT_DIR}; --quick: a temporary one)")
    p.add_argument("--model", choices=tuple(MODELS), default="transformer",
                   help="the body (lstm: the paper's LSTM family; run names get an lstm_ prefix)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma list of " + ", ".join(DATASETS))
    p.add_argument("--variants", default=None, help="comma list (default: each dataset's list)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant and dataset (1, 2, ...)")
    p.add_argument("--max-seeds", type=int, default=5, help="seeds an unresolved comparison may grow to")
    p.add_argument("--run-minutes", type=float, default=10.0,
                   help="training minutes per run of the calibration variant: sets the token budget")
    p.add_argument("--calibrate-variant", default="untied", help="the variant timed for the budget (the slowest)")
    p.add_argument("--train-budget", type=int, default=None, help="tokens per run: skips calibration")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--plan", action="store_true", help="print the runs and the time estimate; run nothing")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny model, 30 steps, 1 seed, "
                                                        f"{', '.join(QUICK_VARIANTS)} on ptb")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra bench.lm.train arguments")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        raise SystemExit(f"--datasets: unknown {unknown}; choose from {tuple(DATASETS)}")
    datasets = {d: dict(DATASETS[d]) for d in names}
    extra = list(args.train_args)
    if args.quick:
        datasets = {"ptb": dict(DATASETS["ptb"], variants=QUICK_VARIANTS, target_ppl=2000.0)}
        args.seeds, args.max_seeds, extra = 1, 1, QUICK_ARGS + extra
        args.threads = 1  # a tiny model gains nothing from threads (and loses much on a busy machine)
    for spec in datasets.values():
        if args.variants:
            spec["variants"] = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    runs = plan(datasets, list(range(1, args.seeds + 1)))
    if args.plan:
        for run in runs:
            print(run_name(*run, MODELS[args.model]["prefix"]))
        for dataset in datasets:
            guess = int(GUESSED_TOKENS_PER_S[dataset] * 60 * args.run_minutes)
            print(f"{dataset}: ~{guess} tokens per run if {args.calibrate_variant} trains "
                  f"{GUESSED_TOKENS_PER_S[dataset]:.0f} tokens/s (the suite measures it first)")
        print(f"{len(runs)} runs; at most ~{estimate_hours(args.run_minutes, runs):.1f} hours on 2 quiet cores "
              f"(+ up to {args.max_seeds - args.seeds} more seeds per variant in unresolved comparisons)")
        return 0

    directory = Path(args.dir) if args.dir else (Path(tempfile.mkdtemp(prefix="lm_quick_")) if args.quick
                                                 else DEFAULT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / "suite.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"another suite is running in {directory} (lock {directory / 'suite.lock'})")

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    log(f"suite in {directory}: {len(runs)} runs, commit {commit_id()}, threads {args.threads}, "
        f"at most ~{estimate_hours(args.run_minutes, runs):.1f} hours on 2 quiet cores")
    if args.quick or args.train_budget:
        tokens = {d: args.train_budget or 1 for d in datasets}  # --quick: its --steps decide
    else:
        tokens = budgets(directory, datasets, args.run_minutes, args.calibrate_variant, extra, args.threads, log,
                         args.model)
    for dataset, spec in datasets.items():
        spec["train_budget"] = tokens[dataset]
    failed = [run for run in runs if not run_one(directory, *run, datasets[run[0]], extra, args.threads,
                                                 args.keep_checkpoints, log, args.model)]
    # More seeds where a comparison is close and the observed spread says a few more would settle it.
    while not failed and args.max_seeds > args.seeds:
        result = summary.write(directory)
        have = {(s["dataset"], s["variant"]): s["n"] for s in result["summary"] if s["model"] == args.model}
        verdicts = [v for v in result["verdicts"] if v["model"] == args.model]
        wanted = summary.extra_seeds(verdicts, have, args.max_seeds)
        more = [(d, v, seed) for (d, v), n in sorted(wanted.items()) for seed in range(have[(d, v)] + 1, n + 1)]
        if not more:
            break
        log(f"{len(more)} more runs for unresolved comparisons: "
            f"{', '.join(run_name(*r, MODELS[args.model]['prefix']) for r in more)}")
        failed = [run for run in more if not run_one(directory, *run, datasets[run[0]], extra, args.threads,
                                                     args.keep_checkpoints, log, args.model)]
    if any(finished(p) for p in (directory / "runs").glob("*.csv") if not p.name.endswith("_curve.csv")):
        result = summary.write(directory, "LM suite summary (smoke scale, not evidence)" if args.quick
                               else "LM suite summary")
        print(result["markdown"], flush=True)
        log(f"summary: {directory / 'summary.md'}, plot: {result['png']}")
    if failed:
        log(f"{len(failed)} runs failed: {', '.join(run_name(*r, MODELS[args.model]['prefix']) for r in failed)}; "
            "rerun to retry")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

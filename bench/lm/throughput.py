"""Paired training speed of LM variants with a suite run's settings: one process builds every
variant, and each round times `--steps` training steps of each in turn (the order rotated every
round), so drift in the machine's speed reaches all variants alike. The suite's own s/epoch
comes from runs minutes apart, often on a loaded machine; this is the side-by-side measurement of
the wall-clock goal (DeFINE + fused head per epoch against the unfused tied baseline).

    python -m bench.lm.throughput --dataset wt2 --variants tied_unfused,define --rounds 7
    python -m bench.lm.throughput --variants tied_unfused,define -- --preset transformer --model transformer --layers 2

Train arguments after `--` replace the default, the suite's Transformer (bench/lm/suite.py MODELS).

Per variant: median step time over all rounds (p20-p80), tokens/s, seconds per training epoch of
the dataset, parameters; against the first variant: the ratio of the medians and the median
(p20-p80) of the same-round ratios, and the parameter ratio. Steps train on random ids (the cost
of a step does not depend on which ids). Writes
bench/results/<date>-<time>_<machine>_<commit>_lm-throughput.csv (bench/report.py's long format).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import report
from ..timing import quantile
from .calibrate import trainer
from .data import load_corpus
from .suite import MODELS

WARMUP_STEPS = 3


def measure(dataset: str, variants: List[str], rounds: int, steps: int, train_args: list,
            log=lambda line: None) -> dict:
    """{variant: per-round median step seconds}, with the trainers (for sizes and parameters)."""
    runs = [trainer(dataset, variant, train_args) for variant in variants]
    for run in runs:
        for _ in range(WARMUP_STEPS):
            run.step()
    per_round: Dict[str, List[float]] = {run.variant: [] for run in runs}
    for index in range(rounds):
        shift = index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            per_round[run.variant].append(statistics.median(run.step() for _ in range(steps)))
        log(f"round {index + 1}/{rounds}: " + ", ".join(f"{v} {t[-1] * 1e3:.0f} ms" for v, t in per_round.items()))
    return dict(runs=runs, per_round=per_round)


def rows(dataset: str, measured: dict, epoch_tokens: int, meta: dict) -> List[dict]:
    runs, per_round = measured["runs"], measured["per_round"]
    base = runs[0]
    base_times = per_round[base.variant]
    out = []

    def row(run, metric, unit, value, p20=None, p80=None, note=""):
        out.append(dict(meta, workload=dataset, provider=run.variant, mode="train-step",
                        dtype="bf16-autocast" if run.args.amp == "bf16" else "float32",
                        tokens=run.tokens_per_step, metric=metric, unit=unit, value=value, p20=p20, p80=p80,
                        vocab_size=run.vocab, note=note))

    for run in runs:
        times = per_round[run.variant]
        median = statistics.median(times)
        row(run, "seconds_per_step", "s", median, quantile(times, 0.2), quantile(times, 0.8))
        row(run, "tokens_per_s", "tokens/s", run.tokens_per_step / median)
        row(run, "seconds_per_epoch", "s", epoch_tokens / run.tokens_per_step * median,
            note=f"{epoch_tokens} training tokens per epoch")
        row(run, "params_total", "count", run.params["total"])
        if run is base:
            continue
        paired = [t / b for t, b in zip(times, base_times)]
        row(run, "time_ratio", "x", median / statistics.median(base_times), note=f"ratio of medians vs {base.variant}")
        row(run, "time_ratio_same_round", "x", statistics.median(paired), quantile(paired, 0.2),
            quantile(paired, 0.8), note=f"median of same-round ratios vs {base.variant}")
        row(run, "params_ratio", "x", run.params["total"] / base.params["total"], note=f"vs {base.variant}")
    return out


def table(result_rows: List[dict]) -> str:
    lines = ["| variant | s/step (p20-p80) | tokens/s | s/epoch | params (M) | time ratio (same-round p20-p80) "
             "| params ratio |", "|---|---|---|---|---|---|---|"]
    by = {}
    for r in result_rows:
        by.setdefault(r["provider"], {})[r["metric"]] = r
    for variant, m in by.items():
        step, ratio, paired = m["seconds_per_step"], m.get("time_ratio"), m.get("time_ratio_same_round")
        against = (f"{ratio['value']:.3f}x ({paired['value']:.3f}x, {paired['p20']:.3f}-{paired['p80']:.3f}) | "
                   f"{m['params_ratio']['value']:.2f}x" if ratio else "baseline | 1.00x")
        lines.append(f"| {variant} | {step['value']:.3f} ({step['p20']:.3f}-{step['p80']:.3f}) | "
                     f"{m['tokens_per_s']['value']:.0f} | {m['seconds_per_epoch']['value']:.0f} | "
                     f"{m['params_total']['value'] / 1e6:.2f} | {against} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lm.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="wt2")
    p.add_argument("--variants", default="tied_unfused,define",
                   help="comma list; the first is the baseline of the ratios")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round (their median counts)")
    p.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--csv", type=Path, default=None, help="output path (default: a new file in --out-dir)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: bench.lm.train arguments")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if len(args.variants) < 2 or args.rounds < 1 or args.steps < 1:
        p.error("--variants needs two or more names; --rounds and --steps at least 1")
    args.train_args = [a for a in args.train_args if a != "--"] or list(MODELS["transformer"]["args"])
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    meta = report.metadata(torch.device("cpu"))
    measured = measure(args.dataset, args.variants, args.rounds, args.steps, args.train_args,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    data_dir = measured["runs"][0].args.data_dir
    epoch_tokens = len(load_corpus(args.dataset, data_dir).train)
    result = rows(args.dataset, measured, epoch_tokens, meta)
    path = report.write_csv(result, args.csv or report.results_path(meta, args.out_dir, "lm-throughput"))
    print(f"{args.dataset}, {torch.get_num_threads()} threads, {meta['device']}, commit {meta['commit']}")
    print(table(result))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

"""Eval with the inference cache vs an nn.Embedding lookup, side by side (issue #9 item 5).

    python -m bench.cache_bench [--workload wt103-base] [--tokens 8192] [--corpus wikitext-2]

Both run under torch.inference_mode on the same ids; rounds alternate between the providers so
machine noise hits both alike. Besides the two end-to-end times it times the parts of a served
call (the parameter walk + fingerprint check, the gather alone) and the first eval call after a weight change
(lazy fill: the batch's distinct ids only), and serving from a table that holds only the batch's
rows. Medians with p20/p80 over rounds, ratios to nn.Embedding paired within each round; a long-format CSV
lands in bench/results/ (columns of bench/report.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from bench import report
from bench.timing import quantile, time_step
from bench.workloads import ZIPF, batch_ids, parse_workload
from define_kernels import DeFINE


def _summary(samples):
    return statistics.median(samples), quantile(samples, 0.2), quantile(samples, 0.8)


def measure(workload, ids, rounds: int, reps: int):
    device = torch.device("cpu")
    embedding = nn.Embedding(workload.vocab_size, workload.embedding_dim).eval()
    define = DeFINE(**workload.define_kwargs()).eval()
    started = time.perf_counter()
    define.materialize_cache()
    materialize_s = time.perf_counter() - started
    table = define.cache.table
    # A second module whose table holds only this batch's rows: a validation between training
    # steps, served from a partly filled table (one more lookup, of the filled flags).
    lazy = DeFINE(**workload.define_kwargs()).eval()
    with torch.inference_mode():
        lazy(ids)

    steps = {
        "embedding": lambda: embedding(ids),
        "define-cache": lambda: define(ids),
        "define-cache-lazy": lambda: lazy(ids),
        "part:param-check": lambda: define.cache._state.fingerprint.matches(define._parameter_list()),
        "part:gather": lambda: table.index_select(0, ids),
    }
    samples = {name: [] for name in steps}
    with torch.inference_mode():
        assert torch.equal(define(ids), table[ids])  # the served path really is the cache
        for _ in range(rounds):  # interleaved: each round times every step once
            for name, step in steps.items():
                samples[name].append(time_step(step, device, warmup=1, reps=reps).median)

    # First eval after a weight change: only the batch's distinct ids run through the stack.
    first = []
    for _ in range(3):
        with torch.no_grad():
            define.map_weight.mul_(1.0)  # an in-place write: the next call starts a new table
        started = time.perf_counter()
        with torch.inference_mode():
            define(ids)
        first.append(time.perf_counter() - started)
    return samples, first, materialize_s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="wt103-base")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--corpus", default="wikitext-2", help=f"ptb, wikitext-2 or {ZIPF}")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=3, help="timer blocks per step and round")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)

    workload = parse_workload(args.workload)
    try:
        ids = batch_ids(workload, args.tokens, args.corpus)
        corpus = args.corpus
    except FileNotFoundError as error:
        print(f"{error}; using Zipf ids")
        ids, corpus = batch_ids(workload, args.tokens, ZIPF), ZIPF
    unique = int(torch.unique(ids).numel())
    load_before = os.getloadavg()[0]
    samples, first, materialize_s = measure(workload, ids, args.rounds, args.reps)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"

    meta = report.metadata(torch.device("cpu"))
    base = dict(meta, workload=workload.name, mode="inference", dtype="float32", tokens=args.tokens,
                vocab_size=workload.vocab_size, unique_ids=unique, corpus=corpus)
    rows = []
    print(f"{workload.name}, {args.tokens} {corpus} ids ({unique} distinct), {meta['device']}, "
          f"torch {meta['torch']}; {args.rounds} interleaved rounds; {load}")
    print(f"{'step':<20} {'median ms':>10} {'p20':>8} {'p80':>8} "
          f"{'x nn.Embedding (paired per round: median, p20, p80)':>52}")
    for name, values in samples.items():
        median, p20, p80 = _summary(values)
        # Ratios paired within a round, so slow drifts of the machine's load cancel.
        ratio, ratio_p20, ratio_p80 = _summary([v / e for v, e in zip(values, samples["embedding"])])
        print(f"{name:<20} {median * 1e3:>10.3f} {p20 * 1e3:>8.3f} {p80 * 1e3:>8.3f} "
              f"{ratio:>30.3f} {ratio_p20:>10.3f} {ratio_p80:>10.3f}")
        provider = name.split(":", 1)[1] if name.startswith("part:") else name
        note = ("part of a served call; " if name.startswith("part:") else "") + load
        rows.append(dict(base, provider=provider, metric="time", unit="ms", value=median * 1e3,
                         p20=p20 * 1e3, p80=p80 * 1e3, note=note))
        rows.append(dict(base, provider=provider, metric="x_embedding", unit="x", value=ratio,
                         p20=ratio_p20, p80=ratio_p80, note="paired per round; " + note))
    median, p20, p80 = _summary(first)
    print(f"first eval after a weight change (lazy fill of {unique} ids): {median * 1e3:.1f} ms "
          f"(p20 {p20 * 1e3:.1f}, p80 {p80 * 1e3:.1f}); full materialization of "
          f"{workload.vocab_size} ids once: {materialize_s:.2f} s")
    rows.append(dict(base, provider="define-cache", metric="first_call_time", unit="ms",
                     value=median * 1e3, p20=p20 * 1e3, p80=p80 * 1e3, note="lazy fill after a weight change"))
    rows.append(dict(base, provider="define-cache", metric="materialize_time", unit="ms",
                     value=materialize_s * 1e3, note="materialize_cache(), every id"))
    if not args.no_csv:
        path = report.write_csv(rows, report.results_path(meta, tag=f"{workload.name}-cache"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

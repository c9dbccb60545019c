"""The CPU goals of issue 9 side by side in one run (wt103-base, WikiText-2 ids):

    python -m bench.cpu_goals [--tokens 8192] [--rounds 5] [--no-compile] [--write-ranking]

Every round times each case once, in a fixed order, with the fp32 and bf16 matmul yardsticks
([T, 928] x [928, 1024], the stack's biggest GEMM shape) measured in the same round, so a noisy
machine shows as spread rather than as a wrong ratio. Reports medians, p20-p80, and each case's
share of the same-round matmul rate; each goal as the ratio of the medians and as the median (and
p20-p80) of the ratios within a round, which this machine's swings of speed between rounds do not
move, and in how many rounds that ratio is under the goal. Writes
bench/results/<date>_cpu-goals_<commit>.csv and, with --write-ranking,
define_kernels/backends/measured_ranking.json (the `auto` order per dtype from the fwd+bwd times
of the backends measured here).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from define_kernels import DeFINE
from define_kernels import backends as registry
from define_kernels.workloads import WORKLOADS

from .plain_stack import PlainStack
from .workloads import batch_ids

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def converted_once(tensor: torch.Tensor):
    """dtype -> tensor in that dtype, each conversion made once and then handed out again."""
    by_dtype = {}

    def in_dtype(dtype):
        if dtype not in by_dtype:  # (dict.setdefault would convert on every call)
            by_dtype[dtype] = tensor.to(dtype)
        return by_dtype[dtype]
    return in_dtype


def build_cases(ids, compile_plain: bool):
    """name -> (callable running one step, FLOP of that step, description)."""
    w = WORKLOADS["wt103-base"]
    unique = int(torch.unique(ids).numel())
    macs = w.config().macs_per_token * unique
    cases = {}

    def define(backend, activations, dtype=torch.float32, sparse=False):
        torch.manual_seed(0)
        return DeFINE(**w.define_kwargs(), backend=backend, activations=activations, cache=False,
                      sparse=sparse).to(dtype)

    def fwd(module, autocast=False):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                module(ids)
        return run

    def output_grad():
        """The output's gradient in the output's dtype (downstream layers hand a bf16 output a
        bf16 gradient), converted at the first step only: later timed steps convert nothing."""
        return converted_once(torch.randn(ids.numel(), w.embedding_dim))

    def fwd_bwd(module, autocast=False):
        grad = output_grad()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(ids)
            y.backward(grad(y.dtype))
            module.zero_grad(set_to_none=True)
        return run

    def train(module, optimizers, autocast=False):
        grad = output_grad()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(ids)
            y.backward(grad(y.dtype))
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return run

    plain = PlainStack(define("torch", "recompute"))
    plain_bf16 = PlainStack(define("torch", "recompute", torch.bfloat16))
    cases["plain-eager fwd"] = (fwd(plain), 2 * macs, "fp32")
    cases["plain-eager fwd+bwd"] = (fwd_bwd(plain), 6 * macs, "fp32")
    cases["plain-eager bf16 fwd+bwd"] = (fwd_bwd(plain_bf16), 6 * macs, "bf16")
    if compile_plain:
        compiled = torch.compile(plain)
        cases["plain-compile fwd+bwd"] = (fwd_bwd(compiled), 6 * macs, "fp32")
    for policy in ("recompute", "save"):
        module = define("cpu_cpp", policy)
        cases[f"cpu_cpp-{policy} fwd"] = (fwd(module), 2 * macs, "fp32")
        flop = (8 if policy == "recompute" else 6) * macs
        cases[f"cpu_cpp-{policy} fwd+bwd"] = (fwd_bwd(module), flop, "fp32")
    module_bf16 = define("cpu_cpp", "save", torch.bfloat16)
    cases["cpu_cpp-save bf16 fwd+bwd"] = (fwd_bwd(module_bf16), 6 * macs, "bf16")
    module_ac = define("cpu_cpp", "save")
    cases["cpu_cpp-save autocast fwd+bwd"] = (fwd_bwd(module_ac, autocast=True), 6 * macs, "bf16")
    ref = define("torch", "recompute")
    cases["torch-recompute fwd+bwd"] = (fwd_bwd(ref), 8 * macs, "fp32")
    cases["torch-save fwd+bwd"] = (fwd_bwd(define("torch", "save")), 6 * macs, "fp32")
    cases["torch bf16 fwd+bwd"] = (fwd_bwd(define("torch", "recompute", torch.bfloat16)), 8 * macs, "bf16")
    emb = torch.nn.Embedding(w.vocab_size, w.embedding_dim)
    cases["embedding train fp32"] = (train(emb, [torch.optim.AdamW(emb.parameters(), fused=True)]), 0, "fp32")
    cases["embedding train autocast"] = (train(emb, [torch.optim.AdamW(emb.parameters(), fused=True)], True), 0, "bf16")
    dense = define("cpu_cpp", "save")
    cases["cpu_cpp train fp32"] = (train(dense, [torch.optim.AdamW(dense.parameters(), fused=True)]), 6 * macs, "fp32")
    cases["cpu_cpp train autocast"] = (train(dense, [torch.optim.AdamW(dense.parameters(), fused=True)], True), 6 * macs, "bf16")
    sparse = define("cpu_cpp", "save", sparse=True)
    rest = [p for n, p in sparse.named_parameters() if n != "map_weight"]
    sparse_opts = [torch.optim.SparseAdam([sparse.map_weight]), torch.optim.AdamW(rest, fused=True)]
    cases["cpu_cpp-sparse train fp32"] = (train(sparse, sparse_opts), 6 * macs, "fp32")
    cases["cpu_cpp-sparse train autocast"] = (train(sparse, sparse_opts, True), 6 * macs, "bf16")
    return cases, unique


# (label, cases whose best is the numerator, cases whose best is the denominator, goal)
GOALS = [
    ("cpu_cpp fp32 fwd+bwd / best plain", ["cpu_cpp-save fwd+bwd"], ["plain-eager fwd+bwd", "plain-compile fwd+bwd"], 0.90),
    ("cpu_cpp fp32 fwd / plain eager fwd", ["cpu_cpp-save fwd"], ["plain-eager fwd"], 0.90),
    ("cpu_cpp bf16 module fwd+bwd / fp32", ["cpu_cpp-save bf16 fwd+bwd"], ["cpu_cpp-save fwd+bwd"], 0.50),
    ("cpu_cpp autocast fwd+bwd / fp32", ["cpu_cpp-save autocast fwd+bwd"], ["cpu_cpp-save fwd+bwd"], 0.50),
    ("best DeFINE train fp32 / embedding fp32", ["cpu_cpp train fp32", "cpu_cpp-sparse train fp32"],
     ["embedding train fp32"], 0.90),
    ("best DeFINE train autocast / best embedding", ["cpu_cpp train autocast", "cpu_cpp-sparse train autocast"],
     ["embedding train fp32", "embedding train autocast"], 0.50),
]


def matmul_rate(rows: int, dtype) -> float:
    a, b = torch.randn(rows, 928).to(dtype), torch.randn(928, 1024).to(dtype)
    a @ b
    started = time.perf_counter()
    a @ b
    return 2 * rows * 928 * 1024 / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--write-ranking", action="store_true")
    args = parser.parse_args(argv)
    ids = batch_ids(WORKLOADS["wt103-base"], args.tokens, corpus="wikitext-2")
    cases, unique = build_cases(ids, not args.no_compile)
    for run, _, _ in cases.values():  # warm-up (JIT build, compile, allocator)
        run()
    times = {name: [] for name in cases}
    rates = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        rates["fp32"].append(matmul_rate(unique, torch.float32))
        rates["bf16"].append(matmul_rate(unique, torch.bfloat16))
        for name, (run, _, _) in cases.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    rows = []
    print(f"wt103-base, {args.tokens} WikiText-2 ids ({unique} distinct), {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; matmul fp32 {statistics.median(rates['fp32']) / 1e9:.0f} GFLOP/s "
          f"(min {min(rates['fp32']) / 1e9:.0f}, max {max(rates['fp32']) / 1e9:.0f}), bf16 "
          f"{statistics.median(rates['bf16']) / 1e9:.0f} GFLOP/s")
    print("| case | median ms | p20-p80 ms | GFLOP | % of same-round matmul rate |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        _, flop, kind = cases[name]
        q = statistics.quantiles(samples, n=5) if len(samples) > 1 else [samples[0]] * 4
        share = statistics.median(flop / t / r for t, r in zip(samples, rates[kind])) * 100 if flop else float("nan")
        rows.append(dict(case=name, median_ms=statistics.median(samples) * 1e3, p20_ms=q[0] * 1e3,
                         p80_ms=q[-1] * 1e3, gflop=flop / 1e9, matmul_share_pct=share, rate_kind=kind,
                         tokens=args.tokens, unique=unique, threads=torch.get_num_threads(),
                         matmul_fp32_gflops=statistics.median(rates["fp32"]) / 1e9,
                         matmul_bf16_gflops=statistics.median(rates["bf16"]) / 1e9,
                         torch=torch.__version__, commit=_commit()))
        print(f"| {name} | {rows[-1]['median_ms']:.1f} | {rows[-1]['p20_ms']:.1f}-{rows[-1]['p80_ms']:.1f} "
              f"| {flop / 1e9:.1f} | {share:.0f}% |")
    med = {r["case"]: r["median_ms"] for r in rows}
    print()
    goals = evaluate_goals(times, med)
    for goal in goals:
        print(f"{goal['label']}: {goal['of_medians']:.2f} (ratio of medians); same-round ratios: median "
              f"{goal['round_median']:.2f}, p20-p80 {goal['round_p20']:.2f}-{goal['round_p80']:.2f}, "
              f"under the goal in {goal['rounds_met']} of {goal['rounds']} rounds")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    path = RESULTS / f"{stamp}_cpu-goals_{_commit()}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + ["same_round_ratio_median", "same_round_ratio_p20",
                                                                    "same_round_ratio_p80", "rounds_under_goal"])
        writer.writeheader()
        writer.writerows(rows)
        for goal in goals:  # median_ms: the ratio of medians
            writer.writerow({"case": "goal: " + goal["label"], "median_ms": goal["of_medians"],
                             "same_round_ratio_median": goal["round_median"], "same_round_ratio_p20": goal["round_p20"],
                             "same_round_ratio_p80": goal["round_p80"],
                             "rounds_under_goal": f"{goal['rounds_met']}/{goal['rounds']}"})
    print(f"wrote {path}")
    if args.write_ranking:
        write_ranking(med, path.name)


def evaluate_goals(times: dict, med: dict) -> list:
    """Each goal of GOALS over the cases present: the ratio of the medians (med, ms), and the
    ratio within each round (times: case -> seconds per round, same machine state), with its
    median, p20-p80 and how many rounds are under the goal."""
    goals = []
    for label, better_of, against, goal in GOALS:
        better_of, against = [n for n in better_of if n in times], [n for n in against if n in times]
        if not better_of or not against:
            continue
        rounds = len(times[better_of[0]])
        per_round = [min(times[n][r] for n in better_of) / min(times[n][r] for n in against) for r in range(rounds)]
        q = statistics.quantiles(per_round, n=5) if rounds > 1 else per_round * 4
        goals.append(dict(label=f"{label} (goal <= {goal:.2f})", goal=goal,
                          of_medians=min(med[n] for n in better_of) / min(med[n] for n in against),
                          round_median=statistics.median(per_round), round_p20=q[0], round_p80=q[-1],
                          rounds_met=sum(r <= goal for r in per_round), rounds=rounds))
    return goals


def write_ranking(med: dict, source: str) -> None:
    """`auto` order on CPU per dtype from this run's fwd+bwd medians (best policy per backend)."""
    fp32 = {"cpu_cpp": min(med["cpu_cpp-save fwd+bwd"], med["cpu_cpp-recompute fwd+bwd"]),
            "torch": min(med["torch-recompute fwd+bwd"], med["torch-save fwd+bwd"])}
    bf16 = {"cpu_cpp": med["cpu_cpp-save bf16 fwd+bwd"], "torch": med["torch bf16 fwd+bwd"]}
    ranking = {"float32": sorted(fp32, key=fp32.get), "bfloat16": sorted(bf16, key=bf16.get)}
    data = {"source": f"bench/results/{source} (python -m bench.cpu_goals --write-ranking)",
            "ranking": {"cpu": ranking}}
    registry.MEASURED_RANKING.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {registry.MEASURED_RANKING}: {ranking}")


if __name__ == "__main__":
    main()

"""Where a cpu_cpp forward+backward step spends its time, per dtype (wt103-base, WikiText-2 ids):

    python -m bench.cpu_profile [--tokens 8192] [--steps 6] [--top 12]

torch.profiler over a few steps of the "save" policy in fp32, bf16 (module in bf16) and fp32
weights under bf16 autocast; self CPU time per step of each op and each C++ scope
(`define_kernels::cpu::*`), the GEMMs grouped as one line. The numbers the README quotes for the
CPU goals' misses come from here. Writes bench/results/<date>_cpu-profile_<commit>.csv.
"""
from __future__ import annotations

import argparse
import collections
import csv
import datetime

import torch
from torch.profiler import profile

from define_kernels import DeFINE
from define_kernels.workloads import WORKLOADS

from .cpu_goals import RESULTS, _commit
from .workloads import batch_ids

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")
GEMMS_KEY = "GEMMs (aten::mm, addmm, bmm, baddbmm, mkldnn::_linear_pointwise)"


def profile_step(mode: str, ids: torch.Tensor, steps: int) -> dict:
    """op or scope -> (ms per step, calls per step) for one mode."""
    w = WORKLOADS["wt103-base"]
    torch.manual_seed(0)
    module = DeFINE(**w.define_kwargs(), backend="cpu_cpp", activations="save", cache=False)
    if mode == "bf16":
        module = module.to(torch.bfloat16)
    grad = torch.randn(ids.numel(), w.embedding_dim).to(torch.float32 if mode == "fp32" else torch.bfloat16)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            y = module(ids)
        y.backward(grad)
        module.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with profile() as prof:
        for _ in range(steps):
            step()
    totals = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        key = GEMMS_KEY if event.key in GEMMS else event.key
        totals[key][0] += event.self_cpu_time_total / 1e3 / steps
        totals[key][1] += event.count // steps
    return {key: tuple(value) for key, value in totals.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    ids = batch_ids(WORKLOADS["wt103-base"], args.tokens, corpus="wikitext-2")
    rows = []
    for mode in ("fp32", "bf16", "autocast"):
        totals = profile_step(mode, ids, args.steps)
        total = sum(ms for ms, _ in totals.values())
        print(f"{mode}: {total:.1f} ms per step (self time of each op or scope, on the calling thread)")
        for key, (ms, calls) in sorted(totals.items(), key=lambda item: -item[1][0])[:args.top]:
            print(f"  {key[:60]:60s} {ms:7.2f} ms  {calls:4d} calls")
        for key, (ms, calls) in totals.items():
            rows.append(dict(mode=mode, key=key, ms_per_step=ms, calls_per_step=calls, total_ms=total,
                             tokens=args.tokens, threads=torch.get_num_threads(), torch=torch.__version__,
                             commit=_commit()))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    path = RESULTS / f"{stamp}_cpu-profile_{_commit()}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

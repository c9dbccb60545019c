"""Fused CPU LM-head loss (define_kernels_C.lm_head_*) against the unfused F.linear + F.cross_entropy,
forward + backward, measured alternately in one process (medians over rounds).

    python -m bench.lm_head_cpu [--rounds 3] [--tokens 4096] [--vocab 267735] [--width 128] [--no-baseline]

Default sizes: wt103-base (V = 267,735, n = 128, T = 4,096 Zipf(1.1) targets). The yardstick is
one big ATen GEMM of the same inner size in the same round; "share" is the fused run's GEMM rate
(4 GEMMs of 2 T V n flops: forward logits, recomputed logits, grad_x, grad_table; 2 more with the
augmented loss) over it.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from define_kernels.backends import cpp_ext


def zipf_targets(tokens, vocab, gen, exponent=1.1):
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    return torch.multinomial(weights, tokens, replacement=True, generator=gen)


def fused(x, table, targets, compute, augmented):
    ops = torch.ops.define_kernels_C
    args = (-1, 0.0, 0.0, augmented, 0.5 if augmented else 0.0, 2.0, compute)
    loss, _, _, stats = ops.lm_head_forward(x, table, None, targets, *args)
    grad = torch.full_like(loss, 1.0 / len(loss))
    return ops.lm_head_backward(grad, x, table, None, targets, stats, *args)


def unfused(x, table, targets, autocast):
    x = x.detach().requires_grad_()
    table = table.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(F.linear(x, table), targets)
    loss.backward()
    return x.grad, table.grad


def yardstick(tokens, width, dtype):
    a = torch.randn(tokens, width).to(dtype)
    b = torch.randn(32768, width).to(dtype)
    torch.mm(a, b.T)
    start = time.perf_counter()
    torch.mm(a, b.T)
    return 2 * tokens * 32768 * width / (time.perf_counter() - start) / 1e9


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=267735)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated subset of runs")
    opts = parser.parse_args()
    cpp_ext.load_library()
    gen = torch.Generator().manual_seed(0)
    T, V, n = opts.tokens, opts.vocab, opts.width
    x = torch.randn(T, n, generator=gen) * 0.5
    table = torch.randn(V, n, generator=gen) * 0.1
    targets = zipf_targets(T, V, gen)
    xb = x.bfloat16()
    runs = {
        "fused fp32": lambda: fused(x, table, targets, torch.float32, False),
        "fused bf16": lambda: fused(xb, table, targets, torch.bfloat16, False),
        "fused fp32 aug": lambda: fused(x, table, targets, torch.float32, True),
        "fused bf16 aug": lambda: fused(xb, table, targets, torch.bfloat16, True),
        "yardstick fp32": lambda: yardstick(T, n, torch.float32),
        "yardstick bf16": lambda: yardstick(T, n, torch.bfloat16),
    }
    if not opts.no_baseline:
        runs["unfused fp32"] = lambda: unfused(x, table, targets, False)
        runs["unfused bf16 autocast"] = lambda: unfused(x, table, targets, True)
    if opts.only:
        keep = opts.only.split(",")
        runs = {k: v for k, v in runs.items() if k in keep or k.startswith("yardstick")}
    for fn in runs.values():  # warm-up: JIT, pools, oneDNN primitives
        fn()
    results = {name: [] for name in runs}
    for _ in range(opts.rounds):
        for name, fn in runs.items():
            results[name].append(fn() if name.startswith("yardstick") else timed(fn))
    med = {name: statistics.median(v) for name, v in results.items()}
    flop = 2 * T * V * n / 1e9
    print(f"T={T} V={V} n={n} threads={torch.get_num_threads()} rounds={opts.rounds}")
    for name, value in med.items():
        if name.startswith("yardstick"):
            print(f"{name:24s} {value:8.0f} GFLOP/s")
            continue
        line = f"{name:24s} {value:8.3f} s"
        if name.startswith("fused"):
            gemms = 6 if name.endswith("aug") else 4
            kind = "bf16" if "bf16" in name else "fp32"
            rate = gemms * flop / value
            line += f"  {rate:6.0f} GFLOP/s ({rate / med['yardstick ' + kind]:.0%} of yardstick)"
            base = med.get("unfused bf16 autocast" if kind == "bf16" else "unfused fp32")
            if base:
                line += f"  {value / base:.3f}x unfused"
            if name.endswith("aug") and f"fused {kind}" in med:
                line += f"  {value / med['fused ' + kind]:.2f}x CE-only"
        print(line)


if __name__ == "__main__":
    main()

"""`python -m bench.gpu_lm_head`: the LM-head loss's `triton` backend on a GPU, without pytest.

correctness  lm_head_loss(backend="triton") against reference.py run in float64 (backend
             "reference"), fp32 and bf16, per case: plain CE with a bias and a padding row,
             label smoothing, z-loss, the augmented loss (kl_scale tau), and the augmented loss
             with small vocabulary chunks (many chunks and a partial last one). Per-token loss /
             ce / kl and the gradients of h, table and bias, with python_tests/tolerances.py's
             rules (bf16: at most twice reference.py's own error in bf16, plus the bf16 floor).
timing       wt103-base's output layer (V = 267,735, n = 128) at T = 4,096 and 8,192 tokens,
             bf16, mean cross-entropy, forward (no grad) and forward + backward: define-triton
             against the unfused F.linear + F.cross_entropy (bf16 [T, V] logits, as a model
             without a fused loss computes it) and torch's chunked F.linear_cross_entropy with
             LinearCrossEntropyOptions() where the installed torch has it (else a row saying so).
             Median (p20-p80) ms from bench.timing and torch.cuda.max_memory_allocated over one
             step (inputs included).
Exit 1 on any mismatch, error or timing failure. `--dry-run`: CPU, Triton's interpreter
(TRITON_INTERPRET=1 unless set), tiny sizes, one rep: the plumbing only.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from define_kernels.lm_head import lm_head_loss
from bench import timing

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name -> lm_head_loss options (+ "small_chunks": scratch budget for many chunks)
    "ce-bias-padding": dict(bias=True, padding_idx=7),
    "smoothing": dict(label_smoothing=0.1),
    "z-loss": dict(z_loss=1e-3, bias=True),
    "augmented": dict(alpha=0.5, tau=2.0, padding_idx=7),
    "augmented-small-chunks": dict(alpha=0.5, tau=2.0, kl_scale="tau2", bias=True, label_smoothing=0.1,
                                   small_chunks=1 << 16),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _tolerances():
    """python_tests/tolerances.py, loaded by path (the one tolerance table; no pytest needed)."""
    spec = importlib.util.spec_from_file_location("dk_tolerances", REPO / "python_tests" / "tolerances.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(backend, h, table, bias, targets, options, dtype, weight):
    """Per-token (loss, ce, kl) and the gradients of sum(loss * weight) w.r.t. (h, table, bias)."""
    leaves = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (h, table, bias)]
    loss_options = {k: v for k, v in options.items() if k not in ("bias", "small_chunks")}
    parts = lm_head_loss(leaves[0], leaves[1], targets, bias=leaves[2], reduction="none", backend=backend,
                         return_parts=True, **loss_options)
    grads = torch.autograd.grad((parts.loss * weight).sum(), [t for t in leaves if t is not None])
    return [parts.loss.detach(), parts.ce, parts.kl] + list(grads)


def check_case(options, dtype, device, tokens, vocab, width, tol) -> None:
    """Raises AssertionError naming the tensor on a mismatch."""
    from define_kernels.lm_head import triton_backend  # registers it: after main() set the environment
    h = torch.randn(tokens, width, device=device, dtype=torch.float64)
    table = 0.5 * torch.randn(vocab, width, device=device, dtype=torch.float64)
    bias = 0.3 * torch.randn(vocab, device=device, dtype=torch.float64) if options.get("bias") else None
    targets = torch.randint(0, vocab, (tokens,), device=device)
    targets[: tokens // 10] = -100
    targets[-1] = vocab - 1
    if options.get("padding_idx") is not None:
        targets[-2] = options["padding_idx"]
    weight = torch.rand(tokens, device=device, dtype=torch.float32) + 0.5
    saved = triton_backend.SCRATCH_ELEMENTS
    triton_backend.SCRATCH_ELEMENTS = options.get("small_chunks", saved)
    try:
        actual = _run("triton", h, table, bias, targets, options, dtype, weight)
    finally:
        triton_backend.SCRATCH_ELEMENTS = saved
    rounded = [t.to(dtype).double() if t is not None else None for t in (h, table, bias)]
    exact = _run("reference", *rounded, targets, options, torch.float64, weight.double())
    names = ["loss", "ce", "kl", "grad_h", "grad_table", "grad_bias"]
    if dtype == torch.float32:
        for got, want, name in zip(actual, exact, names):
            tol.assert_close(got, want.to(got.dtype), dtype=torch.float32, name=name)
        return
    in_dtype = _run("reference", h, table, bias, targets, options, dtype, weight)
    for got, want, ref, name in zip(actual, exact, in_dtype, names):
        error = (got.double() - want).abs().max().item() if got.numel() else 0.0
        bound = 2 * ((ref.double() - want).abs().max().item() if got.numel() else 0.0) \
            + tol.LOW_PRECISION_FLOOR[dtype]
        if error > bound:
            raise AssertionError(f"{tol._describe(got, want, name)}; bound {bound:.3e}")


def correctness(args, device) -> list:
    tol = _tolerances()
    results = []
    for dtype_name in args.dtypes.split(","):
        for case, options in CASES.items():
            label = f"correctness {dtype_name} {case}"
            started = time.perf_counter()
            try:
                check_case(options, DTYPES[dtype_name], device, args.check_tokens, args.check_vocab,
                           args.check_width, tol)
                ok, error = True, None
            except Exception as exc:  # noqa: BLE001 - a kernel error is a result here
                ok, error = False, f"{type(exc).__name__}: {exc}"
                traceback.print_exc(limit=3)
            seconds = time.perf_counter() - started
            print(f"{'PASS' if ok else 'FAIL'} {label} ({seconds:.1f} s){'' if ok else ': ' + error}", flush=True)
            results.append(dict(case=label, ok=ok, error=error, seconds=round(seconds, 2)))
    return results


def torch_chunked_loss():
    """torch's chunked linear cross-entropy, or (None, why not)."""
    if not hasattr(F, "linear_cross_entropy"):
        return None, f"torch {torch.__version__} has no F.linear_cross_entropy"
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_cls is None:
        return None, (f"torch {torch.__version__} has F.linear_cross_entropy but no LinearCrossEntropyOptions "
                      f"(unchunked)")
    return (lambda h, table, targets: F.linear_cross_entropy(h, table, targets, options=options_cls())), None


def providers():
    chunked, reason = torch_chunked_loss()
    return {
        "define-triton": (lambda h, table, targets: lm_head_loss(h, table, targets, backend="triton"), None),
        "unfused": (lambda h, table, targets: F.cross_entropy(F.linear(h, table), targets), None),
        "torch-linear-cross-entropy": (chunked, reason),
    }


def time_provider(loss_fn, tokens, args, device) -> list:
    h = torch.randn(tokens, args.width, device=device, dtype=torch.bfloat16, requires_grad=True)
    table = (0.05 * torch.randn(args.vocab, args.width, device=device)).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (tokens,), device=device)

    def forward():
        with torch.no_grad():
            return loss_fn(h, table, targets)

    def train():
        h.grad = table.grad = None
        loss_fn(h, table, targets).backward()

    rows = []
    for mode, step in (("forward", forward), ("forward+backward", train)):
        measured = timing.time_step(step, device, warmup=args.warmup, reps=args.reps)
        peak = timing.peak_memory(step, device, lambda: [h, table, targets, h.grad, table.grad])
        rows.append(dict(mode=mode, ms=round(measured.median * 1e3, 3), p20_ms=round(measured.p20 * 1e3, 3),
                         p80_ms=round(measured.p80 * 1e3, 3), peak_mb=round(peak / 2**20, 1)))
    return rows


def benchmark(args, device) -> list:
    results = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for name, (loss_fn, reason) in providers().items():
            base = dict(provider=name, tokens=tokens, vocab=args.vocab, width=args.width, dtype="bfloat16",
                        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        torch=torch.__version__)
            if loss_fn is None:
                print(f"SKIP timing {name} T={tokens}: {reason}", flush=True)
                results.append(dict(base, ok=True, note=reason))
                continue
            try:
                for row in time_provider(loss_fn, tokens, args, device):
                    print(f"TIME {name} T={tokens} {row['mode']}: {row['ms']} ms ({row['p20_ms']}-{row['p80_ms']}), "
                          f"peak {row['peak_mb']} MiB", flush=True)
                    results.append(dict(base, ok=True, **row))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: a result, not a crash
                traceback.print_exc(limit=3)
                results.append(dict(base, ok=False, error=f"{type(exc).__name__}: {exc}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def _write(results, args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    timed = [r for r in results if "provider" in r]
    if args.csv and timed:
        fields = sorted({k for r in timed for k in r})
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_lm_head", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default="correctness,timing")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="correctness dtypes")
    parser.add_argument("--check-tokens", type=int, default=301)
    parser.add_argument("--check-vocab", type=int, default=5003)
    parser.add_argument("--check-width", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=267_735)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one rep (plumbing)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--csv", default=None, help="timing rows")
    args = parser.parse_args(argv)
    if args.dry_run:
        # before the first use imports triton (and the registry reads it): CPU tensors need the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.device, args.check_tokens, args.check_vocab, args.check_width = "cpu", 23, 70, 8
        # the interpreter runs every program in Python: a few programs per launch at most
        args.vocab, args.width, args.tokens, args.reps, args.warmup = 61, 8, "8", 1, 1
        args.dtypes = "float32"  # bf16 runs the same code; CI's pytest covers it under the interpreter
        CASES["augmented-small-chunks"]["small_chunks"] = 1 << 8
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = []
    parts = args.parts.split(",")
    if "correctness" in parts:
        results += correctness(args, device)
    if "timing" in parts:
        results += benchmark(args, device)
    _write(results, args)
    failed = [r for r in results if not r["ok"]]
    print(json.dumps(dict(results=len(results), failed=len(failed))))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.gpu_correctness`: the GPU backends against the float64 reference, without pytest.

For `make gpu-check` on a GPU machine that has only torch and triton: per backend (triton, cuda),
dtype (bf16/fp16/fp32), config (three, one with odd widths) and dropout off/on, the forward and
every gradient (gathered rows and each parameter) are compared with the reference run in float64,
with the tolerances of python_tests/tolerances.py (fp16/bf16: at most twice the reference's own
error in that dtype plus a floor). Prints one line per case and a JSON summary; exit 1 on any
mismatch or kernel error. `--small` runs one small case per backend (the compute-sanitizer run),
`--device cpu --backends cpu_cpp --dtypes float32` proves the plumbing on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from define_kernels import backends, reference
from define_kernels.config import HGTConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "define-halve": HGTConfig(in_dim=32, expand_dim=96, out_dim=48, depth=3, max_groups=4),
    "cycle-shuffle-relu": HGTConfig(in_dim=24, expand_dim=72, out_dim=20, depth=3, max_groups=4,
                                    group_rule="cycle", shuffle=True, act="relu"),
    "hgt-odd-widths": HGTConfig(in_dim=6, expand_dim=29, out_dim=7, depth=2, max_groups=2,
                                transform="hgt", align=1),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _tolerances():
    """python_tests/tolerances.py, loaded by path (the one tolerance table; no pytest needed)."""
    spec = importlib.util.spec_from_file_location("dk_tolerances", REPO / "python_tests" / "tolerances.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_params(config: HGTConfig, dtype, device):
    """Random parameters with non-trivial biases and LN affines, so every gradient matters."""
    shapes, params = iter(config.param_shapes()), []
    for index in range(len(config.layers)):
        weight_shape, bias_shape = next(shapes), next(shapes)
        params += [torch.randn(weight_shape, dtype=torch.float64) / math.sqrt(weight_shape[1]),
                   0.1 * torch.randn(bias_shape, dtype=torch.float64)]
        if config.layer_has_norm(index):
            norm_shape, _ = next(shapes), next(shapes)
            params += [1.0 + 0.1 * torch.randn(norm_shape, dtype=torch.float64),
                       0.1 * torch.randn(norm_shape, dtype=torch.float64)]
    return [p.to(device=device, dtype=dtype) for p in params]


def check_case(backend_name, config, dtype, device, rows, dropout, tol) -> None:
    """Raises AssertionError (naming the tensor) on a mismatch."""
    if dropout:
        config = dataclasses.replace(config, dropout=0.25)
    seed = 1234 if dropout else None
    table_rows = max(rows // 2, 1)
    x = torch.randn(table_rows, config.in_dim, dtype=torch.float64).to(device, dtype)
    ids = torch.randint(0, table_rows, (rows,), device=device)
    params = make_params(config, dtype, device)
    scale = 1.25
    inputs = backends.OpInputs(x, ids, params, config, scale, seed)
    backend = backends._REGISTRY[backend_name]
    reasons = backend.not_supported_reasons(inputs)
    if reasons:
        raise RuntimeError(f"backend {backend_name} cannot run this case: {'; '.join(reasons)}")
    y = backend.forward(x, ids, params, config, scale, seed)
    torch.cuda.synchronize() if device == "cuda" else None
    double = [p.double() for p in params]
    grad_y = torch.randn_like(y)

    def expect(actual, exact, in_dtype, name):
        if actual.dtype in (torch.float16, torch.bfloat16):
            tol.assert_low_precision_close(actual, exact, in_dtype, name=name)
        else:
            tol.assert_close(actual, exact.to(actual.dtype), dtype=actual.dtype, name=name)

    expect(y, reference.hgt_forward(x.double(), ids, double, config, scale, seed),
           reference.hgt_forward(x, ids, params, config, scale, seed), "forward")
    grad_rows, grad_params = backend.backward(grad_y, x, ids, params, config, scale, seed)
    exact_rows, exact_params = reference.hgt_backward(grad_y.double(), x.double(), ids, double, config, scale, seed)
    ref_rows, ref_params = reference.hgt_backward(grad_y, x, ids, params, config, scale, seed)
    expect(grad_rows, exact_rows, ref_rows, "grad_rows")
    if len(grad_params) != len(params):
        raise AssertionError(f"{len(grad_params)} parameter gradients for {len(params)} parameters")
    for index, (got, exact, ref) in enumerate(zip(grad_params, exact_params, ref_params)):
        expect(got, exact, ref, f"grad params[{index}] {tuple(params[index].shape)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_correctness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=129, help="ids per case (past a 64-row tile edge)")
    parser.add_argument("--small", action="store_true", help="one small fp32 case per backend, no dropout")
    parser.add_argument("--json", default=None, help="write the summary here too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tol = _tolerances()
    names = [name for name in args.backends.split(",") if name]
    dtypes = ["float32"] if args.small else [d for d in args.dtypes.split(",") if d]
    configs = {"define-halve": CONFIGS["define-halve"]} if args.small else CONFIGS
    rows = 70 if args.small else args.rows
    results = []
    for name in names:
        reason = backends._REGISTRY[name].unavailable_reason() if name in backends._REGISTRY else "not registered"
        if reason:
            print(f"FAIL {name}: unavailable: {reason}", flush=True)
            results.append(dict(backend=name, case="all", ok=False, error=f"unavailable: {reason}"))
            continue
        for dtype_name in dtypes:
            for config_name, config in configs.items():
                for dropout in ([False] if args.small else [False, True]):
                    case = f"{name} {dtype_name} {config_name} dropout={'on' if dropout else 'off'}"
                    started = time.perf_counter()
                    try:
                        check_case(name, config, DTYPES[dtype_name], args.device, rows, dropout, tol)
                        ok, error = True, None
                    except Exception as exc:  # noqa: BLE001 - a kernel error is a result here
                        ok, error = False, f"{type(exc).__name__}: {exc}"
                        traceback.print_exc(limit=2)
                    seconds = time.perf_counter() - started
                    print(f"{'PASS' if ok else 'FAIL'} {case} ({seconds:.1f} s){'' if ok else ': ' + error}",
                          flush=True)
                    results.append(dict(backend=name, case=case, ok=ok, error=error, seconds=round(seconds, 2)))
    failed = [r for r in results if not r["ok"]]
    summary = dict(cases=len(results), failed=len(failed), results=results)
    print(json.dumps(dict(cases=len(results), failed=len(failed))))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())

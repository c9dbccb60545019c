"""Runs many drawn bad-input cases in one process and prints one JSON line per case.

Started by test_fuzz_bad_inputs.py in a subprocess, so a segfault or a hang is a failure there
instead of killing the test run. Argument: a JSON object {"seed", "count", "backends"}.
Each line: {"case", "backend", "outcome": "raised"|"returned", "type", "message", "finite"}.
"""
import json
import random
import sys

import torch

from define_kernels import DeFINE, HGTConfig, functional
from define_kernels.backends import cpp_ext

CONFIG = HGTConfig(8, 20, 5, 2, 2, align=2, dropout=0.25)


def params_for(config, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) * 0.5 for s in config.param_shapes()]


def outcome(call):
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - the type is what is reported
        return {"outcome": "raised", "type": type(error).__name__, "message": str(error)[:300]}
    tensors = result if isinstance(result, (list, tuple)) else [result]
    return {"outcome": "returned", "finite": all(bool(torch.isfinite(t).all()) for t in tensors)}


def op_call(backend, x, ids, params, seed=None, grad=False):
    def call():
        leaves = [x.requires_grad_(grad) if x.is_floating_point() else x] + \
                 [p.requires_grad_(grad) if p.is_floating_point() else p for p in params]
        y = functional.hgt(leaves[0], leaves[1:], CONFIG, ids=ids, seed=seed, backend=backend)
        if not grad:
            return y
        return [y, *torch.autograd.grad(y.sum(), leaves)]
    return call


def draw_cases(rng, backends):
    """(case name, backend, call) triples; the expected outcome is in the case name's prefix."""
    cases = []
    vocab = 11
    for backend in backends:
        for _ in range(4):
            ids = torch.tensor([rng.randrange(vocab) for _ in range(rng.randrange(1, 9))])
            bad = rng.choice([vocab, vocab + rng.randrange(1, 1000), -1, -rng.randrange(2, 1000)])
            ids[rng.randrange(ids.numel())] = bad
            ids = ids.to(rng.choice([torch.int32, torch.int64]))
            x = torch.randn(vocab, 8)
            cases.append((f"index:op id {bad}", backend, op_call(backend, x, ids, params_for(CONFIG))))
            module = rng.choice(["train", "no-dedup", "eval", "sparse", "in-proj"])
            model = DeFINE(vocab, 5, map_dim=8, expand_dim=20, depth=2, max_groups=2, backend=backend,
                           dedup=module != "no-dedup", sparse=module == "sparse",
                           in_proj_dim=8 if module == "in-proj" else None)
            model.train(module != "eval")
            cases.append((f"index:module {module} id {bad}", backend, lambda m=model, i=ids: m(i.reshape(1, -1))))
        x, params = torch.randn(6, 8), params_for(CONFIG)
        index = rng.randrange(len(params))
        wrong = list(params)
        wrong[index] = torch.randn(*[s + rng.choice([1, 2]) for s in params[index].shape])
        cases.append((f"value:params[{index}] shape", backend, op_call(backend, x, None, wrong)))
        wrong = list(params)
        wrong[index] = wrong[index].double()
        cases.append((f"value:params[{index}] dtype", backend, op_call(backend, x, None, wrong)))
        cases.append(("value:params count", backend, op_call(backend, x, None, params[:-1])))
        cases.append(("value:x width", backend, op_call(backend, torch.randn(6, 7), None, params)))
        cases.append(("value:x dtype", backend, op_call(backend, torch.zeros(6, 8, dtype=torch.int64), None, params)))
        for id_dtype in (torch.float32, torch.bool, torch.int16, torch.uint8):
            ids = torch.zeros(3, dtype=id_dtype)
            cases.append((f"value:ids dtype {id_dtype}", backend, op_call(backend, torch.randn(4, 8), ids, params)))
        cases.append(("value:ids device", backend,
                      op_call(backend, torch.randn(4, 8), torch.zeros(3, dtype=torch.long, device="meta"), params)))
        cases.append(("value:params[1] device", backend,
                      op_call(backend, x, None, [params[0], params[1].to("meta"), *params[2:]])))
        for where in ("x", "params"):
            for value in (float("nan"), float("inf"), float("-inf")):
                x, params = torch.randn(6, 8), params_for(CONFIG)
                target = x if where == "x" else params[rng.randrange(len(params))]
                target.view(-1)[rng.randrange(target.numel())] = value
                seed = torch.tensor(rng.randrange(2**31 - 1)) if rng.random() < 0.5 else None
                cases.append((f"nonfinite:{where} {value}", backend,
                              op_call(backend, x, torch.tensor([0, 5, 5]), params, seed, grad=True)))
    if "cpu_cpp" in backends:  # the C++ op's own checks, below the Python ones
        for bad in (11, -1, 2**40, -2**40):
            x, params = torch.randn(11, 8), params_for(CONFIG)
            ids = torch.tensor([0, 3, bad])
            cases.append((f"index:C++ op id {bad}", "cpu_cpp",
                          lambda x=x, ids=ids, params=params: torch.ops.define_kernels_C.hgt_forward(
                              x, ids, params, *cpp_ext.cpp_args(CONFIG, 1.0, None))))
    return cases


def main():
    spec = json.loads(sys.argv[1])
    torch.manual_seed(spec["seed"])
    rng = random.Random(spec["seed"])
    for name, backend, call in draw_cases(rng, spec["backends"]):
        print(json.dumps({"case": name, "backend": backend, **outcome(call)}), flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()

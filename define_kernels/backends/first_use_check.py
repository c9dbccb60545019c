"""Guarded first use of the GPU backends: a wrong kernel is demoted before a model trains on it.

The first time a guarded backend (`GUARDED`: triton, cuda) is selected for a (config, dtype,
device, dropout on/off) in this process, it runs the forward and the backward on a few of the
call's own rows (at most `PROBE_ROWS`) and is compared with the reference: fp32 against the fp64
reference with the fp32 tolerances, fp16/bf16 by the low-precision rule (at most twice as far from
the fp64 result as the reference run in that dtype, plus a floor). Gradients are compared relative
to their largest magnitude, as the tests do. A mismatch or an exception demotes the backend for
the whole process with one RuntimeWarning naming the reason; `select()` then skips it under
'auto' (so the next backend by priority runs) and refuses it by name. Passing keys are remembered,
so every later call costs one dict lookup.

Set DEFINE_KERNELS_NO_FIRST_USE_CHECK=1 to turn the check off (read on every selection).
A CUDA fault that corrupts the context (illegal address) cannot be recovered from in-process;
the check then only reports it earlier and with a clearer name.

The tolerance numbers are the ones of python_tests/tolerances.py (the test suite's table reads
them from here).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import env, reference

ENV_DISABLE = "DEFINE_KERNELS_NO_FIRST_USE_CHECK"
GUARDED = frozenset({"triton", "cuda"})
PROBE_ROWS = 8

ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
RTOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
LOW_PRECISION_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

_passed: set = set()
_demoted: dict = {}  # backend name -> reason


def enabled() -> bool:
    return not env.flag(ENV_DISABLE)


def demotion_reason(name: str) -> Optional[str]:
    """Why `name` was demoted in this process, or None."""
    return _demoted.get(name)


def reset() -> None:
    """Forget every result (tests; or after fixing a backend in a live process)."""
    _passed.clear()
    _demoted.clear()


def _key(backend, inputs) -> tuple:
    return (backend.name, inputs.config, inputs.x.dtype, inputs.x.device,
            inputs.seed is not None and inputs.config.dropout > 0)


def reasons(backend, inputs) -> list:
    """[] when `backend` may run `inputs`; else the demotion reason (checking on first use)."""
    if backend.name not in GUARDED or not enabled():
        return []
    if backend.name in _demoted:
        return [f"demoted by the first-use check: {_demoted[backend.name]}"]
    key = _key(backend, inputs)
    if key in _passed:
        return []
    # inference_mode off and fresh copies: the reference's gradients need autograd even when the
    # first call comes from an inference_mode block.
    with torch.inference_mode(False):
        failure = _compare(backend, inputs)
    if failure is None:
        _passed.add(key)
        return []
    dtype = str(inputs.x.dtype).replace("torch.", "")
    _demoted[backend.name] = f"{dtype} {inputs.config.key}: {failure}"
    warnings.warn(f"define_kernels: backend {backend.name!r} failed its first-use check against the "
                  f"reference and is disabled for this process ({_demoted[backend.name]}); "
                  f"set {ENV_DISABLE}=1 to skip the check", RuntimeWarning, stacklevel=3)
    return [f"demoted by the first-use check: {_demoted[backend.name]}"]


def _probe(inputs):
    """(x, ids, params) of at most PROBE_ROWS rows of the call itself, detached copies."""
    x, ids = inputs.x.detach(), inputs.ids
    if ids is None:
        x = x[:PROBE_ROWS].clone()
    else:  # a compact table of the probed ids' rows (ids renumbered, their dtype kept)
        unique, inverse = torch.unique(ids[:PROBE_ROWS], return_inverse=True)
        x, ids = x[unique.long()].clone(), inverse.to(ids.dtype)
    return x, ids, [p.detach().clone() for p in inputs.params]


def _scaled(actual, expected, normalize: bool):
    """(actual, expected) in fp64; gradients (they sum over tokens) relative to their scale."""
    actual, expected = actual.double(), expected.double()
    if normalize and expected.numel():
        size = expected.abs().max().clamp_min(1.0)
        actual, expected = actual / size, expected / size
    return actual, expected


def _within(name, actual, exact, in_dtype, dtype, normalize) -> Optional[str]:
    """None when `actual` is close enough to the fp64 result `exact`, else a description."""
    if actual.shape != exact.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    if actual.numel() == 0:
        return None
    if not torch.isfinite(actual).all():
        return f"{name}: non-finite values"
    actual, exact_scaled = _scaled(actual, exact, normalize)
    diff = (actual - exact_scaled).abs()
    if dtype in LOW_PRECISION_FLOOR:
        ref_error = (_scaled(in_dtype, exact, normalize)[0] - exact_scaled).abs().max().item()
        bound = 2 * ref_error + LOW_PRECISION_FLOOR[dtype]
        bad = diff.max().item() > bound
    else:
        bound = ATOL[dtype] + RTOL[dtype] * exact_scaled.abs()
        bad = bool((diff > bound).any())
        bound = bound.max().item()
    return f"{name}: max abs diff {diff.max().item():.3e} (bound {bound:.3e})" if bad else None


def _compare(backend, inputs) -> Optional[str]:
    x, ids, params = _probe(inputs)
    config, scale, seed, dtype = inputs.config, inputs.scale, inputs.seed, x.dtype
    rows = x.shape[0] if ids is None else ids.shape[0]
    generator = torch.Generator().manual_seed(0)
    grad_y = torch.randn(rows, config.out_dim, generator=generator, dtype=torch.float64).to(x.device)
    try:  # a kernel error is a demotion, not a crash of the model; errors of the reference are ours
        with torch.no_grad():
            y = backend.forward(x, ids, params, config, scale, seed)
            grad_rows, grad_params = backend.backward(grad_y.to(dtype), x, ids, params, config, scale,
                                                      seed)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    results = {"y": (y, False), "grad_rows": (grad_rows, True)}
    results.update({f"grad_params[{i}]": (g, True) for i, g in enumerate(grad_params)})
    wide = [p.double() for p in params]
    exact = _reference(x.double(), ids, wide, config, scale, seed, grad_y)
    in_dtype = (_reference(x, ids, params, config, scale, seed, grad_y.to(dtype))
                if dtype in LOW_PRECISION_FLOOR else exact)
    if len(grad_params) != len(params):
        return f"{len(grad_params)} parameter gradients for {len(params)} parameters"
    for (name, (actual, normalize)), reference_exact, reference_dtype in zip(results.items(), exact, in_dtype):
        failure = _within(name, actual, reference_exact, reference_dtype, dtype, normalize)
        if failure:
            return failure
    return None


def _reference(x, ids, params, config, scale, seed, grad_y) -> list:
    """[y, grad_rows, *grad_params] of the reference, as the backend returns them."""
    with torch.no_grad():
        y = reference.hgt_forward(x, ids, params, config, scale, seed)
    grad_rows, grad_params = reference.hgt_backward(grad_y, x, ids, params, config, scale, seed)
    return [y, grad_rows, *grad_params]

"""Property-based fuzz of the functional op: every backend that runs here against the float64
reference, forward and every gradient, with dropout compared exactly keyed.

Configurations and inputs come from fuzz_strategies.py (the one place to add options). The totals
are printed at the end of the run ("fuzz: N examples, M backends, K mismatches"); a failure shows
hypothesis' shrunk example.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from define_kernels import functional, reference

import fuzz_report
from fuzz_strategies import (FUZZ_DTYPES, budget, hgt_configs, id_tensor, non_contiguous,
                             random_params, runnable_backends)
from tolerances import assert_close, assert_close_scaled, assert_low_precision_close

LOW_PRECISION = (torch.float16, torch.bfloat16)


@st.composite
def op_cases(draw, max_tokens=12, max_width=24, max_depth=3):
    config = draw(hgt_configs(max_width=max_width, max_depth=max_depth, in_proj=True))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    gather = draw(st.booleans())
    tokens = draw(st.sampled_from([0, 1, 2]) | st.integers(1, max_tokens))
    if gather:
        vocab = draw(st.integers(1, 17))
        x = torch.randn(vocab, config.input_width, generator=generator, dtype=torch.float64)
        ids = id_tensor(draw, vocab, (tokens,), draw(st.sampled_from([torch.int32, torch.int64])))
    else:
        x, ids = torch.randn(tokens, config.input_width, generator=generator, dtype=torch.float64), None
    seed = draw(st.integers(0, 2**31 - 2)) if config.has_dropout and draw(st.booleans()) else None
    return dict(config=config, x=x, ids=ids, params=random_params(config, generator),
                grad_y=torch.randn(tokens, config.out_dim, generator=generator, dtype=torch.float64),
                scale=draw(st.sampled_from([1.0, 0.7, 2.5])), seed=seed,
                dtype=draw(st.sampled_from(FUZZ_DTYPES)), strided=draw(st.booleans()))


def run_op(case, backend, dtype, strided=False):
    """(y, grads of x and every parameter) through the public op in `dtype`."""
    def prepare(t):
        t = t.to(dtype)
        return (non_contiguous(t) if strided else t).requires_grad_(True)
    x = prepare(case["x"])
    params = [prepare(p) for p in case["params"]]
    ids = case["ids"]
    if strided and ids is not None and ids.numel():
        ids = torch.stack([ids, ids], dim=1)[:, 0]  # a strided 1-D view
    seed = None if case["seed"] is None else torch.tensor(case["seed"], dtype=torch.int64)
    y = functional.hgt(x, params, case["config"], ids=ids, scale=case["scale"], seed=seed, backend=backend)
    grads = torch.autograd.grad(y, [x] + params, case["grad_y"].to(dtype), allow_unused=True)
    return y.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x] + params)]


def check_dropout_keyed(case, y):
    """Where the last layer's mask drops a feature, the output is exactly 0 (masks shared)."""
    config = case["config"]
    if case["seed"] is None or y.numel() == 0:
        return
    keys = reference.row_keys_for(case["x"], case["ids"])
    last = len(config.layers) - 1  # the reduce layer, or the output layer after it
    keep = reference.dropout_keep_mask(case["seed"], last, keys, config.out_dim, config.dropout)
    assert torch.all(y[~keep] == 0), "an output dropped by the shared mask is not exactly zero"


def check_backend(case, backend):
    dtype = case["dtype"]
    y_ref, grads_ref = run_op(case, "torch", torch.float64)
    y, grads = run_op(case, backend, dtype, case["strided"])
    names = ["y", "grad_x"] + [f"grad_params[{i}]" for i in range(len(grads))]
    with fuzz_report.comparing(backend):
        assert y.dtype == dtype and y.shape == y_ref.shape
        check_dropout_keyed(case, y)
        if dtype in LOW_PRECISION:
            y_low, grads_low = run_op(case, "torch", dtype)
            for name, got, exact, low in zip(names, [y] + grads, [y_ref] + grads_ref, [y_low] + grads_low):
                norm = exact.abs().max().clamp_min(1.0) if exact.numel() else 1.0
                assert_low_precision_close(got / norm, exact / norm, low / norm, name=name)
        else:
            assert_close(y, y_ref, dtype, name="y")
            for name, got, exact in zip(names[1:], grads, grads_ref):
                assert_close_scaled(got, exact, dtype, name=name)


def fuzz_case(case, names):
    fuzz_report.example()
    probe = case["x"].to(case["dtype"])
    for backend in runnable_backends(probe, case["ids"], case["config"], names):
        if backend == "torch" and case["dtype"] in LOW_PRECISION:
            continue  # the reference in fp16/bf16 is the bound itself, not a subject
        check_backend(case, backend)


@budget(160)
@given(case=op_cases())
def test_fuzz_op_torch_and_cpu_cpp(case):
    fuzz_case(case, ["torch", "cpu_cpp"])


@budget(30)
@given(case=op_cases(max_tokens=5, max_width=12, max_depth=2))
def test_fuzz_op_triton(case):
    """Triton in its interpreter (conftest sets TRITON_INTERPRET=1 on GPU-less machines): tiny shapes."""
    fuzz_case(case, ["triton", "cuda"])

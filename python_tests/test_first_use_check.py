"""The guarded first use (backends/first_use_check.py): pass, demotion by fault injection, opt-out.

Faults are injected into the real `triton` registry entry (a wrong forward, a wrong gradient, a
kernel that raises) with a priority ahead of the reference and CPU as a device, so the tests run
on any machine; the passing case runs the Triton interpreter when it is available.
"""
import dataclasses
import warnings

import pytest
import torch

from define_kernels import backends, functional, reference
from define_kernels.backends import first_use_check
from define_kernels.config import HGTConfig

from conftest import usable_backend
from tolerances import assert_close

CONFIG = HGTConfig(in_dim=12, expand_dim=40, out_dim=20, depth=3, max_groups=4, align=1)


@pytest.fixture(autouse=True)
def _fresh_check(monkeypatch):
    monkeypatch.delenv(first_use_check.ENV_DISABLE, raising=False)
    first_use_check.reset()
    yield
    first_use_check.reset()


def _inputs(dtype=torch.float32, rows=11):
    x = torch.randn(23, CONFIG.in_dim, dtype=dtype)
    ids = torch.randint(0, 23, (rows,))
    params = [(torch.randn(shape) * 0.6).to(dtype) for shape in CONFIG.param_shapes()]
    return x, ids, params


def _install(monkeypatch, **changes):
    """Replace the triton entry by a CPU backend ahead of the reference, with `changes`."""
    base = dataclasses.replace(backends._REGISTRY["torch"], name="triton", priority=1,
                               description="fault injection")
    fake = dataclasses.replace(base, **changes)
    monkeypatch.setitem(backends._REGISTRY, "triton", fake)
    return fake


def _wrong_forward(*args):
    return reference.hgt_forward(*args) * 1.01


def _wrong_backward(*args):
    grad_rows, grad_params = reference.hgt_backward(*args)
    grad_params = list(grad_params)
    grad_params[1] = grad_params[1] + 0.05  # one bias gradient off
    return grad_rows, grad_params


def _raising_forward(*args):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("fault,expected", [
    (dict(forward=_wrong_forward), "y: max abs diff"),
    (dict(backward=_wrong_backward), "grad_params[1]: max abs diff"),
    (dict(forward=_raising_forward), "RuntimeError: CUDA error"),
], ids=["wrong_forward", "wrong_gradient", "kernel_error"])
def test_fault_demotes_backend_auto_falls_back(monkeypatch, fault, expected):
    _install(monkeypatch, **fault)
    x, ids, params = _inputs()
    with pytest.warns(RuntimeWarning, match=r"backend 'triton' failed its first-use check") as record:
        y = functional.hgt(x, params, CONFIG, ids=ids, backend="auto")
    assert len(record) == 1 and expected in str(record[0].message)
    # the next backend in auto order ran (cpu_cpp where measured first, else the reference)
    assert_close(y, reference.hgt_forward(x, ids, params, CONFIG), name="fallback output")
    assert expected in first_use_check.demotion_reason("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per call
        functional.hgt(x, params, CONFIG, ids=ids, backend="auto")
        with pytest.raises(backends.BackendUnavailableError, match="demoted by the first-use check"):
            functional.hgt(x, params, CONFIG, ids=ids, backend="triton")


def test_demotion_covers_other_configs_and_dtypes(monkeypatch):
    _install(monkeypatch, forward=_wrong_forward)
    x, ids, params = _inputs()
    with pytest.warns(RuntimeWarning):
        functional.hgt(x, params, CONFIG, ids=ids)
    other = HGTConfig(in_dim=12, expand_dim=24, out_dim=16, depth=2, max_groups=2, align=1)
    inputs = backends.OpInputs(x.half(), ids, [], other, 1.0, None)
    assert backends.select("auto", inputs).name == "torch"


def test_low_precision_fault_is_caught(monkeypatch):
    _install(monkeypatch, forward=lambda *a: reference.hgt_forward(*a) + 0.05)
    x, ids, params = _inputs(torch.float16)
    with pytest.warns(RuntimeWarning, match="float16"):
        functional.hgt(x, params, CONFIG, ids=ids)


def test_correct_backend_is_checked_once_and_kept(monkeypatch):
    calls = []

    def counting_forward(*args):
        calls.append(1)
        return reference.hgt_forward(*args)

    _install(monkeypatch, forward=counting_forward)
    x, ids, params = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            functional.hgt(x, params, CONFIG, ids=ids)
    assert len(calls) == 3, "one probe forward, then one forward per call"
    assert first_use_check.demotion_reason("triton") is None


def test_dense_input_with_dropout_passes(monkeypatch):
    _install(monkeypatch)
    config = HGTConfig(in_dim=12, expand_dim=40, out_dim=20, depth=3, max_groups=4, align=1, dropout=0.3)
    x = torch.randn(5, 12)
    params = [torch.randn(shape) * 0.6 for shape in config.param_shapes()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.hgt(x, params, config, seed=torch.tensor(7))
    assert first_use_check.demotion_reason("triton") is None


def test_env_var_turns_the_check_off(monkeypatch):
    _install(monkeypatch, forward=_wrong_forward)
    monkeypatch.setenv(first_use_check.ENV_DISABLE, "1")
    x, ids, params = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = functional.hgt(x, params, CONFIG, ids=ids)
    torch.testing.assert_close(y, _wrong_forward(x, ids, params, CONFIG, 1.0, None))


def test_unguarded_backends_are_not_checked(monkeypatch):
    fake = dataclasses.replace(backends._REGISTRY["torch"], name="torch", forward=_raising_forward)
    assert first_use_check.reasons(fake, backends.OpInputs(*_inputs()[:2], [], CONFIG, 1.0, None)) == []


@pytest.mark.parametrize("name", sorted(first_use_check.GUARDED))
def test_real_kernels_pass_the_check(name):
    """The real kernels pass their own first-use check (triton: the interpreter on CPU)."""
    x, ids, params = _inputs()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ())
    for dtype in dtypes:
        inputs = backends.OpInputs(x.to(device, dtype), ids.to(device),
                                   [p.to(device, dtype) for p in params], CONFIG, 1.3, None)
        usable_backend(name, inputs)
        assert first_use_check.reasons(backends._REGISTRY[name], inputs) == []
    assert first_use_check.demotion_reason(name) is None


def test_first_call_under_inference_mode_passes(monkeypatch):
    _install(monkeypatch)
    x, ids, params = _inputs()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.hgt(x, params, CONFIG, ids=ids)
    assert first_use_check.demotion_reason("triton") is None


def test_probe_is_small_and_keeps_the_id_dtype():
    x = torch.randn(1000, 12)
    ids = torch.tensor([999, 5, 5, 0, 7, 999, 3, 2, 1, 4], dtype=torch.int32)
    probe_x, probe_ids, _ = first_use_check._probe(backends.OpInputs(x, ids, [], CONFIG, 1.0, None))
    assert probe_ids.dtype == torch.int32 and len(probe_ids) == first_use_check.PROBE_ROWS
    assert probe_x.shape[0] <= first_use_check.PROBE_ROWS
    torch.testing.assert_close(probe_x[probe_ids.long()], x[ids[:first_use_check.PROBE_ROWS].long()])

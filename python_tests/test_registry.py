"""The backend registry: selection by priority, reasons, explicit requests, env, info."""
import subprocess
import sys

import pytest
import torch

import define_kernels
from define_kernels import HGTConfig, backends, hgt, reference
from define_kernels.backends import registry as backend_registry

CONFIG = HGTConfig(8, 16, 6, 2, 2)


@pytest.fixture
def registry(monkeypatch):
    """An isolated registry holding the real backends plus whatever the test registers."""
    saved = dict(backend_registry._REGISTRY)
    monkeypatch.setattr(backend_registry, "_default_backend", None)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    yield backend_registry._REGISTRY
    backend_registry._REGISTRY.clear()
    backend_registry._REGISTRY.update(saved)


def fake_backend(name, priority, calls, devices=("cpu",), reasons=()):
    def forward(*args):
        calls.append(name)
        return reference.hgt_forward(*args)
    return backends.Backend(name, priority, devices, (torch.float32,), forward, backends._REGISTRY["torch"].backward,
                            input_reasons=lambda inputs: list(reasons))


def run_op(backend="auto"):
    x = torch.randn(3, 8)
    return hgt(x, [torch.randn(s) for s in CONFIG.param_shapes()], CONFIG, backend=backend)


def test_auto_picks_first_usable_by_priority(registry):
    calls = []
    backends.register_backend(fake_backend("gpu_only", 1, calls, devices=("cuda",)))
    backends.register_backend(fake_backend("refuses", 2, calls, reasons=["width too large"]))
    backends.register_backend(fake_backend("fast", 3, calls))
    run_op()
    assert calls == ["fast"]


def test_explicit_unusable_backend_raises_with_reasons(registry):
    backends.register_backend(fake_backend("refuses", 2, [], reasons=["width too large"]))
    with pytest.raises(backends.BackendUnavailableError, match="width too large"):
        run_op("refuses")
    backends.register_backend(fake_backend("gpu_only", 1, [], devices=("cuda",)))
    with pytest.raises(backends.BackendUnavailableError, match=r"device cpu not in \('cuda',\)"):
        run_op("gpu_only")


def test_set_backend_and_env_choose_the_default(registry, monkeypatch):
    calls = []
    backends.register_backend(fake_backend("first", 1, calls))
    backends.register_backend(fake_backend("second", 2, calls))
    define_kernels.set_backend("second")
    run_op()
    define_kernels.set_backend("auto")
    run_op()
    monkeypatch.setattr(backend_registry, "_default_backend", None)
    monkeypatch.setenv(backends.ENV_BACKEND, "second")
    run_op()
    assert calls == ["second", "first", "second"]


def test_globally_unavailable_backend_is_listed_with_reason(registry):
    backends.register_backend(backends.Backend(
        "missing", 5, ("cpu",), (torch.float32,), reference.hgt_forward, backends._REGISTRY["torch"].backward,
        unavailable_reason=lambda: "library not installed"))
    assert "missing" not in define_kernels.available_backends()
    assert ("missing", "library not installed") in backends.backend_status()
    assert "torch" in define_kernels.available_backends()


def test_info_command_lists_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "define_kernels.info"], capture_output=True, text=True,
                         check=True).stdout
    assert f"torch          {torch.__version__}" in out
    assert "torch      available" in out

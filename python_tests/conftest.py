"""Shared fixtures. TRITON_INTERPRET is set before anything imports triton, on GPU-less machines."""
import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from define_kernels import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def usable_backend(name: str, inputs: backends.OpInputs) -> str:
    """Skip (with the registry's reasons, never silently) when `name` cannot run `inputs`."""
    reasons = backends._REGISTRY[name].not_supported_reasons(inputs)
    if reasons:
        pytest.skip(f"backend {name}: " + "; ".join(reasons))
    return name


@pytest.fixture(params=[b.name for b in backends.backends_by_priority()])
def backend(request):
    return request.param

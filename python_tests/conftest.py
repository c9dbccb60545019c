"""Shared fixtures. TRITON_INTERPRET is set before anything imports triton, on GPU-less machines.

No green by skipping: `usable_backend` fails instead of skipping for a backend named in
DEFINE_KERNELS_EXPECT (expectations.py). The fuzz suites' totals are printed in the terminal
summary ("fuzz: N examples, M backends, K mismatches").
"""
import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from define_kernels import backends  # noqa: E402

import expectations  # noqa: E402
import fuzz_report  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_terminal_summary(terminalreporter):
    line = fuzz_report.summary_line()
    if line:
        terminalreporter.write_sep("=", "fuzz")
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def backend_reasons(name: str, inputs: backends.OpInputs) -> list:
    """Why `name` cannot run `inputs` (empty: it can). An unregistered backend is a reason too."""
    if name not in backends._REGISTRY:
        return [f"backend {name} is not registered"]
    return backends._REGISTRY[name].not_supported_reasons(inputs)


def usable_backend(name: str, inputs: backends.OpInputs) -> str:
    """Skip (with the registry's reasons, never silently) when `name` cannot run `inputs`;
    fail instead when `name` is expected here (DEFINE_KERNELS_EXPECT) and the reason is not the
    inputs' dtype/device (an expected backend still may not take every dtype)."""
    reasons = backend_reasons(name, inputs)
    if reasons:
        message = f"backend {name}: " + "; ".join(reasons)
        input_only = all(r.startswith(("dtype ", "device ", "the Triton interpreter has no")) for r in reasons)
        if expectations.is_expected(name) and not input_only:
            pytest.fail(f"{message} (expected by {expectations.ENV_EXPECT})")
        pytest.skip(message)
    return name


@pytest.fixture(params=[b.name for b in backends.backends_by_priority()])
def backend(request):
    return request.param


# Module-level behaviour (padding, dedup, cache, sparse) runs on these; the Triton interpreter is
# too slow for whole modules and is covered at the op level (test_triton, test_fuzz).
MODULE_BACKENDS = ["torch", "cpu_cpp"] + (["triton", "cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=MODULE_BACKENDS)
def module_backend(request):
    return request.param


@pytest.fixture(scope="module")
def cpp_extension():
    """The C++ library, built or loaded once: a failed build fails the test, unless
    DEFINE_KERNELS_NO_JIT=1 asked for no build and CI does not expect cpu_cpp (then: skip)."""
    from define_kernels.backends import cpp_library
    state = cpp_library.load_library()
    if state.reason and os.environ.get(cpp_library.ENV_NO_JIT, "0") not in ("", "0") \
            and not expectations.is_expected("cpu_cpp"):
        pytest.skip(f"C++ extension not loaded: {state.reason}")
    assert state.reason is None, f"C++ extension failed to build/load: {state.reason}"
    return state

"""No green by skipping: expected backends really run, kernel modules import, and the C++ library
under test is the one built from this checkout's csrc/ (a prebuilt one would hide a broken csrc/).
"""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from define_kernels import backends

import expectations

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("name", expectations.expected_backends() or ["(none expected)"])
def test_expected_backends_are_available(name):
    if name == "(none expected)":
        pytest.skip(f"{expectations.ENV_EXPECT} is not set: nothing is required to run here")
    assert name in backends._REGISTRY, f"expected backend {name} is not registered"
    reason = backends._REGISTRY[name].unavailable_reason()
    assert reason is None, f"expected backend {name} cannot run here: {reason}"


def test_kernel_modules_import_without_error():
    """An import error in a kernel module must fail, not turn into 'backend unavailable'."""
    importlib.import_module("define_kernels.backends.cpp_ext")
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("define_kernels.backends.triton_kernels.forward")
        importlib.import_module("define_kernels.backends.triton_kernels.backward")


def test_cpp_library_is_built_from_this_checkout():
    if "cpu_cpp" not in backends.available_backends() and not expectations.is_expected("cpu_cpp"):
        pytest.skip("the C++ extension is not built in this run and not expected")
    problem = expectations.cpp_library_origin_problem()
    assert problem is None, problem


@pytest.mark.parametrize("hide", ["lib", "csrc"])
def test_origin_guard_catches_a_library_not_from_csrc(tmp_path, hide):
    """The guard itself can fail: run it with DEFINE_KERNELS_LIB / another csrc set."""
    env = {**os.environ, expectations.ENV_EXPECT: "cpu_cpp", "DEFINE_KERNELS_NO_JIT": "1"}
    if hide == "lib":
        env["DEFINE_KERNELS_LIB"] = str(tmp_path / "prebuilt.so")
    else:
        env["DEFINE_KERNELS_CSRC"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(HERE / "test_expectations.py::test_cpp_library_is_built_from_this_checkout")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert result.returncode == 1 and "1 failed" in result.stdout, result.stdout[-2000:]

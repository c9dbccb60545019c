"""Drawn bad inputs on every backend that runs here, in a subprocess (bad_inputs_worker.py), so a
segfault or a hang fails the test instead of ending the run.

Expected: out-of-range or negative ids -> IndexError naming the value; a wrong dtype, device,
width or parameter shape -> ValueError naming the argument; NaN/inf in x or the parameters ->
the op returns (values may be NaN) and its backward runs.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from define_kernels import HGTConfig, backends

import fuzz_report
from conftest import usable_backend
from fuzz_strategies import PROFILE

HERE = Path(__file__).resolve().parent
CPU_BACKENDS = ["torch", "cpu_cpp", "triton"]


def runnable():
    probe = backends.OpInputs(torch.zeros(1, 8), None, [], HGTConfig(8, 20, 5, 2, 2, align=2), 1.0, None)
    names = []
    for name in CPU_BACKENDS:
        try:
            names.append(usable_backend(name, probe))
        except pytest.skip.Exception:
            pass
    return names


def expected_error(case):
    kind, detail = case.split(":", 1)
    if kind == "index":
        value = detail.rsplit(" ", 1)[1]
        return "IndexError", rf"(?<![\d-]){re.escape(value)}(?!\d)"
    if kind == "value":
        argument = detail.split(" ", 1)[0]
        return "ValueError", rf"(?<![\w.]){re.escape(argument)}(?!\w)"
    return None, None


@pytest.mark.parametrize("seed", range(1 if PROFILE == "ci" else 10))
def test_bad_inputs_raise_documented_errors_in_a_subprocess(seed):
    names = runnable()
    result = subprocess.run([sys.executable, str(HERE / "bad_inputs_worker.py"),
                             json.dumps({"seed": seed, "backends": names})],
                            capture_output=True, text=True, timeout=600, cwd=HERE,
                            # this checkout's package, whatever an editable install points at
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])})
    assert result.returncode == 0, f"worker died (rc {result.returncode}): {result.stderr[-3000:]}"
    lines = result.stdout.splitlines()
    assert lines and lines[-1] == "DONE", f"worker stopped early: {result.stdout[-2000:]}"
    records = [json.loads(line) for line in lines[:-1]]
    assert {r["backend"] for r in records} == set(names)
    failures = []
    for record in records:
        error, pattern = expected_error(record["case"])
        if error is None:
            if record["outcome"] != "returned":
                failures.append(f"{record}: must return (NaN allowed), not raise")
        elif record["outcome"] != "raised" or record["type"] != error \
                or not re.search(pattern, record["message"]):
            failures.append(f"{record}: expected {error} matching {pattern!r}")
    fuzz_report.bad_inputs(len(records), len(failures))
    assert not failures, f"{len(failures)} of {len(records)} cases:\n" + "\n".join(failures)

"""bench/cpu_profile.py end to end at a tiny batch: every mode is profiled and written, the GEMMs
are one line and the C++ scopes appear. No timing is asserted."""
import csv

import pytest

from bench import cpu_profile


@pytest.fixture(scope="module", autouse=True)
def built(cpp_extension):
    return cpp_extension


def test_writes_every_mode_with_gemms_and_scopes(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_profile, "RESULTS", tmp_path)
    cpu_profile.main(["--tokens", "64", "--steps", "1", "--top", "3"])
    (path,) = tmp_path.glob("*_cpu-profile_*.csv")
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert {row["mode"] for row in rows} == {"fp32", "bf16", "autocast"}
    for mode in ("fp32", "bf16", "autocast"):
        keys = {row["key"] for row in rows if row["mode"] == mode}
        assert cpu_profile.GEMMS_KEY in keys and not keys & set(cpu_profile.GEMMS)
        assert "define_kernels::cpu::epilogue_backward" in keys
    assert any(row["key"] == "define_kernels::cpu::transposed_copy" for row in rows if row["mode"] == "bf16")
    assert all(float(row["ms_per_step"]) >= 0 for row in rows)

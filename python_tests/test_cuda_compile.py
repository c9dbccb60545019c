"""GPU build without a GPU: CUDA toolkit discovery (wrapper nvcc, missing headers / libraries),
nvcc compile of the CUDA kernels, and the compile-time resource gate of bench.resource_report.

The gate tests need a CUDA build of torch with triton (.ci/cuda_build_check.sh runs them in its
.venv-cuda on the report it just wrote, passed as DEFINE_RESOURCE_REPORT=<csv>); on a CPU torch
they skip with that reason. Running the kernels needs a GPU (test_cuda.py)."""
import csv
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from bench import resource_report
from define_kernels.backends import cpp_build, cuda_toolkit

SOURCES = sorted((cpp_build.csrc_dir() / "cuda").glob("*.cu"))
ENV_REPORT = "DEFINE_RESOURCE_REPORT"


# ----------------------------------------------------------------------------- toolkit discovery
def fake_toolkit(root: Path, headers=True, cudart=True, release="13.0") -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("// fake\n")
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so.13").write_text("")
    return root


def wrapper_on_path(tmp_path: Path, monkeypatch, target: Path) -> Path:
    """A /usr/local/bin-style nvcc script that execs the toolkit's, alone on PATH."""
    bin_dir = tmp_path / "wrapper" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {target}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cuda_toolkit, "KNOWN_ROOTS", ())
    return wrapper


def test_toolkit_found_through_a_wrapper_script(tmp_path, monkeypatch):
    root = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_on_path(tmp_path, monkeypatch, root)
    # the wrapper's own prefix comes first but has no headers; the script's target is complete
    assert cuda_toolkit.candidate_roots()[:2] == [tmp_path / "wrapper", root.resolve()]
    toolkit = cuda_toolkit.locate("13.0")
    assert toolkit == (str(root.resolve()), str(root.resolve() / "bin" / "nvcc"), "13.0", None)


@pytest.mark.parametrize("missing, named", [(dict(headers=False), "include/cuda_runtime.h"),
                                            (dict(cudart=False), "libcudart")])
def test_incomplete_toolkit_is_named_in_the_reason(tmp_path, monkeypatch, missing, named):
    root = fake_toolkit(tmp_path / "cuda", **missing)
    wrapper_on_path(tmp_path, monkeypatch, root)
    toolkit = cuda_toolkit.locate("13.0")
    assert toolkit.root is None and named in toolkit.reason and str(root.resolve()) in toolkit.reason


def test_major_version_mismatch_is_the_reason(tmp_path, monkeypatch):
    root = fake_toolkit(tmp_path / "cuda", release="12.4")
    wrapper_on_path(tmp_path, monkeypatch, root)
    toolkit = cuda_toolkit.locate("13.0")
    assert toolkit.root is None and "nvcc 12.4" in toolkit.reason and "13.0" in toolkit.reason


def test_cuda_home_wins_and_no_toolkit_says_where_it_looked(tmp_path, monkeypatch):
    first, second = fake_toolkit(tmp_path / "a"), fake_toolkit(tmp_path / "b")
    wrapper_on_path(tmp_path, monkeypatch, second)
    monkeypatch.setenv("CUDA_HOME", str(first))
    assert cuda_toolkit.locate("13.0").root == str(first)
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    toolkit = cuda_toolkit.locate("13.0")
    assert toolkit.root is None and "nvcc not found" in toolkit.reason and "CUDA_HOME" in toolkit.reason


def test_arch_list_defaults_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpp_build.cuda_arch_list() == "9.0;8.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert cpp_build.cuda_arch_list() == "8.6"


def test_build_reason_on_this_torch():
    reason = cpp_build.cuda_build_reason()
    if not torch.version.cuda:
        assert reason == "torch was built without CUDA"
    else:  # a CUDA torch: either a verified toolkit or a reason naming what is missing
        assert reason is None or "nvcc" in reason or "toolkit" in reason


# ----------------------------------------------------------------------------- nvcc
def _nvcc():
    toolkit = cuda_toolkit.locate(torch.version.cuda or "13.0")
    return toolkit.nvcc or shutil.which("nvcc")


def test_kernel_sources_exist():
    assert {source.name for source in SOURCES} >= {"hgt_forward.cu", "hgt_backward.cu"}


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit on this machine)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_nvcc_compiles_the_kernels(tmp_path, source):
    output = tmp_path / (source.stem + ".o")
    command = [_nvcc(), "-c", "-arch=sm_90", "-std=c++17", f"-I{source.parent}",
               f"-I{cpp_build.csrc_dir() / 'include'}", str(source), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, " ".join(command) + "\n" + result.stdout + result.stderr[-6000:]
    assert output.stat().st_size > 0


# ----------------------------------------------------------------------------- resource report
def test_occupancy_arithmetic():
    # 122 regs x 256 threads -> 128-reg warps: 65536 / (128*32*8) = 2 CTAs; 80 regs -> 3
    assert resource_report.blocks_per_sm(122, 256, 28 * 1024) == 2
    assert resource_report.blocks_per_sm(80, 256, 28 * 1024) == 3
    assert resource_report.blocks_per_sm(32, 128, 100 * 1024) == 2  # shared-memory bound
    assert resource_report.blocks_per_sm(16, 64, 0) == 32           # CTA cap


def test_tensor_core_kind_and_res_usage_parsing():
    assert resource_report.tensor_core_kind("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert resource_report.tensor_core_kind("mma.sync.aligned.m16n8k16.row.col") == "mma.sync"
    assert resource_report.tensor_core_kind("  HMMA.16816.F32.BF16 R4, R8") == "mma.sync"
    assert resource_report.tensor_core_kind("fma.rn.f32") == "none"
    text = textwrap.dedent("""
        Resource usage:
         Function kern_a:
          REG:254 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:632 TEXTURE:0
         Function kern_b:
          REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600
    """)
    assert resource_report.parse_res_usage(text) == {
        "kern_a": dict(registers=254, spill_bytes=24, static_smem=1024),
        "kern_b": dict(registers=40, spill_bytes=0, static_smem=0)}


def test_resource_rules_on_synthetic_rows():
    row = dict(backend="triton", kernel="k", workload="w", dtype="bfloat16", config="c", threads=256,
               registers=100, spill_bytes=0, smem_bytes=0)
    clean = resource_report.Row(**row, tensor_core="wgmma", is_gemm=True)
    assert resource_report.gate_failures([clean]) == []
    failures = resource_report.gate_failures([
        resource_report.Row(**dict(row, spill_bytes=8), tensor_core="wgmma", is_gemm=True),
        resource_report.Row(**row, tensor_core="mma.sync", is_gemm=True),
        resource_report.Row(**dict(row, dtype="float32"), tensor_core="none", is_gemm=True),  # fp32: no TC
        resource_report.Row(**row, tensor_core="wgmma", is_gemm=True, l2_resident=True,
                            scratch_bytes=resource_report.L2_BUDGET_BYTES + 1),
        # scratch that claims no L2 residency (the Triton forward's) is reported, not gated
        resource_report.Row(**row, tensor_core="wgmma", is_gemm=True,
                            scratch_bytes=resource_report.L2_BUDGET_BYTES + 1),
        # a 16-bit CUDA GEMM must stage its operands with cp.async; fp32 need not
        resource_report.Row(**dict(row, backend="cuda"), tensor_core="mma.sync", is_gemm=True),
        resource_report.Row(**dict(row, backend="cuda", dtype="float32"), is_gemm=True),
        resource_report.Row(**dict(row, backend="cuda"), tensor_core="mma.sync", is_gemm=True,
                            async_copy=True)])
    assert len(failures) == 4
    assert "spills 8" in failures[0] and "mma.sync" in failures[1] and "L2 budget" in failures[2]
    assert "cp.async" in failures[3]


def test_l2_budget_is_the_cuda_kernels():
    text = (cpp_build.csrc_dir() / "cuda" / "hgt_device.cuh").read_text()
    assert f"kL2BudgetFraction = {resource_report.L2_BUDGET_FRACTION};" in text
    assert resource_report.L2_BUDGET_BYTES == int(0.75 * 50 * 2**20)


def test_cuda_forward_plan_mirrors_the_grid_cap():
    from define_kernels.workloads import WORKLOADS
    report = resource_report
    # grid: SMs x CTAs/SM, capped by the tiles and (global scratch) by the budget; at least 1
    assert report.forward_grid(16_384, 64, 132, 2, False, 0, 10) == 256
    assert report.forward_grid(100, 64, 132, 2, True, 1000, 10**6) == 2
    assert report.forward_grid(16_384, 64, 132, 2, True, 1000, 100_000) == 100
    assert report.forward_grid(16_384, 64, 132, 2, True, 2000, 1000) == 1
    # wt103-base bf16 at T=16,384: 64 x (128 + 2 x 1024) x 2 B = 272 KiB per tile does not fit in
    # smem; 2 CTAs/SM at 120 registers, the budget caps 264 CTAs to 141, 256 tiles in 2 waves
    config = WORKLOADS["wt103-base"].config()
    plan = report.cuda_forward_plan(config, "bfloat16", 16_384, 120)
    per_cta = 64 * (128 + 2 * 1024) * 2
    assert plan["grid"] == report.L2_BUDGET_BYTES // per_cta == 141 and plan["waves"] == 2
    assert plan["scratch"] == 141 * per_cta <= report.L2_BUDGET_BYTES
    # a small stack keeps its tiles in shared memory: no global scratch
    # fewer tiles than CTAs (ptb-lstm, 700 tokens): one CTA per tile, one wave
    small = report.cuda_forward_plan(WORKLOADS["ptb-lstm"].config(), "bfloat16", 700, 120)
    assert small["grid"] == 11 and small["waves"] == 1 and small["scratch"] == 11 * per_cta


def _can_compile_for_sm90():
    if not torch.version.cuda:
        return "needs a CUDA build of torch (run .ci/cuda_build_check.sh, which uses .venv-cuda)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton not importable"
    return None


@pytest.fixture(scope="module")
def report_rows(tmp_path_factory):
    """The CSV named by DEFINE_RESOURCE_REPORT, else a fresh report of wt103-base, every dtype."""
    path = os.environ.get(ENV_REPORT)
    if not path:
        reason = _can_compile_for_sm90()
        if reason:
            pytest.skip(reason)
        out = tmp_path_factory.mktemp("resource")
        resource_report.main(["--workloads", "wt103-base", "--out", str(out),
                              "--stem", "resource"])
        path = out / "resource.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {r["backend"] for r in rows} >= {"triton"}, f"{path} has no Triton rows"
    assert "l2_resident" in rows[0], f"{path} predates the l2_resident column: regenerate it"
    return rows


def _failures(rows, rule):
    return [f"{r['backend']} {r['kernel']} {r['workload']} {r['dtype']} {r['config']}: {rule(r)}"
            for r in rows if rule(r)]


def test_gate_no_spills(report_rows):
    bad = _failures(report_rows, lambda r: f"{r['spill_bytes']} bytes spilled" if int(r["spill_bytes"]) else "")
    assert not bad, "\n".join(bad)


def test_gate_sm90_triton_gemms_use_wgmma(report_rows):
    bad = _failures(report_rows, lambda r: f"uses {r['tensor_core']}" if (
        r["backend"] == "triton" and r["is_gemm"] == "True" and r["dtype"] != "float32"
        and r["tensor_core"] != "wgmma") else "")
    assert not bad, "\n".join(bad)


def test_gate_cuda_16bit_gemms_stage_with_cp_async(report_rows):
    bad = _failures(report_rows, lambda r: "no LDGSTS in its SASS" if (
        r["backend"] == "cuda" and r["is_gemm"] == "True" and r["dtype"] in ("bfloat16", "float16")
        and r.get("async_copy") != "True") else "")
    assert not bad, "\n".join(bad)


def test_gate_forward_scratch_within_l2_budget(report_rows):
    budget = resource_report.L2_BUDGET_BYTES
    # only the kernels that claim L2 residency (the CUDA forward's waves); Triton's is reported
    bad = _failures(report_rows, lambda r: f"{int(r['scratch_bytes']) / 2**20:.1f} MiB" if (
        r.get("l2_resident") == "True" and int(r["scratch_bytes"]) > budget) else "")
    assert not bad, f"L2 budget {budget / 2**20:.0f} MiB:\n" + "\n".join(bad)


def test_gate_covers_every_dtype(report_rows):
    """The gate is only as good as what it compiled: every dtype of every Triton kernel (forward,
    and each backward kernel) and of the CUDA forward / backward GEMMs must be in the report."""
    wanted = set(resource_report.DTYPES)
    kernels = {"triton": ("hgt_forward", "epilogue_backward", "weight_grad", "input_grad", "lm_head_stats",
                          "lm_head_grad"),
               "cuda": ("hgt_forward_kernel", "hgt_wgrad_kernel", "hgt_dgrad_kernel")}
    missing = []
    for backend, names in kernels.items():
        for name in names:
            have = {r["dtype"] for r in report_rows
                    if r["backend"] == backend and r["kernel"].split(" L")[0] == name}
            if wanted - have:
                missing.append(f"{backend} {name}: no {sorted(wanted - have)}")
    assert not missing, "\n".join(missing)

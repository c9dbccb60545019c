"""bench.gpu_check's stage runner: a stage past its budget is killed and reported as a timeout,
a failing command stops its stage with the exit status, and the summary is written either way.
(The CPU dry run of every stage is a CI step: `make gpu-check-dry-run`.)"""
import json
import sys
import time

import pytest

from bench import gpu_check


def test_stage_past_its_budget_is_killed_and_reported(tmp_path):
    stage = gpu_check.Stage("slow", [[sys.executable, "-c", "import time; print('started', flush=True); "
                                                           "time.sleep(60)"]], {})
    started = time.monotonic()
    result = gpu_check.run_stage(stage, budget=3, log=tmp_path / "slow.log")
    assert time.monotonic() - started < 30
    assert result["status"] == "timeout" and "3 s budget" in result["detail"]
    assert "started" in (tmp_path / "slow.log").read_text()


def test_failing_command_stops_the_stage(tmp_path):
    stage = gpu_check.Stage("bad", [[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                                    [sys.executable, "-c", "open('never', 'w')"]], {})
    result = gpu_check.run_stage(stage, budget=60, log=tmp_path / "bad.log")
    assert result["status"] == "failed" and "exit 3" in result["detail"] and "boom" in result["detail"]
    assert not (gpu_check.REPO / "never").exists()


def test_skipped_stage_and_summary_files(tmp_path, monkeypatch):
    def fake_stages(py, prefix, dry_run):
        return [gpu_check.Stage("info+build", [[py, "-c", "print('ok')"]], {}),
                gpu_check.Stage("memcheck", [], {}, "compute-sanitizer not found")]
    monkeypatch.setattr(gpu_check, "stages", fake_stages)
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--stages", "info+build,memcheck"])
    assert status == 1  # a stage that did not run is not a pass
    summary = json.loads(next(tmp_path.glob("*_summary.json")).read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [("info+build", "ok"), ("memcheck", "not run")]
    assert "compute-sanitizer not found" in next(tmp_path.glob("*_summary.md")).read_text()


def test_gpu_traffic_counts_by_hand(tmp_path):
    """bench.gpu_traffic's per-layer byte counts (item 4 of issue 12) on one layer done by hand,
    and its results file."""
    from bench import gpu_traffic
    from define_kernels.workloads import WORKLOADS
    layer = WORKLOADS["wt103-base"].config().layers[3]  # 928 -> 1024, g = 1
    assert (layer.in_features, layer.out_features, layer.groups) == (928, 1024, 1)
    fused = gpu_traffic.fused_bytes(layer, 16_384)
    assert fused["weights"] == 256 * 928 * 1024 * 2          # 256 tiles, all of W each
    assert fused["operand"] == 16_384 * 928 * 2 * 16         # A re-staged per 64-column block
    gemm = gpu_traffic.gemm_bytes(layer, 16_384)
    assert gemm["weights"] == 128 * 928 * 1024 * 2 and gemm["operand"] == 16_384 * 928 * 2 * 4
    assert gemm["hbm"] == 2 * 16_384 * 1024 * 2
    assert gpu_traffic.main(["--workloads", "wt103-base", "--out", str(tmp_path)]) == 0
    text = next(tmp_path.glob("gpu_traffic_*.md")).read_text()
    assert "| wt103-base | 16,384 | 3.79 | fused, 64-token tiles (today) | 0.97 | 1.00 |" in text


def test_budgets_fit_the_total_and_the_lm_head_dry_run_is_interpreted(tmp_path):
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.TOTAL_BUDGET_S
    dry = {s.name: s for s in gpu_check.stages(sys.executable, tmp_path / "p", True)}["lm-head"]
    assert dry.env["TRITON_INTERPRET"] == "1" and all("--dry-run" in c for c in dry.commands)
    gpu = {s.name: s for s in gpu_check.stages(sys.executable, tmp_path / "p", False)}["lm-head"]
    assert "TRITON_INTERPRET" not in gpu.env and not any("--dry-run" in c for c in gpu.commands)
    assert [c[c.index("--parts") + 1] for c in gpu.commands] == ["correctness", "timing"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_benchmark_stage_leaves_the_whole_model_out(tmp_path, dry_run):
    # the whole-model comparison takes minutes on the CPU; the stage's budget is for bench.run's
    # input-layer rows, and the lm-head stage times the head
    bench = next(s for s in gpu_check.stages(sys.executable, tmp_path / "x", dry_run) if s.name == "benchmark")
    assert bench.commands
    for command in bench.commands:
        assert "bench.run" in command and "--no-model" in command

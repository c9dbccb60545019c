"""bench.gpu_check's stage runner: a stage past its budget is killed and reported as a timeout,
a failing command stops its stage with the exit status, and the summary is written either way.
(The CPU dry run of every stage is a CI step: `make gpu-check-dry-run`.)"""
import json
import sys
import time

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

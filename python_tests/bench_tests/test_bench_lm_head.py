"""bench/lm_head.py: end to end at a tiny size (a process per case and round, CSV, plot, a case
skipped for memory, a failing case reported), and its arithmetic on made-up numbers. No timing
is asserted."""
import csv

import pytest

from bench import lm_head, lm_head_report, report
from bench.lm_head_cases import Case, adaptive_cutoffs, chunk_rows, estimate_bytes

TINY = "custom:V=300,n=16,k=64,m=32,N=2,g=4"
GIB = 2 ** 30


def test_tiny_run_end_to_end(tmp_path, capsys):
    runs = [estimate_bytes(Case("head", TINY, 64, "float32", v)) for v in ("unfused", "fused", "fused-reference")]
    too_big = estimate_bytes(Case("head", TINY, 64, "float32", "unfused-augmented"))
    assert max(runs) < too_big
    budget = (max(runs) + too_big) / 2 / GIB  # the augmented baseline is over it, the rest under
    path = lm_head.main(["--parts", "head", "--workload", TINY, "--tokens", "64", "--dtypes", "fp32",
                         "--variants", "unfused,fused,fused-reference,adaptive,unfused-augmented",
                         "--rounds", "2", "--memory-budget-gb", repr(budget), "--fail", "adaptive",
                         "--csv", str(tmp_path / "lm.csv"), "--quiet"])
    printed = capsys.readouterr().out
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == report.COLUMNS
        rows = list(reader)

    def metric(variant, name):
        return [r for r in rows if r["provider"] == variant and r["metric"] == name]

    for variant in ("unfused", "fused-reference"):
        (time,) = metric(variant, "time")
        assert float(time["p20"]) <= float(time["value"]) <= float(time["p80"])
        assert len(metric(variant, "time_sample")) == 2  # one per round, each in its own process
        assert len(metric(variant, "matmul_float32")) == 2 and len(metric(variant, "matmul_bfloat16")) == 2
        assert float(metric(variant, "peak_memory")[0]["value"]) > 0
        assert float(metric(variant, "gflop")[0]["value"]) > 0
    assert float(metric("unfused", "time_vs_baseline")[0]["value"]) == 1.0
    assert metric("fused-reference", "time_vs_baseline") and metric("fused-reference", "memory_vs_baseline")
    # over the budget: never started, said so with the estimate
    (skipped,) = metric("unfused-augmented", "skipped")
    assert "does not fit (needs ~" in skipped["note"]
    assert not metric("unfused-augmented", "time_sample")
    # a case that raises: reported, the run goes on
    (error,) = metric("adaptive", "error")
    assert "failure injected" in error["note"]
    assert "error: RuntimeError: failure injected" in printed and "does not fit (needs ~" in printed
    # the fused kernel: measured once it is built, reported as unavailable until then
    fused = metric("fused", "time") or metric("fused", "unavailable")
    assert fused and (fused[0]["metric"] == "time" or "BackendUnavailableError" in fused[0]["note"])
    goals = [r for r in rows if r["provider"] == "goal"]
    assert any("fused / unfused time" in r["note"] for r in goals)
    png = path.with_suffix(".png")
    assert png.is_file() and png.stat().st_size > 5000


def entry(variant, seconds, peak_mb, status="ok", estimate=0, dtype="float32", workload=TINY):
    case = Case("head", workload, 64, dtype, variant)
    rounds = [dict(round=i, seconds=s, peak_mb=m) for i, (s, m) in enumerate(zip(seconds, peak_mb))]
    return case.name, dict(case=case, status=status, message="", estimate=estimate, rounds=rounds)


def test_goal_ratios_same_round_best_of_and_estimates():
    results = dict([entry("unfused", [1.0, 2.0, 1.0], [100, 100, 100]),
                    entry("fused", [0.4, 0.5, 0.6], [5, 5, 5]),
                    entry("chunked", [4.0, 1.0, 4.0], [50, 50, 50]),
                    entry("chunked-tuned", [2.0, 4.0, 2.0], [80, 80, 80]),
                    entry("unfused-augmented", [], [], status="skipped", estimate=1000 * 2**20),
                    entry("fused-augmented", [0.5, 0.5, 0.5], [20, 20, 20])])
    goals = {g["label"].split(" · ")[0]: g for g in lm_head_report.evaluate_goals(results)}
    time = goals["fused / unfused time"]
    assert time["goal"] == 0.5 and time["per_round"] == pytest.approx([0.4, 0.25, 0.6])
    assert time["of_medians"] == pytest.approx(0.5 / 1.0) and time["verdict"] == f"met (the goal is set for {lm_head_report.GOAL_WORKLOAD})"
    assert time["rounds_met"] == 2
    # best of the two chunked variants within each round: 2.0, 1.0, 2.0
    chunked = goals["fused / best chunked F.linear_cross_entropy time"]
    assert chunked["per_round"] == pytest.approx([0.2, 0.5, 0.3]) and chunked["verdict"].startswith("not met (")
    assert goals["fused / least chunked F.linear_cross_entropy peak memory"]["round_median"] == pytest.approx(0.1)
    # the baseline did not fit: memory against its estimate, time not available
    memory = goals["fused augmented / TiedOutput+AugmentedLoss peak memory"]
    assert memory["of_medians"] == pytest.approx(20 / 1000) and memory["verdict"].startswith("met against")
    assert goals["fused augmented / fused CE-only time"]["round_median"] == pytest.approx(1.0)


def test_verdicts_name_the_goals_vocabulary_elsewhere():
    at = {w: dict([entry("unfused", [1.0], [100], workload=w), entry("fused", [0.4], [5], workload=w)])
          for w in (lm_head_report.GOAL_WORKLOAD, TINY)}
    verdicts = {w: {g["label"].split(" · ")[0]: g["verdict"] for g in lm_head_report.evaluate_goals(r)}
                for w, r in at.items()}
    assert verdicts[lm_head_report.GOAL_WORKLOAD]["fused / unfused time"] == "met"
    assert verdicts[TINY]["fused / unfused time"] == "met (the goal is set for wt103-base)"


def test_shapes_cutoffs_and_the_wt103_skip():
    assert adaptive_cutoffs(267_735) == [20_000, 60_000]
    assert adaptive_cutoffs(33_278) == [2486, 7458]
    assert adaptive_cutoffs(10) == [1, 2]
    assert chunk_rows(33_278, 8192) == 1024 and chunk_rows(267_735, 8192) == 128 and chunk_rows(300, 64) == 64
    # the unfused head at wt103-base, T = 8,192 needs tens of GB: over 0.8 x 24 GB, not started
    need = estimate_bytes(Case("head", "wt103-base", 8192, "float32", "unfused"))
    assert 24 * GIB < need < 36 * GIB
    assert estimate_bytes(Case("head", "wt103-base", 8192, "float32", "fused")) < 1 * GIB

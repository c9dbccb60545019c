"""bench/cpu_goals.py's goal arithmetic on made-up times (no timing is measured): the ratio of
the medians, the ratios within each round with the better of several cases per round, and the
count of rounds under the goal."""
import statistics

import pytest
import torch

from bench import cpu_goals


def test_goal_ratios_per_round_and_of_medians():
    times = {  # seconds per round
        "cpu_cpp-save fwd+bwd": [0.8, 1.0, 2.0],
        "plain-eager fwd+bwd": [1.0, 1.0, 2.0],
        "plain-compile fwd+bwd": [2.0, 0.5, 4.0],  # the better plain case differs per round
    }
    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    (goal,) = cpu_goals.evaluate_goals(times, med)  # the other goals' cases are absent: skipped
    assert goal["label"].startswith("cpu_cpp fp32 fwd+bwd / best plain") and goal["goal"] == 0.90
    assert goal["of_medians"] == pytest.approx(1000 / 1000)  # medians 1.0 s vs min(1.0, 2.0) s
    per_round = [0.8 / 1.0, 1.0 / 0.5, 2.0 / 2.0]
    assert goal["round_median"] == pytest.approx(statistics.median(per_round))
    assert (goal["rounds_met"], goal["rounds"]) == (1, 3)
    assert goal["round_p20"] <= goal["round_median"] <= goal["round_p80"]


def test_best_of_the_numerator_cases():
    times = {"cpu_cpp train fp32": [0.5, 0.5], "cpu_cpp-sparse train fp32": [0.3, 0.6],
             "embedding train fp32": [1.0, 1.0]}
    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    (goal,) = cpu_goals.evaluate_goals(times, med)
    assert goal["round_median"] == pytest.approx(statistics.median([0.3, 0.5]))
    assert goal["of_medians"] == pytest.approx(0.45 / 1.0)  # min of the medians 500 and 450 ms
    assert goal["rounds_met"] == 2


def test_the_output_gradient_is_converted_once():
    grad = torch.randn(4, 3)
    in_dtype = cpu_goals.converted_once(grad)
    first = in_dtype(torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, grad.to(torch.bfloat16))
    assert in_dtype(torch.bfloat16) is first  # no conversion inside later timed steps
    assert in_dtype(torch.float32) is grad

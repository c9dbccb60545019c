"""hypothesis fuzz of the fused LM-head loss: drawn configurations (vocabulary, widths, options,
ignored tokens, reduction) on every CPU backend against the float64 unfused loss, gradients too."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_strategies import budget
from lm_head_cases import SWEEP_BACKENDS, Case
from test_lm_head import _expected, _run, _zeros_if_none
from tolerances import assert_close_scaled


@st.composite
def cases(draw):
    vocab = draw(st.integers(1, 1500))
    options = {}
    if draw(st.booleans()):
        options["label_smoothing"] = draw(st.floats(0.0, 1.0))
    if draw(st.booleans()):
        options["z_loss"] = draw(st.floats(0.0, 0.05))
    if draw(st.booleans()):
        options.update(alpha=draw(st.floats(0.0, 2.0)), tau=draw(st.floats(0.25, 20.0)),
                       kl_scale=draw(st.sampled_from(["tau", "tau2", "none"])))
    if draw(st.booleans()):
        options["padding_idx"] = draw(st.integers(0, vocab - 1))
    return Case(tokens=draw(st.integers(0, 40)), hidden=draw(st.integers(1, 24)),
                width=draw(st.integers(1, 24)), vocab=vocab, proj=draw(st.booleans()),
                bias=draw(st.booleans()), ignored=draw(st.sampled_from([0.0, 0.25, 1.0])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])), options=options)


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@budget(25)
@given(case=cases(), seed=st.integers(0, 2**16))
def test_fuzz_matches_unfused(backend, case, seed):
    expected, expected_grads = _expected(case, seed)
    loss, grads, leaves = _run(case, backend, torch.float32, seed)
    if bool(torch.isnan(expected).any()):
        assert bool(torch.isnan(loss).all())
        return
    assert_close_scaled(loss, expected.float(), name=f"loss {case}")
    for grad, want, leaf in zip(grads, expected_grads, leaves):
        assert_close_scaled(_zeros_if_none(grad, leaf), _zeros_if_none(want, leaf).float(), name=f"grad {case}")

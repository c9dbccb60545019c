"""define_kernels/checkpoint.py: DeFINE's self-describing checkpoints (its options in the state
dict's extra state): mismatches name the option, runtime options may differ, old checkpoints load."""
import pytest
import torch
from torch import nn

from define_kernels import DeFINE

SMALL = dict(map_dim=8, expand_dim=32, depth=3, max_groups=4)


def small_define(**options):
    return DeFINE(50, 12, **{**SMALL, **options})


@pytest.mark.parametrize("option, value", [("act", "relu"), ("shuffle", True), ("transform", "hgt"),
                                           ("padding_idx", 0), ("scale_map", False), ("norm", None)])
def test_checkpoint_with_other_options_raises_naming_the_option(option, value):
    source = small_define(**{option: value})
    with pytest.raises(ValueError, match=f"{option}=.*in the checkpoint"):
        small_define().load_state_dict(source.state_dict())


def test_checkpoint_runtime_options_may_differ():
    source = small_define(dropout=0.2, dedup=False, cache=False)
    target = small_define(dropout=0.0, sparse=True)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.map_weight, source.map_weight)


def test_loading_an_unpadded_table_into_a_padding_model_zeroes_the_padding_row():
    source = small_define()
    state = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    assert source.map_weight[5].abs().sum() > 0
    target = small_define(padding_idx=5)
    target.load_state_dict(state)
    assert torch.equal(target.map_weight[5], torch.zeros(8))
    assert torch.equal(target.map_weight[4], source.map_weight[4])


def test_old_checkpoints_without_extra_state_still_load_strictly():
    source = small_define(act="relu")
    state = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    target = small_define()  # other act: not detectable without the description, as before
    result = target.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_extra_state_is_a_tensor_and_round_trips_through_torch_save(tmp_path):
    source = small_define(padding_idx=1, shuffle=True)
    state = source.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-friendly
    torch.save(state, tmp_path / "ckpt.pt")
    target = small_define(padding_idx=1, shuffle=True)
    target.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    ids = torch.tensor([1, 3, 9])
    assert torch.equal(target(ids), source(ids))
    nested = nn.Sequential(small_define(padding_idx=1, shuffle=True))
    nested.load_state_dict({"0." + k: v for k, v in state.items()})
    with pytest.raises(ValueError, match="shuffle=True in the checkpoint but False here"):
        nn.Sequential(small_define(padding_idx=1)).load_state_dict({"0." + k: v for k, v in state.items()})

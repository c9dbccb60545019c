"""Bad state dicts for the authors' layout import, and checkpoints saved with the old cycle rule:
errors name the key or parameter."""
import pytest
import torch

from define_kernels import DeFINE, HGT, HGTConfig
from define_kernels.delight import from_delight

from delight_reference import random_their_state_dict

PREFIX = "decoder.embed_tokens."


def _good():
    return random_their_state_dict(23, 12, 16, 30, 6, 4, True, PREFIX)


def test_missing_key_is_named():
    for key in ("dextra_layer.output_layer.bias", "map_layer.weight",
                "dextra_layer.dextra_layers.2.normalization_fn.weight",
                "dextra_layer.input_layer.weights"):
        sd = _good()
        del sd[PREFIX + key]
        with pytest.raises(KeyError, match=PREFIX + key):
            from_delight(sd, PREFIX)
    with pytest.raises(KeyError, match="map_layer.weight"):
        from_delight(_good(), prefix="encoder.embed_tokens.")


def test_inconsistent_shapes_are_named():
    cases = {
        "dextra_layer.input_layer.bias": torch.zeros(5),
        "dextra_layer.output_layer.weights": torch.zeros(16, 20),
        "dextra_layer.dextra_layers.1.bias": torch.zeros(3),
        "dextra_layer.dextra_layers.3.normalization_fn.bias": torch.zeros(7),
        "dextra_layer.input_layer.weights": torch.zeros(8, 11),
    }
    for key, bad in cases.items():
        sd = _good()
        sd[PREFIX + key] = bad.double()
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            from_delight(sd, PREFIX)


def test_groups_not_power_of_two_or_off_cycle_are_named():
    sd = _good()
    key = PREFIX + "dextra_layer.dextra_layers.0.weights"
    a, w = sd[key].shape[0] * sd[key].shape[1], sd[key].shape[0] * sd[key].shape[2]
    sd[key] = torch.zeros(3, a // 3 if a % 3 == 0 else 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dextra_layers\.0\.weights.*power of two"):
        from_delight(sd, PREFIX)
    sd = _good()
    g = sd[key].shape[0]
    sd[key] = sd[key].reshape(g // 2, sd[key].shape[1] * 2, -1)  # wrong group count for the cycle
    with pytest.raises(ValueError, match=r"dextra_layers\.0\.weights has 2 groups.*cycle"):
        from_delight(sd, PREFIX)


def test_widths_off_the_authors_rule_are_named():
    sd = _good()
    key = PREFIX + "dextra_layer.dextra_layers.0.weights"
    g, a_g, w_g = sd[key].shape
    sd[key] = torch.zeros(g, a_g, w_g + 2, dtype=torch.float64)  # 8 wider than their rule gives
    with pytest.raises(ValueError, match=r"dextra_layers\.0\.weights: out_features .* width rule"):
        from_delight(sd, PREFIX)


def test_unexpected_key_under_prefix_is_named():
    sd = _good()
    sd[PREFIX + "dextra_layer.input_layer.normalization_fn.running_mean"] = torch.zeros(8)
    with pytest.raises(ValueError, match="running_mean"):
        from_delight(sd, PREFIX)
    assert from_delight(sd, PREFIX, strict=False).embedding_dim == 16


# ----------------------------------------------------------------------------- cycle rule change
def test_old_cycle_checkpoint_raises_naming_parameter_and_rule_change():
    # N=4, g_max=8: the old cycle gave 8, 4, 2, 1 (what "halve" gives here), the corrected 1, 8, 4, 2.
    old = HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="halve")).state_dict()
    with pytest.raises(ValueError, match=r"layers\.0\.weight.*group_rule='cycle' was corrected"):
        HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="cycle")).load_state_dict(old)
    old_define = DeFINE(30, 24, map_dim=16, expand_dim=64, depth=4, max_groups=8).state_dict()
    del old_define["_extra_state"]  # checkpoints from before the fix carry no option description
    with pytest.raises(ValueError, match=r"hgt\.layers\.0\.weight"):
        DeFINE(30, 24, map_dim=16, expand_dim=64, depth=4, max_groups=8,
               group_rule="cycle").load_state_dict(old_define)
    same = HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="cycle"))
    HGT(HGTConfig(16, 64, 24, 4, 8, group_rule="cycle")).load_state_dict(same.state_dict())

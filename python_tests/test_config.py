"""HGTConfig: layer tables against hand-written ones (docs/math.md §2, §5), counts, hashing."""
import dataclasses

import pytest

from define_kernels import DeFINE, HGTConfig
from define_kernels.workloads import WORKLOADS

# (in_features, out_features, groups, input_kind), worked out by hand from docs/math.md §2.
HAND_TABLES = {
    "wt2-small": [(128, 352, 8, "x"), (480, 576, 4, "mix"), (704, 800, 2, "mix"),
                  (928, 1024, 1, "mix"), (1152, 512, 1, "mix")],
    "wt103-base": [(128, 352, 8, "x"), (480, 576, 4, "mix"), (704, 800, 2, "mix"),
                   (928, 1024, 1, "mix"), (1152, 512, 1, "mix")],
    # 128 + 896/3 = 426.67 -> 432; 128 + 1792/3 = 725.33 -> 728 (multiples of lcm(g, g', 8) = 8)
    "ptb-lstm": [(128, 432, 4, "x"), (560, 728, 2, "mix"), (856, 1024, 1, "mix"),
                 (1152, 400, 1, "mix")],
    # 256 + 768/4 = 448, 640, 832, 1024
    "wt103-wide": [(256, 448, 8, "x"), (704, 640, 4, "mix"), (896, 832, 2, "mix"),
                   (1088, 1024, 1, "mix"), (1280, 1024, 1, "mix")],
    # 128 + 3968/3 = 1450.67 -> 1456; 128 + 7936/3 = 2773.33 -> 2776; 4096
    "wt103-deep": [(128, 1456, 4, "x"), (1584, 2776, 2, "mix"), (2904, 4096, 1, "mix"),
                   (4224, 384, 1, "mix")],
}

# docs/math.md §5 columns: transform weights+biases (M) and MFLOP/token, to the table's precision.
MATH_COUNTS = {"ptb-lstm": (1.56, 3.11), "wt2-small": (1.90, 3.79), "wt103-base": (1.90, 3.79),
               "wt103-wide": (2.93, 5.85), "wt103-deep": (15.77, 31.52)}


@pytest.mark.parametrize("name", sorted(HAND_TABLES))
def test_workload_layers_match_hand_tables(name):
    assert [tuple(layer) for layer in WORKLOADS[name].config().layers] == HAND_TABLES[name]


def _weights_and_biases(table):
    return sum(a * w // g + w for a, w, g, _ in table)


@pytest.mark.parametrize("name", sorted(HAND_TABLES))
def test_workload_counts_match_spec(name):
    config = WORKLOADS[name].config()
    table = HAND_TABLES[name]
    millions, mflop = MATH_COUNTS[name]
    assert round(_weights_and_biases(table) / 1e6, 2) == millions
    assert config.macs_per_token == sum(a * w // g for a, w, g, _ in table)
    assert round(2 * config.macs_per_token / 1e6, 2) == mflop
    layer_norm = sum(2 * w // g for a, w, g, _ in table)
    assert config.num_parameters == _weights_and_biases(table) + layer_norm


def test_define_parameter_counts_split_map_and_transform():
    workload = WORKLOADS["wt2-small"]
    model = DeFINE(**workload.define_kwargs())
    counts = model.parameter_counts()
    assert counts["map"] == 33_278 * 128
    assert counts["transform"] == 1_899_712 + 2 * (44 + 144 + 400 + 1024 + 512)
    assert counts["total"] == counts["map"] + counts["transform"]
    assert model.macs_per_token == 1_896_448


HAND_ABLATIONS = {
    # p=16, k=64, m=24, N=3, g_max=4, align 8. Targets 32, 48, 64.
    ("define", "halve"): [(16, 32, 4, "x"), (48, 48, 2, "mix"), (64, 64, 1, "mix"), (80, 24, 1, "mix")],
    ("define_nomix", "halve"): [(16, 32, 4, "x"), (48, 48, 2, "concat"), (64, 64, 1, "concat"),
                                (80, 24, 1, "concat")],
    ("hgt", "halve"): [(16, 32, 4, "x"), (32, 48, 2, "prev"), (48, 64, 1, "prev"), (64, 24, 1, "prev")],
    ("glt", "halve"): [(16, 32, 4, "x"), (32, 48, 4, "prev"), (48, 64, 4, "prev"), (64, 24, 1, "prev")],
    ("linear", "halve"): [(16, 32, 1, "x"), (32, 48, 1, "prev"), (48, 64, 1, "prev"), (64, 24, 1, "prev")],
    # cycle with N=3, g_max=4: 1, 2, 4, 1 over N + 1 = 4 layers, reversed -> 1, 4, 2 | 1
    ("define", "cycle"): [(16, 32, 1, "x"), (48, 48, 4, "mix"), (64, 64, 2, "mix"), (80, 24, 1, "mix")],
}


@pytest.mark.parametrize("transform, rule", sorted(HAND_ABLATIONS))
def test_ablation_tables(transform, rule):
    config = HGTConfig(16, 64, 24, 3, 4, transform=transform, group_rule=rule)
    assert [tuple(layer) for layer in config.layers] == HAND_ABLATIONS[(transform, rule)]


def test_cycle_rule_restarts_then_reverses():
    # N=5, g_max=4: 1, 2, 4, 1, 2, 4 over the N + 1 layers, reversed -> 4, 2, 1, 4, 2 | 1
    config = HGTConfig(16, 96, 8, 5, 4, group_rule="cycle")
    assert config.expand_groups == (4, 2, 1, 4, 2)
    assert [layer.groups for layer in config.layers] == [4, 2, 1, 4, 2, 1]
    # halve with N=5, g_max=4: 4, 2, 1, 1, 1
    assert HGTConfig(16, 96, 8, 5, 4).expand_groups == (4, 2, 1, 1, 1)


@pytest.mark.parametrize("depth, max_groups, expected", [
    (3, 8, (8, 4, 2)), (4, 8, (1, 8, 4, 2)), (4, 4, (2, 1, 4, 2)), (1, 8, (2,)), (2, 2, (1, 2)),
    (7, 2, (2, 1, 2, 1, 2, 1, 2))])
def test_cycle_rule_corrected_examples(depth, max_groups, expected):
    # The authors' cycle runs over N + 1 entries; the reduce layer takes the last (always 1).
    assert HGTConfig(16, 64, 8, depth, max_groups, group_rule="cycle").expand_groups == expected


# p=12, k=30, m=24, N=4, g_max=4, cycle groups 2, 1, 4, 2 | 1; targets 16.5, 21, 25.5, 30.
TRUNCATE_TABLE = [(12, 16, 2, "x"), (28, 24, 1, "mix"), (36, 32, 4, "mix"), (44, 32, 2, "mix"),
                  (44, 24, 1, "mix")]
EXACT_TABLE = [(12, 24, 2, "x"), (36, 24, 1, "mix"), (36, 32, 4, "mix"), (44, 32, 2, "mix"),
               (44, 24, 1, "mix")]


def test_width_rounding_truncate_then_round_up():
    # truncate: 16.5 -> 16 -> 16 (multiple of 8); exact: ceil(16.5 / 8) * 8 = 24.
    truncate = HGTConfig(12, 30, 24, 4, 4, group_rule="cycle", width_rounding="truncate")
    exact = HGTConfig(12, 30, 24, 4, 4, group_rule="cycle")
    assert [tuple(layer) for layer in truncate.layers] == TRUNCATE_TABLE
    assert [tuple(layer) for layer in exact.layers] == EXACT_TABLE
    with pytest.raises(ValueError, match="width_rounding"):
        HGTConfig(12, 30, 24, 4, 4, width_rounding="floor")


def test_output_layer_is_one_more_concat_layer_with_norm_and_act():
    config = HGTConfig(12, 30, 24, 4, 4, group_rule="cycle", width_rounding="truncate",
                       output_layer=True, reduce_norm=False, reduce_act=False)
    assert [tuple(layer) for layer in config.layers] == TRUNCATE_TABLE + [(36, 24, 1, "concat")]
    assert config.reduce_index == 4
    # the reduce layer keeps reduce_norm / reduce_act; the output layer is like an expand layer
    assert [config.layer_has_norm(i) for i in range(6)] == [True] * 4 + [False, True]
    assert [config.layer_act(i) for i in range(6)] == ["gelu"] * 4 + [None, "gelu"]
    shapes = config.param_shapes()
    assert shapes[-4:] == ((1, 36, 24), (1, 24), (24,), (24,)) and len(shapes) == 4 * 4 + 2 + 4
    without = HGTConfig(12, 30, 24, 4, 4, group_rule="cycle", width_rounding="truncate")
    assert config.macs_per_token == without.macs_per_token + 36 * 24
    assert config.num_parameters == without.num_parameters + 36 * 24 + 3 * 24 - 2 * 24
    assert "(5) output: 36 -> 24, groups=1, concat, layernorm, gelu" in config.table()
    assert "(4) reduce: 44 -> 24, groups=1, mix" in config.table()
    assert HGTConfig.from_key(config.key) == config
    with pytest.raises(ValueError, match="output_layer"):
        HGTConfig(12, 30, 24, 4, 4, output_layer=1)


def test_odd_widths_round_up_to_group_and_align_multiples():
    # p=12, k=40, N=2, g_max=4, align=1: targets 26 -> multiple of lcm(4, 2) = 4 -> 28; 40
    config = HGTConfig(12, 40, 20, 2, 4, align=1)
    assert [tuple(layer) for layer in config.layers] == [(12, 28, 4, "x"), (40, 40, 2, "mix"),
                                                         (52, 20, 1, "mix")]
    # per-group widths 7 and 20 are not powers of two; shapes follow
    assert config.param_shapes()[:4] == ((4, 3, 7), (4, 7), (7,), (7,))


def test_layer_norm_and_act_flags_for_reduce():
    config = HGTConfig(16, 64, 24, 3, 4, reduce_norm=False, reduce_act=False, act="silu")
    assert [config.layer_has_norm(i) for i in range(4)] == [True, True, True, False]
    assert [config.layer_act(i) for i in range(4)] == ["silu", "silu", "silu", None]
    assert config.params_per_layer(3) == 2 and len(config.param_shapes()) == 3 * 4 + 2
    no_norm = HGTConfig(16, 64, 24, 3, 4, norm=None, act=None)
    assert len(no_norm.param_shapes()) == 8 and no_norm.layer_act(0) is None


def test_config_is_frozen_hashable_and_round_trips_through_its_key():
    config = HGTConfig(16, 64, 24, 3, 4, shuffle=True, dropout=0.1)
    same = HGTConfig(16, 64, 24, 3, 4, shuffle=True, dropout=0.1)
    assert config == same and hash(config) == hash(same) and len({config, same}) == 1
    assert HGTConfig.from_key(config.key) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 5
    assert "expand1: 16 -> 32, groups=4" in config.table()


def test_in_proj_is_layer_zero_of_the_table():
    """in_proj_from=n: layer 0 is the in-proj n -> in_dim (one group, kind "proj", the expand
    layers' norm and act, its own dropout); the stack's layers follow it unchanged."""
    plain = HGTConfig(16, 64, 24, 3, 4, reduce_norm=False, reduce_act=False, output_layer=True,
                      dropout=0.1)
    config = dataclasses.replace(plain, in_proj_from=10, in_proj_dropout=0.3)
    assert tuple(config.layers[0]) == (10, 16, 1, "proj") and config.layers[1:] == plain.layers
    assert (config.first_stack_layer, config.input_width, config.reduce_index) == (1, 10, 4)
    assert (plain.first_stack_layer, plain.input_width, plain.reduce_index) == (0, 16, 3)
    assert [config.layer_name(i) for i in range(6)] == ["in_proj", "expand1", "expand2", "expand3",
                                                        "reduce", "output"]
    assert [config.layer_has_norm(i) for i in range(6)] == [True, True, True, True, False, True]
    assert [config.layer_act(i) for i in range(6)] == ["gelu"] * 4 + [None, "gelu"]
    assert [config.layer_dropout(i) for i in range(6)] == [0.3] + [0.1] * 5
    assert config.param_shapes() == ((1, 10, 16), (1, 16), (16,), (16,)) + plain.param_shapes()
    assert config.macs_per_token == plain.macs_per_token + 10 * 16
    assert config.num_parameters == plain.num_parameters + 10 * 16 + 3 * 16
    assert "(0) in_proj: 10 -> 16, groups=1, proj, layernorm, gelu" in config.table()
    assert HGTConfig.from_key(config.key) == config and config != plain
    assert not dataclasses.replace(plain, dropout=0.0).has_dropout
    assert dataclasses.replace(plain, dropout=0.0, in_proj_from=10, in_proj_dropout=0.2).has_dropout
    assert not HGTConfig(16, 64, 24, 3, 4, in_proj_from=10, norm=None).layer_has_norm(0)


def test_define_with_in_proj_counts_it_once():
    model = DeFINE(100, 24, map_dim=10, expand_dim=64, depth=3, max_groups=4, in_proj_dim=16)
    plain = HGTConfig(16, 64, 24, 3, 4)
    assert model.config.in_proj_from == 10 and model.config.layers[1:] == plain.layers
    assert model.macs_per_token == plain.macs_per_token + 10 * 16
    assert model.parameter_counts()["transform"] == plain.num_parameters + 10 * 16 + 3 * 16

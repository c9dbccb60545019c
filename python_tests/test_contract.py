"""define_kernels/contract.py: the per-layer plan, its encoding for the C++ ops, the validator and
the output shapes every fake returns."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from define_kernels import contract
from define_kernels.codes import INTS_PER_LAYER, Activation, InputKind
from define_kernels.config import HGTConfig

CONFIGS = [
    HGTConfig(8, 32, 12, 3, 4),
    HGTConfig(8, 24, 12, 2, 2, transform="define_nomix", norm=None, act="relu", reduce_act=False),
    HGTConfig(8, 32, 12, 3, 4, in_proj_from=10, in_proj_dropout=0.2, dropout=0.1, output_layer=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["define", "nomix", "in_proj"])
def test_plan_follows_the_config(config):
    plan = contract.plan(config)
    assert plan is contract.plan(config)  # computed once per config
    offset = 0
    for index, (layer, spec) in enumerate(zip(plan.layers, config.layers)):
        assert (layer.in_features, layer.out_features, layer.groups) == spec[:3]
        assert layer.kind.label == spec.input_kind and layer.index == index
        assert layer.has_norm == config.layer_has_norm(index)
        assert layer.act.label == config.layer_act(index)
        assert layer.dropout == config.layer_dropout(index)
        assert layer.param_offset == offset
        offset += layer.num_params
    assert plan.param_shapes == config.param_shapes() and len(plan.param_shapes) == offset
    assert plan.out_dim == config.out_dim and plan.input_width == config.input_width
    assert plan.stack_width == config.in_dim and plan.has_in_proj == config.has_in_proj
    rows = 5
    assert plan.saved_shapes(rows)[0] == (rows, config.layers[0].out_features)
    assert len(plan.saved_shapes(rows)) == 2 * len(config.layers) - 1


@pytest.mark.parametrize("config", CONFIGS, ids=["define", "nomix", "in_proj"])
def test_encoding_round_trips(config):
    plan = contract.plan(config)
    layers = plan.encode()
    assert len(layers) == INTS_PER_LAYER * len(plan.layers)
    assert contract.decode(layers, config.input_width) == plan


def test_decode_refuses_an_in_proj_where_cuda_does():
    plan = contract.plan(CONFIGS[2])
    with pytest.raises(ValueError, match="in-proj"):
        contract.decode(plan.encode(), CONFIGS[2].input_width, allow_in_proj=False)


def test_cpp_fakes_refuse_the_in_proj_on_cuda_only():
    """The CUDA ops do not run an in-proj (checks.h, allow_in_proj=false): the C++ ops' fakes
    say so for CUDA tensors and accept it on the CPU."""
    config = CONFIGS[2]
    layers = contract.plan(config).encode()
    with FakeTensorMode():
        for device, refused in (("cpu", False), ("cuda", True)):
            x = torch.empty(4, config.input_width, device=device)
            params = [torch.empty(shape, device=device) for shape in config.param_shapes()]
            args = (x, None, params, layers, 0.0, -1)
            if refused:
                with pytest.raises(ValueError, match="in-proj"):
                    contract.check_encoded_inputs(*args, allow_in_proj=device != "cuda")
            else:
                assert contract.check_encoded_inputs(*args) == contract.plan(config)


def test_output_shapes():
    config = CONFIGS[0]
    plan = contract.plan(config)
    x = torch.empty(7, config.in_dim)
    ids = torch.zeros(3, dtype=torch.int64)
    params = [torch.empty(shape) for shape in config.param_shapes()]
    assert contract.forward_outputs(x, ids, plan).shape == (3, config.out_dim)
    y, saved = contract.forward_outputs(x, None, plan, saving=True)
    assert y.shape == (7, config.out_dim) and [tuple(t.shape) for t in saved] == plan.saved_shapes(7)
    grad_rows, grad_params = contract.backward_outputs(x, ids, params)
    assert grad_rows.shape == (3, config.in_dim)
    assert [g.shape for g in grad_params] == [p.shape for p in params]
    contract.check_saved(saved, x, None, plan)
    with pytest.raises(ValueError, match="saved"):
        contract.check_saved(saved[:-1], x, None, plan)
    with pytest.raises(ValueError, match="grad_y"):
        contract.check_grad_y(torch.empty(7, config.out_dim + 1), x, None, plan)


@pytest.mark.parametrize("edit, argument", [
    (lambda x, ids, params: (x.long(), ids, params), "x"),
    (lambda x, ids, params: (x[:, :-1], ids, params), "x"),
    (lambda x, ids, params: (x, ids.float(), params), "ids"),
    (lambda x, ids, params: (x, ids[None], params), "ids"),
    (lambda x, ids, params: (x, ids, params[:-1]), "params"),
    (lambda x, ids, params: (x, ids, [params[0][:, :-1]] + params[1:]), r"params\[0\]"),
    (lambda x, ids, params: (x, ids, params[:1] + [params[1].double()] + params[2:]), r"params\[1\]"),
])
def test_check_inputs_names_the_argument(edit, argument):
    config = CONFIGS[0]
    x = torch.empty(7, config.in_dim)
    ids = torch.zeros(3, dtype=torch.int64)
    params = [torch.empty(shape) for shape in config.param_shapes()]
    contract.check_inputs(x, ids, params, contract.plan(config))
    with pytest.raises(ValueError, match=argument):
        contract.check_inputs(*edit(x, ids, params), contract.plan(config))


def test_enum_codes_of_the_plan():
    plan = contract.plan(CONFIGS[2])
    assert plan.layers[0].kind is InputKind.PROJ and plan.layers[1].kind is InputKind.X
    assert {layer.act for layer in plan.layers} <= set(Activation)

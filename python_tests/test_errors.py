"""The bad-input catalogue: each case asserts the exception type and that it names the argument."""
import pytest
import torch

import define_kernels
from define_kernels import HGT, DeFINE, HGTConfig, hgt
from define_kernels.inference_cache import InferenceCache

SMALL = dict(map_dim=8, expand_dim=16, depth=2, max_groups=2)
CONFIG = HGTConfig(8, 16, 6, 2, 2)


def small_define(**options):
    return DeFINE(10, 6, **{**SMALL, **options})


def op_inputs():
    return torch.randn(3, 8), [torch.randn(s) for s in CONFIG.param_shapes()]


def _bad_param_shape():
    x, params = op_inputs()
    params[3] = torch.randn(5)
    return hgt(x, params, CONFIG)


def _bad_param_dtype():
    x, params = op_inputs()
    params[0] = params[0].double()
    return hgt(x, params, CONFIG)


def _bad_param_device():
    x, params = op_inputs()
    params[1] = params[1].to("meta")
    return hgt(x, params, CONFIG)


CATALOGUE = [
    # (name, callable, exception, pattern the message must contain)
    ("id == V, train/dedup", lambda: small_define()(torch.tensor([1, 10])), IndexError, r"ids contains 10"),
    ("id == V, no dedup", lambda: small_define(dedup=False)(torch.tensor([10])), IndexError, r"ids contains 10"),
    ("id == V, eval cache", lambda: small_define().eval()(torch.tensor([12])), IndexError, r"ids contains 12"),
    ("id == V, in-proj path", lambda: small_define(in_proj_dim=8, dedup=False)(torch.tensor([11])),
     IndexError, r"ids contains 11"),
    ("negative id", lambda: small_define()(torch.tensor([3, -1])), IndexError, r"ids contains -1"),
    ("id out of range, op", lambda: hgt(torch.randn(4, 8), op_inputs()[1], CONFIG, ids=torch.tensor([4])),
     IndexError, r"ids contains 4"),
    ("float ids", lambda: small_define()(torch.tensor([1.0])), ValueError, r"ids must be int32 or int64"),
    ("bool ids", lambda: small_define()(torch.tensor([True])), ValueError, r"ids must be int32 or int64"),
    ("list ids", lambda: small_define()([1, 2]), ValueError, r"ids must be a tensor"),
    ("ids on wrong device", lambda: small_define()(torch.zeros(2, dtype=torch.long, device="meta")),
     ValueError, r"ids is on meta"),
    ("2-D ids to the op", lambda: hgt(torch.randn(4, 8), op_inputs()[1], CONFIG,
                                      ids=torch.zeros(2, 2, dtype=torch.long)), ValueError, r"ids must be 1-D"),
    ("x wrong last dim", lambda: HGT(CONFIG)(torch.randn(3, 7)), ValueError, r"x must have shape \[\.\.\., 8\]"),
    ("x wrong last dim, op", lambda: hgt(torch.randn(3, 7), op_inputs()[1], CONFIG), ValueError,
     r"x has last dim 7"),
    ("x integer dtype, op", lambda: hgt(torch.zeros(3, 8, dtype=torch.long), op_inputs()[1], CONFIG),
     ValueError, r"x must be a floating tensor"),
    ("x 3-D, op", lambda: hgt(torch.randn(1, 3, 8), op_inputs()[1], CONFIG), ValueError, r"x must be 2-D"),
    ("params count", lambda: hgt(*op_inputs()[:1], op_inputs()[1][:-1], CONFIG), ValueError,
     r"params must hold 12 tensors"),
    ("param shape", _bad_param_shape, ValueError, r"params\[3\] must have shape \(8,\)"),
    ("param dtype", _bad_param_dtype, ValueError, r"params\[0\] has dtype torch.float64"),
    ("param device", _bad_param_device, ValueError, r"params\[1\] is on meta"),
    ("in_dim not divisible by groups", lambda: HGTConfig(12, 32, 8, 2, 8), ValueError,
     r"in_dim \(12\) must be divisible by max_groups \(8\)"),
    ("max_groups not a power of two", lambda: HGTConfig(12, 32, 8, 2, 3), ValueError,
     r"max_groups must be a power of two"),
    ("unknown act", lambda: small_define(act="tanh"), ValueError, r"act must be one of"),
    ("unknown norm", lambda: HGTConfig(8, 16, 6, 2, 2, norm="rms"), ValueError, r"norm must be one of"),
    ("unknown transform", lambda: HGTConfig(8, 16, 6, 2, 2, transform="mlp"), ValueError,
     r"transform must be one of"),
    ("unknown group rule", lambda: HGTConfig(8, 16, 6, 2, 2, group_rule="double"), ValueError,
     r"group_rule must be one of"),
    ("dropout = 1", lambda: HGTConfig(8, 16, 6, 2, 2, dropout=1.0), ValueError, r"dropout must be a float"),
    ("depth 0", lambda: HGTConfig(8, 16, 6, 0, 2), ValueError, r"depth must be a positive int"),
    ("align 0", lambda: HGTConfig(8, 16, 6, 2, 2, align=0), ValueError, r"align must be a positive int"),
    ("float expand_dim", lambda: HGTConfig(8, 16.0, 6, 2, 2), ValueError, r"expand_dim must be a positive int"),
    ("shuffle not bool", lambda: HGTConfig(8, 16, 6, 2, 2, shuffle="yes"), ValueError, r"shuffle must be a bool"),
    ("negative embedding_dim", lambda: DeFINE(10, -6), ValueError, r"embedding_dim must be a positive int"),
    ("zero num_embeddings", lambda: DeFINE(0, 6), ValueError, r"num_embeddings must be a positive int"),
    ("padding_idx out of range", lambda: small_define(padding_idx=10), ValueError, r"padding_idx must be within"),
    ("map_dropout = 1", lambda: small_define(map_dropout=1.0), ValueError, r"map_dropout must be in"),
    ("unknown backend, module", lambda: small_define(backend="cuda-magic"), ValueError,
     r"backend must be 'auto' or one of"),
    ("unknown backend, op", lambda: hgt(*op_inputs(), CONFIG, backend="nope"), ValueError,
     r"backend must be 'auto' or one of"),
    ("unknown backend, set_backend", lambda: define_kernels.set_backend("nope"), ValueError,
     r"backend must be 'auto' or one of"),
    ("HGT without a config", lambda: HGT({"in_dim": 8}), ValueError, r"config must be an HGTConfig"),
    ("cache chunk size 0", lambda: InferenceCache(0), ValueError, r"chunk_size must be >= 1"),
]


@pytest.mark.parametrize("name, call, error, pattern", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_raises_named_error(name, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 20


def test_bad_env_backend_names_the_variable(monkeypatch):
    from define_kernels import backends
    from define_kernels.backends import registry
    monkeypatch.setattr(registry, "_default_backend", None)
    monkeypatch.setenv(backends.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match="DEFINE_KERNELS_BACKEND must be 'auto' or one of"):
        backends.get_backend()


def test_empty_batch_is_not_an_error():
    x, params = op_inputs()
    assert hgt(x[:0], params, CONFIG).shape == (0, 6)
    assert hgt(x, params, CONFIG, ids=torch.zeros(0, dtype=torch.long)).shape == (0, 6)

"""DeFINE / HGT modules: state, dtype moves, padding, dedup, inference cache, sparse grads."""
import dataclasses

import pytest
import torch

from define_kernels import HGT, DeFINE, HGTConfig, reference
from tolerances import ATOL, RTOL, assert_close, assert_close_scaled

SMALL = dict(map_dim=8, expand_dim=32, depth=3, max_groups=4)


def small_define(**options):
    return DeFINE(50, 12, **{**SMALL, **options})


def zipf_ids(shape, vocab=50):
    """Skewed ids with many repeats, like real text."""
    ranks = torch.distributions.Pareto(1.0, 1.1).sample(shape).long() - 1
    return ranks.clamp(max=vocab - 1)


def randomize(model):
    """Non-trivial biases and LN affines so equalities are not accidental. The padding row is
    left as the module built it (zero), so no test zeroes it by hand."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param) * 0.1
            if name == "map_weight" and getattr(model, "padding_idx", None) is not None:
                noise[model.padding_idx] = 0
            param.add_(noise)
    return model


def test_define_matches_reference_on_gathered_rows():
    model = randomize(small_define()).double()
    ids = zipf_ids((3, 7))
    expected = reference.hgt_forward(model.map_weight, ids.reshape(-1), model.hgt.op_params(),
                                     model.config, scale=8 ** 0.5)
    assert_close(model(ids), expected.reshape(3, 7, 12), name="y")


def test_parameter_names_and_shapes_are_stable():
    model = small_define(padding_idx=0)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["map_weight"] == (50, 8)
    assert shapes["hgt.layers.0.weight"] == (4, 2, 4)      # 8 -> 8 + 24/3 = 16, g=4
    assert shapes["hgt.layers.0.bias"] == (4, 4)
    assert shapes["hgt.layers.0.norm_weight"] == (4,)
    assert shapes["hgt.layers.1.weight"] == (2, 12, 12)    # mix: 8 + 16 -> 24, g=2
    assert shapes["hgt.layers.3.weight"] == (1, 40, 12)    # reduce: 8 + 32 -> 12
    assert len(shapes) == 1 + 4 * 4


def test_state_dict_round_trip():
    source = randomize(small_define())
    target = small_define()
    target.load_state_dict(source.state_dict())
    ids = zipf_ids((20,))
    assert torch.equal(source(ids), target(ids))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_to_dtype(dtype):
    model = randomize(small_define())
    ids = zipf_ids((9,))
    expected = model(ids).double()
    model.to(dtype)
    y = model(ids)
    assert y.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    # fp64 vs the fp32 run: the fp32 row bounds the difference; fp16/bf16: their rows.
    bound = torch.float32 if dtype == torch.float64 else dtype
    torch.testing.assert_close(y.double(), expected, atol=ATOL[bound], rtol=RTOL[bound])


def test_padding_idx_row_is_zero_output_and_gets_no_gradient(module_backend):
    model = randomize(small_define(padding_idx=3, backend=module_backend))
    assert torch.equal(model.map_weight[3], torch.zeros(8)), "padding row must be zero from init"
    ids = torch.tensor([[3, 1, 3], [7, 3, 2]])
    y = model(ids)
    assert torch.equal(y[ids == 3], torch.zeros(3, 12))
    assert y[ids != 3].abs().sum() > 0
    grad_y = torch.randn_like(y)  # y.pow(2).sum() has zero gradient at zero outputs: blind to leaks
    (y * grad_y).sum().backward()
    assert torch.equal(model.map_weight.grad[3], torch.zeros(8))
    assert model.map_weight.grad[1].abs().sum() > 0
    # padding positions contribute nothing: same parameter grads as without them
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (model(torch.tensor([1, 7, 2])) * grad_y[ids != 3]).sum().backward()
    for before, param in zip(grads, model.parameters()):
        assert_close_scaled(param.grad, before, torch.float32, name="grad without padding positions")


def test_negative_padding_idx_is_normalised():
    assert small_define(padding_idx=-1).padding_idx == 49


@pytest.mark.parametrize("options", [dict(), dict(padding_idx=0), dict(dropout=0.3),
                                     dict(in_proj_dim=16), dict(sparse=True)],
                         ids=["plain", "padding", "dropout", "in_proj", "sparse"])
def test_dedup_equals_no_dedup_outputs_and_every_gradient(options, module_backend):
    torch.manual_seed(1)
    with_dedup = randomize(small_define(dedup=True, backend=module_backend, **options)).double()
    without = small_define(dedup=False, backend=module_backend, **options).double()
    without.load_state_dict(with_dedup.state_dict())
    ids = zipf_ids((4, 9))
    ids[0, 0] = 0
    grad = torch.randn(4, 9, 12, dtype=torch.float64)
    outputs = []
    for model in (with_dedup, without):
        torch.manual_seed(5)  # same dropout seed for both
        y = model(ids)
        (y * grad).sum().backward()
        outputs.append(y)
    assert_close(outputs[0], outputs[1], name="y")
    for (name, a), b in zip(with_dedup.named_parameters(), without.parameters()):
        assert_close(a.grad.to_dense(), b.grad.to_dense(), name=f"grad {name}")


def test_sparse_gradient_touches_only_batch_rows(module_backend):
    model = small_define(sparse=True, backend=module_backend)
    dense = small_define(sparse=False, backend=module_backend)
    dense.load_state_dict(model.state_dict())
    ids = torch.tensor([4, 4, 9])
    model(ids).sum().backward()
    grad = model.map_weight.grad.coalesce()
    assert grad.is_sparse and set(grad.indices()[0].tolist()) == {4, 9}
    dense(ids).sum().backward()  # values too: the sparse path applies the map scale like the fused one
    assert_close_scaled(grad.to_dense(), dense.map_weight.grad, torch.float32, name="sparse map grad values")


@torch.no_grad()
def served(model, ids):
    """The module's output where the cache may serve (no gradient can be needed)."""
    return model(ids)


def test_cache_matches_live_forward_and_is_invalidated_after_optimizer_step(module_backend):
    model = randomize(small_define(padding_idx=0, backend=module_backend))
    ids = zipf_ids((5, 6))
    model.eval()
    cached = served(model, ids)
    assert model.cache.builds == 1
    model.use_cache = False
    assert_close(cached, served(model, ids), name="cached vs live")
    model.use_cache = True
    served(model, ids)
    assert model.cache.builds == 1 and model.cache.fills == 1, "unchanged parameters must not refill"

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(ids).sum().backward()
    optimizer.step()
    assert model.cache.builds == 1, "train() never uses or builds the cache"
    model.eval()
    refreshed = served(model, ids)
    assert model.cache.builds == 2
    model.use_cache = False
    assert_close(refreshed, served(model, ids), name="after optimizer step")
    assert not torch.allclose(refreshed, cached)


def test_cache_rebuilds_after_load_state_dict_and_dtype_move(module_backend):
    model = small_define(backend=module_backend).eval()
    ids = zipf_ids((8,))
    served(model, ids)
    model.load_state_dict(randomize(small_define()).state_dict())
    served(model, ids)
    assert model.cache.builds == 2
    y = served(model.double(), ids)
    assert model.cache.builds == 3 and y.dtype == torch.float64


def test_cache_fills_lazily_and_materializes_in_bounded_chunks():
    model = small_define(cache_chunk_size=7).eval()
    calls = []
    original = model._embed
    model._embed = lambda ids: calls.append(ids.numel()) or original(ids)
    served(model, torch.tensor([1, 2, 2]))
    assert calls == [2], "the first call computes only its distinct ids"
    table = model.materialize_cache()
    assert max(calls) == 7 and sum(calls) == 50 and table.shape == (50, 12)


def test_empty_batch_returns_empty_result():
    model = small_define()
    for shape in [(0,), (2, 0)]:
        for training in (True, False):
            model.train(training)
            y = model(torch.zeros(shape, dtype=torch.long))
            assert y.shape == (*shape, 12)
    assert HGT(HGTConfig(8, 16, 4, 2, 2))(torch.zeros(0, 8)).shape == (0, 4)


def test_int32_ids_and_any_shape():
    model = small_define()
    ids = zipf_ids((2, 3, 4))
    assert torch.equal(model(ids), model(ids.to(torch.int32)))
    assert model(ids).shape == (2, 3, 4, 12)
    assert model(torch.tensor(5)).shape == (12,)


def test_dropout_is_repeatable_under_manual_seed_and_off_in_eval():
    model = small_define(dropout=0.4, cache=False)
    ids = zipf_ids((10,))
    torch.manual_seed(3)
    first = model(ids)
    torch.manual_seed(3)
    assert torch.equal(first, model(ids))
    assert not torch.equal(first, model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_extra_repr_shows_layer_table():
    text = repr(small_define(padding_idx=1))
    assert "padding_idx=1" in text
    assert "(3) reduce: 40 -> 12, groups=1, mix, layernorm, gelu" in text
    assert "(0) expand1: 8 -> 16, groups=4, x, layernorm, gelu" in text


def test_in_proj_path_matches_manual_composition():
    model = randomize(small_define(in_proj_dim=16)).double()
    ids = zipf_ids((6,))
    e = model.map_weight[ids] * 8 ** 0.5
    x = torch.nn.functional.gelu(model.in_proj_norm(model.in_proj(e)))
    stack = dataclasses.replace(model.config, in_proj_from=None)  # the stack without its layer 0
    expected = reference.hgt_forward(x, None, model.hgt.op_params(), stack)
    assert_close(model(ids), expected, name="y")

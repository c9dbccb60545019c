"""define_kernels/inference_cache.py through DeFINE's eval: the cache serves only when no gradient
can be needed, fills lazily per id, is invalidated by every parameter change, and is thread-safe."""
import threading

import pytest
import torch

from define_kernels import DeFINE
from tolerances import assert_close

SMALL = dict(map_dim=8, expand_dim=32, depth=3, max_groups=4)


def small_define(vocab=50, **options):
    model = DeFINE(vocab, 12, **{**SMALL, **options})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def test_eval_with_grad_enabled_keeps_the_graph_and_matches_train_mode_without_dropout():
    model = small_define(padding_idx=0)
    ids = torch.tensor([[0, 3, 7], [7, 49, 2]])
    grad_out = torch.randn(2, 3, 12)
    model.train()
    (model(ids) * grad_out).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        model(ids)  # a filled cache must not be served when gradients are wanted
    y = model(ids)
    assert y.requires_grad
    (y * grad_out).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient in eval mode"
        assert_close(param.grad, expected[name], name=f"grad {name}")


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen"])
def test_cache_serves_when_no_gradient_can_be_needed(context):
    model = small_define().eval()
    ids = torch.tensor([4, 9, 4])
    live = model(ids).detach()
    if context == "frozen":
        model.requires_grad_(False)
        y = model(ids)
    else:
        with getattr(torch, context)():
            y = model(ids)
    assert model.cache.fills == 1 and not y.requires_grad
    assert_close(y, live, name="served")


def test_first_eval_costs_the_distinct_ids_then_nothing_and_full_table_only_when_most_of_v_is_seen():
    model = small_define(vocab=100, cache_chunk_size=16).eval()
    with torch.no_grad():
        model(torch.tensor([5, 5, 6, 7]))
        assert model.cache.rows_computed == 3 and model.cache.filled_rows == 3
        model(torch.tensor([6, 7, 5]))
        assert model.cache.fills == 1, "rows already filled are not recomputed"
        model(torch.tensor([6, 8]))
        assert model.cache.rows_computed == 4, "only the new id is computed"
        model(torch.arange(10, 60))  # 54 of 100 requested: the rest is filled at once
        assert model.cache.filled_rows == 100 and model.cache.rows_computed == 100
        fills = model.cache.fills
        model(torch.tensor([99, 0]))
        assert model.cache.fills == fills


def test_lazy_rows_equal_the_live_stack_for_every_id_and_padding():
    model = small_define(padding_idx=3, dropout=0.3).eval()
    ids = torch.randint(0, 50, (40,))
    ids[:3] = 3
    live = model(ids).detach()
    with torch.no_grad():
        partial = model(ids[:10])
        full = model(ids)
    assert_close(partial, live[:10], name="partly filled")
    assert_close(full, live, name="filled later")
    assert torch.equal(full[:3], torch.zeros(3, 12))
    assert_close(model.materialize_cache()[ids], live, name="materialized")


@pytest.mark.parametrize("change", ["in_place", "optimizer", "load_state_dict", "replace", "cast",
                                    "reset_parameters", "data_assign"])
def test_every_parameter_change_drops_the_cache(change):
    model = small_define().eval()
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad():
        before = model(ids)
    if change == "in_place":
        with torch.no_grad():
            model.hgt.layers[1].bias.add_(torch.randn_like(model.hgt.layers[1].bias))
    elif change == "optimizer":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(ids).sum().backward()
        optimizer.step()
        model.eval()
    elif change == "load_state_dict":
        model.load_state_dict(small_define().state_dict())
    elif change == "replace":
        model.hgt.layers[0].weight = torch.nn.Parameter(torch.randn_like(model.hgt.layers[0].weight))
    elif change == "cast":
        model.double()
    elif change == "data_assign":
        model.map_weight.data = torch.randn_like(model.map_weight)
    else:
        model.reset_parameters()
    with torch.no_grad():
        after = model(ids)
        model.use_cache = False
        live = model(ids)
    assert model.cache.builds == 2, "the change must start a new table"
    if change == "cast":
        assert after.dtype == torch.float64
    else:
        assert not torch.allclose(after, before)
    assert_close(after, live, name=f"after {change}")


def test_bad_ids_are_named_on_the_served_path():
    model = small_define().eval()
    with torch.no_grad():
        for stage in ("empty", "partly filled", "materialized"):
            if stage == "partly filled":
                model(torch.tensor([1, 2]))
            elif stage == "materialized":
                model.materialize_cache()
            for bad in (50, -1):
                with pytest.raises(IndexError, match=f"contains {bad}"):
                    model(torch.tensor([1, bad]))
        assert model.cache.rows_computed == 50, "bad batches compute nothing"
        assert model(torch.zeros(0, dtype=torch.long)).shape == (0, 12)


def test_threads_serving_one_module_in_eval_get_the_live_outputs():
    model = small_define(vocab=400, cache_chunk_size=8).eval()
    batches = [torch.randint(0, 400, (64,), generator=torch.Generator().manual_seed(i)) for i in range(24)]
    model.use_cache = False
    with torch.no_grad():
        expected = [model(ids) for ids in batches]
    model.use_cache = True
    results, errors = [None] * len(batches), []
    start = threading.Barrier(6)

    def serve(worker):
        try:
            start.wait()
            with torch.inference_mode():
                for index in range(worker, len(batches), 6):
                    results[index] = model(batches[index])
        except Exception as error:  # reported below, with the thread's traceback lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, (got, want) in enumerate(zip(results, expected)):
        assert_close(got, want, name=f"batch {index}")
    assert model.cache.builds == 1


def test_deepcopy_and_pickled_modules_start_with_an_empty_cache(tmp_path):
    import copy

    model = small_define().eval()
    ids = torch.tensor([3, 8])
    with torch.no_grad():
        expected = model(ids)
    torch.save(model, tmp_path / "module.pt")
    for clone in (copy.deepcopy(model), torch.load(tmp_path / "module.pt", weights_only=False)):
        assert clone.cache.table is None
        with torch.no_grad():
            assert torch.equal(clone(ids), expected)
        assert clone.cache.table is not None, "the copy fills its own table"

"""Map dropout. Per sequence (`map_dropout_mode="sequence"`, the authors' RecurrentDropout): one
mask over the map features per sequence (the ids' last axis), shared by its positions, drawn in
training only; dedup is skipped while it is on (exact). Per token (the default): a mask hashed by
(seed, token id, feature). torch.compile(fullgraph=True) traces both.
"""
import pytest
import torch
from torch import nn

from define_kernels import DeFINE, define
from tolerances import assert_close

N = 16  # map_dim


def _model(**options):
    options = {"map_dropout": 0.5, "map_dropout_mode": "sequence", "backend": "torch", **options}
    return DeFINE(60, 12, map_dim=N, expand_dim=32, depth=2, max_groups=2, **options)


def _masks(model, ids, monkeypatch):
    """The map-dropout mask each position got: the op's input rows over the undropped rows."""
    seen = []
    real = define.functional.hgt

    def recording(x, *args, **kwargs):
        seen.append(x.detach())
        return real(x, *args, **kwargs)

    monkeypatch.setattr(define.functional, "hgt", recording)
    model(ids)
    monkeypatch.setattr(define.functional, "hgt", real)
    rows = seen[-1].reshape(*ids.shape, N)
    undropped = model.map_weight.detach()[ids] * model.scale
    assert bool((undropped != 0).all())
    return rows / undropped


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 6), (9,)], ids=["2d", "3d", "1d"])
def test_one_mask_per_sequence_shared_along_it(monkeypatch, shape):
    model = _model().train()
    ids = torch.randint(0, 60, shape)
    masks = _masks(model, ids, monkeypatch)
    assert torch.allclose(masks.round(decimals=6).unique(), torch.tensor([0.0, 2.0]))  # 0 or 1/(1-p)
    per_sequence = masks[..., :1, :]
    assert torch.allclose(masks, per_sequence.expand_as(masks)), "mask differs along a sequence"
    if len(shape) > 1:
        flat = per_sequence.reshape(-1, N)
        assert any(not torch.equal(flat[0], row) for row in flat[1:]), "sequences share one mask"


def test_token_mode_masks_differ_between_positions_of_other_ids(monkeypatch):
    model = _model(map_dropout_mode="token", dedup=False).train()
    masks = _masks(model, torch.randint(0, 60, (4, 9)), monkeypatch)
    assert not torch.allclose(masks, masks[:, :1].expand_as(masks))


def test_expectation_is_preserved(monkeypatch):
    model = _model(map_dropout=0.3).train()
    masks = _masks(model, torch.randint(0, 60, (3000, 2)), monkeypatch)
    kept = (masks[:, 0] > 0).double().mean()
    assert abs(kept.item() - 0.7) < 0.02
    assert abs(masks.double().mean().item() - 1.0) < 0.03


def test_eval_is_identity_and_gradients_reach_the_kept_rows():
    model = _model(padding_idx=0).train()
    plain = _model(map_dropout=0.0, padding_idx=0)
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 60, (3, 5))
    ids[0, 0] = 0
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
    assert torch.equal(model(ids), plain(ids))  # the live stack (grad enabled) too
    model.train()
    y = model(ids)
    assert torch.equal(y[0, 0], torch.zeros(12))  # padding output still zero
    y.sum().backward()
    assert torch.equal(model.map_weight.grad[0], torch.zeros(N))
    assert model.map_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [dict(), dict(in_proj_dim=8, dropout=0.2, in_proj_dropout=0.3),
                                     dict(sparse=True)], ids=["plain", "in-proj-dropout", "sparse"])
def test_dedup_is_skipped_so_outputs_are_exact(options):
    """A token's input depends on its sequence's mask: dedup would be wrong, so it is off in
    training with sequence map dropout, and dedup=True equals dedup=False under one seed."""
    models = [_model(dedup=dedup, **options).train() for dedup in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.tensor([[7, 2, 7, 30], [7, 7, 1, 2]])
    outputs = []
    for model in models:
        torch.manual_seed(5)
        outputs.append(model(ids))
    assert_close(outputs[0], outputs[1], name="dedup on vs off")
    assert not torch.allclose(outputs[0][0, 0], outputs[0][1, 0])  # one id, two sequences


def test_authors_layout_uses_sequence_mode():
    assert DeFINE.delight(30, 16, map_dim=8, depth=2, max_groups=2).map_dropout_mode == "sequence"


class _TinyLM(nn.Module):
    def __init__(self, mode):
        super().__init__()
        # dedup off: compiled runs skip it, and with map and stack dropout it is not exact
        self.embed = _model(in_proj_dim=8, map_dropout=0.4, dropout=0.1, map_dropout_mode=mode,
                            dedup=False)
        self.head = nn.Linear(12, 60)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_compile_fullgraph_matches_eager(mode):
    """Both modes trace whole (token mode: the hashed mask from an opaque seed op)."""
    torch._dynamo.reset()
    model = _TinyLM(mode).train()
    ids = torch.randint(0, 60, (3, 6))
    results = []
    with torch._inductor.config.patch(fallback_random=True):  # sequence: bernoulli_ on torch's generator
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        for net in (model, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            out = net(ids)
            out.sum().backward()
            results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch._dynamo.reset()
    (eager, eager_grads), (out, grads) = results
    assert_close(out, eager, name="logits")
    for (name, _), got, want in zip(model.named_parameters(), grads, eager_grads):
        assert_close(got, want, name=f"grad {name}")


def test_token_mode_mask_depends_on_the_id_only(monkeypatch):
    """Token mode: the same id gets the same mask wherever it occurs (hashed by token id), other
    ids other masks, and one seed gives one set of masks."""
    model = _model(map_dropout_mode="token", dedup=False).train()
    ids = torch.tensor([[5, 9, 5, 9, 5], [9, 5, 11, 12, 13]])
    torch.manual_seed(1)
    masks = _masks(model, ids, monkeypatch)
    for token in (5, 9):
        where = masks[ids == token]
        assert torch.equal(where, where[:1].expand_as(where)), f"id {token}: masks differ by position"
    assert not torch.equal(masks[0, 0], masks[0, 1])
    torch.manual_seed(1)
    assert torch.equal(_masks(model, ids, monkeypatch), masks)

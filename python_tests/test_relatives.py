"""Relatives of DeFINE (docs/math.md §4): tied output, augmented loss, slim embeddings, adaptive input.

Each module is checked against a direct float64 form of its formula, for shapes, parameter
counts, gradients (gradcheck where cheap) and errors that name the argument.
"""
import math

import pytest
import torch
from tolerances import assert_close

from define_kernels import DeFINE, HGTConfig
from define_kernels.reference import hgt_forward
from define_kernels.relatives import (AdaptiveDeFINE, AdaptiveInput, AugmentedLoss, SlimEmbedding,
                                      SlimOutput, TiedOutput)

F64 = torch.float64


def small_define(vocab=37, dim=24, **options):
    return DeFINE(vocab, dim, map_dim=16, expand_dim=40, depth=2, max_groups=4, **options)


# ------------------------------------------------------------------------------------------ tied
@pytest.mark.parametrize("bias", [False, True])
def test_tied_embedding_logits_are_h_times_table(bias):
    embedding = torch.nn.Embedding(29, 12).double()
    tied = TiedOutput(embedding, bias=bias).double()
    if bias:
        torch.nn.init.normal_(tied.bias)
    h = torch.randn(3, 5, 12, dtype=F64)
    expected = h @ embedding.weight.t() + (tied.bias if bias else 0)
    assert_close(tied(h), expected, name="tied logits")
    assert tied.table is embedding.weight
    assert tied.proj is None
    assert sum(p.numel() for p in tied.parameters()) == (29 if bias else 0)  # the table is the embedding's


def test_tied_embedding_shares_the_gradient():
    embedding = torch.nn.Embedding(11, 6)
    tied = TiedOutput(embedding)
    ids = torch.tensor([1, 2, 3])
    tied(embedding(ids)).logsumexp(-1).sum().backward()
    assert embedding.weight.grad.abs()[[0, 4, 5]].sum() > 0  # rows not looked up still get output grads


def test_tied_embedding_projects_other_widths():
    embedding = torch.nn.Embedding(13, 8).double()
    tied = TiedOutput(embedding, hidden_dim=5).double()
    h = torch.randn(4, 5, dtype=F64)
    assert tuple(tied.proj.weight.shape) == (8, 5)
    assert_close(tied(h), h @ tied.proj.weight.t() @ embedding.weight.t(), name="projected tied logits")


def test_tied_define_uses_a_bias_free_projection_to_the_map_table():
    define = small_define().double()
    tied = TiedOutput(define).double()
    assert tuple(tied.proj.weight.shape) == (16, 24) and tied.proj.bias is None
    assert tied.table is define.map_weight
    h = torch.randn(6, 24, dtype=F64)
    assert_close(tied(h), (h @ tied.proj.weight.t()) @ define.map_weight.t(), name="DeFINE tied logits")
    model_params = {id(p) for p in torch.nn.ModuleList([define, tied]).parameters()}
    assert len(model_params) == len(list(define.parameters())) + 1  # only the projection is new


@pytest.mark.parametrize("owner", ["embedding", "define"])
def test_tied_output_loss_is_the_fused_loss_of_its_logits(owner):
    """TiedOutput.loss equals F.cross_entropy / AugmentedLoss of forward(h), gradients included;
    a DeFINE's padding row gets no gradient through it."""
    embedding = (torch.nn.Embedding(37, 24) if owner == "embedding" else small_define(padding_idx=3)).double()
    tied = TiedOutput(embedding, hidden_dim=20, bias=True).double()
    h = torch.randn(2, 9, 20, dtype=F64)
    targets = torch.randint(0, 37, (2, 9))
    targets[0, 0], targets[1, 2] = -100, 3
    for options, module in (({"label_smoothing": 0.1}, None),
                            ({"alpha": 0.5, "tau": 2.0}, AugmentedLoss(tau=2.0, alpha=0.5))):
        params = [tied.table, tied.proj.weight, tied.bias]
        fused = tied.loss(h, targets, **options)
        fused_grads = torch.autograd.grad(fused, params)
        logits, flat = tied(h).reshape(-1, 37), targets.reshape(-1)
        if module is None:
            expected = torch.nn.functional.cross_entropy(logits, flat, label_smoothing=0.1)
        else:
            keep = flat != -100
            expected = module(logits[keep], flat[keep], tied.table)
        expected_grads = torch.autograd.grad(expected, params)
        assert_close(fused, expected, name="loss")
        if owner == "define":  # the fused head reads the padding row as zero
            assert float(fused_grads[0][3].abs().sum()) == 0.0
            fused_grads, expected_grads = [g.clone() for g in fused_grads], [g.clone() for g in expected_grads]
            fused_grads[0][3] = expected_grads[0][3] = 0
        for grad, want in zip(fused_grads, expected_grads):
            assert_close(grad, want, name="gradient")


def test_tied_output_gradcheck():
    embedding = torch.nn.Embedding(7, 4).double()
    tied = TiedOutput(embedding, hidden_dim=3, bias=True).double()
    h = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b, p: torch.nn.functional.linear(h @ p.t(), w, b),
                                    (h, embedding.weight, tied.bias, tied.proj.weight))
    assert torch.autograd.gradcheck(tied, (h,))


def test_tied_output_errors():
    with pytest.raises(ValueError, match="embedding"):
        TiedOutput(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="hidden_dim"):
        TiedOutput(torch.nn.Embedding(5, 3), hidden_dim=0)
    tied = TiedOutput(torch.nn.Embedding(5, 3))
    with pytest.raises(ValueError, match="h must have shape"):
        tied(torch.randn(2, 4))
    with pytest.raises(ValueError, match="h has dtype"):
        tied(torch.randn(2, 3, dtype=F64))


# ------------------------------------------------------------------------------ augmented loss
def direct_augmented_loss(logits, targets, table, tau, alpha, factor):
    """docs/math.md §4 in float64 with explicit softmaxes and sums (no F.kl_div)."""
    logits, table = logits.double(), table.double()
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    ce = -torch.log(probs[torch.arange(len(targets)), targets]).mean()
    scores = table[targets] @ table.t() / tau
    target_dist = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    soft = torch.exp(logits / tau) / torch.exp(logits / tau).sum(-1, keepdim=True)
    kl = (target_dist * (torch.log(target_dist) - torch.log(soft))).sum(-1).mean()
    return ce + alpha * factor * kl


@pytest.mark.parametrize("kl_scale,factor", [("tau", 3.0), ("tau2", 9.0), ("none", 1.0)])
def test_augmented_loss_matches_direct_formula(kl_scale, factor):
    table = torch.randn(23, 6, dtype=F64)
    logits = torch.randn(9, 23, dtype=F64) * 3
    targets = torch.randint(0, 23, (9,))
    loss = AugmentedLoss(tau=3.0, alpha=0.7, kl_scale=kl_scale)
    assert_close(loss(logits, targets, table), direct_augmented_loss(logits, targets, table, 3.0, 0.7, factor),
                 name="augmented loss")
    ce, kl = loss.last_parts
    assert kl > 0 and ce > 0


def test_augmented_loss_alpha_zero_is_cross_entropy_and_sum_reduction():
    table, logits = torch.randn(10, 4, dtype=F64), torch.randn(5, 10, dtype=F64)
    targets = torch.randint(0, 10, (5,), dtype=torch.int32)
    assert_close(AugmentedLoss(alpha=0.0)(logits, targets, table),
                 torch.nn.functional.cross_entropy(logits, targets.long()), name="alpha=0")
    mean = AugmentedLoss(tau=2.0, alpha=0.3)(logits, targets, table)
    total = AugmentedLoss(tau=2.0, alpha=0.3, reduction="sum")(logits, targets, table)
    assert_close(total, mean * 5, name="sum reduction")


def test_augmented_loss_gradients():
    table = torch.randn(8, 3, dtype=F64, requires_grad=True)
    logits = torch.randn(4, 8, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 8, (4,))
    loss = AugmentedLoss(tau=2.0, alpha=0.5)
    assert torch.autograd.gradcheck(lambda lg: loss(lg, targets, table.detach()), (logits,))
    loss(logits, targets, table).backward()
    assert table.grad is None  # y~ is a fixed target by default
    through = AugmentedLoss(tau=2.0, alpha=0.5, detach_target=False)
    assert torch.autograd.gradcheck(lambda lg, tb: through(lg, targets, tb), (logits, table))


def test_augmented_loss_with_tied_output_trains_the_table_through_the_logits():
    embedding = torch.nn.Embedding(12, 5)
    tied = TiedOutput(embedding)
    logits = tied(torch.randn(7, 5))
    AugmentedLoss(tau=10.0, alpha=0.5)(logits, torch.randint(0, 12, (7,)), tied.table).backward()
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0


def test_augmented_loss_errors():
    for kwargs, name in (({"tau": 0}, "tau"), ({"alpha": -1}, "alpha"), ({"kl_scale": "x"}, "kl_scale"),
                         ({"reduction": "none"}, "reduction")):
        with pytest.raises(ValueError, match=name):
            AugmentedLoss(**kwargs)
    loss, table, logits = AugmentedLoss(), torch.randn(6, 3), torch.randn(4, 6)
    with pytest.raises(ValueError, match="logits"):
        loss(logits[0], torch.zeros(4, dtype=torch.long), table)
    with pytest.raises(ValueError, match="table"):
        loss(logits, torch.zeros(4, dtype=torch.long), table[:5])
    with pytest.raises(ValueError, match="targets"):
        loss(logits, torch.zeros(4), table)
    with pytest.raises(ValueError, match="targets"):
        loss(logits, torch.zeros(3, dtype=torch.long), table)
    with pytest.raises(IndexError, match="targets contains 6"):
        loss(logits, torch.tensor([0, 1, 6, 2]), table)


# ------------------------------------------------------------------------------------------ slim
def test_slim_embedding_shapes_counts_and_fixed_assignment():
    slim = SlimEmbedding(101, 12, num_subvectors=3, pool_size=30, seed=5)
    assert sum(p.numel() for p in slim.parameters()) == 30 * 12 // 3  # M * d / K
    assert tuple(slim.pools.shape) == (3, 10, 4)
    assert "idx" in dict(slim.named_buffers()) and not any(p is slim.idx for p in slim.parameters())
    assert slim.idx.shape == (101, 3) and int(slim.idx.min()) >= 0 and int(slim.idx.max()) < 10
    assert torch.equal(slim.idx, SlimEmbedding(101, 12, num_subvectors=3, pool_size=30, seed=5).idx)
    assert not torch.equal(slim.idx, SlimEmbedding(101, 12, num_subvectors=3, pool_size=30, seed=6).idx)
    assert len(torch.unique(slim.idx[:, 0])) > 5  # uniform over the pool, not one row


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_slim_embedding_forward_is_the_concatenation_of_pool_rows(id_dtype):
    slim = SlimEmbedding(53, 10, num_subvectors=2, pool_size=14, seed=1).double()
    ids = torch.randint(0, 53, (4, 7), dtype=id_dtype)
    out = slim(ids)
    assert out.shape == (4, 7, 10)
    w = int(ids[2, 3])
    expected = torch.cat([slim.pools[0, slim.idx[w, 0]], slim.pools[1, slim.idx[w, 1]]])
    assert_close(out[2, 3], expected, name="slim row")
    assert_close(out, slim.materialize()[ids.long()], name="slim vs table")


def test_slim_embedding_gradcheck():
    slim = SlimEmbedding(9, 6, num_subvectors=3, pool_size=6, seed=2).double()
    ids = torch.tensor([[0, 8, 8], [3, 1, 0]])
    assert torch.autograd.gradcheck(lambda pools: pools[torch.arange(3), slim.idx[ids]].reshape(2, 3, 6),
                                    (slim.pools.detach().requires_grad_(),))
    slim(ids).pow(2).sum().backward()
    assert slim.pools.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_slim_output_matches_the_materialized_table(bias):
    out = SlimOutput(67, 12, num_subvectors=4, pool_size=20, seed=3, bias=bias).double()
    if bias:
        torch.nn.init.normal_(out.bias)
    h = torch.randn(2, 5, 12, dtype=F64)
    expected = h @ out.materialize().t() + (out.bias if bias else 0)
    assert_close(out(h), expected, name="slim logits")
    assert sum(p.numel() for p in out.parameters()) == 20 * 12 // 4 + (67 if bias else 0)
    assert out.macs_per_token == 20 * 12 // 4 + 67 * 4


def test_slim_output_gradcheck_and_sharing():
    out = SlimOutput(11, 6, num_subvectors=2, pool_size=8, seed=0).double()
    h = torch.randn(3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(out, (h,))
    pools = out.table.pools
    assert torch.autograd.gradcheck(
        lambda pl: h.detach() @ pl[torch.arange(2), out.table.idx].reshape(11, 6).t(), (pools.detach().requires_grad_(),))
    emb = SlimEmbedding(11, 6, num_subvectors=2, pool_size=8, seed=4).double()
    shared = SlimOutput(11, 6, shared=emb, bias=False).double()
    assert shared.table.pools is emb.pools
    assert_close(shared(h.detach()), h.detach() @ emb.materialize().t(), name="shared slim logits")


def test_slim_errors():
    with pytest.raises(ValueError, match="embedding_dim"):
        SlimEmbedding(10, 10, num_subvectors=3, pool_size=9)
    with pytest.raises(ValueError, match="pool_size"):
        SlimEmbedding(10, 12, num_subvectors=3, pool_size=10)
    with pytest.raises(ValueError, match="num_subvectors"):
        SlimEmbedding(10, 12, num_subvectors=0, pool_size=10)
    slim = SlimEmbedding(10, 12, num_subvectors=3, pool_size=9)
    with pytest.raises(IndexError, match="ids contains 10"):
        slim(torch.tensor([1, 10]))
    with pytest.raises(IndexError, match="ids contains -1"):
        slim(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        slim(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="hidden_dim"):
        SlimOutput(10, 10, num_subvectors=4, pool_size=8)
    out = SlimOutput(10, 12, num_subvectors=3, pool_size=9)
    with pytest.raises(ValueError, match="h must have shape"):
        out(torch.randn(2, 11))
    with pytest.raises(ValueError, match="shared"):
        SlimOutput(10, 12, shared=torch.nn.Embedding(10, 12))
    with pytest.raises(ValueError, match="shared has shape"):
        SlimOutput(10, 6, shared=slim)


# ------------------------------------------------------------------------------- adaptive input
def test_adaptive_input_bands_and_parameter_count():
    adaptive = AdaptiveInput(100, 32, cutoffs=[10, 40], factor=4)
    assert adaptive.band_edges == ((0, 10), (10, 40), (40, 100))
    assert adaptive.band_dims == (32, 8, 2)
    formula = 10 * 32 + 32 * 32 + 30 * 8 + 32 * 8 + 60 * 2 + 32 * 2
    assert sum(p.numel() for p in adaptive.parameters()) == formula == adaptive.num_parameters_formula()
    assert AdaptiveInput(100, 32).band_dims == (32,)  # no cutoffs: one band, a projected table


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_adaptive_input_forward_per_band(id_dtype):
    adaptive = AdaptiveInput(50, 16, cutoffs=[5, 20], factor=2).double()
    ids = torch.tensor([[0, 4, 5, 19], [20, 49, 3, 25]], dtype=id_dtype)
    out = adaptive(ids)
    assert out.shape == (2, 4, 16)
    for position, word in zip(range(8), ids.reshape(-1).tolist()):
        band = 0 if word < 5 else 1 if word < 20 else 2
        start = (0, 5, 20)[band]
        expected = adaptive.projs[band].weight @ adaptive.bands[band].weight[word - start]
        assert_close(out.reshape(-1, 16)[position], expected, name=f"adaptive row {word}")


def test_adaptive_input_gradcheck_and_zero_grads_for_empty_bands():
    adaptive = AdaptiveInput(12, 4, cutoffs=[3, 7], factor=2).double()
    ids = torch.tensor([0, 2, 11, 8])
    names = [name for name, _ in adaptive.named_parameters()]

    def run(*values):
        return torch.func.functional_call(adaptive, dict(zip(names, values)), (ids,))
    assert torch.autograd.gradcheck(run, tuple(p.detach().requires_grad_() for p in adaptive.parameters()))
    adaptive(ids).sum().backward()
    assert all(p.grad is not None for p in adaptive.parameters())  # band 1 unused: a zero gradient
    assert adaptive.bands[1].weight.grad.abs().sum() == 0


def test_adaptive_define_feeds_the_hgt_stack():
    model = AdaptiveDeFINE(40, 24, cutoffs=[8], factor=2, map_dim=16, expand_dim=40, depth=2,
                           max_groups=4).double()
    ids = torch.randint(0, 40, (3, 5))
    out = model(ids)
    assert out.shape == (3, 5, 24)
    x = model.map(ids.reshape(-1)) * math.sqrt(16)
    expected = hgt_forward(x, None, model.hgt.op_params(), model.config)
    assert_close(out.reshape(-1, 24), expected, name="AdaptiveDeFINE vs reference")
    counts = model.parameter_counts()
    assert counts["transform"] == HGTConfig(16, 40, 24, 2, 4).num_parameters
    assert counts["map"] == model.map.num_parameters_formula()
    out.sum().backward()
    assert model.map.bands[0].weight.grad is not None


def test_adaptive_errors():
    with pytest.raises(ValueError, match="cutoffs"):
        AdaptiveInput(10, 8, cutoffs=[5, 3])
    with pytest.raises(ValueError, match="cutoffs"):
        AdaptiveInput(10, 8, cutoffs=[10])
    with pytest.raises(ValueError, match="cutoffs"):
        AdaptiveInput(10, 8, cutoffs="5")
    with pytest.raises(ValueError, match="factor"):
        AdaptiveInput(10, 8, factor=0.5)
    with pytest.raises(ValueError, match="band of width 0"):
        AdaptiveInput(100, 8, cutoffs=[10, 20, 30], factor=4)
    with pytest.raises(ValueError, match="embedding_dim"):
        AdaptiveInput(10, 0)
    adaptive = AdaptiveInput(10, 8, cutoffs=[5])
    with pytest.raises(IndexError, match="ids contains 10"):
        adaptive(torch.tensor([10]))
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        adaptive(torch.tensor([1.0]))
